import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mclandscape.core import connectors as C
from mclandscape.core.objective import function_objective
from mclandscape.engine.connector_train import (
    ConnectorConfig,
    ConnectorObjective,
    check_connector,
    dataset_steps,
    train_connector,
    uniform_sampler,
)
from mclandscape.engine.data import Dataset


def double_well(p, batch=None):
    """Two minima at (+-1, 0) separated by a barrier at the origin; low valley around x^2 + y^2 = 1."""
    x, y = p["xy"][0], p["xy"][1]
    return (x * x + y * y - 1.0) ** 2 + 2.0 * jnp.exp(-4 * (x * x + y * y))


WELL = function_objective(double_well)


def _curve(degree=2):
    return C.bezier_curve({"xy": jnp.array([-1.0, 0.0])}, {"xy": jnp.array([1.0, 0.0])}, degree)


def test_training_goes_around_barrier_and_keeps_fixed_points_bit_identical():
    curve = _curve(3)
    # Break the symmetry so the bends can leave the straight line.
    ctrl = jax.tree_util.tree_map(lambda x: x.at[1:3, 1].add(0.05), curve.control)
    curve = curve.replace(control=ctrl)
    ts = jnp.linspace(0, 1, 41)
    before = float(jnp.max(jax.vmap(lambda c: double_well({"xy": c}))(curve.points(ts)["xy"])))
    res = train_connector(WELL, curve, None, ConnectorConfig(epochs=6, optimizer=optax.adam(0.05), steps_per_epoch=50,
                                                             num_samples=8), seed=1)
    after = float(jnp.max(jax.vmap(lambda c: double_well({"xy": c}))(res.connector.points(ts)["xy"])))
    assert after < 0.5 * before, (before, after)
    np.testing.assert_array_equal(np.asarray(res.connector.control["xy"])[[0, -1]],
                                  np.asarray(curve.control["xy"])[[0, -1]])
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4, 5, 6]
    assert res.history[-1]["loss"] < res.history[0]["loss"]


def test_custom_mask_freezes_chosen_points_even_with_weight_decay():
    curve = _curve(3)
    trainable = np.array([False, True, False, False])
    opt = optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.05, momentum=0.9))
    cfg = ConnectorConfig(epochs=2, optimizer=opt, steps_per_epoch=5, weight_decay=1e-3, weight_decay_on="control")
    res = train_connector(WELL, curve, None, cfg, trainable=trainable)
    c0, c1 = np.asarray(curve.control["xy"]), np.asarray(res.connector.control["xy"])
    np.testing.assert_array_equal(c1[[0, 2, 3]], c0[[0, 2, 3]])
    assert not np.array_equal(c1[1], c0[1])


def test_loss_is_mean_over_samples_plus_l2():
    curve = _curve(2)
    obj = ConnectorObjective(point=function_objective(lambda p, b: jnp.sum(p["xy"] ** 2)),
                             template=curve.replace(control=None), sampler=uniform_sampler(1),
                             mask=jnp.asarray(curve.trainable), num_samples=4, l2=0.5)
    key = jax.random.key(0)
    value, aux = obj(curve.control, None, key)
    pts = uniform_sampler(1)(jax.random.split(key)[0], 4)
    ref = np.mean([np.sum(np.asarray(curve.point(t)["xy"]) ** 2) for t in pts])
    middle = float(jnp.sum(curve.control["xy"][1] ** 2))
    np.testing.assert_allclose(float(value), ref + 0.25 * middle, rtol=1e-5)
    np.testing.assert_allclose(float(aux["loss"]), ref, rtol=1e-5)
    assert aux["point_losses"].shape == (4,)


def test_strategies_give_the_same_objective():
    curve = _curve(3)
    common = dict(point=function_objective(double_well), template=curve.replace(control=None),
                  sampler=uniform_sampler(1), mask=jnp.asarray(curve.trainable), num_samples=5)
    vals = [float(ConnectorObjective(**common, strategy=s)(curve.control, None, jax.random.key(3))[0])
            for s in ("unroll", "map", "vmap")]
    np.testing.assert_allclose(vals, vals[0], rtol=1e-6)


