"""The modified BFS over a voxel lattice (Algorithm 3, §4.3.3).

Implements Algorithm 3 of N. Schager, "Volumetric investigation into neural network loss landscapes"
(Bachelor's thesis, Universität Kassel, 2025): :func:`grid_traversal` — threshold c = n·ε with ε = f(θ*)
(§4.3.2), visited set, FIFO queue, future queue, dropout, random dequeue after ``sampling_switch_iter``, step
limit. Many frontier voxels are expanded per wave and all their new neighbours are evaluated in one
vectorised (and, with several devices, sharded) call; with ``dropout = 0`` the waves reproduce the
one-at-a-time FIFO algorithm exactly (same accepted voxels, same queues, same number of evaluations, even
when the step limit cuts the run short). Losses, ε and c are held and compared in one dtype, the dtype of the
losses (float32, or float64 with ``jax_enable_x64``).

Deviations from the thesis's text (each a slip; the evident intent is implemented and tested):

- Algorithm 3 returns ``0`` when ``iterations = limit``; here the partial result is returned flagged
  ``truncated=True``, and only when work was actually left (the thesis's test also fires when the queue
  empties exactly at the limit).
- Algorithm 3's ``visited`` set also holds rejected voxels; H_c(s) counts accepted voxels only.
- Continuing with ``queue = future_queue`` (as Algorithm 3's inputs suggest) would expand voxels that were
  never checked against the new threshold; here the future queue is re-checked against the new c from the
  stored losses (no re-evaluation), and voxels still above c stay in the future queue.
- §4.3.3 defines R_c(s) = {a | f(θ* + B a s) ≤ c}, the whole sublevel set; the BFS (and H_c(s)) only
  reaches its connected component that contains the origin (a separate low basin is excluded).

Example:
    >>> neighbour_offsets(1).tolist()
    [[1], [-1]]
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from mclandscape.core._checks import integer, probability, real
from mclandscape.methods.lattice import KeyQueue, LatticeCodec, VoxelStore

__all__ = ["TraversalConfig", "TraversalState", "TraversalResult", "grid_traversal", "neighbour_offsets"]




class TraversalState:
    """The memory of Algorithm 3 between calls: visited voxels with their losses, queue and future queue.

    A voxel is *accepted* when its loss is ≤ the current threshold c; every visited voxel was evaluated once
    and its loss kept, so accepted = {visited voxels with loss ≤ c} and the future queue holds exactly the
    visited voxels above c. :func:`grid_traversal` updates the state in place; use :meth:`copy` to keep one.

    Losses, ε and every threshold are held in one dtype (``dtype``: that of the losses at the origin,
    float32 or float64), and every comparison ``f ≤ c`` is made in it, so a voxel whose loss equals c is
    accepted whether it is met fresh or re-checked from the store.

    Args:
      dim: the lattice dimension m.
      epsilon: ε = f(θ*), the loss at the origin (rounded to ``dtype``).
      dtype: the floating dtype of the losses.

    Example:
        >>> import numpy as np
        >>> st = TraversalState(2, 0.1, dtype=np.float32)
        >>> st.epsilon == float(np.float32(0.1)), bool(st.threshold_for(3.0) == np.float32(3 * st.epsilon))
        (True, True)
    """

    def __init__(self, dim: int, epsilon: float, dtype=np.float32):
        self.codec = LatticeCodec(dim)
        self.dim = self.codec.dim
        self.store = VoxelStore(dtype=dtype)
        self.dtype = self.store.dtype  # of the losses, ε and the thresholds
        self.queue = KeyQueue()
        self.future = KeyQueue()
        self.epsilon = float(self.store.dtype.type(epsilon))  # held exactly as the losses are
        self.threshold = self.store.dtype.type(-np.inf)
        self.accepted = 0

    def threshold_for(self, n: float):
        """The threshold for multiplier ``n``.

        Args:
          n: the multiplier (c = n·ε).

        Returns:
          c as a NumPy scalar of :attr:`dtype` (the float64 product rounded once).
        """
        return _threshold(n, self.epsilon, self.dtype)

    @property
    def visited(self) -> int:
        return len(self.store)

    @property
    def nbytes(self) -> int:
        """Bytes held by the NumPy buffers (hash table, queue, future queue)."""
        return self.store.nbytes + self.queue.nbytes + self.future.nbytes

    def copy(self) -> TraversalState:
        return copy.deepcopy(self)

    def _admit(self, keys: np.ndarray, losses: np.ndarray, c) -> None:
        """Queue the voxels ``keys`` whose loss is at or below ``c``; the others wait in the future queue."""
        ok = losses <= c
        self.queue.push(keys[ok])
        self.future.push(keys[~ok])
        self.accepted += int(ok.sum())

    def accepted_keys(self) -> np.ndarray:
        """Sorted keys of the accepted voxels (loss ≤ current threshold)."""
        k, v = self.store.items()
        return np.sort(k[v <= self.threshold])

    def accepted_coords(self) -> np.ndarray:
        """``[H, m]`` integer coordinates of the accepted voxels (sorted by key)."""
        return self.codec.unpack(self.accepted_keys())

    def visited_items(self) -> tuple[np.ndarray, np.ndarray]:
        """(coords ``[V, m]``, losses ``[V]``) of every visited voxel, sorted by key."""
        k, v = self.store.items()
        order = np.argsort(k)
        return self.codec.unpack(k[order]), v[order]


@dataclasses.dataclass(frozen=True)
class TraversalResult:
    """Outcome of one :func:`grid_traversal` call.

    ``H`` is H_c(s) (accepted voxels, origin included; §4.3.4); ``iterations`` the dequeued voxels;
    ``evaluations`` the losses computed in this call (a continuation only evaluates new voxels);
    ``truncated`` is True when the step limit stopped the run with voxels still queued (the thesis returns 0);
    ``dropped`` counts neighbours skipped by dropout, ``out_of_bounds`` neighbours outside ``radius``.

    Example:
        >>> import jax.numpy as jnp
        >>> from mclandscape.core.objective import function_objective
        >>> from mclandscape.methods.flats import full_space_flat
        >>> from mclandscape.methods.lattice import LatticeLoss
        >>> bowl = function_objective(lambda theta, batch: 1.0 + jnp.sum(theta ** 2))
        >>> ev = LatticeLoss(full_space_flat(jnp.zeros(1)), 1.0, bowl)
        >>> res = grid_traversal(ev, 2.0)  # c = 2: the voxels -1, 0, 1 (losses 2, 1, 2)
        >>> res.H, res.evaluations, res.future_size, res.truncated
        (3, 5, 2, False)
    """

    n: float
    threshold: float
    epsilon: float
    H: int
    iterations: int
    evaluations: int
    visited: int
    queue_size: int
    future_size: int
    truncated: bool
    dropped: int
    out_of_bounds: int
    wall_time: float
    state: TraversalState = dataclasses.field(repr=False, compare=False)

    def summary(self) -> dict:
        """Every field but the state, as a dict of plain Python values (JSON-serialisable)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "state"}


