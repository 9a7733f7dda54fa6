"""Deterministic mini-batches of a :class:`~mclandscape.engine.data.Dataset`.

:func:`iterate_batches` yields shuffled (and optionally augmented) NumPy batches that depend only on
``(seed, epoch)``; :func:`batch_stream` is the random-access stream ``t -> batch`` the training loop reads
(batch ``t`` depends only on ``(seed, t)``, so a resumed run needs no replay). :func:`data_digest`
fingerprints a dataset for the resume contract.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np

from mclandscape.core import _checks
from mclandscape.core.tree import tree_digest
from mclandscape.engine.data import Dataset

__all__ = ["BatchStream", "batch_stream", "data_digest", "iterate_batches", "num_batches", "augment_batch"]


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Number of batches :func:`iterate_batches` yields for ``n`` examples.

    Args:
      n: the number of examples.
      batch_size: examples per batch.
      drop_last: whether the last partial batch is dropped.

    Returns:
      The count.

    Example:
        >>> num_batches(10, 4), num_batches(10, 4, drop_last=True)
        (3, 2)
    """
    return n // batch_size if drop_last else -(-n // batch_size)


def augment_batch(x: np.ndarray, rng: np.random.Generator, *, pad: int = 4, flip: bool = True) -> np.ndarray:
    """Standard CIFAR augmentation of an NHWC batch: random crop after zero-padding, random horizontal flip.

    Zeros are padded in the (normalised) input space. Vectorised; draws from ``rng`` only.

    Args:
      x: images ``[N, H, W, C]``.
      rng: a NumPy generator.
      pad: pixels of zero padding on each side before the crop.
      flip: flip horizontally with probability 1/2.

    Returns:
      The augmented batch, same shape and dtype.

    Example:
        >>> import numpy as np
        >>> x = np.ones((2, 8, 8, 1), np.float32)
        >>> augment_batch(x, np.random.default_rng(0), pad=2).shape
        (2, 8, 8, 1)
    """
    if x.ndim != 4:
        raise ValueError(f"augmentation needs NHWC images, got a batch of shape {x.shape}")
    n, h, w, _ = x.shape
    out = x
    if pad > 0:
        padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        oy = rng.integers(0, 2 * pad + 1, size=n)
        ox = rng.integers(0, 2 * pad + 1, size=n)
        rows = oy[:, None] + np.arange(h)[None, :]  # [n, h]
        cols = ox[:, None] + np.arange(w)[None, :]  # [n, w]
        out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if flip:
        mask = rng.random(n) < 0.5
        out = np.where(mask[:, None, None, None], out[:, :, ::-1, :], out)
    return np.ascontiguousarray(out, dtype=x.dtype)


def _check(ds: Dataset, batch_size: int, augment: bool) -> int:
    if augment and not ds.is_image:
        raise ValueError(f"augmentation applies to images; dataset {ds.name!r} has inputs of shape {ds.input_shape}")
    return _checks.integer(batch_size, "batch_size", low=1)


def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    return np.random.default_rng([int(seed), int(epoch), 0]).permutation(n) if shuffle else np.arange(n)


def _take_batch(ds: Dataset, order: np.ndarray, j: int, batch_size: int, *, seed: int, epoch: int,
                augment: bool, pad: int) -> tuple[np.ndarray, np.ndarray]:
    idx = order[j * batch_size:(j + 1) * batch_size]
    x = ds.x[idx]
    if augment:  # each batch has its own stream, so batch j needs no draws of batches 0..j-1
        x = augment_batch(x, np.random.default_rng([int(seed), int(epoch), 1, int(j)]), pad=pad)
    return x, ds.y[idx]


def iterate_batches(ds: Dataset, batch_size: int, *, seed: int, epoch: int = 0, shuffle: bool = True,
                    augment: bool = False, drop_last: bool = False, pad: int = 4) -> Iterator[tuple]:
    """Yield ``(x, y)`` NumPy batches of ``ds``, deterministic in ``(seed, epoch)``.

    The order and the augmentation depend only on ``(seed, epoch)`` (and each batch's augmentation on its
    index too), so a resumed run sees exactly the batches an uninterrupted one would.

    Args:
      ds: the :class:`Dataset`.
      batch_size: examples per batch (>= 1).
      seed, epoch: the shuffle and augmentation stream.
      shuffle: shuffle the examples.
      augment: :func:`augment_batch` (random crop with padding ``pad`` + horizontal flip; images only).
      drop_last: drop the last smaller batch.
      pad: the crop padding.

    Returns:
      An iterator of ``(x, y)`` batches.

    Example:
        >>> from mclandscape.engine.data import load_dataset
        >>> ds = load_dataset("iris", "test")
        >>> [len(y) for _, y in iterate_batches(ds, 12, seed=0)]
        [12, 12, 6]
    """
    batch_size = _check(ds, batch_size, augment)
    order = _epoch_order(len(ds), seed, epoch, shuffle)
    for j in range(num_batches(len(ds), batch_size, drop_last)):
        yield _take_batch(ds, order, j, batch_size, seed=seed, epoch=epoch, augment=augment, pad=pad)


