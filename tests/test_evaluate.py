import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mclandscape.core import connectors as C
from mclandscape.core import tree as T
from mclandscape.engine import distributed
from mclandscape.engine.batchnorm import bn_momentum, recalibrate_bn
from mclandscape.engine.evaluate import evaluate
from mclandscape.engine.models.base import from_flax
from mclandscape.engine.points import connector_points, stacked_points, uv_grid


class TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(3)(x)


class TinyBN(nn.Module):
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(6, name="dense0")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum, name="bn")(x)
        return nn.Dense(3, name="head")(nn.relu(x))


MLP = from_flax(TinyMLP(), "tiny_mlp")
BN = from_flax(TinyBN(), "tiny_bn", has_batch_stats=True)


def _data(n=70, d=5, seed=0):
    r = np.random.default_rng(seed)
    return r.normal(size=(n, d)).astype(np.float32), r.integers(0, 3, size=n).astype(np.int32)


def _inits(model, k, x):
    return [model.init(jax.random.key(i), jnp.asarray(x[:2]))["params"] for i in range(k)]


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, v, x):  # one compiled program per model and shape, not one per eager operation
    return model.apply(v, x)


def _reference(model, params_list, x, y, batch_stats=None):
    out = []
    for i, p in enumerate(params_list):
        v = {"params": p} if batch_stats is None else {"params": p, "batch_stats": batch_stats[i]}
        logits = np.asarray(_apply(model, v, jnp.asarray(x)), np.float64)
        lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        loss = np.mean(lse - logits[np.arange(len(y)), y])
        out.append((loss, np.mean(logits.argmax(1) == y)))
    return np.array(out)