def neighbour_offsets(dim: int) -> np.ndarray:
    """The 2m lattice neighbours of Algorithm 3 in the order +e_1, −e_1, +e_2, −e_2, ...

    Args:
      dim: the lattice dimension m.

    Returns:
      ``[2m, m]`` int64 offsets.

    Example:
        >>> neighbour_offsets(2).tolist()
        [[1, 0], [-1, 0], [0, 1], [0, -1]]
    """
    eye = np.eye(dim, dtype=np.int64)
    return np.stack([eye, -eye], axis=1).reshape(2 * dim, dim)


def _numpy_rng(key) -> np.random.Generator:
    """The NumPy generator of ``key``: a Generator itself, one seeded by an int or by a JAX key's data."""
    if isinstance(key, jax.Array):
        key = np.asarray(jax.random.key_data(key)).astype(np.uint32).ravel().tolist()
    elif not isinstance(key, int | np.integer | np.random.Generator):
        raise ValueError(f"key must be an int, a NumPy Generator or a JAX PRNG key, got {key!r}")
    return np.random.default_rng(key)


def _threshold(n: float, epsilon: float, dtype):
    """c = n·ε computed in float64 and rounded once to the loss dtype (the dtype every comparison uses)."""
    return np.dtype(dtype).type(float(n) * float(epsilon))


def _as_losses(values, k: int, dtype=None) -> np.ndarray:
    """An evaluator's output as ``[k]`` losses in ``dtype`` (default: its own floating dtype, at least
    float32)."""
    vals = np.asarray(values).reshape(-1)
    if vals.dtype.kind not in "fiu" or vals.shape[0] != k:
        raise ValueError(f"evaluate returned {vals.shape[0]} losses for {k} voxel(s) (dtype {vals.dtype}); it must "
                         "return one real loss per voxel")
    if dtype is None:
        dtype = np.result_type(vals.dtype, np.float32) if vals.dtype.kind == "f" else np.float32
    return vals.astype(dtype, copy=False)


