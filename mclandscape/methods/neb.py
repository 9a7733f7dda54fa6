"""Nudged Elastic Band and AutoNEB between two points of parameter space.

Implements the NEB and AutoNEB of Draxler, Veschgini, Salmhofer and Hamprecht, 2018 ("Essentially no
barriers in neural network energy landscape", ICML). The curves of Garipov et al., 2018 ("Loss surfaces,
mode connectivity, and fast ensembling of DNNs") are in :mod:`mclandscape.methods.curves`.

A band is ``N`` pivots ``w_0 .. w_{N-1}`` stacked on a leading axis (every leaf ``[N, ...]``); the end pivots
``w_0 = start`` and ``w_{N-1} = end`` stay fixed, and the band *is* a polygonal chain through the pivots:
:func:`band_connector` wraps the pivots as a ``"polychain"`` :class:`~mclandscape.core.connectors.Connector`
(pivot ``i`` at ``t = i/(N-1)``), so the dense interpolation between pivots is evaluated with
:func:`mclandscape.engine.evaluate.evaluate_points` like any other curve.

Forces on an inner pivot ``i`` (Draxler et al. 2018, the NEB force decomposition):

- loss force, perpendicular part: ``F_L^perp_i = -grad L(w_i) + (grad L(w_i) . tau_i) tau_i``, so
  ``F_L^perp_i . tau_i = 0``;
- spring force, parallel part: ``F_E^par_i = k (|w_{i+1} - w_i| - |w_i - w_{i-1}|) tau_i``, the projection
  of the elastic potential ``V_E = (k/2) sum |w_{i+1} - w_i|^2`` that equalises the spacing (in 1-D:
  ``w_k <- w_k - eta k [(w_k - w_{k-1}) - (w_{k+1} - w_k)]``);
- update ``w_i <- w_i + eta (F_L^perp_i + F_E^par_i)`` until both forces vanish; here the
  negated total force is handed to an optax optimizer as the gradient, so plain SGD is exactly that rule
  and momentum is the usual accelerated variant (Draxler et al. use SGD with momentum).

The tangent ``tau_i`` is the improved estimate of Henkelman & Jonsson (2000, J. Chem. Phys. 113, 9978):
the segment towards the higher-loss neighbour (``tau+ = w_{i+1} - w_i`` when ``L_{i+1} > L_i > L_{i-1}``,
``tau- = w_i - w_{i-1}`` when ``L_{i+1} < L_i < L_{i-1}``) and, at a loss extremum, the blend
``tau+ dV_max + tau- dV_min`` (if ``L_{i+1} > L_{i-1}``, else the weights swap) with ``dV_max/min`` the
larger/smaller of ``|L_{i+1} - L_i|``, ``|L_{i-1} - L_i|``; normalised. Where the loss is flat on both
sides (``dV_max = 0``) the bisector of the two unit segment vectors is used.

Climbing image (Henkelman, Uberuaga & Jonsson 2000), optional: the highest inner pivot gets no spring and
the reversed parallel loss force, ``F = -grad L + 2 (grad L . tau) tau``, so it climbs to the saddle along
the band while relaxing perpendicular to it. It switches on after ``climb_after`` steps of a run: every
batch carries a climbing flag (:class:`NEBBatch`), so the step compiles once for both phases.

**On the engine.** The band is an objective of the stacked pivots (:class:`BandObjective`,
``objective(pivots, batch, key) -> (loss, aux)``): its value is the total of the pivot losses and its
gradient, defined with ``jax.custom_vjp``, is the negated NEB force on the inner pivots and zero on the
ends, so each pivot costs one forward and one backward pass and the relaxation is one
:func:`mclandscape.engine.loop.make_step` (any Optax transform, the ends frozen bit for bit by the step's
trainable mask, the non-finite guard) driven by :func:`mclandscape.engine.loop.run`. Batches are
``t -> batch`` for the global step ``t`` (AutoNEB's cycles continue one step count, so mini-batch NEB
walks through the data epoch after epoch); the key of step ``t`` of a run starting at global step ``s`` is
``fold_in(fold_in(key(seed), s), t)`` and drives dropout of an :class:`~mclandscape.core.objective.Objective`
(every pivot of a step sees the same batch and the same key).

Stopping: NEB stops when both ``F_L^perp`` and ``F_E^par`` vanish. One loop epoch is ``check_every``
steps; the objective reports ``max_perp_force`` / ``max_par_force`` (largest norm over the inner pivots),
so the epoch record holds their maximum over the epoch's steps, and a callback stops the run (``StopRun``)
once both are below ``tol`` over a whole epoch in which the climbing image (if any) was on throughout. This
is stricter than checking the last step of the window only, as earlier versions did. A run of ``steps``
not divisible by ``check_every`` ends with one shorter epoch (a second call of ``run`` on the same state).
``NEBResult.losses`` are the pivot losses of the returned band on the last step's batch and key (earlier
versions reported those before the last update).

Pivot strategies (``NEBConfig.strategy``), all inside the one compiled step except ``"loop"``: ``"vmap"``
(``jax.vmap`` over pivots), ``"map"`` (``jax.lax.map``: one pivot's activations in memory at a time),
``"unroll"`` (the pivots written out one after another in the step, as
:mod:`mclandscape.engine.connector_train` does on CPU) and ``"loop"``, the one-pivot-at-a-time baseline
(Draxler et al.'s ``torch_autoneb`` evaluates pivots one after another): a Python loop calling one
compiled value-and-gradient per pivot, then the same engine step on the precomputed losses and gradients
(:class:`LoopedNEBStep`). ``benchmarks/neb_step.py`` on the 2-core CPU (shared and loaded: load average
7-9, so only the ratios within one run mean much), digits-sized inputs, batch 64, milliseconds per step:

=====================================  ======  =====  =====  ======
model, pivots                          loop    map    vmap   unroll
=====================================  ======  =====  =====  ======
64-32-10 MLP, 8                        64.0    4.3    3.2    4.8
64-32-10 MLP, 12                       --      --     4.0    6.6
small CNN (8-16-16), 8                 132.6   62.1   40.5   26.2
zoo ``simple_cnn`` (32-64-128), 8      --      --     320    132
zoo ``simple_cnn`` (32-64-128), 12     --      --     432    391
=====================================  ======  =====  =====  ======

(the pre-engine implementation, timed interleaved in the same run: MLP loop 57.3, map 4.1, vmap 5.4; small
CNN loop 118.9, map 56.2, vmap 32.8: the engine step costs the same). As for curve training, XLA's CPU
convolutions run the differentiated per-pivot kernels of ``vmap`` slowly, so ``"auto"`` means ``"unroll"``
on CPU for pivots holding a convolution kernel (a ``kernel`` leaf of rank >= 3) and ``"vmap"`` otherwise and
on every other backend. Gradients are mini-batch gradients when ``data`` is a callable ``step -> batch``.
Per step, :func:`mclandscape.engine.loop.run` adds its bookkeeping (the step key, the epoch sums) to the
step itself: for the tiny Müller-Brown bands that is most of the time.

AutoNEB (Draxler et al. 2018; their ``torch_autoneb``): cycles of NEB runs; before each cycle pivots are
inserted, evenly (``"equal"``: ``count`` new pivots in every gap) or where the loss between neighbours rises
most above the linear interpolation of their losses (``"highest"``: on ``sub_pivots`` points per gap the
score ``L(alpha) - ((1 - alpha) L_a + alpha L_b)``, normalised by the range of the pivot losses; the
``count`` gaps with the largest score above ``threshold`` each get one pivot at their arg-max). As in
Draxler's fill, the band keeps *target spacing* weights ``omega_j`` (relative segment lengths, mean 1): an
inserted pivot splits its gap's weight by ``alpha``, and the spring generalises to
``k (|w_{i+1} - w_i| / omega_i - |w_i - w_{i-1}| / omega_{i-1}) tau_i``, which is the plain spring for
equal weights; so a pivot inserted near a barrier stays there instead of being pushed back to equal
spacing. The dense profile that places new pivots runs through the one evaluator
(:func:`mclandscape.engine.evaluate.map_points`), so at most a chunk of parameter copies exists.

Precision: the band computes in its pivots' dtype. With ``jax_enable_x64`` and float64 end points the pivots,
the pivot losses and gradients (of a loss that computes in its parameters' dtype), tangents, forces, the
spacing weights, the spring constant, the weights of inserted pivots and the dense profile are all float64;
float32 pivots keep everything in float32, as without x64.

Losses: a plain ``loss(params, batch) -> scalar`` (an analytic potential; wrapped with
:func:`mclandscape.core.objective.function_objective`), an
:class:`~mclandscape.core.objective.Objective` (:func:`model_loss`, :func:`~mclandscape.core.objective.make_objective`;
called with the step's key) or a :class:`~mclandscape.engine.models.Model` (its :func:`model_loss`).

Example:
    >>> import jax.numpy as jnp
    >>> cfg = NEBConfig(steps=200, spring_constant=1.0, learning_rate=0.1, tol=1e-4)
    >>> res = neb(lambda p, batch: jnp.sum(p ** 2) * 0.0, jnp.array([0.0]), jnp.array([1.0]), num_pivots=3,
    ...           init=jnp.array([[0.0], [0.2], [1.0]]), config=cfg)
    >>> round(float(res.pivots[1, 0]), 3), res.converged
    (0.5, True)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mclandscape.core.connectors import Connector, from_control, polychain
from mclandscape.core.losses import cross_entropy
from mclandscape.core.objective import Objective, function_objective, make_objective
from mclandscape.core.tree import (
    PyTree,
    check_finite,
    check_same_structure,
    tree_combine,
    tree_distance,
    tree_index,
    tree_row_dot,
    tree_row_scale,
    tree_stack,
)
from mclandscape.engine import cpu
from mclandscape.engine.batches import batch_stream
from mclandscape.engine.distributed import training_mesh
from mclandscape.engine.loop import LoopConfig, NonFiniteError, StopRun, run
from mclandscape.engine.points import connector_points, map_points, stacked_points
from mclandscape.engine.step import Step, TrainState, make_step

__all__ = [
    "NEBConfig",
    "NEBForces",
    "NEBResult",
    "AutoNEBResult",
    "NEBBatch",
    "BandObjective",
    "LoopedNEBStep",
    "make_neb_step",
    "pivot_objective",
    "STRATEGIES",
    "segment_lengths",
    "improved_tangents",
    "neb_forces",
    "neb",
    "auto_neb",
    "band_connector",
    "straight_band",
    "dense_ts",
    "insertion_alphas",
    "insert_pivots",
    "band_profile",
    "model_loss",
    "model_batches",
    "model_profile",
    "evaluate_band",
]

STRATEGIES = ("auto", "map", "vmap", "unroll", "loop")


@functools.lru_cache(maxsize=64)
def _sgd(learning_rate: float, momentum: float) -> optax.GradientTransformation:
    """``optax.sgd``; the same arguments give the same transform object, so a second run compiles nothing."""
    return optax.sgd(learning_rate, momentum=momentum or None)


@dataclasses.dataclass(frozen=True)
class NEBConfig:
    """Hyper-parameters of one NEB run.

    Args:
      steps: optimizer steps (>= 0).
      spring_constant: the spring's ``k`` (>= 0, finite).
      learning_rate, momentum: of the default optimizer ``optax.sgd(learning_rate, momentum)``.
      optimizer: any Optax transform instead (reuse one object to reuse the compiled step).
      tol: the run stops once the largest perpendicular and parallel force norms stay below ``tol`` for
        ``check_every`` steps (see the module docstring).
      climbing, climb_after: the climbing image, switched on after ``climb_after`` steps of the run.
      check_every: steps per loop epoch (one history record and one stopping check each).
      strategy: how the pivots' losses and gradients are computed (``STRATEGIES``; module docstring).

    Example:
        >>> cfg = NEBConfig(steps=100, spring_constant=0.5, climbing=True, climb_after=50)
        >>> cfg.check_every, cfg.make_optimizer() is NEBConfig(steps=5).make_optimizer()  # one cached SGD
        (10, True)
    """

    steps: int = 1000
    spring_constant: float = 1.0
    learning_rate: float = 0.01
    momentum: float = 0.9
    optimizer: optax.GradientTransformation | None = None
    tol: float = 1e-3
    climbing: bool = False
    climb_after: int = 0
    check_every: int = 10
    strategy: str = "auto"

    def __post_init__(self):
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {self.steps!r}")
        k = float(self.spring_constant)
        if not math.isfinite(k) or k < 0:
            raise ValueError(f"spring_constant must be finite and >= 0, got {self.spring_constant!r}")
        if self.optimizer is None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum!r}")
        if not self.tol >= 0:
            raise ValueError(f"tol must be >= 0, got {self.tol!r}")
        if self.climb_after < 0:
            raise ValueError(f"climb_after must be >= 0, got {self.climb_after!r}")
        if int(self.check_every) != self.check_every or self.check_every < 1:
            raise ValueError(f"check_every must be an integer >= 1, got {self.check_every!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; expected one of {STRATEGIES}")
        if self.optimizer is not None and not isinstance(self.optimizer, optax.GradientTransformation):
            raise ValueError(f"optimizer must be an optax GradientTransformation, got {type(self.optimizer).__name__}")

    def make_optimizer(self) -> optax.GradientTransformation:
        """The run's Optax transform.

        Returns:
          ``optimizer``, or the (cached) ``optax.sgd(learning_rate, momentum)``.
        """
        if self.optimizer is not None:
            return self.optimizer
        return _sgd(float(self.learning_rate), float(self.momentum))


class NEBForces(NamedTuple):
    """Forces on the inner pivots (stacked trees ``[N-2, ...]``) and their norms ``[N-2]``, from
    :func:`neb_forces` (whose example shows them)."""

    total: PyTree          # F_L^perp + F_E^par (climbing image: -grad + 2 (grad . tau) tau)
    perpendicular: PyTree  # F_L^perp = -grad + (grad . tau) tau
    parallel: PyTree       # F_E^par = k (|d_next| - |d_prev|) tau (climbing image: (grad . tau) tau)
    tangent: PyTree        # unit tangents tau
    perp_norm: jax.Array   # |F_L^perp|
    par_norm: jax.Array    # |F^par|


@dataclasses.dataclass(frozen=True)
class NEBResult:
    """Outcome of :func:`neb`: the band as a polychain connector and the run's record.

    ``losses`` are the pivot losses of the returned band on the last step's batch (NaN after 0 steps);
    ``steps`` the steps taken; ``converged`` whether the stopping rule ended the run; ``perp_force`` /
    ``par_force`` the largest force norms over inner pivots and over the last record's steps; ``history``
    one record per loop epoch of ``check_every`` steps: ``epoch`` (from 1, as in every trainer; a shorter
    last epoch is numbered on), ``step`` (global, counted across AutoNEB cycles), ``max_loss``
    (highest pivot loss seen in those steps), ``mean_loss`` (mean pivot loss, averaged over them),
    ``perp_force``, ``par_force`` (their maxima), ``force_norm`` (mean norm of the total NEB force on the
    band) and ``seconds``. ``spacing`` are the target segment weights ``[N-1]`` (mean 1) the run used.
    :func:`neb`'s example shows one.
    """

    band: Connector
    losses: np.ndarray
    steps: int
    converged: bool
    perp_force: float
    par_force: float
    spacing: np.ndarray
    history: list[dict]

    @property
    def pivots(self) -> PyTree:
        """The stacked pivots ``[N, ...]``."""
        return self.band.control

    @property
    def num_pivots(self) -> int:
        """N."""
        return self.band.num_control


@dataclasses.dataclass(frozen=True)
class AutoNEBResult:
    """Outcome of :func:`auto_neb`: final band, per-cycle records and the final dense profile.

    ``band`` is the final polychain, ``spacing`` its target segment weights, ``cycles`` one record per cycle
    (see :func:`auto_neb`), ``dense_t`` / ``dense_loss`` the final band's profile on :func:`dense_ts`
    (float64). :func:`auto_neb`'s example shows one.
    """

    band: Connector
    spacing: np.ndarray
    cycles: list[dict]
    dense_t: np.ndarray
    dense_loss: np.ndarray

    @property
    def pivots(self) -> PyTree:
        """The stacked pivots ``[N, ...]``."""
        return self.band.control

    @property
    def num_pivots(self) -> int:
        """N."""
        return self.band.num_control


# ---- geometry of a band ------------------------------------------------------------------------------

def _rows(tree: PyTree, sl: slice) -> PyTree:
    return jax.tree_util.tree_map(lambda x: x[sl], tree)


def _diffs(pivots: PyTree) -> PyTree:
    """Segment vectors ``w_{j+1} - w_j``, stacked ``[N-1, ...]``."""
    return jax.tree_util.tree_map(lambda x: x[1:] - x[:-1], pivots)


def segment_lengths(pivots: PyTree) -> jax.Array:
    """The lengths of a band's segments.

    Args:
      pivots: stacked pivots ``[N, ...]``.

    Returns:
      ``|w_{j+1} - w_j|`` for j = 0..N-2, shape ``[N-1]`` (in the pivots' dtype, float32 at least).

    Example:
        >>> import jax.numpy as jnp
        >>> segment_lengths(jnp.array([[0.0, 0.0], [3.0, 4.0], [3.0, 5.0]])).tolist()
        [5.0, 1.0]
    """
    d = _diffs(pivots)
    return jnp.sqrt(tree_row_dot(d, d))


def _normalise_rows(tree: PyTree, eps: float = 1e-30) -> PyTree:
    n = jnp.sqrt(tree_row_dot(tree, tree))
    return tree_row_scale(tree, 1.0 / jnp.maximum(n, eps))


def improved_tangents(pivots: PyTree, energies) -> PyTree:
    """Unit tangents ``tau_i`` of the inner pivots i = 1..N-2 (stacked ``[N-2, ...]``).

    Henkelman & Jonsson's improved tangent (see the module docstring). Jittable.

    Args:
      pivots: stacked pivots ``[N, ...]``.
      energies: the N pivot losses.

    Returns:
      The unit tangents as a stacked tree ``[N-2, ...]``.

    Example:
        >>> import jax.numpy as jnp
        >>> piv = jnp.array([[0.0, 0.0], [1.0, 0.0], [1.0, 2.0]])
        >>> improved_tangents(piv, jnp.array([0.0, 1.0, 2.0])).tolist()  # rising: towards the next pivot
        [[0.0, 1.0]]
    """
    e = jnp.asarray(energies)
    d = _diffs(pivots)
    dn = _rows(d, slice(1, None))   # tau+ = w_{i+1} - w_i
    dp = _rows(d, slice(None, -1))  # tau- = w_i - w_{i-1}
    lengths = jnp.sqrt(tree_row_dot(d, d))
    ln, lp = lengths[1:], lengths[:-1]
    de_next = e[2:] - e[1:-1]
    de_prev = e[1:-1] - e[:-2]
    up = (de_next > 0) & (de_prev > 0)
    down = (de_next < 0) & (de_prev < 0)
    vmax = jnp.maximum(jnp.abs(de_next), jnp.abs(de_prev))
    vmin = jnp.minimum(jnp.abs(de_next), jnp.abs(de_prev))
    higher_next = e[2:] > e[:-2]
    a_ext = jnp.where(higher_next, vmax, vmin)
    b_ext = jnp.where(higher_next, vmin, vmax)
    flat = vmax <= 0
    tiny = jnp.finfo(jnp.result_type(ln)).tiny
    a_flat = 1.0 / jnp.maximum(ln, tiny)
    b_flat = 1.0 / jnp.maximum(lp, tiny)
    a = jnp.where(up, 1.0, jnp.where(down, 0.0, jnp.where(flat, a_flat, a_ext)))
    b = jnp.where(up, 0.0, jnp.where(down, 1.0, jnp.where(flat, b_flat, b_ext)))
    tau = jax.tree_util.tree_map(jnp.add, tree_row_scale(dn, a), tree_row_scale(dp, b))
    return _normalise_rows(tau)


def _band_dtype(pivots: PyTree):
    """The floating dtype the band computes in: its pivots' (float32 at least; float64 pivots, which exist
    only with ``jax_enable_x64``, keep spacing weights, spring constant and insertion weights in float64)."""
    leaves = jax.tree_util.tree_leaves(pivots)
    return jnp.promote_types(jnp.float32, jnp.result_type(*[jnp.dtype(a.dtype) for a in leaves]))


def _normalised_spacing(spacing, n_segments: int, dtype=jnp.float32):
    """Target segment weights ``[n_segments]`` with mean 1, in ``dtype`` (the band's)."""
    if spacing is None:
        return jnp.ones((n_segments,), dtype)
    w = jnp.asarray(spacing, dtype)
    return w * (n_segments / jnp.sum(w))


def neb_forces(pivots: PyTree, energies, grads: PyTree, spring_constant: float, *, spacing=None,
               climbing_index=-1) -> NEBForces:
    """NEB forces on the inner pivots from the N pivot losses and the inner pivots' loss gradients.

    Jittable; computed in the pivots' dtype (float64 under ``jax_enable_x64`` for float64 pivots, spacing
    weights included).

    Args:
      pivots: stacked pivots ``[N, ...]``.
      energies: the N pivot losses.
      grads: the loss gradients of the inner pivots 1..N-2, stacked ``[N-2, ...]``.
      spring_constant: the spring's ``k``.
      spacing: optional target segment weights ``[N-1]`` (default equal: the plain spring).
      climbing_index: the pivot index (1..N-2) of the climbing image, or -1 for none.

    Returns:
      :class:`NEBForces`.

    Example:
        >>> import jax.numpy as jnp
        >>> piv = jnp.array([[0.0, 0.0], [0.4, 1.0], [1.0, 0.0]])
        >>> f = neb_forces(piv, jnp.array([0.0, 1.0, 0.0]), jnp.array([[0.0, 2.0]]), 1.0)
        >>> f.tangent.tolist(), f.perpendicular.tolist()  # a loss maximum: the blend of both segments
        ([[1.0, 0.0]], [[0.0, -2.0]])
        >>> round(float(f.par_norm[0]), 4)  # k (|w_2 - w_1| - |w_1 - w_0|)
        0.0892
    """
    tau = improved_tangents(pivots, energies)
    gt = tree_row_dot(grads, tau)
    along = tree_row_scale(tau, gt)
    perp = jax.tree_util.tree_map(lambda g, a: a - g, grads, along)  # -grad + (grad . tau) tau
    lengths = segment_lengths(pivots)
    w = _normalised_spacing(spacing, lengths.shape[0], lengths.dtype)
    rel = lengths / w
    spring = spring_constant * (rel[1:] - rel[:-1])
    idx = jnp.arange(1, lengths.shape[0])
    par = jnp.where(idx == climbing_index, gt, spring)
    parallel = tree_row_scale(tau, par)
    total = jax.tree_util.tree_map(jnp.add, perp, parallel)
    perp_norm = jnp.sqrt(tree_row_dot(perp, perp))
    return NEBForces(total=total, perpendicular=perp, parallel=parallel, tangent=tau, perp_norm=perp_norm,
                     par_norm=jnp.abs(par))


# ---- bands as connectors -----------------------------------------------------------------------------

def band_connector(pivots: PyTree) -> Connector:
    """The polygonal chain through stacked pivots.

    Args:
      pivots: stacked pivots ``[N, ...]`` (N >= 3).

    Returns:
      A ``"polychain"`` :class:`~mclandscape.core.connectors.Connector`: pivot i at t = i/(N-1), ends fixed.

    Example:
        >>> import jax.numpy as jnp
        >>> band_connector(jnp.array([0.0, 1.0, 4.0])).points([0.25, 0.75]).tolist()
        [0.5, 2.5]
    """
    leaves = jax.tree_util.tree_leaves(pivots)
    if not leaves:
        raise ValueError("pivots hold no arrays")
    n = int(np.shape(leaves[0])[0])
    if n < 3:
        raise ValueError(f"a band needs N >= 3 pivots (two fixed ends and at least one free pivot), got N={n}")
    return from_control(pivots, "polychain", (n,), [True] + [False] * (n - 2) + [True])


def _check_ends(start: PyTree, end: PyTree) -> None:
    check_same_structure(start, end, names=("start", "end"))
    check_finite(start, "start")
    check_finite(end, "end")
    if float(tree_distance(start, end)) == 0.0:
        raise ValueError("start and end are identical points: a band between them has no direction")


def straight_band(start: PyTree, end: PyTree, num_pivots: int) -> PyTree:
    """Pivots evenly on the straight segment from ``start`` to ``end``.

    Args:
      start, end: the end points (same structure, finite, distinct).
      num_pivots: N >= 3.

    Returns:
      Stacked pivots ``[N, ...]`` whose ends are exactly ``start`` and ``end``.

    Example:
        >>> import jax.numpy as jnp
        >>> straight_band(jnp.array([0.0]), jnp.array([1.0]), 5)[:, 0].tolist()
        [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    if int(num_pivots) != num_pivots or num_pivots < 3:
        raise ValueError(f"num_pivots must be an integer N >= 3 (two fixed ends and at least one free pivot), "
                         f"got {num_pivots!r}")
    _check_ends(start, end)
    return polychain(start, end, num_bends=int(num_pivots) - 2).control


def dense_ts(num_pivots: int, sub_pivots: int = 9) -> np.ndarray:
    """Path parameters of the pivots and ``sub_pivots`` evenly spaced points in every gap (increasing).

    Args:
      num_pivots: N >= 2.
      sub_pivots: points strictly inside every gap (Draxler's dense evaluation uses 9).

    Returns:
      ``(N-1)(sub_pivots+1) + 1`` float64 values; pivot i sits at ``t = i/(N-1)``.

    Example:
        >>> dense_ts(3, 1).tolist()
        [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    if num_pivots < 2:
        raise ValueError(f"num_pivots must be >= 2, got {num_pivots}")
    if sub_pivots < 0:
        raise ValueError(f"sub_pivots must be >= 0, got {sub_pivots}")
    g = num_pivots - 1
    alphas = np.linspace(0.0, 1.0, sub_pivots + 2)[:-1]
    t = (np.arange(g)[:, None] + alphas[None, :]).reshape(-1) / g
    return np.concatenate([t, [1.0]])


def insertion_alphas(dense_loss, num_pivots: int, sub_pivots: int, *, count: int, method: str = "highest",
                     threshold: float = 0.1) -> list[list[float]]:
    """Where to insert pivots: for every gap a (possibly empty) list of positions ``alpha`` in (0, 1).

    ``"equal"``: ``count`` evenly spaced positions in every gap. ``"highest"``: from the dense losses on
    :func:`dense_ts` (``num_pivots``, ``sub_pivots``), the score ``L(alpha) - ((1 - alpha) L_a + alpha L_b)``
    divided by the range of the pivot losses; the ``count`` gaps with the largest maximal score above
    ``threshold`` each get one pivot at its arg-max (Draxler's AutoNEB "highest" fill).

    Args:
      dense_loss: the losses on :func:`dense_ts` (``None`` for ``"equal"``).
      num_pivots: N.
      sub_pivots: the points per gap in ``dense_loss``.
      count: pivots per gap (``"equal"``) or gaps to fill (``"highest"``).
      method: ``"equal"`` or ``"highest"``.
      threshold: the least normalised score that gets a pivot (``"highest"``).

    Returns:
      ``N-1`` lists of positions, one per gap.

    Example:
        >>> insertion_alphas(None, 3, 1, count=1, method="equal")
        [[0.5], [0.5]]
        >>> insertion_alphas([0.0, 5.0, 0.0, 0.0, 1.0], 3, 1, count=1)  # a bump inside the first gap
        [[0.5], []]
    """
    if count < 0:
        raise ValueError(f"insert count must be >= 0, got {count}")
    g = num_pivots - 1
    if method == "equal":
        al = [float(a) for a in np.linspace(0.0, 1.0, count + 2)[1:-1]]
        return [list(al) for _ in range(g)]
    if method != "highest":
        raise ValueError(f"unknown insert method {method!r}; expected 'equal' or 'highest'")
    if sub_pivots < 1:
        raise ValueError("the 'highest' insertion needs sub_pivots >= 1 points inside every gap")
    v = np.asarray(dense_loss, np.float64).reshape(-1)
    expect = g * (sub_pivots + 1) + 1
    if v.size != expect:
        raise ValueError(f"dense_loss has {v.size} values; {num_pivots} pivots with {sub_pivots} sub-pivots "
                         f"need {expect}")
    if not np.all(np.isfinite(v)):
        raise ValueError("dense_loss holds NaN or inf")
    blocks = v[:-1].reshape(g, sub_pivots + 1)
    la = blocks[:, 0]
    lb = np.concatenate([blocks[1:, 0], v[-1:]])
    alphas = np.linspace(0.0, 1.0, sub_pivots + 2)[1:-1]
    inner = blocks[:, 1:]
    scores = inner - ((1 - alphas)[None] * la[:, None] + alphas[None] * lb[:, None])
    piv = np.concatenate([la, v[-1:]])
    scores = scores / (piv.max() - piv.min() + 1e-12)
    best = scores.max(axis=1)
    arg = scores.argmax(axis=1)
    order = np.argsort(-best, kind="stable")[: min(count, g)]
    fill: list[list[float]] = [[] for _ in range(g)]
    for gap in order:
        if best[gap] > threshold:
            fill[gap] = [float(alphas[arg[gap]])]
    return fill


def insert_pivots(pivots: PyTree, fill: Sequence[Sequence[float]], spacing=None) -> tuple[PyTree, np.ndarray]:
    """Insert pivots on the segments: ``fill[g]`` lists increasing positions in (0, 1) inside gap g.

    Args:
      pivots: stacked pivots ``[N, ...]``.
      fill: ``N-1`` lists of positions (:func:`insertion_alphas`).
      spacing: the current target weights ``[N-1]`` (default equal).

    Returns:
      The new stacked pivots (old pivots copied exactly; new ones ``(1 - a) w_g + a w_{g+1}`` with ``a`` in
      the pivots' dtype) and the new target spacing weights (each gap's weight split by the inserted
      positions, as Draxler's ``fill_chain``), normalised to mean 1.

    Example:
        >>> import jax.numpy as jnp
        >>> new, w = insert_pivots(jnp.array([0.0, 1.0, 3.0]), [[0.5], []])
        >>> new.tolist(), w.tolist()
        ([0.0, 0.5, 1.0, 3.0], [0.75, 0.75, 1.5])
    """
    n = int(jax.tree_util.tree_leaves(pivots)[0].shape[0])
    if len(fill) != n - 1:
        raise ValueError(f"fill must list positions for each of the {n - 1} gaps, got {len(fill)}")
    w = np.ones(n - 1) if spacing is None else np.asarray(spacing, np.float64)
    if w.shape != (n - 1,) or np.any(w <= 0):
        raise ValueError(f"spacing must be {n - 1} positive weights, got {w}")
    rows, new_w = [], []
    for g, al in enumerate(fill):
        al = [float(a) for a in al]
        if any(not 0.0 < a < 1.0 for a in al) or any(b <= a for a, b in zip(al, al[1:], strict=False)):
            raise ValueError(f"insert positions in gap {g} must increase strictly inside (0, 1), got {al}")
        r = np.zeros(n)
        r[g] = 1.0
        rows.append(r)
        last = 0.0
        for a in al:
            r = np.zeros(n)
            r[g], r[g + 1] = 1.0 - a, a
            rows.append(r)
            new_w.append((a - last) * w[g])
            last = a
        new_w.append((1.0 - last) * w[g])
    r = np.zeros(n)
    r[-1] = 1.0
    rows.append(r)
    m = np.stack(rows)
    if m.shape[0] == n:
        new = pivots
    else:
        new = tree_combine(jnp.asarray(m, _band_dtype(pivots)), pivots)  # alpha in the pivots' precision
        # Existing pivots are copied bit-for-bit.
        old_idx = np.flatnonzero((m == 1.0).sum(1) == 1)
        src = np.argmax(m[old_idx], axis=1)
        new = jax.tree_util.tree_map(lambda a, p: a.at[old_idx].set(p[src]), new, pivots)
    nw = np.asarray(new_w)
    return new, nw * (nw.size / nw.sum())



# ---- losses of single pivots ---------------------------------------------------------------------------

def _zero_loss(params, batch):
    return 0.0


_FUNCTION_OBJECTIVE = type(function_objective(_zero_loss))


def pivot_objective(loss) -> Callable:
    """The objective ``(params, batch, key) -> (loss, aux)`` of one pivot for ``loss``.

    Args:
      loss: an :class:`~mclandscape.core.objective.Objective` (:func:`model_loss`,
        :func:`~mclandscape.core.objective.make_objective`) or a
        :func:`~mclandscape.core.objective.function_objective`, used as it is; a
        :class:`~mclandscape.engine.models.Model` (its :func:`model_loss`: cross-entropy in train mode); or
        any other callable ``loss(params, batch) -> scalar`` (an analytic potential), wrapped with
        ``function_objective``. To pass another objective of the protocol, wrap it as
        ``function_objective(lambda p, b, k: obj(p, b, k)[0], takes_key=True)``.

    Returns:
      The objective. It hashes by the wrapped function (or model): reuse one ``loss`` to reuse compiled steps.

    Example:
        >>> import jax.numpy as jnp
        >>> obj = pivot_objective(lambda p, batch: jnp.sum(p ** 2))
        >>> float(obj(jnp.array([1.0, 2.0]), None, None)[0])
        5.0
    """
    if isinstance(loss, Objective | _FUNCTION_OBJECTIVE):
        return loss
    # a Model; has_batch_stats is looked up on the class, not evaluated (a model that has not seen an input
    # yet raises on it)
    if hasattr(loss, "apply") and hasattr(loss, "init") and hasattr(type(loss), "has_batch_stats"):
        return model_loss(loss)
    if not callable(loss):
        raise ValueError(f"loss must be a callable loss(params, batch) -> scalar, an Objective or a Model, "
                         f"got {type(loss).__name__}")
    return function_objective(loss)


def _point_loss(params, point, batch, key):
    return point(params, batch, key)[0]


def _point_value_and_grad(point, params, batch, key):
    return jax.value_and_grad(_point_loss)(params, point, batch, key)


_point_loss_jit = jax.jit(lambda point, params, batch, key: _point_loss(params, point, batch, key),
                          compiler_options=cpu.COMPILER_OPTIONS)
_point_value_and_grad_jit = jax.jit(_point_value_and_grad, compiler_options=cpu.COMPILER_OPTIONS)


def band_profile(loss, batch, *, strategy: str = "map", chunk_size: int | None = None,
                 devices: int | None = None) -> Callable[[Connector, np.ndarray], np.ndarray]:
    """A profile function ``(connector, ts) -> losses``: the pivot loss on ``batch`` at every point.

    The points run through the one evaluator (:func:`mclandscape.engine.evaluate.map_points` over
    :func:`mclandscape.engine.evaluate.connector_points`): each point's parameters are formed inside the
    mapped computation, so at most ``chunk_size`` parameter copies exist at a time.

    Args:
      loss: see :func:`pivot_objective` (an objective is evaluated without a key: no dropout).
      batch: the fixed batch (``None`` for a potential).
      strategy, chunk_size, devices: of :func:`~mclandscape.engine.evaluate.map_points`.

    Returns:
      ``profile(connector, ts) -> np.ndarray`` of the losses at ``ts``.

    Example:
        >>> import jax.numpy as jnp
        >>> profile = band_profile(lambda p, b: jnp.sum(p), None)
        >>> profile(band_connector(jnp.array([0.0, 2.0, 0.0])), [0.0, 0.25, 0.5]).tolist()
        [0.0, 1.0, 2.0]
    """
    point = pivot_objective(loss)

    def profile(connector: Connector, ts) -> np.ndarray:
        return np.asarray(map_points(_point_loss, connector_points(connector, ts), point, batch, None,
                                     strategy=strategy, chunk_size=chunk_size, devices=devices))

    return profile


# ---- the band as an objective -----------------------------------------------------------------------------

class NEBBatch(NamedTuple):
    """A batch of a NEB step.

    Attributes:
      data: the pivots' batch (``None``, a fixed pytree or a mini-batch).
      climb: whether the climbing image is on (a boolean scalar array: both phases share one compiled step).

    Example:
        >>> import jax.numpy as jnp
        >>> NEBBatch(None, jnp.asarray(True)).climb.dtype.name
        'bool'
    """

    data: Any
    climb: jax.Array


def _energies_grads(point, strategy: str, pivots: PyTree, data, key, mesh=None):
    """Losses of all N pivots ``[N]`` and loss gradients of the inner ones (stacked ``[N-2, ...]``).

    With a ``mesh`` whose ``"points"`` axis has several devices (``strategy="vmap"``), the inner pivots are
    split over that axis: each device computes whole pivots."""
    n = int(jax.tree_util.tree_leaves(pivots)[0].shape[0])
    vg = lambda p: _point_value_and_grad(point, p, data, key)  # noqa: E731
    value = lambda p: _point_loss(p, point, data, key)  # noqa: E731
    if strategy == "unroll":
        outs = [vg(tree_index(pivots, i)) for i in range(1, n - 1)]
        e_in, g = jnp.stack([o[0] for o in outs]), tree_stack([o[1] for o in outs])
        e_end = jnp.stack([value(tree_index(pivots, 0)), value(tree_index(pivots, n - 1))])
    else:
        inner = _rows(pivots, slice(1, -1))
        if mesh is not None and mesh.shape.get("points", 1) > 1:
            inner = jax.lax.with_sharding_constraint(inner, NamedSharding(mesh, P("points")))
        ends = jax.tree_util.tree_map(lambda x: jnp.stack([x[0], x[-1]]), pivots)
        e_in, g = jax.lax.map(vg, inner) if strategy == "map" else jax.vmap(vg)(inner)
        e_end = jax.vmap(value)(ends)
    e = jnp.concatenate([e_end[:1], e_in, e_end[1:]])
    return e.astype(jnp.promote_types(e.dtype, jnp.float32)), g


def _band_eval(band: BandObjective, pivots: PyTree, batch: NEBBatch, key):
    """``(value, aux, -F)``: the band's value and aux, and the negated NEB force on all N pivots."""
    if band.strategy == "given":
        e, g = batch.data
    else:
        e, g = _energies_grads(band.point, band.strategy, pivots, batch.data, key, band.mesh)
    ci = jnp.where(batch.climb, 1 + jnp.argmax(e[1:-1]), -1)
    f = neb_forces(pivots, e, g, band.spring_constant, spacing=band.spacing, climbing_index=ci)
    neg = jax.tree_util.tree_map(
        lambda t: jnp.concatenate([jnp.zeros_like(t[:1]), -t, jnp.zeros_like(t[:1])]), f.total)
    aux = {"loss": jnp.mean(e), "max_loss": jnp.max(e), "max_perp_force": jnp.max(f.perp_norm),
           "max_par_force": jnp.max(f.par_norm), "pivot_losses": e, "count": jnp.ones((), e.dtype)}
    return jnp.sum(e), aux, neg


@jax.custom_vjp
def _band_loss(band, pivots, batch, key):
    value, aux, _ = _band_eval(band, pivots, batch, key)
    return value, aux


def _band_loss_fwd(band, pivots, batch, key):
    value, aux, neg = _band_eval(band, pivots, batch, key)
    return (value, aux), neg


def _band_loss_bwd(neg, cotangents):
    g_value = cotangents[0]
    return None, jax.tree_util.tree_map(lambda n: (g_value * n).astype(n.dtype), neg), None, None


_band_loss.defvjp(_band_loss_fwd, _band_loss_bwd)


@struct.dataclass(eq=False)  # holds arrays: hashed by identity, like a jax.Array
class BandObjective:
    """``objective(pivots, batch, key) -> (loss, aux)`` of a band: the engine's view of NEB.

    ``pivots`` are the N stacked pivots, ``batch`` a :class:`NEBBatch`. The value is the total of the N
    pivot losses on ``batch.data`` (the point objective called with ``key``); its gradient (a
    ``jax.custom_vjp``) is *not* the gradient of that total but the negated NEB force of
    :func:`neb_forces` on the inner pivots (climbing image on the highest inner pivot when ``batch.climb``)
    and zero on the two ends. So a gradient step is the NEB update, every pivot costs one forward and one
    backward pass, and :func:`mclandscape.engine.loop.make_step` runs it with any Optax transform.

    ``aux``: ``loss`` (mean pivot loss), ``max_loss`` (highest pivot loss), ``max_perp_force`` /
    ``max_par_force`` (largest force norms over the inner pivots; the loop's epoch record keeps their
    maxima over the epoch), ``pivot_losses`` (``[N]``) and ``count`` (1: one band per step, so the loop's
    epoch means are means over steps).

    Fields: ``point`` the pivot objective (:func:`pivot_objective`; ``None`` for ``strategy="given"``, where
    ``batch.data`` holds the precomputed ``(losses [N], inner gradients [N-2, ...])``), ``spacing`` the
    target segment weights ``[N-1]``, ``spring_constant`` (a scalar array, so another ``k`` compiles
    nothing), the static ``strategy`` (``"vmap"``, ``"map"``, ``"unroll"`` or ``"given"``) and the static
    ``mesh`` (``None``, or the ``("points", "data")`` mesh of :func:`make_neb_step`: with ``strategy="vmap"``
    the inner pivots are split over its ``"points"`` axis).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from mclandscape.core.objective import function_objective
        >>> band = BandObjective(point=function_objective(lambda p, b: jnp.sum(p ** 2)),
        ...                      spacing=jnp.ones(2), spring_constant=jnp.asarray(0.0))
        >>> piv, batch = jnp.array([[-1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), NEBBatch(None, jnp.asarray(False))
        >>> (value, aux), grad = jax.value_and_grad(band, has_aux=True)(piv, batch, None)
        >>> float(value), (grad + 0.0).tolist()  # -F: the middle pivot's gradient across the band; ends 0
        (3.0, [[0.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    """

    point: Callable | None
    spacing: jax.Array
    spring_constant: jax.Array
    strategy: str = struct.field(pytree_node=False, default="vmap")
    mesh: jax.sharding.Mesh | None = struct.field(pytree_node=False, default=None)

    def __call__(self, pivots, batch: NEBBatch, key=None):
        return _band_loss(self, pivots, batch, key)


def _resolve_strategy(strategy: str, pivots: PyTree) -> str:
    """The pivot strategy; ``"auto"``: ``"unroll"`` on CPU for convolutional pivots, else ``"vmap"``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if strategy == "auto":
        return "unroll" if jax.default_backend() == "cpu" and cpu.has_conv(pivots, stacked=1) else "vmap"
    return strategy


def _num_pivots(pivots: PyTree) -> int:
    leaves = jax.tree_util.tree_leaves(pivots)
    if not leaves or np.ndim(leaves[0]) < 1:
        raise ValueError("pivots must be stacked trees with a leading pivot axis")
    return int(np.shape(leaves[0])[0])


@dataclasses.dataclass(frozen=True, eq=False)
class LoopedNEBStep:
    """The one-pivot-at-a-time baseline with the interface of an engine step:
    ``step(state, NEBBatch, key) -> (state, metrics)``.

    A Python loop calls one compiled value-and-gradient per inner pivot and one compiled loss per end (as
    Draxler et al.'s ``torch_autoneb`` evaluates pivots one after another), then ``update``, the engine step
    of a ``strategy="given"`` :class:`BandObjective` on those precomputed losses and gradients: the same
    forces, optimizer, mask and non-finite guard as the vectorised strategies.

    Attributes:
      point: the pivot objective.
      update: the engine step on precomputed losses and gradients.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> piv = jnp.array([0.0, 0.1, 1.0])
        >>> step = make_neb_step(lambda p, b: 0.0 * p, NEBConfig(learning_rate=0.5, momentum=0.0, strategy="loop"),
        ...                      piv)
        >>> state, _ = step(step.init(piv), NEBBatch(None, jnp.asarray(False)), jax.random.key(0))
        >>> type(step).__name__, [round(v, 3) for v in state.params.tolist()]
        ('LoopedNEBStep', [0.0, 0.5, 1.0])
    """

    point: Callable
    update: Step

    def init(self, params: PyTree) -> TrainState:
        """The optimizer state of a band (``update.init``)."""
        return self.update.init(params)

    def __call__(self, state: TrainState, batch: NEBBatch, key) -> tuple[TrainState, dict]:
        """One NEB update: ``(new state, metrics)`` as for an engine step."""
        piv = state.params
        n = _num_pivots(piv)
        outs = [_point_value_and_grad_jit(self.point, tree_index(piv, i), batch.data, key) for i in range(1, n - 1)]
        ends = [_point_loss_jit(self.point, tree_index(piv, i), batch.data, key) for i in (0, n - 1)]
        e = jnp.stack([ends[0], *[o[0] for o in outs], ends[1]])
        e = e.astype(jnp.promote_types(e.dtype, jnp.float32))
        return self.update(state, NEBBatch((e, tree_stack([o[1] for o in outs])), batch.climb), key)


def make_neb_step(loss, config: NEBConfig, pivots: PyTree, spacing=None, *,
                  mesh: jax.sharding.Mesh | None = None) -> Step | LoopedNEBStep:
    """The NEB update of a band shaped like ``pivots``, as an engine step.

    Args:
      loss: the pivot loss (:func:`pivot_objective`).
      config: a :class:`NEBConfig` (spring constant, optimizer, strategy).
      pivots: the stacked pivots ``[N, ...]`` (N >= 3), or a tree of ``jax.ShapeDtypeStruct`` like them:
        only their structure and N are used.
      spacing: target segment weights ``[N-1]`` (default equal).
      mesh: run the step on this ``("points", "data")`` mesh
        (:func:`mclandscape.engine.distributed.training_mesh` of the batch size and the ``N - 2`` inner
        pivots; across processes in a multi-process job): the inner pivots are split over ``"points"`` (the
        strategy is then ``"vmap"``, the split axis), each batch over ``"data"``, the band replicated, one
        update. ``None``: one device. Not with ``strategy="loop"`` (the one-device baseline).

    Returns:
      ``make_step(BandObjective(...), config.make_optimizer(), trainable=inner pivots, mesh=mesh)``:
      ``step.init(pivots)`` and ``step(state, NEBBatch(data, climb), key) -> (state, metrics)`` (one
      module-level jit: a second band of the same shapes and loss compiles nothing); for
      ``strategy="loop"`` the :class:`LoopedNEBStep` baseline with the same interface.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> piv = jnp.array([0.0, 0.1, 1.0])  # three scalar pivots on a flat loss: only the spring acts
        >>> step = make_neb_step(lambda p, b: 0.0 * p, NEBConfig(learning_rate=0.5, momentum=0.0), piv)
        >>> state, metrics = step(step.init(piv), NEBBatch(None, jnp.asarray(False)), jax.random.key(0))
        >>> [round(v, 3) for v in state.params.tolist()], round(float(metrics["max_par_force"]), 3)
        ([0.0, 0.5, 1.0], 0.8)
    """
    n = _num_pivots(pivots)
    if n < 3:
        raise ValueError(f"a band needs N >= 3 pivots, got N={n}")
    strategy = _resolve_strategy(config.strategy, pivots)
    if mesh is not None:
        if strategy == "loop":
            raise ValueError("strategy='loop' is the one-device baseline: pass mesh=None (devices=1)")
        if "points" not in mesh.axis_names or (n - 2) % mesh.shape["points"]:
            raise ValueError(f"the mesh's 'points' axis must divide the {n - 2} inner pivots, got mesh shape "
                             f"{dict(mesh.shape)}")
        if mesh.shape["points"] > 1:
            strategy = "vmap"  # the inner pivots are split over devices along the vmapped axis
    point = pivot_objective(loss)
    dtype = _band_dtype(pivots)
    spacing_arr = _normalised_spacing(spacing, n - 1, dtype)
    k = jnp.asarray(float(config.spring_constant), dtype)
    mask = jnp.asarray([False] + [True] * (n - 2) + [False])
    trainable = jax.tree_util.tree_map(lambda _: mask, pivots)
    tx = config.make_optimizer()
    if strategy == "loop":
        band = BandObjective(point=None, spacing=spacing_arr, spring_constant=k, strategy="given")
        return LoopedNEBStep(point=point, update=make_step(band, tx, trainable=trainable))
    band = BandObjective(point=point, spacing=spacing_arr, spring_constant=k, strategy=strategy, mesh=mesh)
    return make_step(band, tx, trainable=trainable, mesh=mesh)


# ---- the NEB run --------------------------------------------------------------------------------------

def _batch_at(data, step: int):
    return data(step) if callable(data) else data


def _band_mesh(config: NEBConfig, pivots: PyTree, data, step_offset: int, devices: int | None):
    """The ``("points", "data")`` mesh of a band's step (``None``: one device), from its first batch's size."""
    if devices == 1 or (devices is None and len(jax.devices()) == 1) or \
            _resolve_strategy(config.strategy, pivots) == "loop":
        return None  # (reads no batch: a batch callable sees the steps in order on one device)
    leaves = jax.tree_util.tree_leaves(_batch_at(data, step_offset))
    lead = int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) else 1
    return training_mesh(lead, _num_pivots(pivots) - 2, devices=devices)


def _relax(point, pivots: PyTree, spacing, config: NEBConfig, data, *, step_offset: int, key: jax.Array,
           progress: bool | None, devices: int | None = None) -> NEBResult:
    """One NEB run on the engine loop (see the module docstring)."""
    n = _num_pivots(pivots)
    spacing_arr = _normalised_spacing(spacing, n - 1, _band_dtype(pivots))
    step = make_neb_step(point, config, pivots, spacing,
                         mesh=_band_mesh(config, pivots, data, step_offset, devices))
    state = step.init(pivots)
    climbing, after, tol, ce = bool(config.climbing), int(config.climb_after), float(config.tol), int(config.check_every)
    on, off = jnp.asarray(True), jnp.asarray(False)
    full, rest = divmod(int(config.steps), ce)
    segments = ([(0, full, ce)] if full else []) + ([(full * ce, 1, rest)] if rest else [])
    history: list[dict] = []
    converged = False
    seg_keys = {}
    for s0, epochs, spe in segments:
        seg_keys[s0] = jax.random.fold_in(key, step_offset + s0)

        def batches(t, s0=s0):
            s = s0 + int(t)
            return NEBBatch(_batch_at(data, step_offset + s), on if climbing and s >= after else off)

        def record(e1, st, raw, s0=s0, spe=spe):
            return {"epoch": s0 // ce + e1, "step": step_offset + s0 + e1 * spe, "max_loss": raw["max_loss"],
                    "mean_loss": raw["loss"],
                    "perp_force": raw["max_perp_force"], "par_force": raw["max_par_force"],
                    "force_norm": raw["grad_norm"], "seconds": raw["seconds"]}

        def stop(e1, st, hist, s0=s0, spe=spe):
            # the stopping criterion (both forces below tol) over the whole epoch, never before the climbing image is on throughout
            r = hist[-1]
            if r["perp_force"] < tol and r["par_force"] < tol and (not climbing or s0 + (e1 - 1) * spe >= after):
                raise StopRun

        try:
            res = run(step, state, batches, epochs=epochs, steps_per_epoch=spe, key=seg_keys[s0],
                      config=LoopConfig(progress=progress, desc=f"NEB ({n} pivots)"), callbacks=(stop,),
                      on_epoch=record)
        except NonFiniteError as e:
            raise NonFiniteError(f"NEB diverged in the run from global step {step_offset + s0}: {e} (lower the "
                                 "learning rate or the spring constant)") from e
        state = res.state
        history += res.history
        if res.stopped is not None:
            converged = True
            break
    done = int(state.step)
    if done:
        last = done - 1
        s0 = max(s for s in seg_keys if s <= last)
        k_last = jax.random.fold_in(seg_keys[s0], last - s0)
        losses = map_points(_point_loss, stacked_points(state.params), point, _batch_at(data, step_offset + last),
                            k_last)
    else:
        losses = np.full(n, np.nan)
    perp = history[-1]["perp_force"] if history else float("nan")
    par = history[-1]["par_force"] if history else float("nan")
    return NEBResult(band=band_connector(state.params), losses=np.asarray(losses, np.float64), steps=done,
                     converged=converged, perp_force=perp, par_force=par,
                     spacing=np.asarray(spacing_arr, np.float64), history=history)


def neb(loss, start: PyTree, end: PyTree, *, num_pivots: int = 10, config: NEBConfig | None = None, data=None,
        init: PyTree | Connector | None = None, spacing=None, seed: int = 0, progress: bool | None = None,
        devices: int | None = None) -> NEBResult:
    """Relax a band of ``num_pivots`` pivots between ``start`` and ``end`` under the NEB forces.

    Args:
      loss: the pivot loss (:func:`pivot_objective`): ``loss(params, batch) -> scalar`` (an analytic
        potential, a hand-written loss), an :class:`~mclandscape.core.objective.Objective` such as
        :func:`model_loss` (called with the step's key: dropout), or a model.
      start, end: the fixed end points (same structure, finite, distinct).
      num_pivots: N (>= 3) when the band starts on the straight segment.
      config: a :class:`NEBConfig`.
      data: the batch: ``None``, a fixed pytree, or a callable ``step -> batch`` (mini-batches, e.g.
        :func:`model_batches`).
      init: a band connector or stacked pivots whose ends equal ``start`` and ``end`` (default: the straight
        segment).
      spacing: target segment weights ``[N-1]`` (default equal).
      seed: the base key of the step keys (dropout).
      progress: a progress bar per run (``None``: when stderr is a terminal).
      devices: how many of the job's devices the band's step runs on (default all, across processes; ``1``:
        one device): the inner pivots are split over ``gcd(devices, N - 2)`` of them and each batch over the
        rest (:func:`make_neb_step`'s ``mesh``); the band equals one device's to float rounding.

    Returns:
      A :class:`NEBResult`.

    Raises:
      NonFiniteError: (a ``FloatingPointError``) the band diverged; no update after the last finite step.

    Example:
        >>> import jax.numpy as jnp
        >>> bump = lambda p, batch: jnp.exp(-4.0 * (p[0] ** 2 + (p[1] + 0.2) ** 2))  # a hill below the segment
        >>> res = neb(bump, jnp.array([-1.0, 0.0]), jnp.array([1.0, 0.0]), num_pivots=5,
        ...           config=NEBConfig(steps=200, learning_rate=0.05))
        >>> bool(res.losses.max() < 0.5 * float(bump(jnp.zeros(2), None))), bool(res.pivots[2, 1] > 0.1)
        (True, True)
    """
    config = config or NEBConfig()
    _check_ends(start, end)
    if init is None:
        pivots = straight_band(start, end, num_pivots)
    else:
        pivots = init.control if isinstance(init, Connector) else init
        check_same_structure(start, pivots, names=("start", "init"), leading_b=1)
        n = _num_pivots(pivots)
        if n < 3:
            raise ValueError(f"init needs N >= 3 pivots, got N={n}")
        for name, ref, i in (("start", start, 0), ("end", end, n - 1)):
            if float(tree_distance(tree_index(pivots, i), ref)) != 0.0:
                raise ValueError(f"init pivot {i} differs from {name}: the band's end pivots are fixed")
    n = _num_pivots(pivots)
    if spacing is not None and np.shape(spacing) != (n - 1,):
        raise ValueError(f"spacing needs {n - 1} weights for {n} pivots, got shape {np.shape(spacing)}")
    return _relax(pivot_objective(loss), pivots, spacing, config, data, step_offset=0, key=jax.random.key(seed),
                  progress=progress, devices=devices)


def auto_neb(loss, start: PyTree, end: PyTree, *, cycles: NEBConfig | Sequence[NEBConfig],
             num_cycles: int | None = None, data=None,
             profile_fn: Callable[[Connector, np.ndarray], np.ndarray] | None = None, eval_data=None,
             initial_insert: int = 3, insert_count: int = 2, insert_method: str = "highest",
             sub_pivots: int = 9, insert_threshold: float = 0.1, seed: int = 0,
             progress: bool | None = None, devices: int | None = None) -> AutoNEBResult:
    """AutoNEB (Draxler et al. 2018): NEB cycles with pivot insertion between cycles (module docstring).

    Cycle 1 starts from ``start``, ``end`` and ``initial_insert`` evenly inserted pivots (Draxler's first
    cycle: "equal", 3); every later cycle first inserts ``insert_count`` pivots by ``insert_method``. The
    cycles continue one global step count: cycle ``c`` reads batches ``data(t)`` from where cycle ``c - 1``
    stopped.

    Args:
      loss: the pivot loss (:func:`pivot_objective`).
      start, end: the fixed end points.
      cycles: one :class:`NEBConfig` per cycle, or one config repeated ``num_cycles`` times.
      data: ``None``, a fixed batch or a callable ``step -> batch``.
      profile_fn: ``profile_fn(connector, ts) -> losses`` for the "highest" insertion and the final dense
        profile; default :func:`band_profile` of ``loss`` on ``eval_data`` (or on ``data`` when that is a fixed
        batch). For a network use :func:`model_profile`.
      initial_insert, insert_count, insert_method, sub_pivots, insert_threshold: the insertion (module
        docstring, :func:`insertion_alphas`).
      seed, progress, devices: as for :func:`neb`.

    Returns:
      An :class:`AutoNEBResult`; ``cycles`` holds per cycle ``cycle``, ``num_pivots``, ``inserted``, ``steps``,
      ``converged``, ``perp_force``, ``par_force``, ``climbing``, ``max_pivot_loss`` and ``dense_max_loss``.

    Example:
        >>> import jax.numpy as jnp
        >>> flat = lambda p, batch: 0.0 * jnp.sum(p)
        >>> res = auto_neb(flat, jnp.array([0.0]), jnp.array([1.0]), cycles=[NEBConfig(steps=10)], sub_pivots=1)
        >>> [c["num_pivots"] for c in res.cycles], res.dense_t.shape  # the ends and 3 evenly inserted pivots
        ([5], (9,))
    """
    if isinstance(cycles, NEBConfig):
        if num_cycles is None or num_cycles < 1:
            raise ValueError("with a single NEBConfig, give num_cycles >= 1")
        cycles = [cycles] * int(num_cycles)
    cycles = list(cycles)
    if not cycles:
        raise ValueError("auto_neb needs at least one cycle")
    if initial_insert < 1:
        raise ValueError(f"initial_insert must be >= 1 (a band needs N >= 3 pivots), got {initial_insert}")
    if sub_pivots < 1:
        raise ValueError(f"sub_pivots must be >= 1, got {sub_pivots}")
    if insert_method not in ("equal", "highest"):
        raise ValueError(f"unknown insert method {insert_method!r}; expected 'equal' or 'highest'")
    _check_ends(start, end)
    point = pivot_objective(loss)
    if profile_fn is None:
        batch = eval_data if eval_data is not None else (None if callable(data) else data)
        if batch is None and callable(data):
            raise ValueError("data is a mini-batch callable: pass eval_data (a fixed batch) or a profile_fn "
                             "for the dense evaluation that places new pivots")
        profile_fn = band_profile(point, batch)

    pivots, spacing = insert_pivots(tree_stack([start, end], names=["start", "end"]),
                                    [list(np.linspace(0, 1, initial_insert + 2)[1:-1])])
    records: list[dict] = []
    step_offset = 0
    key = jax.random.key(seed)
    dense_t = dense_loss = None
    for c, cfg in enumerate(cycles):
        inserted: list[list[float]] = [[] for _ in range(_num_pivots(pivots) - 1)]
        if c > 0:
            n = _num_pivots(pivots)
            if insert_method == "equal":
                inserted = insertion_alphas(None, n, sub_pivots, count=insert_count, method="equal")
            else:
                inserted = insertion_alphas(dense_loss, n, sub_pivots, count=insert_count, method="highest",
                                            threshold=insert_threshold)
            if any(inserted):
                pivots, spacing = insert_pivots(pivots, inserted, spacing)
        res = _relax(point, pivots, spacing, cfg, data, step_offset=step_offset, key=key, progress=progress,
                     devices=devices)
        step_offset += res.steps
        pivots = res.pivots
        n = res.num_pivots
        dense_t = dense_ts(n, sub_pivots)
        dense_loss = np.asarray(profile_fn(res.band, dense_t), np.float64)
        records.append({"cycle": c + 1, "num_pivots": n, "inserted": sum(len(a) for a in inserted),
                        "steps": res.steps, "converged": res.converged, "perp_force": res.perp_force,
                        "par_force": res.par_force, "climbing": bool(cfg.climbing),
                        "max_pivot_loss": float(np.max(res.losses)), "dense_max_loss": float(dense_loss.max())})
    return AutoNEBResult(band=band_connector(pivots), spacing=np.asarray(spacing), cycles=records,
                         dense_t=dense_t, dense_loss=dense_loss)


# ---- networks as NEB losses ---------------------------------------------------------------------------

def model_loss(model, *, loss_fn: str | Callable = cross_entropy, train: bool = True, l2: float = 0.0) -> Objective:
    """The pivot objective of a :class:`~mclandscape.engine.models.Model` for :func:`neb`:
    :func:`~mclandscape.core.objective.make_objective` ``(model, loss_fn, l2=l2, train=train)``.

    Args:
      model: the model.
      loss_fn: the per-example loss (a name or a callable ``(outputs, y) -> [B]``).
      train: run the network as a training step does (BatchNorm on batch statistics, dropout with the NEB
        step's key); ``train=False`` is inference mode, refused for models with BatchNorm (NEB has no
        running statistics: use train mode, then evaluate with recalibrated statistics,
        :func:`model_profile`).
      l2: ``l2 / 2 * |params|^2`` added to every pivot's loss.

    Returns:
      An :class:`~mclandscape.core.objective.Objective` ``(params, (x, y) or (x, y, weights), key) -> (loss,
      aux)``; two calls with the same arguments compile the same steps.

    Example:
        >>> import jax, numpy as np
        >>> from mclandscape.engine.models import get_model
        >>> model = get_model("mlp", widths=[2], num_classes=2)
        >>> x, y = np.ones((4, 2), np.float32), np.array([0, 1, 0, 1])
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> loss, aux = model_loss(model)(params, (x, y), jax.random.key(1))
        >>> loss.shape, bool(loss > 0)
        ((), True)
    """
    if not train and model.has_batch_stats:
        raise ValueError(f"model {model.name} has BatchNorm: NEB gradients use train mode (batch statistics); "
                         "pass train=True")
    return make_objective(model, loss_fn, l2=l2, train=train)


def model_batches(train_data, batch_size: int, *, seed: int = 0, augment: bool = False):
    """``step -> (x, y)``: shuffled full mini-batches, epoch after epoch.

    Through :func:`mclandscape.engine.data.batch_stream`: batch ``step`` depends only on ``seed`` and
    ``step``. Dropout keys come from the NEB run (``neb(..., seed=)``), not from the batches.

    Args:
      train_data: a :class:`~mclandscape.engine.data.Dataset`.
      batch_size: examples per batch.
      seed: the shuffling seed.
      augment: apply the dataset's training augmentation.

    Returns:
      A callable ``step -> (x, y)`` (the ``data`` argument of :func:`neb` / :func:`auto_neb`).

    Example:
        >>> import numpy as np
        >>> from mclandscape.engine.data import Dataset
        >>> ds = Dataset(np.arange(12, dtype=np.float32).reshape(6, 2), np.arange(6, dtype=np.int32), 6, "toy")
        >>> batches = model_batches(ds, 4)
        >>> x, y = batches(0)
        >>> x.shape, len(set(y.tolist()) | set(batches(1)[1].tolist())) >= 4  # epoch 1 reshuffled
        ((4, 2), True)
    """
    return batch_stream(train_data, batch_size, seed=seed, augment=augment)


def model_profile(model, eval_data, *, bn_data=None, batch_size: int = 500, bn_batches: int | None = None,
                  bn_batch_size: int = 128, loss_fn: Callable = cross_entropy) -> Callable[[Connector, np.ndarray], np.ndarray]:
    """A profile function ``(connector, ts) -> losses`` of a network band on ``eval_data``.

    Through :func:`mclandscape.engine.evaluate.evaluate_points`, BatchNorm recalibrated per point from
    ``bn_data``; pass it as ``auto_neb(..., profile_fn=)``.

    Args:
      model: the :class:`~mclandscape.engine.models.Model`.
      eval_data: a Dataset or ``(x, y)`` the losses are measured on.
      bn_data, bn_batches, bn_batch_size: the BatchNorm recalibration data (for models with BatchNorm).
      batch_size: evaluation batch size.
      loss_fn: the per-example loss.

    Returns:
      ``profile(connector, ts) -> np.ndarray`` of the mean losses at ``ts``.

    Example:
        >>> import jax, numpy as np
        >>> from mclandscape.engine.models import get_model
        >>> model = get_model("mlp", widths=[2], num_classes=2)
        >>> x, y = np.ones((4, 2), np.float32), np.array([0, 1, 0, 1])
        >>> p0, p1 = (model.init(jax.random.key(s), x)["params"] for s in (0, 1))
        >>> band = band_connector(straight_band(p0, p1, 3))
        >>> model_profile(model, (x, y))(band, [0.0, 0.5, 1.0]).shape
        (3,)
    """
    from mclandscape.engine.evaluate import evaluate_points

    def profile(connector: Connector, ts) -> np.ndarray:
        m = evaluate_points(model, connector, ts, eval_data, batch_size=batch_size, bn_data=bn_data,
                            bn_batches=bn_batches, bn_batch_size=bn_batch_size, loss_fn=loss_fn)
        return np.asarray(m.loss)

    return profile


def evaluate_band(model, band: Connector | NEBResult | AutoNEBResult, train, test=None, *, sub_pivots: int = 9,
                  **kwargs):
    """Loss and accuracy on the dense interpolation of a band: its pivots and ``sub_pivots`` points between
    each pair (:func:`dense_ts`), BatchNorm recalibrated per point (``bn_data`` defaults to ``train``).

    Args:
      model: the :class:`~mclandscape.engine.models.Model`.
      band: a band connector, :class:`NEBResult` or :class:`AutoNEBResult`.
      train: the training data (and the default ``bn_data``).
      test: the test data (``None``: no test series).
      sub_pivots: points per gap (:func:`dense_ts`).
      **kwargs: passed to :func:`mclandscape.methods.curves.evaluate_path` (``batch_size``, ``bn_data``, ...).

    Returns:
      A :class:`mclandscape.methods.curves.PathEvaluation` (barrier, stats, length).

    Example:
        >>> import jax, numpy as np
        >>> from mclandscape.engine.models import get_model
        >>> model = get_model("mlp", widths=[2], num_classes=2)
        >>> x, y = np.ones((4, 2), np.float32), np.array([0, 1, 0, 1])
        >>> p0, p1 = (model.init(jax.random.key(s), x)["params"] for s in (0, 1))
        >>> ev = evaluate_band(model, band_connector(straight_band(p0, p1, 3)), (x, y), sub_pivots=1)
        >>> len(ev.ts)
        5
    """
    from mclandscape.methods.curves import evaluate_path

    conn = band if isinstance(band, Connector) else band.band
    if conn.kind != "polychain":
        raise ValueError(f"a band is a polychain connector, got a {conn.kind!r} connector")
    return evaluate_path(model, conn, train, test, ts=dense_ts(conn.num_control, sub_pivots), **kwargs)
