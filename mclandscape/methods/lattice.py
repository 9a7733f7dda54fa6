"""Losses on a voxel lattice, and the compact integer storage of the traversal.

Implements §4.1 and §4.3 of N. Schager, "Volumetric investigation into neural network loss landscapes"
(Bachelor's thesis, Universität Kassel, 2025).

- **Losses**: an objective of the engine's protocol (:func:`mclandscape.core.objective.make_objective` of a
  network in inference mode on a full batch, or :func:`~mclandscape.core.objective.function_objective` of an
  analytic landscape) at the parameters of each voxel. :class:`LatticeLoss` evaluates batches of voxels with the engine's
  :func:`~mclandscape.engine.points.map_points`, which forms each voxel's parameters inside its mapped,
  fixed-shape chunks (and shards the voxels over devices), so a voxel's loss is the same bits in any batch.
- **Storage**: :class:`LatticeCodec` packs coordinates into int64 keys, :class:`VoxelStore` holds the visited
  voxels with their losses, :class:`KeyQueue` the queue and the future queue of Algorithm 3.

Example:
    >>> LatticeCodec(3).bits
    21
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mclandscape.core._checks import integer
from mclandscape.core.objective import call_objective
from mclandscape.core.tree import PyTree
from mclandscape.engine.distributed import num_devices
from mclandscape.engine.points import map_points
from mclandscape.methods.flats import Flat, _check_coords, _check_step

__all__ = ["LatticeLoss", "LatticeCodec", "VoxelStore", "KeyQueue"]


@dataclasses.dataclass(frozen=True)
class _VoxelLoss:
    """``fn(theta, objective, batch)``: the objective's loss at the parameters ``unravel(theta)`` (no key:
    inference). A static argument of the engine's compiled map, hashed by the parameter structure, so every
    flat, step width and anchor of one architecture shares the compiled code."""

    unravel: Callable[[jax.Array], PyTree]

    def __call__(self, theta, objective, batch):
        return call_objective(objective, self.unravel(theta), batch, None)[0]


@dataclasses.dataclass(frozen=True, eq=False)
class LatticeLoss:
    """f(θ* + s·B·a) for batches of integer voxels a: the evaluator used by
    :func:`~mclandscape.methods.traversal.grid_traversal`.

    f is an objective of the engine's protocol ``(params, batch, key) -> (loss, aux)`` evaluated without a
    key at the parameters θ(a) structured like the flat's minima: a network's
    :func:`~mclandscape.core.objective.make_objective` (inference mode; other collections such as BatchNorm
    statistics from its ``variables``) on a full ``batch`` (Iris, synthetic sets; §5.1-5.2), or an analytic
    landscape's :func:`~mclandscape.core.objective.function_objective`.

    Calls take ``coords [K, m]`` (integers) and return the losses ``[K]`` (float32, or float64 for a float64
    loss). Batches are cut into pieces of at most ``max_batch`` voxels, each padded (with the origin) to a
    power-of-two bucket that is a multiple of ``chunk`` times the device count, so only a handful of shapes
    are ever compiled; each piece is :meth:`~mclandscape.methods.flats.Flat.lattice_points` evaluated by the
    engine's :func:`~mclandscape.engine.points.map_points` (``lax.map`` over chunks of ``chunk`` voxels,
    sharded over devices). Every voxel is computed by the same fixed-shape kernel whatever the batch size, so
    its loss is bit-identical in any bucket and on any number of devices (a plain ``vmap`` over the whole
    batch is not: XLA picks shape-dependent kernels), and θ is formed chunk by chunk (``chunk × d`` floats).

    Attributes:
      flat: the :class:`~mclandscape.methods.flats.Flat`.
      step: the step width s > 0.
      objective: the objective (an ordinary argument of the compiled map: a new objective of the same
        structure compiles nothing).
      batch: the objective's batch (``None`` for a landscape that takes none).
      chunk: voxels per vectorised chunk.
      max_batch: most voxels per evaluator call.
      devices: how many devices to shard the voxels over (default all).

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from mclandscape.core.objective import function_objective
        >>> from mclandscape.methods.flats import full_space_flat
        >>> bowl = function_objective(lambda theta, batch: 1.0 + jnp.sum(theta ** 2))
        >>> ev = LatticeLoss(full_space_flat(jnp.zeros(2)), 0.5, bowl)
        >>> ev(np.array([[0, 0], [1, -2]])).tolist(), ev.bucket(3)
        ([1.0, 2.25], 16)
    """

    flat: Flat
    step: float
    objective: Callable
    batch: Any = None
    chunk: int = 16
    max_batch: int = 4096
    devices: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "step", _check_step(self.step))
        if not isinstance(self.flat, Flat):
            raise ValueError(f"flat must be a Flat, got {type(self.flat).__name__}")
        if not callable(self.objective) or any(callable(x) for x in jax.tree_util.tree_leaves(self.objective)):
            raise ValueError(f"objective must be an objective (params, batch, key) -> (loss, aux) (make_objective, or "
                             f"function_objective(fn) of a scalar fn(params, batch)); got {self.objective!r}")
        for name in ("chunk", "max_batch"):
            object.__setattr__(self, name, integer(getattr(self, name), name, low=1))
        num_devices(self.devices)

    @property
    def dim(self) -> int:
        """m, the lattice dimension."""
        return self.flat.dim

    @property
    def num_devices(self) -> int:
        """Devices the voxels are sharded over."""
        return num_devices(self.devices)

    def bucket(self, k: int) -> int:
        """Padded size used for ``k`` voxels.

        Args:
          k: the number of voxels.

        Returns:
          A power of two ≥ ``k``, rounded up to a multiple of ``chunk · ndev``.
        """
        unit = self.chunk * self.num_devices
        b = 1 << max(0, math.ceil(math.log2(max(k, 1))))
        return -(-b // unit) * unit

    def __call__(self, coords) -> np.ndarray:
        """The losses of the voxels ``coords``.

        Args:
          coords: integer lattice coordinates ``[K, m]``.

        Returns:
          ``[K]`` losses as NumPy values in the loss's dtype (float32, or float64 for a float64 loss; also for
          ``K = 0``).
        """
        a = _check_coords(coords, self.dim)
        loss = _VoxelLoss(self.flat.unravel)
        outs = []
        for lo in range(0, a.shape[0], self.max_batch):
            piece = a[lo:lo + self.max_batch]
            padded = np.pad(piece, ((0, self.bucket(len(piece)) - len(piece)), (0, 0)))  # with the origin
            points = self.flat.lattice_points(padded, self.step)
            outs.append(map_points(loss, points, self.objective, self.batch, strategy="map", chunk_size=self.chunk,
                                   devices=self.devices)[:len(piece)])
        if not outs:  # no voxels: the dtype the loss would return (traced, nothing compiled or run)
            point = jax.ShapeDtypeStruct((self.flat.ambient_dim,), jnp.promote_types(jnp.float32, self.flat.stack.dtype))
            return np.zeros(0, jax.eval_shape(loss, point, self.objective, self.batch).dtype)
        return np.concatenate(outs)


class LatticeCodec:
    """Packs integer coordinates ``[K, m]`` into non-negative int64 keys (⌊63/m⌋ bits per axis).

    Coordinates must lie in ``[-2^(b-1), 2^(b-1) - 1]`` with b = ⌊63/m⌋ (b ≥ 4, so m ≤ 15); anything outside
    raises ``ValueError`` (never wrapped or clipped).

    Args:
      dim: the lattice dimension m (1..15).

    Example:
        >>> import numpy as np
        >>> codec = LatticeCodec(2)
        >>> keys = codec.pack(np.array([[0, 0], [-3, 5]]))
        >>> codec.bits, codec.unpack(keys).tolist()
        (31, [[0, 0], [-3, 5]])
    """

    def __init__(self, dim: int):
        bits = 63 // integer(dim, "lattice dimension m", low=1)
        if bits < 4:
            raise ValueError(f"lattice dimension m={dim} is too large for packed int64 voxel keys (max 15)")
        self.dim = int(dim)
        self.bits = bits
        self.offset = 1 << (bits - 1)
        self.mask = (1 << bits) - 1
        self.shifts = np.arange(self.dim, dtype=np.int64) * bits

    def pack(self, coords) -> np.ndarray:
        """Keys of integer coordinates.

        Args:
          coords: ``[K, m]`` integers inside the packable range.

        Returns:
          ``[K]`` non-negative int64 keys.
        """
        a = _check_coords(coords, self.dim).astype(np.int64)
        if a.size and (a.min() < -self.offset or a.max() > self.offset - 1):
            raise ValueError(f"a voxel coordinate left the packable range [{-self.offset}, {self.offset - 1}] of an m="
                             f"{self.dim} lattice; bound the traversal with `limit` or `radius`, or use a larger step")
        return np.bitwise_or.reduce((a + self.offset) << self.shifts[None, :], axis=1)

    def unpack(self, keys) -> np.ndarray:
        """The inverse of :meth:`pack`.

        Args:
          keys: ``[K]`` keys.

        Returns:
          ``[K, m]`` int64 coordinates.
        """
        k = np.asarray(keys, np.int64).reshape(-1)
        return ((k[:, None] >> self.shifts[None, :]) & self.mask) - self.offset


_EMPTY = np.int64(-1)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


class VoxelStore:
    """Visited voxels and their losses: an open-addressing hash table of int64 keys with floating values.

    Vectorised over batches of keys (linear probing, multiplicative hashing, load ≤ 1/2): 12 bytes per slot
    with float32 values (16 with float64), i.e. 24-48 bytes per visited voxel, so 10^7 voxels take a few
    hundred MiB.

    Args:
      capacity: initial number of slots (rounded up to a power of two; the table grows as needed).
      dtype: the dtype of the stored losses (values are stored exactly in it).

    Example:
        >>> import numpy as np
        >>> store = VoxelStore(dtype=np.float64)
        >>> store.insert([7, 3], [0.5, 0.25])
        >>> len(store), store.contains([3, 4]).tolist(), store.get([7]).tolist()
        (2, [True, False], [0.5])
    """

    max_load = 0.5

    def __init__(self, capacity: int = 1024, dtype=np.float32):
        self.dtype = np.dtype(dtype)
        if not np.issubdtype(self.dtype, np.floating):
            raise ValueError(f"the stored losses need a floating dtype, got {self.dtype}")
        self._alloc(max(16, 1 << math.ceil(math.log2(max(capacity, 1)))))

    def _alloc(self, cap: int):
        self._keys = np.full(cap, _EMPTY, np.int64)
        self._vals = np.zeros(cap, self.dtype)
        self._size = 0
        self._mask = np.int64(cap - 1)
        self._shift = np.uint64(64 - int(math.log2(cap)))

    @property
    def capacity(self) -> int:
        return int(self._keys.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self._keys.nbytes + self._vals.nbytes)

    def __len__(self) -> int:
        return self._size

    def _probe(self, keys):
        """Slot of each key, or of the empty slot that ends its probe sequence; and whether it was found."""
        keys = np.asarray(keys, np.int64).reshape(-1)
        slots = ((keys.astype(np.uint64) * _GOLDEN) >> self._shift).astype(np.int64)  # multiplicative hashing
        pending = np.arange(keys.shape[0])
        while pending.size:
            held = self._keys[slots[pending]]
            pending = pending[(held != keys[pending]) & (held != _EMPTY)]
            slots[pending] = (slots[pending] + 1) & self._mask
        return slots, self._keys[slots] == keys

    def contains(self, keys) -> np.ndarray:
        """``[K]`` booleans: which of ``keys`` are stored."""
        return self._probe(keys)[1]

    def get(self, keys) -> np.ndarray:
        """Stored losses of ``keys`` (all must be present)."""
        slots, found = self._probe(keys)
        if not found.all():
            raise KeyError(f"{int((~found).sum())} voxel key(s) are not in the store")
        return self._vals[slots]

    def insert(self, keys, values) -> None:
        """Add new distinct keys with their values (a key already present raises ``ValueError``)."""
        keys = np.asarray(keys, np.int64).reshape(-1)
        values = np.asarray(values, self.dtype).reshape(-1)
        if keys.shape != values.shape:
            raise ValueError(f"{keys.shape[0]} keys but {values.shape[0]} values")
        if keys.size and keys.min() < 0:
            raise ValueError("voxel keys must be non-negative")
        if self.contains(keys).any():
            raise ValueError("insert() got a key that is already stored")
        if self._size + keys.size > self.max_load * self.capacity:  # grow to the smallest power of two holding all
            old_k, old_v = self.items()
            self._alloc(1 << math.ceil(math.log2((self._size + keys.size) / self.max_load)))
            self._place(old_k, old_v)
        self._place(keys, values)

    def _place(self, keys, values):
        """Store new distinct keys: each goes to the empty slot ending its probe sequence; of keys that reach the
        same slot the first is stored and the others probe on in the next round."""
        self._size += keys.shape[0]
        while keys.size:
            slots, _ = self._probe(keys)
            _, first = np.unique(slots, return_index=True)
            self._keys[slots[first]] = keys[first]
            self._vals[slots[first]] = values[first]
            rest = np.ones(keys.size, bool)
            rest[first] = False
            keys, values = keys[rest], values[rest]

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, values) of all stored voxels, in slot order."""
        used = self._keys != _EMPTY
        return self._keys[used], self._vals[used]


