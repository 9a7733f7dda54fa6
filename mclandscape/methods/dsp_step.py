"""DSP-TT's compiled search step and local solver (DSP-TT paper, Algorithm 1 lines 7-13, eq. 3).

The pieces :func:`mclandscape.methods.trusttech.dsp_search` drives: the random initial directions, the forward
step of each reading of eq. 3, the search's pytree state
(:class:`SearchState`) and its one module-level jitted step (the exit check evaluated in the graph), and the
local solver on the engine's loop (:func:`local_solve`, ``grad_tol`` tested in the graph).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mclandscape.core._checks import choice, integer, real
from mclandscape.core.objective import call_objective, check_objective
from mclandscape.core.tree import (
    PyTree,
    check_finite,
    check_same_structure,
    tree_digest,
    tree_index,
    tree_norm,
    tree_random_normal,
)
from mclandscape.engine import cpu, distributed, optim
from mclandscape.engine.distributed import training_mesh
from mclandscape.engine.loop import LoopConfig, NonFiniteError, StopRun, run
from mclandscape.engine.step import make_step, merge_static, split_static
from mclandscape.methods.dsp_detector import READINGS, BatchFn, DetectorState, DSPConfig, LocalSolver, Objective, _kind

__all__ = ["SearchState", "initial_directions", "forward_step", "local_solve", "NEGATIVE_GRADIENT"]


NEGATIVE_GRADIENT = optax.scale(-1.0)  # f = -grad c (DSP-TT paper, eq. 2 with R = I)


# ---------------------------------------------------------------------------------------------------------
# search directions and one step
# ---------------------------------------------------------------------------------------------------------


def _float_dtype(tree: PyTree):
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    return np.dtype(jnp.result_type(*leaves)) if leaves else np.dtype(jnp.result_type(float))


def initial_directions(key: jax.Array, origin: PyTree, num: int, norm: float = 1e-2) -> list[PyTree]:
    """``num`` random (standard-normal) initial directions shaped like ``origin``, each scaled to ``norm``.

    Args:
      key: a PRNG key (direction ``k`` depends on ``(key, k)`` only).
      origin: the pytree whose structure, shapes and dtypes the directions take.
      num: how many.
      norm: their Euclidean norm.

    Returns:
      A list of ``num`` pytrees.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> dirs = initial_directions(jax.random.key(0), {"w": jnp.zeros(4)}, 2, norm=0.5)
      >>> [round(float(tree_norm(d)), 4) for d in dirs]
      [0.5, 0.5]
    """
    real(norm, "direction norm", low=0.0, low_open=True)
    dirs = [tree_random_normal(jax.random.fold_in(jax.random.fold_in(key, 0x7D1), k), origin)
            for k in range(integer(num, "number of directions", low=1))]
    return [optax.tree.scale(norm / tree_norm(d), d) for d in dirs]


def _check_directions(directions: list[PyTree], origin: PyTree) -> list[PyTree]:
    if len(directions) == 0:
        raise ValueError("no search directions given (need at least one)")
    for k, d in enumerate(directions):
        check_same_structure(origin, d, names=("origin", f"direction[{k}]"))
        check_finite(d, f"direction[{k}]")
        if float(tree_norm(d)) == 0.0:
            raise ValueError(f"direction[{k}] is the zero vector: a search direction needs a nonzero norm")
    return directions


def forward_step(direction: PyTree, rho1, reading: str = "additive") -> PyTree:
    """The forward search step of one reading of the DSP-TT paper's eq. 3 (module docstring).

    Args:
      direction: the current direction ``d``.
      rho1: the forward step of this iteration.
      reading: ``"additive"`` (``d + rho1 d / |d|``) or ``"growth"`` (``(1 + rho1) d``).

    Returns:
      The direction after the forward step.

    Example:
      >>> import jax.numpy as jnp
      >>> [float(x) for x in forward_step(jnp.array([3.0, 4.0]), 0.5)]  # half a unit further along d
      [3.299999952316284, 4.400000095367432]
    """
    if choice(reading, "reading", READINGS) == "growth":
        return optax.tree.scale(1.0 + rho1, direction)
    return optax.tree.add_scale(direction, rho1 / tree_norm(direction), direction)


@struct.dataclass
class SearchState:
    """Everything a DSP-TT search carries from one step to the next, for all its directions (a pytree).

    Attributes:
      t: the global search step (int32).
      dirs: the directions, stacked (leaves ``[num, ...]``).
      cal: their calibration states, stacked.
      det: their :class:`~mclandscape.methods.dsp_detector.DetectorState`, stacked.
      pending: the direction whose exit awaits its local solve (``-1``: none); while set, steps change nothing.
      bad: whether a step met a non-finite loss (that step and the later ones changed nothing).
    """

    t: jax.Array
    dirs: PyTree
    cal: PyTree
    det: DetectorState
    pending: jax.Array
    bad: jax.Array


def _set(stacked: PyTree, k, value: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda a, v: a.at[k].set(v), stacked, value)


def _search_step_impl(objective_static, calibration, reading, detector, mesh, with_d, objective_arrays,
                      state: SearchState, origin, batch, key, k, rho1, rho2):
    objective = merge_static(objective_static, objective_arrays)
    cs = tree_index(state.cal, k)
    # one DSP iteration (Algorithm 1 lines 7, 8, 13; eq. 3): the forward step, the loss there (what the exit
    # check sees) and the calibration d_forward + rho2 * f(origin + d_forward)
    fwd = forward_step(tree_index(state.dirs, k), rho1, reading)
    point = optax.tree.add(origin, fwd)
    (loss, _), grads = jax.value_and_grad(functools.partial(call_objective, objective), has_aux=True)(
        point, batch, jax.random.fold_in(key, state.t))
    f, new_cs = calibration.update(grads, cs, point)
    cal = optax.tree.add_scale(fwd, rho2, f)
    det, exited = detector.update(tree_index(state.det, k), loss)
    go = (state.pending < 0) & ~state.bad & jnp.isfinite(loss)  # a pending exit or a bad loss freezes the search
    # at an exit the direction keeps its forward step and its calibration state (Algorithm 1, lines 9-11)
    new = state.replace(t=state.t + 1, dirs=_set(state.dirs, k, _where(exited, fwd, cal)),
                        cal=_set(state.cal, k, _where(exited, cs, new_cs)), det=_set(state.det, k, det),
                        pending=jnp.where(exited, k, -1).astype(jnp.int32))
    new = _where(go, new, state.replace(bad=state.bad | ((state.pending < 0) & ~jnp.isfinite(loss))))
    # loss and |d| in their own (promoted) dtype: float64 parameters keep float64 losses
    out = {"valid": go, "exited": go & exited, "loss": loss, "ema": det.ema, "norm": tree_norm(fwd)}
    if with_d:  # only when a path is recorded or a callback sees it: a block holds one per step until its sync
        out["d"] = fwd
    if mesh is not None:  # the batch was split over the mesh's data axis: one result, the same on every device
        new, out = jax.lax.with_sharding_constraint((new, out), NamedSharding(mesh, P()))
    return new, out


# one module-level jit: the objective's configuration, the calibration, the reading, the detector and the mesh
# are static (hashable), the objective's arrays, the state, the direction index and rho1 / rho2 are traced
_search_step_jit = jax.jit(_search_step_impl, static_argnames=(
    "objective_static", "calibration", "reading", "detector", "mesh", "with_d"), compiler_options=cpu.COMPILER_OPTIONS)


def _where(cond, a: PyTree, b: PyTree) -> PyTree:
    """``a`` where the scalar ``cond`` holds, else ``b``, leaf by leaf (traceable)."""
    return jax.tree_util.tree_map(lambda x, y: jnp.where(cond, x, y), a, b)


# ---------------------------------------------------------------------------------------------------------
# devices (the engine's data-parallel training mesh)
# ---------------------------------------------------------------------------------------------------------


def _batch_mesh(batch, devices: int | None) -> jax.sharding.Mesh | None:
    """The engine's training mesh (:func:`~mclandscape.engine.distributed.training_mesh`) for batches like
    ``batch``: its size is the leading dimension of the batch's first leaf; ``None`` (one device) for one device
    or a batch without an array leading it (``None``, scalars, non-array leaves)."""
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves or not isinstance(leaves[0], jax.Array | np.ndarray) or np.ndim(leaves[0]) == 0:
        return None
    size = int(np.shape(leaves[0])[0])
    return training_mesh(size, devices=devices) if size >= 1 else None


# ---------------------------------------------------------------------------------------------------------
# the local solver (the engine's loop; grad_tol checked in the graph)
# ---------------------------------------------------------------------------------------------------------


class _SolveState(NamedTuple):
    inner: Any
    done: jax.Array  # a step met grad_tol: the later steps apply nothing
    steps: jax.Array  # steps applied
    loss: jax.Array  # the objective's value of the last step applied, at the parameters before its update
    grad_norm: jax.Array
    params: PyTree  # the parameters before the last step applied (for its task loss)


def _until_converged(tx, grad_tol: float | None) -> optax.GradientTransformationExtraArgs:
    """``tx`` until the first step whose gradient norm is below ``grad_tol`` (that step's update applied), then
    zero updates: the stopping test runs inside the compiled step, the host looks only at epoch ends."""
    inner = optax.with_extra_args_support(optim.unwrap(tx))

    def init(params):
        nan = jnp.full((), jnp.nan, _float_dtype(params))
        return _SolveState(inner.init(params), jnp.array(False), jnp.zeros((), jnp.int32), nan, nan, params)

    def update(grads, state, params=None, **extra_args):
        updates, inner_state = inner.update(grads, state.inner, params, **extra_args)
        norm, live = optax.tree.norm(grads), ~state.done
        loss = jnp.asarray(extra_args["loss"]).astype(state.loss.dtype)
        done = state.done | (norm < grad_tol) if grad_tol is not None else state.done
        new = _SolveState(inner_state, done, state.steps + 1, loss, norm.astype(state.grad_norm.dtype), params)
        # once converged the state stays and the updates are zero
        return jax.tree_util.tree_map(lambda u: jnp.where(live, u, jnp.zeros_like(u)), updates), _where(live, new, state)

    return optax.GradientTransformationExtraArgs(init, update)


def _task_loss_impl(objective_static, objective_arrays, params, batch, key):
    loss, aux = call_objective(merge_static(objective_static, objective_arrays), params, batch, key)
    return aux["loss"] if isinstance(aux, Mapping) and "loss" in aux else loss


_task_loss = jax.jit(_task_loss_impl, static_argnames=("objective_static",))


def local_solve(objective: Objective, params: PyTree, solver: LocalSolver, batch_fn: BatchFn, key: jax.Array, *,
                progress: bool | None = None, devices: int | None = None) -> tuple[PyTree, dict]:
    """Run the local solver from ``params`` (an exit point) on the engine's loop.

    :func:`~mclandscape.engine.loop.make_step` of ``objective`` and ``solver.optimizer``, run by
    :func:`~mclandscape.engine.loop.run` for at most ``solver.steps`` steps over ``solver.batch_fn or
    batch_fn`` (batch ``t`` at step ``t``, dropout key ``fold_in(key, t)``). ``solver.grad_tol`` is tested
    inside the compiled step, after every step, on that step's gradient norm (taken at the parameters before
    its update): the first step below it applies its update and every later step applies nothing; the loop
    looks every ``solver.check_every`` steps and ends the run once the solver has converged.

    With several devices the steps run data-parallel as :func:`mclandscape.engine.train.train_model`'s do:
    ``make_step(..., mesh=training_mesh(batch_size, devices=devices))``, each batch split over the mesh's
    ``data`` axis (``batch_size`` the leading dimension of the first leaf of batch 0), the state replicated, one
    update the same on every device; the result equals one device's up to the order of the gradient's
    reduction. Batches without an array leading them (``None``, scalars) run on one device.

    Args:
      objective: ``objective(params, batch, key) -> (loss, aux)``.
      params: the starting point.
      solver: a :class:`~mclandscape.methods.dsp_detector.LocalSolver`.
      batch_fn: the batches when ``solver.batch_fn`` is ``None``.
      key: the base key of the steps.
      progress: a tqdm bar (``None``: only when stderr is a terminal, as every trainer).
      devices: how many of the job's devices to train on (default all, across processes; ``1``: one device).

    Returns:
      ``(solution, info)``: ``solution`` a process-local value (replicated arrays on this process's devices, as
      :func:`~mclandscape.engine.loop.run` returns them); ``info``: ``steps`` (steps applied), ``loss`` (the
      objective's value on the last applied step's batch, at the parameters before its update), ``task_loss``
      (the task loss the objective reports in ``aux["loss"]``, without L2; equal to ``loss`` when it reports
      none) and ``grad_norm`` (of that step).

    Raises:
      NonFiniteError: the loss or the gradient became non-finite (the solver diverged).
      ValueError: a bad ``solver``, ``batch_fn`` or ``devices``, or an objective off the protocol.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mclandscape.core.objective import function_objective
      >>> obj = function_objective(lambda p, b: 0.5 * jnp.sum(p ** 2))  # gradient norm halves every step
      >>> sol, info = local_solve(obj, jnp.array([0.6, 0.8]), LocalSolver(optax.sgd(0.5), 100, grad_tol=0.01),
      ...                         lambda t: None, jax.random.key(0), progress=False)
      >>> info["steps"], [round(float(x), 5) for x in sol]  # stopped after step 8: 0.5**7 < 0.01
      (8, [0.00234, 0.00313])
    """
    _kind(isinstance(solver, LocalSolver), "solver", "a LocalSolver", solver)
    batches = solver.batch_fn or batch_fn
    _kind(callable(batches), "batch_fn", "a callable t -> batch", batches)
    distributed.num_devices(devices)
    first = batches(0)
    check_objective(objective, params, first, key)
    tx = optim.transform(_until_converged, solver.optimizer, solver.grad_tol)
    step = make_step(objective, tx, mesh=_batch_mesh(first, devices))
    every = min(solver.check_every, solver.steps)
    epochs = -(-solver.steps // every)

    def converged(epoch, state, history):
        if bool(distributed.to_host(state.opt_state.done)):
            raise StopRun

    try:
        res = run(step, step.init(params), batches, epochs=epochs, steps_per_epoch=every, max_steps=solver.steps,
                  key=key, config=LoopConfig(progress=progress, desc="local solve"), callbacks=[converged])
    except NonFiniteError as e:
        raise NonFiniteError(f"the local solver diverged ({e}); lower its learning rate") from e
    s = res.state.opt_state
    n = int(distributed.to_host(s.steps))
    task = _task_loss(*split_static(objective), s.params, batches(n - 1), jax.random.fold_in(key, n - 1))
    loss, norm, task = (float(distributed.to_host(v)) for v in (s.loss, s.grad_norm, task))
    return res.params, {"steps": n, "loss": loss, "task_loss": task, "grad_norm": norm}


# ---------------------------------------------------------------------------------------------------------
# one tier of search (Algorithm 1): the host driver around the compiled step
# ---------------------------------------------------------------------------------------------------------


def _probe_digest(tx) -> str:
    """A digest of what ``tx`` does (three updates of a fixed probe), so a resume with another optimizer or
    calibration is refused whatever object was passed."""
    tx = optax.with_extra_args_support(optim.unwrap(tx))
    p, out = jnp.linspace(-1.0, 1.0, 7), []
    state = tx.init(p)
    for i in range(3):
        u, state = tx.update(jnp.cos(p * (i + 1.0)), state, p, loss=jnp.float32(1.0), value=jnp.float32(1.0))
        p = optax.apply_updates(p, u)
        out.append(p)
    return tree_digest(out)


def _fingerprint(objective, origin, key, config: DSPConfig, tier: int, solver: LocalSolver, calibration,
                 directions, batch_fn: BatchFn) -> dict:
    """What a checkpointed search is: a resume with another origin, key, configuration, objective, solver
    (optimizer, steps, ``grad_tol``; its batches may change, e.g. to mend a failing stream), calibration or data
    is refused (:class:`~mclandscape.engine.loop.ResumeMismatchError`)."""
    return {"tier": tier, "config": {k: v for k, v in dataclasses.asdict(config).items()
                                     if k not in ("max_steps", "checkpoint_every", "sync_every", "record_path")},
            "origin": tree_digest(origin), "key": tree_digest(jax.random.key_data(key)),
            "directions": None if directions is None else tree_digest(list(directions)),
            "objective": tree_digest(split_static(objective)[1]), "calibration": _probe_digest(calibration),
            "solver": {"optimizer": _probe_digest(solver.optimizer), "steps": solver.steps,
                       "grad_tol": solver.grad_tol},
            "data": {"first_batch": tree_digest(batch_fn(0)), "stream": getattr(batch_fn, "digest", None)}}


