"""Seed 004's CIFAR architectures (issue 8 a): PreResNet-164 and DenseNet-BC-100.

Parameter counts against independent arithmetic, output shapes on digits- and CIFAR-shaped inputs (traced with
``jax.eval_shape``: compiling the 164-layer nets takes seconds on the 2-core CPU), BatchNorm statistics, spec
round trips, the factorised first layer against the plain path, bad arguments, and the experiment's CIFAR settings. The
numerical checks run the same registry entries at reduced ``depth`` (the same code, fewer blocks); one test
runs the full-size models on a CIFAR-shaped batch.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mclandscape.core import connectors as C
from mclandscape.core.tree import tree_size
from mclandscape.engine import cpu
from mclandscape.engine.evaluate import evaluate
from mclandscape.engine.models import canonical_name, get_model
from mclandscape.engine.models.densenet import avg_pool
from mclandscape.engine.models.resnet import ResNet
from mclandscape.engine.points import connector_points
from mclandscape.engine.train import TrainConfig, make_schedule

# ---------------------------------------------------------------------------------------------------------
# independent parameter arithmetic (bias-free convolutions, BatchNorm scale + bias, linear head with bias)


def conv(k, cin, cout):
    return k * k * cin * cout


def bn(c):
    return 2 * c


def dense(i, o):
    return i * o + o


def preresnet_bottleneck_count(depth=164, cin=3, classes=10):
    """He et al. 2016b / Garipov et al. PreResNet with bottleneck blocks: stem 3x3 -> 16; three stages of
    (depth - 2) / 9 blocks BN, 1x1 (p), BN, 3x3 (p), BN, 1x1 (4p), 1x1 projection when the shape changes;
    final BN; linear."""
    blocks = (depth - 2) // 9
    total, c = conv(3, cin, 16), 16
    for stage, p in enumerate((16, 32, 64)):
        for b in range(blocks):
            total += bn(c) + conv(1, c, p) + bn(p) + conv(3, p, p) + bn(p) + conv(1, p, 4 * p)
            if c != 4 * p or (stage > 0 and b == 0):
                total += conv(1, c, 4 * p)
            c = 4 * p
    return total + bn(c) + dense(c, classes)


def densenet_bc_count(depth=100, k=12, theta=0.5, cin=3, classes=10):
    """Huang et al. DenseNet-BC: stem 3x3 -> 2k; three blocks of (depth - 4) / 6 layers BN, 1x1 (4k), BN, 3x3
    (k); transitions BN, 1x1 (floor(theta c)); final BN; linear."""
    layers = (depth - 4) // 6
    c = 2 * k
    total = conv(3, cin, c)
    for block in range(3):
        for _ in range(layers):
            total += bn(c) + conv(1, c, 4 * k) + bn(4 * k) + conv(3, 4 * k, k)
            c += k
        if block < 2:
            out = int(np.floor(theta * c))
            total += bn(c) + conv(1, c, out)
            c = out
    return total + bn(c) + dense(c, classes)


def abstract_variables(model, shape):
    return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))


def cheap_variables(model, shape, seed=0):
    """Real variables without compiling the initialisers: small Gaussian parameters, running means 0 and
    running variances 1."""
    rng = np.random.default_rng(seed)
    abstract = abstract_variables(model, shape)
    # host arrays moved to the device: no per-shape compilation of an initialiser or a broadcast
    out = {"params": jax.tree_util.tree_map(
        lambda s: jnp.asarray((0.1 * rng.standard_normal(s.shape)).astype(s.dtype)), abstract["params"])}
    out["batch_stats"] = jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray(np.full(s.shape, path[-1].key == "var", s.dtype)),
        abstract["batch_stats"])
    return out


FULL = ("preresnet164", "densenet100")
SMALL = {"preresnet164": {"depth": 11}, "densenet100": {"depth": 10, "growth_rate": 4}}  # same code, 1 block each


def test_hand_counts_and_paper_sizes():
    # Hand-summed by stage (see the module docstrings): 432 + 4 704 + 17 x 4 544 + 23 808 + 17 x 17 792
    # + 94 720 + 17 x 70 400 + 512 + 2 570, and 648 + 175 680 + 23 760 + 242 880 + 45 600 + 276 480 + 684 + 3 430.
    assert preresnet_bottleneck_count() == 432 + 4704 + 17 * 4544 + 23808 + 17 * 17792 + 94720 + 17 * 70400 \
        + 512 + 2570 == 1_703_258
    assert densenet_bc_count() == 648 + 175680 + 23760 + 242880 + 45600 + 276480 + 684 + 3430 == 769_162
    assert abs(preresnet_bottleneck_count() - 1.7e6) < 0.01e6  # the DSP-TT paper: "ResNet-164 (1.7M)"
    assert round(densenet_bc_count() / 1e6, 2) == 0.77  # DenseNet-BC (k = 12), depth 100: Huang et al.'s 0.8 M


@pytest.mark.parametrize("name,kwargs,classes,shape,expected", [
    ("preresnet164", {"depth": 110}, 10, (2, 32, 32, 3), preresnet_bottleneck_count(depth=110)),
    ("densenet100", {"depth": 40, "growth_rate": 24, "compression": 0.3}, 10, (2, 32, 32, 3),
     densenet_bc_count(depth=40, k=24, theta=0.3)),
])
def test_parameter_counts(name, kwargs, classes, shape, expected):
    model = get_model(name, num_classes=classes, **kwargs)
    assert tree_size(abstract_variables(model, shape)["params"]) == expected


def _preresnet164_layers(v):
    assert len([k for k in v if k.startswith("stage")]) == 54
    first, block = v["stage0_block0"], v["stage1_block1"]
    assert first["conv1"]["kernel"].shape == (1, 1, 16, 16) and first["conv3"]["kernel"].shape == (1, 1, 16, 64)
    assert first["shortcut_conv"]["kernel"].shape == (1, 1, 16, 64)  # channel change 16 -> 64 at stride 1
    assert v["stage1_block0"]["shortcut_conv"]["kernel"].shape == (1, 1, 64, 128)
    assert block["conv2"]["kernel"].shape == (3, 3, 32, 32) and "shortcut_conv" not in block
    assert v["final_bn"]["scale"].shape == (256,) and v["head"]["kernel"].shape == (256, 100)


def _densenet100_layers(d):
    assert d["stem"]["kernel"].shape == (3, 3, 3, 24)
    assert len([k for k in d if k.startswith("block")]) == 48
    assert d["block0_layer15"]["conv1"]["kernel"].shape == (1, 1, 24 + 15 * 12, 48)
    assert d["block0_layer15"]["conv2"]["kernel"].shape == (3, 3, 48, 12)
    assert d["transition0"]["conv"]["kernel"].shape == (1, 1, 216, 108)
    assert d["transition1"]["conv"]["kernel"].shape == (1, 1, 300, 150)
    assert d["head"]["kernel"].shape == (342, 100)


FULL_SIZE = {"preresnet164": (_preresnet164_layers, preresnet_bottleneck_count),
             "densenet100": (_densenet100_layers, densenet_bc_count)}


@pytest.mark.parametrize("name", FULL)
def test_full_size_shapes_layers_and_forward_on_cifar_batch(name):
    """The full-size nets with 100 classes (each traced as few times as possible: tracing them takes seconds):
    output shapes on digits-shaped inputs (NHWC and NHW, abstractly) and a real forward on a CIFAR-shaped batch,
    the BatchNorm statistics' structure, the bias-free stem, the parameter counts and the layer shapes."""
    layers, count = FULL_SIZE[name]
    model = get_model(name, num_classes=100)
    digits = abstract_variables(model, (3, 8, 8, 1))
    assert tree_size(digits["params"]) == count(cin=1, classes=100)
    for shape in ((3, 8, 8, 1), (3, 8, 8)):  # NHW digits: the model adds the channel axis
        assert jax.eval_shape(lambda v, x: model.apply(v, x), digits, jax.ShapeDtypeStruct(shape, jnp.float32)) \
            .shape == (3, 100)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3)), jnp.float32)
    cifar = cheap_variables(model, x.shape)
    for variables, shape in ((digits, (3, 8, 8, 1)), (cifar, x.shape)):
        xs = jax.ShapeDtypeStruct(shape, jnp.float32)
        logits, stats = jax.eval_shape(model.apply_with_stats, variables, xs)
        assert logits.shape == (shape[0], 100)
        assert jax.tree_util.tree_structure(stats) == jax.tree_util.tree_structure(variables["batch_stats"])
        assert set(variables) == {"params", "batch_stats"} and "stem" in variables["params"]
        assert set(variables["params"]["stem"]) == {"kernel"}  # bias-free stem (a BatchNorm follows)
    assert tree_size(cifar["params"]) == count(classes=100)
    layers(cifar["params"])
    out = jax.jit(model.apply)(cifar, x)
    assert out.shape == (2, 100) and bool(jnp.all(jnp.isfinite(out)))


