"""DSP-TT (the DSP-TT paper, Anonymous, 2020): eq. 3 readings, exit detection, local solver, tiers, exit-point
verification, resume, float64."""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mclandscape.core.objective import function_objective, make_objective
from mclandscape.core.tree import tree_cosine, tree_distance, tree_dot, tree_norm
from mclandscape.engine.batches import batch_stream
from mclandscape.engine.loop import NonFiniteError
from mclandscape.engine.resume import ResumeMismatchError
from mclandscape.methods import dsp_detector as dd
from mclandscape.methods import dsp_step as dstep
from mclandscape.methods import trusttech as tt
from mclandscape.methods import verification as ver
from mclandscape.methods.verification_result import FlowSettings


def two_wells(p):
    """Minima (-1, 0) and (1, 0) separated by the ridge x = 0 (saddle (0, 0), value 1); isotropic Hessian
    diag(8, 8) at both minima."""
    x, y = p["x"], p["y"]
    return (x**2 - 1) ** 2 + 4 * y**2


def four_wells(p):
    """Minima (+-1, +-1); neighbouring wells are separated by the ridges x = 0 and y = 0."""
    return (p[0] ** 2 - 1) ** 2 + (p[1] ** 2 - 1) ** 2


# the objective protocol objective(params, batch, key) -> (loss, aux) of the analytic potentials
LOSS2 = function_objective(lambda p, b: two_wells(p))
LOSS4 = function_objective(lambda p, b: four_wells(p))
NO_BATCH = lambda t: None  # noqa: E731
ORIGIN2 = {"x": jnp.array(-1.0), "y": jnp.array(0.0)}
SOLVER = dd.LocalSolver(optax.sgd(0.05), steps=2000, grad_tol=1e-6)
DET = dd.ExitDetector(ema_decay=0.5, buffer_size=3, vote=1.0)


def _dir(x, y):
    return {"x": jnp.array(x), "y": jnp.array(y)}


def _config(reading="additive", **kw):
    # every search here records its path, so that they all share one compiled step (what the step returns
    # depends on whether a path or a callback needs the direction)
    kw = {"num_directions": 1, "rho": dd.RhoSchedule(1e-3, 1.0, 0.01, reading), "detector": DET,
          "max_steps": 600, "record_path": 80} | kw
    return dd.DSPConfig(**kw)


@pytest.fixture(scope="module")
def ridge():
    """One search across the ridge of the two wells, shared by the tests that only read its result."""
    return tt.dsp_search(LOSS2, ORIGIN2, jax.random.key(0), config=_config(), batch_fn=NO_BATCH, solver=SOLVER,
                         directions=[_dir(0.01, 0.003)])


def test_search_exits_past_the_ridge_and_solver_reaches_the_other_minimum(ridge):
    res = ridge
    assert len(res.exits) == 1 and len(res.solutions) == 1 and res.failed == []
    e = res.exits[0]
    exit_x = float(ORIGIN2["x"]) + float(res.paths[0][-1][1]["x"])
    assert exit_x > 0.0, "the exit point lies past the ridge x = 0"
    assert float(res.exit_points[0]["x"]) == pytest.approx(exit_x)
    assert res.solver_steps == e.solver_steps > 0
    assert e.peak_ema > e.base_ema + 0.5 and e.ema < e.peak_ema  # the loss rose, then fell
    assert e.peak_iteration < e.iteration
    sol = res.solutions[0]
    assert float(sol["x"]) == pytest.approx(1.0, abs=1e-4) and float(sol["y"]) == pytest.approx(0.0, abs=1e-4)
    assert e.solution_distance == pytest.approx(2.0, abs=1e-3)
    assert e.rho1 == pytest.approx(1e-3 * e.iteration)
    trace = res.traces[0]
    assert len(trace["loss"]) == e.iteration and max(trace["loss"]) > 0.9
    # the exit check runs in the compiled step: the host reading every 7 steps (not 50) gives the same search
    again = tt.dsp_search(LOSS2, ORIGIN2, jax.random.key(0), config=_config(sync_every=7),
                          batch_fn=NO_BATCH, solver=SOLVER, directions=[_dir(0.01, 0.003)])
    assert [x.to_json() for x in again.exits] == [x.to_json() for x in res.exits] and again.traces == res.traces
    np.testing.assert_array_equal(np.asarray(again.solutions[0]["x"]), np.asarray(sol["x"]))


class _CountCompiles(logging.Handler):
    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record):
        if "Compiling" in record.getMessage():
            self.count += 1


def _compiles(fn) -> int:
    handler = _CountCompiles()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            fn()
    finally:
        logger.removeHandler(handler)
    return handler.count


def test_a_second_search_with_the_same_objective_compiles_nothing(ridge):
    kw = dict(config=_config(), batch_fn=NO_BATCH, solver=SOLVER)
    assert len(ridge.exits) == 1 and ridge.exits[0].solver_steps > 0  # search steps and local-solver steps ran
    out = {}

    def again():  # another origin and direction of the same shapes: only traced values change
        out["res"] = tt.dsp_search(LOSS2, {"x": jnp.array(-1.01), "y": jnp.array(0.0)}, jax.random.key(1),
                                   directions=[_dir(0.012, 0.002)], **kw)

    assert _compiles(again) == 0
    assert len(out["res"].exits) == 1 and float(out["res"].solutions[0]["x"]) == pytest.approx(1.0, abs=1e-4)
    # ... while another objective function does compile (the counter counts)
    other = function_objective(lambda p, b: two_wells(p) + 0.0)
    assert _compiles(lambda: tt.dsp_search(other, ORIGIN2, jax.random.key(0), config=_config(max_steps=3),
                                           batch_fn=NO_BATCH, solver=SOLVER, directions=[_dir(0.01, 0.003)])) > 0


