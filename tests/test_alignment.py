"""Permutation alignment (mclandscape.methods.alignment): exact recovery of shuffled networks, determinism,
BatchNorm statistics, residual streams, every zoo architecture's function kept, clear errors for bad specs,
activation matching, distances modulo permutations (and sign flips), and the experiment's smoke run.

Zoo networks get random parameters and statistics from ``jax.eval_shape`` shapes (no compiled init), so the
tests compile one forward pass per architecture."""

from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mclandscape.engine.models import from_flax, get_model
from mclandscape.methods import alignment as A

X = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def zoo(arch: str, kw: tuple = ()):
    return get_model(arch, **dict(kw))


@functools.lru_cache(maxsize=None)
def forward(model):
    return jax.jit(lambda v, x: model.apply(v, x))


@functools.lru_cache(maxsize=None)
def random_variables(model, seed: int = 0, shape=X.shape):
    """Random parameters (scaled by fan-in) and BatchNorm statistics (positive variances) for ``model``."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        if "batch_stats" in name and "var" in name:
            return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), jnp.float32)
        fan = int(np.prod(s.shape[:-1])) or 1
        return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(fan), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def same_leaves(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True))


def max_rel_change(model, v, w, x=X) -> float:
    f = forward(model)
    y0, y1 = np.asarray(f(v, x)), np.asarray(f(w, x))
    return float(np.max(np.abs(y0 - y1)) / np.max(np.abs(y0)))


ZOO = [
    ("mlp", (("widths", (7, 5)),)),
    ("mlp", (("widths", (6,)), ("activation", "tanh"))),
    ("simple_cnn", (("channels", (4, 6, 8)), ("hidden", 10))),
    ("convfc", (("channels", (4, 6, 8)), ("hidden", (9, 7)))),
    ("vgg16", (("width", 16),)),
    ("vgg16_bn", (("width", 16),)),
    ("resnet18", ()),
    ("resnet20", ()),  # option-A shortcuts; resnet18 has the projection (option B) ones
    ("preresnet20", ()),
    ("preresnet164", (("depth", 11),)),
    ("densenet100", (("depth", 10), ("growth_rate", 4))),
    ("vit_small", (("patch_size", 2), ("dim", 12), ("depth", 2), ("heads", 3), ("mlp_dim", 8))),
]


@pytest.mark.parametrize("arch,kw", ZOO, ids=[f"{a}{'-' + str(dict(k)) if k else ''}" for a, k in ZOO])
def test_every_zoo_architecture_keeps_its_function_and_align_undoes_a_shuffle(arch, kw):
    model = zoo(arch, kw)
    spec = A.permutation_spec(model)
    v = random_variables(model)
    perm = A.random_permutation(spec, v, jax.random.key(1), sign_flips=bool(spec.odd))
    assert not perm.is_identity() and set(perm) == set(A.spec_sizes(spec, v))
    w = A.apply_permutation(spec, perm, v)
    assert not same_leaves(v, w)
    assert max_rel_change(model, v, w) < 1e-5
    assert same_leaves(A.apply_permutation(spec, perm.inverse(), w), v)
    if sum(np.size(x) for x in jax.tree_util.tree_leaves(v)) < 2_000_000:  # VGG16 and ResNet-18: shown above
        back = A.align(model, v, w, key=jax.random.key(2), sign_flips=bool(spec.odd))
        assert same_leaves(back, v), "weight matching did not recover the shuffled network exactly"


def test_a_shuffled_network_is_recovered_exactly():
    model = zoo("mlp", (("widths", (32, 16, 8)),))
    spec = A.permutation_spec(model)
    assert spec.groups == ("Dense_0", "Dense_1", "Dense_2") and not spec.odd
    v = random_variables(model, shape=(1, 12))
    known = A.Permutation({"Dense_0": np.roll(np.arange(32), 5), "Dense_1": np.arange(16)[::-1],
                           "Dense_2": np.array([3, 1, 4, 0, 7, 5, 2, 6])})
    shuffled = A.apply_permutation(spec, known, v["params"])  # params alone work as well as variables
    assert np.array_equal(shuffled["Dense_0"]["kernel"], np.asarray(v["params"]["Dense_0"]["kernel"])[:, known["Dense_0"]])
    perm = A.weight_matching(spec, v["params"], shuffled, key=jax.random.key(0))
    assert perm == known.inverse() and perm.converged and perm.iterations >= 1
    assert same_leaves(A.apply_permutation(spec, perm, shuffled), v["params"])
    assert same_leaves(A.align(model, v, A.apply_permutation(spec, known, v)), v)


def test_weight_matching_is_deterministic_for_a_fixed_key_and_never_worse_than_the_identity():
    model = zoo("mlp", (("widths", (24, 24)),))
    spec = A.permutation_spec(model)
    a, b = random_variables(model, 0, (1, 10))["params"], random_variables(model, 1, (1, 10))["params"]
    p1 = A.weight_matching(spec, a, b, key=jax.random.key(7))
    p2 = A.weight_matching(spec, a, b, key=jax.random.key(7))
    assert p1 == p2 and p1.iterations == p2.iterations
    assert A.weight_matching(spec, a, b) == A.weight_matching(spec, a, b)  # key=None: the spec's order
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])  # noqa: E731
    before = np.linalg.norm(flat(a) - flat(b))
    after = np.linalg.norm(flat(a) - flat(A.apply_permutation(spec, p1, b)))
    assert after < before
    assert A.distance_modulo_permutation(spec, a, b, key=jax.random.key(7)) == pytest.approx(after, rel=1e-6)


def test_batchnorm_statistics_follow_their_channels():
    model = zoo("resnet20")
    spec = A.permutation_spec(model)
    v = random_variables(model)
    perm = A.random_permutation(spec, v, jax.random.key(4))
    w = A.apply_permutation(spec, perm, v)
    for bn in ("stem_bn",):
        for col, leaf in (("params", "scale"), ("params", "bias"), ("batch_stats", "mean"), ("batch_stats", "var")):
            assert np.array_equal(w[col][bn][leaf], np.asarray(v[col][bn][leaf])[perm["stem"]])
    # stage 1's stream: the option-A padding blocks around stage 0's stream, each permuted within itself
    sizes = A.spec_sizes(spec, v)
    lo, hi = "stage1_block0/pad_lo", "stage1_block0/pad_hi"
    assert spec.axes["batch_stats/stage1_block0/bn2/mean"][0].perms == (lo, "stem", hi)
    idx = np.concatenate([perm[lo], sizes[lo] + perm["stem"], sizes[lo] + sizes["stem"] + perm[hi]])
    assert np.array_equal(w["batch_stats"]["stage1_block0"]["bn2"]["mean"],
                          np.asarray(v["batch_stats"]["stage1_block0"]["bn2"]["mean"])[idx])
    assert max_rel_change(model, v, w) < 1e-5
    # the statistics matter: permuting the parameters but not the statistics changes the function
    stale = {"params": w["params"], "batch_stats": v["batch_stats"]}
    assert max_rel_change(model, v, stale) > 1e-2
    # resnet20's width multiplier scales every stream: the spec is read off the module get_model builds
    wide = zoo("resnet20", (("width", 2),))
    shapes = jax.eval_shape(wide.init, jax.random.key(0), jax.ShapeDtypeStruct(X.shape, jnp.float32))
    assert A.spec_sizes(A.permutation_spec(wide), shapes)["stem"] == 32


def test_a_resnet_residual_permutation_keeps_the_function_only_when_shared():
    model = zoo("resnet20")
    spec = A.permutation_spec(model)
    v = random_variables(model)
    sizes = A.spec_sizes(spec, v)
    stream = {"stem", "stage1_block0/pad_lo", "stage1_block0/pad_hi", "stage2_block0/pad_lo", "stage2_block0/pad_hi"}
    assert stream <= set(spec.groups)
    rng = np.random.default_rng(0)
    perm = {g: (rng.permutation(n) if g in stream else np.arange(n)) for g, n in sizes.items()}
    users = [p for p, _, _ in spec.bindings("stem")]
    assert {"params/stem/kernel", "params/stage0_block2/conv2/kernel", "params/stage2_block0/conv1/kernel",
            "params/head/kernel"} <= set(users)
    assert max_rel_change(model, v, A.apply_permutation(spec, perm, v)) < 1e-5
    # a spec in which one block writes to the stream through its own permutation does change the function
    axes = dict(spec.axes)
    axes["params/stage0_block1/conv2/kernel"] = (None, None, "stage0_block1/conv1", "rogue")
    for leaf in ("params/stage0_block1/bn2/scale", "params/stage0_block1/bn2/bias", "batch_stats/stage0_block1/bn2/mean",
                 "batch_stats/stage0_block1/bn2/var"):
        axes[leaf] = ("rogue",)
    rogue = A.PermutationSpec(axes, spec.sizes)
    perm = A.random_permutation(rogue, v, jax.random.key(0))
    assert max_rel_change(model, v, A.apply_permutation(rogue, perm, v)) > 1e-2


def test_concatenated_and_tiled_axes():
    spec = A.PermutationSpec({"params/conv": (None, "c"), "params/flat": (A.Axis("c", tiled=True), None),
                              "params/cat": (("a", "c"),)}, sizes={"a": 2})
    v = {"conv": np.arange(6.0).reshape(2, 3), "flat": np.arange(12.0).reshape(6, 2), "cat": np.arange(5.0)}
    assert A.spec_sizes(spec, v) == {"c": 3, "a": 2}
    out = A.apply_permutation(spec, {"c": np.array([2, 0, 1]), "a": np.array([1, 0])}, v)
    assert out["conv"][0].tolist() == [2.0, 0.0, 1.0]
    assert out["flat"][:, 0].tolist() == [4.0, 0.0, 2.0, 10.0, 6.0, 8.0]  # rows (position, channel), channel fastest
    assert out["cat"].tolist() == [1.0, 0.0, 4.0, 2.0, 3.0]


def test_a_bad_spec_gets_a_clear_error_naming_the_parameters():
    model = zoo("mlp", (("widths", (8, 4)),))
    spec = A.permutation_spec(model)
    v = random_variables(model, shape=(1, 3))
    axes = dict(spec.axes)
    axes["params/Dense_2/kernel"] = ("Dense_0", None)  # Dense_2 reads the 4 units of Dense_1, not Dense_0's 8
    with pytest.raises(ValueError, match=r"(?s)params/Dense_2/kernel.*group 'Dense_0'.*params/Dense_0/kernel"):
        A.spec_sizes(A.PermutationSpec(axes), v)
    missing = {k: e for k, e in spec.axes.items() if k != "params/Dense_1/bias"}
    with pytest.raises(ValueError, match="no entry for.*params/Dense_1/bias"):
        A.apply_permutation(A.PermutationSpec(missing), A.identity_permutation(spec, v), v)
    with pytest.raises(ValueError, match="2 axis entries for params/Dense_0/bias"):
        A.spec_sizes(A.PermutationSpec({**spec.axes, "params/Dense_0/bias": (None, "Dense_0")}), v)
    with pytest.raises(ValueError, match="names.*params/extra/kernel"):
        A.spec_sizes(A.PermutationSpec({**spec.axes, "params/extra/kernel": (None,)}), v)
    with pytest.raises(ValueError, match="axis sizes disagree.*'Dense_0'.*PermutationSpec"):
        A.spec_sizes(A.PermutationSpec(spec.axes, sizes={"Dense_0": 5}), v)
    with pytest.raises(ValueError, match="no entry for"):  # a spec of another architecture
        A.weight_matching(A.permutation_spec(zoo("mlp", (("widths", (8,)),))), v, v)
    tiled = A.PermutationSpec({"params/w": (A.Axis("c", tiled=True),), "params/b": ("c",)})
    with pytest.raises(ValueError, match="params/w has 7 entries, not a multiple"):
        A.spec_sizes(tiled, {"w": np.zeros(7), "b": np.zeros(3)})
    cat = A.PermutationSpec({"params/w": (("a", "b"),)})
    with pytest.raises(ValueError, match=r"cannot infer the size.*params/w.*sizes="):
        A.spec_sizes(cat, {"w": np.zeros(5)})
    with pytest.raises(ValueError, match="one entry per axis"):
        A.PermutationSpec({"params/w": "h"})
    with pytest.raises(ValueError, match="axis entry"):
        A.PermutationSpec({"params/w": (3,)})
    with pytest.raises(ValueError, match="odd names"):
        A.PermutationSpec({"params/w": ("h",)}, odd={"g"})
    ident = A.identity_permutation(spec, v)
    with pytest.raises(ValueError, match=r"perm\['Dense_1'\] must be a permutation of range\(4\)"):
        A.apply_permutation(spec, {**ident, "Dense_1": np.array([0, 0, 1, 2])}, v)
    with pytest.raises(ValueError, match="no entry for group"):
        A.apply_permutation(spec, {"Dense_0": ident["Dense_0"]}, v)
    with pytest.raises(ValueError, match="not a symmetry"):
        A.apply_permutation(spec, A.Permutation(ident, {"Dense_0": np.ones(8)}), v)
    with pytest.raises(ValueError, match="no odd group"):
        A.weight_matching(spec, v, v, sign_flips=True)
    with pytest.raises(ValueError, match="not a zoo architecture|PermutationSpec"):
        A.permutation_spec({"arch": "my_net"})
    with pytest.raises(ValueError, match="method"):
        A.align(model, v, v, method="magic")
    with pytest.raises(ValueError, match="data must be a Dataset"):
        A.align(model, v, v, method="activation")


def test_activation_matching_recovers_permuted_copies_with_and_without_sign_flips():
    model = zoo("mlp", (("widths", (12, 9)), ("activation", "tanh")))
    spec = A.permutation_spec(model)
    assert spec.odd == {"Dense_0", "Dense_1"}
    v = random_variables(model, 2, (1, 64))
    x = np.random.default_rng(1).normal(size=(200, 64)).astype(np.float32)
    perm = A.random_permutation(spec, v, jax.random.key(3), sign_flips=True)
    w = A.apply_permutation(spec, perm, v)
    assert max_rel_change(model, v, w, x) < 1e-5
    found = A.activation_matching(model, spec, v, w, x, batch_size=64, sign_flips=True)
    assert found == perm.inverse()
    assert same_leaves(A.apply_permutation(spec, found, w), v)
    # a ResNet (BatchNorm, option-A padding blocks) through align(method="activation")
    res = zoo("resnet20")
    rv = random_variables(res)
    rspec = A.permutation_spec(res)
    rw = A.apply_permutation(rspec, A.random_permutation(rspec, rv, jax.random.key(8)), rv)
    xs = np.random.default_rng(2).normal(size=(32, 8, 8, 1)).astype(np.float32)
    assert same_leaves(A.align(res, rv, rw, method="activation", data=(xs, None)), rv)
    with pytest.raises(ValueError, match="BatchNorm.*full"):
        A.activation_matching(res, rspec, rv["params"], rw["params"], xs)


def test_alignment_of_independently_trained_networks(digits_corners, digits_mlp, digits_train):
    """Both methods on two of the session's trained digits MLPs: the function is kept, the parameters move
    closer, and the straight line's midpoint has a lower train loss than without alignment."""
    from mclandscape.core.losses import cross_entropy

    a, b = digits_corners[0].variables, digits_corners[1].variables
    spec = A.permutation_spec(digits_mlp)
    x, y = jnp.asarray(digits_train.x), jnp.asarray(digits_train.y)
    f = forward(digits_mlp)
    mid_loss = lambda p, q: float(jnp.mean(cross_entropy(  # noqa: E731
        f(jax.tree_util.tree_map(lambda s, t: 0.5 * (s + t), p, q), x), y)))
    raw_mid = mid_loss(a, b)
    raw_dist = A.distance_modulo_permutation(spec, a, b, max_iter=1)  # not yet aligned: only a lower bound below
    for method in A.METHODS:
        al, perm = A.align(digits_mlp, a, b, method=method, data=digits_train, num_examples=500,
                           key=jax.random.key(0), return_permutation=True)
        assert not perm.is_identity()
        assert np.max(np.abs(np.asarray(f(al, x)) - np.asarray(f(b, x)))) < 1e-4
        assert mid_loss(a, al) < raw_mid
        flat = lambda t: np.concatenate([np.ravel(u) for u in jax.tree_util.tree_leaves(t["params"])])  # noqa: E731
        assert np.linalg.norm(flat(a) - flat(al)) < np.linalg.norm(flat(a) - flat(b))
    assert raw_dist < np.linalg.norm(np.concatenate([np.ravel(u) for u in jax.tree_util.tree_leaves(a["params"])])
                                     - np.concatenate([np.ravel(u) for u in jax.tree_util.tree_leaves(b["params"])]))


