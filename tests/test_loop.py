"""The one step and loop (mclandscape.engine.loop): masks, the non-finite guard, the resume contract
(fingerprints, corrupt steps, rotation, overwrite), bad input, and compiling once."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mclandscape.core import connectors as C
from mclandscape.core.objective import function_objective
from mclandscape.engine.checkpoint import all_steps
from mclandscape.engine.data import Dataset, load_dataset
from mclandscape.engine.loop import LoopConfig, NonFiniteError, run
from mclandscape.engine.models import get_model
from mclandscape.engine.resume import ResumeMismatchError, fingerprint_diff
from mclandscape.engine.step import make_step
from mclandscape.engine.train import TrainConfig, train_model
from mclandscape.methods.curves import CurveConfig, train_curve
from mclandscape.methods.surface_train import SurfaceConfig, train_surface


def quad(p, b):
    return jnp.sum((p["w"] - b) ** 2)


QUAD = function_objective(quad)


def _run(tmp_path, epochs=4, **cfg):
    step = make_step(QUAD, optax.sgd(0.1))
    return run(step, step.init({"w": jnp.zeros(3)}), lambda t: jnp.full(3, 1.0 + t % 2), epochs=epochs,
               steps_per_epoch=2, key=jax.random.key(0), fingerprint={"lr": 0.1},
               config=LoopConfig(checkpoint_dir=tmp_path, **cfg))


def test_trainable_mask_restores_frozen_entries_bit_for_bit():
    step = make_step(QUAD, optax.chain(optax.add_decayed_weights(0.5), optax.sgd(0.1, momentum=0.9)),
                     trainable={"w": jnp.asarray([True, False, True])})
    state = step.init({"w": jnp.asarray([0.3, 0.7, -0.2])})
    for t in range(5):
        state, _ = step(state, jnp.ones(3), jax.random.key(t))
    w = np.asarray(state.params["w"])
    assert w[1] == np.float32(0.7) and w[0] != np.float32(0.3) and w[2] != np.float32(-0.2)


def test_extra_args_transform_receives_the_loss():
    seen = []

    def update(updates, state, params=None, *, loss=None, **extra):
        jax.debug.callback(lambda v: seen.append(float(v)), loss)
        return updates, state

    tx = optax.chain(optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update), optax.sgd(0.1))
    step = make_step(QUAD, tx)
    state, metrics = step(step.init({"w": jnp.zeros(2)}), jnp.ones(2), jax.random.key(0))
    jax.effects_barrier()
    assert seen == [pytest.approx(2.0)] and float(metrics["loss"]) == pytest.approx(2.0)


def _weighted(params, batch, key):
    """A loss with fractional example weights: ``correct`` and ``count`` are weight sums below 1."""
    w = jnp.asarray([0.25, 0.25])
    return jnp.sum(params["w"] ** 2), {"correct": jnp.sum(w * jnp.asarray([1.0, 0.0])), "count": jnp.sum(w)}


def test_fractional_example_weights_do_not_clip_the_count():
    step = make_step(_weighted, optax.sgd(0.1))
    _, metrics = step(step.init({"w": jnp.ones(2)}), None, jax.random.key(0))
    assert float(metrics["acc"]) == 0.5  # 0.25 / 0.5, not 0.25 / max(0.5, 1)
    res = run(step, step.init({"w": jnp.ones(2)}), lambda t: None, epochs=1, steps_per_epoch=3,
              key=jax.random.key(0), config=LoopConfig(progress=False))
    assert res.history[0]["acc"] == 0.5


def test_non_finite_loss_stops_with_the_step_and_leaf_and_is_never_saved(tmp_path):
    def bad(p, b):
        return jnp.sum(p["a"] ** 2) + jnp.sum(jnp.sqrt(p["b"] - b))  # at b = p["b"] the gradient is infinite

    step = make_step(function_objective(bad), optax.sgd(0.0))  # the parameters stay put: b = 5 throughout
    state = step.init({"a": jnp.ones(2), "b": jnp.ones(2) * 5})
    batches = lambda t: jnp.asarray(0.0 if t < 5 else 5.0)  # step 5 (epoch 3, batch 1) goes bad
    with pytest.raises(NonFiniteError, match=r"gradient is not finite at step 5 \(epoch 3, batch 1\).*\['b'\]"):
        run(step, state, batches, epochs=4, steps_per_epoch=2, key=jax.random.key(0),
            config=LoopConfig(checkpoint_dir=tmp_path))
    assert all_steps(tmp_path) == [2]  # epochs 1 and 2 were finite and saved; epoch 3 was not
    # the loss itself: log of a negative number
    step = make_step(function_objective(lambda p, b: jnp.sum(jnp.log(p["b"] - b))), optax.sgd(0.01))
    with pytest.raises(NonFiniteError, match=r"loss is not finite at step 0 \(epoch 1, batch 0\)"):
        run(step, step.init({"b": jnp.ones(2)}), lambda t: jnp.asarray(2.0), epochs=1, steps_per_epoch=3,
            key=jax.random.key(0))


def test_train_model_refuses_nan_parameters_and_bad_labels(digits_mlp, digits_train):
    cfg = TrainConfig(epochs=1, batch_size=64)
    v = digits_mlp.init(jax.random.key(0), jnp.asarray(digits_train.x[:1]))
    bad = jax.tree_util.tree_map(lambda a: a, v)
    bad["params"]["Dense_0"]["kernel"] = bad["params"]["Dense_0"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"Dense_0.*kernel.*non-finite"):
        train_model(digits_mlp, digits_train, None, cfg, init_variables=bad, progress=False)
    labels = Dataset(digits_train.x[:100], np.full(100, 12, np.int32), 13, "digits13")
    with pytest.raises(ValueError, match=r"labels in \[12, 12\].*10 outputs"):
        train_model(digits_mlp, labels, None, cfg, progress=False)


def test_fingerprint_diff_names_every_difference():
    d = fingerprint_diff({"a": 1, "b": {"c": [1, 2]}, "e": 0.5}, {"a": 1, "b": {"c": [1, 3]}, "f": 0.5})
    assert d == ["b.c[1]: checkpoint 2 vs now 3", "e: checkpoint 0.5 vs now '<absent>'",
                 "f: checkpoint '<absent>' vs now 0.5"]


def test_rotation_keeps_the_last_n_and_the_milestones(tmp_path):
    res = _run(tmp_path, epochs=6, keep=2, milestones=(1, 3))
    assert all_steps(tmp_path) == [1, 3, 5, 6] and len(res.history) == 6
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4, 5, 6]


def test_corrupt_latest_step_falls_back_to_the_newest_readable_one(tmp_path):
    full = _run(tmp_path / "full", epochs=4)
    _run(tmp_path / "a", epochs=3, keep=2)
    for root, _, files in os.walk(tmp_path / "a" / "3"):
        for f in files:
            if "state" in root and not f.endswith(".json"):
                with open(os.path.join(root, f), "r+b") as fh:  # garble the arrays of the latest step
                    data = fh.read()
                    fh.seek(0)
                    fh.write(bytes(b ^ 0xFF for b in data))
    with pytest.warns(UserWarning, match=r"step 3 .* unreadable.*resuming from step 2"):
        res = _run(tmp_path / "a", epochs=4, keep=2)
    assert res.resumed_from == 2
    np.testing.assert_array_equal(np.asarray(res.state.params["w"]), np.asarray(full.state.params["w"]))


def test_resume_refuses_another_run_and_overwrite_starts_afresh(tmp_path):
    _run(tmp_path, epochs=2)
    step = make_step(QUAD, optax.sgd(0.1))
    with pytest.raises(ResumeMismatchError, match=rf"{tmp_path}.*lr: checkpoint 0.1 vs now 0.2"):
        run(step, step.init({"w": jnp.zeros(3)}), lambda t: jnp.ones(3), epochs=3, steps_per_epoch=2,
            key=jax.random.key(0), fingerprint={"lr": 0.2}, config=LoopConfig(checkpoint_dir=tmp_path))
    fresh = run(step, step.init({"w": jnp.zeros(3)}), lambda t: jnp.ones(3), epochs=1, steps_per_epoch=2,
                key=jax.random.key(0), fingerprint={"lr": 0.2},
                config=LoopConfig(checkpoint_dir=tmp_path, overwrite=True))
    assert fresh.resumed_from is None and all_steps(tmp_path) == [1]
    with pytest.raises(ResumeMismatchError, match="holds epochs"):
        run(step, step.init({"w": jnp.zeros(3)}), lambda t: jnp.ones(3), epochs=0, steps_per_epoch=2,
            key=jax.random.key(0), fingerprint={"lr": 0.2}, config=LoopConfig(checkpoint_dir=tmp_path))


def test_train_model_refuses_other_data(tmp_path):
    train = load_dataset("digits", "train").take(200)
    model = get_model("mlp", widths=[8], num_classes=10)
    cfg = TrainConfig(epochs=1, batch_size=50)
    train_model(model, train, None, cfg, checkpoint_dir=tmp_path, progress=False)
    other = Dataset(train.x[::-1].copy(), train.y[::-1].copy(), 10, "digits")
    with pytest.raises(ResumeMismatchError, match="inputs.data"):
        train_model(model, other, None, cfg.replace(epochs=2), checkpoint_dir=tmp_path, progress=False)


def test_connector_resume_refuses_other_ends_settings_and_epochs(digits_mlp, digits_corners, digits_train, tmp_path):
    """The stale-resume bug: a curve or surface checkpoint of another run used to come back silently."""
    small = digits_train.take(128)  # 2 batches per epoch
    pa, pb, pc = (r.params for r in digits_corners[:3])
    kw = dict(progress=False)
    cc = CurveConfig(epochs=1, batch_size=64)
    first = train_curve(digits_mlp, C.bezier_curve(pa, pb), small, cc, checkpoint_dir=tmp_path / "c", **kw)
    with pytest.raises(ResumeMismatchError, match="inputs.control"):
        train_curve(digits_mlp, C.bezier_curve(pa, pc), small, cc, checkpoint_dir=tmp_path / "c", **kw)
    with pytest.raises(ResumeMismatchError, match="hyper.lr"):
        train_curve(digits_mlp, C.bezier_curve(pa, pb), small, CurveConfig(epochs=1, batch_size=64, lr=0.5),
                    checkpoint_dir=tmp_path / "c", **kw)
    again = train_curve(digits_mlp, C.bezier_curve(pa, pb), small, cc, checkpoint_dir=tmp_path / "c", **kw)
    assert again.resumed_from == 1
    for a, b in zip(jax.tree_util.tree_leaves(again.connector.control),
                    jax.tree_util.tree_leaves(first.connector.control), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    surf = C.bezier_surface(*(r.params for r in digits_corners), n=2, m=2)
    other = C.bezier_surface(pb, pa, *(r.params for r in digits_corners[2:]), n=2, m=2)
    skw = SurfaceConfig(epochs=(1, 0, 0), num_samples=2, batch_size=64)  # one phase: the contract is per run
    train_surface(digits_mlp, surf, small, skw, checkpoint_dir=tmp_path / "s")
    with pytest.raises(ResumeMismatchError, match="inputs.control"):
        train_surface(digits_mlp, other, small, skw, checkpoint_dir=tmp_path / "s")
    with pytest.raises(ResumeMismatchError, match="num_samples"):
        train_surface(digits_mlp, surf, small, dataclasses.replace(skw, num_samples=3), checkpoint_dir=tmp_path / "s")
    with pytest.raises(ResumeMismatchError):
        train_surface(digits_mlp, surf, small, dataclasses.replace(skw, epochs=(2, 0, 0)), checkpoint_dir=tmp_path / "s")


def test_stop_run_ends_early_and_max_metrics_take_the_maximum():
    def obj(p, b, key):
        return jnp.sum((p["w"] - b) ** 2), {"max_gap": jnp.max(jnp.abs(p["w"] - b))}

    from mclandscape.engine.loop import StopRun

    step = make_step(obj, optax.sgd(0.1))
    seen = []

    def stop_at_3(epoch, state, history):
        seen.append(history[-1]["max_gap"])
        if epoch == 3:
            raise StopRun

    res = run(step, step.init({"w": jnp.zeros(2)}), lambda t: jnp.ones(2) * (1 + t % 2), epochs=10, steps_per_epoch=2,
              key=jax.random.key(0), callbacks=[stop_at_3])
    assert res.stopped == 3 and len(res.history) == 3 and int(res.state.step) == 6
    assert seen[0] == pytest.approx(2.0 - 0.2 * 1.0)  # max over the epoch's two steps, not their mean


def test_max_steps_ends_inside_the_last_epoch_and_resumes_bit_identical(tmp_path):
    step = make_step(QUAD, optax.sgd(0.1, momentum=0.9))
    batches = lambda t: jnp.full(3, 1.0 + t % 3)  # noqa: E731
    seen = []

    def go(epochs, d=None, **kw):
        return run(step, step.init({"w": jnp.zeros(3)}), batches, epochs=epochs, steps_per_epoch=3,
                   key=jax.random.key(0), max_steps=8, config=LoopConfig(checkpoint_dir=d), **kw)

    res = go(3, step_callbacks=[lambda t, st: seen.append((t, int(st.step)))])
    assert int(res.state.step) == 8 and seen == [(t, t) for t in range(1, 9)]
    assert [h["epoch"] for h in res.history] == [1, 2, 3]
    # the last record averages its two steps (batches 6 and 7: targets 1 and 2)
    by_hand = make_step(QUAD, optax.sgd(0.1, momentum=0.9))
    state, losses = by_hand.init({"w": jnp.zeros(3)}), []
    for t in range(8):
        state, m = by_hand(state, batches(t), jax.random.fold_in(jax.random.key(0), t))
        losses.append(float(m["loss"]))
    np.testing.assert_array_equal(np.asarray(res.params["w"]), np.asarray(state.params["w"]))
    assert res.history[-1]["loss"] == pytest.approx(np.mean(losses[6:]), rel=1e-6)
    # killed after epoch 2 (a shorter run of the same fingerprint-free loop), then resumed
    d = tmp_path / "ck"
    run(step, step.init({"w": jnp.zeros(3)}), batches, epochs=2, steps_per_epoch=3, key=jax.random.key(0),
        config=LoopConfig(checkpoint_dir=d))
    again = go(3, d)
    assert again.resumed_from == 2
    np.testing.assert_array_equal(np.asarray(again.params["w"]), np.asarray(res.params["w"]))
    for bad in (6, 10, 2.5, True):
        with pytest.raises(ValueError, match="max_steps"):
            run(step, step.init({"w": jnp.zeros(3)}), batches, epochs=3, steps_per_epoch=3,
                key=jax.random.key(0), max_steps=bad)


def test_max_steps_checkpoints_resume_only_with_the_step_counts_that_wrote_them(tmp_path):
    from mclandscape.engine.loop import StopRun

    step = make_step(QUAD, optax.sgd(0.1, momentum=0.9))
    batches = lambda t: jnp.full(3, 1.0 + t % 3)  # noqa: E731

    def go(d, epochs=3, max_steps=8, **kw):
        return run(step, step.init({"w": jnp.zeros(3)}), batches, epochs=epochs, steps_per_epoch=3,
                   key=jax.random.key(0), max_steps=max_steps, config=LoopConfig(checkpoint_dir=d), **kw)

    whole = go(tmp_path / "whole")

    def killed(epoch, state, history):  # the same run, stopped after epoch 2 as a killed process would be
        if epoch == 2:
            raise StopRun

    d = tmp_path / "ck"
    assert go(d, callbacks=[killed]).stopped == 2
    steps = []
    again = go(d, step_callbacks=[lambda n, st: steps.append(n)])
    assert again.resumed_from == 2 and steps == [7, 8]  # the step count is global across the resume
    np.testing.assert_array_equal(np.asarray(again.params["w"]), np.asarray(whole.params["w"]))
    assert [h["epoch"] for h in again.history] == [1, 2, 3]
    assert again.history[-1]["loss"] == whole.history[-1]["loss"]
    assert go(d).resumed_from == 3 and all_steps(d) == [3]  # the short last epoch is a checkpoint like any other
    # epoch 3 of that directory ended after 8 steps: another max_steps (or epoch length) would continue wrongly
    with pytest.raises(ResumeMismatchError, match=r"epoch 3 ended after 8 steps.*after 9"):
        go(d, max_steps=None)
    with pytest.raises(ResumeMismatchError, match=r"epoch 3 ended after 8 steps.*after 9"):
        go(d, epochs=4, max_steps=None)
    with pytest.raises(ValueError, match=r"max_steps must be an integer in \(6, 9\]"):
        go(d, max_steps=0)


def test_max_steps_and_step_callbacks_with_a_plain_step_callable():
    inner = make_step(QUAD, optax.sgd(0.1))
    plain = lambda state, batch, key: inner(state, batch, key)  # noqa: E731 - no step_and_sum: the other path
    seen = []
    res = run(plain, inner.init({"w": jnp.zeros(3)}), lambda t: jnp.full(3, float(t)), epochs=2, steps_per_epoch=4,
              max_steps=5, key=jax.random.key(0), step_callbacks=[lambda n, st: seen.append(n)])
    fast = run(inner, inner.init({"w": jnp.zeros(3)}), lambda t: jnp.full(3, float(t)), epochs=2,
               steps_per_epoch=4, max_steps=5, key=jax.random.key(0))
    assert seen == [1, 2, 3, 4, 5] and int(res.state.step) == 5 and len(res.history) == 2
    np.testing.assert_allclose(np.asarray(res.params["w"]), np.asarray(fast.params["w"]), rtol=1e-6)
    assert res.history[-1]["loss"] == pytest.approx(fast.history[-1]["loss"], rel=1e-6)


def _square(p, b):
    return jnp.sum(p["w"] ** 2)


def test_equal_transforms_share_the_compiled_step(count_compiles):
    from mclandscape.engine.optim import transform

    def build():
        return make_step(function_objective(_square), transform(optax.sgd, 0.25))

    step = build()
    step(step.init({"w": jnp.ones(2)}), None, jax.random.key(0))
    with count_compiles() as seen:
        step = build()
        state, _ = step(step.init({"w": jnp.ones(2)}), None, jax.random.key(0))
    assert seen == [] and state.params["w"].tolist() == [0.5, 0.5]
    with count_compiles() as seen:  # another learning rate is another program
        step = make_step(function_objective(_square), transform(optax.sgd, 0.5))
        step(step.init({"w": jnp.ones(2)}), None, jax.random.key(0))
    assert any("_step_impl" in s for s in seen)
