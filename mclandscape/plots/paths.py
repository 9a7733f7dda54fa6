"""Figures of paths between two models: loss and error profiles of several paths in one figure, and bands on
a 2-D potential.

For the curves of Garipov et al. (2018, "Loss surfaces, mode connectivity, and fast ensembling of DNNs") and
the nudged elastic bands of Draxler et al. (2018, "Essentially no barriers in neural network energy
landscape"). Each path is a :class:`~mclandscape.methods.curves.PathEvaluation` (or a dict with the same
fields: ``ts``, ``dl``, ``train_loss``, ``train_acc`` and optionally ``test_loss``, ``test_acc``). The
x-axis is the path's own parameter ``t`` or, with ``x="length"``, the fraction of its length in parameter
space (so a straight line, a Bézier curve and a NEB band are compared at the same arc-length position).
Every function follows the package's convention (:mod:`mclandscape.plots._figure`): ``ax=None`` makes a new
figure, given axes are drawn into, the ``Figure`` is returned and :func:`~mclandscape.plots.save` writes it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from mclandscape.core._checks import choice
from mclandscape.plots._figure import figure_and_axes, figure_and_panels

__all__ = ["plot_path_profiles", "plot_band_2d"]


def _field(p, name):
    return p.get(name) if isinstance(p, Mapping) else getattr(p, name, None)


def _xaxis(p, x: str, name: str) -> np.ndarray:
    ts = _field(p, "ts")
    if ts is None or _field(p, "train_loss") is None or _field(p, "train_acc") is None:
        raise ValueError(f"path {name!r} needs the fields ts, train_loss and train_acc")
    ts = np.asarray(ts, np.float64)
    if x == "t":
        return ts
    dl = _field(p, "dl")
    if dl is None:
        raise ValueError(f"x='length' needs the point distances dl of every path; {name!r} has none")
    c = np.cumsum(np.asarray(dl, np.float64))
    return c / c[-1] if c[-1] > 0 else ts


def plot_path_profiles(paths: Mapping[str, object], *, ax: Sequence[Axes] | None = None,
                       title: str | None = None, x: str = "t", log_loss: bool = False) -> Figure:
    """Train/test loss (left) and train/test error in % (right) along every path, one colour per path;
    train series solid, test series dashed (when present).

    Args:
      paths: ``name -> PathEvaluation`` (or a dict with its fields).
      ax: two axes (loss, error); ``None`` makes a new figure.
      title: figure title; default ``"loss and error along the paths between two models"``.
      x: ``"t"`` (the path parameter) or ``"length"`` (fraction of the path's length).
      log_loss: logarithmic loss axis.

    Returns:
      The figure drawn into.

    Example:
      >>> import numpy as np
      >>> from mclandscape.plots import plot_path_profiles
      >>> t = np.linspace(0, 1, 5)
      >>> line = {"ts": t, "train_loss": t * (1 - t), "train_acc": np.full(5, 0.9)}
      >>> fig = plot_path_profiles({"line": line})
      >>> [ax.get_ylabel() for ax in fig.axes]
      ['loss', 'error (%)']
    """
    if not paths:
        raise ValueError("no paths to plot")
    choice(x, "x", ("t", "length"))
    fig, (ax_l, ax_e), _ = figure_and_panels(ax, 2, figsize=(11, 4.2), name="plot_path_profiles", tight=True)
    for i, (name, p) in enumerate(paths.items()):
        xs = _xaxis(p, x, name)
        for split, style in (("train", "-"), ("test", "--")):  # the train fields are there (_xaxis checks)
            loss, acc = _field(p, f"{split}_loss"), _field(p, f"{split}_acc")
            if loss is not None:
                ax_l.plot(xs, loss, style, color=f"C{i}", label=f"{name} {split}")
            if acc is not None:
                ax_e.plot(xs, 100.0 * (1.0 - np.asarray(acc)), style, color=f"C{i}", label=f"{name} {split}")
    xlabel = "t" if x == "t" else "fraction of path length"
    for a, what, unit in ((ax_l, "loss", ""), (ax_e, "error", " (%)")):
        a.set(xlabel=xlabel, ylabel=what + unit, title=f"{what} along the path")
        a.grid(alpha=0.3)
    ax_l.set_yscale("log" if log_loss else "linear")
    ax_l.legend(fontsize=7)
    fig.suptitle("loss and error along the paths between two models" if title is None else title)
    return fig


def plot_band_2d(potential: Callable, bands: Mapping[str, object], *, ax: Axes | None = None,
                 xlim: tuple[float, float] = (-1.6, 1.2), ylim: tuple[float, float] = (-0.4, 2.1), levels: int = 40,
                 vmax: float | None = None, title: str | None = None,
                 markers: Mapping[str, Sequence[float]] | None = None, resolution: int = 200,
                 xlabel: str = "x", ylabel: str = "y") -> Figure:
    """Paths (``[P, 2]`` point arrays) over the filled contours of a 2-D potential.

    Args:
      potential: ``potential(xy[..., 2]) -> values[...]``.
      bands: ``name -> [P, 2]`` points of each path.
      ax: axes to draw into; ``None`` makes a new figure.
      xlim: horizontal range of the contours (the Müller-Brown window by default).
      ylim: vertical range of the contours.
      levels: number of contour bands.
      vmax: values above it share the top band (so deep minima keep their contrast).
      title: default ``"paths over the potential"``.
      markers: ``name -> (x, y)`` points marked with a star (e.g. a known saddle).
      resolution: grid points per axis at which the potential is evaluated.
      xlabel: horizontal axis label.
      ylabel: vertical axis label.

    Returns:
      The figure drawn into.

    Example:
      >>> import numpy as np
      >>> from mclandscape.plots import plot_band_2d
      >>> well = lambda xy: (xy[..., 0] ** 2 - 1) ** 2 + xy[..., 1] ** 2
      >>> band = np.stack([np.linspace(-1, 1, 7), np.zeros(7)], axis=1)
      >>> fig = plot_band_2d(well, {"band": band}, xlim=(-1.5, 1.5), ylim=(-1, 1), resolution=20)
      >>> len(fig.axes)  # contours and colour bar
      2
    """
    xx, yy = np.meshgrid(np.linspace(*xlim, resolution), np.linspace(*ylim, resolution))
    zz = np.asarray(potential(np.stack([xx, yy], -1)), np.float64)
    if zz.shape != xx.shape:
        raise ValueError(f"potential(xy[..., 2]) must return one value per point: shape {xx.shape}, got {zz.shape}")
    if vmax is not None:
        zz = np.minimum(zz, vmax)
    fig, ax = figure_and_axes(ax, figsize=(6, 5), name="plot_band_2d")
    cs = ax.contourf(xx, yy, zz, levels=levels, cmap="viridis")
    fig.colorbar(cs, ax=ax, label="potential" if vmax is None else f"potential (clipped at {vmax:g})")
    for name, pts in bands.items():
        pts = np.asarray(pts)
        if pts.ndim != 2 or pts.shape[1] != 2:
            raise ValueError(f"band {name!r} must be [P, 2] points, got shape {pts.shape}")
        ax.plot(pts[:, 0], pts[:, 1], "o-", ms=3, label=name)
    for name, pt in (markers or {}).items():
        ax.plot(*np.asarray(pt), "r*", ms=12)
        ax.annotate(name, np.asarray(pt), color="w")
    ax.legend(fontsize=8)
    ax.set(xlabel=xlabel, ylabel=ylabel, title="paths over the potential" if title is None else title)
    return fig
