"""The plotting convention shared by every figure function, and the helpers that implement it.

Every figure function has the form ``fn(data..., *, ax=None, title=..., ...) -> Figure``: with ``ax=None`` it
makes its own :class:`matplotlib.figure.Figure`; given an ``Axes`` (or, for a function that draws several
panels, a sequence of one ``Axes`` per panel) it draws there and returns ``ax.figure``. Writing a file is
separate: :func:`save`. Figures get an Agg canvas directly and are never registered with pyplot, so using
the plots neither changes matplotlib's global backend (a notebook keeps its own) nor needs a display, and
there is nothing to close.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["new_figure", "subplots", "save", "shared_range"]


def new_figure(figsize: tuple[float, float] = (6.4, 4.8), **kwargs) -> Figure:
    """A ``Figure`` with an Agg canvas, not registered with pyplot (so nothing to close).

    Args:
      figsize: width and height in inches.
      **kwargs: passed to :class:`matplotlib.figure.Figure` (e.g. ``layout="constrained"``).

    Returns:
      The new figure, without axes.

    Example:
      >>> from mclandscape.plots import new_figure
      >>> fig = new_figure((3, 2))
      >>> [round(float(v), 1) for v in fig.get_size_inches()], len(fig.axes)
      ([3.0, 2.0], 0)
    """
    fig = Figure(figsize=figsize, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] = (6.4, 4.8), **kwargs):
    """``(figure, axes)`` like ``pyplot.subplots``, without pyplot: a grid of axes to pass as ``ax=``.

    Args:
      nrows: rows of panels.
      ncols: columns of panels.
      figsize: width and height in inches.
      **kwargs: passed to :meth:`matplotlib.figure.Figure.subplots` (``squeeze``, ``sharey``, ...).

    Returns:
      ``(fig, axes)``: the figure and one ``Axes`` or an array of them.

    Example:
      >>> from mclandscape.plots import subplots
      >>> fig, axes = subplots(1, 2, figsize=(6, 3))
      >>> len(fig.axes), axes.shape
      (2, (2,))
    """
    fig = new_figure(figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save(fig: Figure, path: str | os.PathLike, *, dpi: int = 120) -> str:
    """Write ``fig`` as a PNG (parent folders created).

    Args:
      fig: the figure returned by a plot function (or ``ax.figure``).
      path: where to write; the format follows the suffix (``.png`` in the experiments).
      dpi: resolution.

    Returns:
      ``path`` as a string.

    Example:
      >>> import os, tempfile
      >>> from mclandscape.plots import heatmap, save
      >>> d = tempfile.mkdtemp()
      >>> p = save(heatmap([[0.0, 1.0], [2.0, 3.0]], label="loss"), os.path.join(d, "sub", "h.png"))
      >>> open(p, "rb").read(4) == b"\\x89PNG"
      True
    """
    if not isinstance(fig, Figure):
        raise TypeError(f"save expects a matplotlib Figure (what the plot functions return), got {type(fig).__name__}")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def shared_range(*arrays) -> tuple[float, float]:
    """One ``(vmin, vmax)`` over the finite values of all arrays: the colour scale a before/after pair shares.

    Args:
      *arrays: array-likes of any shapes.

    Returns:
      ``(vmin, vmax)`` as floats.

    Example:
      >>> from mclandscape.plots import shared_range
      >>> shared_range([[0.5, 2.0]], [1.0, float("nan"), -1.0])
      (-1.0, 2.0)
    """
    vals = np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in arrays] + [np.zeros(0)])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        raise ValueError("no finite values to set a colour scale from")
    return float(vals.min()), float(vals.max())


# ---- the ax= convention -------------------------------------------------------------------------------


def figure_and_axes(ax: Axes | None, *, figsize: tuple[float, float], name: str, projection: str | None = None,
                    tight: bool = False) -> tuple[Figure, Axes]:
    """``(ax.figure, ax)`` when an ``Axes`` is given, else a new figure with one axes (``projection`` e.g. 3d;
    ``tight``: laid out with ``tight_layout`` when drawn)."""
    if ax is not None and not isinstance(ax, Axes):
        raise TypeError(f"{name} draws one panel: ax must be a matplotlib Axes or None, got {type(ax).__name__}")
    fig, axes, _ = figure_and_panels(None if ax is None else [ax], 1, figsize=figsize, name=name,
                                     projection=projection, tight=tight)
    return fig, axes[0]


def figure_and_panels(ax: Sequence[Axes] | None, n: int, *, figsize: tuple[float, float], name: str,
                      projection: str | None = None, nrows: int = 1,
                      tight: bool = False) -> tuple[Figure, list[Axes], bool]:
    """``(figure, n axes, made)`` for a function that draws ``n`` panels: the given sequence of ``n`` Axes
    (they must share one figure), or a new figure with ``nrows`` rows of panels (extra cells hidden), laid out
    with ``tight_layout`` when drawn if ``tight``."""
    if ax is None:
        fig = new_figure(figsize, layout="tight" if tight else None)
        axes = list(fig.subplots(nrows, -(-n // nrows), squeeze=False, subplot_kw={"projection": projection}).ravel())
        for extra in axes[n:]:
            extra.set_visible(False)
        return fig, axes[:n], True
    if isinstance(ax, Axes) or not isinstance(ax, Sequence | np.ndarray):
        raise TypeError(f"{name} draws {n} panels: ax must be a sequence of {n} Axes or None, got "
                        f"{type(ax).__name__}")
    axes = list(np.ravel(np.asarray(ax, dtype=object)))
    if len(axes) != n or not all(isinstance(a, Axes) for a in axes):
        raise ValueError(f"{name} draws {n} panels: ax must hold {n} Axes, got {len(axes)} items")
    if any(a.figure is not axes[0].figure for a in axes):
        raise ValueError(f"{name}: the axes passed as ax belong to different figures")
    wrong = {a.name for a in axes} - {projection or "rectilinear"}
    if wrong:
        raise ValueError(f"{name} needs {projection or 'rectilinear'} axes (fig.add_subplot(projection="
                         f"{projection!r})), got {wrong.pop()!r} axes")
    return axes[0].figure, axes, False


# ---- legible per-cell values --------------------------------------------------------------------------


def text_colour(rgba) -> str:
    """Black on light backgrounds, white on dark ones (relative luminance of the sRGB colour)."""
    c = np.asarray(rgba[:3], np.float64)
    lum = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4) @ np.array([0.2126, 0.7152, 0.0722])
    return "black" if lum > 0.179 else "white"  # the contrast-ratio crossover of black vs white text


def annotate_cells(ax: Axes, values: np.ndarray, xs, ys, image, *, fmt: str = ".2f") -> list:
    """Write ``values[i, j]`` at ``(xs[i], ys[j])`` in a colour that contrasts with the cell's colour in ``image``
    (its colormap and norm), in a font size (3 to 11 points) at which the longest label fits one cell of the
    (square-aspect) image. Returns the text artists."""
    labels = [[format(v, fmt) if np.isfinite(v) else "" for v in row] for row in values]
    w_in, h_in = ax.figure.get_size_inches()
    box = ax.get_position()
    cell_pt = 72.0 * min(box.width * w_in, box.height * h_in) / max(values.shape)  # equal aspect: a square image
    # a digit is ~0.6 em wide; leave a margin so neighbouring labels do not touch
    size = float(np.clip(0.8 * cell_pt / (0.6 * max([len(s) for row in labels for s in row] + [1])), 3.0, 11.0))
    return [ax.text(x, y, labels[i][j], ha="center", va="center", fontsize=size,
                    color=text_colour(image.cmap(image.norm(values[i, j]))))
            for i, x in enumerate(xs) for j, y in enumerate(ys) if labels[i][j]]
