"""TRUST-TECH with dynamic search paths (DSP-TT): multiple local optimal solutions from one.

The method of the DSP-TT paper (Anonymous, 2020, 'Constructing multiple high-quality deep neural networks: a
TRUST-TECH based approach', ICLR 2021 submission). Starting from a local optimal solution (LOS) ``omega0`` (the
*tier-0* solution), DSP-TT keeps several search directions ``d^(k)`` (pytrees shaped like the parameters). At
each search step one direction, chosen at random among those still searching, is advanced (DSP-TT paper,
Algorithm 1):

1. *forward search step* (``Update(model, Delta_k, rho1)``): ``d <- d + rho1(i) * d / |d|``;
2. *exit check* (``CheckExit``) on the mini-batch loss at ``omega0 + d`` — an exponential moving average of the
   losses of that direction and a buffer of up/down states (:class:`~mclandscape.methods.dsp_detector.ExitDetector`);
3. if an exit point was found, a *local solver* (any Optax optimizer,
   :class:`~mclandscape.methods.dsp_detector.LocalSolver`) converges from
   ``omega0 + d`` to a tier-1 solution and the direction retires; otherwise
4. *calibration step* (``Calibrate(model, rho2, Delta_k, batch)``): ``d <- d + rho2 * f(omega0 + d)`` with ``f``
   the negative-gradient dynamics of the paper's eq. 2 (an Optax gradient transformation, ``-grad`` by
   default).

Only one direction enters the computation at a time (the step function takes a single direction), so memory
stays near that of ordinary training plus the stored directions. Everything is computed in the parameters'
dtype (float64 parameters under ``jax_enable_x64`` give float64 steps, losses and ``rho``).

The reading of eq. 3
--------------------
Eq. 3 reads ``d_i = rho1(i) * d_{i-1} + rho2(i) * f(omega0 + d_i)`` with ``rho1(i) in (0, rho_max]`` growing
from 0 by a fixed increment per iteration (0.001 in §5). Taken literally with ``rho1 < 1`` the first term
*shrinks* the direction: at ``i = 1`` the direction is multiplied by 0.001, after which ``d`` sits at
``omega0`` where ``f = 0`` and the search never leaves the tier-0 basin. The text around eq. 3 — "an
exploration step forward along the current direction", a *pace of search step* ``rho1`` that grows until an
exit is found or ``rho_max`` is reached, exit distance highly correlated with ``rho1`` (§5.4) — describes a
search moving outward with a growing step. :class:`~mclandscape.methods.dsp_detector.RhoSchedule` therefore
implements two outward readings (the literal one, which never escapes, is not offered):

- ``"additive"`` (default): ``d_i = d_{i-1} + rho1(i) * d_{i-1}/|d_{i-1}| + rho2 * f(omega0 + d_i')`` — the
  search advances a distance ``rho1(i)`` along the current (calibrated) direction, so the distance travelled
  after ``i`` iterations is about ``increment * i^2 / 2`` (then ``rho_max`` per iteration) independently of
  the scale of ``d_0``. The step is in parameter units, so ``rho_max`` must suit the parameter scale: the
  calibration can only hold the path in a valley while ``rho1 <~ rho2 * |grad|``, and with too large a
  ``rho_max`` the path becomes a straight ray into high loss;
- ``"growth"``: ``d_i = (1 + rho1(i)) * d_{i-1} + rho2 * f(omega0 + d_i')`` — a growth factor ``1 + rho1``.

In both ``f`` is evaluated explicitly at the point after the forward step, ``d_i' = `` forward-stepped
``d_{i-1}`` (eq. 3 writes the implicit ``f(omega0 + d_i)``; Algorithm 1 evaluates it after ``Update``).
``rho2`` is a constant fraction (0.1 in §5) of the tier-0 learning rate
(:func:`~mclandscape.methods.dsp_detector.rho2_from_lr`).

Exit detection (§3.2.1)
-----------------------
The losses of one direction are smoothed by an exponential moving average; each step pushes "up" or "down"
(the sign of the EMA change) into a buffer of the last ``buffer_size`` states. The direction is *climbing* once
the buffer holds at least ``vote`` ups (and the EMA has risen ``min_rise`` above its start), and an *exit* is
declared when, while climbing, the buffer holds at least ``vote`` downs (and the EMA has fallen ``min_drop`` of
its rise below its peak): the loss "decreases steadily", so the search path has crossed the stability boundary
into a neighbouring stability region. The exit point is the point where the exit is declared (already inside
the new region); the EMA peak before it (an estimate of the boundary crossing) is recorded too. On mini-batch
losses a detector can also fire on a noisy plateau; the guards ``min_rise`` / ``min_drop`` (not in the paper)
reduce that.

Tier-by-tier search and verification
------------------------------------
:func:`tier_by_tier`: tier 1 from ``omega0``, tier 2 from the best tier-1 solution (§5.2). Every exit point and
every solution found is checkpointed through :mod:`mclandscape.engine.checkpoint`, and a search restarted with
the same arguments and checkpoint directory resumes where it was killed, producing the same solutions as an
uninterrupted run (the direction chosen and the mini-batch used at global step ``t`` are functions of ``(key,
t)`` and the directions still searching); a checkpoint of another search is refused with the engine's
:class:`~mclandscape.engine.loop.ResumeMismatchError`. Whether an exit point really separates two optima (§5.1,
Figure 3c) is measured by :func:`mclandscape.methods.verification.verify_exit`.

The engine under the search
---------------------------
Every loss here is the library's one objective protocol ``objective(params, batch, key) -> (loss, aux)``
(:func:`~mclandscape.core.objective.make_objective` of a model, or
:func:`~mclandscape.core.objective.function_objective` of an analytic potential); the search and the exit check
use its value ``loss`` (L2 included). Batches come from any random-access stream ``t -> batch``
(:func:`mclandscape.engine.data.batch_stream`, or a constant full batch).

- The search (:func:`dsp_search`) is a pytree :class:`~mclandscape.methods.dsp_step.SearchState` (all
  directions stacked, their calibration states and exit detectors) and one module-level jitted step that
  advances the chosen direction, runs the exit check in the graph and freezes the search after an exit until
  the host has run its local solver. The host chooses the direction of each step and reads the steps' losses
  only every ``DSPConfig.sync_every`` steps and at checkpoints. A second search with the same objective and
  shapes compiles nothing.
- The local solver (:func:`~mclandscape.methods.dsp_step.local_solve`) is the engine's loop
  (:func:`~mclandscape.engine.loop.make_step` and :func:`~mclandscape.engine.loop.run`); its ``grad_tol`` is
  tested inside the compiled step after every step. A non-finite loss or gradient raises the engine's
  :class:`~mclandscape.engine.loop.NonFiniteError`.
- Devices and processes: ``devices`` (default all of the job's) puts the search step and the local solves on
  the engine's data-parallel mesh (:func:`~mclandscape.engine.distributed.training_mesh`): batches split over
  the ``data`` axis, everything else replicated; the results are equal on every process.
- Progress and callbacks follow the engine's trainers: ``progress=None`` shows a tqdm bar only when stderr is
  a terminal, and the search's callback gets the 1-based count of search steps done.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from orbax.checkpoint.checkpoint_managers import LatestN
from tqdm.auto import tqdm

from mclandscape.core._checks import integer
from mclandscape.core.tree import PyTree, check_finite, tree_cosine, tree_distance, tree_index, tree_stack
from mclandscape.engine import distributed
from mclandscape.engine.checkpoint import CheckpointStore, jsonable
from mclandscape.engine.loop import progress_enabled
from mclandscape.engine.resume import ResumeMismatchError, fingerprint_diff
from mclandscape.engine.step import make_step, split_static
from mclandscape.methods.dsp_detector import BatchFn, DSPConfig, ExitRecord, LocalSolver, Objective, TierResult, _kind
from mclandscape.methods.dsp_step import (
    NEGATIVE_GRADIENT,
    SearchState,
    _batch_mesh,
    _check_directions,
    _fingerprint,
    _float_dtype,
    _search_step_jit,
    initial_directions,
    local_solve,
)

__all__ = ["dsp_search", "tier_by_tier", "exit_statistics"]

_TRACE = ("iteration", "step", "loss", "ema", "rho1", "norm")


def _host(x) -> float:
    return float(distributed.to_host(x))


class _Driver:
    """The host side of one tier: chooses the direction of every step (a function of ``(key, t)`` and the
    directions still searching), dispatches the compiled step, and every ``sync_every`` steps (or at a
    checkpoint) reads the steps' losses, records them and runs the local solver of an exit."""

    store: CheckpointStore | None = None
    fingerprint: dict | None = None

    def __init__(self, objective, origin, key, config, batch_fn, solver, calibration, dirs, tier, callback,
                 progress, devices):
        self.origin, self.config, self.batch_fn, self.tier, self.callback = origin, config, batch_fn, tier, callback
        self.initial, self.progress = dirs, progress
        self.solve = functools.partial(local_solve, objective, solver=solver, batch_fn=batch_fn, progress=progress,
                                       devices=devices)
        mesh = _batch_mesh(batch_fn(0), devices)
        # with a mesh the search's own arrays live on it (global, replicated) between steps; what leaves the
        # search (callback, result, local solves) is made process-local with distributed.local
        self.place = (lambda tree: tree) if mesh is None else functools.partial(distributed.replicate, m=mesh)
        # the engine's data-parallel layout: batch split, everything else replicated
        self.place_batch = (lambda b: b) if mesh is None else make_step(objective, NEGATIVE_GRADIENT, mesh=mesh).place
        self.origin_p = self.place(origin)
        self.dtype = _float_dtype(origin)  # rho1 and rho2 enter the step in the parameters' dtype
        self.paths = [collections.deque(maxlen=config.record_path) for _ in dirs] if config.record_path else []
        static, arrays = split_static(objective)  # the objective's static configuration and its arrays, once
        arrays, loss_key, rho2 = self.place((arrays, jax.random.fold_in(key, 0x5EA),
                                             np.asarray(config.rho.rho2, self.dtype)))
        self.step = functools.partial(
            _search_step_jit, objective_static=static, calibration=calibration, reading=config.rho.reading,
            detector=config.detector, mesh=mesh, with_d=bool(self.paths or callback), objective_arrays=arrays,
            origin=self.origin_p, key=loss_key, rho2=rho2)
        self.state = self.place(SearchState(
            t=jnp.zeros((), jnp.int32), dirs=tree_stack(dirs), cal=tree_stack(
                [calibration.init(optax.tree.add(origin, d)) for d in dirs]),
            det=config.detector.init(jnp.result_type(self.dtype, jnp.float32), len(dirs)),
            pending=jnp.full((), -1, jnp.int32), bad=jnp.array(False)))
        self.solver_key = jax.random.fold_in(key, 0x501)
        self.sel_seed = int(jax.random.randint(jax.random.fold_in(key, 0x5E1), (), 0, 2**31 - 1))
        self.t, self.counts, self.failed, self.exits, self.solutions = 0, [0] * len(dirs), [], [], []
        self.traces = [{name: [] for name in _TRACE} for _ in dirs]
        self.pending = None  # (ExitRecord, exit point) of an exit awaiting its local solve

    def active(self) -> list[int]:
        """The directions still searching: neither exited nor abandoned."""
        done = set(self.failed) | {e.direction for e in self.exits}
        return [k for k in range(len(self.counts)) if k not in done]

    def block(self, bar) -> None:
        """Dispatch the steps up to the next sync point, then commit those that ran (up to an exit, after which
        the compiled step froze the search; a non-finite loss froze it too and is raised here)."""
        cfg, start, rho = self.config, self.t, self.config.rho
        end = min(cfg.max_steps, *((start // n + 1) * n for n in (cfg.sync_every, cfg.checkpoint_every) if n))
        active, counts, planned = self.active(), list(self.counts), []
        for t in range(start, end):
            if not active:
                break
            k = active[int(np.random.default_rng([self.sel_seed, t]).integers(len(active)))]  # f(key, t, active)
            counts[k] += 1
            kk, rho1 = self.place((np.int32(k), np.asarray(rho.rho1(counts[k]), self.dtype)))
            self.state, out = self.step(state=self.state, batch=self.place_batch(self.batch_fn(t)), k=kk, rho1=rho1)
            planned.append((t, k, counts[k], out))
            if cfg.max_iterations is not None and counts[k] >= cfg.max_iterations:
                active.remove(k)
        host = distributed.to_host([{n: v for n, v in out.items() if n != "d"} for *_, out in planned])
        for (t, k, i, out), h in zip(planned, host, strict=True):
            if not bool(h["valid"]):  # after a non-finite loss (an exit ends the commits below)
                raise ValueError(f"non-finite loss {float(h['loss'])} on the search path (direction {k}, "
                                 f"iteration {i}); the search diverged - lower RhoSchedule.rho_max / "
                                 "increment or the calibration step")
            exited = self.commit(t, k, i, out, h)
            bar.update(1)
            bar.set_postfix(loss=f"{float(h['loss']):.4g}", exits=len(self.exits), active=len(self.active()))
            if exited:
                break

    def commit(self, t: int, k: int, i: int, out: dict, h: dict) -> bool:
        cfg = self.config
        rec = {"iteration": i, "step": t, "loss": float(h["loss"]), "ema": float(h["ema"]), "rho1": cfg.rho.rho1(i),
               "norm": float(h["norm"])}
        self.t, self.counts[k] = t + 1, i
        for name in _TRACE:
            self.traces[k][name].append(rec[name])
        d = distributed.local(out["d"]) if "d" in out else None
        if self.paths:
            self.paths[k].append((i, d))
        exited = bool(h["exited"])
        if exited:  # the exit point is checkpointed before its local solve
            det = jax.tree_util.tree_map(lambda a: a[k], distributed.to_host(self.state.det))
            fwd = tree_index(self.state.dirs, k)
            record = ExitRecord(direction=k, step=t, iteration=i, rho1=rec["rho1"], distance=rec["norm"],
                                loss=rec["loss"], ema=float(det.ema), base_ema=float(det.base), peak_ema=float(det.peak),
                                peak_iteration=int(det.peak_iteration),
                                cosine_to_initial=_host(tree_cosine(fwd, self.place(self.initial[k]))))
            self.pending = (record, distributed.local(optax.tree.add(self.origin_p, fwd)))
            self.save("exit")
            self.solve_pending()
        elif cfg.max_iterations is not None and i >= cfg.max_iterations:
            self.failed.append(k)
        if not exited and cfg.checkpoint_every and self.t % cfg.checkpoint_every == 0:
            self.save("periodic")
        if self.callback is not None:  # the count of steps done (1-based); info["step"] the 0-based index
            self.callback(self.t, rec | {"direction": k, "exited": exited, "d": d, "tier": self.tier})
        return exited

    def solve_pending(self) -> None:
        record, point = self.pending
        sol, info = self.solve(point, key=jax.random.fold_in(self.solver_key, record.direction))
        sol_p = self.place(sol)
        self.exits.append(dataclasses.replace(
            record, solution_loss=info["loss"], solver_steps=info["steps"],
            solution_distance=_host(tree_distance(sol_p, self.origin_p)),
            exit_to_solution=_host(tree_distance(sol_p, self.place(point)))))
        self.solutions.append(sol)
        self.pending = None
        self.state = self.state.replace(pending=self.place(jnp.full((), -1, jnp.int32)))
        self.save("solution")

    def run(self) -> TierResult:
        if self.pending is not None:
            self.solve_pending()
        with tqdm(total=self.config.max_steps, initial=self.t, disable=not progress_enabled(self.progress),
                  leave=False, desc=f"DSP-TT tier {self.tier}", unit="step", dynamic_ncols=True) as bar:
            while self.active() and self.t < self.config.max_steps:
                self.block(bar)
        if self.active():
            self.failed.extend(self.active())
            self.save("end")
        points = [distributed.local(optax.tree.add(self.origin_p, tree_index(self.state.dirs, e.direction)))
                  for e in self.exits]  # a retired direction keeps its exit point's forward step
        return TierResult(origin=self.origin, solutions=self.solutions, exits=self.exits, traces=self.traces,
                          failed=sorted(self.failed), steps=self.t, paths=[list(p) for p in self.paths],
                          exit_points=points)

    # -- checkpoints: the state, the solutions and a pending exit point; the host's records as metadata ------

    def tree(self, solutions: list, pending) -> dict:
        tree = {"state": self.state} | {f"sol{j}": self.place(s) for j, s in enumerate(solutions)}
        return tree if pending is None else tree | {"pending": self.place(pending)}

    def save(self, kind: str) -> None:
        if self.store is None:
            return
        meta = {"kind": kind, "fingerprint": self.fingerprint, "t": self.t, "counts": self.counts,
                "failed": self.failed, "traces": self.traces, "exits": [e.to_json() for e in self.exits],
                "num_solutions": len(self.solutions),
                "pending": None if self.pending is None else self.pending[0].to_json()}
        self.store.save(self.t, self.tree(self.solutions, self.pending and self.pending[1]), meta, overwrite=True)

    def restore(self, directory) -> None:
        meta = self.store.metadata()
        diff = fingerprint_diff(meta.get("fingerprint"), jsonable(self.fingerprint))
        if diff:
            raise ResumeMismatchError(f"checkpoint in {directory!r} belongs to a different search ("
                                      + "; ".join(diff) + "); use a fresh directory")
        n, pending = int(meta["num_solutions"]), meta["pending"]
        tree, _ = self.store.restore(target=self.tree([self.origin] * n, None if pending is None else self.origin))
        self.state = self.place(tree["state"])
        self.solutions = [distributed.local(tree[f"sol{j}"]) for j in range(n)]
        self.t, self.counts, self.traces = int(meta["t"]), list(meta["counts"]), meta["traces"]
        self.failed, self.exits = [int(f) for f in meta["failed"]], [ExitRecord(**e) for e in meta["exits"]]
        if pending is not None:
            self.pending = (ExitRecord(**pending), distributed.local(tree["pending"]))


def dsp_search(objective: Objective, origin: PyTree, key: jax.Array, *, config: DSPConfig, batch_fn: BatchFn,
               solver: LocalSolver, calibration: optax.GradientTransformation | None = None,
               directions: Sequence[PyTree] | None = None, checkpoint_dir: str | None = None, tier: int = 1,
               callback: Callable[[int, dict], None] | None = None, progress: bool | None = None,
               devices: int | None = None) -> TierResult:
    """One tier of DSP-TT search from ``origin`` (DSP-TT paper, Algorithm 1 with eq. 3).

    The directions, their calibration states and exit detectors are one :class:`SearchState`; one compiled
    step (a module-level ``jax.jit``) advances the direction the host chose, evaluates the exit check in the
    graph and freezes the search after an exit (or a non-finite loss) until the host has seen it. The host
    reads the steps' losses every ``config.sync_every`` steps and at every checkpoint.

    With ``checkpoint_dir`` the state is saved at every exit point, every solution and every
    ``config.checkpoint_every`` steps (only the latest state is kept), and an existing checkpoint there is
    resumed — a killed search restarted with the same arguments ends with the same result as an uninterrupted
    one (recorded ``paths`` restart empty). A checkpoint of another search (origin, key, configuration,
    objective's arrays, directions, solver, calibration or data differ) is refused with
    :class:`~mclandscape.engine.loop.ResumeMismatchError` naming every difference.

    With several devices (``devices``, default all of the job's, across processes) the search step and the
    local solves run data-parallel on the engine's training mesh
    (:func:`~mclandscape.engine.distributed.training_mesh` of the batch size, the leading dimension of the
    first leaf of ``batch_fn(0)``): each batch is split over the mesh's ``data`` axis, the rest is replicated.
    The numbers equal one device's up to the order of the loss and gradient reductions. Everything returned
    is a process-local value and every number a host value, equal on every process.

    Args:
      objective: ``objective(params, batch, key) -> (loss, aux)`` (:mod:`mclandscape.core.objective`); its
        value on the mini-batch ``batch_fn(t)`` of global step ``t`` (key ``fold_in(key', t)``) is what the
        exit detector sees and the calibration differentiates.
      origin: the tier-0 (or tier-n) solution ``omega0``.
      key: drives the random initial directions, the choice of direction per step and the objective's keys.
      config: a :class:`~mclandscape.methods.dsp_detector.DSPConfig`.
      batch_fn: the search's batches ``t -> batch`` (random access, e.g.
        :func:`mclandscape.engine.data.batch_stream`; resuming replays nothing).
      solver: the :class:`~mclandscape.methods.dsp_detector.LocalSolver` run from every exit point.
      calibration: the dynamics ``f`` (an Optax gradient transformation returning the descent direction at
        unit step), default ``optax.scale(-1.0)`` i.e. ``f = -grad`` (DSP-TT paper, eq. 2 with ``R = I``).
      directions: overrides the ``config.num_directions`` random initial directions.
      checkpoint_dir: where the search checkpoints and resumes (``None``: no checkpoints).
      tier: the tier number (recorded, and part of the checkpoint's fingerprint).
      callback: ``callback(count, info)`` for every search step, in order, when the host reads it (at the
        block's sync), ``count`` the number of search steps done (1-based, counting the steps before a
        resume). ``info``: ``step`` (the 0-based global index, ``count - 1``, the numbering of
        ``ExitRecord.step`` and of the traces), tier, direction, iteration (of that direction), loss, ema,
        rho1, norm, exited, ``d`` (the direction after the forward step). It runs after the exit's local solve.
      progress: a tqdm bar over the search steps, passed on to the local solves (``None``: only when stderr is
        a terminal, as every trainer).
      devices: how many of the job's devices the search step and the local solves use (default all, across
        processes; ``1``: one device).

    Returns:
      A :class:`~mclandscape.methods.dsp_detector.TierResult`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mclandscape.core.objective import function_objective
      >>> from mclandscape.methods.potentials import double_well
      >>> from mclandscape.methods.dsp_detector import ExitDetector, RhoSchedule
      >>> cfg = DSPConfig(num_directions=1, rho=RhoSchedule(2e-2, 1.0, 0.01), detector=ExitDetector(0.5, 3, 1.0),
      ...                 max_steps=100)
      >>> res = dsp_search(function_objective(double_well), jnp.array([-1.0, 0.0]), jax.random.key(0), config=cfg,
      ...                  batch_fn=lambda t: None, solver=LocalSolver(optax.sgd(0.1), 100, grad_tol=1e-4),
      ...                  directions=[jnp.array([0.1, 0.02])])
      >>> len(res.exits), [round(float(x), 3) for x in res.solutions[0]]  # from (-1, 0) to the other well
      (1, [1.0, 0.0])
    """
    _kind(isinstance(config, DSPConfig), "config", "a DSPConfig", config)
    _kind(isinstance(solver, LocalSolver), "solver", "a LocalSolver", solver)
    _kind(callable(objective), "objective", "callable (params, batch, key) -> (loss, aux)", objective)
    _kind(callable(batch_fn), "batch_fn", "a callable t -> batch", batch_fn)
    distributed.num_devices(devices)
    check_finite(origin, "origin")
    calibration = calibration if calibration is not None else NEGATIVE_GRADIENT
    _kind(isinstance(calibration, optax.GradientTransformation), "calibration",
                "an optax GradientTransformation", calibration)
    dirs = (initial_directions(key, origin, config.num_directions, config.init_norm) if directions is None
            else _check_directions(list(directions), origin))
    driver = _Driver(objective, origin, key, config, batch_fn, solver, calibration, dirs, tier, callback, progress,
                     devices)
    if checkpoint_dir is None:
        return driver.run()
    driver.fingerprint = _fingerprint(objective, origin, key, config, tier, solver, calibration, directions,
                                      batch_fn)
    # orbax keeps only the latest state
    driver.store = CheckpointStore(checkpoint_dir, create=True, preservation_policy=LatestN(1))
    try:
        if driver.store.latest_step() is not None:
            driver.restore(checkpoint_dir)
        return driver.run()
    finally:
        driver.store.close()


# ---------------------------------------------------------------------------------------------------------
# tier-by-tier search (§5.2)
# ---------------------------------------------------------------------------------------------------------


def tier_by_tier(objective: Objective, origin: PyTree, key: jax.Array, *, config: DSPConfig, batch_fn: BatchFn,
                 solver: LocalSolver, score_fn: Callable[[PyTree], float], tiers: int = 2,
                 calibration: optax.GradientTransformation | None = None, checkpoint_dir: str | None = None,
                 callback: Callable[[int, dict], None] | None = None, progress: bool | None = None,
                 devices: int | None = None) -> list[TierResult]:
    """Tier-by-tier DSP-TT (DSP-TT paper, §5.2): tier 1 from ``origin``; tier ``n+1`` from the best tier-``n``
    solution, the one with the lowest ``score_fn(params)`` (e.g. loss on the training or a validation set).

    Each tier is a :func:`dsp_search` (same ``objective``, ``config``, ``batch_fn``, ``solver``,
    ``calibration``, ``callback``, ``progress``, ``devices``; key ``fold_in(key, n)``) that checkpoints into
    ``checkpoint_dir/tier<n>`` and resumes from there.

    Args:
      objective: ``objective(params, batch, key) -> (loss, aux)``.
      origin: the tier-0 solution.
      key: the base key (tier ``n`` searches with ``fold_in(key, n)``).
      config: the :class:`DSPConfig` of every tier.
      batch_fn: the search's batches ``t -> batch``.
      solver: the :class:`LocalSolver` of every exit point.
      score_fn: ``score_fn(params) -> float``; the lowest-scoring solution of a tier is the next tier's origin
        (its value is brought to the host with ``float``).
      tiers: how many tiers (``>= 1``).
      calibration: the dynamics ``f`` (default ``-grad``), as for :func:`dsp_search`.
      checkpoint_dir: the root of the tiers' checkpoint directories (``None``: no checkpoints).
      callback: ``callback(count, info)`` after every search step of every tier; ``count`` is 1-based within
        a tier's search and ``info["tier"]`` names the tier (:func:`dsp_search`).
      progress: a tqdm bar over each tier's search steps and its local solves (``None``: only when stderr is a
        terminal).
      devices: how many of the job's devices to run on (default all, across processes; ``1``: one device).

    Returns:
      One :class:`TierResult` per tier.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mclandscape.core.objective import function_objective
      >>> from mclandscape.methods.potentials import double_well
      >>> from mclandscape.methods.dsp_detector import ExitDetector, RhoSchedule
      >>> cfg = DSPConfig(num_directions=2, rho=RhoSchedule(2e-2, 0.1, 0.01), detector=ExitDetector(0.5, 3, 1.0),
      ...                 init_norm=0.1, max_steps=200)
      >>> tiers = tier_by_tier(function_objective(double_well), jnp.array([-1.0]), jax.random.key(0), config=cfg,
      ...                      batch_fn=lambda t: None, solver=LocalSolver(optax.sgd(0.05), 200),
      ...                      score_fn=lambda p: -float(p[0]), tiers=2)  # tier 2 from the solution of largest x
      >>> len(tiers), [round(float(x), 2) for x in tiers[1].origin]
      (2, [1.0])
    """
    tiers = integer(tiers, "tiers", low=1)
    results: list[TierResult] = []
    start = origin
    for n in range(1, tiers + 1):
        sub = None if checkpoint_dir is None else f"{checkpoint_dir}/tier{n}"
        res = dsp_search(objective, start, jax.random.fold_in(key, n), config=config, batch_fn=batch_fn,
                         solver=solver, calibration=calibration, checkpoint_dir=sub, tier=n, callback=callback,
                         progress=progress, devices=devices)
        results.append(res)
        if n == tiers:
            break
        if not res.solutions:
            raise ValueError(f"tier {n} found no exit point in {res.steps} steps, so tier {n + 1} has no "
                             "origin; raise DSPConfig.max_steps or rho_max")
        scores = [float(score_fn(s)) for s in res.solutions]
        start = res.solutions[int(np.argmin(scores))]
    return results


def exit_statistics(result: TierResult) -> dict:
    """Summary of a tier's exits (DSP-TT paper, §5.4 quantities): counts, iterations / rho1 / distance at exit."""
    out = {"directions": len(result.traces), "exits": len(result.exits), "failed": list(result.failed),
           "search_steps": result.steps}
    for name in ("iteration", "rho1", "distance", "solution_distance", "cosine_to_initial"):
        vals = [getattr(e, name) for e in result.exits]
        out["mean_iterations" if name == "iteration" else f"mean_{name}"] = float(np.mean(vals)) if vals else None
    return out | {"per_exit": [e.to_json() for e in result.exits]}