def test_distance_modulo_permutation_and_sign_flips():
    relu = zoo("mlp", (("widths", (16, 8)),))
    spec = A.permutation_spec(relu)
    p = random_variables(relu, 0, (1, 5))["params"]
    q = A.apply_permutation(spec, A.random_permutation(spec, p, jax.random.key(0)), p)
    assert A.distance_modulo_permutation(spec, p, q) == pytest.approx(0.0, abs=1e-6)
    tanh = zoo("mlp", (("widths", (6,)), ("activation", "tanh")))
    tspec = A.permutation_spec(tanh)
    p = random_variables(tanh, 1, (1, 3))["params"]
    q = A.apply_permutation(tspec, A.random_permutation(tspec, p, jax.random.key(1), sign_flips=True), p)
    assert A.distance_modulo_permutation(tspec, p, q, sign_flips=True) == pytest.approx(0.0, abs=1e-6)
    assert A.distance_modulo_permutation(tspec, p, q) > 0.1
    # one hidden layer: exact, the minimum over all 6! orders of the hidden units (and, per unit, its sign)
    for seed in range(3):
        a, b = random_variables(tanh, 10 + seed, (1, 3))["params"], random_variables(tanh, 20 + seed, (1, 3))["params"]
        for odd in (True, False):
            want = _brute_force_one_hidden_layer(a, b, odd)
            assert A.distance_modulo_permutation(tspec, a, b, sign_flips=odd) == pytest.approx(want, rel=1e-5)


