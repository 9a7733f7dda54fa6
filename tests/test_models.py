"""Model zoo: parameter counts (against independent arithmetic), forward shapes, specs, BatchNorm."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mclandscape.core.tree import tree_size
from mclandscape.engine.models import Model, from_flax, get_model, list_models
from mclandscape.engine.models.base import check_variables

# ---------------------------------------------------------------------------------------------------------
# independent parameter arithmetic


def conv(k, cin, cout, bias=True):
    return k * k * cin * cout + (cout if bias else 0)


def dense(i, o):
    return i * o + o


def bn(c):
    return 2 * c  # scale + bias (running statistics are batch_stats, not params)


def vgg16_count(cin=3, classes=10, bn_layers=False, spatial=32):
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    n, c, s = 0, cin, spatial
    for v in cfg:
        if v == "M":
            s = s // 2 if s >= 2 else s
            continue
        n += conv(3, c, v) + (bn(v) if bn_layers else 0)
        c = v
    return n + dense(512 * s * s, 512) + dense(512, 512) + dense(512, classes)


def resnet18_count(cin=3, classes=10):
    n = conv(3, cin, 64, False) + bn(64)
    c = 64
    for i, w in enumerate([64, 128, 256, 512]):
        for b in range(2):
            stride = 2 if i > 0 and b == 0 else 1
            n += conv(3, c, w, False) + bn(w) + conv(3, w, w, False) + bn(w)
            if stride != 1 or c != w:
                n += conv(1, c, w, False) + bn(w)
            c = w
    return n + dense(512, classes)


def resnet20_count(cin=3, classes=10, preact=False):
    n = conv(3, cin, 16, False) + (0 if preact else bn(16))
    c = 16
    for w in [16, 32, 64]:
        for _ in range(3):
            n += conv(3, c, w, False) + conv(3, w, w, False) + bn(w) + bn(c if preact else w)
            if preact and c != w:
                n += conv(1, c, w, False)  # projection shortcut; ResNet-20 (option A) has none
            c = w
    return n + (bn(64) if preact else 0) + dense(64, classes)


def vit_count(cin=3, classes=10, p=4, d=192, depth=6, mlp=384, spatial=32):
    patches = (spatial // p) ** 2
    block = 2 * bn(d) + 4 * (d * d + d) + dense(d, mlp) + dense(mlp, d)  # 2 LayerNorms, q/k/v/out, MLP
    return conv(p, cin, d) + d + (patches + 1) * d + depth * block + bn(d) + dense(d, classes)


EXPECTED_32 = {  # 32×32×3 input, 10 classes
    "mlp": dense(3072, 128) + dense(128, 10),
    "simple_cnn": conv(3, 3, 32) + conv(3, 32, 64) + conv(3, 64, 128) + dense(128 * 4 * 4, 256) + dense(256, 10),
    "convfc": 2_422_634,  # Garipov et al. (2018): 2.42 M
    "vgg16": vgg16_count(),
    "vgg16_bn": vgg16_count(bn_layers=True),
    "resnet18": 11_173_962,  # the CIFAR ResNet-18 reference count
    "resnet20": 269_722,  # He et al.'s 0.27 M
    "preresnet20": resnet20_count(preact=True),
    "vit_small": vit_count(),
}


def abstract_variables(model: Model, shape):
    return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))


DEEP = {"preresnet164", "densenet100"}  # the DSP-TT paper's CIFAR nets, tested in tests/test_models_deep.py


def test_registry_lists_every_architecture():
    assert set(list_models()) == set(EXPECTED_32) | DEEP


@pytest.mark.parametrize("name", sorted(EXPECTED_32))
def test_parameter_count_cifar(name):
    variables = abstract_variables(get_model(name), (2, 32, 32, 3))
    assert tree_size(variables["params"]) == EXPECTED_32[name]


def test_parameter_counts_match_independent_arithmetic():
    assert resnet18_count() == EXPECTED_32["resnet18"]
    assert resnet20_count() == EXPECTED_32["resnet20"]
    assert 15.2e6 < vgg16_count() < 15.3e6
    conv_fc = conv(5, 3, 32) + conv(5, 32, 64) + conv(5, 64, 128) + dense(1152, 1000) + dense(1000, 1000) + dense(
        1000, 10)
    assert conv_fc == EXPECTED_32["convfc"]


@pytest.mark.parametrize("name,classes,shape,expected", [
    ("vgg16", 100, (1, 32, 32, 3), vgg16_count(classes=100)),
    ("vgg16", 200, (1, 64, 64, 3), vgg16_count(classes=200, spatial=64)),  # Tiny-ImageNet
    ("resnet18", 100, (1, 32, 32, 3), resnet18_count(classes=100)),
    ("resnet20", 10, (1, 8, 8, 1), resnet20_count(cin=1)),
    ("vit_small", 10, (1, 8, 8, 1), vit_count(cin=1, p=2, spatial=8)),
    ("mlp", 3, (1, 4), dense(4, 128) + dense(128, 3)),
])
def test_parameter_count_other_inputs(name, classes, shape, expected):
    kwargs = {"patch_size": 2} if name == "vit_small" and shape[1] == 8 else {}
    variables = abstract_variables(get_model(name, num_classes=classes, **kwargs), shape)
    assert tree_size(variables["params"]) == expected


# ---------------------------------------------------------------------------------------------------------
# forward passes on 8×8 digits-sized inputs

DIGIT_KWARGS = {"vit_small": {"patch_size": 2}}


def cheap_variables(model: Model, shape, seed=0):
    """Real-valued variables without compiling the (slow on CPU) threefry initialisers: small Gaussian
    params, zero running means and unit running variances."""
    rng = np.random.default_rng(seed)
    abstract = abstract_variables(model, shape)
    out = {"params": jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), abstract["params"])}
    if "batch_stats" in abstract:
        out["batch_stats"] = jax.tree_util.tree_map_with_path(
            lambda path, s: jnp.ones(s.shape, s.dtype) if path[-1].key == "var" else jnp.zeros(s.shape, s.dtype),
            abstract["batch_stats"])
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED_32))
def test_forward_shape_on_digit_sized_input(name):
    model = get_model(name, num_classes=7, **DIGIT_KWARGS.get(name, {}))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 8, 8, 1)), jnp.float32)
    variables = cheap_variables(model, x.shape)
    apply = jax.jit(model.apply, static_argnames="train")
    out = apply(variables, x)
    assert out.shape == (5, 7)
    assert bool(jnp.all(jnp.isfinite(out)))
    rngs = {"dropout": jax.random.key(0)}
    # train mode's shape is traced only (its values matter, and are computed, for simple_cnn and resnet20 below)
    assert jax.eval_shape(lambda v, x, r: model.apply(v, x, train=True, rngs=r), variables, x, rngs).shape == (5, 7)
    assert model.has_batch_stats == ("batch_stats" in variables)
    if name != "mlp":
        assert "stem" in variables["params"], "conv models expose their first convolution as 'stem'"
    if name == "simple_cnn":  # dropout (rate 0.25 by default) is active only in train mode
        a = apply(variables, x, train=True, rngs=rngs)
        assert not np.allclose(a, apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)}))
        np.testing.assert_array_equal(out, apply(variables, x))
    if name == "resnet20":  # BatchNorm models keep and update batch_stats (with the functions compiled above)
        logits, stats = jax.jit(model.apply_with_stats)(variables, x, rngs)
        assert logits.shape == (5, 7)
        assert jax.tree_util.tree_structure(stats) == jax.tree_util.tree_structure(variables["batch_stats"])
        changed = [not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(stats),
                                                          jax.tree_util.tree_leaves(variables["batch_stats"]),
                                                          strict=True)]
        assert any(changed)
        # eval mode uses running statistics (deterministic, independent of the batch composition)
        other = x.at[1:].set(x[1:] * 3.0 + 1.0)  # same first example, different rest of the batch
        np.testing.assert_allclose(out[0], apply(variables, other)[0], rtol=1e-5, atol=1e-5)
        # train mode uses batch statistics, so the first example's output depends on the rest of the batch
        train_out = apply(variables, x, train=True, rngs=rngs)
        assert not np.allclose(train_out[0], apply(variables, other, train=True, rngs=rngs)[0])


@pytest.mark.parametrize("name,first", [("mlp", "Dense_0")])
def test_real_init_and_apply(name, first):
    model = get_model(name, num_classes=10)
    x = jnp.ones((2, 8, 8, 1))
    init = jax.jit(model.init)
    variables, again, other = init(jax.random.key(0), x), init(jax.random.key(0), x), init(jax.random.key(1), x)
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(variables["params"][first]["kernel"], other["params"][first]["kernel"])
    assert set(variables) == ({"params", "batch_stats"} if model.has_batch_stats else {"params"})
    assert model.apply(variables, x).shape == (2, 10)


def test_models_without_batchnorm_have_no_apply_with_stats():
    for name in ("mlp", "simple_cnn", "convfc", "vgg16", "vit_small"):
        assert get_model(name).apply_with_stats is None
    for name in ("vgg16_bn", "resnet18", "resnet20", "preresnet20"):
        assert get_model(name).apply_with_stats is not None


# ---------------------------------------------------------------------------------------------------------
# specs


@pytest.mark.parametrize("name", sorted(EXPECTED_32))
def test_spec_is_json_and_rebuilds_the_same_model(name):
    model = get_model(name, num_classes=5)
    spec = json.loads(json.dumps(model.spec))
    assert spec == model.spec
    assert spec["arch"] == name and spec["kwargs"]["num_classes"] == 5
    for rebuilt in (get_model(spec), get_model(spec["arch"], **spec["kwargs"])):
        assert rebuilt.spec == model.spec
        shape = (1, 8, 8, 1)
        a = jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), abstract_variables(model, shape))
        b = jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), abstract_variables(rebuilt, shape))
        assert a == b


def test_spec_records_defaults_and_tuples_as_lists():
    spec = get_model("mlp", widths=(32, 16), num_classes=np.int64(3)).spec
    assert spec == {"arch": "mlp", "kwargs": {"widths": [32, 16], "num_classes": 3, "activation": "relu",
                                              "use_bias": True, "dropout": 0.0}}
    assert get_model("vit").spec["arch"] == "vit_small"


def test_mlp_accepts_flat_and_image_inputs():
    model = get_model("mlp", widths=[8], num_classes=3, activation="tanh")
    v = cheap_variables(model, (2, 4))
    assert model.apply(v, jnp.ones((2, 4))).shape == (2, 3)
    linear = get_model("mlp", widths=[], num_classes=1, use_bias=False)
    assert tree_size(abstract_variables(linear, (1, 5))["params"]) == 5


@pytest.mark.parametrize("bad", [
    lambda: get_model("resnet50"),
    lambda: get_model("mlp", depth=3),
    lambda: get_model("mlp", num_classes=0),
    lambda: get_model("mlp", activation="swishy").init(jax.random.key(0), jnp.ones((1, 2))),
    lambda: get_model({"kwargs": {}}),
    lambda: get_model("mlp", widths=[object()]),
])
def test_bad_model_arguments_raise_value_error(bad):
    with pytest.raises(ValueError):
        bad()


# ---------------------------------------------------------------------------------------------------------
# from_flax: BatchNorm detected from the initialised variables


class _UserBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(8)(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(3)(nn.relu(x))


class _UserPlain(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_from_flax_detects_batchnorm_from_the_initialised_variables():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 5)), jnp.float32)
    model = from_flax(_UserBN())
    with pytest.raises(ValueError, match="does not know yet whether it has BatchNorm"):
        bool(model.has_batch_stats)
    variables = model.init(jax.random.key(0), x)
    assert model.has_batch_stats and set(variables) == {"params", "batch_stats"}
    logits, stats = model.apply_with_stats(variables, x)
    assert logits.shape == (4, 3) and not np.allclose(stats["BatchNorm_0"]["mean"], 0.0)
    # train mode makes batch_stats mutable itself (formerly Flax's ModifyScopeVariableError)
    np.testing.assert_allclose(model.apply(variables, x, train=True), logits, rtol=1e-6)
    plain = from_flax(_UserPlain())
    jax.eval_shape(plain.init, jax.random.key(0), x)  # an abstract init is enough to learn it
    assert not plain.has_batch_stats
    # a model that was never init-ed learns it from the variables it is applied to, or that are checked against it
    applied, checked = from_flax(_UserBN()), from_flax(_UserPlain())
    applied.apply(variables, x)
    check_variables(checked, {"params": jax.eval_shape(plain.init, jax.random.key(0), x)["params"]}, x)
    assert applied.has_batch_stats and not checked.has_batch_stats
    # an explicit (wrong) has_batch_stats=False no longer crashes train mode either
    declared = from_flax(_UserBN(), has_batch_stats=False)
    assert not declared.has_batch_stats and declared.apply_with_stats is None
    np.testing.assert_allclose(declared.apply(variables, x, train=True), logits, rtol=1e-6)
    with pytest.raises(TypeError, match="has_batch_stats"):
        from_flax(_UserBN(), has_batch_stats="yes")


def test_from_flax_batchnorm_model_trains_without_declaring_it(digits_train):
    from mclandscape.engine.data import Dataset
    from mclandscape.engine.train import TrainConfig, train_model

    small = Dataset(digits_train.x[:128], digits_train.y[:128], 10, "small")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Dense(16)(x.reshape(x.shape[0], -1))
            x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
            return nn.Dense(10)(x)

    model = from_flax(Net())
    res = train_model(model, small, None, TrainConfig(epochs=2, batch_size=64, optimizer="adam", lr=1e-2),
                      progress=False)
    assert model.has_batch_stats
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert not np.allclose(res.variables["batch_stats"]["BatchNorm_0"]["mean"], 0.0)


def test_resnet20_width_multiplies_every_stage():
    import jax
    import jax.numpy as jnp

    def size(model):
        v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(v["params"]))

    base, wide = get_model("resnet20"), get_model("resnet20", width=4)
    assert wide.spec["kwargs"]["width"] == 4 and base.spec["kwargs"]["width"] == 1
    # convolutions dominate: ~width^2 as many parameters
    assert 14 * size(base) < size(wide) < 16.5 * size(base)
    with pytest.raises(ValueError, match="width"):
        get_model("resnet20", width=0)
