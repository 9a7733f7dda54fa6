"""Exit-point verification of a TRUST-TECH search: which optimum do points along a search path flow to?

The DSP-TT paper (Anonymous, 2020, 'Constructing multiple high-quality deep neural networks: a TRUST-TECH based
approach', ICLR 2021 submission) checks its exit points (§5.1, Figure 3c) by integrating gradient descent from
points along a search path near the exit: points before the exit should return to the origin's optimum (the
tier-0 solution), points after it should reach another one. :func:`verify_exit` runs those flows and *measures*
the outcome instead of reading it off a plot:

1. the flows ``w <- w - step_size * grad c(w)`` (full batch, deterministic) from every selected path point and
   from the origin, in chunks of ``record_every`` steps, until every gradient norm is at most ``grad_tol`` or
   ``steps`` steps have run; optionally finished by an L-BFGS polish (``polish_steps``);
2. whether each end point has *settled*: a small gradient on a flat valley is not convergence, so two further
   probe chunks estimate how far the flow still had to go (:attr:`VerificationResult.settled`);
3. the optimum each end point reached: end points are clustered by their distances (greedy leader clustering
   with a tolerance) in one or more *spaces*: ``"param"`` (Euclidean parameter distance, always) and any
   named distance ``(p, q) -> float`` the caller adds — a network's hidden-unit permutations and sign flips
   map an optimum to other parameters computing the same function, so the comparison modulo those symmetries
   (:func:`mclandscape.methods.alignment.distance_modulo_permutation`) or between the networks' outputs
   (:func:`output_distance`) tells a symmetric copy of the origin's optimum from a new one;
4. :meth:`VerificationResult.separation`: the paper's claim (all points before the exit reach one optimum,
   all after it another), the measured crossing of the origin's stability boundary along the path, and the
   spreads of and distance between the two sides.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mclandscape.core._checks import integer, real
from mclandscape.core.objective import call_objective
from mclandscape.core.tree import (
    PyTree,
    tree_dot,
    tree_index,
    tree_norm,
    tree_random_normal,
    tree_ravel,
    tree_stack,
    tree_unstack,
)
from mclandscape.engine.points import map_points, stacked_points
from mclandscape.engine.step import merge_static, split_static
from mclandscape.methods.dsp_detector import Objective, _kind
from mclandscape.methods.dsp_step import _float_dtype
from mclandscape.methods.verification_result import (
    PARAM,
    EndPointClusters,
    FlowDiagnostics,
    FlowSettings,
    VerificationResult,
)

__all__ = ["verify_exit", "output_distance", "random_orthonormal_pair", "project"]

Distance = Callable[[PyTree, PyTree], float]
# ---------------------------------------------------------------------------------------------------------
# the flows: per-point functions mapped over the stacked points by the engine (map_points)
# ---------------------------------------------------------------------------------------------------------


def _loss_fn(objective_static, objective_arrays, batch):
    objective = merge_static(objective_static, objective_arrays)
    return lambda w: call_objective(objective, w, batch, None)[0]


@dataclasses.dataclass(frozen=True)
class _Flow:
    """``length`` gradient-descent steps ``w <- w - step_size * grad loss(w)`` from one point (hashable: the
    objective's configuration and the length are static, its arrays, the batch and the step are arguments)."""

    objective_static: Any
    length: int

    def __call__(self, w, objective_arrays, batch, step_size):
        loss = _loss_fn(self.objective_static, objective_arrays, batch)

        def step(w, _):
            return jax.tree_util.tree_map(lambda a, g: a - step_size.astype(a.dtype) * g, w, jax.grad(loss)(w)), None

        return jax.lax.scan(step, w, None, length=self.length)[0]


@dataclasses.dataclass(frozen=True)
class _LossAndGradNorm:
    """``w -> (loss, |grad|)`` of the objective on a fixed batch."""

    objective_static: Any

    def __call__(self, w, objective_arrays, batch):
        loss, g = jax.value_and_grad(_loss_fn(self.objective_static, objective_arrays, batch))(w)
        return loss, tree_norm(g)


@dataclasses.dataclass(frozen=True)
class _Polish:
    """L-BFGS (``optax.lbfgs``, zoom line search) from one point until its gradient norm is at most ``tol`` or
    ``max_iter`` iterations; returns the point and the iterations used."""

    objective_static: Any
    max_iter: int

    def __call__(self, w, objective_arrays, batch, tol):
        loss_fn = _loss_fn(self.objective_static, objective_arrays, batch)
        opt = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(loss_fn)
        gn0 = tree_norm(jax.grad(loss_fn)(w))

        def body(c):
            w, st, k, _ = c
            v, g = value_and_grad(w, state=st)
            u, st = opt.update(g, st, w, value=v, grad=g, value_fn=loss_fn)
            w = optax.apply_updates(w, u)
            return w, st, k + 1, tree_norm(jax.grad(loss_fn)(w)).astype(gn0.dtype)

        w, _, k, _ = jax.lax.while_loop(lambda c: (c[2] < self.max_iter) & (c[3] > tol), body,
                                        (w, opt.init(w), jnp.asarray(0), gn0))
        return w, k


def _mapped(fn, ws, *args):
    """``fn`` at every stacked point of ``ws``: one mapped evaluation of the engine (all points at once)."""
    return map_points(fn, stacked_points(ws), *args, strategy="vmap", devices=1)


def _clusters(dist: np.ndarray, far: np.ndarray, tol: float | None, name: str) -> EndPointClusters:
    """The end points with pairwise distances ``dist`` (index 0: the origin's) clustered greedily: point 0 founds
    cluster 0, every later point joins the first cluster whose founder lies within ``tol``, else founds a new one.
    The default ``tol`` is 1% of the largest distance ``far`` of a start point from the origin's end point (a
    scale that does not shrink when all end points coincide)."""
    floor = 1e-6 if name == PARAM else 1e-9
    tol = max(1e-2 * float(np.max(far)), floor) if tol is None else real(tol, f"tols[{name!r}]", low=0, low_open=True)
    founders, labels = [0], [0]
    for p in range(1, dist.shape[0]):
        near = [c for c, f in enumerate(founders) if dist[p, f] <= tol]
        if not near:
            founders.append(p)
        labels.append(near[0] if near else len(founders) - 1)
    return EndPointClusters(distances=dist, tol=tol, labels=labels[1:])


def _space_clusters(ends: list, starts: list, fn: Distance, tol: float | None, name: str) -> EndPointClusters:
    """:func:`_clusters` of the end points (host pytrees) under the distance ``fn``."""
    n = len(ends)
    dist = np.zeros((n, n))
    for j in range(n):
        for k in range(j + 1, n):
            dist[j, k] = dist[k, j] = float(fn(ends[j], ends[k]))
    return _clusters(dist, np.array([float(fn(starts[j], ends[0])) for j in range(1, n)]), tol, name)


def verify_exit(objective: Objective, origin: PyTree, path: Sequence[tuple[int, PyTree]], exit_iteration: int, *,
                batch: Any = None, flow: FlowSettings | None = None, num_points: int | None = None,
                distances: Mapping[str, Distance] | None = None,
                tols: Mapping[str, float] | None = None) -> VerificationResult:
    """Integrate gradient descent from points of a recorded search path and from the origin, and measure which
    optimum each reaches (DSP-TT paper, §5.1, Figure 3c: 50,000 steps of size 0.01, the defaults of
    :class:`~mclandscape.methods.verification_result.FlowSettings`).

    The flows are ``w <- w - step_size * grad loss(w)`` with ``loss(w)`` the value of ``objective(w, batch,
    None)`` (``batch`` fixed, e.g. the whole training set; no key: the flows are deterministic). They run in
    chunks of ``record_every`` steps (one trajectory point each) for at most ``steps`` steps and, with
    ``grad_tol``, stop as soon as every gradient norm is at most ``grad_tol``. Two further probe chunks
    (discarded) estimate how far each flow still had to go (:attr:`VerificationResult.settled`), which exposes a
    ``grad_tol`` too loose for a flat valley. ``polish_steps > 0`` finishes every flow with at most that many
    L-BFGS iterations until the gradient norm is at most ``polish_tol`` (a second-order polish of a point
    already inside a basin: it does not decide the basin, the flow does). Everything is computed in the
    parameters' dtype.

    Args:
      objective: ``objective(params, batch, key) -> (loss, aux)`` (:mod:`mclandscape.core.objective`).
      origin: the search's origin (the tier-0 solution).
      path: the recorded path, ``(iteration, d)`` pairs (points ``origin + d``;
        :attr:`mclandscape.methods.trusttech.TierResult.paths`).
      exit_iteration: the exit estimate splitting "before" from "after".
      batch: the fixed batch of the flows.
      flow: the flows' :class:`~mclandscape.methods.verification_result.FlowSettings` (``step_size``,
        ``steps``, ``record_every``, ``grad_tol``, ``polish_steps``, ``polish_tol``; ``None``: its defaults).
      num_points: evenly choose that many path points (``None``: all).
      distances: extra spaces ``{name: (p, q) -> float}`` in which to cluster the end points, e.g.
        ``{"symmetry": functools.partial(distance_modulo_permutation, spec, sign_flips=True)}`` or
        ``{"function": output_distance(outputs_fn)}``; ``"param"`` (Euclidean) is always measured.
      tols: clustering tolerance per space (default: 1% of the largest distance of a start point from the
        origin's end point in that space).

    Returns:
      A :class:`VerificationResult`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mclandscape.core.objective import function_objective
      >>> from mclandscape.methods.potentials import double_well
      >>> path = [(i, jnp.array([0.4 * i, 0.0])) for i in range(1, 5)]  # from (-1, 0) across the ridge x = 0
      >>> from mclandscape.methods.verification_result import FlowSettings
      >>> out = verify_exit(function_objective(double_well), jnp.array([-1.0, 0.0]), path, 3,
      ...                   flow=FlowSettings(step_size=0.05, steps=400, record_every=100))
      >>> out.basin, out.separates
      ([0, 0, 1, 1], True)
    """
    if len(path) == 0:
        raise ValueError("verify_exit needs a non-empty recorded path (DSPConfig.record_path > 0)")
    flow = FlowSettings() if flow is None else flow
    _kind(isinstance(flow, FlowSettings), "flow", "a FlowSettings", flow)
    _kind(callable(objective), "objective", "callable (params, batch, key) -> (loss, aux)", objective)
    distances, tols = _check_spaces(distances, tols)
    pts = list(path)
    if num_points is not None:
        integer(num_points, "num_points", low=1)
        sel = np.unique(np.linspace(0, len(pts) - 1, min(num_points, len(pts))).round().astype(int))
        pts = [pts[j] for j in sel]
    starts = tree_stack([origin] + [optax.tree.add(origin, d) for _, d in pts])
    static, arrays = split_static(objective)

    def measure(ws):
        return _mapped(_LossAndGradNorm(static), ws, arrays, batch)

    start_losses = measure(starts)[0]
    ws, snapshots, steps_run, remaining = _flows(static, arrays, batch, starts, flow, measure)
    flow_gnorms = np.asarray(measure(ws)[1], dtype=np.float64)
    polish_moves = polish_its = None
    if flow.polish_steps:
        before = _ravel(ws)
        ws, polish_its = _mapped(_Polish(static, flow.polish_steps), ws, arrays, batch,
                                 jnp.asarray(flow.polish_tol, _float_dtype(starts)))
        polish_moves = np.linalg.norm(_ravel(ws) - before, axis=1)
    losses, gnorms = (np.asarray(v, dtype=np.float64) for v in measure(ws))
    flat = _ravel(ws)
    dist = np.stack([np.linalg.norm(flat - row, axis=1) for row in flat])
    far = np.linalg.norm(_ravel(starts)[1:] - flat[0], axis=1)
    ends, host_starts = tree_unstack(jax.device_get(ws)), tree_unstack(jax.device_get(starts))
    spaces = {PARAM: _clusters(dist, far, tols.get(PARAM), PARAM)} | {
        name: _space_clusters(ends, host_starts, fn, tols.get(name), name) for name, fn in distances.items()}
    rest = functools.partial(tree_index, i=slice(1, None))  # the path's points (index 0: the origin)
    trajs = jax.tree_util.tree_map(lambda *xs: np.stack(xs, axis=1), *snapshots)
    polish = (polish_moves, None if polish_its is None else np.asarray(polish_its))
    return VerificationResult(
        iterations=[int(i) for i, _ in pts], exit_iteration=int(exit_iteration), starts=rest(starts),
        finals=rest(ws), trajectories=rest(trajs), origin_final=tree_index(ws, 0),
        start_losses=rest(np.asarray(start_losses, dtype=np.float64)), final_losses=rest(losses),
        grad_norms=rest(gnorms), origin_loss=float(losses[0]), origin_grad_norm=float(gnorms[0]),
        steps_run=steps_run, flow=flow, diagnostics=FlowDiagnostics(*rest((remaining, flow_gnorms, *polish))),
        spaces=spaces)


def _check_spaces(distances, tols) -> tuple[dict, dict]:
    distances, tols = dict(distances or {}), dict(tols or {})
    if PARAM in distances:
        raise ValueError(f"distances: {PARAM!r} is the built-in Euclidean space; name your distance otherwise")
    for name, fn in distances.items():
        _kind(callable(fn), f"distances[{name!r}]", "a callable (p, q) -> float", fn)
    unknown = set(tols) - set(distances) - {PARAM}
    if unknown:
        raise ValueError(f"tols names spaces that are not measured: {sorted(unknown)} (spaces: "
                         f"{[PARAM, *distances]})")
    return distances, tols


def _ravel(ws) -> np.ndarray:
    """Stacked points as rows of float64 numbers."""
    return np.asarray(jax.vmap(lambda w: tree_ravel(w)[0])(ws), dtype=np.float64)


def _flows(static, arrays, batch, starts, flow: FlowSettings, measure):
    """The flows in chunks of ``record_every`` steps until every gradient norm is at most ``grad_tol`` (or
    ``steps``), and the geometric-series estimate of the distance each still had to go: two further probe
    chunks (not kept) measure the movements ``m_prev``, ``m`` of the slowest surviving mode, ``m r / (1 - r)``
    with ``r = m / m_prev``."""
    lr = jnp.asarray(flow.step_size, _float_dtype(starts))

    def chunk(ws):
        return _mapped(_Flow(static, flow.record_every), ws, arrays, batch, lr)

    ws, snapshots, steps_run = starts, [], 0
    while steps_run < flow.steps:
        ws = chunk(ws)
        steps_run += flow.record_every
        snapshots.append(ws)
        if flow.grad_tol is not None and float(np.max(measure(ws)[1])) <= flow.grad_tol:
            break
    probe1 = chunk(ws)
    hist = [_ravel(w) for w in (ws, probe1, chunk(probe1))]
    m_prev = np.linalg.norm(hist[1] - hist[0], axis=1)
    m = np.linalg.norm(hist[2] - hist[1], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(m_prev > 0, m / m_prev, np.where(m > 0, np.inf, 0.0))
        remaining = np.where(r < 1.0, m * r / (1.0 - r), np.inf)
    return ws, snapshots, steps_run, np.where(m == 0.0, 0.0, remaining)


# the outputs of a network at one point: one module-level jit, keyed by the function (compiled once per function)
_apply = jax.jit(lambda fn, w: fn(w), static_argnums=0)


def output_distance(outputs_fn: Callable[[PyTree], jax.Array]) -> Distance:
    """A function-space distance: the root-mean-square difference of two networks' outputs.

    Args:
      outputs_fn: ``params -> array`` (e.g. the network's outputs on the training inputs).

    Returns:
      ``(p, q) -> float``, ``sqrt(mean((outputs_fn(p) - outputs_fn(q))^2))`` (computed in float64 on the host).

    Example:
      >>> import jax.numpy as jnp
      >>> d = output_distance(lambda p: p["a"] * jnp.tanh(p["b"] * jnp.linspace(-1.0, 1.0, 5)))
      >>> d({"a": 1.0, "b": 2.0}, {"a": -1.0, "b": -2.0})  # a sign-flipped copy computes the same function
      0.0
    """
    _kind(callable(outputs_fn), "outputs_fn", "a callable params -> array", outputs_fn)

    def distance(p: PyTree, q: PyTree) -> float:
        a, b = (np.asarray(_apply(outputs_fn, w), np.float64) for w in (p, q))
        return float(np.sqrt(np.mean((a - b) ** 2)))

    return distance


def random_orthonormal_pair(key: jax.Array, like: PyTree) -> tuple[PyTree, PyTree]:
    """Two random orthonormal directions shaped like ``like`` (Gram-Schmidt of two normal draws).

    Args:
      key: a PRNG key.
      like: the pytree whose structure, shapes and dtypes the directions take.

    Returns:
      ``(u, v)`` with ``|u| = |v| = 1`` and ``<u, v> = 0``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> u, v = random_orthonormal_pair(jax.random.key(0), {"w": jnp.zeros(5)})
      >>> abs(float(tree_dot(u, v))) < 1e-6, round(float(tree_norm(u)), 6)
      (True, 1.0)
    """
    k1, k2 = jax.random.split(key)
    u = tree_random_normal(k1, like)
    u = optax.tree.scale(1.0 / tree_norm(u), u)
    v = tree_random_normal(k2, like)
    v = optax.tree.add_scale(v, -tree_dot(u, v), u)
    return u, optax.tree.scale(1.0 / tree_norm(v), v)


def project(points: PyTree, origin: PyTree, basis: tuple[PyTree, PyTree], *, leading: int = 1) -> np.ndarray:
    """Coordinates ``(<p - origin, u>, <p - origin, v>)`` of stacked points.

    Args:
      points: a pytree with ``leading`` stacking axes (e.g. ``[P, T, ...]`` trajectories with ``leading=2``).
      origin: the centre.
      basis: ``(u, v)``, e.g. :func:`random_orthonormal_pair`.
      leading: the number of stacking axes.

    Returns:
      An array ``[*stack, 2]``.

    Example:
      >>> import jax.numpy as jnp
      >>> project(jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.zeros(2), (jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])))
      array([[1., 2.],
             [3., 4.]], dtype=float32)
    """
    u, v = basis

    def one(p):
        diff = optax.tree.sub(p, origin)
        return jnp.stack([tree_dot(diff, u), tree_dot(diff, v)])

    fn = one
    for _ in range(leading):
        fn = jax.vmap(fn)
    return np.asarray(fn(points))
