"""Nudged Elastic Band (Draxler et al., seed 001) and AutoNEB between two points of parameter space.

A band is ``N`` pivots ``w_0 .. w_{N-1}`` stacked on a leading axis (every leaf ``[N, ...]``); the end pivots
``w_0 = start`` and ``w_{N-1} = end`` stay fixed, and the band *is* a polygonal chain through the pivots:
:func:`band_connector` wraps the pivots as a ``"polychain"`` :class:`~mclandscape.core.connectors.Connector`
(pivot ``i`` at ``t = i/(N-1)``), so the dense interpolation between pivots is evaluated with
:func:`mclandscape.engine.evaluate.evaluate_points` like any other curve.

Forces on an inner pivot ``i`` (seed 001, "NEB force decomposition"):

- loss force, perpendicular part: ``F_L^perp_i = -grad L(w_i) + (grad L(w_i) . tau_i) tau_i``, so
  ``F_L^perp_i . tau_i = 0``;
- spring force, parallel part: ``F_E^par_i = k (|w_{i+1} - w_i| - |w_i - w_{i-1}|) tau_i``, the projection
  of the elastic potential ``V_E = (k/2) sum |w_{i+1} - w_i|^2`` that equalises the spacing (the slides' 1-D
  illustration ``w_k <- w_k - eta k [(w_k - w_{k-1}) - (w_{k+1} - w_k)]``);
- update ``w_i <- w_i + eta (F_L^perp_i + F_E^par_i)`` (the slides' "Summary of the process"); here the
  negated total force is handed to an optax optimizer as the gradient, so plain SGD is exactly that rule
  and momentum is the usual accelerated variant (Draxler et al. use SGD with momentum).

The tangent ``tau_i`` is the improved estimate of Henkelman & Jonsson (J. Chem. Phys. 113, 9978, 2000):
the segment towards the higher-loss neighbour (``tau+ = w_{i+1} - w_i`` when ``L_{i+1} > L_i > L_{i-1}``,
``tau- = w_i - w_{i-1}`` when ``L_{i+1} < L_i < L_{i-1}``) and, at a loss extremum, the blend
``tau+ dV_max + tau- dV_min`` (if ``L_{i+1} > L_{i-1}``, else the weights swap) with ``dV_max/min`` the
larger/smaller of ``|L_{i+1} - L_i|``, ``|L_{i-1} - L_i|``; normalised. Where the loss is flat on both
sides (``dV_max = 0``) the bisector of the two unit segment vectors is used.

Climbing image (Henkelman, Uberuaga & Jonsson 2000), optional: the highest inner pivot gets no spring and
the reversed parallel loss force, ``F = -grad L + 2 (grad L . tau) tau``, so it climbs to the saddle along
the band while relaxing perpendicular to it.

Stopping: the slides stop when both ``F_L^perp`` and ``F_E^par`` vanish; here when the largest norm of each
over the inner pivots falls below ``tol`` (checked every ``check_every`` steps), or after ``steps``.

All inner pivots' losses and gradients are computed in one vectorised call: ``jax.vmap`` over pivots
(strategy ``"auto"``) or ``jax.lax.map`` (``"map"``, one pivot's activations in memory at a time);
``"loop"`` is the one-pivot-at-a-time baseline. ``benchmarks/neb_step.py`` measured on the 2-core CPU
(noisy, shared machine), digits 8x8, batch 64, 8 pivots: small CNN (8-16-16) loop 41 ms, map 22 ms,
vmap 17 ms per step; zoo ``simple_cnn`` (32-64-128) loop 368 ms, map 1343 ms, vmap 199 ms; 64-32-10 MLP
with 12 pivots loop 11.3 ms, map 0.93 ms, vmap 0.86 ms. Unlike forward-only evaluation (where
:mod:`mclandscape.engine.evaluate` found ``lax.map`` faster on CPU), for gradients ``vmap`` was never slower, so
``"auto"`` means ``vmap`` on every backend. Gradients are mini-batch gradients when ``data`` is a callable
``step -> batch``.

AutoNEB (Draxler et al.; their ``torch_autoneb``): cycles of NEB runs; before each cycle pivots are inserted,
evenly (``"equal"``: ``count`` new pivots in every gap) or where the loss between neighbours rises most above
the linear interpolation of their losses (``"highest"``: on ``sub_pivots`` points per gap the score
``L(alpha) - ((1 - alpha) L_a + alpha L_b)``, normalised by the range of the pivot losses; the ``count`` gaps
with the largest score above ``threshold`` each get one pivot at their arg-max). As in Draxler's fill, the
band keeps *target spacing* weights ``omega_j`` (relative segment lengths, mean 1): an inserted pivot splits
its gap's weight by ``alpha``, and the spring generalises to
``k (|w_{i+1} - w_i| / omega_i - |w_i - w_{i-1}| / omega_{i-1}) tau_i``, which is the slides' spring for equal
weights; so a pivot inserted near a barrier stays there instead of being pushed back to equal spacing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mclandscape.core.connectors import Connector, from_control, polychain
from mclandscape.core.losses import cross_entropy
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
from mclandscape.engine.train import legacy_batch_stream as batch_stream
from mclandscape.engine.train import params_loss

__all__ = [
    "NEBConfig",
    "NEBForces",
    "NEBResult",
    "AutoNEBResult",
    "NEBStep",
    "make_neb_step",
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

STRATEGIES = ("auto", "map", "vmap", "loop")


@dataclasses.dataclass(frozen=True)
class NEBConfig:
    """Hyper-parameters of one NEB run.

    ``spring_constant`` is the slides' ``k`` (>= 0, finite); ``optimizer`` defaults to
    ``optax.sgd(learning_rate, momentum)``; ``climbing`` switches on the climbing image after ``climb_after``
    steps; ``strategy`` chooses how the pivots' gradients are computed (see the module docstring).
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
        if self.check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {self.check_every!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; expected one of {STRATEGIES}")

    def make_optimizer(self) -> optax.GradientTransformation:
        if self.optimizer is not None:
            return self.optimizer
        return optax.sgd(self.learning_rate, momentum=self.momentum or None)


class NEBForces(NamedTuple):
    """Forces on the inner pivots (stacked trees ``[N-2, ...]``) and their norms ``[N-2]``."""

    total: PyTree          # F_L^perp + F_E^par (climbing image: -grad + 2 (grad . tau) tau)
    perpendicular: PyTree  # F_L^perp = -grad + (grad . tau) tau
    parallel: PyTree       # F_E^par = k (|d_next| - |d_prev|) tau (climbing image: (grad . tau) tau)
    tangent: PyTree        # unit tangents tau
    perp_norm: jax.Array   # |F_L^perp|
    par_norm: jax.Array    # |F^par|


@dataclasses.dataclass(frozen=True)
class NEBResult:
    """Outcome of :func:`neb`: the band as a polychain connector and the run's record.

    ``losses`` are the pivot losses on the last step's batch; ``perp_force`` / ``par_force`` the largest
    force norms over inner pivots at the last check; ``history`` one dict per check.
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
        return self.band.control

    @property
    def num_pivots(self) -> int:
        return self.band.num_control


@dataclasses.dataclass(frozen=True)
class AutoNEBResult:
    """Outcome of :func:`auto_neb`: final band, per-cycle records and the final dense profile."""

    band: Connector
    spacing: np.ndarray
    cycles: list[dict]
    dense_t: np.ndarray
    dense_loss: np.ndarray

    @property
    def pivots(self) -> PyTree:
        return self.band.control

    @property
    def num_pivots(self) -> int:
        return self.band.num_control


# ---- geometry of a band ------------------------------------------------------------------------------

def _rows(tree: PyTree, sl: slice) -> PyTree:
    return jax.tree_util.tree_map(lambda x: x[sl], tree)


def _diffs(pivots: PyTree) -> PyTree:
    """Segment vectors ``w_{j+1} - w_j``, stacked ``[N-1, ...]``."""
    return jax.tree_util.tree_map(lambda x: x[1:] - x[:-1], pivots)


def segment_lengths(pivots: PyTree) -> jax.Array:
    """``|w_{j+1} - w_j|`` for j = 0..N-2, shape ``[N-1]``."""
    d = _diffs(pivots)
    return jnp.sqrt(tree_row_dot(d, d))


def _normalise_rows(tree: PyTree, eps: float = 1e-30) -> PyTree:
    n = jnp.sqrt(tree_row_dot(tree, tree))
    return tree_row_scale(tree, 1.0 / jnp.maximum(n, eps))


def improved_tangents(pivots: PyTree, energies) -> PyTree:
    """Unit tangents ``tau_i`` of the inner pivots i = 1..N-2 (stacked ``[N-2, ...]``).

    Henkelman & Jonsson's improved tangent (see the module docstring); ``energies`` are the N pivot losses.
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


def _normalised_spacing(spacing, n_segments: int):
    if spacing is None:
        return jnp.ones((n_segments,), jnp.float32)
    w = jnp.asarray(spacing, jnp.float32)
    return w * (n_segments / jnp.sum(w))


def neb_forces(pivots: PyTree, energies, grads: PyTree, spring_constant: float, *, spacing=None,
               climbing_index=-1) -> NEBForces:
    """NEB forces on the inner pivots from the N pivot losses and the inner pivots' loss gradients.

    ``grads`` is stacked ``[N-2, ...]`` (pivots 1..N-2). ``spacing`` are optional target segment weights
    ``[N-1]`` (default equal: the slides' spring); ``climbing_index`` the pivot index (1..N-2) of the
    climbing image, or -1 for none. Jittable.
    """
    tau = improved_tangents(pivots, energies)
    gt = tree_row_dot(grads, tau)
    along = tree_row_scale(tau, gt)
    perp = jax.tree_util.tree_map(lambda g, a: a - g, grads, along)  # -grad + (grad . tau) tau
    lengths = segment_lengths(pivots)
    w = _normalised_spacing(spacing, lengths.shape[0])
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
    """The polygonal chain through stacked pivots ``[N, ...]`` (pivot i at t = i/(N-1); ends fixed)."""
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
    """``num_pivots`` pivots evenly on the straight segment (stacked), ends exactly ``start`` and ``end``."""
    if int(num_pivots) != num_pivots or num_pivots < 3:
        raise ValueError(f"num_pivots must be an integer N >= 3 (two fixed ends and at least one free pivot), "
                         f"got {num_pivots!r}")
    _check_ends(start, end)
    return polychain(start, end, num_bends=int(num_pivots) - 2).control


def dense_ts(num_pivots: int, sub_pivots: int = 9) -> np.ndarray:
    """Path parameters of the pivots and ``sub_pivots`` evenly spaced points in every gap (increasing).

    With N pivots: ``(N-1)(sub_pivots+1) + 1`` values; pivot i sits at ``t = i/(N-1)`` (Draxler's dense
    evaluation uses ``sub_pivots = 9``).
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

    Returns the new stacked pivots (old pivots copied exactly) and the new target spacing weights (each
    gap's weight split by the inserted positions, as Draxler's ``fill_chain``), normalised to mean 1.
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
        new = tree_combine(jnp.asarray(m, jnp.float32), pivots)
        # Existing pivots are copied bit-for-bit.
        old_idx = np.flatnonzero((m == 1.0).sum(1) == 1)
        src = np.argmax(m[old_idx], axis=1)
        new = jax.tree_util.tree_map(lambda a, p: a.at[old_idx].set(p[src]), new, pivots)
    nw = np.asarray(new_w)
    return new, nw * (nw.size / nw.sum())


def band_profile(loss_fn: Callable[[PyTree, Any], jax.Array], batch) -> Callable[[Connector, np.ndarray], np.ndarray]:
    """A profile function ``(connector, ts) -> losses`` evaluating ``loss_fn(params, batch)`` at every point."""
    f = jax.jit(jax.vmap(loss_fn, in_axes=(0, None)))

    def profile(connector: Connector, ts) -> np.ndarray:
        return np.asarray(f(connector.points(jnp.asarray(ts, jnp.float32)), batch))

    return profile


# ---- the NEB run --------------------------------------------------------------------------------------

def _resolve_strategy(strategy: str) -> str:
    return "vmap" if strategy == "auto" else strategy


def _batch_at(data, step: int):
    return data(step) if callable(data) else data


class NEBStep(NamedTuple):
    """``init(pivots) -> opt_state`` and the step
    ``step(pivots, opt_state, batch, climb) -> (pivots, opt_state, max_perp_force, max_par_force, losses)``."""

    init: Callable
    step: Callable
    strategy: str


def make_neb_step(loss_fn: Callable[[PyTree, Any], jax.Array], config: NEBConfig, num_pivots: int,
                  spacing=None) -> NEBStep:
    """The NEB update for a band of ``num_pivots`` pivots (jitted; ``"loop"`` jits the per-pivot pieces).

    One step: losses of all N pivots and gradients of the N-2 inner ones on ``batch`` (one vectorised call
    for ``"map"`` / ``"vmap"``, a Python loop over pivots for ``"loop"``), the forces of
    :func:`neb_forces` (climbing image on the highest inner pivot when ``climb``), and one optimizer update
    with the negated force; the end pivots are restored exactly.
    """
    n = int(num_pivots)
    if n < 3:
        raise ValueError(f"a band needs N >= 3 pivots, got N={n}")
    strategy = _resolve_strategy(config.strategy)
    opt = config.make_optimizer()
    k = float(config.spring_constant)
    spacing_arr = _normalised_spacing(spacing, n - 1)
    vg = jax.value_and_grad(loss_fn)

    def energies_grads(piv, batch):
        inner = _rows(piv, slice(1, -1))
        ends = jax.tree_util.tree_map(lambda x: jnp.stack([x[0], x[-1]]), piv)
        if strategy == "map":
            e_in, g = jax.lax.map(lambda p: vg(p, batch), inner)
        else:
            e_in, g = jax.vmap(vg, in_axes=(0, None))(inner, batch)
        e_end = jax.vmap(loss_fn, in_axes=(0, None))(ends, batch)
        e = jnp.concatenate([e_end[:1], e_in, e_end[1:]]).astype(jnp.float32)
        return e, g

    def update(piv, opt_state, e, g, climb):
        ci = jnp.where(climb, 1 + jnp.argmax(e[1:-1]), -1)
        f = neb_forces(piv, e, g, k, spacing=spacing_arr, climbing_index=ci)
        neg = jax.tree_util.tree_map(
            lambda t: jnp.concatenate([jnp.zeros_like(t[:1]), -t, jnp.zeros_like(t[:1])]), f.total)
        updates, opt_state = opt.update(neg, opt_state, piv)
        new = optax.apply_updates(piv, updates)
        new = jax.tree_util.tree_map(lambda a, b: a.at[0].set(b[0]).at[-1].set(b[-1]), new, piv)
        return new, opt_state, jnp.max(f.perp_norm), jnp.max(f.par_norm)

    if strategy == "loop":
        vg1 = jax.jit(vg)
        l1 = jax.jit(loss_fn)
        upd = jax.jit(update)

        def step(piv, opt_state, batch, climb):
            outs = [vg1(tree_index(piv, i), batch) for i in range(1, n - 1)]
            e_in = jnp.stack([o[0] for o in outs])
            g = tree_stack([o[1] for o in outs])
            e = jnp.concatenate([jnp.stack([l1(tree_index(piv, 0), batch)]), e_in,
                                 jnp.stack([l1(tree_index(piv, n - 1), batch)])]).astype(jnp.float32)
            return (*upd(piv, opt_state, e, g, jnp.asarray(climb)), e)
    else:
        @jax.jit
        def _step(piv, opt_state, batch, climb):
            e, g = energies_grads(piv, batch)
            return (*update(piv, opt_state, e, g, climb), e)

        def step(piv, opt_state, batch, climb):
            return _step(piv, opt_state, batch, jnp.asarray(climb))

    return NEBStep(init=opt.init, step=step, strategy=strategy)


def _run_band(loss_fn, pivots: PyTree, spacing: np.ndarray | None, config: NEBConfig, data,
              step_offset: int = 0) -> NEBResult:
    n = int(jax.tree_util.tree_leaves(pivots)[0].shape[0])
    spacing_arr = _normalised_spacing(spacing, n - 1)
    neb_step = make_neb_step(loss_fn, config, n, spacing)
    step = neb_step.step
    opt_state = neb_step.init(pivots)
    history: list[dict] = []
    converged = False
    perp = par = float("nan")
    e = None
    done = 0
    for s in range(config.steps):
        climb = bool(config.climbing) and s >= config.climb_after
        batch = _batch_at(data, step_offset + s)
        pivots, opt_state, perp_j, par_j, e = step(pivots, opt_state, batch, climb)
        done = s + 1
        if done % config.check_every == 0 or done == config.steps:
            perp, par = float(perp_j), float(par_j)
            ev = np.asarray(e)
            if not (np.isfinite(perp) and np.isfinite(par) and np.all(np.isfinite(ev))):
                raise FloatingPointError(f"NEB diverged at step {step_offset + s} (force {perp}, {par}); "
                                         "lower the learning rate or the spring constant")
            history.append({"step": step_offset + done, "max_loss": float(ev.max()), "mean_loss": float(ev.mean()),
                            "perp_force": perp, "par_force": par})
            # Stop once both force components vanish (the slides' criterion), but never before the
            # climbing image has been switched on.
            if perp < config.tol and par < config.tol and (not config.climbing or s >= config.climb_after):
                converged = True
                break
    if e is None:
        e = np.full(n, np.nan)
    return NEBResult(band=band_connector(pivots), losses=np.asarray(e), steps=done, converged=converged,
                     perp_force=perp, par_force=par,
                     spacing=np.asarray(spacing_arr, np.float64), history=history)


def neb(loss_fn: Callable[[PyTree, Any], jax.Array], start: PyTree, end: PyTree, *, num_pivots: int = 10,
        config: NEBConfig | None = None, data=None, init: PyTree | Connector | None = None,
        spacing=None) -> NEBResult:
    """Relax a band of ``num_pivots`` pivots between ``start`` and ``end`` under the NEB forces.

    ``loss_fn(params, batch) -> scalar`` is any differentiable loss of a parameter pytree (an analytic
    potential, or :func:`model_loss` for a network); ``data`` is the batch: ``None``, a fixed pytree, or a
    callable ``step -> batch`` (mini-batches). The band starts on the straight segment unless ``init`` (a
    band connector or stacked pivots whose ends equal ``start`` and ``end``) is given.
    """
    config = config or NEBConfig()
    _check_ends(start, end)
    if init is None:
        pivots = straight_band(start, end, num_pivots)
    else:
        pivots = init.control if isinstance(init, Connector) else init
        check_same_structure(start, pivots, names=("start", "init"), leading_b=1)
        n = int(jax.tree_util.tree_leaves(pivots)[0].shape[0])
        if n < 3:
            raise ValueError(f"init needs N >= 3 pivots, got N={n}")
        for name, ref, i in (("start", start, 0), ("end", end, n - 1)):
            if float(tree_distance(tree_index(pivots, i), ref)) != 0.0:
                raise ValueError(f"init pivot {i} differs from {name}: the band's end pivots are fixed")
    n = int(jax.tree_util.tree_leaves(pivots)[0].shape[0])
    if spacing is not None and np.shape(spacing) != (n - 1,):
        raise ValueError(f"spacing needs {n - 1} weights for {n} pivots, got shape {np.shape(spacing)}")
    return _run_band(loss_fn, pivots, spacing, config, data)


def auto_neb(loss_fn: Callable[[PyTree, Any], jax.Array], start: PyTree, end: PyTree, *,
             cycles: NEBConfig | Sequence[NEBConfig], num_cycles: int | None = None, data=None,
             profile_fn: Callable[[Connector, np.ndarray], np.ndarray] | None = None, eval_data=None,
             initial_insert: int = 3, insert_count: int = 2, insert_method: str = "highest",
             sub_pivots: int = 9, insert_threshold: float = 0.1) -> AutoNEBResult:
    """AutoNEB: NEB cycles with pivot insertion between cycles (see the module docstring).

    Cycle 1 starts from ``start``, ``end`` and ``initial_insert`` evenly inserted pivots (Draxler's first
    cycle: "equal", 3); every later cycle first inserts ``insert_count`` pivots by ``insert_method``.
    ``cycles`` is one :class:`NEBConfig` per cycle (or one config repeated ``num_cycles`` times).
    ``profile_fn(connector, ts) -> losses`` evaluates the band for the "highest" insertion and the final
    dense profile; by default ``loss_fn`` on ``eval_data`` (or on ``data`` when that is a fixed batch).
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
    if profile_fn is None:
        batch = eval_data if eval_data is not None else (None if callable(data) else data)
        if batch is None and callable(data):
            raise ValueError("data is a mini-batch callable: pass eval_data (a fixed batch) or a profile_fn "
                             "for the dense evaluation that places new pivots")
        profile_fn = band_profile(loss_fn, batch)

    pivots, spacing = insert_pivots(tree_stack([start, end], names=["start", "end"]),
                                    [list(np.linspace(0, 1, initial_insert + 2)[1:-1])])
    records: list[dict] = []
    step_offset = 0
    dense_t = dense_loss = None
    for c, cfg in enumerate(cycles):
        inserted: list[list[float]] = [[] for _ in range(int(jax.tree_util.tree_leaves(pivots)[0].shape[0]) - 1)]
        if c > 0:
            n = int(jax.tree_util.tree_leaves(pivots)[0].shape[0])
            if insert_method == "equal":
                inserted = insertion_alphas(None, n, sub_pivots, count=insert_count, method="equal")
            else:
                inserted = insertion_alphas(dense_loss, n, sub_pivots, count=insert_count, method="highest",
                                            threshold=insert_threshold)
            if any(inserted):
                pivots, spacing = insert_pivots(pivots, inserted, spacing)
        res = _run_band(loss_fn, pivots, spacing, cfg, data, step_offset)
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

def model_loss(model, *, loss_fn: Callable = cross_entropy, train: bool = True) -> Callable[[PyTree, Any], jax.Array]:
    """``loss(params, batch)`` of a :class:`~mclandscape.engine.models.base.Model` for :func:`neb`
    (:func:`mclandscape.engine.train.params_loss` with the per-example ``loss_fn``).

    ``batch`` is ``(x, y)`` or ``(x, y, key)`` (``key`` drives dropout). With ``train=True`` the network
    runs in train mode like a training step (BatchNorm on batch statistics, dropout when a key is given);
    with ``train=False`` in inference mode (models with BatchNorm then need train mode or recalibrated
    statistics, so ``train=False`` is refused for them).
    """
    if model.has_batch_stats and not train:
        raise ValueError(f"model {model.name} has BatchNorm: NEB gradients use train mode (batch statistics); "
                         "pass train=True")
    return params_loss(model, None, loss=loss_fn, train=train)


def model_batches(train_data, batch_size: int, *, seed: int = 0, augment: bool = False) -> Callable[[int], tuple]:
    """``step -> (x, y, key)``: shuffled mini-batches (epoch after epoch) with a dropout key per step
    (:func:`mclandscape.engine.train.batch_stream` with ``keys=True``; batch ``step`` depends only on ``step``)."""
    return batch_stream(train_data, batch_size, seed=seed, augment=augment, keys=True)


def model_profile(model, eval_data, *, bn_data=None, batch_size: int = 500, bn_batches: int | None = None,
                  bn_batch_size: int = 128, loss_fn: Callable = cross_entropy) -> Callable[[Connector, np.ndarray], np.ndarray]:
    """A profile function ``(connector, ts) -> losses`` on ``eval_data`` via
    :func:`mclandscape.engine.evaluate.evaluate_points` (BatchNorm recalibrated per point from ``bn_data``)."""
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

    Returns a :class:`mclandscape.methods.curves.PathEvaluation` (barrier, stats, length); ``kwargs`` go to
    :func:`mclandscape.methods.curves.evaluate_path`.
    """
    from mclandscape.methods.curves import evaluate_path

    conn = band if isinstance(band, Connector) else band.band
    if conn.kind != "polychain":
        raise ValueError(f"a band is a polychain connector, got a {conn.kind!r} connector")
    return evaluate_path(model, conn, train, test, ts=dense_ts(conn.num_control, sub_pivots), **kwargs)
