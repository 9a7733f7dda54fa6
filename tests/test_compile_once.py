"""Compiled code is keyed by value: a model rebuilt by name (or wrapped again from an equal Flax module) and an
equal TrainConfig reuse the compiled steps and evaluations of the first call."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mclandscape.core.tree import tree_stack
from mclandscape.engine.evaluate import evaluate
from mclandscape.engine.many import train_many
from mclandscape.engine.models import from_flax, from_nnx, get_model
from mclandscape.engine.points import plane_points, stacked_points
from mclandscape.engine.train import TrainConfig, make_optimizer, train_model

CFG = TrainConfig(epochs=1, batch_size=64, optimizer="sgd", lr=0.05)


@pytest.fixture(scope="module")
def tiny(digits_small):
    train, test = digits_small
    return train.take(128), test.take(64)


def test_rebuilt_zoo_model_and_optimizer_are_equal():
    a, b = get_model("mlp", widths=[8]), get_model("mlp", widths=(8,))
    assert a == b and hash(a) == hash(b)
    assert a != get_model("mlp", widths=[9])
    assert get_model("vgg16_bn", width=8) == get_model("vgg16bn", width=8)
    assert make_optimizer(CFG, 2) == make_optimizer(CFG.replace(), 2) != make_optimizer(CFG, 3)


def test_second_train_model_with_a_rebuilt_model_compiles_nothing(tiny, count_compiles):
    train, test = tiny
    first = train_model(get_model("mlp", widths=[8]), train, test, CFG, progress=False)
    with count_compiles() as seen:
        again = train_model(get_model("mlp", widths=[8]), train, test, CFG.replace(), progress=False)
    assert seen == []
    assert again.final["train_loss"] == first.final["train_loss"]


def test_second_stacked_train_many_compiles_nothing(tiny, count_compiles):
    train, _ = tiny
    train_many(get_model("mlp", widths=[8]), train, None, CFG, seeds=(0, 1), strategy="vmap", progress=False)
    with count_compiles() as seen:
        train_many(get_model("mlp", widths=[8]), train, None, CFG, seeds=(0, 1), strategy="vmap", progress=False)
    assert seen == []


def test_evaluations_of_a_rebuilt_model_compile_nothing(tiny, count_compiles):
    _, test = tiny
    model = get_model("mlp", widths=[8])
    variables = model.init(jax.random.key(0), jnp.asarray(test.x[:1]))
    p = variables["params"]
    points, one = plane_points(p, p, None, [0.0, 0.5]), stacked_points(tree_stack([p]))
    evaluate(model, one, test, batch_size=32, variables=variables)
    evaluate(model, points, test, batch_size=32)
    rebuilt = get_model("mlp", widths=[8])
    with count_compiles() as seen:
        evaluate(rebuilt, one, test, batch_size=32, variables=variables)
        evaluate(rebuilt, points, test, batch_size=32)
    assert seen == []


class _Net(nn.Module):
    width: int = 8

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(10)(nn.relu(nn.Dense(self.width)(x.reshape(x.shape[0], -1))))


class _NnxNet(nnx.Module):
    def __init__(self, rngs, width: int = 8):
        self.fc = nnx.Linear(64, width, rngs=rngs)
        self.head = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.fc(x.reshape(x.shape[0], -1))))


@pytest.mark.parametrize("wrap", [lambda: from_flax(_Net()), lambda: from_nnx(_NnxNet)],
                         ids=["from_flax", "from_nnx"])
def test_wrapping_an_equal_module_again_compiles_nothing(tiny, count_compiles, wrap):
    _, test = tiny
    model = wrap()
    assert wrap() == model and hash(wrap()) == hash(model)
    variables = model.init(jax.random.key(0), jnp.asarray(test.x[:1]))
    one = stacked_points(tree_stack([variables["params"]]))
    first = evaluate(model, one, test, batch_size=32, variables=variables)
    rebuilt = wrap()
    with count_compiles() as seen:
        # a from_flax model learns whether it has BatchNorm from its first init (abstract here, no compilation)
        jax.eval_shape(rebuilt.init, jax.random.key(0), jnp.asarray(test.x[:1]))
        again = evaluate(rebuilt, one, test, batch_size=32, variables=variables)
    assert seen == []
    assert (again.loss.tolist(), again.accuracy.tolist()) == (first.loss.tolist(), first.accuracy.tolist())


def test_wrapped_modules_differ_by_value():
    assert from_flax(_Net(width=4)) != from_flax(_Net(width=8))
    assert from_flax(_Net(), has_batch_stats=False) != from_flax(_Net(), name="other", has_batch_stats=False)
    import functools
    assert from_nnx(functools.partial(_NnxNet, width=4)) == from_nnx(functools.partial(_NnxNet, width=4))
    assert from_nnx(functools.partial(_NnxNet, width=4)) != from_nnx(functools.partial(_NnxNet, width=5))
