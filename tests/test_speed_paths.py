"""Issue 9: the fast paths (stem split / channel padding / per-control-point stem, strided max-pool, bf16)
give the numbers of the plain paths, and the automatic choices are the documented ones."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mclandscape.core import connectors as C
from mclandscape.core.tree import tree_stack
from mclandscape.engine.connector_train import (
    auto_train_stem,
    fit_connector,
    make_connector_loss,
    model_point_loss,
    resolve_train_stem,
    train_connector,
    uniform_sampler,
)
from mclandscape.engine.data import Dataset
from mclandscape.engine.evaluate import (
    CPU_COMPILER_OPTIONS,
    auto_stem,
    auto_strategy,
    combine_stem_features,
    default_compiler_options,
    evaluate_params,
    evaluate_points,
    pad_stem_input,
    resolve_compiler_options,
    stem_control_features,
    ynn_convolutions,
)
from mclandscape.engine.models import get_model
from mclandscape.engine.models._common import max_pool, max_pool_strided, small_map_conv
from mclandscape.engine.models.base import conv_stem, flax_stem, from_flax

RNG = np.random.default_rng(0)
X = RNG.normal(size=(40, 8, 8, 3)).astype(np.float32)
Y = RNG.integers(0, 10, size=40).astype(np.int32)
CNN = get_model("simple_cnn", dropout=0.0)
CONVFC = get_model("convfc", channels=[8, 8, 8], hidden=[16])


class TinyConvBN(nn.Module):
    """A user model with a bias-free stem and BatchNorm, exposing its stem through ``from_stem``."""

    @nn.compact
    def __call__(self, x, train=False, from_stem=False):
        if not from_stem:
            x = nn.Conv(6, (3, 3), padding=1, use_bias=False, name="stem")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        x = max_pool(nn.relu(x), 3, 2)
        x = nn.relu(nn.Conv(8, (3, 3), padding=1, name="conv1")(x))
        return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


_TINY = TinyConvBN()
RESNET = from_flax(_TINY, "tiny_conv_bn", has_batch_stats=True,
                   stem=flax_stem(_TINY, "stem", conv_stem((1, 1), ((1, 1), (1, 1))), has_batch_stats=True,
                                  use_bias=False))


def _curve(model, degree=2, seed=0):
    ps = [model.init(jax.random.key(seed + i), jnp.asarray(X[:2]))["params"] for i in range(degree + 1)]
    return C.bezier_curve(ps[0], ps[-1], degree, bends=ps[1:-1])


def _close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("name, kwargs", [("convfc", {"channels": [8, 8, 8], "hidden": [16]}),
                                          ("simple_cnn", {}), ("vgg16_bn", {"width": 16}),
                                          ("resnet20", {}),
                                          ("vit_small", {"patch_size": 2, "dim": 16, "depth": 1, "heads": 2,
                                                         "mlp_dim": 16})])
def test_stem_then_body_is_the_model(name, kwargs):
    model = get_model(name, **kwargs)
    v = model.init(jax.random.key(0), jnp.asarray(X[:4]))
    sp = v["params"][model.stem.name]
    h = model.stem.apply(sp["kernel"], sp.get("bias") if model.stem.use_bias else None,
                         model.stem.prepare(jnp.asarray(X[:4])))
    body = jax.jit(model.stem.body_apply)
    np.testing.assert_array_equal(np.asarray(body(v, h)), np.asarray(jax.jit(model.apply)(v, X[:4])))
    if model.has_batch_stats:
        r = {"dropout": jax.random.key(1)}
        a, sa = jax.jit(model.apply_with_stats)(v, jnp.asarray(X[:4]), rngs=r)
        b, sb = jax.jit(model.stem.body_apply_with_stats)(v, h, rngs=r)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        jax.tree_util.tree_map(lambda p, q: np.testing.assert_array_equal(np.asarray(p), np.asarray(q)), sa, sb)
    assert get_model("mlp").stem is None


def test_factored_stem_is_exact_for_any_coefficients():
    """sum_k c_k (conv(x, K_k) + b_k) == conv(x, sum c K) + sum c b, also when sum c != 1 (derivatives)."""
    curve = _curve(CNN, 3)
    x = jnp.asarray(X[:5])
    feats = stem_control_features(CNN, curve.control, x)
    assert feats.shape == (5, 8, 8, 4, 32)
    for c in [curve.coefficients(jnp.array([0.3]))[0], curve.derivative_coefficients(jnp.array([0.3]))[0][0],
              jnp.array([2.0, -1.0, 0.5, 0.0])]:
        sp = jax.tree_util.tree_map(lambda a, c=c: jnp.tensordot(c, a, 1), curve.control["stem"])
        direct = CNN.stem.apply(sp["kernel"], sp["bias"], x)
        _close(combine_stem_features(c, feats), direct, 1e-5)
    assert abs(float(jnp.sum(curve.derivative_coefficients(jnp.array([0.3]))[0]))) < 1e-5


def test_channel_padding_gives_identical_results():
    curve = _curve(CNN)
    k = curve.control["stem"]["kernel"][0]
    kp, xp = pad_stem_input(k, jnp.asarray(X[:3]), 8)
    assert kp.shape[-2] == 8 and xp.shape[-1] == 8
    np.testing.assert_array_equal(np.asarray(kp[..., 3:, :]), 0.0)
    _close(CNN.stem.apply(kp, None, xp), CNN.stem.apply(k, None, jnp.asarray(X[:3])), 1e-6)
    ts = np.linspace(0, 1, 4)
    ref = evaluate_points(CNN, curve, ts, (X, Y), batch_size=16, stem="off")
    for ch in (4, 8):
        r = evaluate_points(CNN, curve, ts, (X, Y), batch_size=16, stem="split", stem_channels=ch)
        assert r.stem == "split" and r.stem_channels == ch
        _close(r.loss, ref.loss, 1e-6)
        np.testing.assert_array_equal(r.accuracy, ref.accuracy)
    with pytest.raises(ValueError, match="pad"):
        pad_stem_input(k, jnp.asarray(X[:3]), 2)


@pytest.mark.parametrize("model", [CNN, CONVFC], ids=["simple_cnn", "convfc"])
def test_evaluation_paths_agree(model):
    curve = _curve(model)
    ts = np.linspace(0, 1, 7)
    ref = evaluate_points(model, curve, ts, (X, Y), batch_size=16, stem="off", return_probs=True)
    variants = [dict(stem="factor", stem_bytes=1), dict(stem="auto")]
    if model is CNN:
        variants += [dict(stem="split", stem_channels=4), dict(stem="factor"),
                     dict(stem="factor", strategy="map", chunk_size=3), dict(stem="factor", strategy="vmap")]
    for kw in variants:
        r = evaluate_points(model, curve, ts, (X, Y), batch_size=16, return_probs=True, **kw)
        _close(r.loss, ref.loss)
        np.testing.assert_array_equal(r.accuracy, ref.accuracy)
        assert r.probs.shape == (7, 40, 10)
        _close(r.probs, ref.probs)
    # A 3x3-control surface on a grid: 9 stems instead of 16 points.
    ps = [model.init(jax.random.key(i), jnp.asarray(X[:2]))["params"] for i in range(4)]
    surf = C.bezier_surface(*ps, 2, 2)
    grid = np.stack(np.meshgrid(np.linspace(0, 1, 4), np.linspace(0, 1, 4), indexing="ij"), -1).reshape(-1, 2)
    a = evaluate_points(model, surf, grid, (X, Y), batch_size=40, stem="off")
    b = evaluate_points(model, surf, grid, (X, Y), batch_size=40, stem="factor")
    _close(a.loss, b.loss)


def test_factor_path_recalibrates_batchnorm_per_point():
    curve = _curve(RESNET)
    ts = np.array([0.0, 0.4, 0.7, 1.0])
    kw = dict(batch_size=16, bn_data=(X, Y), bn_batch_size=10)
    ref = evaluate_points(RESNET, curve, ts, (X, Y), stem="off", **kw)
    for extra in (dict(stem="factor", stem_bytes=1), dict(stem="factor", bn_batches=2)):
        r = evaluate_points(RESNET, curve, ts, (X, Y), **kw, **extra)
        if "bn_batches" in extra:
            ref2 = evaluate_points(RESNET, curve, ts, (X, Y), stem="off", bn_batches=2, **kw)
            _close(r.loss, ref2.loss, 1e-4)
            assert np.max(np.abs(ref2.loss - ref.loss)) > 1e-6  # fewer BN batches matter
        else:
            _close(r.loss, ref.loss, 1e-4)
            np.testing.assert_array_equal(r.accuracy, ref.accuracy)


def test_strategy_and_stem_choice():
    # XLA's own CPU convolutions (the default options): no padding; factor when P > K and the stem costs
    # at least 16 K multiply-adds per output element.
    assert auto_stem(CNN, "connector", 21, 3, 3, backend="cpu", stem_macs=75) == ("factor", None)
    assert auto_stem(CNN, "connector", 121, 9, 3, backend="cpu", stem_macs=75) == ("off", None)
    assert auto_stem(CNN, "connector", 21, 3, 3, backend="cpu", stem_macs=27) == ("off", None)
    assert auto_stem(CNN, "connector", 121, 9, 1, backend="cpu", stem_macs=9) == ("off", None)
    assert auto_stem(CNN, "connector", 2, 3, 3, backend="cpu") == ("off", None)
    assert auto_stem(CNN, "stacked", 21, 0, 3, backend="cpu") == ("off", None)
    # convolutions on YNNPACK: pad 3 input channels to 4
    assert auto_stem(CNN, "connector", 21, 3, 3, backend="cpu", ynn=True) == ("factor", 4)
    assert auto_stem(CNN, "stacked", 21, 0, 3, backend="cpu", ynn=True) == ("split", 4)
    assert auto_stem(CNN, "stacked", 21, 0, 4, backend="cpu", ynn=True) == ("off", None)
    assert auto_stem(get_model("mlp"), "connector", 21, 3, 3, backend="cpu") == ("off", None)
    assert auto_stem(CNN, "connector", 21, 3, 3, backend="gpu", ynn=True) == ("factor", None)
    assert auto_train_stem(CNN, 1, 3, 3, backend="cpu") == ("off", None)
    assert auto_train_stem(CNN, 1, 3, 3, backend="cpu", ynn=True) == ("split", 4)
    assert auto_train_stem(CNN, 8, 3, 3, backend="cpu", ynn=True) == ("split", 4)
    assert auto_train_stem(CNN, 8, 3, 4, backend="cpu", ynn=True) == ("off", None)
    assert auto_train_stem(CNN, 8, 3, 3, backend="gpu") == ("off", None)
    assert auto_strategy(121, 10, backend="cpu", has_conv=True) == ("map", 1)
    assert auto_strategy(121, 10, backend="cpu", has_conv=False) == ("map", 16)
    assert auto_strategy(5, 10, backend="cpu", has_conv=False) == ("map", 5)
    if jax.default_backend() == "cpu":
        opts = default_compiler_options()
        assert opts is None or "CONVOLUTION" not in str(opts).upper()
        assert ynn_convolutions(None) and not ynn_convolutions(CPU_COMPILER_OPTIONS)
    with pytest.raises(ValueError, match="compiler_options"):
        resolve_compiler_options("fast")
    r = evaluate_points(CONVFC, _curve(CONVFC), np.linspace(0, 1, 5), (X, Y), batch_size=20)
    if jax.default_backend() == "cpu":  # 5x5x3 stem, K = 3 < 5 points
        assert (r.strategy, r.chunk_size, r.stem, r.stem_channels) == ("map", 1, "factor", None)
    curve = _curve(CNN)
    r = evaluate_points(CNN, curve, np.linspace(0, 1, 5), (X, Y), batch_size=20)
    if jax.default_backend() == "cpu":  # 3x3x3 stem: combining 3 outputs does not pay
        assert (r.strategy, r.chunk_size, r.stem, r.stem_channels) == ("map", 1, "off", None)
    mlp = get_model("mlp", widths=[4])
    mc = C.bezier_curve(*[mlp.init(jax.random.key(i), X[:2])["params"] for i in range(2)])
    r = evaluate_points(mlp, mc, np.linspace(0, 1, 20), (X, Y), batch_size=40)
    if jax.default_backend() == "cpu":
        assert (r.strategy, r.chunk_size, r.stem) == ("map", 16, "off")
    stacked = tree_stack([curve.point(0.5)] * 2)
    r = evaluate_params(CNN, stacked, (X, Y), batch_size=20)
    assert r.stem in ("split", "off")
    with pytest.raises(ValueError, match="connector"):
        evaluate_params(CNN, stacked, (X, Y), stem="factor")
    with pytest.raises(ValueError, match="stem"):
        evaluate_points(get_model("mlp"), C.bezier_curve(*[get_model("mlp").init(jax.random.key(i), X[:2])["params"]
                                                           for i in range(2)]), [0.5], (X, Y), stem="factor")
    with pytest.raises(ValueError, match="stem mode"):
        evaluate_points(CNN, curve, [0.5], (X, Y), stem="fast")
    with pytest.raises(ValueError, match="loop"):
        evaluate_points(CNN, curve, [0.5], (X, Y), stem="factor", strategy="loop")
    assert resolve_train_stem(CNN, curve, "off", 8, 1) == ("split", 8)
    assert resolve_train_stem(CNN, curve, "auto", None, 1, compiler_options=None) == ("split", 4)
    with pytest.raises(ValueError, match="stem mode"):
        resolve_train_stem(CNN, curve, "fast")


@pytest.mark.parametrize("model", [CONVFC, RESNET], ids=["convfc", "tiny_conv_bn"])
def test_training_paths_give_the_same_loss_and_gradient(model):
    curve = _curve(model)
    extra = {}
    if model.has_batch_stats:
        bs = model.init(jax.random.key(0), jnp.asarray(X[:2]))["batch_stats"]
        extra = {"batch_stats": jax.tree_util.tree_map(jnp.zeros_like, bs)}
    batch = (jnp.asarray(X[:16]), jnp.asarray(Y[:16]))
    out = {}
    for st, ch in [("off", None), ("split", 4), ("factor", None), ("factor", 4)]:
        pl, bf = model_point_loss(model, stem=st, stem_channels=ch, extra_variables=extra)
        loss = make_connector_loss(pl, curve, num_samples=3, sampler=uniform_sampler(1), point_l2=1e-3,
                                   batch_features=bf)
        out[(st, ch)] = jax.value_and_grad(loss, has_aux=True)(curve.control, batch, jax.random.key(3))
    (o0, per0), g0 = out[("off", None)]
    for (o, per), g in out.values():
        _close(o, o0, 1e-5)
        _close(per, per0, 1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g0), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                       atol=1e-5 * float(np.max(np.abs(np.asarray(b))) + 1e-12))
    assert float(jnp.max(jnp.abs(g0["stem"]["kernel"][1]))) > 0


def test_train_connector_factor_equals_off():
    curve = _curve(CONVFC)
    data = Dataset(X, Y, 10, "random")
    kw = dict(epochs=1, optimizer=optax.sgd(0.05, momentum=0.9), batch_size=20, num_samples=2, seed=0,
              progress=False)
    a = train_connector(CONVFC, curve, data, stem="off", **kw)
    b = train_connector(CONVFC, curve, data, stem="factor", stem_channels=4, **kw)
    for p, q in zip(jax.tree_util.tree_leaves(a.connector.control), jax.tree_util.tree_leaves(b.connector.control),
                    strict=True):
        np.testing.assert_allclose(np.asarray(p), np.asarray(q), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(b.connector.control["stem"]["kernel"][0]),
                                  np.asarray(curve.control["stem"]["kernel"][0]))
    assert not np.allclose(np.asarray(b.connector.control["stem"]["kernel"][1]),
                           np.asarray(curve.control["stem"]["kernel"][1]))


def test_fit_connector_takes_batch_features():
    curve = C.bezier_curve({"w": jnp.array([0.0, 0.0])}, {"w": jnp.array([1.0, 1.0])}, 2)
    seen = []

    def feats(control, batch):
        seen.append(True)
        return jnp.sum(control["w"], axis=1)  # [K]: one "feature" per control point

    def point_loss(params, batch, key, f, c):
        return jnp.square(jnp.dot(c, f) - 3.0)  # c . f == sum(params["w"]) by linearity

    res = fit_connector(curve, point_loss, lambda e: [None] * 5, epochs=3, optimizer=optax.sgd(0.05),
                        num_samples=2, batch_features=feats)
    assert seen and res.history[-1]["loss"] < 0.5 * res.history[0]["loss"]
    np.testing.assert_array_equal(np.asarray(res.connector.control["w"])[[0, 2]], [[0.0, 0.0], [1.0, 1.0]])


@pytest.mark.parametrize("window, stride, shape", [(3, 2, (2, 9, 9, 3)), (2, 2, (2, 8, 8, 3)), (3, 1, (1, 6, 7, 2))])
def test_strided_max_pool_matches_flax_values_and_gradients(window, stride, shape):
    x = jnp.asarray(RNG.normal(size=shape).astype(np.float32))
    ref = lambda v: nn.max_pool(v, (window, window), strides=(stride, stride), padding="VALID")
    np.testing.assert_array_equal(np.asarray(max_pool_strided(x, window, stride)), np.asarray(ref(x)))
    w = jnp.asarray(RNG.normal(size=ref(x).shape).astype(np.float32))
    for f in (lambda v: v, jax.nn.relu, lambda v: jnp.round(v)):  # relu and round create ties
        ga = jax.grad(lambda v, f=f: jnp.sum(ref(f(v)) * w))(x * 1.7)
        gb = jax.grad(lambda v, f=f: jnp.sum(max_pool_strided(f(v), window, stride) * w))(x * 1.7)
        np.testing.assert_allclose(np.asarray(gb), np.asarray(ga), rtol=1e-6, atol=1e-6)


def test_bfloat16_evaluation_is_close():
    curve = _curve(CNN)
    ts = np.linspace(0, 1, 3)
    a = evaluate_points(CNN, curve, ts, (X, Y), batch_size=20)
    b = evaluate_points(CNN, curve, ts, (X, Y), batch_size=20, compute_dtype="bfloat16")
    assert np.all(np.abs(a.loss - b.loss) < 0.05 * np.abs(a.loss) + 1e-3)
    assert np.any(a.loss != b.loss)  # it really ran in bfloat16
    with pytest.raises(ValueError, match="floating"):
        evaluate_points(CNN, curve, ts, (X, Y), compute_dtype="int32")


@pytest.mark.parametrize("shape, kernel, padding", [((3, 2, 2, 5), (3, 3, 5, 7), [(1, 1), (1, 1)]),
                                                    ((3, 2, 3, 5), (3, 3, 5, 7), "SAME"),
                                                    ((2, 3, 3, 4), (5, 5, 4, 6), [(2, 2), (2, 2)]),
                                                    ((2, 8, 8, 4), (3, 3, 4, 6), [(1, 1), (1, 1)])])
def test_small_map_conv_matches_lax(shape, kernel, padding):
    x = jnp.asarray(RNG.normal(size=shape).astype(np.float32))
    w = jnp.asarray(RNG.normal(size=kernel).astype(np.float32))
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    ref = jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=dn)
    out = small_map_conv(x, w, (1, 1), padding, dimension_numbers=dn)
    assert out.shape == ref.shape
    _close(out, ref, 1e-5)
    g = jnp.asarray(RNG.normal(size=ref.shape).astype(np.float32))
    da = jax.grad(lambda a, b: jnp.sum(small_map_conv(a, b, (1, 1), padding, dimension_numbers=dn) * g),
                  argnums=(0, 1))(x, w)
    db = jax.grad(lambda a, b: jnp.sum(jax.lax.conv_general_dilated(a, b, (1, 1), padding,
                                                                     dimension_numbers=dn) * g), argnums=(0, 1))(x, w)
    for p, q in zip(da, db, strict=True):
        _close(p, q, 1e-4)
