"""Shared figure helpers: figures are made with ``matplotlib.figure.Figure`` and rendered by the Agg canvas
directly, so importing or using the plots never changes matplotlib's global backend (a notebook keeps its
own) and needs no display."""

from __future__ import annotations

import os

import matplotlib as mpl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["new_figure", "subplots", "save", "color_cycle"]


def new_figure(figsize=(6.4, 4.8)) -> Figure:
    """A ``Figure`` with an Agg canvas (not registered with pyplot, so nothing to close)."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def subplots(nrows: int = 1, ncols: int = 1, *, figsize=(6.4, 4.8), **kwargs):
    """``(figure, axes)`` like ``pyplot.subplots``, without pyplot."""
    fig = new_figure(figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save(fig: Figure, path: str | os.PathLike, *, dpi: int = 120) -> str:
    """Write ``fig`` as a PNG at ``path`` (parent folders created) and return the path as a string."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def color_cycle() -> list[str]:
    """The colours of the current matplotlib style's property cycle."""
    return list(mpl.rcParams["axes.prop_cycle"].by_key()["color"])