def test_avg_pool_matches_flax_and_skips_small_maps():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, 6, 3)), jnp.float32)
    np.testing.assert_allclose(avg_pool(x, 2), nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID"),
                               rtol=1e-6, atol=1e-6)
    small = x[:, :1]
    assert avg_pool(small, 2) is small


# ---------------------------------------------------------------------------------------------------------
# numerics on the reduced-depth registry entries

X = np.random.default_rng(2).standard_normal((12, 8, 8, 1)).astype(np.float32)
Y = np.random.default_rng(3).integers(0, 5, size=12).astype(np.int32)


@pytest.mark.parametrize("name", FULL)
def test_train_mode_updates_batch_stats(name):
    model = get_model(name, num_classes=5, **SMALL[name])
    x = jnp.asarray(X[:4])
    variables = cheap_variables(model, x.shape)
    logits, stats = jax.jit(model.apply_with_stats)(variables, x)
    assert logits.shape == (4, 5)
    assert jax.tree_util.tree_structure(stats) == jax.tree_util.tree_structure(variables["batch_stats"])
    old = jax.tree_util.tree_leaves(variables["batch_stats"])
    assert all(not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(stats), old, strict=True))
    apply = jax.jit(model.apply, static_argnames="train")
    other = x.at[1:].set(x[1:] * 3.0 + 1.0)  # same first example, different rest of the batch
    np.testing.assert_allclose(apply(variables, x)[0], apply(variables, other)[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(apply(variables, x, train=True)[0], apply(variables, other, train=True)[0])
    np.testing.assert_allclose(apply(variables, x, train=True), logits, rtol=1e-5, atol=1e-5)


def test_factorised_first_layer_equals_plain_path():
    # DenseNet only: PreResNet-164's stem is the same bias-free convolution (models._common.conv)
    name = "densenet100"
    model = get_model(name, num_classes=5, **SMALL[name])
    v = cheap_variables(model, X[:4].shape)
    # the evaluator finds the first convolution from outside the plain Flax module (NHW input: the model adds
    # the channel axis itself, and the factorisation sees the convolution's input as the model prepares it)
    conv = cpu.first_conv(lambda p, x: model.apply({**v, **p}, x), {"params": v["params"]},
                          jnp.asarray(X[:4, :, :, 0]))
    assert conv is not None and conv.path == ("stem",) and not conv.use_bias
    # through the engine: the first layer computed once per control point of a Bezier curve and combined
    # with the Bernstein coefficients (stem="factor") against the plain path, BatchNorm statistics
    # recomputed per point
    p1, p2 = (cheap_variables(model, X[:4].shape, seed=s)["params"] for s in (1, 2))
    curve = C.bezier_curve(v["params"], p2, 2, bends=[p1])
    kw = dict(batch_size=12, bn_data=(X, Y), bn_batch_size=12, strategy="vmap")
    a = evaluate(model, connector_points(curve, np.array([0.0, 0.3, 1.0])), (X, Y), stem="off", **kw)
    b = evaluate(model, connector_points(curve, np.array([0.0, 0.3, 1.0])), (X, Y), stem="factor", **kw)
    assert b.stem == "factor" and a.stem == "off"
    np.testing.assert_allclose(b.loss, a.loss, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(b.accuracy, a.accuracy)
    assert np.ptp(a.loss) > 1e-4  # the points differ, so equal losses are not a coincidence


# ---------------------------------------------------------------------------------------------------------
# registry, specs, bad arguments


@pytest.mark.parametrize("name,kwargs", [("preresnet164", {"num_classes": 100, "depth": 56}),
                                         ("densenet100", {"num_classes": 3, "depth": 40, "growth_rate": 6,
                                                          "compression": 0.25})])
def test_spec_round_trip(name, kwargs):
    model = get_model(name, **kwargs)
    spec = json.loads(json.dumps(model.spec))
    assert spec == model.spec and spec["arch"] == name and spec["kwargs"] == {**spec["kwargs"], **kwargs}
    shape = (1, 8, 8, 1)
    a = jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), abstract_variables(model, shape))
    for rebuilt in (get_model(spec), get_model(spec["arch"], **spec["kwargs"])):
        assert rebuilt.spec == model.spec
        assert jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), abstract_variables(rebuilt, shape)) == a