def data_digest(ds) -> str:
    """A digest of a dataset's inputs and targets (what a checkpoint's fingerprint records of the data).

    Args:
      ds: anything with ``.x`` and ``.y``.

    Returns:
      A hex string.

    Example:
        >>> from mclandscape.engine.data import load_dataset
        >>> ds = load_dataset("iris", "test")
        >>> data_digest(ds) == data_digest(ds.take(len(ds))), data_digest(ds) == data_digest(ds.take(5))
        (True, False)
    """
    return tree_digest((np.asarray(ds.x), np.asarray(ds.y)))


class BatchStream:
    """A random-access mini-batch stream ``t -> batch`` over epochs of :func:`iterate_batches`.

    Batch ``t`` is batch ``t mod steps_per_epoch`` of epoch ``t // steps_per_epoch`` (shuffled per epoch
    from ``seed``), so it depends only on ``(seed, t)`` and a resumed run needs no replay. Batches are
    ``(x, y)`` device arrays; with ``drop_last=False`` the last batch of an epoch is smaller, or, with
    ``pad=True``, padded to the full size and returned as ``(x, y, weights)`` with zero weights on the
    padding (then every batch is ``(x, y, weights)``, one compiled shape).

    Example:
        >>> import numpy as np
        >>> ds = Dataset(np.arange(10.0).reshape(10, 1), np.arange(10), 10, "toy")
        >>> stream = BatchStream(ds, 4, seed=0, drop_last=False, pad=True)
        >>> stream.steps_per_epoch, [b[2].tolist() for b in (stream(2),)]
        (3, [[1.0, 1.0, 0.0, 0.0]])
    """

    def __init__(self, ds: Dataset, batch_size: int, *, seed: int = 0, augment: bool = False,
                 drop_last: bool = True, pad: bool = False):
        self.data, self.batch_size, self.seed = ds, _check(ds, batch_size, augment), int(seed)
        self.augment, self.drop_last, self.pad = bool(augment), bool(drop_last), bool(pad)
        self.steps_per_epoch = num_batches(len(ds), self.batch_size, self.drop_last)
        if self.steps_per_epoch < 1:
            raise ValueError(f"dataset {ds.name!r} is empty" if len(ds) == 0 else
                             f"batch_size {batch_size} exceeds the dataset size {len(ds)}")
        self._epoch: tuple[int, np.ndarray] | None = None

    @property
    def digest(self) -> str:
        """:func:`data_digest` of the dataset (computed on each access: a trainer reads it once per run)."""
        return data_digest(self.data)

    def __call__(self, t: int):
        epoch, j = divmod(_checks.integer(t, "batch index", low=0), self.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:  # the permutation of the current epoch only
            self._epoch = (epoch, _epoch_order(len(self.data), self.seed, epoch, True))
        x, y = _take_batch(self.data, self._epoch[1], j, self.batch_size, seed=self.seed, epoch=epoch,
                           augment=self.augment, pad=4)
        if not self.pad:
            return jnp.asarray(x), jnp.asarray(y)
        w = (np.arange(self.batch_size) < len(x)).astype(np.float32)
        x, y = (np.pad(a, [(0, self.batch_size - len(a))] + [(0, 0)] * (a.ndim - 1)) for a in (x, y))
        return jnp.asarray(x), jnp.asarray(y), jnp.asarray(w)


def batch_stream(ds: Dataset, batch_size: int, *, seed: int = 0, augment: bool = False, drop_last: bool = True,
                 pad: bool = False) -> BatchStream:
    """A :class:`BatchStream` (full batches only by default).

    Args:
      ds: the :class:`Dataset`.
      batch_size: examples per batch.
      seed: the shuffle and augmentation seed.
      augment: random crops and flips (images only).
      drop_last: only full batches.
      pad: pad a partial last batch and return ``(x, y, weights)``.

    Returns:
      A :class:`BatchStream`, ``t -> batch``.

    Example:
        >>> from mclandscape.engine.data import load_dataset
        >>> stream = batch_stream(load_dataset("iris", "train"), 50)
        >>> stream.steps_per_epoch, stream(0)[0].shape
        (2, (50, 4))
    """
    return BatchStream(ds, batch_size, seed=seed, augment=augment, drop_last=drop_last, pad=pad)