def test_strategies_agree_with_reference_on_connector():
    x, y = _data()
    corners = _inits(MLP, 4, x)
    surf = C.bezier_surface(*corners, n=2, m=2)
    pts = uv_grid(3)
    ref = _reference(MLP, T.tree_unstack(surf.points(pts)), x, y)
    results = {}
    for strategy, chunk in [("unroll", None), ("map", 1), ("map", 5), ("vmap", 7), ("auto", None)]:
        r = evaluate(MLP, connector_points(surf, pts), (x, y), batch_size=32, strategy=strategy, chunk_size=chunk)
        np.testing.assert_allclose(r.loss, ref[:, 0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(r.accuracy, ref[:, 1], atol=1e-6)
        results[(strategy, chunk)] = r
    assert results[("auto", None)].strategy in ("map", "vmap", "unroll")


def test_stacked_points_probs_and_masks_partial_batch():
    x, y = _data(n=53)
    ps = _inits(MLP, 3, x)
    r = evaluate(MLP, stacked_points(T.tree_stack(ps)), (x, y), batch_size=20, return_probs=True)
    assert r.probs.shape == (3, 53, 3)
    for i, p in enumerate(ps):
        ref = np.asarray(jax.nn.softmax(MLP.apply({"params": p}, jnp.asarray(x))))
        np.testing.assert_allclose(r.probs[i], ref, atol=1e-5)
    np.testing.assert_allclose(r.loss, _reference(MLP, ps, x, y)[:, 0], rtol=1e-4)


@pytest.mark.parametrize("momentum", [0.9, 0.99])
def test_bn_recalibration_matches_numpy(momentum):
    model = from_flax(TinyBN(momentum=momentum), "tiny_bn", has_batch_stats=True)
    x, y = _data(n=64)  # the shapes of the tests below: momentum 0.9 (the model BN) compiles nothing new
    p = model.init(jax.random.key(0), jnp.asarray(x[:2]))["params"]
    m = bn_momentum(model, p, x[:32])
    np.testing.assert_allclose(float(m["bn"]["mean"]), momentum, atol=1e-5)
    stats = recalibrate_bn(model, p, (x, y), batch_size=32, num_batches=2)
    h = x.astype(np.float64) @ np.asarray(p["dense0"]["kernel"], np.float64) + np.asarray(p["dense0"]["bias"])
    hb = h.reshape(2, 32, -1)
    np.testing.assert_allclose(np.asarray(stats["bn"]["mean"]), hb.mean(1).mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(stats["bn"]["var"]), hb.var(1).mean(0), rtol=1e-3, atol=1e-5)


def test_bn_recomputed_per_point_once_for_several_datasets():
    x, y = _data(n=64)
    xt, yt = _data(n=64, seed=1)  # the shapes of the training data: evaluated alone, it compiles nothing new
    curve = C.bezier_curve(*_inits(BN, 2, x), 2)
    ts = np.array([0.0, 0.3, 1.0])

    def counting(traces):  # a model (unequal to any other: its own function) counting its traced BatchNorm passes
        def counted(variables, xb, rngs=None):
            traces.append(xb.shape)
            return BN.apply_with_stats(variables, xb, rngs=rngs)

        return dataclasses.replace(BN, apply_with_stats=counted)

    kw = dict(batch_size=32, bn_data=(x, y), bn_batch_size=32, return_probs=True)
    two_sets, one_set = [], []
    both = evaluate(counting(two_sets), connector_points(curve, ts), {"train": (x, y), "test": (xt, yt)}, **kw)
    assert sorted(both) == ["test", "train"]
    for name, data in (("train", (x, y)), ("test", (xt, yt))):
        alone = evaluate(BN, connector_points(curve, ts), data, **kw)
        np.testing.assert_array_equal(both[name].loss, alone.loss)
        np.testing.assert_array_equal(both[name].accuracy, alone.accuracy)
        np.testing.assert_array_equal(both[name].probs, alone.probs)
    # each point's statistics recomputed on its own (all 2 full batches of 32), as recalibrate_bn does
    pts = T.tree_unstack(curve.points(ts))
    stats = [recalibrate_bn(BN, p, (x, y), batch_size=32, num_batches=2) for p in pts]
    ref = _reference(BN, pts, x, y, stats)
    np.testing.assert_allclose(both["train"].loss, ref[:, 0], rtol=1e-4)
    # stats from one point used for another would give a different loss: per-point recalibration matters
    wrong = _reference(BN, pts, x, y, [stats[0]] * 3)
    assert abs(wrong[1, 0] - ref[1, 0]) > 1e-4
    with pytest.raises(ValueError, match="bn_data"):
        evaluate(BN, connector_points(curve, ts), (x, y))
    evaluate(counting(one_set), connector_points(curve, ts), (x, y), **kw)
    assert len(one_set) > 0 and len(two_sets) == len(one_set)  # two datasets trace the BatchNorm pass as often as one
    with pytest.raises(ValueError, match="empty dict"):
        evaluate(BN, connector_points(curve, ts), {}, **kw)
    some = evaluate(BN, connector_points(curve, ts), {"train": (x, y), "test": (xt, yt)},
                    **{**kw, "return_probs": ("test",)})
    assert some["train"].probs is None
    np.testing.assert_array_equal(some["test"].probs, both["test"].probs)
    np.testing.assert_array_equal(some["train"].loss, both["train"].loss)
    with pytest.raises(ValueError, match="return_probs"):
        evaluate(BN, connector_points(curve, ts), {"train": (x, y)}, **{**kw, "return_probs": ("val",)})


def test_devices_must_be_a_number_of_devices():
    x, y = _data()
    curve = C.bezier_curve(*_inits(MLP, 2, x))
    for bad in ("cpu", 0, 1.5, len(jax.devices()) + 1):
        with pytest.raises(ValueError, match=r"devices must be None \(all devices\) or a number of devices"):
            evaluate(MLP, connector_points(curve, [0.5]), (x, y), devices=bad)
        with pytest.raises(ValueError, match="devices must be None"):
            distributed.training_mesh(32, devices=bad)
    # checked before anything is started, each naming the argument
    with pytest.raises(ValueError, match="num_processes must be an integer >= 1 .*got 0"):
        distributed.initialize(num_processes=0)
    with pytest.raises(ValueError, match="process_id must be an integer >= 0 .*got -1"):
        distributed.initialize("127.0.0.1:1234", num_processes=2, process_id=-1)
    with pytest.raises(ValueError, match="local_devices must be an integer >= 1 .*got 'cpu'"):
        distributed.initialize(local_devices="cpu")


def test_bad_inputs():
    x, y = _data()
    corners = _inits(MLP, 2, x)
    curve = C.bezier_curve(corners[0], corners[1])
    with pytest.raises(ValueError, match="t must lie"):
        evaluate(MLP, connector_points(curve, [0.5, 1.01]), (x, y))
    with pytest.raises(ValueError, match="empty"):
        evaluate(MLP, connector_points(curve, []), (x, y))
    with pytest.raises(ValueError, match="strategy"):
        evaluate(MLP, connector_points(curve, [0.5]), (x, y), strategy="fast")
    nan = curve.replace(control=jax.tree_util.tree_map(lambda a: a.at[(1,) * a.ndim].set(jnp.nan), curve.control))
    with pytest.raises(ValueError, match="non-finite"):
        evaluate(MLP, connector_points(nan, [0.5]), (x, y))
    with pytest.raises(ValueError, match="leading"):
        evaluate(MLP, stacked_points({"a": jnp.zeros((2, 3)), "b": jnp.zeros((3, 3))}), (x, y))
    surf = C.bilinear_surface(*_inits(MLP, 4, x))
    with pytest.raises(ValueError, match=r"shape \[P, 2\]"):  # not read as one (u, v) point
        evaluate(MLP, connector_points(surf, [0.0, 1.0]), (x, y))
    with pytest.raises(ValueError, match=r"u must lie in \[0, 1\]"):
        evaluate(MLP, connector_points(surf, [[-0.1, 0.5]]), (x, y))


def test_extrapolation_only_when_asked():
    x, y = _data()
    curve = C.bezier_curve(*_inits(MLP, 2, x), 1)
    with pytest.raises(ValueError, match="t must lie"):
        evaluate(MLP, connector_points(curve, [1.5]), (x, y))
    r = evaluate(MLP, connector_points(curve, [-0.5, 1.5], extrapolate=True), (x, y))
    ref = _reference(MLP, [curve.point(t, extrapolate=True) for t in (-0.5, 1.5)], x, y)
    np.testing.assert_allclose(r.loss, ref[:, 0], rtol=1e-5)


def test_float64_points_and_batchnorm_statistics_stay_float64():
    x, y = _data(n=64)
    with jax.enable_x64(True):
        c64 = [jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), p) for p in _inits(BN, 2, x)]
        curve = C.bezier_curve(*c64, 2)
        assert jax.tree_util.tree_leaves(bn_momentum(BN, c64[0], jnp.asarray(x[:32])))[0].dtype == jnp.float64
        r = evaluate(BN, connector_points(curve, [0.0, 0.4, 1.0]), (x, y), bn_data=(x, y), bn_batch_size=32)
        assert r.loss.dtype == np.float64 and r.accuracy.dtype == np.float64
        # the exact per-point recalibration in float64 matches a float64 reference to ~1e-12, not float32's 1e-6
        stats = recalibrate_bn(BN, curve.point(0.4), (x, y), batch_size=32)
        assert jax.tree_util.tree_leaves(stats)[0].dtype == jnp.float64
        ref = _reference(BN, [curve.point(0.4)], x, y, [stats])
        np.testing.assert_allclose(r.loss[1], ref[0, 0], rtol=1e-10)
