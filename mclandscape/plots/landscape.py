"""Figures of loss landscapes (Li et al. 2018 views, seed 003 Figs. 1, 4, 5, 7).

Matplotlib with the Agg backend (no display); every function writes one PNG and returns its path. Grids
``Z[A, B]`` are indexed ``[i_alpha, i_beta]`` over ``xs[A]`` (horizontal axis) and ``ys[B]`` (vertical).
Trajectories are ``[T, 2]`` arrays (or ``[N, T, 2]`` for N runs) in the same coordinates.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from mclandscape.plots._figure import color_cycle, new_figure, subplots

__all__ = ["contour_plot", "trajectory_panels", "surface_plot", "loss_curves_plot", "eigenvalue_plot"]


def _grid(xs, ys, Z) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xs = np.asarray(xs, np.float64).ravel()
    ys = np.asarray(ys, np.float64).ravel()
    Z = np.asarray(Z, np.float64)
    if Z.shape != (xs.size, ys.size):
        raise ValueError(f"Z must be [len(xs), len(ys)] = [{xs.size}, {ys.size}], got shape {Z.shape}")
    if xs.size < 2 or ys.size < 2:
        raise ValueError("a contour grid needs at least 2 values per axis")
    return xs, ys, Z


def _save(fig, path: str) -> str:
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _contour_on(ax, xs, ys, Z, *, levels: int, log: bool, title: str, cmap: str = "viridis"):
    data = Z.T
    if log:
        shift = 0.0 if np.nanmin(data) > 0 else -np.nanmin(data) + 1e-12
        data = np.log10(data + shift + 1e-12)
        label = "log10(loss)" if shift == 0.0 else f"log10(loss + {shift:.2g})"
    else:
        label = "loss"
    cs = ax.contourf(xs, ys, data, levels=levels, cmap=cmap)
    ax.contour(xs, ys, data, levels=levels, colors="k", linewidths=0.3, alpha=0.5)
    ax.set_title(title)
    return cs, label


def _traj_list(t) -> list[np.ndarray]:
    t = np.asarray(t, np.float64)
    if t.ndim == 2 and t.shape[1] == 2:
        return [t]
    if t.ndim == 3 and t.shape[2] == 2:
        return list(t)
    raise ValueError(f"a trajectory must be [T, 2] or [N, T, 2], got shape {t.shape}")


def _draw_trajectories(ax, trajectories: Mapping[str, object] | None):
    if not trajectories:
        return
    colors = color_cycle()
    for i, (name, t) in enumerate(trajectories.items()):
        c = ["tab:red", "tab:orange", "white", "tab:pink"][i % 4] if i < 4 else colors[i % len(colors)]
        for j, tr in enumerate(_traj_list(t)):
            ax.plot(tr[:, 0], tr[:, 1], "-", color=c, lw=1.0, alpha=0.9, label=name if j == 0 else None)
            ax.plot(tr[0, 0], tr[0, 1], "o", color=c, ms=4)
            ax.plot(tr[-1, 0], tr[-1, 1], "*sD^"[i % 4], color=c, ms=10 if i % 4 == 0 else 6, mec="k", mew=0.5)
    ax.legend(loc="best", fontsize=7)


def contour_plot(path: str, xs, ys, Z, *, title: str = "", xlabel: str = "alpha", ylabel: str = "beta",
                 levels: int = 30, log: bool = False, trajectories: Mapping[str, object] | None = None,
                 points: Mapping[str, Sequence[float]] | None = None) -> str:
    """Filled contour of ``Z`` with optional optimiser trajectories (start ``o``; end ``*``, ``s``, ``D``, ``^``
    for the 1st-4th series) and marked
    points (e.g. the trained model at the origin of a Li et al. plane)."""
    xs, ys, Z = _grid(xs, ys, Z)
    fig, ax = subplots(figsize=(5.2, 4.4))
    cs, label = _contour_on(ax, xs, ys, Z, levels=levels, log=log, title=title)
    fig.colorbar(cs, ax=ax, label=label)
    _draw_trajectories(ax, trajectories)
    for name, p in (points or {}).items():
        ax.plot([p[0]], [p[1]], "k+", ms=10, mew=2)
        ax.annotate(name, (p[0], p[1]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _save(fig, path)


def trajectory_panels(path: str, xs, ys, Z, panels: Mapping[str, Mapping[str, object]], *, log: bool = False,
                      levels: int = 30, xlabel: str = "p1", ylabel: str = "p2") -> str:
    """Side-by-side contours of one surface, each panel with its own trajectories (original vs deformed,
    seed 003 Figs. 1 and 7)."""
    xs, ys, Z = _grid(xs, ys, Z)
    if not panels:
        raise ValueError("trajectory_panels needs at least one panel")
    n = len(panels)
    fig, axes = subplots(1, n, figsize=(4.6 * n, 4.2), squeeze=False)
    for ax, (title, trajs) in zip(axes[0], panels.items(), strict=True):
        cs, label = _contour_on(ax, xs, ys, Z, levels=levels, log=log, title=title)
        _draw_trajectories(ax, trajs)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    fig.colorbar(cs, ax=list(axes[0]), label=label)
    return _save(fig, path)


def surface_plot(path: str, xs, ys, Z, *, title: str = "", xlabel: str = "alpha", ylabel: str = "beta",
                 zlabel: str = "loss", log: bool = False, trajectory=None) -> str:
    """3-D surface view of ``Z`` (optionally with one trajectory lifted onto the surface)."""
    xs, ys, Z = _grid(xs, ys, Z)
    fig = new_figure(figsize=(6, 4.8))
    ax = fig.add_subplot(111, projection="3d")
    data = np.log10(Z - min(0.0, Z.min()) + 1e-12) if log else Z
    X, Y = np.meshgrid(xs, ys, indexing="ij")
    ax.plot_surface(X, Y, data, cmap="viridis", linewidth=0, antialiased=True, alpha=0.9)
    if trajectory is not None:
        tr, tz = trajectory
        tr = np.asarray(tr, np.float64)
        tz = np.asarray(tz, np.float64)
        tz = np.log10(tz - min(0.0, Z.min()) + 1e-12) if log else tz
        ax.plot(tr[:, 0], tr[:, 1], tz, "r-", lw=1.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_zlabel(f"log10({zlabel})" if log else zlabel)
    ax.set_title(title)
    return _save(fig, path)


def loss_curves_plot(path: str, curves: Mapping[str, tuple[object, object]], *, title: str = "",
                     layout: str = "grid", ncols: int = 4, ylabel: str = "loss", log: bool = False) -> str:
    """1-D loss curves ``name -> (alphas, loss)`` around minima (seed 003 Fig. 5: one panel per VDM), in
    one axes (``layout="overlay"``) or one panel each with a shared y-axis (``"grid"``)."""
    if not curves:
        raise ValueError("loss_curves_plot needs at least one curve")
    if layout not in ("grid", "overlay"):
        raise ValueError(f"layout must be 'grid' or 'overlay', got {layout!r}")
    items = []
    for name, (a, l) in curves.items():
        a, l = np.asarray(a, np.float64).ravel(), np.asarray(l, np.float64).ravel()
        if a.shape != l.shape:
            raise ValueError(f"curve {name!r}: {a.size} alphas but {l.size} losses")
        items.append((name, a, l))
    if layout == "overlay":
        fig, ax = subplots(figsize=(5.5, 4))
        for name, a, l in items:
            ax.plot(a, l, label=name)
        ax.legend(fontsize=7)
        axes = [ax]
    else:
        n = len(items)
        cols = min(ncols, n)
        rows = -(-n // cols)
        fig, grid = subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
        axes = list(grid.ravel())
        for ax, (name, a, l) in zip(axes, items, strict=False):
            ax.plot(a, l, "b-")
            ax.set_title(name, fontsize=9)
        for ax in axes[n:]:
            ax.axis("off")
    for ax in axes:
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("alpha")
        ax.set_ylabel(ylabel)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def eigenvalue_plot(path: str, eigenvalues: Mapping[str, object], *, title: str = "") -> str:
    """Hessian eigenvalues at the end points of repeated runs (seed 003 Fig. 4(a)): for every method,
    the largest and smallest eigenvalue of each round (``[N, k]`` arrays, ascending per row)."""
    if not eigenvalues:
        raise ValueError("eigenvalue_plot needs at least one method")
    fig, ax = subplots(figsize=(6.4, 4))
    for i, (name, ev) in enumerate(eigenvalues.items()):
        ev = np.asarray(ev, np.float64)
        if ev.ndim != 2:
            raise ValueError(f"eigenvalues of {name!r} must be [N, k], got shape {ev.shape}")
        r = np.arange(ev.shape[0])
        c = f"C{i}"
        ax.plot(r, ev[:, -1], "o", color=c, ms=3, label=f"{name}: largest")
        ax.plot(r, ev[:, 0], "x", color=c, ms=3, label=f"{name}: smallest")
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_xlabel("round")
    ax.set_ylabel("Hessian eigenvalue (original surface)")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    return _save(fig, path)
