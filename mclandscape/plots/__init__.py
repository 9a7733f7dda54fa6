"""Figures (matplotlib): surfaces, landscapes, paths, TRUST-TECH searches and volumes.

One convention for every figure function: ``fn(data..., *, ax=None, title=..., ...) -> Figure``. With
``ax=None`` the function makes its own figure; given an ``Axes`` (a sequence of them when it draws several
panels) it draws there, so figures compose; the ``Figure`` is returned and :func:`save` writes it. Default
titles say what is shown; before/after pairs share one colour scale. Figures are never registered with
pyplot and matplotlib's backend is left alone.

Example:
  >>> import numpy as np
  >>> import mclandscape as mcl
  >>> g = np.linspace(0, 1, 9).reshape(3, 3)
  >>> fig, axes = mcl.plots.subplots(1, 2, figsize=(9, 4))
  >>> _ = mcl.plots.heatmap(g, ax=axes[0], label="train loss")
  >>> _ = mcl.plots.heatmap(1 - g, ax=axes[1], label="test accuracy")
  >>> len(fig.axes)  # two heat-maps and their colour bars
  4
"""

from mclandscape.plots._figure import new_figure, save, shared_range, subplots
from mclandscape.plots.landscape import contour_plot, eigenvalue_plot, loss_curves_plot, surface_plot, trajectory_panels
from mclandscape.plots.paths import plot_band_2d, plot_path_profiles
from mclandscape.plots.surface import heatmap, heatmap_pair, subset_comparison, surface_3d, triangle_plot
from mclandscape.plots.trusttech import plot_search_trace, plot_verification
from mclandscape.plots.volume import plot_h_curves, plot_h_mean, plot_h_panels

__all__ = [
    "save", "new_figure", "subplots", "shared_range",
    "contour_plot", "eigenvalue_plot", "loss_curves_plot", "surface_plot", "trajectory_panels",
    "plot_band_2d", "plot_path_profiles",
    "heatmap", "heatmap_pair", "subset_comparison", "surface_3d", "triangle_plot",
    "plot_search_trace", "plot_verification",
    "plot_h_curves", "plot_h_mean", "plot_h_panels",
]