def test_local_solve_checks_grad_tol_after_every_step():
    # 0.5 |w|^2 with sgd(0.5): w_t = 0.5^t w_0, so the gradient norm of step t (at the parameters before its
    # update) is 0.5^(t - 1) |w_0|; with |w_0| = 1 and grad_tol 0.01 the first step below it is step 8
    def obj(p, batch, key):
        task = 0.5 * jnp.sum(p["w"] ** 2)
        return task + 1.0, {"loss": task}

    w0 = {"w": jnp.array([0.6, 0.8])}
    sgd = optax.sgd(0.5)  # one optimizer object: the compiled step is keyed by it, so the runs below share it
    sol, info = dstep.local_solve(obj, w0, dd.LocalSolver(sgd, steps=100, grad_tol=0.01), NO_BATCH,
                               jax.random.key(0))
    assert info["steps"] == 8
    assert info["grad_norm"] == pytest.approx(0.5**7, rel=1e-5)
    assert info["task_loss"] == pytest.approx(0.5 * 0.25**7, rel=1e-5)  # the task loss aux["loss"] of step 8
    assert info["loss"] == pytest.approx(1.0 + 0.5 * 0.25**7, rel=1e-6)  # the objective's value (minimised)
    np.testing.assert_allclose(np.asarray(sol["w"]), np.asarray(w0["w"]) * 0.5**8, rtol=1e-6)  # update applied
    # the test runs in the compiled step: how often the host looks changes nothing (steps after it apply nothing)
    for every in (1, 3):
        sol2, info2 = dstep.local_solve(obj, w0, dd.LocalSolver(sgd, 100, grad_tol=0.01, check_every=every),
                                        NO_BATCH, jax.random.key(0))
        assert info2 == info
        np.testing.assert_array_equal(np.asarray(sol2["w"]), np.asarray(sol["w"]))
    _, info = dstep.local_solve(obj, w0, dd.LocalSolver(sgd, steps=5), NO_BATCH, jax.random.key(0))
    assert info["steps"] == 5 and info["grad_norm"] == pytest.approx(0.5**4, rel=1e-5)  # no grad_tol: all steps
    # a diverging solver raises the engine's NonFiniteError instead of returning NaNs
    with pytest.raises(NonFiniteError, match="local solver diverged"):
        dstep.local_solve(obj, w0, dd.LocalSolver(optax.sgd(3.0), steps=500), NO_BATCH, jax.random.key(0))


def test_losses_off_the_objective_protocol_are_refused():
    scalar = lambda p, b, r: two_wells(p)  # noqa: E731 - the old loss_fn(params, batch, rng) -> scalar
    with pytest.raises(ValueError, match=r"must return \(loss, aux\).*function_objective"):
        tt.dsp_search(scalar, ORIGIN2, jax.random.key(0), config=_config(), batch_fn=NO_BATCH, solver=SOLVER,
                      directions=[_dir(0.01, 0.003)])
    with pytest.raises(ValueError, match=r"must return \(loss, aux\)"):
        dstep.local_solve(scalar, ORIGIN2, SOLVER, NO_BATCH, jax.random.key(0))
    with pytest.raises(ValueError, match=r"must return \(loss, aux\)"):
        ver.verify_exit(lambda p, b, k: two_wells(p), ORIGIN2, [(1, _dir(0.1, 0.0))], 1,
                        flow=FlowSettings(steps=10, record_every=10))
    with pytest.raises(ValueError, match="scalar"):
        dstep.local_solve(lambda p, b, k: (jnp.stack([p["x"], p["y"]]), {}), ORIGIN2, SOLVER, NO_BATCH,
                       jax.random.key(0))
    with pytest.raises(ValueError, match="solver must be a LocalSolver"):
        dstep.local_solve(LOSS2, ORIGIN2, optax.sgd(0.1), NO_BATCH, jax.random.key(0))
    with pytest.raises(ValueError, match="objective must be callable"):
        tt.dsp_search(None, ORIGIN2, jax.random.key(0), config=_config(), batch_fn=NO_BATCH, solver=SOLVER)


def test_growth_reading_escapes_too():
    # the additive reading is the fixture's; eq. 3 as printed (rho1 * d, which shrinks d) is not offered
    res = tt.dsp_search(LOSS2, ORIGIN2, jax.random.key(0), config=_config("growth", max_steps=1500),
                        batch_fn=NO_BATCH, solver=SOLVER, directions=[_dir(0.1, 0.03)])
    assert len(res.exits) == 1
    assert float(res.solutions[0]["x"]) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="reading"):
        dd.RhoSchedule(reading="literal")


def test_calibration_steers_the_direction():
    # with rho2 = 0 (original TRUST-TECH, fixed direction) the path stays a straight ray
    cfg = _config(rho=dd.RhoSchedule(1e-3, 1.0, 0.0), max_steps=40)
    d0 = _dir(0.01, 0.01)
    fixed = tt.dsp_search(LOSS2, ORIGIN2, jax.random.key(0), config=cfg, batch_fn=NO_BATCH, solver=SOLVER,
                          directions=[d0])
    assert fixed.exits == []
    cfg = _config(max_steps=40, record_path=1)
    res = tt.dsp_search(LOSS2, ORIGIN2, jax.random.key(0), config=cfg, batch_fn=NO_BATCH, solver=SOLVER,
                        directions=[d0])
    d = res.paths[0][-1][1]
    # the y component (pulled back by the calibration -rho2 grad) shrinks relative to x
    assert float(d["y"]) / float(d["x"]) < 0.9