class KeyQueue:
    """A growable int64 queue: FIFO pops from the front, uniform random pops, appends at the back.

    Args:
      capacity: initial buffer size (it grows as needed).

    Example:
        >>> q = KeyQueue()
        >>> q.push([4, 5, 6])
        >>> q.pop_front(2).tolist(), len(q)
        ([4, 5], 1)
    """

    def __init__(self, capacity: int = 256):
        self._buf = np.empty(max(16, int(capacity)), np.int64)
        self._head = 0
        self._tail = 0

    def __len__(self) -> int:
        return self._tail - self._head

    @property
    def nbytes(self) -> int:
        return int(self._buf.nbytes)

    def push(self, keys) -> None:
        """Append ``keys`` (int64) at the back."""
        keys = np.asarray(keys, np.int64).reshape(-1)
        if self._tail + keys.size > self._buf.shape[0]:  # compact into a buffer twice the size needed
            live = self._buf[self._head:self._tail]
            self._buf = np.empty(max(16, 2 * (live.size + keys.size)), np.int64)
            self._buf[:live.size] = live
            self._head, self._tail = 0, live.size
        self._buf[self._tail:self._tail + keys.size] = keys
        self._tail += keys.size

    def pop_front(self, k: int) -> np.ndarray:
        """Remove and return the first ``k`` keys (fewer if the queue is shorter)."""
        k = min(int(k), len(self))
        out = self._buf[self._head:self._head + k].copy()
        self._head += k
        return out

    def pop_random(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """Pop ``k`` keys one after another, each uniformly from what is left (swap with the last)."""
        k = min(int(k), len(self))
        out = np.empty(k, np.int64)
        for j in range(k):
            i = self._head + int(rng.integers(self._tail - self._head))
            out[j] = self._buf[i]
            self._tail -= 1
            self._buf[i] = self._buf[self._tail]
        return out

    def to_array(self) -> np.ndarray:
        """A copy of the queued keys in order (the queue is unchanged)."""
        return self._buf[self._head:self._tail].copy()
