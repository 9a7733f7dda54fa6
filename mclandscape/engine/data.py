"""Datasets in memory as NumPy arrays, one entry point, deterministic batches.

``load_dataset(name, split)`` returns a :class:`Dataset` (``x`` float32 — NHWC images or ``[N, F]``
features — and ``y`` int32 labels); :mod:`mclandscape.engine.batches` cuts it into deterministic batches.

| name | source | x (per example) | classes | train / test |
|---|---|---|---|---|
| ``digits`` | scikit-learn | 8×8×1 image in [0, 1] | 10 | 1437 / 360 |
| ``iris`` | scikit-learn | 4 features | 3 | 120 / 30 |
| ``wine`` | scikit-learn | 13 features | 3 | 142 / 36 |
| ``breast_cancer`` | scikit-learn | 30 features | 2 | 455 / 114 |
| ``mnist1d`` | ``mnist1d`` package (generated procedurally, seed 42) | 40-sample signal | 10 | 4000 / 1000 |
| ``synthetic`` | seeded teacher network (Schager, 2025, §5.1) | ``dim`` features | ``num_classes`` | ``n_train`` / ``n_test`` |
| ``cifar10`` | TFDS ``cifar10`` (array_record, prepared offline) | 32×32×3 | 10 | 50000 / 10000 |
| ``cifar100`` | TFDS ``cifar100`` | 32×32×3 | 100 | 50000 / 10000 |
| ``tiny_imagenet`` | local TFDS builder from the manually provided archive | 64×64×3 | 200 | 100000 / 10000 (val) |

Splits of the scikit-learn sets are a fixed stratified 80/20 split (``random_state=0``), the same in every
process. With ``normalize=True`` tabular features are standardised with the training split's mean and
standard deviation, digits are standardised with the training pixel mean/std, CIFAR and Tiny-ImageNet
use the usual per-channel constants, and MNIST-1D (already standardised by its generator) is unchanged.

CIFAR and Tiny-ImageNet are read through ``tfds.data_source`` (array_record; no TensorFlow needed). They
are never downloaded: TFDS's own download hangs for minutes offline, so mclandscape first checks that the
prepared files exist under ``data_dir`` (default ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``) and
otherwise raises :class:`DatasetNotFoundError` at once, saying where the files must be and how to prepare
them (``python -m mclandscape.engine.tfds_local prepare ...``, see :mod:`mclandscape.engine.tfds_local`).
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

import numpy as np

from mclandscape.core import _checks

__all__ = ["Dataset", "DatasetNotFoundError", "load_dataset", "list_datasets", "resolve_data_dir", "IMAGE_STATS"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset that must be prepared on disk (CIFAR, Tiny-ImageNet) is not there."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled dataset held in memory.

    ``x``: float32, ``[N, H, W, C]`` for images or ``[N, F]`` for features. ``y``: int32 ``[N]`` class
    labels (for ``synthetic`` regression: float32 ``[N, targets]`` with ``num_classes == 0``).

    Example:
        >>> import numpy as np
        >>> ds = Dataset(np.zeros((6, 3), np.float32), np.arange(6, dtype=np.int32) % 2, 2, "toy")
        >>> len(ds), ds.input_shape, len(ds.subset(ds.y == 1))
        (6, (3,), 3)
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self):
        if len(self.x) != len(self.y):
            raise ValueError(f"dataset {self.name!r}: {len(self.x)} inputs but {len(self.y)} labels")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example (``x.shape[1:]``)."""
        return tuple(int(s) for s in self.x.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.x.ndim == 4

    def subset(self, indices) -> Dataset:
        """The examples at ``indices`` (an index array, a boolean mask or a slice)."""
        return Dataset(self.x[indices], self.y[indices], self.num_classes, self.name)

    def take(self, n: int) -> Dataset:
        """The first ``n`` examples (all of them when ``n >= len(self)``).

        Args:
          n: an integer >= 1.

        Returns:
          A :class:`Dataset`.

        Example:
            >>> import numpy as np
            >>> ds = Dataset(np.zeros((5, 2), np.float32), np.arange(5, dtype=np.int32), 5, "toy")
            >>> len(ds.take(3))
            3
        """
        return self.subset(slice(0, _checks.integer(n, "n", low=1, what="a number of examples")))


# ----------------------------------------------------------------------------------------------------------
# registry

# Per-channel (mean, std) of the training images in [0, 1] (the TFDS image sets; the others are generated offline).
IMAGE_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny_imagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}
# every dataset but ``synthetic``
_NUM_CLASSES = {"digits": 10, "iris": 3, "wine": 3, "breast_cancer": 2, "mnist1d": 10,
                "cifar10": 10, "cifar100": 100, "tiny_imagenet": 200}