ORIGIN4 = jnp.array([1.0, 1.0])
FOUR = dd.DSPConfig(num_directions=4, rho=dd.RhoSchedule(1e-3, 1.0, 0.01), detector=DET, max_steps=1200,
                    record_path=1, checkpoint_every=50)


@pytest.fixture(scope="module")
def four_tiers():
    """Two tiers of search on the four wells, every callback and score recorded (shared by three tests)."""
    calls: dict = {1: [], 2: []}
    scores = []

    def score(p):  # prefer the tier-1 solution with the smallest x (an arbitrary, checkable choice)
        scores.append(float(p[0]))
        return float(p[0])

    tiers = tt.tier_by_tier(LOSS4, ORIGIN4, jax.random.key(2), config=FOUR, batch_fn=NO_BATCH, solver=SOLVER,
                            score_fn=score, tiers=2,
                            callback=lambda count, info: calls[info["tier"]].append((count, info)))
    return tiers, calls, scores


def test_several_directions_find_distinct_optima_and_tier_two_starts_from_the_best(four_tiers):
    tiers, _, scores = four_tiers
    res = tiers[0]
    assert len(res.exits) + len(res.failed) == 4
    sols = np.array([np.asarray(s) for s in res.solutions])
    assert len(sols) >= 2
    np.testing.assert_allclose(np.abs(sols), 1.0, atol=1e-3)  # every solution is one of the four minima
    assert not np.any(np.all(np.isclose(sols, 1.0, atol=1e-3), axis=1)), "no solution is the origin"
    assert len({tuple(np.round(s).astype(int)) for s in sols}) >= 2
    # tier 2 searches from the best tier-1 solution
    assert len(tiers) == 2 and len(scores) == len(res.solutions)
    best = res.solutions[int(np.argmin(scores))]
    np.testing.assert_allclose(np.asarray(tiers[1].origin), np.asarray(best))
    assert len(tiers[1].solutions) >= 1
    for s in tiers[1].solutions:
        np.testing.assert_allclose(np.abs(np.asarray(s)), 1.0, atol=1e-3)
        assert not np.allclose(np.asarray(s), np.asarray(best), atol=1e-3)
    stats = tt.exit_statistics(res)
    assert stats["exits"] == len(res.exits) and stats["mean_distance"] > 1.0


def test_callback_counts_search_steps_from_one(four_tiers):
    tiers, calls, _ = four_tiers
    for n, res in enumerate(tiers, start=1):  # the count restarts at 1 in every tier
        counts = [c for c, _ in calls[n]]
        assert counts == list(range(1, res.steps + 1))
        assert [info["step"] for _, info in calls[n]] == [c - 1 for c in counts]  # the 0-based global step index
        exited = [info for _, info in calls[n] if info["exited"]]
        assert len(res.exits) >= 1 and [i["step"] for i in exited] == [e.step for e in res.exits]
        assert [(i["direction"], i["iteration"]) for i in exited] == [(e.direction, e.iteration) for e in res.exits]
        for k, trace in enumerate(res.traces):  # the traces number the steps as info["step"] does
            assert trace["step"] == [info["step"] for _, info in calls[n] if info["direction"] == k]


# a mini-batch objective: the true loss plus a random linear term
NOISY = function_objective(lambda p, batch: two_wells(p) + batch[0] * p["x"] + batch[1] * p["y"])


def test_exit_detection_on_noisy_minibatch_losses():
    rng = np.random.default_rng(0)
    noise = jnp.asarray(rng.normal(scale=0.3, size=(2000, 2)), jnp.float32)
    loss = NOISY
    solver = dd.LocalSolver(optax.sgd(0.05), steps=2000, grad_tol=1e-6, batch_fn=lambda t: jnp.zeros(2))

    def search(det):
        return tt.dsp_search(loss, ORIGIN2, jax.random.key(0), config=_config(detector=det, max_steps=1000),
                             batch_fn=lambda t: noise[t], solver=solver, directions=[_dir(0.01, 0.0)])

    for det in (dd.ExitDetector(), dd.ExitDetector(ema_decay=0.8, buffer_size=6, vote=0.8, min_rise=0.5)):
        res = search(det)
        assert len(res.exits) == 1
        assert res.exits[0].distance > 1.0
        assert float(res.solutions[0]["x"]) == pytest.approx(1.0, abs=1e-3)
        raw = np.asarray(res.traces[0]["loss"])
        assert np.sum(np.diff(raw) < 0) > 5, "the raw mini-batch losses are noisy, the EMA is what detects"
    # a short buffer without min_rise is fooled by the noise near omega0 and falls back into its basin
    fooled = search(dd.ExitDetector(ema_decay=0.8, buffer_size=6, vote=0.8))
    assert fooled.exits[0].distance < 0.5
    assert float(fooled.solutions[0]["x"]) == pytest.approx(-1.0, abs=1e-3)


