import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mclandscape.core import connectors as C
from mclandscape.engine.connector_train import fit_connector, make_connector_loss, uniform_sampler


def double_well(p):
    """Two minima at (+-1, 0) separated by a barrier at the origin; low valley around x^2 + y^2 = 1."""
    x, y = p["xy"][0], p["xy"][1]
    return (x * x + y * y - 1.0) ** 2 + 2.0 * jnp.exp(-4 * (x * x + y * y))


def _curve(degree=2):
    return C.bezier_curve({"xy": jnp.array([-1.0, 0.0])}, {"xy": jnp.array([1.0, 0.0])}, degree)


def _batches(n):
    return lambda epoch: [None] * n


def test_training_goes_around_barrier_and_keeps_fixed_points_bit_identical():
    curve = _curve(3)
    # Break the symmetry so the bends can leave the straight line.
    ctrl = jax.tree_util.tree_map(lambda x: x.at[1:3, 1].add(0.05), curve.control)
    curve = curve.replace(control=ctrl)
    loss = lambda params, batch, key: double_well(params)
    ts = jnp.linspace(0, 1, 41)
    before = float(jnp.max(jax.vmap(lambda c: double_well({"xy": c}))(curve.points(ts)["xy"])))
    res = fit_connector(curve, loss, _batches(50), epochs=6, optimizer=optax.adam(0.05), num_samples=8, seed=1)
    after = float(jnp.max(jax.vmap(lambda c: double_well({"xy": c}))(res.connector.points(ts)["xy"])))
    assert after < 0.5 * before, (before, after)
    np.testing.assert_array_equal(np.asarray(res.connector.control["xy"])[[0, -1]],
                                  np.asarray(curve.control["xy"])[[0, -1]])
    assert len(res.history) == 6 and res.history[-1]["loss"] < res.history[0]["loss"]


def test_custom_mask_freezes_chosen_points_even_with_weight_decay():
    curve = _curve(3)
    trainable = np.array([False, True, False, False])
    loss = lambda params, batch, key: double_well(params)
    opt = optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.05, momentum=0.9))
    res = fit_connector(curve, loss, _batches(5), epochs=2, optimizer=opt, trainable=trainable, l2=1e-3)
    c0, c1 = np.asarray(curve.control["xy"]), np.asarray(res.connector.control["xy"])
    np.testing.assert_array_equal(c1[[0, 2, 3]], c0[[0, 2, 3]])
    assert not np.array_equal(c1[1], c0[1])


def test_loss_is_mean_over_samples_plus_l2():
    curve = _curve(2)
    loss = make_connector_loss(lambda p, b, k: jnp.sum(p["xy"] ** 2), curve, num_samples=4,
                               sampler=uniform_sampler(1), l2=0.5)
    key = jax.random.key(0)
    obj, per = loss(curve.control, None, key)
    pts = uniform_sampler(1)(jax.random.split(key)[0], 4)
    ref = np.mean([np.sum(np.asarray(curve.point(t)["xy"]) ** 2) for t in pts])
    middle = float(jnp.sum(curve.control["xy"][1] ** 2))
    np.testing.assert_allclose(float(obj), ref + 0.25 * middle, rtol=1e-5)
    assert per.shape == (4,)


def test_bad_inputs():
    curve = _curve(2)
    loss = lambda params, batch, key: double_well(params)
    with pytest.raises(ValueError, match="no trainable"):
        fit_connector(curve, loss, _batches(1), epochs=1, optimizer=optax.sgd(0.1), trainable=np.zeros(3, bool))
    with pytest.raises(ValueError, match="num_samples"):
        fit_connector(curve, loss, _batches(1), epochs=1, optimizer=optax.sgd(0.1), num_samples=0)
    with pytest.raises(ValueError, match="no batch"):
        fit_connector(curve, loss, _batches(0), epochs=1, optimizer=optax.sgd(0.1))
