"""Figures of loss landscapes: contours and 3-D views of planes, optimiser trajectories, 1-D loss curves
and Hessian eigenvalues at end points.

The views of Li et al. (2018, "Visualizing the loss landscape of neural nets") and the figures of Chen et al.
(2021, "Deforming the loss surface to affect the behaviour of the optimizer", AAAI): trajectories on the
original and the deformed surface (their Figs. 1 and 7), eigenvalues at the end points (Fig. 4), loss
curves around minima (Fig. 5).

Grids ``Z[A, B]`` are indexed ``[i_alpha, i_beta]`` over ``xs[A]`` (horizontal axis) and ``ys[B]``
(vertical). Trajectories are ``[T, 2]`` arrays (or ``[N, T, 2]`` for N runs) in the same coordinates.
Every function follows the package's convention (:mod:`mclandscape.plots._figure`): ``ax=None`` makes a
new figure, a given ``Axes`` (a sequence of them for several panels) is drawn into, the ``Figure`` is
returned and :func:`~mclandscape.plots.save` writes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from mclandscape.core._checks import choice
from mclandscape.plots._figure import figure_and_axes, figure_and_panels, shared_range

__all__ = ["contour_plot", "trajectory_panels", "surface_plot", "loss_curves_plot", "eigenvalue_plot"]


def _grid(xs, ys, Z) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xs, ys = (np.asarray(v, np.float64).ravel() for v in (xs, ys))
    Z = np.asarray(Z, np.float64)
    if Z.shape != (xs.size, ys.size):
        raise ValueError(f"Z must be [len(xs), len(ys)] = [{xs.size}, {ys.size}], got shape {Z.shape}")
    if xs.size < 2 or ys.size < 2:
        raise ValueError("a contour grid needs at least 2 values per axis")
    return xs, ys, Z


def _bands(Z: np.ndarray, log: bool, zlabel: str, levels: int, vmin=None, vmax=None):
    """``(f, bands, label)`` of a plot of ``Z`` (colour scale ``[vmin, vmax]``, default Z's range): ``f`` maps
    values to what is drawn (with ``log``, ``log10`` of the values, shifted to positive ones when the scale's
    least value is not), ``bands`` are ``levels + 1`` band edges in drawn units and ``label`` says what is drawn."""
    lo, hi = shared_range(Z)
    lo, hi = lo if vmin is None else float(vmin), hi if vmax is None else float(vmax)
    shift = 0.0 if lo > 0 else -lo + 1e-12
    f = (lambda v: np.log10(np.asarray(v) + shift + 1e-12)) if log else np.asarray
    label = zlabel if not log else f"log10({zlabel})" if shift == 0.0 else f"log10({zlabel} + {shift:.2g})"
    a, b = f(np.array([lo, hi]))
    return f, np.linspace(a, b if b > a else a + 1e-12, levels + 1), label


def _contour_on(ax: Axes, xs, ys, data: np.ndarray, bands: np.ndarray, title: str):
    cs = ax.contourf(xs, ys, data.T, levels=bands, cmap="viridis", extend="both")
    ax.contour(xs, ys, data.T, levels=bands, colors="k", linewidths=0.3, alpha=0.5)
    ax.set_title(title, fontsize=10)
    return cs


def _draw_trajectories(ax: Axes, trajectories: Mapping[str, object] | None):
    if not trajectories:
        return
    for i, (name, t) in enumerate(trajectories.items()):
        c = ["tab:red", "tab:orange", "white", "tab:pink"][i] if i < 4 else f"C{i}"
        t = np.asarray(t, np.float64)
        if t.ndim not in (2, 3) or t.shape[-1] != 2:
            raise ValueError(f"a trajectory must be [T, 2] or [N, T, 2], got shape {t.shape}")
        for j, tr in enumerate(t.reshape(-1, *t.shape[-2:])):
            ax.plot(tr[:, 0], tr[:, 1], "-", color=c, lw=1.0, alpha=0.9, label=name if j == 0 else None)
            ax.plot(tr[0, 0], tr[0, 1], "o", color=c, ms=4)
            ax.plot(tr[-1, 0], tr[-1, 1], "*sD^"[i % 4], color=c, ms=10 if i % 4 == 0 else 6, mec="k", mew=0.5)
    ax.legend(loc="best", fontsize=7)


def contour_plot(xs, ys, Z, *, ax: Axes | None = None, title: str | None = None, xlabel: str = "alpha",
                 ylabel: str = "beta", zlabel: str = "loss", levels: int = 30, log: bool = False,
                 vmin: float | None = None, vmax: float | None = None,
                 trajectories: Mapping[str, object] | None = None,
                 points: Mapping[str, Sequence[float]] | None = None) -> Figure:
    """Filled contour of a grid, with its colour bar, optional optimiser trajectories and marked points.

    Trajectories start at ``o`` and end at ``*``, ``s``, ``D``, ``^`` for the 1st-4th series; points are
    ``+`` with their name (e.g. the trained model at the origin of a Li et al. plane).

    Args:
      xs: ``[A]`` horizontal coordinates.
      ys: ``[B]`` vertical coordinates.
      Z: ``[A, B]`` values, ``Z[i, j]`` at ``(xs[i], ys[j])``.
      ax: axes to draw into; ``None`` makes a new figure.
      title: default ``"<zlabel> over the plane (<xlabel>, <ylabel>)"``.
      xlabel: horizontal axis label.
      ylabel: vertical axis label.
      zlabel: what ``Z`` holds (colour-bar label).
      levels: number of contour bands.
      log: contour ``log10(Z)`` (shifted to positive values when needed).
      vmin: lower end of the colour scale, in ``Z``'s units (default ``Z``'s minimum); pass the same
        ``vmin``/``vmax`` to the figures of a pair (see :func:`~mclandscape.plots.shared_range`).
      vmax: upper end of the colour scale (default ``Z``'s maximum).
      trajectories: ``name -> [T, 2]`` or ``[N, T, 2]`` paths drawn over the contours.
      points: ``name -> (x, y)`` marked points.

    Returns:
      The figure drawn into.

    Example:
      >>> import numpy as np
      >>> from mclandscape.plots import contour_plot
      >>> xs = np.linspace(-1, 1, 5)
      >>> fig = contour_plot(xs, xs, np.add.outer(xs ** 2, xs ** 2), points={"minimum": (0, 0)})
      >>> len(fig.axes), fig.axes[0].get_title()
      (2, 'loss over the plane (alpha, beta)')
    """
    xs, ys, Z = _grid(xs, ys, Z)
    f, bands, label = _bands(Z, log, zlabel, levels, vmin, vmax)
    fig, ax = figure_and_axes(ax, figsize=(5.2, 4.4), name="contour_plot")
    title = f"{zlabel} over the plane ({xlabel}, {ylabel})" if title is None else title
    cs = _contour_on(ax, xs, ys, f(Z), bands, title)
    fig.colorbar(cs, ax=ax, label=label)
    _draw_trajectories(ax, trajectories)
    for name, p in (points or {}).items():
        ax.plot([p[0]], [p[1]], "k+", ms=10, mew=2)
        ax.annotate(name, (p[0], p[1]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    return fig


def trajectory_panels(xs, ys, Z, panels: Mapping[str, Mapping[str, object]], *,
                      ax: Sequence[Axes] | None = None, title: str | None = None, log: bool = False,
                      levels: int = 30, xlabel: str = "p1", ylabel: str = "p2", zlabel: str = "loss") -> Figure:
    """Side-by-side contours of one surface on one colour scale, each panel with its own trajectories
    (optimiser on the original vs the deformed loss: Chen et al. 2021, Figs. 1 and 7).

    Args:
      xs: ``[A]`` horizontal coordinates.
      ys: ``[B]`` vertical coordinates.
      Z: ``[A, B]`` values of the (original) surface drawn under every panel.
      panels: ``panel title -> {series name -> [T, 2] or [N, T, 2] trajectories}``.
      ax: one axes per panel; ``None`` makes a new figure.
      title: figure title; default ``"optimiser trajectories over <zlabel>"``.
      log: contour ``log10(Z)``.
      levels: number of contour bands.
      xlabel: horizontal axis label.
      ylabel: vertical axis label.
      zlabel: what ``Z`` holds.

    Returns:
      The figure drawn into.

    Example:
      >>> import numpy as np
      >>> from mclandscape.plots import trajectory_panels
      >>> xs = np.linspace(-1, 1, 5)
      >>> tr = np.stack([np.linspace(-1, 0, 4), np.linspace(1, 0, 4)], axis=1)
      >>> fig = trajectory_panels(xs, xs, np.add.outer(xs ** 2, xs ** 2), {"original": {"GD": tr},
      ...                                                                  "deformed": {"GD": tr}})
      >>> len(fig.axes)  # two panels and one shared colour bar
      3
    """
    xs, ys, Z = _grid(xs, ys, Z)
    if not panels:
        raise ValueError("trajectory_panels needs at least one panel")
    fig, axes, _ = figure_and_panels(ax, len(panels), figsize=(4.6 * len(panels), 4.2), name="trajectory_panels")
    f, bands, label = _bands(Z, log, zlabel, levels)  # the same bands in every panel
    for p, (name, trajs) in zip(axes, panels.items(), strict=True):
        cs = _contour_on(p, xs, ys, f(Z), bands, name)
        _draw_trajectories(p, trajs)
        p.set(xlabel=xlabel, ylabel=ylabel)
    fig.colorbar(cs, ax=list(axes), label=label)
    fig.suptitle(f"optimiser trajectories over {zlabel}" if title is None else title)
    return fig


def surface_plot(xs, ys, Z, *, ax: Axes | None = None, title: str | None = None, xlabel: str = "alpha",
                 ylabel: str = "beta", zlabel: str = "loss", log: bool = False, trajectory=None,
                 cmap: str = "viridis") -> Figure:
    """3-D surface view of a grid, optionally with one trajectory lifted onto the surface.

    Args:
      xs: ``[A]`` coordinates along the first axis.
      ys: ``[B]`` coordinates along the second axis.
      Z: ``[A, B]`` values.
      ax: 3-D axes to draw into (``fig.add_subplot(projection="3d")``); ``None`` makes a new figure.
      title: default ``"<zlabel> surface over (<xlabel>, <ylabel>)"``.
      xlabel: first axis label.
      ylabel: second axis label.
      zlabel: what ``Z`` holds.
      log: plot ``log10(Z)``.
      trajectory: ``(points [T, 2], values [T])`` drawn on the surface, or ``None``.
      cmap: matplotlib colormap name.

    Returns:
      The figure drawn into.

    Example:
      >>> import numpy as np
      >>> from mclandscape.plots import surface_plot
      >>> xs = np.linspace(-1, 1, 5)
      >>> fig = surface_plot(xs, xs, np.add.outer(xs ** 2, xs ** 2))
      >>> fig.axes[0].name, fig.axes[0].get_title()
      ('3d', 'loss surface over (alpha, beta)')
    """
    xs, ys, Z = _grid(xs, ys, Z)
    fig, ax = figure_and_axes(ax, figsize=(6, 4.8), name="surface_plot", projection="3d")
    f, _, label = _bands(Z, log, zlabel, 1)
    X, Y = np.meshgrid(xs, ys, indexing="ij")
    ax.plot_surface(X, Y, f(Z), cmap=cmap, linewidth=0, antialiased=True, alpha=0.9)
    if trajectory is not None:
        tr, tz = np.asarray(trajectory[0], np.float64), np.asarray(trajectory[1], np.float64).ravel()
        if tr.ndim != 2 or tr.shape[1] != 2 or tz.shape != (tr.shape[0],):
            raise ValueError(f"trajectory must be (points [T, 2], values [T]), got {tr.shape} and {tz.shape}")
        ax.plot(tr[:, 0], tr[:, 1], f(tz), "r-", lw=1.5)
    ax.set(xlabel=xlabel, ylabel=ylabel, zlabel=label,
           title=f"{zlabel} surface over ({xlabel}, {ylabel})" if title is None else title)
    return fig


def loss_curves_plot(curves: Mapping[str, tuple[object, object]], *, ax: Axes | Sequence[Axes] | None = None,
                     title: str | None = None, layout: str = "grid", ncols: int = 4, xlabel: str = "alpha",
                     ylabel: str = "loss", log: bool = False) -> Figure:
    """1-D loss curves ``name -> (alphas, loss)`` around minima (Chen et al. 2021, Fig. 5: one panel per
    deformation), in one axes (``layout="overlay"``) or one panel each with a shared y-axis (``"grid"``).

    Args:
      curves: ``name -> (alphas [K], values [K])``.
      ax: ``"overlay"``: one axes; ``"grid"``: one axes per curve; ``None`` makes a new figure.
      title: figure title; default ``"<ylabel> along 1-D directions"``.
      layout: ``"grid"`` or ``"overlay"``.
      ncols: panels per row of the grid layout.
      xlabel: horizontal axis label.
      ylabel: vertical axis label.
      log: logarithmic y-axis.

    Returns:
      The figure drawn into.

    Example:
      >>> import numpy as np
      >>> from mclandscape.plots import loss_curves_plot
      >>> a = np.linspace(-1, 1, 5)
      >>> fig = loss_curves_plot({"SGD": (a, a ** 2), "LE": (a, a ** 2 / 2)})
      >>> len(fig.axes), fig.axes[0].get_shared_y_axes().joined(fig.axes[0], fig.axes[1])
      (2, True)
    """
    if not curves:
        raise ValueError("loss_curves_plot needs at least one curve")
    choice(layout, "layout", ("grid", "overlay"))
    items = [(name, np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(l, np.float64)))
             for name, (a, l) in curves.items()]
    for name, a, l in items:
        if a.shape != l.shape:
            raise ValueError(f"curve {name!r}: {a.size} alphas but {l.size} losses")
    if layout == "overlay":
        fig, p = figure_and_axes(ax, figsize=(5.5, 4), name="loss_curves_plot(layout='overlay')", tight=True)
        for name, a, l in items:
            p.plot(a, l, label=name)
        p.legend(fontsize=7)
        axes = [p]
    else:
        cols = min(ncols, len(items))
        rows = -(-len(items) // cols)
        fig, axes, made = figure_and_panels(ax, len(items), figsize=(3.2 * cols, 2.6 * rows), nrows=rows,
                                            name="loss_curves_plot(layout='grid')", tight=True)
        for p in axes[1:] if made else ():  # given axes keep the sharing their caller chose
            p.sharey(axes[0])
        for p, (name, a, l) in zip(axes, items, strict=True):
            p.plot(a, l, "b-")
            p.set_title(name, fontsize=9)
    for p in axes:
        p.set(xlabel=xlabel, ylabel=ylabel, yscale="log" if log else "linear")
    fig.suptitle(f"{ylabel} along 1-D directions" if title is None else title)
    return fig


def eigenvalue_plot(eigenvalues: Mapping[str, object], *, ax: Axes | None = None, title: str | None = None,
                    ylabel: str = "Hessian eigenvalue") -> Figure:
    """Largest and smallest Hessian eigenvalue at the end point of every round of repeated runs, per method
    (Chen et al. 2021, Fig. 4(a)).

    Args:
      eigenvalues: ``method -> [N, k]`` eigenvalues per round, ascending within a row.
      ax: axes to draw into; ``None`` makes a new figure.
      title: default ``"largest and smallest Hessian eigenvalue at the end points"``.
      ylabel: vertical axis label (e.g. which surface's Hessian).

    Returns:
      The figure drawn into.

    Example:
      >>> import numpy as np
      >>> from mclandscape.plots import eigenvalue_plot
      >>> fig = eigenvalue_plot({"GD": np.array([[0.1, 2.0], [0.2, 3.0]])})
      >>> len(fig.axes[0].lines)  # largest and smallest
      2
    """
    if not eigenvalues:
        raise ValueError("eigenvalue_plot needs at least one method")
    fig, ax = figure_and_axes(ax, figsize=(6.4, 4), name="eigenvalue_plot")
    for i, (name, ev) in enumerate(eigenvalues.items()):
        ev = np.asarray(ev, np.float64)
        if ev.ndim != 2:
            raise ValueError(f"eigenvalues of {name!r} must be [N, k], got shape {ev.shape}")
        ax.plot(ev[:, -1], "o", color=f"C{i}", ms=3, label=f"{name}: largest")
        ax.plot(ev[:, 0], "x", color=f"C{i}", ms=3, label=f"{name}: smallest")
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set(xlabel="round", ylabel=ylabel,
           title="largest and smallest Hessian eigenvalue at the end points" if title is None else title)
    ax.legend(fontsize=7)
    return fig
