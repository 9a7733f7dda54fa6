"""Endpoint training: accuracy, determinism, schedules, BatchNorm, checkpoints and kill-and-resume."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mclandscape.core.losses import get_loss
from mclandscape.core.objective import function_objective
from mclandscape.core.tree import tree_stack
from mclandscape.engine.checkpoint import CheckpointError, all_steps, load_model, read_metadata
from mclandscape.engine.data import load_dataset
from mclandscape.engine.evaluate import evaluate
from mclandscape.engine.many import train_many
from mclandscape.engine.models import from_flax, get_model
from mclandscape.engine.points import stacked_points
from mclandscape.engine.step import make_step
from mclandscape.engine.train import TrainConfig, make_optimizer, make_schedule, train_model


def assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_histories_equal(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == rb[k] or (np.isnan(ra[k]) and np.isnan(rb[k])), (k, ra[k], rb[k])


# ---------------------------------------------------------------------------------------------------------
# the shared fixtures: four corners and a trajectory


def test_small_mlp_reaches_95_percent_on_digits(digits_corners, digits_config):
    for res in digits_corners:
        assert len(res.history) == digits_config.epochs
        assert set(res.history[-1]) == {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr"}
        assert res.final["test_acc"] >= 0.95, res.final
        assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]


def test_corners_are_independent_and_reproducible(digits_corners, digits_mlp, digits_train, digits_config):
    k0 = digits_corners[0].params["Dense_0"]["kernel"]
    for other in digits_corners[1:]:
        assert not np.allclose(k0, other.params["Dense_0"]["kernel"])
    again = train_model(digits_mlp, digits_train, None, digits_config, seed=0, progress=False)
    assert_trees_equal(again.variables, digits_corners[0].variables)
    assert np.isnan(again.final["test_acc"])


def test_trajectory_snapshots(digits_trajectory):
    snaps = digits_trajectory.snapshots
    assert sorted(snaps) == [14, 16, 18, 20]
    assert_trees_equal(snaps[20], digits_trajectory.variables)
    assert not np.allclose(snaps[14]["params"]["Dense_0"]["kernel"], snaps[20]["params"]["Dense_0"]["kernel"])


def test_evaluating_the_trained_model_matches_history(trained_mlp, digits_mlp, digits_test):
    v = trained_mlp.variables
    ev = evaluate(digits_mlp, stacked_points(tree_stack([v["params"]])), digits_test, variables=v, batch_size=100)
    assert ev.accuracy[0] == pytest.approx(trained_mlp.final["test_acc"])
    assert ev.loss[0] == pytest.approx(trained_mlp.final["test_loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# losses, optimizers, schedules, generic step


def test_losses():
    logits = jnp.asarray([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    labels = jnp.asarray([0, 2])
    ce = get_loss("cross_entropy")(logits, labels)
    manual = -jax.nn.log_softmax(logits)[jnp.arange(2), labels]
    np.testing.assert_allclose(ce, manual, rtol=1e-6)
    smooth = get_loss("cross_entropy", label_smoothing=0.1)(logits, labels)
    assert smooth.shape == (2,) and not np.allclose(smooth, ce)
    np.testing.assert_allclose(get_loss("mse")(jnp.ones((3, 1)), jnp.zeros(3)), 1.0)
    with pytest.raises(ValueError):
        get_loss("hinge")


def test_schedules():
    step = TrainConfig(epochs=10, lr=0.1, schedule="step", milestones=(3, 6), gamma=0.1)
    s = make_schedule(step, steps_per_epoch=5)
    assert float(s(0)) == pytest.approx(0.1) and float(s(14)) == pytest.approx(0.1)
    assert float(s(15)) == pytest.approx(0.01) and float(s(30)) == pytest.approx(0.001)
    cos = make_schedule(TrainConfig(epochs=4, lr=0.2, schedule="cosine", final_lr_fraction=0.05), 10)
    assert float(cos(0)) == pytest.approx(0.2) and float(cos(20)) == pytest.approx(0.2 * (0.05 + 0.95 * 0.5))
    assert float(cos(40)) == pytest.approx(0.01)
    warm = make_schedule(TrainConfig(epochs=4, lr=0.2, warmup_epochs=1), 10)
    assert float(warm(0)) == 0.0 and float(warm(5)) == pytest.approx(0.1) and float(warm(30)) == pytest.approx(0.2)


def test_optimizers_match_their_definitions():
    params = {"w": jnp.asarray([1.0, -2.0])}
    grads = {"w": jnp.asarray([0.5, 0.5])}
    # SGD + momentum + L2 weight decay (PyTorch semantics): v = g + wd*w; w -= lr*v
    tx = make_optimizer(TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.01), 1)
    upd, st = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(upd["w"], -0.1 * (grads["w"] + 0.01 * params["w"]), rtol=1e-6)
    upd2, _ = tx.update(grads, st, params)
    np.testing.assert_allclose(upd2["w"], -0.1 * 1.9 * (grads["w"] + 0.01 * params["w"]), rtol=1e-6)
    nest = make_optimizer(TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True), 1)
    upd, _ = nest.update(grads, nest.init(params), params)
    np.testing.assert_allclose(upd["w"], -0.1 * 1.9 * grads["w"], rtol=1e-6)
    adam = make_optimizer(TrainConfig(optimizer="adam", lr=1e-3), 1)
    upd, _ = adam.update(grads, adam.init(params), params)
    np.testing.assert_allclose(upd["w"], -1e-3 * np.ones(2), rtol=1e-4)
    adamw = make_optimizer(TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.1, grad_clip=1.0), 1)
    assert adamw.update(grads, adamw.init(params), params)[0]["w"].shape == (2,)
    with pytest.raises(ValueError):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ValueError):
        TrainConfig(schedule="linear")


def test_config_round_trips_through_dict():
    cfg = TrainConfig(epochs=3, milestones=[1, 2], schedule="step")
    assert cfg.milestones == (1, 2)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(TypeError, match="epochz"):
        TrainConfig.from_dict({"epochz": 3})


def test_make_step_on_any_pytree():
    target = {"a": jnp.asarray([1.0, 2.0]), "b": jnp.asarray(3.0)}

    def loss_fn(p, batch):
        diff = jax.tree_util.tree_map(lambda x, t: jnp.sum((x - t) ** 2), p, batch)
        return sum(jax.tree_util.tree_leaves(diff))

    step = make_step(function_objective(loss_fn), optax.sgd(0.25))
    state = step.init(jax.tree_util.tree_map(jnp.zeros_like, target))
    for _ in range(30):
        state, metrics = step(state, target, jax.random.key(0))
    np.testing.assert_allclose(state.params["a"], target["a"], atol=1e-5)
    assert float(metrics["loss"]) < 1e-8 and int(state.step) == 30


# ---------------------------------------------------------------------------------------------------------
# checkpoints, resume, kill-and-resume


@pytest.fixture(scope="module")
def small_setup():
    train = load_dataset("digits", "train").take(400)
    test = load_dataset("digits", "test").take(100)
    model = get_model("mlp", widths=[16], num_classes=10)
    cfg = TrainConfig(epochs=6, batch_size=64, optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True,
                      weight_decay=1e-4, schedule="step", milestones=(4,), gamma=0.5)
    return model, train, test, cfg


@pytest.fixture(scope="module")
def uninterrupted(small_setup):
    model, train, test, cfg = small_setup
    return train_model(model, train, test, cfg, seed=5, progress=False)


class Killed(Exception):
    pass


def test_kill_and_resume_equals_uninterrupted(small_setup, uninterrupted, tmp_path):
    model, train, test, cfg = small_setup

    def kill_at_3(epoch, result):
        if epoch == 3:
            raise Killed

    with pytest.raises(Killed):
        train_model(model, train, test, cfg, seed=5, checkpoint_dir=tmp_path, callback=kill_at_3, progress=False)
    assert all_steps(tmp_path) == [3]
    resumed = train_model(model, train, test, cfg, seed=5, checkpoint_dir=tmp_path, progress=False)
    assert resumed.resumed_from == 3
    assert_trees_equal(resumed.variables, uninterrupted.variables)
    assert_trees_equal(resumed.opt_state, uninterrupted.opt_state)
    assert_histories_equal(resumed.history, uninterrupted.history)
    assert all_steps(tmp_path) == [6]
    # a finished run resumes to itself without training
    done = train_model(model, train, test, cfg, seed=5, checkpoint_dir=tmp_path, progress=False)
    assert done.resumed_from == 6
    assert_trees_equal(done.variables, uninterrupted.variables)


def test_extending_a_run_equals_a_longer_run(small_setup, uninterrupted, tmp_path):
    model, train, test, cfg = small_setup
    first = train_model(model, train, test, cfg.replace(epochs=2), seed=5, checkpoint_dir=tmp_path,
                        progress=False)
    assert first.epoch == 2 and all_steps(tmp_path) == [2]
    longer = train_model(model, train, test, cfg, seed=5, checkpoint_dir=tmp_path, progress=False)
    assert longer.resumed_from == 2
    assert_trees_equal(longer.variables, uninterrupted.variables)


def test_save_epochs_keep_trajectory_checkpoints(small_setup, uninterrupted, tmp_path):
    model, train, test, cfg = small_setup
    res = train_model(model, train, test, cfg, seed=5, checkpoint_dir=tmp_path, save_epochs=(0, 2, 4),
                      checkpoint_every=1, progress=False)
    assert all_steps(tmp_path) == [0, 2, 4, 6]
    assert sorted(res.snapshots) == [0, 2, 4]
    meta = read_metadata(tmp_path, 4)
    assert meta["epoch"] == 4 and meta["seed"] == 5 and meta["model"] == model.spec
    assert meta["dataset"]["name"] == "digits" and meta["config"]["epochs"] == 6
    assert meta["metrics"] == res.history[3] and len(meta["history"]) == 4
    rebuilt, variables, meta6 = load_model(tmp_path)
    assert rebuilt.spec == model.spec and meta6["epoch"] == 6
    assert_trees_equal(variables, uninterrupted.variables)
    _, v4, _ = load_model(tmp_path, step=4)
    assert_trees_equal(v4, res.snapshots[4])
    ev = evaluate(rebuilt, stacked_points(tree_stack([variables["params"]])), test, variables=variables)
    assert ev.accuracy[0] == pytest.approx(uninterrupted.final["test_acc"])


def test_resuming_a_different_run_is_refused(small_setup, tmp_path):
    model, train, test, cfg = small_setup
    train_model(model, train, test, cfg.replace(epochs=1), seed=5, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="seed"):
        train_model(model, train, test, cfg.replace(epochs=2), seed=6, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="config.lr"):
        train_model(model, train, test, cfg.replace(epochs=2, lr=0.1), seed=5, checkpoint_dir=tmp_path,
                    progress=False)
    other = get_model("mlp", widths=[8], num_classes=10)
    with pytest.raises(ValueError, match="model"):
        train_model(other, train, test, cfg.replace(epochs=2), seed=5, checkpoint_dir=tmp_path, progress=False)
    fresh = train_model(model, train, test, cfg.replace(epochs=1, lr=0.1), seed=5, checkpoint_dir=tmp_path,
                        overwrite=True, progress=False)
    assert fresh.resumed_from is None


def test_train_many_checkpoints_each_seed(small_setup, tmp_path):
    model, train, test, cfg = small_setup
    res = train_many(model, train, test, cfg.replace(epochs=1), seeds=(1, 2), checkpoint_dir=tmp_path,
                     progress=False)
    assert [r.seed for r in res] == [1, 2]
    assert all_steps(tmp_path / "seed_1") == [1] and all_steps(tmp_path / "seed_2") == [1]
    with pytest.raises(ValueError):
        train_many(model, train, test, cfg, seeds=(1, 1))


# ---------------------------------------------------------------------------------------------------------
# BatchNorm, dropout, regression, progress bar


class TinyBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), name="stem")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x).mean(axis=(1, 2))
        x = nn.Dropout(0.2, deterministic=not train)(x)
        return nn.Dense(10)(x)


def test_batchnorm_and_dropout_model_trains_and_resumes(tmp_path):
    train = load_dataset("digits", "train").take(256)
    test = None  # the evaluation of a BatchNorm model's variables is train_many's test below
    model = from_flax(TinyBN(), "tiny_bn", has_batch_stats=True)
    cfg = TrainConfig(epochs=3, batch_size=64, optimizer="adam", lr=1e-2, augment=True)
    full = train_model(model, train, test, cfg, seed=0, progress=False)
    init = model.init(jax.random.key(0), jnp.asarray(train.x[:1]))
    assert not np.allclose(full.variables["batch_stats"]["BatchNorm_0"]["mean"],
                           init["batch_stats"]["BatchNorm_0"]["mean"])
    assert full.history[-1]["train_loss"] < full.history[0]["train_loss"]

    def kill(epoch, result):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        train_model(model, train, test, cfg, seed=0, checkpoint_dir=tmp_path, callback=kill, progress=False)
    resumed = train_model(model, train, test, cfg, seed=0, checkpoint_dir=tmp_path, progress=False)
    assert_trees_equal(resumed.variables, full.variables)


def test_regression_with_mse():
    data = load_dataset("synthetic", "train", task="regression", dim=2, n_train=128, n_test=0, noise=0.0)
    model = get_model("mlp", widths=[16], num_classes=1, activation="tanh")
    cfg = TrainConfig(epochs=30, batch_size=32, optimizer="adam", lr=1e-2, loss="mse")
    res = train_model(model, data, None, cfg, seed=0, progress=False)
    assert res.final["train_loss"] < 0.25 * res.history[0]["train_loss"]
    assert np.isnan(res.final["train_acc"])


def test_progress_bar_runs(small_setup, capsys):
    model, train, test, cfg = small_setup
    res = train_model(model, train, test, cfg.replace(epochs=1), seed=1, progress=True)
    assert res.epoch == 1


def test_explicit_key_and_init_variables(small_setup):
    model, train, test, cfg = small_setup
    a = train_model(model, train, None, cfg.replace(epochs=1), key=jax.random.key(42), progress=False)
    b = train_model(model, train, None, cfg.replace(epochs=1), key=jax.random.key(42), progress=False)
    assert_trees_equal(a.variables, b.variables)
    c = train_model(model, train, None, cfg.replace(epochs=1), init_variables=a.variables, progress=False)
    assert not np.allclose(c.params["Dense_0"]["kernel"], a.params["Dense_0"]["kernel"])


# ---------------------------------------------------------------------------------------------------------
# train_many: every seed in one compiled step ("vmap", "unroll") against one run per seed ("sequential")


class DenseBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(16, use_bias=False)(x.reshape((x.shape[0], -1)))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dropout(0.2, deterministic=not train)(nn.relu(x))
        return nn.Dense(10)(x)


def _assert_runs_close(stacked, sequential, rtol=1e-5):
    assert [r.seed for r in stacked] == [r.seed for r in sequential]
    for a, b in zip(stacked, sequential, strict=True):
        assert a.epoch == b.epoch and sorted(a.snapshots) == sorted(b.snapshots)
        for x, y in zip(jax.tree_util.tree_leaves((a.variables, a.opt_state, a.snapshots)),
                        jax.tree_util.tree_leaves((b.variables, b.opt_state, b.snapshots)), strict=True):
            assert np.shape(x) == np.shape(y)
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                                       atol=rtol * max(float(np.abs(np.asarray(y)).max()), 1e-6))
        assert [list(h) for h in a.history] == [list(h) for h in b.history]
        for ha, hb in zip(a.history, b.history, strict=True):
            for k in ha:
                np.testing.assert_allclose(ha[k], hb[k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.fixture(scope="module")
def many_setup():
    train = load_dataset("digits", "train").take(384)  # 6 batches of 64
    test = load_dataset("digits", "test").take(100)
    bn = from_flax(DenseBN(), name="dense_bn")  # BatchNorm statistics per seed, dropout keys per seed
    # the step schedule halves the lr after epoch 1; clipping by the global norm is active (per seed)
    cfg = TrainConfig(epochs=2, batch_size=64, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True,
                      weight_decay=1e-4, schedule="step", milestones=(1,), gamma=0.5, grad_clip=0.2)
    seeds = (3, 1)
    vm = train_many(bn, train, test, cfg, seeds=seeds, strategy="vmap", progress=False, save_epochs=(0, 1))
    return bn, train, test, cfg, seeds, vm


def test_train_many_stacked_equals_one_run_per_seed(many_setup):
    bn, train, test, cfg, seeds, vm = many_setup
    seq = train_many(bn, train, test, cfg, seeds=seeds, strategy="sequential", progress=False, save_epochs=(0, 1))
    _assert_runs_close(vm, seq)
    assert "batch_stats" in vm[0].variables
    assert [h["lr"] for h in vm[0].history] == pytest.approx([0.1, 0.05])
    assert vm[0].checkpoint_dir is None and vm[0].resumed_from is None
    assert not np.allclose(vm[0].params["Dense_0"]["kernel"], vm[1].params["Dense_0"]["kernel"])
    unrolled = train_many(bn, train, test, cfg, seeds=seeds, strategy="unroll", progress=False, save_epochs=(0, 1))
    _assert_runs_close(unrolled, seq)


def test_train_many_stacked_checkpoint_resumes_bit_identical(many_setup, tmp_path):
    from mclandscape.engine.checkpoint import CheckpointStore
    from mclandscape.engine.resume import ResumeMismatchError

    net, train, test, cfg, seeds, vm = many_setup
    go = lambda **kw: train_many(net, train, test, cfg, seeds=seeds, strategy="vmap", progress=False,  # noqa: E731
                                 checkpoint_dir=tmp_path, save_epochs=(0, 1), **kw)
    first = go(keep=3)
    cdir = tmp_path / "vmap_seeds_3_1"
    assert all_steps(cdir) == [0, 1, 2] and first[0].checkpoint_dir == str(cdir)
    meta = read_metadata(cdir)
    assert meta["seeds"] == [3, 1] and meta["stacked"]["strategy"] == "vmap"
    with pytest.raises(CheckpointError, match="restore_checkpoint"):
        load_model(cdir)
    for a, b in zip(first, vm, strict=True):  # checkpointing changes nothing
        assert_trees_equal(a.variables, b.variables)
        assert_histories_equal(a.history, b.history)
    with CheckpointStore(cdir) as store:  # as if killed during epoch 2
        store.delete(2)
    again = go()
    assert again[0].resumed_from == 1
    for a, b in zip(again, vm, strict=True):
        assert_trees_equal((a.variables, a.opt_state), (b.variables, b.opt_state))
        assert_histories_equal(a.history, b.history)
        assert sorted(a.snapshots) == [0, 1]
        assert_trees_equal(a.snapshots, b.snapshots)
    with pytest.raises(ResumeMismatchError, match="different run"):
        train_many(net, train, test, cfg.replace(lr=0.5), seeds=seeds, strategy="vmap", progress=False,
                   checkpoint_dir=tmp_path)


def test_train_many_strategy_choice_and_errors(many_setup):
    from mclandscape.engine.many import _many_strategy

    net, train, test, cfg, _, _ = many_setup
    with pytest.raises(ValueError, match=r"strategy must be one of .*got 'pmap'"):
        train_many(net, train, test, cfg, seeds=(0, 1), strategy="pmap")
    with pytest.raises(ValueError, match="distinct"):
        train_many(net, train, test, cfg, seeds=(0, 0), strategy="vmap")
    with pytest.raises(ValueError, match="at least one seed"):
        train_many(net, train, test, cfg, seeds=(), strategy="vmap")
    cnn = get_model("simple_cnn", num_classes=10)
    long = cfg.replace(epochs=1000)  # 6 steps per epoch: 6000 dispatches saved for two seeds
    assert _many_strategy("auto", net, train, long, [0, 1], None) == "vmap"
    assert _many_strategy("auto", net, train, cfg, [0, 1], None) == "sequential"  # too short to pay its compile
    assert _many_strategy("auto", cnn, train, long, [0, 1], None) == ("sequential" if jax.default_backend() == "cpu"
                                                                      else "vmap")
    assert _many_strategy("auto", net, train, long, [0, 1], "ckpt") == "sequential"  # one directory per seed
    assert _many_strategy("auto", net, train, long, [0], None) == "sequential"
    assert _many_strategy("unroll", cnn, train, cfg, [0, 1], "ckpt") == "unroll"
