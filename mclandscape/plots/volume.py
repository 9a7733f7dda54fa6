"""Figures of the volumetric exploration of low-loss regions: log H_c(s) against the threshold c, one curve
per step width s.

For Schager (2025, "Volumetric investigation into neural network loss landscapes", BSc thesis, Universität
Kassel): its Figures 5.1-5.5 (synthetic networks, Iris 2-D/3-D flats, different starting minima, raw vs
orthogonal basis) are panels of :func:`plot_h_curves` (several at once: :func:`plot_h_panels`); Figure 5.6
(exploration averaged over minima) is :func:`plot_h_mean`. Every function follows the package's convention
(:mod:`mclandscape.plots._figure`): ``ax=None`` makes a new figure, given axes are drawn into, the
``Figure`` is returned and :func:`~mclandscape.plots.save` writes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from mclandscape.methods.volume import HSweep
from mclandscape.plots._figure import figure_and_axes, figure_and_panels

__all__ = ["plot_h_curves", "plot_h_panels", "plot_h_mean"]


def plot_h_curves(sweep: HSweep, *, ax: Axes | None = None, title: str | None = None,
                  show_fit: bool = True) -> Figure:
    """log H_c(s) against the threshold c = n·ε, one curve per step width s (Schager 2025, Figs. 5.1-5.5).

    Truncated runs (step limit hit, partial counts) are hollow markers; dashed lines are the per-step fits
    log H = log A + B·c (§6.1) over the untruncated points.

    Args:
      sweep: the :class:`~mclandscape.methods.volume.HSweep` to draw.
      ax: axes to draw into; ``None`` makes a new figure.
      title: panel title; default ``"accepted voxels H_c(s) against the threshold c"``.
      show_fit: draw the per-step log-linear fits.

    Returns:
      The figure drawn into.

    Example:
      >>> import numpy as np
      >>> from mclandscape.methods.volume import HSweep
      >>> from mclandscape.plots import plot_h_curves
      >>> z = np.zeros((1, 3))
      >>> sw = HSweep(steps=np.array([0.1]), multipliers=np.array([1.5, 2.0, 3.0]), epsilon=0.1,
      ...             H=np.array([[3, 9, 30]]), evaluations=z, visited=z, truncated=z.astype(bool),
      ...             wall_time=z, dim=2, cell_factor=1.0)
      >>> fig = plot_h_curves(sw)
      >>> fig.axes[0].get_ylabel()
      'log H_c(s)'
    """
    fig, ax = figure_and_axes(ax, figsize=(5.0, 3.6), name="plot_h_curves")
    c = sweep.thresholds
    fits = sweep.fit()["per_step"] if show_fit else [None] * len(sweep.steps)
    for s, h, tr, f in zip(sweep.steps, sweep.H, np.asarray(sweep.truncated, bool), fits, strict=True):
        logh = np.log(np.where(h > 0, h, np.nan))  # H = 0 (nothing accepted) draws no point
        col = ax.plot(c, logh, "-", lw=1.2, label=f"s={s:g}")[0].get_color()
        ax.plot(c[~tr], logh[~tr], "o", ms=3.5, color=col)
        ax.plot(c[tr], logh[tr], "o", ms=4.5, mfc="none", color=col)  # truncated: hollow
        if f is not None:
            cc = np.linspace(c.min(), c.max(), 50)
            ax.plot(cc, math.log(f.A) + f.B * cc, "--", lw=0.8, color=col)
    ax.set(xlabel="threshold c = n·ε", ylabel="log H_c(s)")
    ax.set_title("accepted voxels H_c(s) against the threshold c" if title is None else title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def plot_h_panels(sweeps: Mapping[str, HSweep], *, ax: Sequence[Axes] | None = None, title: str | None = None,
                  ncols: int | None = None, show_fit: bool = True) -> Figure:
    """One :func:`plot_h_curves` panel per labelled sweep.

    Args:
      sweeps: ``panel title -> HSweep``.
      ax: one axes per sweep; ``None`` makes a new figure.
      title: figure title; default ``"accepted voxels H_c(s) against the threshold c"``.
      ncols: panels per row of a new figure (default up to 3).
      show_fit: draw the per-step log-linear fits.

    Returns:
      The figure drawn into.

    Example:
      >>> import numpy as np
      >>> from mclandscape.methods.volume import HSweep
      >>> from mclandscape.plots import plot_h_panels
      >>> z = np.zeros((1, 2))
      >>> sw = HSweep(steps=np.array([0.1]), multipliers=np.array([1.5, 2.0]), epsilon=0.1,
      ...             H=np.array([[3, 9]]), evaluations=z, visited=z, truncated=z.astype(bool),
      ...             wall_time=z, dim=2, cell_factor=1.0)
      >>> fig = plot_h_panels({"raw basis": sw, "QR basis": sw})
      >>> [a.get_title() for a in fig.axes]
      ['raw basis', 'QR basis']
    """
    if not sweeps:
        raise ValueError("plot_h_panels needs at least one sweep")
    k = len(sweeps)
    ncols = ncols or min(k, 3)
    nrows = -(-k // ncols)
    fig, axes, made = figure_and_panels(ax, k, figsize=(4.2 * ncols, 3.4 * nrows), nrows=nrows,
                                        name="plot_h_panels")
    for p, (label, sw) in zip(axes, sweeps.items(), strict=True):
        plot_h_curves(sw, ax=p, title=label, show_fit=show_fit)
    fig.suptitle("accepted voxels H_c(s) against the threshold c" if title is None else title, fontsize=10)
    if made:
        fig.tight_layout()
    return fig


def plot_h_mean(summary: Mapping, *, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Mean ± std of log H_c(s) over starting minima against the mean threshold (Schager 2025, Fig. 5.6);
    ``x`` marks thresholds where a run was truncated.

    Args:
      summary: the output of :func:`mclandscape.methods.volume.mean_log_h` (keys ``steps``, ``mean_c``,
        ``mean_log_H``, ``std_log_H``, ``any_truncated``).
      ax: axes to draw into; ``None`` makes a new figure.
      title: default ``"log H_c(s) averaged over starting minima"``.

    Returns:
      The figure drawn into.

    Example:
      >>> from mclandscape.plots import plot_h_mean
      >>> summary = {"steps": [1.0], "mean_c": [1.0, 2.0], "mean_log_H": [[0.5, 2.0]],
      ...            "std_log_H": [[0.1, 0.2]], "any_truncated": [[False, True]]}
      >>> fig = plot_h_mean(summary)
      >>> fig.axes[0].get_xlabel()
      'mean threshold c = n·ε'
    """
    missing = [k for k in ("steps", "mean_c", "mean_log_H", "std_log_H", "any_truncated") if k not in summary]
    if missing:
        raise ValueError(f"summary lacks {missing}: pass the output of mclandscape.methods.volume.mean_log_h")
    fig, ax = figure_and_axes(ax, figsize=(5.0, 3.6), name="plot_h_mean")
    c, mean, std = (np.asarray(summary[k], np.float64) for k in ("mean_c", "mean_log_H", "std_log_H"))
    trunc = np.asarray(summary["any_truncated"], bool)
    for i, s in enumerate(summary["steps"]):
        line, = ax.plot(c, mean[i], "o-", ms=3, lw=1.2, label=f"s={s:g}")
        ax.fill_between(c, mean[i] - std[i], mean[i] + std[i], color=line.get_color(), alpha=0.2)
        ax.plot(c[trunc[i]], mean[i][trunc[i]], "x", color="k", ms=6)
    ax.set(xlabel="mean threshold c = n·ε", ylabel="mean log H_c(s) over minima")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("log H_c(s) averaged over starting minima" if title is None else title, fontsize=9)
    return fig
