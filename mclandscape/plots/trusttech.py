"""Figures of DSP-TT searches (the DSP-TT paper, Anonymous, 2020, 'Constructing multiple high-quality deep neural
networks: a TRUST-TECH based approach', ICLR 2021 submission, Figure 3): the loss along a search path with its
exit point, and the exit-point verification flows projected onto two random orthogonal directions.

Every function draws into ``ax`` when given (and returns ``ax.figure``), else into a new Agg figure, and
returns the ``Figure``; save it with :func:`mclandscape.plots._figure.save`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from matplotlib.figure import Figure

from mclandscape.core.tree import PyTree
from mclandscape.methods.dsp_detector import ExitRecord
from mclandscape.methods.verification import project
from mclandscape.methods.verification_result import VerificationResult
from mclandscape.plots._figure import figure_and_axes

__all__ = ["plot_search_trace", "plot_verification"]


def plot_search_trace(trace: dict, *, exit: ExitRecord | None = None,
                      extra: dict[str, tuple[Sequence[int], Sequence[float]]] | None = None, ax=None,
                      title: str = "loss along a DSP-TT search path", ylabel: str = "loss") -> Figure:
    """The loss along one search path (DSP-TT paper, Figure 3a/b).

    Mini-batch losses, their moving average, the EMA peak (the boundary-crossing estimate) and the exit point
    where the detector fired.

    Args:
      trace: one entry of :attr:`mclandscape.methods.trusttech.TierResult.traces` (``iteration``, ``loss``,
        ``ema``).
      exit: the direction's :class:`~mclandscape.methods.trusttech.ExitRecord` (marks the EMA peak and the exit).
      extra: more curves ``{label: (iterations, values)}`` (e.g. the full training and test loss along the path).
      ax: draw into these axes (default: a new figure).
      title: the axes title.
      ylabel: the y-axis label.

    Returns:
      The ``Figure``.

    Example:
      >>> fig = plot_search_trace({"iteration": [1, 2, 3], "loss": [0.1, 0.5, 0.2], "ema": [0.1, 0.3, 0.25]})
      >>> len(fig.axes), fig.axes[0].get_title()
      (1, 'loss along a DSP-TT search path')
    """
    it = np.asarray(trace["iteration"])
    if it.size == 0:
        raise ValueError("the trace is empty: the direction was never advanced")
    fig, ax = figure_and_axes(ax, figsize=(6.4, 4.0), name="plot_search_trace")
    ax.plot(it, trace["loss"], color="0.7", lw=0.8, label="mini-batch loss")
    ax.plot(it, trace["ema"], color="C0", lw=1.8, label="moving average")
    for k, (label, (xs, ys)) in enumerate((extra or {}).items()):
        ax.plot(xs, ys, color=f"C{k + 2}", lw=1.5, marker=".", ms=3, label=label)
    if exit is not None:
        ax.axvline(exit.peak_iteration, color="C1", ls=":", lw=1.2, label=f"EMA peak (it {exit.peak_iteration})")
        ax.axvline(exit.iteration, color="C3", ls="--", lw=1.4, label=f"exit detected (it {exit.iteration})")
        ax.plot([exit.iteration], [exit.loss], "X", color="C3", ms=10)
    ax.set_xlabel("search iteration of this direction")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_verification(result: VerificationResult, origin: PyTree, basis: tuple[PyTree, PyTree], *,
                      exit_point: PyTree | None = None, split_at: int | None = None, space: str | None = None,
                      ax=None, title: str = "gradient-descent flows from points along the search path") -> Figure:
    """The exit-point verification (DSP-TT paper, Figure 3c): flows from path points before (red) and after (blue)
    the exit, projected onto two orthonormal directions around ``origin``.

    Circles mark start points, stars end points (labelled with the optimum they reached in ``space``; 0 is the
    origin's optimum), ``X`` the exit point and a square the tier-0 solution.

    Args:
      result: a :class:`~mclandscape.methods.verification.VerificationResult`.
      origin: the search's origin (the projection's centre).
      basis: two orthonormal directions ``(u, v)``
        (:func:`~mclandscape.methods.verification.random_orthonormal_pair`).
      exit_point: marks the exit point.
      split_at: "before" means path iterations ``< split_at`` (e.g. the measured crossing of the origin's
        stability boundary) instead of :attr:`VerificationResult.before`; it must leave sampled points on both
        sides.
      space: the clustering whose labels annotate the end points (default: the last space measured, e.g. the one
        modulo symmetries, else ``"param"``).
      ax: draw into these axes (default: a new figure).
      title: the axes title.

    Returns:
      The ``Figure``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mclandscape.core.objective import function_objective
      >>> from mclandscape.methods.potentials import double_well
      >>> from mclandscape.methods.verification import random_orthonormal_pair, verify_exit
      >>> o = jnp.array([-1.0, 0.0])
      >>> from mclandscape.methods.verification_result import FlowSettings
      >>> res = verify_exit(function_objective(double_well), o, [(i, jnp.array([0.5 * i, 0.1])) for i in (1, 3)],
      ...                   2, flow=FlowSettings(step_size=0.05, steps=100, record_every=50))
      >>> len(plot_verification(res, o, random_orthonormal_pair(jax.random.key(0), o)).axes)
      1
    """
    its = list(result.iterations)
    before_flags = [i < (result.exit_iteration if split_at is None else split_at) for i in its]
    names = ("before exit", "after exit") if split_at is None else (f"before iteration {split_at}",
                                                                    f"from iteration {split_at}")
    if split_at is not None and len(set(before_flags)) < 2:
        raise ValueError(f"split_at={split_at} leaves no sampled point on one side (iterations {its[0]}..{its[-1]})")
    space = list(result.spaces)[-1] if space is None else space
    labels = result.clusters(space).labels
    traj = project(result.trajectories, origin, basis, leading=2)  # [P, T, 2]
    starts = project(result.starts, origin, basis, leading=1)  # [P, 2]
    finals = project(result.finals, origin, basis, leading=1)
    scale = max(float(np.ptp(traj[..., 0])), float(np.ptp(traj[..., 1])), 1e-12)
    fig, ax = figure_and_axes(ax, figsize=(5.6, 5.0), name="plot_verification")
    ax.plot(starts[:, 0], starts[:, 1], color="0.4", lw=0.8, ls="--", label="search path")
    for p in range(traj.shape[0]):
        color, label = ("C3", names[0]) if before_flags[p] else ("C0", names[1])
        first = before_flags.index(before_flags[p]) == p  # one legend entry per side
        xy = np.concatenate([starts[p][None], traj[p]])  # the start point, then the flow's trajectory
        ax.plot(xy[:, 0], xy[:, 1], color=color, lw=0.9, alpha=0.8, label=label if first else None)
        ax.plot(starts[p, 0], starts[p, 1], "o", color=color, ms=4)
        ax.plot(finals[p, 0], finals[p, 1], "*", color=color, ms=11, mec="k", mew=0.5)
        if not any(labels[q] == labels[p] and np.linalg.norm(finals[q] - finals[p]) < 1e-3 * scale
                   for q in range(p)):
            ax.annotate(str(labels[p]), (finals[p, 0], finals[p, 1]), textcoords="offset points", xytext=(5, 5),
                        fontsize=8)
    ax.plot(0.0, 0.0, "s", color="k", ms=7, label="tier-0 solution")
    if exit_point is not None:
        ex = project(jax.tree_util.tree_map(lambda x: x[None], exit_point), origin, basis, leading=1)[0]
        ax.plot(ex[0], ex[1], "X", color="k", ms=12, label="exit point")
    ax.text(0.01, 0.01, f"star labels: optimum reached ({space} space; 0 = the origin's)", transform=ax.transAxes,
            fontsize=7, color="0.3")
    ax.set_xlabel("random direction 1")
    ax.set_ylabel("random direction 2")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