def _brute_force_one_hidden_layer(a, b, odd: bool) -> float:
    import itertools

    def units(p):  # one row per hidden unit: its input weights, bias and output weights
        p = jax.tree_util.tree_map(np.asarray, p)
        return np.concatenate([p["Dense_0"]["kernel"].T, p["Dense_0"]["bias"][:, None], p["Dense_1"]["kernel"]], 1)

    ua, ub = units(a), units(b)
    fixed = float(np.sum((np.asarray(a["Dense_1"]["bias"]) - np.asarray(b["Dense_1"]["bias"])) ** 2))
    best = np.inf
    for order in itertools.permutations(range(len(ua))):
        d = np.sum((ua - ub[list(order)]) ** 2, 1)
        if odd:
            d = np.minimum(d, np.sum((ua + ub[list(order)]) ** 2, 1))
        best = min(best, float(d.sum()))
    return float(np.sqrt(best + fixed))


def test_permutation_is_a_mapping_with_an_inverse():
    p = A.Permutation({"h": [2, 0, 1], "g": [1, 0]}, signs={"h": [1, -1, 1]})
    assert set(p) == {"h", "g"} and len(p) == 2 and p["h"].dtype == np.int64
    inv = p.inverse()
    assert inv["h"].tolist() == [1, 2, 0] and inv.signs["h"].tolist() == [-1.0, 1.0, 1.0]
    spec = A.PermutationSpec({"params/w": ("h", "g")}, odd={"h"})
    w = {"w": np.arange(6.0).reshape(3, 2)}
    once = A.apply_permutation(spec, p, w)
    assert once["w"].tolist() == [[5.0, 4.0], [-1.0, 0.0], [3.0, 2.0]]  # rows: indices [2, 0, 1], signs; columns swapped
    assert np.array_equal(A.apply_permutation(spec, inv, once)["w"], w["w"])
    assert A.Permutation({"h": [0, 1]}).is_identity() and not p.is_identity()


