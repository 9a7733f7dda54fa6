"""Figures for the volumetric exploration of seed 002: log H_c(s) against c, one curve per step width s.

Figure 5.1 (synthetic nets, one panel per dimension), 5.2/5.3 (Iris 2-D/3-D flats), 5.4 (different starting
minima), 5.5 (raw vs orthogonal basis) are panels of :func:`plot_h_curves`; Figure 5.6 (distance-based
exploration averaged over minima) is :func:`plot_h_mean`. Figures are built on ``matplotlib.figure.Figure``
(Agg canvas) without touching pyplot's global state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mclandscape.methods.volume import HSweep

__all__ = ["plot_h_curves", "plot_h_panels", "plot_h_mean", "save_figure"]


def plot_h_curves(sweep: HSweep, ax, *, title: str | None = None, show_fit: bool = True) -> None:
    """Draw log H_c(s) against c = n·ε on ``ax``, one curve per s (seed 002 Figures 5.1-5.5).

    Truncated runs (step limit hit, partial counts) are drawn as hollow markers; dashed lines are the
    per-step fits log H = log A + B·c (§6.1) over the untruncated points.
    """
    c = sweep.thresholds
    fits = sweep.fit()["per_step"] if show_fit else [None] * len(sweep.steps)
    for i, s in enumerate(sweep.steps):
        h = sweep.H[i].astype(np.float64)
        ok = h > 0
        logh = np.where(ok, np.log(np.maximum(h, 1)), np.nan)
        line, = ax.plot(c, logh, "-", lw=1.2, label=f"s={s:g}")
        col = line.get_color()
        tr = sweep.truncated[i]
        ax.plot(c[~tr & ok], logh[~tr & ok], "o", ms=3.5, color=col)
        if np.any(tr & ok):
            ax.plot(c[tr & ok], logh[tr & ok], "o", ms=4.5, mfc="none", color=col)
        f = fits[i]
        if f is not None:
            cc = np.linspace(c.min(), c.max(), 50)
            ax.plot(cc, math.log(f.A) + f.B * cc, "--", lw=0.8, color=col)
    ax.set_xlabel("threshold c = n·ε")
    ax.set_ylabel("log H_c(s)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_h_panels(sweeps: Mapping[str, HSweep], *, suptitle: str | None = None, ncols: int | None = None,
                  path: str | Path | None = None, show_fit: bool = True) -> Figure:
    """One :func:`plot_h_curves` panel per labelled sweep; saved to ``path`` (PNG) when given."""
    if not sweeps:
        raise ValueError("plot_h_panels needs at least one sweep")
    k = len(sweeps)
    ncols = ncols or min(k, 3)
    nrows = -(-k // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (label, sw) in zip(axes, sweeps.items(), strict=False):
        plot_h_curves(sw, ax, title=label, show_fit=show_fit)
    for ax in axes[k:]:
        ax.set_visible(False)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_h_mean(summary: Mapping, *, title: str | None = None, path: str | Path | None = None) -> Figure:
    """Mean ± std of log H_c(s) over starting minima against the mean threshold (seed 002 Figure 5.6).

    ``summary`` is the output of :func:`mclandscape.methods.volume.mean_log_h`.
    """
    fig = Figure(figsize=(5.0, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    c = np.asarray(summary["mean_c"], np.float64)
    mean = np.asarray(summary["mean_log_H"], np.float64)
    std = np.asarray(summary["std_log_H"], np.float64)
    trunc = np.asarray(summary["any_truncated"], bool)
    for i, s in enumerate(summary["steps"]):
        line, = ax.plot(c, mean[i], "o-", ms=3, lw=1.2, label=f"s={s:g}")
        ax.fill_between(c, mean[i] - std[i], mean[i] + std[i], color=line.get_color(), alpha=0.2)
        if trunc[i].any():
            ax.plot(c[trunc[i]], mean[i][trunc[i]], "x", color="k", ms=6)
    ax.set_xlabel("mean threshold c = n·ε")
    ax.set_ylabel("mean log H_c(s) over minima")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    if path is not None:
        save_figure(fig, path)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
