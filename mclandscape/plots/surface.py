"""Figures of surfaces between trained networks: (u, v) heat-maps, 3-D views, the three-model triangle.

The figures of the Bézier-surface paper (Anonymous, 2024, "Revisiting mode connectivity in neural networks
with Bézier surface"): loss and accuracy over the surface before and after training (its Figures 1, 4, 5),
the linear surface of three models (Figure 3) and the subset approximation of Appendix B (Figure 9).

Grids are ``[S, S]`` arrays indexed ``[i_u, i_v]`` over ``u, v = linspace(0, 1, S)`` (as
:class:`mclandscape.methods.surface_grid.SurfaceGrid` holds them). Every function follows the package's
convention (:mod:`mclandscape.plots._figure`): ``ax=None`` makes a new figure, a given ``Axes`` (a sequence
of them for two-panel figures) is drawn into, the ``Figure`` is returned and :func:`~mclandscape.plots.save`
writes it. Before/after pairs share one colour (or z) scale unless asked not to.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from mclandscape.plots._figure import annotate_cells, figure_and_axes, figure_and_panels, shared_range

__all__ = ["heatmap_pair", "heatmap", "surface_3d", "triangle_plot", "subset_comparison"]

_ANNOTATE_MAX = 11  # grids up to 11 x 11 (step 0.1) get their values written in the cells by default


def _square(a, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 2:
        raise ValueError(f"{name} must be a square [S, S] grid with S >= 2, got shape {a.shape}")
    return a


def _pair(**grids) -> list[np.ndarray]:
    """The two named grids as square arrays of one shape."""
    (n1, a), (n2, b) = ((n, _square(g, n)) for n, g in grids.items())
    if a.shape != b.shape:
        raise ValueError(f"{n1} and {n2} grids differ in shape: {a.shape} vs {b.shape}")
    return [a, b]


def heatmap(values, *, ax: Axes | None = None, title: str | None = None, label: str = "value",
            cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None,
            annotate: bool | None = None, extrema: bool = False) -> Figure:
    """One (u, v) heat-map of a grid, the four corner models outlined, values written in the cells.

    Args:
      values: ``[S, S]`` grid indexed ``[i_u, i_v]``.
      ax: axes to draw into; ``None`` makes a new figure.
      title: panel title; default ``"<label> over the surface (u, v)"``.
      label: what the values are (colour-bar label), e.g. ``"train loss"``.
      cmap: matplotlib colormap name.
      vmin: lower end of the colour scale (default the grid's minimum).
      vmax: upper end of the colour scale (default the grid's maximum).
      annotate: write every cell's value, with 2 decimals (default: grids up to 11 x 11); the font is scaled to
        the grid and the text colour chosen against the cell's colour.
      extrema: mark the valley (▼, least value) and the peak (▲, largest value).

    Returns:
      The figure drawn into.

    Example:
      >>> import numpy as np
      >>> from mclandscape.plots import heatmap
      >>> fig = heatmap(np.arange(9.0).reshape(3, 3), label="train loss")
      >>> len(fig.axes), fig.axes[0].get_title()  # the heat-map and its colour bar
      (2, 'train loss over the surface (u, v)')
    """
    a = _square(values, "values")
    fig, ax = figure_and_axes(ax, figsize=(5, 4.3), name="heatmap")
    s = a.shape[0]
    h = 0.5 / (s - 1)
    im = ax.imshow(a.T, origin="lower", extent=(-h, 1 + h, -h, 1 + h), cmap=cmap, vmin=vmin, vmax=vmax,
                   aspect="equal")
    ax.set(xlabel="u", ylabel="v")
    ax.set_title(f"{label} over the surface (u, v)" if title is None else title, fontsize=10)
    # the corner models: outlined cells, so a written value stays readable under the mark
    for k, (x, y) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        ax.add_patch(Rectangle((x - h, y - h), 2 * h, 2 * h, fill=False, ec="tab:red", lw=2.0, clip_on=False,
                               label="corner models" if k == 0 else None))
    fig.colorbar(im, ax=ax, label=label, shrink=0.8)
    g = np.linspace(0, 1, s)
    if annotate if annotate is not None else s <= _ANNOTATE_MAX:
        annotate_cells(ax, a, g, g, im)
    for where, marker in ((np.nanargmin, "wv"), (np.nanargmax, "r^")) if extrema else ():
        i, j = np.unravel_index(where(a), a.shape)
        ax.plot(g[i], g[j], marker, ms=10, mec="k")
    return fig


def heatmap_pair(before, after, *, ax: Sequence[Axes] | None = None, label: str = "value",
                 title: str | None = None, titles: Sequence[str] = ("before training", "after training"),
                 shared_scale: bool = True, cmap: str = "viridis", annotate: bool | None = None,
                 extrema: bool = False) -> Figure:
    """Side-by-side heat-maps of one metric on two grids (before / after training: the Bézier-surface
    paper's Figures 4 and 5), on one colour scale by default so that a change reads as a change of colour.

    Args:
      before: ``[S, S]`` grid shown on the left.
      after: ``[S, S]`` grid shown on the right.
      ax: two axes to draw into; ``None`` makes a new figure.
      label: the metric (colour-bar label), e.g. ``"test accuracy"``.
      title: figure title; default ``"<label> over the surface (u, v): <titles[0]> vs <titles[1]>"``.
      titles: the two panel titles.
      shared_scale: one colour scale (min and max over both grids) for both panels; ``False`` scales each
        panel to its own range.
      cmap: matplotlib colormap name.
      annotate: write every cell's value, with 2 decimals (default: grids up to 11 x 11).
      extrema: mark each grid's valley (▼) and peak (▲).

    Returns:
      The figure drawn into.

    Example:
      >>> import numpy as np
      >>> from mclandscape.plots import heatmap_pair
      >>> g = np.linspace(0, 1, 9).reshape(3, 3)
      >>> fig = heatmap_pair(g, g / 2, label="train loss")
      >>> [ax.images[0].get_clim() for ax in fig.axes if ax.images]
      [(0.0, 1.0), (0.0, 1.0)]
    """
    b, a = _pair(before=before, after=after)
    if len(titles) != 2:
        raise ValueError(f"titles must name the 2 panels, got {len(titles)}")
    vmin, vmax = shared_range(b, a) if shared_scale else (None, None)
    fig, axes, _ = figure_and_panels(ax, 2, figsize=(10, 4.3), name="heatmap_pair", tight=True)
    for p, g, t in zip(axes, (b, a), titles, strict=True):
        heatmap(g, ax=p, title=t, label=label, cmap=cmap, vmin=vmin, vmax=vmax, annotate=annotate, extrema=extrema)
    fig.suptitle(f"{label} over the surface (u, v): {titles[0]} vs {titles[1]}" if title is None else title)
    return fig


def surface_3d(grids: Sequence, *, ax: Sequence[Axes] | None = None, titles: Sequence[str] | None = None,
               zlabel: str = "loss", title: str | None = None, cmap: str = "viridis") -> Figure:
    """3-D views of one or more grids over (u, v) (the Bézier-surface paper's Figure 1: before / after);
    all panels use one z range and colour scale, so a drop in loss is visible as such.

    Args:
      grids: ``[S, S]`` grids, one panel each.
      ax: one 3-D axes per grid (``fig.add_subplot(projection="3d")``); ``None`` makes a new figure.
      titles: panel titles (default ``"grid 1"``, ...; for two grids ``"before training"``,
        ``"after training"``).
      zlabel: what the grids hold.
      title: figure title; default ``"<zlabel> over the surface (u, v)"``.
      cmap: matplotlib colormap name.

    Returns:
      The figure drawn into.

    Example:
      >>> import numpy as np
      >>> from mclandscape.plots import surface_3d
      >>> g = np.add.outer(np.linspace(0, 1, 4), np.linspace(0, 1, 4))
      >>> fig = surface_3d([g, g / 2], zlabel="train loss")
      >>> len(fig.axes), fig.axes[0].get_zlim() == fig.axes[1].get_zlim()
      (2, True)
    """
    grids = [_square(g, "grid") for g in grids]
    if not grids:
        raise ValueError("surface_3d needs at least one grid")
    if titles is None:
        titles = ("before training", "after training") if len(grids) == 2 else [f"grid {k + 1}"
                                                                                for k in range(len(grids))]
    if len(titles) != len(grids):
        raise ValueError(f"{len(grids)} grids but {len(titles)} titles")
    vmin, vmax = shared_range(*grids)
    fig, axes, _ = figure_and_panels(ax, len(grids), figsize=(5.5 * len(grids), 4.5), name="surface_3d",
                                     projection="3d", tight=True)
    for p, g, t in zip(axes, grids, titles, strict=True):
        s = np.linspace(0, 1, g.shape[0])
        uu, vv = np.meshgrid(s, s, indexing="ij")
        p.plot_surface(uu, vv, g, cmap=cmap, edgecolor="k", linewidth=0.2, vmin=vmin, vmax=vmax)
        p.set(xlabel="u", ylabel="v", zlabel=zlabel, title=t, zlim=(vmin, vmax))
    fig.suptitle(f"{zlabel} over the surface (u, v)" if title is None else title)
    return fig


def triangle_plot(points, values, *, ax: Axes | None = None, label: str = "test accuracy", title: str | None = None,
                  cmap: str = "viridis") -> Figure:
    """Values on the linear surface of three models over barycentric ``points [P, 3]`` (the Bézier-surface
    paper's Figure 3).

    Args:
      points: ``[P, 3]`` barycentric weights ``(a1, a2, a3)`` of the models.
      values: ``[P]`` value at every point (e.g. test accuracy).
      ax: axes to draw into; ``None`` makes a new figure.
      label: what the values are (colour-bar label).
      title: default ``"<label> on the linear surface a1·θ1 + a2·θ2 + a3·θ3"``.
      cmap: matplotlib colormap name.

    Returns:
      The figure drawn into.

    Example:
      >>> import numpy as np
      >>> from mclandscape.plots import triangle_plot
      >>> pts = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1/3, 1/3, 1/3]])
      >>> fig = triangle_plot(pts, np.array([0.9, 0.8, 0.85, 0.3]))
      >>> len(fig.axes)  # the triangle and its colour bar
      2
    """
    p, v = np.asarray(points, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3 or v.shape != (p.shape[0],):
        raise ValueError(f"need points [P, 3] and values [P], got {p.shape} and {v.shape}")
    verts = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])
    xy = p @ verts
    fig, ax = figure_and_axes(ax, figsize=(5.5, 4.8), name="triangle_plot")
    tc = ax.tricontourf(xy[:, 0], xy[:, 1], v, levels=20, cmap=cmap)
    ax.scatter(xy[:, 0], xy[:, 1], c=v, cmap=cmap, norm=tc.norm, edgecolors="k", linewidths=0.3, s=18)
    fig.colorbar(tc, ax=ax, label=label)
    for (x, y), n in zip(verts, ("model 1", "model 2", "model 3"), strict=True):
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(0, -12 if y == 0 else 6), ha="center")
    ax.set(aspect="equal", xlim=(-0.12, 1.12), ylim=(-0.08, np.sqrt(3) / 2 + 0.08))
    ax.axis("off")
    ax.set_title(f"{label} on the linear surface a1·θ1 + a2·θ2 + a3·θ3" if title is None else title, fontsize=10,
                 wrap=True)
    return fig


def subset_comparison(full, subset, *, ax: Sequence[Axes] | None = None, label: str = "value",
                      title: str | None = None, shared_scale: bool = True, cmap: str = "viridis") -> Figure:
    """A grid evaluated on a data subset next to the same grid on all the data, valley (▼, least value) and
    peak (▲, largest value) of each marked (the Bézier-surface paper's Appendix B, Figure 9).

    Args:
      full: ``[S, S]`` grid evaluated on all the data (right panel).
      subset: ``[S, S]`` grid evaluated on the subset (left panel).
      ax: two axes to draw into; ``None`` makes a new figure.
      label: the metric (colour-bar label).
      title: default ``"<label> over the surface (u, v): data subset vs all data"``.
      shared_scale: one colour scale for both panels.
      cmap: matplotlib colormap name.

    Returns:
      The figure drawn into.

    Example:
      >>> import numpy as np
      >>> from mclandscape.plots import subset_comparison
      >>> g = np.linspace(0, 1, 9).reshape(3, 3)
      >>> fig = subset_comparison(g, g + 0.1, label="train loss")
      >>> [tuple(round(c, 2) for c in ax.images[0].get_clim()) for ax in fig.axes if ax.images]
      [(0.0, 1.1), (0.0, 1.1)]
    """
    s, f = _pair(subset=subset, full=full)
    return heatmap_pair(s, f, ax=ax, label=label, title=title, titles=("data subset", "all data"),
                        shared_scale=shared_scale, cmap=cmap, annotate=False, extrema=True)
