"""CPU choices (mclandscape.engine.cpu): the first-layer factorisation applied from outside any Flax model,
the strided max-pool, im2col for small maps and bf16 give the numbers of the plain paths, and the automatic
choices are the documented ones."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mclandscape.core import connectors as C
from mclandscape.core.tree import tree_stack
from mclandscape.engine import cpu, mapping
from mclandscape.engine.cpu import max_pool_strided, small_map_conv
from mclandscape.engine.evaluate import evaluate
from mclandscape.engine.models import get_model
from mclandscape.engine.models._common import max_pool
from mclandscape.engine.models.base import from_flax
from mclandscape.engine.points import connector_points, stacked_points

RNG = np.random.default_rng(0)
X = RNG.normal(size=(40, 8, 8, 3)).astype(np.float32)
Y = RNG.integers(0, 10, size=40).astype(np.int32)
CNN = get_model("simple_cnn", channels=[4, 8, 8], hidden=16, dropout=0.0)  # a 3x3x3 first layer, small
CONVFC = get_model("convfc", channels=[8, 8, 8], hidden=[16])


class TinyConvBN(nn.Module):
    """A user's model: a bias-free first convolution, BatchNorm, nothing that mclandscape knows about."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(6, (3, 3), padding=1, use_bias=False, name="first")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        x = max_pool(nn.relu(x), 3, 2)
        x = nn.relu(nn.Conv(8, (3, 3), padding=1, name="conv1")(x))
        return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


class ScaledInput(nn.Module):
    """The first convolution's input depends on a parameter: the factorisation must not apply."""

    @nn.compact
    def __call__(self, x, train=False):
        s = self.param("scale", nn.initializers.ones, (1,))
        x = nn.Conv(4, (3, 3), name="conv")(x * s)
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


TINY = from_flax(TinyConvBN(), "tiny_conv_bn", has_batch_stats=True)


