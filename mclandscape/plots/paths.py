"""Figures of paths between two models (seed 001): loss and error profiles of several paths in one plot.

Each path is a :class:`~mclandscape.methods.curves.PathEvaluation` (or a dict with the same fields: ``ts``, ``dl``,
``train_loss``, ``train_acc`` and optionally ``test_loss``, ``test_acc``). The x-axis is the path's own
parameter ``t`` or, with ``x="length"``, the fraction of its length in parameter space (so a straight line,
a Bézier curve and a NEB band are compared at the same arc-length position). Matplotlib's Agg backend; every
function writes one PNG and returns its path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from mclandscape.plots._figure import color_cycle, subplots

__all__ = ["plot_path_profiles", "plot_band_2d"]


def _field(p, name):
    if isinstance(p, Mapping):
        return p.get(name)
    return getattr(p, name, None)


def _xaxis(p, x: str) -> np.ndarray:
    ts = np.asarray(_field(p, "ts"), np.float64)
    if x == "t":
        return ts
    dl = _field(p, "dl")
    if dl is None:
        raise ValueError("x='length' needs the point distances dl of every path")
    c = np.cumsum(np.asarray(dl, np.float64))
    return c / c[-1] if c[-1] > 0 else ts


def plot_path_profiles(paths: Mapping[str, object], path: str | os.PathLike, *, title: str = "",
                       x: str = "t", log_loss: bool = False) -> str:
    """Train/test loss (left) and train/test error in % (right) along every path, one colour per path.

    Train series are solid, test series dashed (when present).
    """
    if not paths:
        raise ValueError("no paths to plot")
    if x not in ("t", "length"):
        raise ValueError(f"x must be 't' or 'length', got {x!r}")
    fig, (ax_l, ax_e) = subplots(1, 2, figsize=(11, 4.2))
    colours = color_cycle()
    for i, (name, p) in enumerate(paths.items()):
        col = colours[i % len(colours)]
        xs = _xaxis(p, x)
        ax_l.plot(xs, _field(p, "train_loss"), "-", color=col, label=f"{name} train")
        ax_e.plot(xs, 100.0 * (1.0 - np.asarray(_field(p, "train_acc"))), "-", color=col, label=f"{name} train")
        if _field(p, "test_loss") is not None:
            ax_l.plot(xs, _field(p, "test_loss"), "--", color=col, label=f"{name} test")
            ax_e.plot(xs, 100.0 * (1.0 - np.asarray(_field(p, "test_acc"))), "--", color=col, label=f"{name} test")
    xlabel = "t" if x == "t" else "fraction of path length"
    for ax, lab in ((ax_l, "loss"), (ax_e, "error (%)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
    if log_loss:
        ax_l.set_yscale("log")
    ax_l.legend(fontsize=7)
    ax_l.set_title("loss along the path")
    ax_e.set_title("error along the path")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    return os.fspath(path)


def plot_band_2d(potential, bands: Mapping[str, np.ndarray], path: str | os.PathLike, *, xlim=(-1.6, 1.2),
                 ylim=(-0.4, 2.1), levels: int = 40, vmax: float | None = None, title: str = "",
                 markers: Mapping[str, np.ndarray] | None = None) -> str:
    """Paths (``[P, 2]`` point arrays) over the contours of a 2-D ``potential(xy[..., 2]) -> values``."""
    gx = np.linspace(*xlim, 200)
    gy = np.linspace(*ylim, 200)
    xx, yy = np.meshgrid(gx, gy)
    zz = np.asarray(potential(np.stack([xx, yy], -1)), np.float64)
    if vmax is not None:
        zz = np.minimum(zz, vmax)
    fig, ax = subplots(figsize=(6, 5))
    cs = ax.contourf(xx, yy, zz, levels=levels, cmap="viridis")
    fig.colorbar(cs, ax=ax)
    for name, pts in bands.items():
        pts = np.asarray(pts)
        ax.plot(pts[:, 0], pts[:, 1], "o-", ms=3, label=name)
    for name, pt in (markers or {}).items():
        ax.plot(*np.asarray(pt), "r*", ms=12)
        ax.annotate(name, np.asarray(pt), color="w")
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    return os.fspath(path)
