"""The engine's shared "network on a batch" objective and mini-batch stream (mclandscape.engine.train.params_loss,
batch_stream) that NEB, curvature and DSP-TT differentiate."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mclandscape.engine.data import Dataset, iterate_batches
from mclandscape.engine.models import from_flax, get_model
from mclandscape.engine.train import batch_stream, params_loss


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
    np.testing.assert_allclose(params_loss(model, v)(v["params"], (x, y)), ce, rtol=1e-5)
    onehot = np.eye(3)[y]
    sq = np.mean(np.sum((out - onehot) ** 2, -1))
    np.testing.assert_allclose(params_loss(model, v, loss="mse_onehot")(v["params"], (x, y)), sq, rtol=1e-5)
    norm2 = sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in jax.tree_util.tree_leaves(v["params"]))
    np.testing.assert_allclose(params_loss(model, v, loss="mse_onehot", l2=0.1)(v["params"], (x, y)),
                               sq + 0.05 * norm2, rtol=1e-5)
    per_ex = lambda o, t: jnp.abs(o[:, 0] - t)  # noqa: E731 - a custom per-example loss
    np.testing.assert_allclose(params_loss(model, v, loss=per_ex)(v["params"], (x, y)),
                               np.mean(np.abs(out[:, 0] - y)), rtol=1e-5)
    g = jax.grad(params_loss(model, v))(v["params"], (x, y))
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(v["params"])


def test_batchnorm_modes_and_dropout_key():
    x, y = _data()
    model = from_flax(_DropBN(), "dropbn", has_batch_stats=True)
    v = model.init(jax.random.key(0), x[:2])
    with pytest.raises(ValueError, match="BatchNorm"):
        params_loss(model, {"params": v["params"]}, train=False)
    # inference: the stored running statistics, dropout off
    stats = jax.tree_util.tree_map(lambda a: a + 0.3, v["batch_stats"])
    eval_fn = params_loss(model, {"params": v["params"], "batch_stats": stats}, train=False)
    logits = model.apply({"params": v["params"], "batch_stats": stats}, x)
    ref = float(jnp.mean(optax_ce(logits, y)))
    np.testing.assert_allclose(eval_fn(v["params"], (x, y)), ref, rtol=1e-5)
    # train mode (default for BN models): batch statistics, so the running statistics do not matter
    tr = params_loss(model, {"params": v["params"], "batch_stats": stats})
    tr0 = params_loss(model)  # no variables at all: the collection is made up from the model's shapes
    k1 = jax.random.key(1)
    np.testing.assert_allclose(tr(v["params"], (x, y, k1)), tr0(v["params"], (x, y, k1)), rtol=1e-6)
    a = tr(v["params"], (x, y, jax.random.key(1)))
    b = tr(v["params"], (x, y, jax.random.key(2)))
    assert float(a) != float(b)  # the key drives dropout
    np.testing.assert_allclose(a, tr(v["params"], (x, y, jax.random.key(1))), rtol=0)


def optax_ce(logits, y):
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def test_bad_inputs():
    x, y = _data()
    model = get_model("mlp", widths=[4], num_classes=3)
    v = model.init(jax.random.key(0), x[:2])
    with pytest.raises(ValueError, match="loss"):
        params_loss(model, v, loss="hinge")
    with pytest.raises(ValueError, match="l2"):
        params_loss(model, v, l2=-1.0)
    with pytest.raises(ValueError, match="batch"):
        params_loss(model, v)(v["params"], (x,))
    with pytest.raises(ValueError, match="variables"):
        params_loss(model, [1, 2])


def test_batch_stream_is_random_access_and_matches_iterate_batches():
    x, y = _data(50)
    ds = Dataset(x=x, y=y, num_classes=3, name="toy")
    s = batch_stream(ds, 16, seed=3, keys=True)
    assert s.steps_per_epoch == 3  # drop_last
    epochs = [list(iterate_batches(ds, 16, seed=3, epoch=e, shuffle=True, drop_last=True)) for e in range(2)]
    order = [5, 0, 4, 1, 3, 2]  # out of order: batch t depends only on t
    for t in order:
        xb, yb, key = s(t)
        e, j = divmod(t, 3)
        np.testing.assert_array_equal(np.asarray(xb), epochs[e][j][0])
        np.testing.assert_array_equal(np.asarray(yb), epochs[e][j][1])
        assert np.array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.fold_in(jax.random.key(3), t)))
    assert len(batch_stream(ds, 16)(0)) == 2
    with pytest.raises(ValueError, match="batch_size"):
        batch_stream(ds, 0)
    with pytest.raises(ValueError, match="exceeds"):
        batch_stream(ds, 51)
