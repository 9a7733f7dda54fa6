"""What a new user runs into at the model/parameter/label boundaries: errors that name the argument or the leaf,
raised before Flax's or XLA's own, and nothing silently truncated or clipped."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mclandscape.core.losses import cross_entropy, get_loss, mse, mse_onehot
from mclandscape.core.objective import make_objective
from mclandscape.core.tree import TreeMismatchError
from mclandscape.engine.checkpoint import load_model, save_checkpoint
from mclandscape.engine.data import Dataset
from mclandscape.engine.models import get_model
from mclandscape.engine.models.base import check_variables
from mclandscape.engine.step import MembersObjective
from mclandscape.engine.train import TrainConfig, train_model

X = jnp.ones((4, 5))


def _variables(width):
    return get_model("mlp", widths=[width], num_classes=3).init(jax.random.key(0), X)


def test_check_variables_names_the_leaf_of_another_width_or_swapped_data():
    model = get_model("mlp", widths=[8], num_classes=3)
    check_variables(model, _variables(8), X)
    with pytest.raises(TreeMismatchError, match=r"\['params'\]\['Dense_0'\]\['bias'\]: shape \(8,\).*\(4,\)"):
        check_variables(model, _variables(4), X)
    # (y, x) swapped: the labels [N] as inputs give a first layer of another fan-in
    with pytest.raises(TreeMismatchError, match=r"inputs of shape \(\).*Dense_0'\]\['kernel'\]"):
        check_variables(model, _variables(8), jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="'params'"):
        check_variables(model, {"w": 1}, X)


def test_train_model_and_load_model_refuse_variables_of_another_width(tmp_path):
    data = Dataset(np.ones((8, 5), np.float32), np.arange(8, dtype=np.int32) % 3, 3, "toy")
    with pytest.raises(TreeMismatchError, match="init_variables do not fit model 'mlp'.*Dense_0"):
        train_model(get_model("mlp", widths=[8], num_classes=3), data, None, TrainConfig(epochs=1, batch_size=4),
                    init_variables=_variables(4), progress=False)
    save_checkpoint(tmp_path, 1, {"variables": _variables(4)}, {"model": get_model("mlp", widths=[8], num_classes=3)
                                                                .spec, "input_shape": [5]})
    with pytest.raises(TreeMismatchError, match="the checkpoint do not fit model 'mlp'.*Dense_0"):
        load_model(tmp_path)


@pytest.mark.parametrize("bad, message", [
    (dict(widths=[-5]), r"widths\[0\] must be an integer >= 1, got -5"),
    (dict(widths=[2.5]), r"widths\[0\] must be an integer, got 2.5"),
    (dict(activation="relux"), "activation must be one of .*'relu'.*got 'relux'"),
    (dict(dropout=1.5), "dropout must be a finite number in"),
    (dict(num_classes=0), "num_classes must be an integer >= 1"),
])
def test_get_model_names_the_bad_argument_at_call_time(bad, message):
    with pytest.raises(ValueError, match=message):
        get_model("mlp", **bad)


def test_class_losses_refuse_float_labels_and_mse_refuses_class_labels():
    out = jnp.zeros((3, 4))
    fractional = jnp.array([0.7, 1.0, 2.5])
    for loss in (cross_entropy, mse_onehot, get_loss("cross_entropy", label_smoothing=0.1)):
        with pytest.raises(ValueError, match="integer class labels, got float32"):
            loss(out, fractional)
    with pytest.raises(ValueError, match="mse_onehot"):
        mse(out, jnp.array([0, 1, 3]))  # would broadcast [3, 4] against [3, 1]
    # integer regression targets of the outputs' shape are compared exactly
    assert mse(jnp.zeros((3, 1)), jnp.array([1, 2, 3])).tolist() == [1.0, 4.0, 9.0]
    model = get_model("mlp", widths=[4], num_classes=3)
    params = model.init(jax.random.key(0), X)["params"]
    with pytest.raises(ValueError, match="mse_onehot"):
        make_objective(model, "mse")(params, (X, jnp.array([0, 1, 2, 0])), None)


def test_fractional_weights_are_not_clipped_to_one_example():
    def inner(p, b, key):  # every member: half an example, a quarter of it correct
        return jnp.sum(p["w"]), {"loss": jnp.sum(p["w"]), "correct": jnp.asarray(0.25), "count": jnp.asarray(0.5)}

    obj = MembersObjective(inner=inner, keys=jax.random.split(jax.random.key(0), 2))
    _, aux = obj({"w": jnp.zeros((2, 1))}, ((jnp.zeros((1, 2)),), 0), None)
    assert float(aux["member0_acc"]) == 0.5 and float(aux["member1_acc"]) == 0.5
    x, y = X, jnp.array([0, 1, 2, 0])
    model = get_model("mlp", widths=[4], num_classes=3)
    params = model.init(jax.random.key(0), x)["params"]
    obj = make_objective(model)
    full, _ = obj(params, (x, y), None)
    scaled, aux = obj(params, (x, y, jnp.full((4,), 0.1)), None)
    assert float(aux["count"]) == pytest.approx(0.4) and float(scaled) == pytest.approx(float(full), rel=1e-6)