def test_detector_states():
    det = dd.ExitDetector(ema_decay=0.0, buffer_size=3, vote=1.0)

    def feed(detector, values):
        s, flags = detector.init(jnp.float32), []
        update = jax.jit(detector.update)  # traceable, as inside the search step: one compilation per detector
        for v in values:
            s, ex = update(s, jnp.float32(v))
            flags.append(bool(ex))
        return s, flags

    s, flags = feed(det, [0, 1, 2, 3, 4, 3.5, 3, 2.5, 2])
    assert flags.index(True) == 7  # three decreases after the climb
    assert int(s.phase) == dd.EXIT and int(s.peak_iteration) == 5 and float(s.peak) == 4
    # a flat start that only decreases never exits (no climb first)
    s, flags = feed(det, [1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    assert not any(flags) and int(s.phase) == dd.START
    # min_rise: a small climb does not count
    _, flags = feed(dd.ExitDetector(ema_decay=0.0, buffer_size=2, vote=1.0, min_rise=10.0), [0, 1, 2, 1, 0])
    assert not any(flags)
    # a non-finite loss on the search path stops the search with a clear error
    # (the noisy test's objective and detector, so nothing compiles again; NaN batches from step 5 on)
    with pytest.raises(ValueError, match="non-finite loss"):
        tt.dsp_search(NOISY, ORIGIN2, jax.random.key(0), config=_config(detector=dd.ExitDetector()),
                      batch_fn=lambda t: jnp.full(2, jnp.nan if t >= 5 else 0.0), solver=SOLVER,
                      directions=[_dir(0.01, 0.003)])


@pytest.mark.parametrize("kwargs, msg", [
    ({"increment": 0.0}, r"increment must be a finite number in \(0.0, inf\]"),
    ({"increment": -1e-3}, r"increment must be a finite number in \(0.0, inf\]"),
    ({"rho_max": 0.0}, r"rho_max must be a finite number in \(0.0, inf\]"),
    ({"increment": 0.5, "rho_max": 0.1}, "exceeds rho_max"),
    ({"rho2": -0.1}, r"rho2 must be a finite number in \[0.0, inf\]"),
    ({"rho2": float("nan")}, "finite"),
    ({"reading": "backwards"}, "reading"),
])
def test_bad_rho_schedules_raise(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        dd.RhoSchedule(**kwargs)


def test_rho1_schedule_and_bad_iterations():
    r = dd.RhoSchedule(increment=1e-3, rho_max=0.05)
    assert r.rho1(1) == pytest.approx(1e-3)
    assert r.rho1(30) == pytest.approx(0.03)
    assert r.rho1(500) == pytest.approx(0.05)  # capped at rho_max
    with pytest.raises(ValueError, match="iteration i must be an integer >= 1"):
        r.rho1(0)
    assert dd.rho2_from_lr(0.1) == pytest.approx(0.01)  # 0.1x the tier-0 learning rate (§5)
    with pytest.raises(ValueError, match="tier0_lr"):
        dd.rho2_from_lr(0.0)


def test_bad_directions_and_configs_raise():
    cfg = _config()
    with pytest.raises(ValueError, match="zero vector"):
        tt.dsp_search(LOSS2, ORIGIN2, jax.random.key(0), config=cfg, batch_fn=NO_BATCH, solver=SOLVER,
                      directions=[_dir(0.0, 0.0)])
    with pytest.raises(ValueError, match="no search directions"):
        tt.dsp_search(LOSS2, ORIGIN2, jax.random.key(0), config=cfg, batch_fn=NO_BATCH, solver=SOLVER,
                      directions=[])
    with pytest.raises(ValueError, match="not in"):
        tt.dsp_search(LOSS2, ORIGIN2, jax.random.key(0), config=cfg, batch_fn=NO_BATCH, solver=SOLVER,
                      directions=[{"x": jnp.array(1.0)}])
    with pytest.raises(ValueError, match="vote"):
        dd.ExitDetector(vote=0.5)
    with pytest.raises(ValueError, match="ema_decay"):
        dd.ExitDetector(ema_decay=1.0)
    with pytest.raises(ValueError, match="num_directions"):
        dd.DSPConfig(num_directions=0)
    with pytest.raises(ValueError, match="steps"):
        dd.LocalSolver(optax.sgd(0.1), steps=0)


def test_random_initial_directions_have_the_requested_norm_and_differ():
    dirs = dstep.initial_directions(jax.random.key(3), {"a": jnp.zeros((4, 3)), "b": jnp.zeros(5)}, 3, norm=0.5)
    norms = [float(tree_norm(d)) for d in dirs]
    np.testing.assert_allclose(norms, 0.5, rtol=1e-5)
    assert float(tree_cosine(dirs[0], dirs[1])) < 0.99


def test_progress_defaults_to_none_and_reaches_the_search_bar_and_the_local_solves(monkeypatch):
    import inspect
    import sys

    for fn in (tt.dsp_search, tt.tier_by_tier, dstep.local_solve):
        params = inspect.signature(fn).parameters
        assert params["progress"].default is None and params["devices"].default is None, fn.__name__
    bars, solves = [], []
    real_tqdm, real_run = tt.tqdm, dstep.run

    def tqdm_spy(*args, **kw):
        bars.append((kw["desc"], kw["disable"], kw["total"]))
        return real_tqdm(*args, **kw)

    def run_spy(*args, **kw):
        solves.append(kw["config"].progress)
        return real_run(*args, **kw)

    monkeypatch.setattr(tt, "tqdm", tqdm_spy)
    monkeypatch.setattr(dstep, "run", run_spy)
    kw = dict(config=_config(), batch_fn=NO_BATCH, solver=SOLVER, directions=[_dir(0.01, 0.003)])
    for progress in (None, False, True):
        bars.clear()
        solves.clear()
        res = tt.dsp_search(LOSS2, ORIGIN2, jax.random.key(0), progress=progress, **kw)
        assert len(res.exits) == 1
        shown = sys.stderr.isatty() if progress is None else progress  # None: a bar only on a terminal
        assert bars == [("DSP-TT tier 1", not shown, 600)]
        assert solves == [progress]  # the local solve (the engine's loop) gets the same setting
    solves.clear()
    dstep.local_solve(LOSS2, ORIGIN2, SOLVER, NO_BATCH, jax.random.key(0))
    assert solves == [None]  # no longer hard-coded to False
    # tier_by_tier hands progress and devices to every tier's search
    seen = []
    real_search = tt.dsp_search

    def search_spy(*args, **kw):
        seen.append((kw["tier"], kw["progress"], kw["devices"]))
        return real_search(*args, **kw)

    monkeypatch.setattr(tt, "dsp_search", search_spy)
    tt.tier_by_tier(LOSS2, ORIGIN2, jax.random.key(0), config=_config(), batch_fn=NO_BATCH,
                    solver=SOLVER, score_fn=lambda p: float(p["x"]), tiers=2, progress=False, devices=1)
    assert seen == [(1, False, 1), (2, False, 1)]


@pytest.mark.parametrize("devices", [0, -1, 2, 1.5, "1", True])
def test_bad_devices_raise_a_clear_error(devices):
    n = jax.device_count()
    devices = n + 1 if devices == 2 else devices  # more devices than the job has
    calls = []

    def batches(t):
        calls.append(t)
        return None

    kw = dict(config=_config(), batch_fn=batches, solver=SOLVER, devices=devices)
    with pytest.raises(ValueError, match="devices"):
        tt.dsp_search(LOSS2, ORIGIN2, jax.random.key(0), **kw)
    with pytest.raises(ValueError, match="devices"):
        tt.tier_by_tier(LOSS2, ORIGIN2, jax.random.key(0), score_fn=float, **kw)
    with pytest.raises(ValueError, match="devices"):
        dstep.local_solve(LOSS2, ORIGIN2, SOLVER, batches, jax.random.key(0), devices=devices)
    assert calls == []  # refused before any batch was drawn
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > n:
        with pytest.raises(ValueError, match=rf"devices must be None .* in \[1, {n}\], got {devices}"):
            dstep.local_solve(LOSS2, ORIGIN2, SOLVER, batches, jax.random.key(0), devices=devices)


def test_verification_points_before_and_after_the_exit_reach_different_optima(ridge):
    path = ridge.paths[0][-30:]  # the window record_path=30 keeps
    # the true boundary crossing of this path: the first recorded point with x > 0
    cross = next(i for i, d in path if float(ORIGIN2["x"] + d["x"]) > 0)
    out = ver.verify_exit(LOSS2, ORIGIN2, path, cross, num_points=10,
                          flow=FlowSettings(step_size=0.01, steps=4000, record_every=100, grad_tol=1e-5))
    assert any(out.before) and not all(out.before)
    assert out.separates
    finals_x = np.asarray(out.finals["x"])
    np.testing.assert_allclose(finals_x[np.array(out.before)], -1.0, atol=1e-3)
    np.testing.assert_allclose(finals_x[~np.array(out.before)], 1.0, atol=1e-3)
    # convergence is judged by the gradient norm: the flows stop early, every end point below grad_tol
    assert out.steps_run < 4000 and out.steps_run % 100 == 0 and all(out.converged)
    assert out.origin_grad_norm <= 1e-5 and np.all(out.grad_norms <= 1e-5)
    np.testing.assert_allclose(out.final_losses, 0.0, atol=1e-8)
    assert np.all(out.start_losses > 0.0)
    sep = out.separation("param")
    assert sep["before_clusters"] == [0] and sep["after_clusters"] == [1]
    assert sep["leaves_origin"] and sep["disjoint"] and sep["separates_at_boundary"]
    assert sep["before_spread"] < 1e-3 and sep["after_spread"] < 1e-3
    assert sep["between"] == pytest.approx(2.0, abs=1e-3) and sep["ratio"] > 1e3
    last_before = max(i for i, b in zip(out.iterations, out.before, strict=True) if b)
    assert sep["transitions"] == [(last_before, min(i for i in out.iterations if i >= cross))]
    assert sep["boundary"] == sep["transitions"][0] and -10 < sep["boundary_offset"] < 0
    assert sep["boundary_groups"]["between"] == pytest.approx(2.0, abs=1e-3)
    assert max(sep["boundary_groups"]["before_spread"], sep["boundary_groups"]["after_spread"]) < 1e-3
    np.testing.assert_allclose(out.summary()["distance_to_origin_optimum"],
                               np.where(out.before, 0.0, 2.0), atol=1e-3)
    n_snap = out.steps_run // 100
    assert out.trajectories["x"].shape == (len(out.iterations), n_snap)
    u, v = ver.random_orthonormal_pair(jax.random.key(0), ORIGIN2)
    assert float(tree_dot(u, v)) == pytest.approx(0.0, abs=1e-6)
    xy = ver.project(out.trajectories, ORIGIN2, (u, v), leading=2)
    assert xy.shape == (len(out.iterations), n_snap, 2)
    with pytest.raises(ValueError, match="non-empty"):
        ver.verify_exit(LOSS2, ORIGIN2, [], 0)
    with pytest.raises(ValueError, match="grad_tol"):
        ver.verify_exit(LOSS2, ORIGIN2, path, cross, flow=FlowSettings(grad_tol=0.0))
    with pytest.raises(ValueError, match="function"):
        out.separation("function")
    with pytest.raises(ValueError, match="space"):
        out.separation("weights")


X_SYM = jnp.linspace(-2.0, 2.0, 9)


def sign_symmetric(p):
    """A one-unit "network" ``a * tanh(b x)`` fitted to ``tanh(x)`` with an L2 term: ``(a, b)`` and ``(-a, -b)``
    compute the same function, so its two minima near (1, 1) and (-1, -1) are one optimum in function space;
    the saddle (0, 0) separates their stability regions."""
    return jnp.mean((p["a"] * jnp.tanh(p["b"] * X_SYM) - jnp.tanh(X_SYM)) ** 2) + 0.005 * (p["a"] ** 2 + p["b"] ** 2)


SIGN_SYM = function_objective(lambda p, b: sign_symmetric(p))


def test_verification_tells_symmetric_copies_from_different_functions():
    origin = {"a": jnp.array(1.0), "b": jnp.array(1.0)}
    # a path from one minimum through the saddle towards its sign-flipped copy (iterations 1..10, crossing
    # between 5 and 6)
    path = [(k + 1, {"a": jnp.array(-2.0 * s), "b": jnp.array(-2.0 * s)})
            for k, s in enumerate(np.linspace(0.05, 0.95, 10))]
    out = ver.verify_exit(SIGN_SYM, origin, path, 6, flow=FlowSettings(0.1, 20_000, 200, grad_tol=1e-6),
                          distances={"function": ver.output_distance(lambda p: p["a"] * jnp.tanh(p["b"] * X_SYM)),
                                     "symmetry": _sign_sym_distance})
    assert all(out.converged)
    a_star = float(out.origin_final["a"])
    assert 0.8 < a_star < 1.2 and 0.8 < float(out.origin_final["b"]) < 1.2
    np.testing.assert_allclose(np.asarray(out.finals["a"]), np.where(out.before, a_star, -a_star), atol=1e-4)
    par, fun = out.separation("param"), out.separation("function")
    assert out.separates and par["leaves_origin"] and par["boundary"] == (5, 6) and par["boundary_offset"] == -0.5
    assert par["between"] > 1.5 and par["ratio"] > 1e3
    # ... but the two optima are one function: nothing separates in function space
    assert out.clusters("function").labels == [0] * 10
    assert not fun["separates"] and not fun["disjoint"] and fun["boundary"] is None
    assert fun["boundary_groups"] is None and par["boundary_groups"]["ratio"] > 1e3
    assert fun["between"] < 1e-4
    # ... nor modulo the sign symmetry (a distance the caller gives): every end point is a copy of the origin's
    sym_clusters = out.clusters("symmetry")
    assert sym_clusters.labels == [0] * 10 and out.basin == [0] * 5 + [1] * 5
    assert float(np.max(sym_clusters.distances)) < 1e-4 and sym_clusters.tol > 1e-3
    sym = out.separation("symmetry")
    assert sym["num_optima"] == 1 and not sym["separates"] and sym["boundary"] is None
    summary = out.summary()
    assert summary["separation_function"] == fun and len(summary["function_distance_to_origin_optimum"]) == 10
    assert summary["separation_symmetry"] == sym
    json.dumps(summary)


def _sign_sym_distance(p, q):
    a = np.array([float(p["a"]), float(p["b"])])
    b = np.array([float(q["a"]), float(q["b"])])
    return float(min(np.linalg.norm(a - b), np.linalg.norm(a + b)))


def flat_valley(p):
    """Two minima (+-1, 0) separated by the ridge x = 0, with a very flat valley floor in y (curvature 2e-3):
    a gradient-norm criterion of 1e-2 is met long before gradient descent has moved along y."""
    return (p["x"] ** 2 - 1) ** 2 + 1e-3 * p["y"] ** 2


FLAT = function_objective(lambda p, b: flat_valley(p))


def test_too_loose_gradient_criterion_is_detected_and_the_polish_settles_it():
    path = [(k + 1, {"x": jnp.array(x + 1.0), "y": jnp.array(y)})
            for k, (x, y) in enumerate(zip(np.linspace(-0.8, 0.8, 8), np.linspace(0.3, 1.0, 8), strict=True))]
    origin = {"x": jnp.array(-1.0), "y": jnp.array(0.0)}
    loose = ver.verify_exit(FLAT, origin, path, 5, flow=FlowSettings(0.01, 20_000, 200, grad_tol=1e-2))
    # the gradient criterion holds (it stops the flows early) but the points are still crawling along y
    assert all(loose.converged) and loose.steps_run < 2000
    assert not any(loose.settled) and not any(loose.flow_settled)
    y_end = np.asarray(loose.finals["y"])
    assert np.all(y_end > 0.25)
    # remaining-distance estimate: the flow still has about |y| to travel along the valley
    np.testing.assert_allclose(loose.diagnostics.remaining, y_end, rtol=0.1)
    sep = loose.separation("param")
    assert sep["num_optima"] > 2 and not sep["two_optima"] and not sep["all_settled"]
    polished = ver.verify_exit(FLAT, origin, path, 5, flow=FlowSettings(0.01, 20_000, 200, grad_tol=1e-2,
                                                                         polish_steps=200, polish_tol=1e-6))
    assert all(polished.settled) and not any(polished.flow_settled)
    assert np.all(polished.grad_norms <= 1e-6) and np.all(polished.diagnostics.polish_iterations >= 1)
    np.testing.assert_allclose(np.asarray(polished.finals["y"]), 0.0, atol=1e-3)
    np.testing.assert_allclose(np.asarray(polished.finals["x"]), np.where(polished.before, -1.0, 1.0), atol=1e-4)
    np.testing.assert_allclose(polished.diagnostics.polish_moves, y_end, atol=2e-3)
    sep = polished.separation("param")
    assert sep["num_optima"] == 2 and sep["two_optima"] and sep["all_settled"] and sep["separates"]
    assert sep["boundary"] == (4, 5)
    # the seed's claim tested at a misplaced split: the "after" side reaches both optima
    late = polished.separation("param", at=7)
    assert late["split_iteration"] == 7 and not late["separates"] and late["after_clusters"] == [1]
    assert late["before_clusters"] == [0, 1] and late["boundary"] == (4, 5) and late["boundary_offset"] == -2.5
    assert late["two_optima"]
    summary = polished.summary()
    assert summary["settled"] == [True] * 8 and len(summary["polish_moves"]) == 8
    json.dumps(summary)
    with pytest.raises(ValueError, match="polish_steps"):
        ver.verify_exit(FLAT, origin, path, 5, flow=FlowSettings(polish_steps=-1))
    with pytest.raises(ValueError, match="polish_tol"):
        ver.verify_exit(FLAT, origin, path, 5, flow=FlowSettings(polish_tol=0.0))


def test_plots_return_figures_draw_into_given_axes_and_save(ridge, tmp_path):
    from mclandscape.plots import trusttech as pt
    from mclandscape.plots._figure import new_figure, save

    res, path = ridge, ridge.paths[0][-20:]
    e = res.exits[0]
    f1 = pt.plot_search_trace(res.traces[0], exit=e, extra={"full loss": ([1, 10], [0.0, 0.1])})
    # chunks of 100 steps, as the verification test's (one compiled chunk)
    out = ver.verify_exit(LOSS2, ORIGIN2, path, e.peak_iteration, flow=FlowSettings(steps=200, record_every=100))
    basis = ver.random_orthonormal_pair(jax.random.key(1), ORIGIN2)
    f2 = pt.plot_verification(out, ORIGIN2, basis, exit_point=optax.tree.add(ORIGIN2, path[-1][1]))
    its = out.iterations
    mid = its[len(its) // 2]
    host = new_figure((8.0, 4.0))
    axes = host.subplots(1, 2)
    f3 = pt.plot_verification(out, ORIGIN2, basis, split_at=mid, ax=axes[1], title="split at the midpoint")
    assert f3 is host and axes[1].get_title() == "split at the midpoint" and len(axes[1].lines) > 0
    assert not axes[0].lines  # only the given axes were drawn into
    assert pt.plot_search_trace(res.traces[0], ax=axes[0]) is host and len(axes[0].lines) >= 2
    assert f1.axes[0].get_title() == "loss along a DSP-TT search path"
    for name, f in (("trace", f1), ("verify", f2), ("split", f3)):
        path = save(f, tmp_path / f"{name}.png", dpi=40)
        with open(path, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="split_at"):
        pt.plot_verification(out, ORIGIN2, basis, split_at=its[-1] + 1)
    with pytest.raises(ValueError, match="space must be one of"):
        pt.plot_verification(out, ORIGIN2, basis, space="symmetry")
    with pytest.raises(ValueError, match="empty"):
        pt.plot_search_trace({"iteration": [], "loss": [], "ema": []})


class _Kill(Exception):
    pass


def test_killed_search_resumes_to_the_same_result(four_tiers, tmp_path):
    origin, key = ORIGIN4, jax.random.fold_in(jax.random.key(2), 1)
    kw = dict(config=FOUR, batch_fn=NO_BATCH, solver=SOLVER)
    ref = four_tiers[0][0]  # tier 1 of tier_by_tier: the same search, uninterrupted, no checkpoints at all
    assert len(ref.exits) >= 2
    first_exit = min(e.step for e in ref.exits)

    def kill(count, info):  # count: steps done (1-based); info["step"]: the 0-based index of the step just done
        if info["step"] == first_exit + 30:
            raise _Kill

    with pytest.raises(_Kill):
        tt.dsp_search(LOSS4, origin, key, checkpoint_dir=str(tmp_path / "run"), callback=kill, **kw)
    from mclandscape.engine import checkpoint as ckpt

    meta = ckpt.read_metadata(str(tmp_path / "run"))
    assert meta["num_solutions"] >= 1 and 0 < meta["t"] <= first_exit + 31
    assert ckpt.all_steps(str(tmp_path / "run")) == [meta["t"]]  # only the latest state is kept
    resumed = tt.dsp_search(LOSS4, origin, key, checkpoint_dir=str(tmp_path / "run"), **kw)
    assert resumed.steps == ref.steps
    assert [e.to_json() for e in resumed.exits] == [e.to_json() for e in ref.exits]
    for a, b in zip(resumed.solutions, ref.solutions, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(resumed.exit_points, ref.exit_points, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed.traces == ref.traces
    # a different search refuses the directory
    with pytest.raises(ValueError, match="different search"):
        tt.dsp_search(LOSS4, origin + 0.5, key, checkpoint_dir=str(tmp_path / "run"), **kw)


def test_search_killed_during_the_local_solver_resumes_from_the_saved_exit(ridge, tmp_path):
    calls = {"n": 0}

    def failing_batches(t):
        calls["n"] += 1
        raise _Kill

    bad = dd.LocalSolver(optax.sgd(0.05), steps=2000, grad_tol=1e-6, batch_fn=failing_batches)
    kw = dict(config=_config(), batch_fn=NO_BATCH, directions=[_dir(0.01, 0.003)],
              checkpoint_dir=str(tmp_path / "c"))
    with pytest.raises(_Kill):
        tt.dsp_search(LOSS2, ORIGIN2, jax.random.key(0), solver=bad, **kw)
    from mclandscape.engine import checkpoint as ckpt

    meta = ckpt.read_metadata(str(tmp_path / "c"))
    assert meta["kind"] == "exit" and meta["pending"] is not None and meta["num_solutions"] == 0
    res = tt.dsp_search(LOSS2, ORIGIN2, jax.random.key(0), solver=SOLVER, **kw)
    assert len(res.solutions) == 1 and res.exits[0].to_json() == ridge.exits[0].to_json()
    assert float(res.solutions[0]["x"]) == pytest.approx(1.0, abs=1e-4)
    # a resume with another key, solver, calibration or data is refused, naming what differs
    others = [("key", dict(key=jax.random.key(1))), ("solver", dict(solver=dataclasses.replace(SOLVER, grad_tol=1e-5))),
              ("solver.optimizer", dict(solver=dataclasses.replace(SOLVER, optimizer=optax.sgd(0.04)))),
              ("calibration", dict(calibration=optax.scale(-2.0))), ("data", dict(batch_fn=lambda t: jnp.zeros(1)))]
    for name, change in others:
        args = dict(key=jax.random.key(0), solver=SOLVER, batch_fn=NO_BATCH) | change
        with pytest.raises(ResumeMismatchError, match=rf"different search \({name}"):
            tt.dsp_search(LOSS2, ORIGIN2, args.pop("key"), config=_config(), directions=[_dir(0.01, 0.003)],
                          checkpoint_dir=str(tmp_path / "c"), **args)


def test_model_search_on_digits_finds_a_tier1_solution(digits_mlp, digits_train, trained_mlp):
    # the origin is the session's trained MLP (conftest); the search's batches come from 256 digits
    batches = batch_stream(digits_train.take(256), 64, seed=0)
    assert batches.steps_per_epoch == 4
    x0, _ = batches(0)
    np.testing.assert_array_equal(np.asarray(batches(4)[0]).shape, x0.shape)
    assert not np.array_equal(np.asarray(batches(0)[0]), np.asarray(batches(4)[0]))  # reshuffled per epoch
    again = batch_stream(digits_train.take(256), 64, seed=0)
    np.testing.assert_array_equal(np.asarray(batches(1)[0]), np.asarray(again(1)[0]))
    loss_fn, omega0 = make_objective(digits_mlp, variables=trained_mlp.variables), trained_mlp.params
    solver = dd.LocalSolver(optax.sgd(0.1, momentum=0.9), steps=150)
    cfg = dd.DSPConfig(num_directions=1, rho=dd.RhoSchedule(1e-2, 0.1, 0.01),
                       detector=dd.ExitDetector(0.5, 5, 0.8, min_rise=0.2, min_drop=0.1), init_norm=1.0,
                       max_steps=800)
    res = tt.dsp_search(loss_fn, omega0, jax.random.key(1), config=cfg, batch_fn=batches, solver=solver)
    assert len(res.solutions) >= 1
    for e, s in zip(res.exits, res.solutions, strict=True):
        assert e.peak_ema > e.base_ema + 0.2 and e.ema <= e.peak_ema - 0.1 * (e.peak_ema - e.base_ema)
        assert e.solution_loss < 0.5 and e.solver_steps == 150  # no grad_tol: every step
        assert float(tree_distance(s, omega0)) > 1.0
    # a new objective of the same model and loss, another origin: the search and solver steps are reused
    fresh = make_objective(digits_mlp, variables=trained_mlp.variables)
    assert _compiles(lambda: (tt.dsp_search(fresh, res.solutions[0], jax.random.key(2),
                                            config=dataclasses.replace(cfg, max_steps=20), batch_fn=batches,
                                            solver=solver),
                              dstep.local_solve(fresh, omega0, dataclasses.replace(solver, steps=3), batches,
                                                jax.random.key(3)))) == 0


def test_float64_parameters_keep_float64_through_search_solver_and_verification():
    """With jax_enable_x64, float64 parameters give float64 directions, exit points, solutions, flows and
    losses: the losses the exit detector sees are the float64 objective values (float32 rounding would move
    them by ~1e-8 relative)."""
    with jax.enable_x64(True):
        origin = {"x": jnp.array(-1.0, jnp.float64), "y": jnp.array(0.0, jnp.float64)}
        seen = []

        def record(t, info):
            seen.append((info["loss"], info["d"]))

        res = tt.dsp_search(LOSS2, origin, jax.random.key(0), config=_config(record_path=10), batch_fn=NO_BATCH,
                            solver=SOLVER, directions=[{"x": jnp.array(0.01, jnp.float64),
                                                        "y": jnp.array(0.003, jnp.float64)}], callback=record)
        assert len(res.exits) == 1
        for tree in (res.solutions[0], res.exit_points[0], res.paths[0][-1][1], seen[-1][1]):
            assert {str(x.dtype) for x in jax.tree_util.tree_leaves(tree)} == {"float64"}
        for loss, d in seen[::25]:
            want = float(two_wells(optax.tree.add(origin, d)))
            assert loss == pytest.approx(want, rel=1e-13, abs=1e-300)  # the float64 value, not a float32 one
        assert any(float(np.float32(loss)) != loss for loss, _ in seen)  # values float32 cannot represent
        out = ver.verify_exit(LOSS2, origin, res.paths[0], res.exits[0].iteration,
                              flow=FlowSettings(step_size=0.05, steps=400, record_every=100))
        assert {str(x.dtype) for x in jax.tree_util.tree_leaves((out.finals, out.trajectories))} == {"float64"}
        assert out.final_losses.dtype == np.float64 and np.all(out.final_losses < 1e-12)