def test_bad_inputs():
    curve = _curve(2)
    cfg = ConnectorConfig(epochs=1, optimizer=optax.sgd(0.1), steps_per_epoch=1)
    with pytest.raises(ValueError, match="no trainable"):
        train_connector(WELL, curve, None, cfg, trainable=np.zeros(3, bool))
    with pytest.raises(ValueError, match="num_samples"):
        ConnectorConfig(num_samples=0)
    with pytest.raises(ValueError, match="trainable mask has 2 entries"):
        train_connector(WELL, curve, None, cfg, trainable=np.ones(2, bool))
    with pytest.raises(ValueError, match="strategy"):
        ConnectorConfig(strategy="pmap")
    with pytest.raises(ValueError, match="steps_per_epoch"):
        train_connector(WELL, curve, lambda t: None, ConnectorConfig(epochs=1, optimizer=optax.sgd(0.1)))
    with pytest.raises(ValueError, match="objective must be"):
        train_connector(3, curve, None, cfg)
    with pytest.raises(TypeError, match="needs a ConnectorConfig with an optimizer"):
        train_connector(WELL, curve, None, ConnectorConfig())
    with pytest.raises(TypeError, match="optimizer must be an optax transformation or None"):
        ConnectorConfig(optimizer=lambda phase, steps: optax.sgd(0.1))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        ConnectorConfig(batch_size=0)
    with pytest.raises(ValueError, match="weight_decay must be a finite number"):
        ConnectorConfig(weight_decay=-1.0)
    assert ConnectorConfig(weight_decay=0.2, weight_decay_on="control").l2_terms == {"point_l2": 0.0, "l2": 0.2}


def test_shared_argument_checks():
    curve = _curve(2)
    assert check_connector(curve, ("bezier",), "f") is curve
    with pytest.raises(TypeError, match=r"f\(model, connector, train.*build it with B"):
        check_connector({"xy": jnp.zeros(2)}, ("bezier",), "f", build="B")
    with pytest.raises(ValueError, match="'bezier' connector"):
        check_connector(curve, ("surface",), "f")
    toy = Dataset(np.zeros((8, 2), np.float32), np.zeros(8, np.int32), 2, "toy")
    assert dataset_steps(toy, 4, "f") == 2
    with pytest.raises(ValueError, match="larger than the training set"):
        dataset_steps(toy, 9, "f")
    with pytest.raises(TypeError, match="f: data must be a Dataset"):
        dataset_steps((toy.x, toy.y), 4, "f")
    for bad in (0, -4, 2.5):
        with pytest.raises(ValueError, match="batch_size must be an integer"):
            ConnectorConfig(batch_size=bad)
    for bad in (True, None):
        with pytest.raises(TypeError, match="batch_size must be an integer"):
            ConnectorConfig(batch_size=bad)


def test_float64_control_points_give_a_float64_objective():
    """Under jax_enable_x64 the sampled coefficients follow the control points (float32 stays float32)."""
    with jax.enable_x64(True):
        for dtype in (jnp.float64, jnp.float32):
            c = C.bezier_curve({"xy": jnp.array([-1.0, 0.0], dtype)}, {"xy": jnp.array([1.0, 0.0], dtype)}, 2)
            obj = ConnectorObjective(point=WELL, template=c.replace(control=None), sampler=uniform_sampler(1),
                                     mask=jnp.asarray(c.trainable), num_samples=3, l2=0.1)
            value, aux = obj(c.control, None, jax.random.key(0))
            assert value.dtype == dtype and aux["point_losses"].dtype == dtype
        res = train_connector(WELL, c.replace(control=jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                                                             c.control)),
                              None, ConnectorConfig(epochs=1, optimizer=optax.sgd(0.01), steps_per_epoch=2))
        assert res.connector.control["xy"].dtype == jnp.float64