class _Residual(nn.Module):  # a skip connection: two layers read the same hidden units
    @nn.compact
    def __call__(self, x, train=False):
        h = nn.relu(nn.Dense(6)(x))
        return nn.Dense(3)(h + nn.relu(nn.Dense(6)(h)))


class _Mixing(nn.Module):  # a chain of Dense layers, but a cumulative sum mixes the hidden units
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(3)(jnp.cumsum(nn.relu(nn.Dense(6)(x)), axis=-1))


def test_a_user_model_is_never_given_a_zoo_spec_by_its_name():
    """A wrapped Flax module whose spec names a zoo architecture without its arguments gets no zoo spec; a
    chain of Dense layers is derived (and checked on the function), anything else is refused with its leaves."""
    res = from_flax(_Residual(), name="mlp", spec={"arch": "mlp"})
    v = random_variables(res, shape=(1, 4))
    with pytest.raises(ValueError, match="not a zoo model.*pass its variables"):
        A.permutation_spec(res)
    with pytest.raises(ValueError, match=r"(?s)cannot be derived.*no single order.*params/Dense_2/kernel \(6, 6\)"):
        A.permutation_spec(res, v)
    with pytest.raises(ValueError, match=r"(?s)not a Dense layer.*params/bn/scale"):
        A.permutation_spec(res, {"params": {**v["params"], "bn": {"scale": jnp.ones(6)}}})
    mix = from_flax(_Mixing(), name="MLP")
    with pytest.raises(ValueError, match=r"(?s)changes its outputs.*params/Dense_0/kernel \(6, 3\)"):
        A.permutation_spec(mix, random_variables(mix, shape=(1, 4)))
    plain = zoo("mlp", (("widths", (7, 5)),))
    user = from_flax(plain_module(plain), name="MLP")  # the zoo's module, wrapped by a user: no kwargs in its spec
    pv = random_variables(plain, 0, (1, 3))
    spec = A.permutation_spec(user, pv)
    assert spec.axes == A.permutation_spec(plain).axes
    b = A.apply_permutation(spec, A.random_permutation(spec, pv, jax.random.key(1)), pv)
    assert same_leaves(A.align(user, pv, b), pv)