def list_datasets() -> list[str]:
    """The names :func:`load_dataset` accepts.

    Returns:
      A sorted list of names.

    Example:
        >>> "digits" in list_datasets() and "cifar10" in list_datasets()
        True
    """
    return sorted([*_NUM_CLASSES, "synthetic"])


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets`` (TFDS's own default).

    Args:
      data_dir: an explicit directory, or ``None``.

    Returns:
      The directory as an expanded ``Path``.

    Example:
        >>> str(resolve_data_dir("/data/tfds"))
        '/data/tfds'
    """
    if data_dir is None:
        data_dir = os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")
    return Path(data_dir).expanduser()


# ----------------------------------------------------------------------------------------------------------
# offline sources (raw, un-normalised)

_CACHE: dict = {}


def _cached(key, make):
    # setdefault: two threads that both make a value return the same one
    return _CACHE[key] if key in _CACHE else _CACHE.setdefault(key, make())


def _sklearn_raw(name: str):
    from sklearn import datasets as skd
    from sklearn.model_selection import train_test_split

    bunch = getattr(skd, f"load_{name}")()
    # digits: [N, 8, 8, 1] images in [0, 1]; the others: feature rows
    x = (bunch.images.astype(np.float32) / 16.0)[..., None] if name == "digits" else bunch.data.astype(np.float32)
    y = bunch.target.astype(np.int32)
    tr, te = map(np.sort, train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=y))
    return x[tr], y[tr], x[te], y[te]


def _mnist1d_raw(name: str = "mnist1d"):
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset seeds NumPy's and Python's global generators: keep the caller's global state intact.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return (d["x"].astype(np.float32), d["y"].astype(np.int32),
            d["x_test"].astype(np.float32), d["y_test"].astype(np.int32))


def _offline_raw(name: str):
    """``(x_train, y_train, x_test, y_test)`` of an offline dataset before normalisation (cached)."""
    return _cached(("raw", name), lambda: (_mnist1d_raw if name == "mnist1d" else _sklearn_raw)(name))


def _synthetic(split: str, seed: int, *, n_train: int = 256, n_test: int = 256, dim: int = 2,
               num_classes: int = 2, task: str = "classification", hidden: int = 16, noise: float = 0.0,
               targets: int = 1) -> Dataset:
    """Seeded data from a random teacher network (Schager, 2025, "Volumetric investigation into neural network loss landscapes", §5.1: small non-linear nets on random data).

    ``x ~ N(0, I_dim)``; teacher ``f(x) = tanh(x W1 + b1) W2`` with Gaussian weights (``hidden`` units).
    Classification: ``y = argmax(f(x) - mean f + noise * Gumbel)`` over ``num_classes`` outputs. Regression
    (``task="regression"``): ``y = f(x) + noise * N(0, 1)``, float32 ``[N, targets]``, ``num_classes=0``.
    Train and test come from one draw of ``n_train + n_test`` points, so they share the teacher.
    """
    classify = _checks.choice(task, "synthetic task", ("classification", "regression")) == "classification"
    for name, value, low in (("dim", dim, 1), ("n_train", n_train, 1), ("n_test", n_test, 0), ("hidden", hidden, 1),
                             ("num_classes" if classify else "targets", num_classes if classify else targets,
                              2 if classify else 1)):
        _checks.integer(value, name, low=low, what=f"synthetic {task}")
    out = num_classes if classify else targets
    rng = np.random.default_rng([int(seed), 2002])
    n = n_train + n_test
    x = rng.standard_normal((n, dim)).astype(np.float32)
    w1 = rng.standard_normal((dim, hidden)) / np.sqrt(dim)
    b1 = 0.5 * rng.standard_normal(hidden)
    w2 = rng.standard_normal((hidden, out)) / np.sqrt(hidden)
    f = np.tanh(x @ w1 + b1) @ w2
    if classify:
        f = f - f.mean(axis=0)  # centre the teacher's logits so that no class is (nearly) empty
        y = np.argmax(f + noise * rng.gumbel(size=f.shape), axis=1).astype(np.int32)
    else:
        y = (f + noise * rng.standard_normal(f.shape)).astype(np.float32)
    sl = slice(0, n_train) if split == "train" else slice(n_train, n)
    return Dataset(x[sl], y[sl], int(out) if classify else 0, "synthetic")


# ----------------------------------------------------------------------------------------------------------
# TFDS sources


def _check_prepared(name: str, split: str, root: Path) -> None:
    """Fail in milliseconds, before TFDS is asked for anything, when ``split`` (TFDS's name) of dataset ``name``
    is not prepared under ``root``."""
    from mclandscape.engine import tfds_local

    builder_name, version = tfds_local.tfds_name_and_version(name)
    vdir, pattern = root / builder_name / version, f"{builder_name}-{split}.array_record-*"
    others = sorted(p.name for p in vdir.glob(f"{builder_name}-{split}.*") if "array_record" not in p.name)
    if any(vdir.glob(pattern)) and (vdir / "dataset_info.json").is_file():
        return
    problem = (f"{vdir} holds {others[0]} in a format tfds.data_source cannot read; it needs array_record files"
               if others else f"expected {vdir / 'dataset_info.json'} and {vdir / pattern}")
    raise DatasetNotFoundError(
        f"dataset {name!r} is not prepared under {root} ({problem}).\n"
        f"mclandscape reads it offline with tfds.data_source and never downloads it (TFDS's own download "
        f"hangs for minutes without network).\n{tfds_local.preparation_instructions(name, root)}\n"
        f"Then pass data_dir={str(root)!r} (or set TFDS_DATA_DIR)."
    )


def _tfds_raw(name: str, split: str, root: Path):
    """Raw ``(x, y)`` of a prepared split read through ``tfds.data_source`` (no TensorFlow; cached)."""
    import tensorflow_datasets as tfds

    from mclandscape.engine import tfds_local  # (registers the Tiny-ImageNet builder)

    split = "validation" if (name, split) == ("tiny_imagenet", "test") else split  # its test images have no labels
    _check_prepared(name, split, root)

    def read():
        source = tfds.builder(tfds_local.tfds_name_and_version(name)[0], data_dir=str(root)).as_data_source(split)
        recs = source.__getitems__(list(range(len(source))))
        return np.stack([r["image"] for r in recs]), np.asarray([r["label"] for r in recs], np.int32)

    return _cached(("tfds", name, split, str(root.resolve())), read)


# ----------------------------------------------------------------------------------------------------------
# entry point


def load_dataset(name: str, split: str = "train", *, data_dir: str | os.PathLike | None = None, seed: int = 0,
                 normalize: bool = True, limit: int | None = None, **options) -> Dataset:
    """Load ``split`` ("train" or "test") of dataset ``name`` into memory (see the module table).

    Args:
      name: a dataset of :func:`list_datasets` (``"cifar-10"``, ``"mnist_1d"`` and similar spellings work).
      split: ``"train"`` or ``"test"``.
      data_dir: TFDS data directory (CIFAR, Tiny-ImageNet); default ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``.
      seed: only used by ``synthetic`` (the other datasets have fixed splits; shuffling is
        :func:`mclandscape.engine.batches.iterate_batches`'s job).
      normalize: standardise (see the module docstring); the statistics always come from the training split,
        so train and test are transformed identically.
      limit: keep only the first ``limit`` examples, an integer >= 1 (quick experiments).
      **options: ``synthetic`` keywords (``n_train, n_test, dim, num_classes, task, hidden, noise, targets``).

    Returns:
      A :class:`Dataset`.

    Raises:
      ValueError: an unknown name, split or option, or a bad ``limit``.
      DatasetNotFoundError: CIFAR / Tiny-ImageNet files are missing (raised at once, no network).

    Example:
        >>> ds = load_dataset("iris", "train", limit=10)
        >>> len(ds), ds.input_shape, ds.num_classes, ds.x.dtype.name
        (10, (4,), 3, 'float32')
    """
    key = name.lower().replace("-", "_")
    key = {"cifar_10": "cifar10", "cifar_100": "cifar100", "tinyimagenet": "tiny_imagenet",
           "mnist_1d": "mnist1d", "breastcancer": "breast_cancer"}.get(key, key)
    _checks.choice(key, "dataset", list_datasets())
    _checks.choice(split, "split", ("train", "test"))
    if options and key != "synthetic":
        raise ValueError(f"dataset {key!r} takes no extra options, got {sorted(options)}")
    if limit is not None:
        limit = _checks.integer(limit, "limit", low=1, what="a number of examples")
    if key == "synthetic":
        ds = _synthetic(split, seed, **options)
    elif key not in IMAGE_STATS:  # scikit-learn's sets and MNIST-1D, generated offline
        xtr, ytr, xte, yte = _offline_raw(key)  # the training split's statistics normalise both
        x, y = (xtr, ytr) if split == "train" else (xte, yte)
        x = np.array(x, dtype=np.float32, copy=True)
        if normalize and key != "mnist1d":
            axis = None if key == "digits" else 0  # digits: one pixel mean/std; features: per column
            mean, std = xtr.mean(axis=axis), xtr.std(axis=axis)
            x = ((x - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)
        ds = Dataset(x, np.asarray(y, np.int32), _NUM_CLASSES[key], key)
    else:
        x8, y = _tfds_raw(key, split, resolve_data_dir(data_dir))
        x = x8[:limit].astype(np.float32) / 255.0
        if normalize:
            mean, std = IMAGE_STATS[key]
            x -= np.asarray(mean, np.float32)
            x /= np.asarray(std, np.float32)
        ds = Dataset(x, y[:limit], _NUM_CLASSES[key], key)
    return ds if limit is None else ds.take(limit)