def grid_traversal(
    evaluate: Callable[[np.ndarray], np.ndarray],
    n: float,
    *,
    state: TraversalState | None = None,
    dim: int | None = None,
    config: TraversalConfig | None = None,
    key: Any = 0,
) -> TraversalResult:
    """Algorithm 3 of the thesis (modified BFS for grid traversal, §4.3.3), batched.

    Without ``state`` the run starts at the origin: ε = f(θ*) (must be positive), visited = queue = {0}.
    With the ``state`` of an earlier run at a smaller threshold it continues: the future queue is re-checked
    against the new c = n·ε from the stored losses (nothing is re-evaluated), the voxels now below c join
    the queue, and the traversal goes on (thresholds may not decrease). Losses, ε and c are compared in one
    dtype, the dtype of the losses at the origin (float32, or float64 for a float64 loss); c = n·ε is
    rounded once to it, and a voxel with f = c exactly is accepted.

    Each iteration dequeues a voxel (FIFO; uniformly at random once the iteration index exceeds
    ``sampling_switch_iter``), and each neighbour a ± e_i not yet visited is — unless skipped with
    probability ``dropout`` (only after the switch) — evaluated, marked visited, and appended to the queue if
    f ≤ c, else to the future queue. ``limit`` bounds the iterations of this call (options of
    :class:`TraversalConfig`).

    Batching: up to ``batch_size`` voxels are dequeued per wave and the new neighbours of the whole wave are
    evaluated together, in the order the one-at-a-time algorithm would meet them. In FIFO order the voxels of
    a wave are all dequeued before any neighbour they add, so the result is exactly that of
    ``batch_size=1`` (the literal algorithm) when ``dropout = 0``. Waves never straddle the switch. After
    the switch a wave pops ``batch_size`` random voxels at once, and with ``dropout > 0`` each distinct new
    neighbour of a wave gets one skip draw.

    Args:
      evaluate: ``evaluate(coords [K, m] integers) -> losses [K]``, usually a :class:`LatticeLoss`.
      n: the threshold multiplier (c = n·ε, n ≥ 1).
      state: the :class:`TraversalState` of an earlier call to continue (updated in place).
      dim: the lattice dimension m, when ``evaluate`` has no ``dim`` attribute.
      config: a :class:`TraversalConfig` (dropout, limit, switch, wave size, radius; default its defaults).
      key: int, NumPy Generator or JAX key seeding the dropout and random dequeues.

    Returns:
      A :class:`TraversalResult` (its ``state`` continues the traversal).

    Example:
        >>> import jax.numpy as jnp
        >>> from mclandscape.core.objective import function_objective
        >>> from mclandscape.methods.flats import full_space_flat
        >>> from mclandscape.methods.lattice import LatticeLoss
        >>> bowl = function_objective(lambda theta, batch: 1.0 + jnp.sum(theta ** 2))
        >>> ev = LatticeLoss(full_space_flat(jnp.zeros(2)), 0.5, bowl)
        >>> first = grid_traversal(ev, 1.3)  # the disc |a|² ≤ 1.2: the origin and its 4 neighbours
        >>> more = grid_traversal(ev, 2.0, state=first.state)  # |a|² ≤ 4; only new voxels are evaluated
        >>> first.H, first.evaluations, more.H, more.evaluations
        (5, 13, 13, 12)

    Raises:
      ValueError: bad arguments, a non-positive or non-finite ε, a decreasing threshold, a state of another
        lattice dimension, or an evaluator returning the wrong number of losses.
    """
    n = real(n, "threshold multiplier n", low=1, what="c = n·ε ≥ ε")
    config = TraversalConfig() if config is None else config
    if not isinstance(config, TraversalConfig):
        raise ValueError(f"config must be a TraversalConfig, got {type(config).__name__}")
    limit, switch = config.limit, config.sampling_switch_iter
    rng = _numpy_rng(key)
    t_start = time.perf_counter()
    before = 0 if state is None else state.visited  # every visited voxel was evaluated once
    if state is None:
        state = _start_at_origin(evaluate, dim)
    elif {getattr(evaluate, "dim", state.dim), state.dim if dim is None else dim} != {state.dim}:
        raise ValueError(f"state is an m={state.dim} lattice but the evaluator is m={getattr(evaluate, 'dim', dim)}")
    c = state.threshold_for(n)
    if c < state.threshold:
        raise ValueError(f"thresholds must not decrease when continuing: c = {float(c):g} < previous "
                         f"{float(state.threshold):g}")
    # re-check the future queue against the new c from the stored losses (nothing is evaluated again)
    future = state.future.pop_front(len(state.future))
    state._admit(future, state.store.get(future), c)
    state.threshold = c
    it = dropped = oob = 0
    while len(state.queue) and it < (limit or math.inf):
        random_phase = switch is not None and it > switch
        # a wave stops at the step limit and never straddles the switch
        k = min(config.batch_size, len(state.queue), (limit or math.inf) - it,
                math.inf if switch is None or random_phase else switch + 1 - it)
        keys = state.queue.pop_random(k, rng) if random_phase else state.queue.pop_front(k)
        nk, nb, out = _new_neighbours(state, keys, config.radius)
        oob += out
        if random_phase and config.dropout > 0 and nk.size:
            skip = rng.random(nk.size) < config.dropout
            dropped += int(skip.sum())
            nk, nb = nk[~skip], nb[~skip]
        if nk.size:
            losses = _as_losses(evaluate(nb), nk.shape[0], state.dtype)
            state.store.insert(nk, losses)
            state._admit(nk, losses, c)
        it += k
    return TraversalResult(
        n=n, threshold=float(c), epsilon=state.epsilon, H=state.accepted, iterations=it,
        evaluations=state.visited - before, visited=state.visited, queue_size=len(state.queue),
        future_size=len(state.future), truncated=len(state.queue) > 0, dropped=dropped, out_of_bounds=oob,
        wall_time=time.perf_counter() - t_start, state=state,
    )