def plain_module(model):
    from mclandscape.engine.models.mlp import MLP

    return MLP(**{k: v for k, v in model.spec["kwargs"].items()})


# ---- the experiment --------------------------------------------------------------------------------------


# the smoke run below uses the same model, data and surface settings, so it reuses these compiled steps
# phase 2 is empty: phases 1 and 3 still show the tracking across a phase change, one compiled step fewer
SMOKE = dict(widths=(12, 12), limit_train=256, limit_test=100, phase_epochs=(1, 0, 1), num_samples=2, lr=0.1, grid=3)


def test_experiment_tracks_surface_training_through_the_epoch_callback(digits_train, digits_test):
    from experiments.alignment import build_model, train_surface_tracked
    from mclandscape.core.connectors import bezier_surface
    from mclandscape.methods.surface_train import SurfaceConfig, train_surface

    model = build_model("mlp", 10, widths=SMOKE["widths"])
    corners = [random_variables(model, s, (1, 8, 8, 1))["params"] for s in range(4)]
    surf = bezier_surface(*corners)
    train, test = digits_train.take(SMOKE["limit_train"]), digits_test.take(SMOKE["limit_test"])
    kw = dict(epochs=SMOKE["phase_epochs"], num_samples=SMOKE["num_samples"], batch_size=128, lr=SMOKE["lr"], seed=0)
    ref = train_surface(model, surf, train, SurfaceConfig(epochs=kw["epochs"], num_samples=kw["num_samples"],
                                                          batch_size=128, lr=kw["lr"]), seed=0, progress=False)
    conn, curve, reached = train_surface_tracked(model, surf, train, test, **kw, target=None, grid_steps=SMOKE["grid"])
    for x, y in zip(jax.tree_util.tree_leaves(ref.connector.control), jax.tree_util.tree_leaves(conn.control),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # tracking does not change the training
    assert reached is None and [c["total_epochs"] for c in curve] == [0, 1, 2]
    assert [c["phase"] for c in curve] == [0, 1, 3]
    # a target met after the first epoch stops the training there (StopRun from the callback)
    target = curve[1]["mean_acc"]
    _, stopped, reached = train_surface_tracked(model, surf, train, test, **kw, target=target, grid_steps=SMOKE["grid"])
    assert reached == 1 and len(stopped) == 2 if curve[0]["mean_acc"] < target else reached == 0
    _, short, reached = train_surface_tracked(model, surf, train, test, **kw, target=0.0, grid_steps=SMOKE["grid"])
    assert reached == 0 and len(short) == 1  # the target is met before training: nothing is trained


@pytest.mark.slow
def test_experiment_smoke_writes_the_contract_keys(tmp_path, monkeypatch):
    from experiments.alignment import CONTRACT, main
    from mclandscape import plots

    # the figures at a third of their resolution: the contract is that they are written, not their pixels
    monkeypatch.setattr(plots, "save", functools.partial(plots.save, dpi=40))

    out = tmp_path / "al"
    res = main(["--out", str(out), "--archs", "mlp", "--widths", ",".join(map(str, SMOKE["widths"])),
                "--corner-epochs", "2", "--phase-epochs", "0,0,1",  # phase 3 as compiled above
                "--num-samples", str(SMOKE["num_samples"]), "--lr", str(SMOKE["lr"]), "--grid-steps", str(SMOKE["grid"]),
                "--line-points", "5", "--sweep-widths", str(SMOKE["widths"][0]), "--sweep-epochs", "2",
                "--limit-train", str(SMOKE["limit_train"]), "--limit-test", str(SMOKE["limit_test"]), "--full-budget"])
    saved = json.loads((out / "results.json").read_text())
    for key in CONTRACT:
        assert key in saved and key in saved["per_model"]["mlp"] and saved[key] == res[key]
    for key in ("linear_barrier_raw", "linear_barrier_aligned", "bilinear_mean_acc_raw", "bilinear_min_acc_aligned"):
        assert np.isfinite(saved[key])
    assert 0 <= saved["bilinear_min_acc_raw"] <= saved["bilinear_mean_acc_raw"] <= 1
    m = saved["per_model"]["mlp"]
    assert m["alignment"]["max_logit_change"] < 1e-4 and len(m["bezier_surface_curve_raw"]) == 2
    assert set(m["bezier_surface_epochs_to_gap_aligned"]) == {"0.05", "0.02", "0.01"}
    for which in ("raw", "aligned"):
        e = saved[f"bezier_surface_epochs_to_target_{which}"]
        assert e is None or 0 <= e <= 1
    assert saved["width_sweep"]["widths"] == [12] and len(saved["width_sweep"]["linear_barrier_raw"]) == 1
    assert {"mlp_bilinear.png", "mlp_lines.png", "mlp_surface_training.png", "width_sweep.png"} <= set(saved["figures"])
    assert all((out / f).stat().st_size > 5000 for f in saved["figures"])
