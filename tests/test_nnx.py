"""Flax NNX models (``from_nnx``): collections, equality with linen, modes, and endpoints -> curve -> surface -> grid."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mclandscape.core import connectors as C
from mclandscape.core import tree as T
from mclandscape.core.tree import TreeMismatchError
from mclandscape.engine.checkpoint import CheckpointError, load_model
from mclandscape.engine.data import Dataset
from mclandscape.engine.many import train_many
from mclandscape.engine.models import from_flax, from_nnx, get_model
from mclandscape.engine.points import uv_grid
from mclandscape.engine.train import TrainConfig
from mclandscape.methods import surface_grid as S
from mclandscape.methods.curves import CurveConfig, train_curve
from mclandscape.methods.surface_train import SurfaceConfig, train_surface


class NnxNet(nnx.Module):
    """Linear -> BatchNorm -> ReLU -> Dropout -> Linear on flattened 8x8 digits."""

    def __init__(self, rngs: nnx.Rngs, rate: float = 0.25):
        self.dense0 = nnx.Linear(64, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return self.head(self.drop(nnx.relu(self.bn(self.dense0(x)))))


class LinenNet(nn.Module):
    """The same network in linen, with the same parameter names."""

    rate: float = 0.25

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(16, name="dense0")(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        x = nn.Dropout(self.rate, deterministic=not train)(nn.relu(x))
        return nn.Dense(10, name="head")(x)


@pytest.fixture(scope="module")
def model():
    return from_nnx(NnxNet)


@pytest.fixture(scope="module")
def x():
    return jnp.asarray(np.random.default_rng(0).standard_normal((6, 8, 8, 1)), jnp.float32)


def leaves_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return all(np.array_equal(np.asarray(p), np.asarray(q))
               for p, q in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def test_collections_are_params_and_batch_stats(model, x):
    init = jax.jit(model.init)
    variables = init(jax.random.key(0), x)
    assert model.has_batch_stats and model.name == "NnxNet" and model.spec == {"arch": "NnxNet"}
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["params"]) == {"dense0", "bn", "head"}
    assert jax.tree_util.tree_map(jnp.shape, variables["batch_stats"]) == {"bn": {"mean": (16,), "var": (16,)}}
    # no RNG state among the variables: every leaf is a float array the methods can interpolate
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    # the same collections, names and shapes as the equivalent linen network
    linen = jax.eval_shape(from_flax(LinenNet()).init, jax.random.key(0), x)
    assert jax.tree_util.tree_map(lambda a: a.shape, linen) == jax.tree_util.tree_map(jnp.shape, variables)
    again, other = init(jax.random.key(0), x), init(jax.random.key(1), x)
    assert leaves_equal(variables, again)
    assert not np.array_equal(variables["params"]["dense0"]["kernel"], other["params"]["dense0"]["kernel"])
    assert jax.tree_util.tree_structure(jax.eval_shape(model.init, jax.random.key(0), x)) == \
        jax.tree_util.tree_structure(variables)


def test_outputs_equal_the_linen_network_on_the_same_variables(x):
    variables = jax.jit(from_nnx(NnxNet).init)(jax.random.key(3), x)
    variables["batch_stats"] = {"bn": {"mean": jnp.linspace(-1, 1, 16), "var": jnp.linspace(0.5, 2, 16)}}
    for rate in (0.0, 0.25):
        nnx_model = from_nnx(lambda rngs, r=rate: NnxNet(rngs, rate=r))
        linen_model = from_flax(LinenNet(rate=rate), has_batch_stats=True)
        np.testing.assert_allclose(nnx_model.apply(variables, x), linen_model.apply(variables, x), rtol=1e-6,
                                   atol=1e-6)
        rngs = {"dropout": jax.random.key(5)}
        out, stats = jax.jit(nnx_model.apply_with_stats)(variables, x, rngs)
        ref_out, ref_stats = linen_model.apply_with_stats(variables, x, rngs=rngs)
        # BatchNorm comes before the dropout: the updated statistics agree whatever the masks
        for a, b in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(ref_stats), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        assert not np.allclose(stats["bn"]["mean"], variables["batch_stats"]["bn"]["mean"])
        if rate == 0.0:  # no dropout: train mode is the same function
            np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(nnx_model.apply(variables, x, train=True),
                                       linen_model.apply(variables, x, train=True, rngs=rngs), rtol=1e-6, atol=1e-6)


def test_modes_dropout_keys_and_purity(model, x):
    variables = jax.jit(model.init)(jax.random.key(0), x)
    apply = jax.jit(model.apply, static_argnames="train")
    # eval: running statistics, no dropout, so one example's output does not depend on the rest of the batch
    other = x.at[1:].set(x[1:] * 3.0 + 1.0)
    np.testing.assert_allclose(apply(variables, x)[0], apply(variables, other)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(apply(variables, x, rngs={"dropout": jax.random.key(1)}), apply(variables, x))
    # train: batch statistics, and dropout masks drawn from the key
    k1, k2 = {"dropout": jax.random.key(1)}, {"dropout": jax.random.key(2)}
    a, b = apply(variables, x, train=True, rngs=k1), apply(variables, x, train=True, rngs=k2)
    np.testing.assert_array_equal(a, apply(variables, x, train=True, rngs=k1))
    assert not np.allclose(a, b)
    raw = {"dropout": jax.random.key_data(jax.random.key(1))}  # legacy uint32 keys work too
    np.testing.assert_array_equal(a, apply(variables, x, train=True, rngs=raw))
    # train without a key: batch statistics but no dropout, i.e. the rate-0 network
    no_drop = from_nnx(lambda rngs: NnxNet(rngs, rate=0.0))
    np.testing.assert_allclose(apply(variables, x, train=True), no_drop.apply(variables, x, train=True), rtol=1e-5,
                               atol=1e-6)
    assert not np.allclose(apply(variables, x, train=True)[0], apply(variables, other, train=True)[0])
    # the variables are never mutated, and the stats come back only from apply_with_stats
    before = jax.tree_util.tree_map(np.array, variables)
    model.apply_with_stats(variables, x, rngs=k1)
    assert leaves_equal(before, variables)
    # vmap over stacked params equals one call per point
    stacked = T.tree_stack([variables["params"], jax.tree_util.tree_map(lambda v: 0.5 * v, variables["params"])])
    many = jax.jit(jax.vmap(lambda p: model.apply({**variables, "params": p}, x)))(stacked)
    for i, p in enumerate(T.tree_unstack(stacked)):
        np.testing.assert_allclose(many[i], model.apply({**variables, "params": p}, x), rtol=1e-5, atol=1e-6)


class WithCache(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(3, 2, rngs=rngs)
        self.memory = nnx.Cache(jnp.zeros(2))

    def __call__(self, x):
        return self.fc(x) + self.memory[...]


class NoBN(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.fc(x)


def test_bad_factories_and_variables_raise_clear_errors(model, x):
    with pytest.raises(TypeError, match="factory, not a built module"):
        from_nnx(NnxNet(nnx.Rngs(0)))
    with pytest.raises(TypeError, match="must return an nnx.Module"):
        from_nnx(lambda rngs: nnx.Linear(3, 2, rngs=rngs).kernel)
    with pytest.raises(ValueError, match=r"Cache variable at memory"):
        from_nnx(WithCache)
    plain = from_nnx(NoBN)
    assert not plain.has_batch_stats and plain.apply_with_stats is None
    v = plain.init(jax.random.key(0), jnp.ones((1, 3)))
    assert set(v) == {"params"} and plain.apply(v, jnp.ones((4, 3)), train=True).shape == (4, 2)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    head = {**variables["params"]["head"], "kernel": jnp.zeros((16, 3))}
    bad = {**variables, "params": {**variables["params"], "head": head}}
    with pytest.raises(TreeMismatchError, match=r"NnxNet.*head.*kernel.*\(16, 10\) in the module but \(16, 3\)"):
        model.apply(bad, x)
    with pytest.raises(ValueError, match="no 'batch_stats' collection"):
        model.apply({"params": variables["params"]}, x)
    with pytest.raises(TypeError, match="rngs"):
        model.apply(variables, x, train=True, rngs=jax.random.key(0))


# ---------------------------------------------------------------------------------------------------------
# the done-when: an NNX model with BatchNorm and dropout through endpoints -> curve -> surface -> grid


@pytest.fixture(scope="module")
def small(digits_train, digits_test):
    return (Dataset(digits_train.x[:384], digits_train.y[:384], 10, "tr"),
            Dataset(digits_test.x[:100], digits_test.y[:100], 10, "te"))


@pytest.fixture(scope="module")
def endpoints(model, small, tmp_path_factory):
    train, test = small
    cfg = TrainConfig(epochs=3, batch_size=64, optimizer="adam", lr=1e-2)
    root = tmp_path_factory.mktemp("nnx_endpoints")
    return root, train_many(model, train, test, cfg, seeds=(0, 1, 2, 3), checkpoint_dir=root, progress=False)


def exact_stats(params, x, batches: int):
    """BatchNorm statistics averaged exactly over ``batches`` full batches (batch means and biased variances)."""
    h = x.reshape(x.shape[0], -1).astype(np.float64) @ np.asarray(params["dense0"]["kernel"]) \
        + np.asarray(params["dense0"]["bias"])
    hb = h.reshape(batches, -1, h.shape[-1])
    return {"bn": {"mean": jnp.asarray(hb.mean(1).mean(0), jnp.float32),
                   "var": jnp.asarray(hb.var(1).mean(0), jnp.float32)}}


def test_endpoints_train_with_batchnorm_and_dropout(endpoints, small):
    _, results = endpoints
    for r in results:
        first, last = r.history[0], r.history[-1]
        assert last["train_loss"] < first["train_loss"] and last["test_acc"] > 0.5
        # the running statistics moved away from their initial (0, 1)
        assert float(jnp.max(jnp.abs(r.variables["batch_stats"]["bn"]["mean"]))) > 0.01
    assert not np.allclose(results[0].params["dense0"]["kernel"], results[1].params["dense0"]["kernel"])


def test_curve_surface_and_grid_with_bn_recomputation(model, endpoints, small):
    _, results = endpoints
    train, test = small
    corners = [r.params for r in results]
    curve = train_curve(model, C.bezier_curve(corners[0], corners[1], 2), train, CurveConfig(epochs=1, batch_size=64),
                        progress=False)
    assert len(curve.history) == 1 and np.isfinite(curve.history[0]["loss"])
    ends = T.tree_unstack(curve.connector.control)
    assert leaves_equal(ends[0], corners[0]) and leaves_equal(ends[-1], corners[1])
    assert not leaves_equal(ends[1], T.tree_combine(jnp.asarray([0.5, 0.5]), T.tree_stack(corners[:2])))  # the bend trained
    surf = train_surface(model, C.bezier_surface(*corners, n=2, m=2), train,
                         SurfaceConfig(epochs=(0, 0, 1), num_samples=2, batch_size=64), progress=False)
    assert len(surf.history[3]) == 1 and np.isfinite(surf.history[3][0]["loss"])
    control = T.tree_unstack(surf.connector.control)
    assert leaves_equal(control[0], corners[0])
    assert not leaves_equal(control[4], T.tree_unstack(C.bezier_surface(*corners, n=2, m=2).control)[4])
    # BatchNorm statistics recomputed at every (u, v) from the training set (6 full batches of 64); the
    # train-loss grid is taken on the test set too, so both grids share one compiled evaluation
    grid = S.surface_grid(model, surf.connector, train, test, steps=3, bn_batch_size=64, train_eval=test)
    assert grid.test_loss.shape == (3, 3)
    np.testing.assert_allclose(grid.train_loss, grid.test_loss, rtol=1e-6)
    params = T.tree_unstack(surf.connector.points(uv_grid(3)))

    @jax.jit
    def test_loss(p, stats):
        logits = model.apply({"params": p, "batch_stats": stats}, jnp.asarray(test.x))
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, test.y))

    ref = np.array([test_loss(p, exact_stats(p, train.x, 6)) for p in params]).reshape(3, 3)
    np.testing.assert_allclose(grid.test_loss, ref, rtol=1e-4, atol=1e-5)
    stale = np.array([test_loss(p, exact_stats(params[0], train.x, 6)) for p in params]).reshape(3, 3)
    assert np.max(np.abs(stale - ref)) > 1e-3  # per-point statistics matter on this surface


def test_checkpoint_round_trip_with_the_user_model(model, endpoints, small):
    root, results = endpoints
    _, test = small
    with pytest.raises(CheckpointError, match="model="):
        load_model(root / "seed_0")  # the zoo cannot rebuild a user model from its spec
    restored, variables, meta = load_model(root / "seed_0", model=model)
    assert restored is model and meta["model"] == model.spec
    assert leaves_equal(variables, results[0].variables)
    xt = jnp.asarray(test.x)
    np.testing.assert_array_equal(model.apply(variables, xt), model.apply(results[0].variables, xt))
    with pytest.raises(CheckpointError, match="spec"):
        load_model(root / "seed_0", model=from_nnx(NoBN))
    with pytest.raises(CheckpointError, match="spec"):
        load_model(root / "seed_0", model=get_model("mlp", widths=[16], num_classes=10))
    same_spec_other_net = from_nnx(NoBN, name="NnxNet")
    with pytest.raises(TreeMismatchError):
        load_model(root / "seed_0", model=same_spec_other_net)
