"""Li et al. (2018) normalised directions, loss curves/planes (Chen et al. 2021, Fig. 5) and the landscape plots."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mclandscape.core.tree import TreeMismatchError, tree_norm, tree_stack
from mclandscape.engine.evaluate import evaluate
from mclandscape.engine.models import get_model
from mclandscape.engine.points import stacked_points
from mclandscape.methods import directions as D
from mclandscape.methods.directions import (
    filter_norms,
    loss_curve,
    loss_plane,
    normalize_direction,
    random_direction,
    random_directions,
)
from mclandscape.plots import (
    contour_plot,
    eigenvalue_plot,
    loss_curves_plot,
    save,
    surface_plot,
    trajectory_panels,
)


@pytest.fixture(scope="module")
def cnn():
    model = get_model("simple_cnn", num_classes=4, channels=[3, 5], hidden=8, dropout=0.0)
    x = np.asarray(jax.random.normal(jax.random.key(0), (40, 8, 8, 1)), np.float32)
    y = np.asarray(jax.random.randint(jax.random.key(1), (40,), 0, 4), np.int32)
    params = model.init(jax.random.key(2), x[:1])["params"]
    return model, params, (x, y)


def _leaves(t):
    return jax.tree_util.tree_flatten_with_path(t)[0]


def test_filter_normalised_direction_has_the_models_filter_norms(cnn):
    _, params, _ = cnn
    d = random_direction(jax.random.key(3), params, norm="filter", bias_bn="zero")
    kernels = 0
    for (path, w), (_, dl) in zip(_leaves(params), _leaves(d), strict=True):
        if w.ndim >= 2:  # conv [h, w, in, out] and dense [in, out]: one filter per output unit
            kernels += 1
            np.testing.assert_allclose(np.asarray(filter_norms(dl)), np.asarray(filter_norms(w)), rtol=1e-5)
            assert filter_norms(dl).shape == (w.shape[-1],)
            assert not np.allclose(np.asarray(dl), np.asarray(w))  # a random direction, not the weights
        else:
            assert np.all(np.asarray(dl) == 0), f"bias {jax.tree_util.keystr(path)} should not move"
    assert kernels == 4  # stem, conv1, fc, head
    # the copy option (Li et al.'s default for biases) and the normalize option
    dc = random_direction(jax.random.key(3), params, bias_bn="copy")
    dn = random_direction(jax.random.key(3), params, bias_bn="normalize")
    for (_, w), (_, a), (_, b) in zip(_leaves(params), _leaves(dc), _leaves(dn), strict=True):
        if w.ndim == 1:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(w))
            np.testing.assert_allclose(np.abs(np.asarray(b)), np.abs(np.asarray(w)), rtol=1e-6)


def test_layer_weight_unit_and_none_normalisations(cnn):
    _, params, _ = cnn
    key = jax.random.key(4)
    raw = jax.tree_util.tree_map(lambda a: a, random_direction(key, params, norm="none", bias_bn="normalize"))
    lay = normalize_direction(raw, params, norm="layer", bias_bn="normalize")
    for (_, w), (_, dl) in zip(_leaves(params), _leaves(lay), strict=True):
        if float(jnp.linalg.norm(w)) > 0:
            np.testing.assert_allclose(float(jnp.linalg.norm(dl)), float(jnp.linalg.norm(w)), rtol=1e-5)
    wt = normalize_direction(raw, params, norm="weight", bias_bn="normalize")
    for (_, w), (_, r), (_, dl) in zip(_leaves(params), _leaves(raw), _leaves(wt), strict=True):
        np.testing.assert_allclose(np.asarray(dl), np.asarray(r) * np.asarray(w), rtol=1e-6)
    unit = normalize_direction(raw, params, norm="unit", bias_bn="normalize")
    assert abs(float(tree_norm(unit)) - 1.0) < 1e-5
    with pytest.raises(ValueError, match="norm must be one of"):
        normalize_direction(raw, params, norm="batch")
    with pytest.raises(ValueError, match="bias_bn must be one of"):
        normalize_direction(raw, params, bias_bn="ignore")
    with pytest.raises(TreeMismatchError):
        normalize_direction({"a": jnp.ones(3)}, params)
    d1, d2 = random_directions(jax.random.key(5), params, 2)
    assert not np.allclose(np.asarray(d1["head"]["kernel"]), np.asarray(d2["head"]["kernel"]))


def test_loss_curve_and_plane_through_the_evaluator(cnn, tmp_path, monkeypatch):
    model, params, data = cnn
    d1, d2 = random_directions(jax.random.key(6), params, 2)
    alphas = np.linspace(-1.0, 1.0, 5)
    seen = []  # what reaches the evaluator: the stack of 2 (curve) or 3 (plane) trees, never the grid's copies
    real = D.evaluate
    monkeypatch.setattr(D, "evaluate", lambda model, points, data, **kw: seen.append(points) or real(
        model, points, data, **kw))
    curve = loss_curve(model, params, d1, alphas, data, batch_size=16)
    centre = evaluate(model, stacked_points(tree_stack([params])), data, batch_size=16)
    np.testing.assert_allclose(curve.loss[2], centre.loss[0], rtol=1e-5)
    edge = evaluate(model, stacked_points(tree_stack([optax.tree.add(params, d1)])), data, batch_size=16)
    np.testing.assert_allclose(curve.loss[-1], edge.loss[0], rtol=1e-5)
    betas = np.linspace(-0.5, 0.5, 3)
    plane = loss_plane(model, params, d1, d2, alphas, betas, data, batch_size=16)
    assert plane.loss.shape == (5, 3) and plane.accuracy.shape == (5, 3)
    np.testing.assert_allclose(plane.loss[2, 1], centre.loss[0], rtol=1e-5)
    np.testing.assert_allclose(plane.loss[:, 1], curve.loss, rtol=1e-5)  # beta = 0 row is the curve
    assert np.all(np.isfinite(plane.loss))
    assert [p.num_stacked for p in seen] == [2, 3] and [p.num_points for p in seen] == [5, 15]
    # every point equals the evaluation of its explicitly built parameters (the old stacked-grid path)
    explicit = tree_stack([jax.tree_util.tree_map(lambda p, x, y, a=a, b=b: p + a * x + b * y, params, d1, d2)
                           for a in alphas for b in betas])
    ref = evaluate(model, stacked_points(explicit), data, batch_size=16)
    np.testing.assert_allclose(plane.loss.ravel(), ref.loss, rtol=1e-5)
    np.testing.assert_allclose(plane.accuracy.ravel(), ref.accuracy)
    with pytest.raises(ValueError, match="alphas"):
        loss_curve(model, params, d1, [0.0], data)
    with pytest.raises(ValueError, match="betas"):
        loss_plane(model, params, d1, d2, alphas, [0.0, np.inf], data)
    with pytest.raises(TreeMismatchError):
        loss_plane(model, params, d1, {"a": jnp.ones(2)}, alphas, betas, data)
    # plots of these results
    out = str(tmp_path)
    files = [
        save(contour_plot(plane.alphas, plane.betas, plane.loss, title="plane", points={"theta*": (0.0, 0.0)}),
             os.path.join(out, "c.png")),
        save(surface_plot(plane.alphas, plane.betas, plane.loss, log=True), os.path.join(out, "s.png")),
        save(loss_curves_plot({"a": (curve.alphas, curve.loss), "b": (curve.alphas, 2 * curve.loss)}),
             os.path.join(out, "l.png")),
    ]
    for f in files:
        assert os.path.getsize(f) > 1000
    with pytest.raises(ValueError, match="Z must be"):
        contour_plot(alphas, [0.0, 1.0], plane.loss)


def test_a_second_curve_and_plane_compile_nothing(cnn, count_compiles):
    """loss_curve and loss_plane are views on the one evaluator: equal calls (new directions of the same
    shapes, new coordinates of the same count) reuse its compiled map."""
    model, params, data = cnn

    def views(seed):
        d1, d2 = random_directions(jax.random.key(seed), params, 2)
        return (loss_curve(model, params, d1, np.linspace(-1.0, 1.0, 3) * seed, data, batch_size=16),
                loss_plane(model, params, d1, d2, [-0.5, 0.5], [0.0, 0.5 * seed], data, batch_size=16))

    views(1)
    with count_compiles() as seen:
        curve, plane = views(2)
    assert seen == [] and curve.loss.shape == (3,) and plane.loss.shape == (2, 2)


def test_trajectory_and_eigenvalue_plots(tmp_path):
    xs = np.linspace(-2, 2, 21)
    Z = xs[:, None] ** 2 + 2 * xs[None, :] ** 2
    tr = np.stack([np.linspace(-1.5, 0, 10), np.linspace(1.5, 0, 10)], axis=1)
    f1 = save(trajectory_panels(xs, xs, Z, {"original": {"GD": tr}, "deformed": {"GD": tr[None]}}),
              tmp_path / "t.png")
    f2 = save(eigenvalue_plot({"GD": np.random.default_rng(0).random((20, 2))}), tmp_path / "e.png")
    assert os.path.getsize(f1) > 1000 and os.path.getsize(f2) > 1000
    with pytest.raises(ValueError, match="trajectory"):
        trajectory_panels(xs, xs, Z, {"a": {"GD": np.zeros((3, 3))}})
