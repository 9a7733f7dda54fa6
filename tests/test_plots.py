"""The plotting convention: every figure function returns a Figure, draws into given axes, pairs share one
colour scale, per-cell values are legible, titles say what is shown, ``save`` writes a PNG, and nothing is
registered with pyplot (here, and in a fresh process with the backend left alone: tests/test_layout.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from matplotlib import _pylab_helpers
from matplotlib.figure import Figure

from mclandscape import plots
from mclandscape.methods.volume import HSweep
from mclandscape.plots import _figure

G = np.linspace(0.0, 1.0, 16).reshape(4, 4)  # a 4 x 4 (u, v) grid
XS = np.linspace(-1.0, 1.0, 6)
Z = np.add.outer(XS ** 2, 2 * XS ** 2)
TRAJ = np.stack([np.linspace(-0.9, 0.0, 5), np.linspace(0.9, 0.0, 5)], axis=1)
TRI_POINTS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0], [0, 0.5, 0.5], [0.5, 0, 0.5],
                       [1 / 3, 1 / 3, 1 / 3]])
PATH = {"ts": np.linspace(0, 1, 5), "dl": np.r_[0.0, np.ones(4)], "train_loss": np.array([0, .2, .3, .2, 0]),
        "train_acc": np.full(5, 0.9), "test_loss": np.array([.1, .3, .4, .3, .1]), "test_acc": np.full(5, 0.8)}


def _sweep(h) -> HSweep:
    h = np.asarray(h)
    z = np.zeros(h.shape)
    return HSweep(steps=np.array([0.2, 0.1][:h.shape[0]]), multipliers=np.array([1.5, 2.0, 3.0][:h.shape[1]]),
                  epsilon=0.1, H=h, evaluations=z, visited=z, truncated=np.array([[False] * h.shape[1]] * h.shape[0]),
                  wall_time=z, dim=2, cell_factor=1.0)


SW = _sweep([[2, 6, 20], [5, 30, 90]])
MEAN = {"steps": [1.0], "mean_c": [1.0, 2.0, 3.0], "mean_log_H": [[0.5, 1.0, 2.0]], "std_log_H": [[0.1] * 3],
        "any_truncated": [[False, False, True]]}

# name -> (draw(ax), panels, projection): panels None means one Axes, an int n means a sequence of n Axes
CASES = {
    "heatmap": (lambda ax: plots.heatmap(G, ax=ax, label="train loss"), None, None),
    "heatmap_pair": (lambda ax: plots.heatmap_pair(G, G / 2, ax=ax, label="train loss"), 2, None),
    "surface_3d": (lambda ax: plots.surface_3d([G, G / 2], ax=ax, zlabel="train loss"), 2, "3d"),
    "triangle_plot": (lambda ax: plots.triangle_plot(TRI_POINTS, np.linspace(0.5, 0.9, 7), ax=ax), None, None),
    "subset_comparison": (lambda ax: plots.subset_comparison(G, G + 0.1, ax=ax, label="test accuracy"), 2, None),
    "contour_plot": (lambda ax: plots.contour_plot(XS, XS, Z, ax=ax, trajectories={"GD": TRAJ},
                                                   points={"minimum": (0, 0)}), None, None),
    "trajectory_panels": (lambda ax: plots.trajectory_panels(XS, XS, Z, {"original": {"GD": TRAJ},
                                                                         "deformed": {"GD": TRAJ[None]}}, ax=ax,
                                                             log=True), 2, None),
    "surface_plot": (lambda ax: plots.surface_plot(XS, XS, Z, ax=ax, trajectory=(TRAJ, np.ones(5))), None, "3d"),
    "loss_curves_plot": (lambda ax: plots.loss_curves_plot({"a": (XS, XS ** 2), "b": (XS, 2 * XS ** 2),
                                                            "c": (XS, XS ** 4)}, ax=ax), 3, None),
    "loss_curves_plot_overlay": (lambda ax: plots.loss_curves_plot({"a": (XS, XS ** 2), "b": (XS, XS ** 4)},
                                                                   ax=ax, layout="overlay", log=True), None, None),
    "eigenvalue_plot": (lambda ax: plots.eigenvalue_plot({"GD": np.array([[0.1, 2.0], [-0.2, 3.0]])}, ax=ax),
                        None, None),
    "plot_path_profiles": (lambda ax: plots.plot_path_profiles({"line": PATH, "curve": {**PATH, "test_loss": None}},
                                                               ax=ax, x="length"), 2, None),
    "plot_band_2d": (lambda ax: plots.plot_band_2d(lambda xy: (xy[..., 0] ** 2 - 1) ** 2 + xy[..., 1] ** 2,
                                                   {"band": np.stack([XS, 0 * XS], 1)}, ax=ax, resolution=20,
                                                   markers={"saddle": (0.0, 0.0)}, vmax=2.0), None, None),
    "plot_h_curves": (lambda ax: plots.plot_h_curves(SW, ax=ax), None, None),
    "plot_h_panels": (lambda ax: plots.plot_h_panels({"raw": SW, "qr": SW}, ax=ax), 2, None),
    "plot_h_mean": (lambda ax: plots.plot_h_mean(MEAN, ax=ax), None, None),
}


def _no_pyplot_figures() -> bool:
    return _pylab_helpers.Gcf.get_num_fig_managers() == 0


@pytest.mark.parametrize("name", sorted(CASES))
def test_returns_a_figure_and_draws_into_given_axes(name, tmp_path):
    draw, panels, projection = CASES[name]
    fig = draw(None)
    assert isinstance(fig, Figure) and fig.axes, f"{name} returned {type(fig).__name__}"
    titles = [a.get_title() for a in fig.axes] + [fig._suptitle.get_text() if fig._suptitle else ""]
    assert any(titles), f"{name} draws no title"
    assert not any("figure" in t.lower() for t in titles), f"{name}: a title names a paper figure: {titles}"
    # drawn into a figure of the caller's: the same figure comes back and the given axes hold the drawing
    host = _figure.new_figure((12, 4))
    n = panels or 1
    axes = [host.add_subplot(1, n, k + 1, projection=projection) for k in range(n)]
    out = draw(axes[0] if panels is None else axes)
    assert out is host
    assert all(a.has_data() for a in axes)
    assert all(a in host.axes for a in axes)
    p = plots.save(out, tmp_path / "sub" / f"{name}.png", dpi=40)  # a small PNG is as much a PNG
    assert p == os.fspath(tmp_path / "sub" / f"{name}.png")
    with open(p, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(p) > 1000
    assert _no_pyplot_figures()


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c[1] is not None))
def test_multi_panel_functions_reject_a_single_axes_or_the_wrong_count(name):
    draw, panels, projection = CASES[name]
    host = _figure.new_figure()
    one = host.add_subplot(121, projection=projection)
    with pytest.raises(TypeError, match="sequence"):
        draw(one)
    with pytest.raises(ValueError, match=f"{panels} Axes"):
        draw([one] * (panels + 1))


def test_single_panel_functions_reject_a_sequence_and_3d_needs_3d_axes():
    host = _figure.new_figure()
    flat = host.add_subplot(111)
    with pytest.raises(TypeError, match="one panel"):
        plots.heatmap(G, ax=[flat])
    with pytest.raises(ValueError, match="3d axes"):
        plots.surface_plot(XS, XS, Z, ax=flat)
    with pytest.raises(ValueError, match="3d axes"):
        plots.surface_3d([G, G], ax=[flat, flat])
    with pytest.raises(ValueError, match="rectilinear"):
        plots.heatmap(G, ax=host.add_subplot(122, projection="3d"))
    other = _figure.new_figure().add_subplot(111)
    with pytest.raises(ValueError, match="different figures"):
        plots.heatmap_pair(G, G, ax=[flat, other])


def _clims(fig):
    return [a.images[0].get_clim() for a in fig.axes if a.images]


def test_pairs_share_one_colour_scale_by_default():
    before, after = G, 0.25 * G + 0.5
    hm = plots.heatmap_pair(before, after, label="train loss")
    assert _clims(hm) == [(0.0, 1.0), (0.0, 1.0)]
    own = plots.heatmap_pair(before, after, label="train loss", shared_scale=False)
    assert _clims(own) == [(0.0, 1.0), (0.5, 0.75)]
    sub = plots.subset_comparison(before, after, label="train loss")
    assert _clims(sub) == [(0.0, 1.0), (0.0, 1.0)]
    # the subset (left) panel marks its valley (v) at the (u, v) = (0, 0) corner and its peak (^) at (1, 1)
    assert [(tuple(ln.get_xydata()[0]), ln.get_marker()) for ln in sub.axes[0].lines] == [((0, 0), "v"), ((1, 1), "^")]
    assert sub._suptitle.get_text() == "train loss over the surface (u, v): data subset vs all data"
    s3 = plots.surface_3d([before, after])
    assert s3.axes[0].get_zlim() == s3.axes[1].get_zlim() == (0.0, 1.0)
    norms = [a.collections[0].norm for a in s3.axes]
    assert [(n.vmin, n.vmax) for n in norms] == [(0.0, 1.0), (0.0, 1.0)]
    tp = plots.trajectory_panels(XS, XS, Z, {"a": {"GD": TRAJ}, "b": {"GD": TRAJ}})
    levels = [a.collections[0].levels for a in tp.axes[:2]]
    np.testing.assert_array_equal(levels[0], levels[1])
    # separate figures of a pair share a scale when given one
    lo, hi = plots.shared_range(Z, 2 * Z)
    c1 = plots.contour_plot(XS, XS, Z, vmin=lo, vmax=hi)
    c2 = plots.contour_plot(XS, XS, 2 * Z, vmin=lo, vmax=hi)
    np.testing.assert_array_equal(c1.axes[0].collections[0].levels, c2.axes[0].collections[0].levels)
    assert c1.axes[0].collections[0].levels[-1] == pytest.approx(hi)


def test_cell_values_are_legible():
    small = plots.heatmap(G, label="v", cmap="viridis")
    texts = small.axes[0].texts
    assert len(texts) == 16 and {t.get_text() for t in texts} >= {"0.00", "1.00"}
    by_value = {t.get_text(): t for t in texts}
    # viridis runs from dark purple (low) to bright yellow (high): white text on the low cell, black on the high
    assert by_value["0.00"].get_color() == "white" and by_value["1.00"].get_color() == "black"
    large = plots.heatmap(np.linspace(0, 1, 121).reshape(11, 11), label="v")
    size_small, size_large = texts[0].get_fontsize(), large.axes[0].texts[0].get_fontsize()
    assert size_small > size_large >= 3.0  # scaled to the grid, never unreadably small
    assert len(large.axes[0].texts) == 121
    assert len(plots.heatmap(np.zeros((21, 21)), label="v").axes[0].texts) == 0  # too many cells: none by default
    assert _figure.text_colour((1.0, 1.0, 1.0)) == "black" and _figure.text_colour((0.0, 0.0, 0.2)) == "white"


def test_default_titles_say_what_is_shown():
    assert plots.heatmap(G, label="test accuracy").axes[0].get_title() == "test accuracy over the surface (u, v)"
    pair = plots.heatmap_pair(G, G, label="train loss")
    assert pair._suptitle.get_text() == "train loss over the surface (u, v): before training vs after training"
    assert [a.get_title() for a in pair.axes if a.images] == ["before training", "after training"]
    assert plots.contour_plot(XS, XS, Z, xlabel="p1", ylabel="p2").axes[0].get_title() == "loss over the plane (p1, p2)"
    assert plots.heatmap(G, label="x", title="mine").axes[0].get_title() == "mine"


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="square"):
        plots.heatmap_pair(G[:3], G, label="l")
    with pytest.raises(ValueError, match="differ in shape"):
        plots.heatmap_pair(G, np.zeros((5, 5)), label="l")
    with pytest.raises(ValueError, match="no paths"):
        plots.plot_path_profiles({})
    with pytest.raises(ValueError, match="dl"):
        plots.plot_path_profiles({"line": {**PATH, "dl": None}}, x="length")
    with pytest.raises(ValueError, match="Z must be"):
        plots.contour_plot(XS, [0.0, 1.0], Z)
    with pytest.raises(ValueError, match="trajectory"):
        plots.trajectory_panels(XS, XS, Z, {"a": {"GD": np.zeros((3, 3))}})
    with pytest.raises(ValueError, match="titles"):
        plots.surface_3d([G, G], titles=["one"])
    with pytest.raises(ValueError, match="layout"):
        plots.loss_curves_plot({"a": (XS, XS)}, layout="stacked")
    with pytest.raises(ValueError, match="mean_log_h"):
        plots.plot_h_mean({"steps": [1.0]})
    with pytest.raises(ValueError, match="finite"):
        plots.shared_range([np.nan])
    with pytest.raises(TypeError, match="Figure"):
        plots.save(plots.heatmap(G).axes[0], tmp_path / "x.png")