def _params(model, seed):
    """Fan-in-scaled Gaussian parameters made on the host from the abstract shapes: running the Flax
    initialisers op by op compiles every one of them (seconds per model on the 2-core CPU)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(X[:2]))["params"]
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray((rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(s.dtype)
                              if len(s.shape) > 1 else (0.1 * rng.standard_normal(s.shape)).astype(s.dtype)), shapes)


def _curve(model, degree=2, seed=0):
    ps = [_params(model, seed + i) for i in range(degree + 1)]
    return C.bezier_curve(ps[0], ps[-1], degree, bends=ps[1:-1])


def _close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("name, kwargs, path", [("convfc", {"channels": [8, 8, 8], "hidden": [16]}, ("stem",)),
                                                ("simple_cnn", {}, ("stem",)), ("vgg16_bn", {"width": 16}, ("stem",)),
                                                ("resnet20", {}, ("stem",)),
                                                ("vit_small", {"patch_size": 2, "dim": 16, "depth": 1, "heads": 2,
                                                               "mlp_dim": 16}, ("stem",))])
def test_first_conv_is_found_in_every_zoo_conv_model(name, kwargs, path):
    model = get_model(name, **kwargs)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(X[:2]))  # no init compile: zeros suffice
    v = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    conv = cpu.first_conv(lambda p, x: model.apply({**v, **p}, x), {"params": v["params"]}, jnp.asarray(X[:2]))
    assert conv is not None and conv.path == path
    assert conv.kernel_shape == tuple(np.shape(v["params"]["stem"]["kernel"]))


def test_first_conv_is_not_found_where_it_does_not_apply():
    mlp = get_model("mlp", widths=[4])
    v = {"params": _params(mlp, 0)}
    assert cpu.first_conv(lambda p, x: mlp.apply(p, x), v, jnp.asarray(X[:2])) is None
    scaled = from_flax(ScaledInput(), "scaled")
    v = {"params": _params(scaled, 0)}
    assert cpu.first_conv(lambda p, x: scaled.apply(p, x), v, jnp.asarray(X[:2])) is None
    curve = _curve(scaled, 1)
    with pytest.raises(ValueError, match="first convolution"):
        evaluate(scaled, connector_points(curve, [0.5]), (X, Y), stem="factor")
    r = evaluate(scaled, connector_points(curve, np.linspace(0, 1, 5)), (X, Y), stem="auto")
    assert r.stem == "off"


def test_factorised_first_layer_is_exact_for_any_coefficients():
    model = CONVFC
    ps = [_params(model, i) for i in range(3)]
    stack = tree_stack(ps)
    x = jnp.asarray(X[:5])
    enter, cap = cpu.capture_first_conv()
    with enter:
        model.apply({"params": ps[0]}, x)
    feats = cpu.stacked_first_conv(cap.module, stack["stem"]["kernel"], stack["stem"]["bias"], cap.input)
    c = jnp.asarray([0.7, -1.3, 2.1])  # derivative coefficients need not sum to 1
    direct = jax.lax.conv_general_dilated(x, jnp.tensordot(c, stack["stem"]["kernel"], 1), (1, 1), [(2, 2), (2, 2)],
                                          dimension_numbers=("NHWC", "HWIO", "NHWC")) + c @ stack["stem"]["bias"]
    _close(cpu.combine_features(c, feats), direct, 1e-4)


@pytest.mark.parametrize("model", [CNN, CONVFC], ids=["simple_cnn", "convfc"])
def test_evaluation_paths_agree(model):
    curve = _curve(model)
    ts = np.linspace(0, 1, 7)
    ref = evaluate(model, connector_points(curve, ts), (X, Y), batch_size=16, stem="off", return_probs=True)
    variants = [dict(stem="factor", stem_bytes=1), dict(stem="auto"), dict(stem="off", strategy="unroll")]
    if model is CNN:
        variants += [dict(stem="factor"), dict(stem="factor", strategy="map", chunk_size=3),
                     dict(stem="factor", strategy="vmap"), dict(stem="off", strategy="vmap")]
    for kw in variants:
        r = evaluate(model, connector_points(curve, ts), (X, Y), batch_size=16, return_probs=True, **kw)
        _close(r.loss, ref.loss)
        np.testing.assert_array_equal(r.accuracy, ref.accuracy)
        assert r.probs.shape == (7, 40, 10)
        _close(r.probs, ref.probs)
        if kw == dict(stem="auto") and jax.default_backend() == "cpu":
            # the automatic choice: factorise the 5x5x3 first layer (K = 3 < 7 points); combining 3 outputs
            # of a 3x3x3 one does not pay
            assert (r.strategy, r.chunk_size, r.stem) == ("map", 1, "off" if model is CNN else "factor")
    if model is CNN:  # the surface's factorisation is the same code for either network
        return
    # A 3x3-control surface on a grid: 9 first layers instead of 16.
    ps = [_params(model, i) for i in range(4)]
    surf = C.bezier_surface(*ps, n=2, m=2)
    grid = np.stack(np.meshgrid(np.linspace(0, 1, 4), np.linspace(0, 1, 4), indexing="ij"), -1).reshape(-1, 2)
    a = evaluate(model, connector_points(surf, grid), (X, Y), batch_size=40, stem="off")
    b = evaluate(model, connector_points(surf, grid), (X, Y), batch_size=40, stem="factor")
    _close(a.loss, b.loss)


def test_factor_path_recalibrates_batchnorm_per_point_for_a_user_model():
    curve = _curve(TINY)
    ts = np.array([0.0, 0.4, 0.7, 1.0])
    kw = dict(batch_size=16, bn_data=(X, Y), bn_batch_size=10)
    ref = evaluate(TINY, connector_points(curve, ts), (X, Y), stem="off", **kw)
    for extra in (dict(stem="factor", stem_bytes=1), dict(stem="factor", bn_batches=2)):
        r = evaluate(TINY, connector_points(curve, ts), (X, Y), **kw, **extra)
        assert r.stem == "factor"
        if "bn_batches" in extra:
            ref2 = evaluate(TINY, connector_points(curve, ts), (X, Y), stem="off", bn_batches=2, **kw)
            _close(r.loss, ref2.loss, 1e-4)
            assert np.max(np.abs(ref2.loss - ref.loss)) > 1e-6  # fewer BN batches matter
        else:
            _close(r.loss, ref.loss, 1e-4)
            np.testing.assert_array_equal(r.accuracy, ref.accuracy)


def test_strategy_and_factorisation_choice():
    # Factorise when P > K and the first layer costs at least 16 K multiply-adds per output element.
    convfc = cpu.FirstConv(("stem",), (5, 5, 3, 32), True)
    small = cpu.FirstConv(("stem",), (3, 3, 3, 32), True)
    digits = cpu.FirstConv(("stem",), (3, 3, 1, 32), True)
    assert cpu.use_factorisation(convfc, 21, 3, backend="cpu")
    assert not cpu.use_factorisation(convfc, 121, 9, backend="cpu")
    assert not cpu.use_factorisation(small, 21, 3, backend="cpu")
    assert not cpu.use_factorisation(digits, 121, 9, backend="cpu")
    assert not cpu.use_factorisation(convfc, 2, 3, backend="cpu")
    assert not cpu.use_factorisation(None, 21, 3, backend="cpu")
    assert not cpu.use_factorisation(convfc, 21, 3, backend="gpu")
    assert mapping.resolve("auto", 121, param_bytes=10, on="cpu", has_conv=True) == ("map", 1)
    assert mapping.resolve("auto", 121, param_bytes=10, on="cpu", has_conv=False) == ("map", 16)
    assert mapping.resolve("auto", 5, param_bytes=10, on="cpu", has_conv=False) == ("map", 5)
    assert mapping.resolve("auto", 121, param_bytes=1 << 28, on="gpu", has_conv=True) == ("map", 4)
    # differentiated points (connector training, NEB pivots): unrolled on CPU for convolutions only
    assert mapping.resolve("auto", 8, on="cpu", has_conv=True, grad=True) == ("unroll", 1)
    assert mapping.resolve("auto", 8, on="cpu", has_conv=False, grad=True) == ("vmap", 8)
    assert mapping.resolve("auto", 8, on="gpu", has_conv=True, grad=True) == ("vmap", 8)
    assert mapping.resolve("map", 8, has_conv=True, chunk_size=3) == ("map", 3)
    with pytest.raises(ValueError, match="unknown strategy 'loop'"):
        mapping.resolve("loop", 8, has_conv=False)
    with pytest.raises(ValueError, match="chunk_size"):
        mapping.resolve("map", 8, has_conv=False, chunk_size=0)
    if jax.default_backend() == "cpu":
        assert "CONVOLUTION" not in str(cpu.COMPILER_OPTIONS).upper()
    # the automatic choice for the convolutional networks is asserted in test_evaluation_paths_agree
    curve = _curve(CNN)
    mlp = get_model("mlp", widths=[4])
    mc = C.bezier_curve(*[_params(mlp, i) for i in range(2)])
    r = evaluate(mlp, connector_points(mc, np.linspace(0, 1, 20)), (X, Y), batch_size=40)
    if jax.default_backend() == "cpu":
        assert (r.strategy, r.chunk_size, r.stem) == ("map", 16, "off")
    stacked = tree_stack([curve.point(0.5)] * 2)
    assert evaluate(CNN, stacked_points(stacked), (X, Y), batch_size=20).stem == "off"
    with pytest.raises(ValueError, match="identity rows"):
        evaluate(CNN, stacked_points(stacked), (X, Y), stem="factor")
    with pytest.raises(ValueError, match="first convolution"):
        evaluate(mlp, connector_points(mc, [0.5]), (X, Y), stem="factor")
    with pytest.raises(ValueError, match="stem mode"):
        evaluate(CNN, connector_points(curve, [0.5]), (X, Y), stem="fast")


def test_engine_jits_compile_with_the_cpu_options():
    # the options are fields of XLA's DebugOptions: this jaxlib accepts them (an unknown one is refused), and
    # every jitted function of the engine is compiled with them
    from mclandscape.engine import batchnorm, evaluate, points, step

    x, k = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 4))
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    jax.jit(conv, compiler_options=cpu.COMPILER_OPTIONS).lower(x, k).compile()
    with pytest.raises(Exception, match="No such compile option"):
        jax.jit(conv, compiler_options={"xla_no_such_option": True}).lower(x, k).compile()
    for f in (step._step_jit, step._loop_step_jit, evaluate._evaluate_jit, points._map_points_jit,
              batchnorm._recalibrate_jit):
        assert dict(f._jit_info.compiler_options_kvs) == cpu.COMPILER_OPTIONS


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
    a = evaluate(CNN, connector_points(curve, ts), (X, Y), batch_size=20)
    b = evaluate(CNN, connector_points(curve, ts), (X, Y), batch_size=20, compute_dtype="bfloat16")
    assert np.all(np.abs(a.loss - b.loss) < 0.05 * np.abs(a.loss) + 1e-3)
    assert np.any(a.loss != b.loss)  # it really ran in bfloat16
    with pytest.raises(ValueError, match="floating"):
        evaluate(CNN, connector_points(curve, ts), (X, Y), compute_dtype="int32")


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
