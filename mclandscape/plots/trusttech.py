"""Figures of DSP-TT searches (seed 004 Figure 3): the loss along a search path with its exit point, and the
exit-point verification projected onto two random orthogonal directions. Matplotlib with the Agg backend."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from mclandscape.core.tree import PyTree
from mclandscape.methods.trusttech import ExitRecord, VerificationResult, project
from mclandscape.plots._figure import subplots

__all__ = ["plot_search_trace", "plot_verification"]


def plot_search_trace(trace: dict, path: str, *, exit: ExitRecord | None = None,
                      extra: dict[str, tuple[Sequence[int], Sequence[float]]] | None = None,
                      title: str = "DSP-TT search", ylabel: str = "loss") -> str:
    """Loss along one search path (seed 004 Figure 3a/b): mini-batch losses, their moving average, the EMA
    peak (boundary-crossing estimate) and the exit point where the detector fired. ``trace`` is one entry of
    :attr:`TierResult.traces`; ``extra`` maps labels to ``(iterations, values)`` curves (e.g. the full
    training and test loss evaluated along the path). Writes ``path`` and returns it."""
    it = np.asarray(trace["iteration"])
    if it.size == 0:
        raise ValueError("the trace is empty: the direction was never advanced")
    fig, ax = subplots(figsize=(6.4, 4.0))
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
    fig.savefig(path, dpi=130)
    return path


def plot_verification(result: VerificationResult, origin: PyTree, basis: tuple[PyTree, PyTree], path: str, *,
                      exit_point: PyTree | None = None, title: str = "Exit-point verification",
                      split_at: int | None = None) -> str:
    """Seed 004 Figure 3c: gradient-descent trajectories from path points before (red) and after (blue) the
    exit, projected onto the two orthonormal directions ``basis`` around ``origin``; circles mark starts,
    stars end points (labelled with the optimum they reached: :attr:`VerificationResult.function_basin` when
    measured, else :attr:`VerificationResult.basin`; :attr:`VerificationResult.symmetry_basin` first when
    measured; 0 is the origin's optimum), ``X`` the exit point and a
    square the tier-0 solution. "Before" is :attr:`VerificationResult.before` (the exit estimate), or, with
    ``split_at``, path iterations ``< split_at`` (e.g. the measured crossing of the origin's stability
    boundary), which must leave sampled points on both sides. Writes ``path``."""
    its = list(result.iterations)
    if split_at is None:
        before_flags, names = list(result.before), ("before exit", "after exit")
    else:
        if not any(i < split_at for i in its) or not any(i >= split_at for i in its):
            raise ValueError(f"split_at={split_at} leaves no sampled point on one side (iterations "
                             f"{its[0]}..{its[-1]})")
        before_flags = [i < split_at for i in its]
        names = (f"before iteration {split_at}", f"from iteration {split_at}")
    traj = project(result.trajectories, origin, basis, leading=2)  # [P, T, 2]
    starts = project(result.starts, origin, basis, leading=1)  # [P, 2]
    finals = project(result.finals, origin, basis, leading=1)
    if result.symmetry_basin is not None:
        labels, space = result.symmetry_basin, "modulo symmetries"
    elif result.function_basin is not None:
        labels, space = result.function_basin, "function space"
    else:
        labels, space = result.basin, "parameter space"
    scale = max(float(np.ptp(traj[..., 0])), float(np.ptp(traj[..., 1])), 1e-12)
    fig, ax = subplots(figsize=(5.6, 5.0))
    ax.plot(starts[:, 0], starts[:, 1], color="0.4", lw=0.8, ls="--", label="search path")
    seen = set()
    for p in range(traj.shape[0]):
        before = before_flags[p]
        color = "C3" if before else "C0"
        label = names[0] if before else names[1]
        xs = np.concatenate([starts[p, :1], traj[p, :, 0]])
        ys = np.concatenate([starts[p, 1:], traj[p, :, 1]])
        ax.plot(xs, ys, color=color, lw=0.9, alpha=0.8, label=None if label in seen else label)
        seen.add(label)
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
    ax.text(0.01, 0.01, f"star labels: optimum reached ({space}; 0 = the origin's)", transform=ax.transAxes,
            fontsize=7, color="0.3")
    ax.set_xlabel("random direction 1")
    ax.set_ylabel("random direction 2")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return path

