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
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mclandscape.core.objective import call_objective
from mclandscape.core.tree import (
    PyTree,
    tree_add,
    tree_axpy,
    tree_dot,
    tree_index,
    tree_norm,
    tree_random_normal,
    tree_ravel,
    tree_scale,
    tree_stack,
    tree_sub,
    tree_unstack,
)
from mclandscape.engine.step import merge_static, split_static

__all__ = [
    "FlowSettings",
    "FlowDiagnostics",
    "EndPointClusters",
    "VerificationResult",
    "verify_exit",
    "output_distance",
    "random_orthonormal_pair",
    "project",
]

Objective = Callable[[PyTree, Any, jax.Array | None], tuple[jax.Array, Any]]
Distance = Callable[[PyTree, PyTree], float]
PARAM = "param"


def _check_real(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a real number, got {value!r}") from e
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class FlowSettings:
    """How the verification flows ran (the arguments of :func:`verify_exit` that shape them).

    Attributes:
      step_size: the gradient-descent step.
      steps: the most steps per flow (a multiple of ``record_every``).
      record_every: steps per chunk (one trajectory point each).
      grad_tol: the flows stop once every gradient norm is at most this (``None``: all ``steps``).
      polish_steps: L-BFGS iterations finishing every flow (0: none).
      polish_tol: the gradient norm that ends the polish.
    """

    step_size: float = 0.01
    steps: int = 50_000
    record_every: int = 500
    grad_tol: float | None = None
    polish_steps: int = 0
    polish_tol: float = 1e-6

    def __post_init__(self):
        if _check_real(self.step_size, "step_size") <= 0:
            raise ValueError(f"step_size must be > 0, got {self.step_size}")
        _check_int(self.steps, "steps", 1)
        _check_int(self.record_every, "record_every", 1)
        if self.steps % self.record_every:
            raise ValueError(f"steps ({self.steps}) must be a multiple of record_every ({self.record_every})")
        if self.grad_tol is not None and _check_real(self.grad_tol, "grad_tol") <= 0:
            raise ValueError(f"grad_tol must be > 0 or None, got {self.grad_tol}")
        _check_int(self.polish_steps, "polish_steps", 0)
        if _check_real(self.polish_tol, "polish_tol") <= 0:
            raise ValueError(f"polish_tol must be > 0, got {self.polish_tol}")


@dataclasses.dataclass(frozen=True)
class FlowDiagnostics:
    """Per start point (arrays ``[P]``): ``remaining`` — the geometric-series estimate of the distance the flow
    still had to go when it stopped (``inf`` when it was not slowing down); ``grad_norms`` — the gradient norm
    at the flow's end (before any polish); ``polish_moves`` / ``polish_iterations`` — how far the L-BFGS polish
    moved each point and in how many iterations (``None`` without a polish)."""

    remaining: np.ndarray
    grad_norms: np.ndarray
    polish_moves: np.ndarray | None = None
    polish_iterations: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class EndPointClusters:
    """End points grouped into optima under one distance.

    Attributes:
      distances: ``[P + 1, P + 1]`` distances between end points (index 0: the origin's end point, index
        ``p + 1``: start point ``p``).
      tol: end points closer than this are one optimum.
      labels: ``[P]`` the optimum of each start point's end point (0: the origin's; others numbered in path
        order).
    """

    distances: np.ndarray
    tol: float
    labels: list[int]

    @property
    def to_origin(self) -> np.ndarray:
        """``[P]`` distances of the end points from the origin's end point."""
        return self.distances[0, 1:]


def _leader_clusters(dist: np.ndarray, tol: float) -> list[int]:
    """Greedy clustering of points ``0..n-1`` given their distance matrix: point 0 founds cluster 0, every
    later point joins the first cluster whose founder lies within ``tol``, else founds a new cluster."""
    founders: list[int] = [0]
    labels = [0]
    for p in range(1, dist.shape[0]):
        for c, f in enumerate(founders):
            if dist[p, f] <= tol:
                labels.append(c)
                break
        else:
            founders.append(p)
            labels.append(len(founders) - 1)
    return labels


def _pairwise(rows: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of ``rows``, one row at a time (memory: one copy of ``rows``)."""
    out = np.empty((rows.shape[0], rows.shape[0]))
    for p in range(rows.shape[0]):
        out[p] = np.sqrt(np.sum((rows - rows[p]) ** 2, axis=1))
    return out


def _max_pairwise(dist: np.ndarray, idx: list[int]) -> float:
    if len(idx) < 2:
        return 0.0
    return float(dist[np.ix_(idx, idx)].max())


def _two_sides(dist: np.ndarray, b: list[int], a: list[int]) -> dict:
    """Spreads of two groups of end points, the smallest distance between them and ``ratio = between /
    max(spreads)`` (``inf`` when both spreads are 0; ``between`` and ``ratio`` ``None`` if a group is empty)."""
    sb, sa = _max_pairwise(dist, b), _max_pairwise(dist, a)
    between = float(dist[np.ix_(b, a)].min()) if b and a else None
    spread = max(sb, sa)
    ratio = None if between is None else (float("inf") if spread == 0 else between / spread)
    return {"before_spread": sb, "after_spread": sa, "between": between, "ratio": ratio}


def _floats(xs) -> list[float] | None:
    return None if xs is None else [float(v) for v in xs]


@dataclasses.dataclass(frozen=True)
class VerificationResult:
    """Gradient-descent flows from points along a search path near its exit (DSP-TT paper, §5.1, Figure 3c).

    Per start point ``p`` (in path order): ``iterations[p]`` (its path iteration), ``start_losses[p]``,
    ``final_losses[p]`` and ``grad_norms[p]`` (loss and gradient norm at its end point). ``starts`` /
    ``finals`` are the stacked start and end points (leaves ``[P, ...]``), ``trajectories`` the points every
    ``flow.record_every`` steps (leaves ``[P, T, ...]``, ``T = steps_run / record_every``). The origin is
    integrated too: ``origin_final``, ``origin_loss``, ``origin_grad_norm``. ``spaces`` maps each space
    (``"param"`` and those given to :func:`verify_exit`) to its :class:`EndPointClusters`.

    Attributes:
      iterations: path iteration of each start point.
      exit_iteration: the exit estimate; points with an iteration below it are "before" (:attr:`before`).
      starts, finals, trajectories: stacked start points, end points and trajectories.
      origin_final: the origin's end point.
      start_losses, final_losses, grad_norms: ``[P]`` arrays.
      origin_loss, origin_grad_norm: at the origin's end point.
      steps_run: gradient-descent steps run per flow.
      flow: the :class:`FlowSettings`.
      diagnostics: the :class:`FlowDiagnostics`.
      spaces: ``{space: EndPointClusters}``.
    """

    iterations: list[int]
    exit_iteration: int
    starts: PyTree
    finals: PyTree
    trajectories: PyTree
    origin_final: PyTree
    start_losses: np.ndarray
    final_losses: np.ndarray
    grad_norms: np.ndarray
    origin_loss: float
    origin_grad_norm: float
    steps_run: int
    flow: FlowSettings
    diagnostics: FlowDiagnostics
    spaces: Mapping[str, EndPointClusters]

    @property
    def before(self) -> list[bool]:
        """Whether each start point precedes the exit estimate (``iterations[p] < exit_iteration``)."""
        return [i < self.exit_iteration for i in self.iterations]

    def clusters(self, space: str = PARAM) -> EndPointClusters:
        """The :class:`EndPointClusters` of ``space`` (a clear error naming the spaces measured)."""
        if space not in self.spaces:
            raise ValueError(f"space must be one of the spaces measured {sorted(self.spaces)}, got {space!r} "
                             "(add it with verify_exit(..., distances={name: fn}))")
        return self.spaces[space]

    @property
    def basin(self) -> list[int]:
        """The optimum of each end point in parameter space (``clusters("param").labels``)."""
        return self.spaces[PARAM].labels

    @property
    def distances(self) -> np.ndarray:
        """``[P + 1, P + 1]`` Euclidean parameter distances between end points (index 0: the origin's)."""
        return self.spaces[PARAM].distances

    @property
    def tol(self) -> float:
        """The parameter-space clustering tolerance."""
        return self.spaces[PARAM].tol

    @property
    def converged(self) -> list[bool] | None:
        """``grad_norms[p] <= flow.grad_tol`` per end point (``None`` without ``grad_tol``)."""
        if self.flow.grad_tol is None:
            return None
        return [bool(g <= self.flow.grad_tol) for g in self.grad_norms]

    @property
    def flow_settled(self) -> list[bool]:
        """Whether the gradient-descent flow alone had settled (before any polish): its gradient norm at most
        ``grad_tol`` (when given) and its remaining-distance estimate at most :attr:`tol`."""
        gt = self.flow.grad_tol
        return [bool(r <= self.tol and (gt is None or g <= gt))
                for r, g in zip(self.diagnostics.remaining, self.diagnostics.grad_norms, strict=True)]

    @property
    def settled(self) -> list[bool]:
        """Whether each end point has really stopped, judged by the gradient norm *and* by the distance the
        integration still had to go, so that a loose ``grad_tol`` on a flat valley is not taken for
        convergence.

        Without a polish: :attr:`flow_settled` — the remaining distance is the geometric-series estimate
        ``m r / (1 - r)`` from the movements ``m_prev``, ``m`` over two further probe chunks of
        ``record_every`` steps run from the end points and discarded (``r = m / m_prev``). With the L-BFGS
        polish: the polish reached ``polish_tol`` (its end points are then fixed points up to float precision,
        whatever the flow left undone — ``diagnostics.polish_moves`` says how much that was)."""
        if self.flow.polish_steps:
            return [bool(g <= self.flow.polish_tol) for g in self.grad_norms]
        return self.flow_settled

    def separation(self, space: str = PARAM, at: int | None = None) -> dict:
        """Measured separation of the end points of the points before and after the exit estimate.

        Args:
          space: the clustering to use (``"param"`` or a space given to :func:`verify_exit`).
          at: another split iteration instead of ``exit_iteration`` (e.g. where the detector fired); points with
            an iteration ``< at`` are "before".

        Returns:
          A JSON-serialisable dict: ``before_clusters`` / ``after_clusters`` (the optima reached from each side,
          0 = the origin's); ``before_spread`` / ``after_spread`` (the largest distance between two end points
          of one side); ``between`` (the smallest distance between the sides); ``ratio = between /
          max(spreads)``; ``separates`` (the paper's claim: all points before reach one optimum, all after
          another); ``disjoint`` (no optimum reached from both sides); ``leaves_origin`` (the points before
          reach the origin's optimum and none after does); ``transitions`` (consecutive sampled iterations
          whose end points differ); ``boundary`` (the last transition out of the origin's cluster: the measured
          crossing of its stability boundary, ``None`` if there is none) with ``boundary_offset`` (its midpoint
          minus the split), ``separates_at_boundary`` and ``boundary_groups`` (spreads and ``between`` for the
          two sides of that crossing); ``num_optima``; ``two_optima`` (exactly two, split at the crossing);
          ``all_settled`` (every end point :attr:`settled`); ``split_iteration`` and ``space``.
        """
        cl = self.clusters(space)
        labels, dist = cl.labels, cl.distances[1:, 1:]
        split = self.exit_iteration if at is None else int(at)
        before = [i < split for i in self.iterations]
        b = [p for p, bf in enumerate(before) if bf]
        a = [p for p, bf in enumerate(before) if not bf]
        lb, la = sorted({labels[p] for p in b}), sorted({labels[p] for p in a})
        sides = _two_sides(dist, b, a)
        its = self.iterations
        transitions = [(its[p], its[p + 1]) for p in range(len(its) - 1) if labels[p] != labels[p + 1]]
        boundary = offset = groups = None
        at_boundary = False
        outs = [p for p in range(len(its) - 1) if labels[p] == 0 and labels[p + 1] != 0]
        if outs:
            p = outs[-1]
            boundary = (its[p], its[p + 1])
            offset = 0.5 * (its[p] + its[p + 1]) - split
            at_boundary = all(lab == 0 for lab in labels[:p + 1]) and len(set(labels[p + 1:])) == 1
            groups = _two_sides(dist, list(range(p + 1)), list(range(p + 1, len(its))))
        return {
            "space": space, "before_clusters": lb, "after_clusters": la, **sides,
            "separates": bool(len(lb) == 1 and len(la) == 1 and lb != la),
            "disjoint": bool(b and a and not set(lb) & set(la)),
            "leaves_origin": bool(b and a and lb == [0] and 0 not in la),
            "transitions": transitions, "boundary": boundary, "boundary_offset": offset,
            "separates_at_boundary": bool(at_boundary), "boundary_groups": groups,
            "split_iteration": split, "num_optima": len(set(labels)),
            "two_optima": bool(at_boundary and len(set(labels)) == 2), "all_settled": all(self.settled),
        }

    @property
    def separates(self) -> bool:
        """The paper's claim in parameter space: every point before the exit converges to one optimum and every
        point after it to another (:meth:`separation`)."""
        return self.separation(PARAM)["separates"]

    def summary(self) -> dict:
        """JSON-serialisable numbers of the verification: per-point values, flow settings and diagnostics, and
        per space its tolerance, labels, distances to the origin's optimum and :meth:`separation` (keys
        ``tol``, ``basin``, ``distance_to_origin_optimum``, ``separation_param`` for parameter space and
        ``<space>_tol``, ``<space>_basin``, ``<space>_distance_to_origin_optimum``, ``separation_<space>`` for
        the others)."""
        f, d = self.flow, self.diagnostics
        out = {
            "iterations": list(self.iterations), "before_exit": self.before,
            "exit_iteration": self.exit_iteration, "step_size": f.step_size, "steps_run": self.steps_run,
            "grad_tol": f.grad_tol, "start_losses": _floats(self.start_losses),
            "final_losses": _floats(self.final_losses), "grad_norms": _floats(self.grad_norms),
            "converged": self.converged, "origin_loss": self.origin_loss, "origin_grad_norm": self.origin_grad_norm,
        }
        for name, cl in self.spaces.items():
            prefix = "" if name == PARAM else f"{name}_"
            out.update({f"{prefix}tol": cl.tol, f"{prefix}basin": list(cl.labels),
                        f"{prefix}distance_to_origin_optimum": _floats(cl.to_origin),
                        f"separation_{name}": self.separation(name)})
        out.update({"settled": self.settled, "flow_settled": self.flow_settled,
                    "flow_remaining": _floats(d.remaining), "flow_grad_norms": _floats(d.grad_norms),
                    "polish_tol": f.polish_tol if f.polish_steps else None, "polish_moves": _floats(d.polish_moves),
                    "polish_iterations": None if d.polish_iterations is None
                    else [int(v) for v in d.polish_iterations]})
        return out


# ---------------------------------------------------------------------------------------------------------
# the flows: module-level jits (the objective's configuration static, its arrays traced)
# ---------------------------------------------------------------------------------------------------------


def _loss_fn(objective_static, objective_arrays, batch):
    objective = merge_static(objective_static, objective_arrays)
    return lambda w: call_objective(objective, w, batch, None)[0]


@functools.partial(jax.jit, static_argnames=("objective_static", "length"))
def _flow_chunk(objective_static, objective_arrays, ws, batch, step_size, length: int):
    """``length`` gradient-descent steps from every stacked point of ``ws``."""
    loss = _loss_fn(objective_static, objective_arrays, batch)

    def one(w):
        def step(w, _):
            return jax.tree_util.tree_map(lambda a, g: a - step_size.astype(a.dtype) * g, w, jax.grad(loss)(w)), None

        return jax.lax.scan(step, w, None, length=length)[0]

    return jax.vmap(one)(ws)


@functools.partial(jax.jit, static_argnames=("objective_static",))
def _measure(objective_static, objective_arrays, ws, batch):
    """Loss and gradient norm at every stacked point of ``ws``."""
    loss, g = jax.vmap(jax.value_and_grad(_loss_fn(objective_static, objective_arrays, batch)))(ws)
    return loss, jax.vmap(tree_norm)(g)


@functools.partial(jax.jit, static_argnames=("objective_static", "max_iter"))
def _lbfgs_polish(objective_static, objective_arrays, ws, batch, max_iter: int, tol):
    """L-BFGS (``optax.lbfgs``, zoom line search) from each stacked point of ``ws`` until its gradient norm is
    at most ``tol`` or ``max_iter`` iterations; returns the points and the iterations used per point."""
    loss_fn = _loss_fn(objective_static, objective_arrays, batch)
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss_fn)

    def one(w):
        def cond(c):
            _, _, k, gn = c
            return (k < max_iter) & (gn > tol)

        def body(c):
            w, st, k, _ = c
            v, g = value_and_grad(w, state=st)
            u, st = opt.update(g, st, w, value=v, grad=g, value_fn=loss_fn)
            w = optax.apply_updates(w, u)
            return w, st, k + 1, tree_norm(jax.grad(loss_fn)(w)).astype(gn0.dtype)

        gn0 = tree_norm(jax.grad(loss_fn)(w))
        w, _, k, _ = jax.lax.while_loop(cond, body, (w, opt.init(w), jnp.asarray(0), gn0))
        return w, k

    return jax.vmap(one)(ws)


def _float_dtype(tree: PyTree):
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    return jnp.result_type(*leaves) if leaves else jnp.result_type(float)


def _space_clusters(ends: list, starts: list, fn: Distance, tol: float | None, name: str) -> EndPointClusters:
    """Pairwise ``fn`` distances between the end points (host pytrees), clustered with ``tol`` (default: 1% of
    the largest distance of a start point from the origin's end point, a scale that does not shrink when all
    end points coincide)."""
    n = len(ends)
    dist = np.zeros((n, n))
    for j in range(n):
        for k in range(j + 1, n):
            dist[j, k] = dist[k, j] = float(fn(ends[j], ends[k]))
    if tol is None:
        far = max(float(fn(starts[j], ends[0])) for j in range(1, n))
        tol = max(1e-2 * far, 1e-9)
    elif _check_real(tol, f"tols[{name!r}]") <= 0:
        raise ValueError(f"tols[{name!r}] must be > 0, got {tol}")
    return EndPointClusters(distances=dist, tol=float(tol), labels=_leader_clusters(dist, float(tol))[1:])


def verify_exit(
    objective: Objective,
    origin: PyTree,
    path: Sequence[tuple[int, PyTree]],
    exit_iteration: int,
    *,
    batch: Any = None,
    step_size: float = 0.01,
    steps: int = 50_000,
    record_every: int = 500,
    num_points: int | None = None,
    grad_tol: float | None = None,
    polish_steps: int = 0,
    polish_tol: float = 1e-6,
    distances: Mapping[str, Distance] | None = None,
    tols: Mapping[str, float] | None = None,
) -> VerificationResult:
    """Integrate gradient descent from points of a recorded search path and from the origin, and measure which
    optimum each reaches (DSP-TT paper, §5.1, Figure 3c: 50,000 steps of size 0.01, the defaults).

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
      step_size, steps, record_every, grad_tol, polish_steps, polish_tol: the flows (:class:`FlowSettings`).
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
      >>> out = verify_exit(function_objective(double_well), jnp.array([-1.0, 0.0]), path, 3, step_size=0.05,
      ...                   steps=400, record_every=100)
      >>> out.basin, out.separates
      ([0, 0, 1, 1], True)
    """
    if len(path) == 0:
        raise ValueError("verify_exit needs a non-empty recorded path (DSPConfig.record_path > 0)")
    flow = FlowSettings(step_size=step_size, steps=steps, record_every=record_every, grad_tol=grad_tol,
                        polish_steps=polish_steps, polish_tol=polish_tol)
    if not callable(objective):
        raise ValueError(f"objective must be callable (params, batch, key) -> (loss, aux), got {objective!r}")
    distances = dict(distances or {})
    tols = dict(tols or {})
    if PARAM in distances:
        raise ValueError(f"distances: {PARAM!r} is the built-in Euclidean space; name your distance otherwise")
    for name, fn in distances.items():
        if not callable(fn):
            raise ValueError(f"distances[{name!r}] must be a callable (p, q) -> float, got {fn!r}")
    unknown = set(tols) - set(distances) - {PARAM}
    if unknown:
        raise ValueError(f"tols names spaces that are not measured: {sorted(unknown)} (spaces: "
                         f"{[PARAM, *distances]})")
    pts = list(path)
    if num_points is not None:
        _check_int(num_points, "num_points", 1)
        sel = np.unique(np.linspace(0, len(pts) - 1, min(num_points, len(pts))).round().astype(int))
        pts = [pts[j] for j in sel]
    iterations = [int(i) for i, _ in pts]
    starts = tree_stack([origin] + [tree_add(origin, d) for _, d in pts])
    static, arrays = split_static(objective)
    dtype = _float_dtype(starts)
    lr = jnp.asarray(flow.step_size, dtype)

    def chunk(ws):
        return _flow_chunk(static, arrays, ws, batch, lr, length=flow.record_every)

    def measure(ws):
        return _measure(static, arrays, ws, batch)

    start_losses, _ = measure(starts)
    ws, snapshots, steps_run = starts, [], 0
    while steps_run < flow.steps:
        ws = chunk(ws)
        steps_run += flow.record_every
        snapshots.append(ws)
        if flow.grad_tol is not None:
            _, gn = measure(ws)
            if float(jnp.max(gn)) <= flow.grad_tol:
                break
    ravel = jax.vmap(lambda w: tree_ravel(w)[0])
    # how far would the flow still go? Two further probe chunks (not kept) measure the movements m_prev, m of
    # the slowest surviving mode; geometric-series estimate m r / (1 - r), r = m / m_prev
    probe1 = chunk(ws)
    hist = [np.asarray(ravel(w), dtype=np.float64) for w in (ws, probe1, chunk(probe1))]
    m_prev = np.linalg.norm(hist[1] - hist[0], axis=1)
    m = np.linalg.norm(hist[2] - hist[1], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(m_prev > 0, m / m_prev, np.where(m > 0, np.inf, 0.0))
        remaining = np.where(r < 1.0, m * r / (1.0 - r), np.inf)
    remaining = np.where(m == 0.0, 0.0, remaining)
    flow_gnorms = np.asarray(measure(ws)[1], dtype=np.float64)
    polish_moves = polish_its = None
    if flow.polish_steps:
        ws, polish_its = _lbfgs_polish(static, arrays, ws, batch, max_iter=flow.polish_steps,
                                       tol=jnp.asarray(flow.polish_tol, dtype))
        polish_its = np.asarray(polish_its)
        polish_moves = np.linalg.norm(np.asarray(ravel(ws), dtype=np.float64) - hist[0], axis=1)
    losses, gnorms = (np.asarray(v, dtype=np.float64) for v in measure(ws))
    trajs = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs, axis=1), *snapshots)
    flat = np.asarray(ravel(ws), dtype=np.float64)
    dist = _pairwise(flat)
    tol = tols.get(PARAM)
    if tol is None:
        flat_starts = np.asarray(ravel(starts), dtype=np.float64)
        tol = max(1e-2 * float(np.linalg.norm(flat_starts[1:] - flat[0], axis=1).max()), 1e-6)
    elif _check_real(tol, "tols['param']") <= 0:
        raise ValueError(f"tols['param'] must be > 0, got {tol}")
    spaces = {PARAM: EndPointClusters(distances=dist, tol=float(tol), labels=_leader_clusters(dist, float(tol))[1:])}
    if distances:
        ends, host_starts = tree_unstack(jax.device_get(ws)), tree_unstack(jax.device_get(starts))
        for name, fn in distances.items():
            spaces[name] = _space_clusters(ends, host_starts, fn, tols.get(name), name)
    sl = slice(1, None)
    return VerificationResult(
        iterations=iterations, exit_iteration=int(exit_iteration), starts=tree_index(starts, sl),
        finals=tree_index(ws, sl), trajectories=tree_index(trajs, sl), origin_final=tree_index(ws, 0),
        start_losses=np.asarray(start_losses, dtype=np.float64)[1:], final_losses=losses[1:],
        grad_norms=gnorms[1:], origin_loss=float(losses[0]), origin_grad_norm=float(gnorms[0]),
        steps_run=steps_run, flow=flow,
        diagnostics=FlowDiagnostics(remaining=remaining[1:], grad_norms=flow_gnorms[1:],
                                    polish_moves=None if polish_moves is None else polish_moves[1:],
                                    polish_iterations=None if polish_its is None else polish_its[1:]),
        spaces=spaces)


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
    if not callable(outputs_fn):
        raise ValueError(f"outputs_fn must be a callable params -> array, got {outputs_fn!r}")
    fn = jax.jit(outputs_fn)

    def distance(p: PyTree, q: PyTree) -> float:
        a, b = np.asarray(fn(p), np.float64), np.asarray(fn(q), np.float64)
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
    u = tree_scale(u, 1.0 / tree_norm(u))
    v = tree_random_normal(k2, like)
    v = tree_axpy(-tree_dot(u, v), u, v)
    return u, tree_scale(v, 1.0 / tree_norm(v))


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
        diff = tree_sub(p, origin)
        return jnp.stack([tree_dot(diff, u), tree_dot(diff, v)])

    fn = one
    for _ in range(leading):
        fn = jax.vmap(fn)
    return np.asarray(fn(points))