def test_aliases_and_defaults():
    assert get_model("resnet164").spec == {"arch": "preresnet164", "kwargs": {"num_classes": 10, "depth": 164}}
    for alias in ("densenet", "densenet_bc100", "DenseNet100"):
        assert get_model(alias).spec == {"arch": "densenet100", "kwargs": {"num_classes": 10, "depth": 100,
                                                                           "growth_rate": 12, "compression": 0.5}}
    assert canonical_name("resnet164") == "preresnet164" and canonical_name("vgg16") == "vgg16"
    with pytest.raises(ValueError, match="unknown model"):
        canonical_name("densenet121")


@pytest.mark.parametrize("name,kwargs,word", [
    ("densenet100", {"depth": 99}, "depth"),
    ("densenet100", {"depth": 4}, "depth"),
    ("densenet100", {"depth": 100.0}, "depth"),
    ("densenet100", {"growth_rate": 0}, "growth_rate"),
    ("densenet100", {"compression": 0.0}, "compression"),
    ("densenet100", {"compression": 1.5}, "compression"),
    ("preresnet164", {"depth": 165}, "depth"),
    ("preresnet164", {"depth": 2}, "depth"),
    ("densenet100", {"bottleneck": True}, "unknown argument"),
])
def test_bad_arguments_raise_value_error(name, kwargs, word):
    with pytest.raises(ValueError, match=word):
        get_model(name, **kwargs)


