"""Checkpoints: exact round trips, metadata, architecture mismatch, missing and corrupt checkpoints."""

from __future__ import annotations

import pickle
import shutil
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mclandscape.core.tree import TreeMismatchError
from mclandscape.engine.checkpoint import (
    CheckpointError,
    CheckpointStore,
    all_steps,
    latest_step,
    load_model,
    read_metadata,
    restore_checkpoint,
    save_checkpoint,
)
from mclandscape.engine.models import from_flax, get_model

# orbax leaves an asyncio callback behind when a damaged checkpoint fails to load; harmless
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def state(trained_mlp):
    """Trained MLP variables and a (non-trivial) SGD-momentum + Adam optimizer state."""
    params = trained_mlp.variables["params"]
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
    opt_state = tx.init(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)
    return {"variables": trained_mlp.variables, "opt_state": opt_state, "adam": trained_mlp.opt_state}


def test_round_trip_is_exact(tmp_path, state):
    meta = {"model": {"arch": "mlp"}, "epoch": 20, "acc": np.float32(0.97), "nan": float("nan"),
            "shape": (1, 2)}
    save_checkpoint(tmp_path, 20, state, meta)
    restored, m = restore_checkpoint(tmp_path, target=state)
    assert_trees_equal(restored, state)
    assert np.isnan(m.pop("nan"))
    assert m == {"model": {"arch": "mlp"}, "epoch": 20, "acc": pytest.approx(0.97), "shape": [1, 2]}
    raw, _ = restore_checkpoint(tmp_path)  # no target: plain dicts and lists, same values
    flat_a = jax.tree_util.tree_leaves(raw)
    flat_b = jax.tree_util.tree_leaves(state)
    assert len(flat_a) == len(flat_b)
    for x, y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert_trees_equal(raw["variables"], state["variables"])


def test_steps_latest_and_delete(tmp_path, state):
    assert all_steps(tmp_path / "nope") == [] and latest_step(tmp_path / "nope") is None
    for s in (5, 1, 3):
        save_checkpoint(tmp_path, s, state, {"epoch": s})
    assert all_steps(tmp_path) == [1, 3, 5] and latest_step(tmp_path) == 5
    assert read_metadata(tmp_path)["epoch"] == 5 and read_metadata(tmp_path, 3)["epoch"] == 3
    assert restore_checkpoint(tmp_path, 1)[1]["epoch"] == 1
    with pytest.raises(ValueError, match="already holds step 3"):
        save_checkpoint(tmp_path, 3, state, {})
    save_checkpoint(tmp_path, 3, state, {"epoch": 33}, overwrite=True)
    assert read_metadata(tmp_path, 3)["epoch"] == 33
    with CheckpointStore(tmp_path) as store:
        store.delete(5)
    assert all_steps(tmp_path) == [1, 3]
    with CheckpointStore(tmp_path) as store:
        assert store.latest_step() == 3


def test_missing_directory_and_step(tmp_path, state):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        restore_checkpoint(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")
    assert time.perf_counter() - start < 5
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        restore_checkpoint(tmp_path / "empty")
    save_checkpoint(tmp_path / "c", 2, state, {})
    with pytest.raises(FileNotFoundError, match=r"available steps: \[2\]"):
        restore_checkpoint(tmp_path / "c", step=9)


def test_restoring_into_a_different_architecture_names_the_leaf(tmp_path, trained_mlp):
    save_checkpoint(tmp_path, 1, {"variables": trained_mlp.variables}, {"model": trained_mlp.model.spec})
    other = get_model("mlp", widths=[32], num_classes=10)
    target = {"variables": jax.eval_shape(other.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))}
    with pytest.raises(TreeMismatchError, match=r"Dense_0/bias.*\(64,\).*\(32,\)") as err:
        restore_checkpoint(tmp_path, target=target)
    assert "'mlp'" in str(err.value)
    deeper = get_model("mlp", widths=[64, 64], num_classes=10)
    target = {"variables": jax.eval_shape(deeper.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))}
    with pytest.raises(TreeMismatchError, match="Dense_2"):
        restore_checkpoint(tmp_path, target=target)
    as_int = jax.tree_util.tree_map(lambda x: np.asarray(x, np.int32), {"variables": trained_mlp.variables})
    with pytest.raises(TreeMismatchError, match="dtype"):
        restore_checkpoint(tmp_path, target=as_int)
    assert isinstance(TreeMismatchError("x"), ValueError)


def _data_files(step_dir):
    return [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "metadata", "integrity", "state_dir", "tree_meta"])
def test_corrupt_checkpoints_raise_clear_errors(tmp_path, state, damage):
    save_checkpoint(tmp_path, 7, state, {"epoch": 7})
    step = tmp_path / "7"
    files = _data_files(step)
    assert files
    if damage == "flip":
        for p in files:
            b = bytearray(p.read_bytes())
            b[len(b) // 2] ^= 0x5A
            p.write_bytes(bytes(b))
    elif damage == "truncate":
        for p in files:
            p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3])
    elif damage == "metadata":
        (step / "metadata" / "metadata").write_text('{"epoch": 7, ')
    elif damage == "integrity":
        (step / "integrity" / "metadata").write_text("not json")
    elif damage == "state_dir":
        shutil.rmtree(step / "state")
    elif damage == "tree_meta":
        (step / "state" / "_METADATA").write_text("{]")
    with pytest.raises(CheckpointError, match=str(step)):
        restore_checkpoint(tmp_path, target=state)


