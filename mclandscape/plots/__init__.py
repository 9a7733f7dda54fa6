"""Figures (matplotlib): surfaces, landscapes, paths, TRUST-TECH searches and volumes."""

from mclandscape.plots.landscape import (
    contour_plot,
    eigenvalue_plot,
    loss_curves_plot,
    surface_plot,
    trajectory_panels,
)
from mclandscape.plots.paths import plot_band_2d, plot_path_profiles
from mclandscape.plots.surface import heatmap, heatmap_pair, subset_comparison, surface_3d, triangle_plot
from mclandscape.plots.trusttech import plot_search_trace, plot_verification
from mclandscape.plots.volume import plot_h_curves, plot_h_mean, plot_h_panels, save_figure

__all__ = [
    "contour_plot", "eigenvalue_plot", "loss_curves_plot", "surface_plot", "trajectory_panels",
    "plot_band_2d", "plot_path_profiles",
    "heatmap", "heatmap_pair", "subset_comparison", "surface_3d", "triangle_plot",
    "plot_search_trace", "plot_verification",
    "plot_h_curves", "plot_h_mean", "plot_h_panels", "save_figure",
]
