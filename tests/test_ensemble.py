"""Ensembles and their metrics (DSP-TT paper, Tables 1-3), checked against NumPy references."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mclandscape.core.objective import function_objective
from mclandscape.engine.loop import NonFiniteError
from mclandscape.engine.models import get_model
from mclandscape.engine.optim import transform
from mclandscape.methods import ensemble as ens
from mclandscape.methods import snapshots as snap


def _probs(rng, m, n, c):
    logits = rng.normal(size=(m, n, c))
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    p = _probs(rng, 4, 50, 3)
    y = rng.integers(0, 3, size=50)
    return p, y


def test_average_and_weighted_average_match_numpy(data):
    p, _ = data
    np.testing.assert_allclose(ens.average_probs(p), p.mean(0), rtol=1e-12)
    w = np.array([1.0, 2.0, 0.0, 1.0])
    np.testing.assert_allclose(ens.average_probs(p, w), np.einsum("m,mnc->nc", w / w.sum(), p), rtol=1e-12)


def test_vote_majority_and_tie_break():
    # 3 members, 2 examples, 3 classes
    p = np.array([
        [[0.6, 0.3, 0.1], [0.5, 0.4, 0.1]],
        [[0.7, 0.2, 0.1], [0.1, 0.5, 0.4]],
        [[0.1, 0.1, 0.8], [0.2, 0.1, 0.7]],
    ])
    pred, frac = ens.vote(p)
    assert pred[0] == 0  # two votes for class 0
    # example 1: one vote each; mean probabilities (0.267, 0.333, 0.4) -> class 2
    assert pred[1] == 2
    np.testing.assert_allclose(frac[0], [2 / 3, 0, 1 / 3])
    # the vote differs from averaging when a confident minority dominates the mean
    q = np.array([[[0.51, 0.49]], [[0.51, 0.49]], [[0.0, 1.0]]])
    assert ens.vote(q)[0][0] == 0
    assert ens.average_probs(q).argmax(-1)[0] == 1


def test_error_and_nll_match_numpy(data):
    p, y = data
    q = p.mean(0)
    assert ens.test_error(q, y) == pytest.approx(np.mean(q.argmax(-1) != y))
    assert ens.test_error(q.argmax(-1), y) == pytest.approx(np.mean(q.argmax(-1) != y))
    assert ens.nll(q, y) == pytest.approx(-np.mean(np.log(q[np.arange(len(y)), y])), rel=1e-12)
    zero = np.array([[1.0, 0.0]])
    assert ens.nll(zero, np.array([1])) == np.inf


def test_output_correlation_matches_numpy_corrcoef(data):
    p, _ = data
    r = np.corrcoef(p.reshape(p.shape[0], -1))
    np.testing.assert_allclose(ens.pairwise_output_correlation(p), r, atol=1e-12)
    ref = np.mean([r[i, j] for i, j in itertools.combinations(range(4), 2)])
    assert ens.output_correlation(p) == pytest.approx(ref, abs=1e-12)
    # identical members are perfectly correlated
    assert ens.output_correlation(np.stack([p[0], p[0]])) == pytest.approx(1.0)


def test_param_distance_matches_numpy_without_cancellation():
    rng = np.random.default_rng(1)
    base = {"w": rng.normal(size=(30, 20)) * 100.0, "b": rng.normal(size=(20,)) * 100.0}
    members = [jax.tree_util.tree_map(lambda x: jnp.asarray(x + rng.normal(size=x.shape) * 1e-2, jnp.float32),
                                      base) for _ in range(4)]
    flat = np.stack([np.concatenate([np.asarray(m["b"], np.float64).ravel(),
                                     np.asarray(m["w"], np.float64).ravel()]) for m in members])
    ref = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
    np.testing.assert_allclose(ens.pairwise_param_distances(members), ref, rtol=1e-4, atol=1e-6)
    assert ens.param_distance(members) == pytest.approx(ref[np.triu_indices(4, 1)].mean(), rel=1e-4)
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *members)
    assert ens.param_distance(stacked) == pytest.approx(ens.param_distance(members), rel=1e-6)


def test_ensemble_from_probs_reports_every_table_key(data):
    p, y = data
    rng = np.random.default_rng(2)
    params = [{"w": jnp.asarray(rng.normal(size=(5,)), jnp.float32)} for _ in range(4)]
    out = ens.ensemble_from_probs(p, y, params=params)
    d = out.to_json()
    for key in ("test_error", "nll", "output_correlation", "param_distance", "members"):
        assert key in d
    assert d["members"] == 4
    assert d["test_error"] == pytest.approx(np.mean(p.mean(0).argmax(-1) != y))
    assert d["param_distance"] == pytest.approx(ens.param_distance(params))
    assert len(d["member_test_error"]) == 4
    v = ens.ensemble_from_probs(p, y, method="vote")
    assert v.nll is None and v.param_distance is None
    single = ens.ensemble_from_probs(p[:1], y)
    assert single.output_correlation is None and single.members == 1


@pytest.mark.parametrize("bad, msg", [
    (np.ones((3, 4)), "shape"),
    (-np.ones((2, 3, 2)), "negative"),
    (np.full((2, 3, 2), 0.9), "sum to 1"),
    (np.full((2, 3, 2), np.nan), "non-finite"),
])
def test_bad_probabilities_are_rejected(bad, msg):
    with pytest.raises(ValueError, match=msg):
        ens.ensemble_from_probs(bad, np.zeros(3, dtype=int))


def test_bad_labels_methods_weights_and_single_member(data):
    p, y = data
    with pytest.raises(ValueError, match=r"labels must be integer class indices in \[0, 3\)"):
        ens.ensemble_from_probs(p, y + 3)
    with pytest.raises(ValueError, match="shape"):
        ens.ensemble_from_probs(p, y[:10])
    with pytest.raises(ValueError, match="method"):
        ens.ensemble_from_probs(p, y, method="median")
    with pytest.raises(ValueError, match="weights"):
        ens.average_probs(p, [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 2 members"):
        ens.output_correlation(p[:1])
    with pytest.raises(ValueError, match="params hold 2 members"):
        ens.ensemble_from_probs(p, y, params=[{"w": jnp.zeros(2)}, {"w": jnp.ones(2)}])


def test_snapshot_cosine_schedule_values():
    s = snap.snapshot_cosine_schedule(0.2, total_steps=100, num_cycles=4)
    assert float(s(0)) == pytest.approx(0.2)
    assert float(s(12.5)) == pytest.approx(0.1, rel=1e-5)
    assert float(s(24)) == pytest.approx(0.1 * (np.cos(np.pi * 24 / 25) + 1), rel=1e-5)
    assert float(s(25)) == pytest.approx(0.2)  # restart
    assert snap.snapshot_steps(100, 4) == [25, 50, 75, 100]
    with pytest.raises(ValueError, match="num_cycles"):
        snap.snapshot_cosine_schedule(0.1, total_steps=3, num_cycles=4)


def test_fge_schedule_matches_garipov_formula():
    lr1, lr2, c = 0.05, 0.0005, 10
    s = snap.fge_schedule(lr1, lr2, c)
    for t in range(25):
        i = t + 1
        u = ((i - 1) % c + 1) / c
        ref = (1 - 2 * u) * lr1 + 2 * u * lr2 if u <= 0.5 else (2 - 2 * u) * lr2 + (2 * u - 1) * lr1
        assert float(s(t)) == pytest.approx(ref, rel=1e-5)
    collect = snap.fge_collect_steps(c, 3)
    assert collect == [5, 15, 25]
    # the learning rate used by the step that completes a collected count is the cycle minimum lr2
    assert all(float(s(k - 1)) == pytest.approx(lr2, rel=1e-5) for k in collect)
    with pytest.raises(ValueError, match="even"):
        snap.fge_schedule(lr1, lr2, 7)


# The training tests share module-level objectives, batch streams and optimizers named by value, so that the
# compiled steps of one test serve the others (a fresh closure or optax object per test would compile again).
_RNG = np.random.default_rng(3)
_X = jnp.asarray(_RNG.normal(size=(64, 4)), jnp.float32)
_Y = jnp.asarray((_X[:, 0] + 0.5 * _X[:, 1] > 0).astype(np.int32))
_PARAMS = {"w": jnp.zeros((4, 2)), "b": jnp.zeros((2,))}


def _objective(p, batch, key):  # the objective protocol: (params, batch, key) -> (loss, aux)
    logits = batch[0] @ p["w"] + p["b"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[1])), {}


def _noisy_objective(p, batch, key):  # uses its key, so a wrong fold_in(key, t) would show
    logits = batch[0] @ (p["w"] + 0.01 * jax.random.normal(key, p["w"].shape)) + p["b"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[1])), {}


def _full_batch(t):
    return _X, _Y


class _Epochs:
    """A batch function that knows its epoch length, like engine.data.BatchStream: 4 batches of 16."""

    steps_per_epoch = 4

    def __call__(self, t):
        return _X[(t % 4) * 16:(t % 4 + 1) * 16], _Y[(t % 4) * 16:(t % 4 + 1) * 16]


_BATCHES = _Epochs()
# the settings of the snapshot and FGE runs (shared, so each compiles once)
_SSE = dict(lr0=0.3, total_steps=11, num_members=3)
_FGE = dict(lr1=0.3, lr2=0.03, cycle_steps=4, num_members=3, momentum=0.5, weight_decay=1e-3)


def test_train_with_snapshots_collects_at_requested_steps():
    tx = transform(optax.sgd, 0.5, momentum=0.9)  # as in the test of real epochs below: one compiled step
    final, snaps = snap.train_with_snapshots(_objective, _PARAMS, tx, _BATCHES, 20, [5, 20])
    assert len(snaps) == 2
    np.testing.assert_array_equal(np.asarray(snaps[1]["w"]), np.asarray(final["w"]))
    loss = lambda p: float(_objective(p, _full_batch(0), None)[0])  # noqa: E731
    assert loss(snaps[1]) < loss(snaps[0]) < loss(_PARAMS)
    with pytest.raises(ValueError, match="collect steps"):
        snap.train_with_snapshots(_objective, _PARAMS, tx, _BATCHES, 20, [21])
    with pytest.raises(ValueError, match=r"must return \(loss, aux\).*got an array.*function_objective"):
        snap.train_with_snapshots(lambda p, b, k: _objective(p, b, k)[0], _PARAMS, tx, _BATCHES, 20, [5])


def test_diverging_snapshot_and_fge_runs_raise_instead_of_returning_nans():
    # 50 |w - 1|^2 with lr 1: w - 1 is multiplied by -99 per step and overflows float32 within ~20 steps
    objective = function_objective(lambda p, b: 50.0 * jnp.sum((p["w"] - 1.0) ** 2))
    params = {"w": jnp.zeros(3)}
    with pytest.raises(NonFiniteError, match="not finite at step"):
        snap.snapshot_ensemble(objective, params, lambda t: None, lr0=1.0, total_steps=60, num_members=3,
                              momentum=0.0)
    with pytest.raises(NonFiniteError):
        snap.fge_ensemble(objective, params, lambda t: None, lr1=1.0, lr2=0.5, cycle_steps=40, num_members=2,
                         momentum=0.0)


def test_snapshot_and_fge_ensembles_produce_distinct_members():
    # the settings of the bit-identity test below (one compiled step each)
    sse = snap.snapshot_ensemble(_noisy_objective, _PARAMS, _BATCHES, **_SSE)
    assert len(sse) == 3
    fge = snap.fge_ensemble(_noisy_objective, sse[-1], _BATCHES, **_FGE)
    assert len(fge) == 3
    for members in (sse, fge):
        d = ens.pairwise_param_distances(members)
        assert np.all(d[np.triu_indices(3, 1)] > 0)
    with pytest.raises(ValueError, match="distinct"):
        snap.independent_ensemble(lambda s: _PARAMS, [1, 1])
    ind = snap.independent_ensemble(lambda s: {"w": jnp.full((2,), float(s))}, [1, 2, 3])
    assert ens.param_distance(ind) == pytest.approx(np.mean([np.sqrt(2), 2 * np.sqrt(2), np.sqrt(2)]), rel=1e-6)


def test_member_probs_of_a_model_match_softmax_of_apply():
    # the doctests' model and shapes (mlp (4,), 3 classes, 8 examples of 5 features, 2 members): one compilation
    model = get_model("mlp", widths=(4,), num_classes=3)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(8, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=8).astype(np.int32)
    members = [{"Dense_0": {"kernel": rng.normal(size=(5, 4)), "bias": rng.normal(size=4)},
                "Dense_1": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=3)}} for _ in range(2)]
    members = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), members)
    probs = ens.member_probs(model, members, (x, y))
    assert probs.shape == (2, 8, 3)
    for m, p in enumerate(jax.tree.map(lambda a: np.asarray(a, np.float64), members)):  # a NumPy forward pass
        logits = np.maximum(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0) @ p["Dense_1"]["kernel"]
        logits = logits + p["Dense_1"]["bias"]
        ref = np.exp(logits - logits.max(-1, keepdims=True))
        np.testing.assert_allclose(probs[m], ref / ref.sum(-1, keepdims=True), atol=1e-5)
    out = ens.ensemble_from_params(model, members, (x, y))
    assert out.test_error == pytest.approx(np.mean(probs.mean(0).argmax(-1) != y))
    assert out.param_distance == pytest.approx(ens.param_distance(members), rel=1e-6)


def test_snapshots_train_in_real_epochs_with_the_same_members_as_one_step_epochs():
    from mclandscape.engine.loop import LoopConfig, StopRun, run
    from mclandscape.engine.step import make_step

    tx, key, collect = transform(optax.sgd, 0.5, momentum=0.9), jax.random.key(1), [3, 6, 10]
    # the reference: the loop with one step per epoch, members copied at those epoch ends
    step, ref = make_step(_objective, tx), {}
    res = run(step, step.init(_PARAMS), _BATCHES, epochs=10, steps_per_epoch=1, key=key, config=LoopConfig(),
              callbacks=[lambda e, st, h: ref.__setitem__(e, st.params) if e in collect else None])
    epochs = []
    final, snaps = snap.train_with_snapshots(_objective, _PARAMS, tx, _BATCHES, 10, collect, key=key,
                                            callback=lambda e, r: epochs.append((e, len(r[1]))))
    assert epochs == [(1, 1), (2, 2), (3, 3)]  # 4 + 4 + 2 steps; members after steps 3, 6 (mid-epoch) and 10
    for got, want in zip(snaps, [ref[c] for c in collect], strict=True):
        np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(want["w"]))
    np.testing.assert_array_equal(np.asarray(final["w"]), np.asarray(res.params["w"]))
    one = snap.train_with_snapshots(_objective, _PARAMS, tx, _BATCHES, 10, collect, key=key, steps_per_epoch=1)[1]
    np.testing.assert_array_equal(np.asarray(one[1]["w"]), np.asarray(snaps[1]["w"]))

    def stop_after_first(epoch, result):
        raise StopRun

    _, early = snap.train_with_snapshots(_objective, _PARAMS, tx, _BATCHES, 10, collect, key=key,
                                        callback=stop_after_first)
    assert len(early) == 1  # only the member of step 3 was taken in epoch 1
    with pytest.raises(ValueError, match="steps_per_epoch"):
        snap.train_with_snapshots(_objective, _PARAMS, tx, _BATCHES, 10, collect, steps_per_epoch=0)


def test_ensemble_trainers_default_progress_like_every_trainer():
    import inspect

    for fn in (snap.train_with_snapshots, snap.snapshot_ensemble, snap.fge_ensemble):
        assert inspect.signature(fn).parameters["progress"].default is None


@functools.cache
def _by_hand(kind: str):
    """The reference: one step at a time, batch t and key fold_in(key, t), the parameters after each count (the
    snapshot run from _PARAMS after 4, 8 and 11 steps; the FGE run from the last snapshot after 2, 6, 10)."""
    from mclandscape.engine.step import make_step

    if kind == "sse":
        tx = optax.chain(optax.add_decayed_weights(0.0), optax.sgd(snap.snapshot_cosine_schedule(0.3, 11, 3),
                                                                   momentum=0.9))
        start, key, collect = _PARAMS, jax.random.key(4), [4, 8, 11]
    else:
        tx = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(snap.fge_schedule(0.3, 0.03, 4), momentum=0.5))
        start, key, collect = _by_hand("sse")[-1], jax.random.key(5), [2, 6, 10]
    step = make_step(_noisy_objective, tx)
    state, out = step.init(start), {}
    for t in range(max(collect)):
        state, _ = step(state, _BATCHES(t), jax.random.fold_in(key, t))
        if t + 1 in collect:
            out[t + 1] = state.params
    return [out[c] for c in collect]


def _assert_members_equal(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.parametrize("spe", [1, 3, None])  # None: the batch function's own 4 steps per epoch
def test_snapshot_and_fge_members_are_bit_identical_to_one_step_at_a_time(spe):
    # snapshot: 11 steps, members after 4, 8 (inside epochs of 3 or 4) and 11 (a short last epoch)
    epochs = []
    sse = snap.snapshot_ensemble(_noisy_objective, _PARAMS, _BATCHES, **_SSE, key=jax.random.key(4),
                                steps_per_epoch=spe, callback=lambda e, r: epochs.append((e, len(r[1]))))
    assert snap.snapshot_steps(11, 3) == [4, 8, 11]
    _assert_members_equal(sse, _by_hand("sse"))
    n = {1: 1, 3: 3, None: 4}[spe]
    assert [e for e, _ in epochs] == list(range(1, -(-11 // n) + 1))
    assert [m for _, m in epochs] == [sum(c <= min(e * n, 11) for c in (4, 8, 11)) for e, _ in epochs]
    # FGE from the last snapshot: 10 steps, members after 2, 6 and 10
    fge = snap.fge_ensemble(_noisy_objective, sse[-1], _BATCHES, **_FGE, key=jax.random.key(5), steps_per_epoch=spe)
    _assert_members_equal(fge, _by_hand("fge"))


def test_ensemble_callbacks_stop_training_and_plain_batch_functions_have_one_step_epochs():
    from mclandscape.engine.loop import StopRun

    plain = lambda t: _BATCHES(t)  # noqa: E731 - no steps_per_epoch attribute: one step per epoch
    seen = []
    snaps = snap.snapshot_ensemble(_noisy_objective, _PARAMS, plain, **_SSE, key=jax.random.key(4),
                                  callback=lambda e, r: seen.append(e))
    assert seen == list(range(1, 12)) and len(snaps) == 3

    def stop_at_2(epoch, result):
        params_now, members = result
        assert jax.tree_util.tree_structure(params_now) == jax.tree_util.tree_structure(_PARAMS)
        if epoch == 2:
            raise StopRun

    sse = snap.snapshot_ensemble(_noisy_objective, _PARAMS, _BATCHES, **_SSE, key=jax.random.key(4),
                                callback=stop_at_2)  # epochs of 4: members after 4 and 8 only
    _assert_members_equal(sse, _by_hand("sse")[:2])
    fge = snap.fge_ensemble(_noisy_objective, _PARAMS, _BATCHES, **_FGE, steps_per_epoch=3,
                           callback=stop_at_2)  # 6 steps: members after 2 and 6
    assert len(fge) == 2