@dataclasses.dataclass(frozen=True)
class TraversalConfig:
    """The options of Algorithm 3 (§4.3.3) for :func:`grid_traversal` and
    :func:`~mclandscape.methods.volume.h_sweep`.

    Attributes:
      dropout: probability of skipping a new neighbour (after the switch only), in [0, 1].
      limit: most iterations (dequeued voxels) of one call (``None``: until the queue empties).
      sampling_switch_iter: iteration index after which voxels are dequeued at random (``None``: FIFO only).
      batch_size: most voxels dequeued per wave (the result does not depend on it without dropout).
      radius: restricts the lattice to max_i |a_i| ≤ radius; neighbours outside are counted in
        ``out_of_bounds``.

    Example:
        >>> TraversalConfig(limit=100).batch_size
        1024
    """

    dropout: float = 0.0
    limit: int | None = None
    sampling_switch_iter: int | None = None
    batch_size: int = 1024
    radius: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "dropout", probability(self.dropout, "dropout"))
        object.__setattr__(self, "batch_size", integer(self.batch_size, "batch_size", low=1))
        for name, low in (("limit", 1), ("sampling_switch_iter", 0), ("radius", 1)):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, integer(getattr(self, name), name, low=low))


def _start_at_origin(evaluate, dim: int | None) -> TraversalState:
    """A fresh state: ε = f(θ*) evaluated (it must be positive), the origin visited and in the future queue,
    from which the first threshold c = n·ε ≥ ε moves it to the queue."""
    m = dim if dim is not None else getattr(evaluate, "dim", None)
    if m is None:
        raise ValueError("pass dim= (the lattice dimension m) when evaluate has no .dim")
    origin = np.zeros((1, int(m)), np.int64)
    eps = _as_losses(evaluate(origin), 1)
    if not (math.isfinite(eps[0]) and eps[0] > 0):
        raise ValueError(f"the loss at the anchor ε = f(θ*) = {float(eps[0])!r} must be positive and finite for "
                         f"the threshold c = n·ε (§4.3.2)")
    state = TraversalState(int(m), eps[0], dtype=eps.dtype)
    state.store.insert(state.codec.pack(origin), eps)
    state.future.push(state.codec.pack(origin))
    return state


def _new_neighbours(state: TraversalState, keys: np.ndarray, radius: int | None):
    """The distinct unvisited neighbours ``(keys, coords)`` of a wave, in the order the one-at-a-time algorithm
    meets them, and how many neighbours fell outside ``radius``."""
    nb = (state.codec.unpack(keys)[:, None, :] + neighbour_offsets(state.dim)[None, :, :]).reshape(-1, state.dim)
    inside = np.ones(len(nb), bool) if radius is None else np.all(np.abs(nb) <= radius, axis=1)
    nb = nb[inside]
    nk = state.codec.pack(nb)
    _, first = np.unique(nk, return_index=True)  # each key where the wave first meets it
    first = np.sort(first[~state.store.contains(nk[first])])
    return nk[first], nb[first], int((~inside).sum())