def test_post_activation_bottleneck_is_refused():
    module = ResNet(stage_sizes=(1, 1, 1), widths=(4, 4, 4), bottleneck=True, preact=False)
    with pytest.raises(ValueError, match="preact"):
        module.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))


# ---------------------------------------------------------------------------------------------------------
# experiments/dsp_tt.py: the DSP-TT paper's CIFAR settings (§5), no training


def test_dsp_tt_cifar_settings_per_architecture():
    from experiments.dsp_tt import parse_args, step_milestones, train_config

    d = parse_args(["--dataset", "cifar10", "--arch", "densenet100"])
    assert (d.epochs, d.batch_size, d.lr, d.weight_decay, d.nesterov, d.schedule, d.momentum) == \
        (250, 64, 0.1, 1e-4, True, "step", 0.9)
    assert d.epochs + 50 == 300 and d.local_epochs == 10 and d.finetune_epochs == 10
    cfg = train_config(d, d.epochs)
    assert cfg.milestones == (125, 187) and cfg.nesterov and cfg.augment and cfg.schedule == "step"
    sched = make_schedule(cfg, 10)
    np.testing.assert_allclose([sched(0), sched(1249), sched(1250), sched(1869), sched(1870)],
                               [0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-6)
    assert train_config(d, 10).milestones == (5, 7) and step_milestones(1) == ()
    assert train_config(d, 10, lr=0.01, grad_clip=5.0).lr == 0.01
    r = parse_args(["--dataset", "cifar100", "--arch", "resnet164"])
    assert (r.epochs, r.batch_size, r.lr, r.weight_decay, r.nesterov, r.schedule) == \
        (150, 128, 0.1, 3e-4, False, "cosine")
    assert train_config(r, r.epochs).milestones == ()
    for argv in (["--dataset", "cifar10"], ["--dataset", "cifar10", "--arch", "vgg16_bn"]):
        v = parse_args(argv)
        assert (v.epochs, v.batch_size, v.lr, v.weight_decay, v.schedule) == (150, 128, 0.05, 5e-4, "cosine")
    # explicit flags win over the per-architecture defaults
    e = parse_args(["--dataset", "cifar10", "--arch", "densenet", "--lr", "0.2", "--weight-decay", "0",
                    "--batch-size", "32", "--epochs", "8", "--no-nesterov", "--schedule", "cosine"])
    assert (e.epochs, e.batch_size, e.lr, e.weight_decay, e.nesterov, e.schedule, e.sse_lr) == \
        (8, 32, 0.2, 0.0, False, "cosine", 0.4)
    # the offline default is unchanged
    o = parse_args([])
    assert (o.arch, o.epochs, o.batch_size, o.lr, o.weight_decay, o.nesterov, o.schedule) == \
        ("simple_cnn", 30, 64, 0.05, 5e-4, False, "cosine")
    # ... and builds the TrainConfig it built before the per-architecture settings
    assert train_config(o, 30) == TrainConfig(epochs=30, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
                                              schedule="cosine", augment=False, seed=0)
    with pytest.raises(SystemExit):
        parse_args(["--arch", "densenet121"])


def test_dsp_tt_cifar_fails_fast_without_data(tmp_path, capsys):
    from experiments.dsp_tt import build_model, main, parse_args

    for arch in FULL:
        with pytest.raises(SystemExit) as exc:
            main(["--dataset", "cifar10", "--arch", arch, "--data-dir", str(tmp_path / "tfds"),
                  "--out", str(tmp_path / "out")])
        assert exc.value.code == 2
        assert "is not prepared" in capsys.readouterr().err
    args = parse_args(["--dataset", "cifar100", "--arch", "resnet164"])
    assert build_model(args, 100).spec == {"arch": "preresnet164", "kwargs": {"num_classes": 100, "depth": 164}}
    assert build_model(parse_args(["--dataset", "cifar10", "--arch", "densenet100"]), 10).spec["arch"] == \
        "densenet100"


def test_optax_nesterov_is_what_train_config_builds():
    """``nesterov=True`` reaches optax.sgd (already the first Nesterov update, -lr (1 + mu) g, differs from
    heavy-ball's -lr g)."""
    from experiments.dsp_tt import parse_args, train_config
    from mclandscape.engine.train import make_optimizer

    d = parse_args(["--dataset", "cifar10", "--arch", "densenet100", "--weight-decay", "0"])
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([1.0, -2.0, 0.5])}
    opt = make_optimizer(train_config(d, 4), 1)
    ref = optax.sgd(0.1, momentum=0.9, nesterov=True)
    s, r = opt.init(params), ref.init(params)
    for _ in range(2):
        u, s = opt.update(grads, s, params)
        v, r = ref.update(grads, r, params)
        np.testing.assert_allclose(u["w"], v["w"], rtol=1e-6)