def test_silent_bit_flip_is_caught_by_the_crc(tmp_path, monkeypatch, state):
    """Damage that the storage layer cannot see (a changed value) fails the CRC-32 check."""
    save_checkpoint(tmp_path, 1, state, {})
    import mclandscape.engine.checkpoint as ck

    real = ck._crc
    calls = {"n": 0}

    def crc_that_disagrees_once(x):
        calls["n"] += 1
        return real(x) ^ (1 if calls["n"] == 2 else 0)

    monkeypatch.setattr(ck, "_crc", crc_that_disagrees_once)
    with pytest.raises(CheckpointError, match="CRC-32"):
        restore_checkpoint(tmp_path, target=state)


def test_nothing_is_pickled(tmp_path, state, trained_mlp, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    for name in ("dump", "dumps", "load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    save_checkpoint(tmp_path, 1, state, {"model": trained_mlp.model.spec, "input_shape": [8, 8, 1]})
    restore_checkpoint(tmp_path, target=state)
    load_model(tmp_path)


def test_load_model_rebuilds_from_the_directory_alone(tmp_path, trained_mlp, digits_test):
    meta = {"model": trained_mlp.model.spec, "input_shape": [8, 8, 1]}
    save_checkpoint(tmp_path, 3, {"variables": trained_mlp.variables, "opt_state": trained_mlp.opt_state}, meta)
    model, variables, m = load_model(tmp_path)
    assert model.spec == trained_mlp.model.spec and m["input_shape"] == [8, 8, 1]
    assert_trees_equal(variables, trained_mlp.variables)
    x = jnp.asarray(digits_test.x[:50])
    np.testing.assert_array_equal(model.apply(variables, x), trained_mlp.model.apply(trained_mlp.variables, x))
    save_checkpoint(tmp_path / "nospec", 1, {"variables": trained_mlp.variables}, {"epoch": 1})
    with pytest.raises(CheckpointError, match="model spec"):
        load_model(tmp_path / "nospec")
    wrong = {"model": get_model("mlp", widths=[8], num_classes=10).spec, "input_shape": [8, 8, 1]}
    save_checkpoint(tmp_path / "wrong", 1, {"variables": trained_mlp.variables}, wrong)
    with pytest.raises(TreeMismatchError):
        load_model(tmp_path / "wrong")


@pytest.mark.parametrize("bad_state,bad_meta,match", [
    ({"k": jax.random.key(0)}, {}, "PRNG key"),
    ({"w": jnp.ones(2)}, {"f": object()}, "not JSON-serialisable"),
    ({"w": jnp.ones(2)}, {1: "x"}, "not a string"),
    ({"w": "text"}, {}, "arrays only"),
    ({}, {}, "empty"),
])
def test_invalid_inputs_are_rejected(tmp_path, bad_state, bad_meta, match):
    with pytest.raises(ValueError, match=match):
        save_checkpoint(tmp_path, 0, bad_state, bad_meta)
    with pytest.raises(ValueError, match="checkpoint step must be an integer >= 0"):
        save_checkpoint(tmp_path, -1, {"w": jnp.ones(2)})


class _UserNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(6)(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(10)(nn.relu(x))


class _OtherNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_load_model_with_a_user_model_checks_its_spec(tmp_path, digits_test):
    """A from_flax model (no zoo spec) is restored when passed as model=, and only into a matching spec."""
    user = from_flax(_UserNet(), name="MLP")  # its name alone would match the zoo's "mlp"
    x = jnp.asarray(digits_test.x[:20])
    variables = user.init(jax.random.key(0), x)
    save_checkpoint(tmp_path, 1, {"variables": variables}, {"model": user.spec, "input_shape": [8, 8, 1]})
    with pytest.raises(CheckpointError, match="user model.*model="):
        load_model(tmp_path)
    model, restored, meta = load_model(tmp_path, model=user)
    assert model is user and meta["model"] == {"arch": "MLP"}
    assert_trees_equal(restored, variables)
    np.testing.assert_array_equal(model.apply(restored, x), user.apply(variables, x))
    with pytest.raises(CheckpointError, match=r"spec \{'arch': 'MLP'\} but model= 'mlp' has spec"):
        load_model(tmp_path, model=get_model("mlp", widths=[6], num_classes=10))
    # a matching spec but another architecture still fails on the variables, naming the leaf
    other = from_flax(_OtherNet(), name="MLP")
    with pytest.raises(TreeMismatchError, match="BatchNorm_0"):
        load_model(tmp_path, model=other)


def test_load_model_checks_a_zoo_spec_against_the_model(tmp_path, trained_mlp):
    meta = {"model": trained_mlp.model.spec, "input_shape": [8, 8, 1]}
    save_checkpoint(tmp_path, 1, {"variables": trained_mlp.variables}, meta)
    model, _, _ = load_model(tmp_path, model=get_model("mlp", widths=[64], num_classes=10))
    assert model.spec == trained_mlp.model.spec
    with pytest.raises(CheckpointError, match="'tanh'"):
        load_model(tmp_path, model=get_model("mlp", widths=[64], num_classes=10, activation="tanh"))
