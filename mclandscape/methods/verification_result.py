"""What an exit-point verification measured (DSP-TT paper, §5.1, Figure 3c): the flows' settings and
diagnostics, the clusters of their end points, and the separation of the points before and after the exit.

:func:`mclandscape.methods.verification.verify_exit` runs the flows and returns a :class:`VerificationResult`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from mclandscape.core._checks import integer, real
from mclandscape.core.tree import PyTree

__all__ = ["FlowSettings", "FlowDiagnostics", "EndPointClusters", "VerificationResult", "PARAM"]

PARAM = "param"


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
        real(self.step_size, "step_size", low=0.0, low_open=True)
        if integer(self.steps, "steps", low=1) % integer(self.record_every, "record_every", low=1):
            raise ValueError(f"steps ({self.steps}) must be a multiple of record_every ({self.record_every})")
        if self.grad_tol is not None:
            real(self.grad_tol, "grad_tol", low=0.0, low_open=True)
        integer(self.polish_steps, "polish_steps", low=0)
        real(self.polish_tol, "polish_tol", low=0.0, low_open=True)


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


def _two_sides(dist: np.ndarray, b: list[int], a: list[int]) -> dict:
    """Spreads of two groups of end points, the smallest distance between them and ``ratio = between /
    max(spreads)`` (``inf`` when both spreads are 0; ``between`` and ``ratio`` ``None`` if a group is empty)."""
    sb, sa = (float(dist[np.ix_(g, g)].max()) if len(g) > 1 else 0.0 for g in (b, a))
    between = float(dist[np.ix_(b, a)].min()) if b and a else None
    spread = max(sb, sa)
    ratio = None if between is None else (float("inf") if spread == 0 else between / spread)
    return {"before_spread": sb, "after_spread": sa, "between": between, "ratio": ratio}


def _floats(xs, kind=float) -> list | None:
    return None if xs is None else [kind(v) for v in xs]


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
    def converged(self) -> list[bool] | None:
        """``grad_norms[p] <= flow.grad_tol`` per end point (``None`` without ``grad_tol``)."""
        gt = self.flow.grad_tol
        return None if gt is None else [bool(g <= gt) for g in self.grad_norms]

    @property
    def flow_settled(self) -> list[bool]:
        """Whether the gradient-descent flow alone had settled (before any polish): its gradient norm at most
        ``grad_tol`` (when given) and its remaining-distance estimate at most the parameter-space tolerance."""
        gt, tol = self.flow.grad_tol, self.spaces[PARAM].tol
        return [bool(r <= tol and (gt is None or g <= gt))
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
        labels, dist, its, n = cl.labels, cl.distances[1:, 1:], self.iterations, len(self.iterations)
        split = self.exit_iteration if at is None else int(at)
        b, a = [p for p in range(n) if its[p] < split], [p for p in range(n) if its[p] >= split]
        lb, la = sorted({labels[p] for p in b}), sorted({labels[p] for p in a})
        outs = [p for p in range(n - 1) if labels[p] == 0 and labels[p + 1] != 0]
        p = outs[-1] if outs else None  # the last crossing out of the origin's cluster
        at_boundary = p is not None and set(labels[:p + 1]) == {0} and len(set(labels[p + 1:])) == 1
        return {
            "space": space, "before_clusters": lb, "after_clusters": la, **_two_sides(dist, b, a),
            "separates": bool(len(lb) == 1 and len(la) == 1 and lb != la),
            "disjoint": bool(b and a and not set(lb) & set(la)),
            "leaves_origin": bool(b and a and lb == [0] and 0 not in la),
            "transitions": [(its[q], its[q + 1]) for q in range(n - 1) if labels[q] != labels[q + 1]],
            "boundary": None if p is None else (its[p], its[p + 1]),
            "boundary_offset": None if p is None else 0.5 * (its[p] + its[p + 1]) - split,
            "separates_at_boundary": at_boundary,
            "boundary_groups": None if p is None else _two_sides(dist, list(range(p + 1)), list(range(p + 1, n))),
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
        out = {"iterations": list(self.iterations), "before_exit": self.before, "exit_iteration": self.exit_iteration,
               "step_size": f.step_size, "steps_run": self.steps_run, "grad_tol": f.grad_tol}
        out |= {name: _floats(getattr(self, name)) for name in ("start_losses", "final_losses", "grad_norms")}
        out |= {"converged": self.converged, "origin_loss": self.origin_loss, "origin_grad_norm": self.origin_grad_norm}
        for name, cl in self.spaces.items():
            prefix = "" if name == PARAM else f"{name}_"
            out.update({f"{prefix}tol": cl.tol, f"{prefix}basin": list(cl.labels),
                        f"{prefix}distance_to_origin_optimum": _floats(cl.to_origin),
                        f"separation_{name}": self.separation(name)})
        out.update({"settled": self.settled, "flow_settled": self.flow_settled,
                    "flow_remaining": _floats(d.remaining), "flow_grad_norms": _floats(d.grad_norms),
                    "polish_tol": f.polish_tol if f.polish_steps else None, "polish_moves": _floats(d.polish_moves),
                    "polish_iterations": _floats(d.polish_iterations, int)})
        return out
