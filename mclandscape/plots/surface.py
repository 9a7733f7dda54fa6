"""Figures of Bézier-surface mode connectivity (seed 000): heat-maps, 3-D surface view, triangle plot.

All functions draw with matplotlib's Agg backend (no display needed), write one PNG and return its path.
Grids are ``[S, S]`` arrays indexed ``[i_u, i_v]`` over ``u, v = linspace(0, 1, S)`` (as
:class:`mclandscape.methods.surface.SurfaceGrid` holds them).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib.tri as mtri
import numpy as np

from mclandscape.plots._figure import new_figure, subplots

__all__ = ["heatmap_pair", "heatmap", "surface_3d", "triangle_plot", "subset_comparison"]


def _square(a, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 2:
        raise ValueError(f"{name} must be a square [S, S] grid with S >= 2, got shape {a.shape}")
    return a


def _draw(ax, a, title: str, label: str, cmap: str, vmin=None, vmax=None, annotate: bool = True):
    s = a.shape[0]
    im = ax.imshow(a.T, origin="lower", extent=(-0.5 / (s - 1), 1 + 0.5 / (s - 1), -0.5 / (s - 1), 1 + 0.5 / (s - 1)),
                   cmap=cmap, vmin=vmin, vmax=vmax, aspect="equal")
    ax.set_xlabel("u")
    ax.set_ylabel("v")
    ax.set_title(title)
    ax.plot([0, 0, 1, 1], [0, 1, 0, 1], "k^", ms=7, label="corner models")
    if annotate and s <= 11:
        g = np.linspace(0, 1, s)
        for i in range(s):
            for j in range(s):
                ax.text(g[i], g[j], f"{a[i, j]:.2f}", ha="center", va="center", fontsize=5, color="w")
    ax.figure.colorbar(im, ax=ax, label=label, shrink=0.8)


def heatmap(values, path: str | os.PathLike, *, title: str = "", label: str = "", cmap: str = "viridis") -> str:
    """One (u, v) heat-map of a grid (corners marked)."""
    a = _square(values, "values")
    fig, ax = subplots(figsize=(5, 4.3))
    _draw(ax, a, title, label, cmap)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return os.fspath(path)


def heatmap_pair(before, after, path: str | os.PathLike, *, label: str, title: str = "",
                 shared_scale: bool = False, cmap: str = "viridis") -> str:
    """Side-by-side heat-maps of a metric before and after training (seed 000 Figures 4 and 5)."""
    b, a = _square(before, "before"), _square(after, "after")
    if b.shape != a.shape:
        raise ValueError(f"before and after grids differ in shape: {b.shape} vs {a.shape}")
    vmin = vmax = None
    if shared_scale:
        vmin, vmax = float(min(b.min(), a.min())), float(max(b.max(), a.max()))
    fig, axes = subplots(1, 2, figsize=(10, 4.3))
    _draw(axes[0], b, "before training", label, cmap, vmin, vmax)
    _draw(axes[1], a, "after training", label, cmap, vmin, vmax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return os.fspath(path)


def surface_3d(grids: Sequence[np.ndarray], path: str | os.PathLike, *, titles: Sequence[str], zlabel: str = "loss",
               cmap: str = "viridis", shared_z: bool = True) -> str:
    """3-D views of one or more loss grids over (u, v) (seed 000 Figure 1: before / after); with ``shared_z``
    all panels use one z range, so a drop in loss is visible as such."""
    grids = [_square(g, "grid") for g in grids]
    if len(titles) != len(grids):
        raise ValueError(f"{len(grids)} grids but {len(titles)} titles")
    zlim = (min(float(g.min()) for g in grids), max(float(g.max()) for g in grids))
    fig = new_figure(figsize=(5.5 * len(grids), 4.5))
    for k, (g, t) in enumerate(zip(grids, titles, strict=True)):
        ax = fig.add_subplot(1, len(grids), k + 1, projection="3d")
        ax_ = np.linspace(0, 1, g.shape[0])
        uu, vv = np.meshgrid(ax_, ax_, indexing="ij")
        if shared_z:
            ax.plot_surface(uu, vv, g, cmap=cmap, edgecolor="k", linewidth=0.2, vmin=zlim[0], vmax=zlim[1])
            ax.set_zlim(*zlim)
        else:
            ax.plot_surface(uu, vv, g, cmap=cmap, edgecolor="k", linewidth=0.2)
        ax.set_xlabel("u")
        ax.set_ylabel("v")
        ax.set_zlabel(zlabel)
        ax.set_title(t)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return os.fspath(path)


def triangle_plot(points, values, path: str | os.PathLike, *, label: str = "test accuracy", title: str = "",
                  names: Sequence[str] = ("model 1", "model 2", "model 3"), cmap: str = "viridis") -> str:
    """Values on the three-model linear surface over barycentric ``points [P, 3]`` (seed 000 Figure 3)."""
    p = np.asarray(points, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3 or v.shape != (p.shape[0],):
        raise ValueError(f"need points [P, 3] and values [P], got {p.shape} and {v.shape}")
    verts = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])
    xy = p @ verts
    fig, ax = subplots(figsize=(5.5, 4.8))
    tri = mtri.Triangulation(xy[:, 0], xy[:, 1])
    tc = ax.tricontourf(tri, v, levels=20, cmap=cmap)
    ax.scatter(xy[:, 0], xy[:, 1], c=v, cmap=cmap, edgecolors="k", linewidths=0.3, s=18)
    ax.figure.colorbar(tc, ax=ax, label=label)
    for (x, y), n in zip(verts, names, strict=True):
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(0, -12 if y == 0 else 6), ha="center")
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_xlim(-0.12, 1.12)
    ax.set_ylim(-0.08, np.sqrt(3) / 2 + 0.08)
    fig.suptitle(title or "linear surface a1 theta1 + a2 theta2 + a3 theta3", fontsize=10, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return os.fspath(path)


def subset_comparison(full, subset, path: str | os.PathLike, *, label: str, title: str = "") -> str:
    """Full-data and subset grids side by side with valley (v) and peak (^) marked (seed 000 Figure 9)."""
    f, s = _square(full, "full"), _square(subset, "subset")
    fig, axes = subplots(1, 2, figsize=(10, 4.3))
    g = np.linspace(0, 1, f.shape[0])
    for ax, a, t in ((axes[0], s, "subset"), (axes[1], f, "full data")):
        _draw(ax, a, t, label, "viridis", annotate=False)
        i, j = np.unravel_index(np.argmin(a), a.shape)
        ax.plot(g[i], g[j], "wv", ms=10, mec="k")
        i, j = np.unravel_index(np.argmax(a), a.shape)
        ax.plot(g[i], g[j], "r^", ms=10, mec="k")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return os.fspath(path)
