"""The one objective (mclandscape.core.objective) and the random-access batch stream every trainer uses."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mclandscape.core.objective import function_objective, make_objective
from mclandscape.engine.batches import batch_stream, iterate_batches
from mclandscape.engine.data import Dataset
from mclandscape.engine.models import from_flax, get_model


class _DropBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(6)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
        return nn.Dense(3)(x)


def _data(n=40, f=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, f)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)


def test_losses_equal_their_definitions():
    x, y = _data()
    model = get_model("mlp", widths=[4], num_classes=3)
    v = model.init(jax.random.key(0), x[:2])
    out = np.asarray(model.apply(v, x), np.float64)
    logp = out - np.log(np.exp(out).sum(-1, keepdims=True))
    ce = -np.mean(logp[np.arange(len(y)), y])
    loss, aux = make_objective(model, variables=v, train=False)(v["params"], (x, y), None)
    np.testing.assert_allclose(loss, ce, rtol=1e-5)
    assert float(aux["count"]) == 40 and float(aux["correct"]) == np.sum(out.argmax(-1) == y)
    onehot = np.eye(3)[y]
    sq = np.mean(np.sum((out - onehot) ** 2, -1))
    np.testing.assert_allclose(make_objective(model, "mse_onehot")(v["params"], (x, y))[0], sq, rtol=1e-5)
    norm2 = sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in jax.tree_util.tree_leaves(v["params"]))
    loss, aux = make_objective(model, "mse_onehot", l2=0.1)(v["params"], (x, y))
    np.testing.assert_allclose(loss, sq + 0.05 * norm2, rtol=1e-5)
    np.testing.assert_allclose(aux["loss"], sq, rtol=1e-5)  # the task loss excludes the L2 term
    per_ex = lambda o, t: jnp.abs(o[:, 0] - t)  # noqa: E731 - a custom per-example loss
    np.testing.assert_allclose(make_objective(model, per_ex)(v["params"], (x, y))[0],
                               np.mean(np.abs(out[:, 0] - y)), rtol=1e-5)
    g = jax.grad(lambda p: make_objective(model)(p, (x, y))[0])(v["params"])
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(v["params"])
    # regression targets: no accuracy
    _, aux = make_objective(model, "mse")(v["params"], (x, np.zeros((40, 3), np.float32)))
    assert np.isnan(float(aux["correct"]))


def test_weights_give_the_weighted_mean():
    x, y = _data()
    model = get_model("mlp", widths=[4], num_classes=3)
    v = model.init(jax.random.key(0), x[:2])
    obj = make_objective(model)
    w = np.zeros(40, np.float32)
    w[:25] = 1.0
    full, aux_w = obj(v["params"], (x, y, w))
    part, aux_p = obj(v["params"], (x[:25], y[:25]))
    np.testing.assert_allclose(full, part, rtol=1e-6)
    assert float(aux_w["count"]) == 25 and float(aux_w["correct"]) == float(aux_p["correct"])


def test_batchnorm_modes_dropout_key_and_statistics_in_aux():
    x, y = _data()
    model = from_flax(_DropBN(), "dropbn", has_batch_stats=True)
    v = model.init(jax.random.key(0), x[:2])
    with pytest.raises(ValueError, match="BatchNorm"):
        make_objective(model, variables={"params": v["params"]}, train=False)
    # inference: the stored running statistics, dropout off
    stats = jax.tree_util.tree_map(lambda a: a + 0.3, v["batch_stats"])
    ev = make_objective(model, variables={"params": v["params"], "batch_stats": stats}, train=False)
    logits = model.apply({"params": v["params"], "batch_stats": stats}, x)
    ref = float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)))
    loss, aux = ev(v["params"], (x, y), jax.random.key(3))
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    assert "batch_stats" not in aux
    # train mode (default for BN models): batch statistics, so the running statistics do not matter
    tr = make_objective(model, variables={"params": v["params"], "batch_stats": stats})
    tr0 = make_objective(model)  # no variables at all: the collection is made up from the model's shapes
    k1 = jax.random.key(1)
    np.testing.assert_allclose(tr(v["params"], (x, y), k1)[0], tr0(v["params"], (x, y), k1)[0], rtol=1e-6)
    a, aux = tr(v["params"], (x, y), jax.random.key(1))
    b, _ = tr(v["params"], (x, y), jax.random.key(2))
    assert float(a) != float(b)  # the key drives dropout
    np.testing.assert_allclose(a, tr(v["params"], (x, y), jax.random.key(1))[0], rtol=0)
    # the updated running statistics: r' = 0.9 r + 0.1 b with b the batch mean of the first layer's output
    h = np.asarray(x @ np.asarray(v["params"]["Dense_0"]["kernel"]) + np.asarray(v["params"]["Dense_0"]["bias"]))
    np.testing.assert_allclose(aux["batch_stats"]["BatchNorm_0"]["mean"],
                               0.9 * np.asarray(stats["BatchNorm_0"]["mean"]) + 0.1 * h.mean(0), rtol=1e-5)
    # with_state swaps the statistics without changing the static configuration
    swapped = tr0.with_state({"batch_stats": stats})
    assert jax.tree_util.tree_structure(swapped) == jax.tree_util.tree_structure(tr)


def test_bad_inputs():
    x, y = _data()
    model = get_model("mlp", widths=[4], num_classes=3)
    v = model.init(jax.random.key(0), x[:2])
    with pytest.raises(ValueError, match="loss"):
        make_objective(model, "hinge")
    with pytest.raises(ValueError, match="l2"):
        make_objective(model, l2=-1.0)
    with pytest.raises(ValueError, match="batch"):
        make_objective(model)(v["params"], (x,))
    with pytest.raises(ValueError, match="disagree"):
        make_objective(model)(v["params"], (x, y[:3]))
    with pytest.raises(ValueError, match="weights"):
        make_objective(model)(v["params"], (x, y, np.ones(3)))
    with pytest.raises(ValueError, match="variables"):
        make_objective(model, variables=[1, 2])
    with pytest.raises(ValueError, match="label_smoothing"):
        make_objective(model, "mse", label_smoothing=0.1)
    with pytest.raises(ValueError, match="callable"):
        function_objective(3)


def test_batch_stream_is_random_access_and_matches_iterate_batches():
    x, y = _data(50)
    ds = Dataset(x=x, y=y, num_classes=3, name="toy")
    s = batch_stream(ds, 16, seed=3)
    assert s.steps_per_epoch == 3  # drop_last
    epochs = [list(iterate_batches(ds, 16, seed=3, epoch=e, shuffle=True, drop_last=True)) for e in range(2)]
    order = [5, 0, 4, 1, 3, 2]  # out of order: batch t depends only on t
    for t in order:
        xb, yb = s(t)
        e, j = divmod(t, 3)
        np.testing.assert_array_equal(np.asarray(xb), epochs[e][j][0])
        np.testing.assert_array_equal(np.asarray(yb), epochs[e][j][1])
    padded = batch_stream(ds, 16, seed=3, drop_last=False, pad=True)
    assert padded.steps_per_epoch == 4
    xb, yb, wb = padded(3)
    assert xb.shape == (16, 5) and np.asarray(wb).tolist() == [1.0, 1.0] + [0.0] * 14
    last = list(iterate_batches(ds, 16, seed=3, epoch=0, drop_last=False))[-1]
    np.testing.assert_array_equal(np.asarray(xb)[:2], last[0])
    with pytest.raises(ValueError, match="batch_size"):
        batch_stream(ds, 0)
    with pytest.raises(ValueError, match="exceeds"):
        batch_stream(ds, 51)
    with pytest.raises(ValueError, match="batch index"):
        s(-1)


def test_augmented_batches_are_random_access_too():
    rng = np.random.default_rng(0)
    ds = Dataset(x=rng.normal(size=(40, 8, 8, 1)).astype(np.float32), y=rng.integers(0, 3, 40).astype(np.int32),
                 num_classes=3, name="img")
    s = batch_stream(ds, 8, seed=1, augment=True)
    seq = list(iterate_batches(ds, 8, seed=1, epoch=1, augment=True, drop_last=True))
    np.testing.assert_array_equal(np.asarray(s(8)[0]), seq[3][0])  # epoch 1, batch 3, fetched directly
    plain = batch_stream(ds, 8, seed=1)(8)
    np.testing.assert_array_equal(np.asarray(plain[1]), np.asarray(s(8)[1]))  # the same examples ...
    assert not np.array_equal(np.asarray(plain[0]), np.asarray(s(8)[0]))  # ... cropped and flipped
