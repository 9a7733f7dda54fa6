"""Snapshot and fast-geometric ensembles: the baselines of equal budget for DSP-TT's ensembles (Tables 2-3).

The DSP-TT paper (Anonymous, 2020, "Constructing multiple high-quality deep neural networks: a TRUST-TECH
based approach", ICLR 2021 submission) compares its ensembles with :func:`independent_ensemble` (members
trained from different random initialisations), :func:`snapshot_ensemble` (Huang et al. 2017a: one run with a
cyclic cosine learning rate, a snapshot at the end of each cycle) and :func:`fge_ensemble` (Garipov et al.
2018: from a trained model, a cyclic piecewise-linear learning rate between ``lr1`` and ``lr2``, a member at
each cycle's minimum). Both train on the engine (:func:`train_with_snapshots`:
:func:`mclandscape.engine.loop.make_step` and :func:`mclandscape.engine.loop.run`) an objective of the one
protocol ``objective(params, batch, key) -> (loss, aux)`` (:mod:`mclandscape.core.objective`, e.g.
:func:`~mclandscape.core.objective.make_objective` of a model); their optimizers are named by value
(:func:`mclandscape.engine.optim.transform`), so equal settings share the compiled step. A run whose loss or
gradient becomes non-finite raises :class:`~mclandscape.engine.loop.NonFiniteError`. Like every trainer, they
number epochs from 1 as passes over the data (``steps_per_epoch``, by default the batch stream's own, e.g.
:class:`~mclandscape.engine.data.BatchStream`), show a tqdm bar when stderr is a terminal (``progress=None``)
and call ``callback(epoch, (params, members_so_far))`` after each epoch (raising
:class:`~mclandscape.engine.loop.StopRun` ends training); members are taken after their step counts whether or
not those end an epoch, so the epoch length changes nothing but the numbering. The members' metrics:
:mod:`mclandscape.methods.ensemble`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mclandscape.core._checks import integer, real
from mclandscape.core.objective import check_objective
from mclandscape.core.tree import PyTree, check_same_structure
from mclandscape.engine.loop import LoopConfig, run
from mclandscape.engine.optim import transform
from mclandscape.engine.step import make_step

__all__ = [
    "snapshot_cosine_schedule", "snapshot_steps", "fge_schedule", "fge_collect_steps", "train_with_snapshots",
    "snapshot_ensemble", "fge_ensemble", "independent_ensemble",
]

# ---------------------------------------------------------------------------------------------------------
# baselines: learning-rate schedules
# ---------------------------------------------------------------------------------------------------------


def snapshot_cosine_schedule(lr0: float, total_steps: int, num_cycles: int) -> Callable[[Any], Any]:
    """Cyclic cosine annealing of snapshot ensembles (Huang et al. 2017a, eq. 2).

    ``lr(t) = lr0 / 2 * (cos(pi * mod(t, L) / L) + 1)`` with cycle length ``L = ceil(total_steps / num_cycles)``
    (``t`` counted from 0), restarting at ``lr0`` at the start of every cycle.

    Args:
      lr0: the learning rate at the start of each cycle (``> 0``).
      total_steps: the whole budget in steps.
      num_cycles: the number of cycles (``<= total_steps``).

    Returns:
      An Optax schedule ``t -> lr``.

    Example:
        >>> lr = snapshot_cosine_schedule(0.1, total_steps=100, num_cycles=4)
        >>> [round(float(lr(t)), 4) for t in (0, 12, 24, 25)]
        [0.1, 0.0531, 0.0004, 0.1]
    """
    lr0 = real(lr0, "lr0", low=0, low_open=True)
    length = math.ceil(integer(total_steps, "total_steps", low=1) / integer(num_cycles, "num_cycles", low=1))
    if num_cycles > total_steps:
        raise ValueError(f"num_cycles ({num_cycles}) exceeds total_steps ({total_steps})")
    return lambda t: lr0 / 2.0 * (jnp.cos(jnp.pi * jnp.mod(t, length) / length) + 1.0)


def snapshot_steps(total_steps: int, num_cycles: int) -> list[int]:
    """The completed step counts after which snapshot ensembles take their members.

    The end of each cosine cycle of :func:`snapshot_cosine_schedule`; the last one at ``total_steps``.

    Args:
      total_steps: the whole budget in steps.
      num_cycles: the number of cycles.

    Returns:
      A sorted list of step counts.

    Example:
        >>> snapshot_steps(100, 4), snapshot_steps(10, 3)
        ([25, 50, 75, 100], [4, 8, 10])
    """
    total, cycles = integer(total_steps, "total_steps", low=1), integer(num_cycles, "num_cycles", low=1)
    return sorted({min(math.ceil(total / cycles) * (c + 1), total) for c in range(cycles)})


def fge_schedule(lr1: float, lr2: float, cycle_steps: int) -> Callable[[Any], Any]:
    """Garipov et al. (2018) FGE cycle: from ``lr1`` down to ``lr2`` at mid-cycle and back.

    With ``s(i) = (mod(i - 1, c) + 1) / c`` for step ``i >= 1``, ``lr = (1 - 2s) lr1 + 2s lr2`` for ``s <= 1/2``
    and ``(2 - 2s) lr2 + (2s - 1) lr1`` otherwise. The optax step count ``t`` (from 0) is step ``i = t + 1``.

    Args:
      lr1: the learning rate at the ends of a cycle (``> 0``).
      lr2: the learning rate at mid-cycle (``> 0``).
      cycle_steps: the cycle length ``c``, even and ``>= 2``.

    Returns:
      An Optax schedule ``t -> lr``.

    Example:
        >>> lr = fge_schedule(0.05, 0.01, cycle_steps=4)
        >>> [round(float(lr(t)), 4) for t in range(5)]
        [0.03, 0.01, 0.03, 0.05, 0.03]
    """
    lr1, lr2 = real(lr1, "lr1", low=0, low_open=True), real(lr2, "lr2", low=0, low_open=True)
    c = integer(cycle_steps, "cycle_steps", low=2)
    if c % 2:
        raise ValueError(f"cycle_steps must be an even integer >= 2 (members are taken at mid-cycle), got {c}")

    def schedule(t):
        s = (jnp.mod(t, c) + 1) / c
        return jnp.where(s <= 0.5, (1 - 2 * s) * lr1 + 2 * s * lr2, (2 - 2 * s) * lr2 + (2 * s - 1) * lr1)

    return schedule


def fge_collect_steps(cycle_steps: int, num_members: int) -> list[int]:
    """Completed step counts at which FGE takes members: mid-cycle, where the learning rate is ``lr2``.

    Args:
      cycle_steps: the cycle length.
      num_members: how many members.

    Returns:
      A list of ``num_members`` step counts.

    Example:
        >>> fge_collect_steps(4, 3)
        [2, 6, 10]
    """
    c = integer(cycle_steps, "cycle_steps", low=1)
    return [k * c + c // 2 for k in range(integer(num_members, "num_members", low=1))]


# ---------------------------------------------------------------------------------------------------------
# baselines: training with snapshots
# ---------------------------------------------------------------------------------------------------------


def train_with_snapshots(objective: Callable, params: PyTree, optimizer: optax.GradientTransformation,
                         batch_fn: Callable[[int], Any], steps: int, collect: Sequence[int], *,
                         key: jax.Array | None = None, steps_per_epoch: int | None = None,
                         progress: bool | None = None,
                         callback: Callable[[int, tuple[PyTree, list[PyTree]]], None] | None = None
                         ) -> tuple[PyTree, list[PyTree]]:
    """Train on the engine's loop and copy the parameters after chosen step counts.

    :func:`~mclandscape.engine.loop.make_step` of ``objective`` and ``optimizer``, run by
    :func:`~mclandscape.engine.loop.run` for exactly ``steps`` steps in epochs of ``steps_per_epoch`` steps
    (the last one shorter when they do not divide ``steps``); a step callback copies the parameters after each
    count in ``collect``, inside an epoch or at its end. Step ``t`` reads ``batch_fn(t)`` with the key
    ``fold_in(key, t)`` whatever the epoch length, so the members do not depend on ``steps_per_epoch``.

    Args:
      objective: ``objective(params, batch, key) -> (loss, aux)``.
      params: the initial parameters.
      optimizer: any Optax ``GradientTransformation``.
      batch_fn: ``t -> batch`` for step ``t`` (from 0).
      steps: the steps to run (``>= 1``).
      collect: completed step counts (each in ``[1, steps]``) after which a member is taken.
      key: the base key (step ``t`` gets ``fold_in(key, t)``); default ``jax.random.key(0)``.
      steps_per_epoch: steps per epoch (default ``batch_fn.steps_per_epoch`` when the batch function has one,
        as :class:`~mclandscape.engine.data.BatchStream` does: epochs are passes over the data, numbered from
        1 as in every trainer; a plain callable without it: one step per epoch).
      progress: a progress bar over the epochs (``None``: when stderr is a terminal).
      callback: ``callback(epoch, (params, members))`` after each epoch with the parameters and the members
        taken so far; raising :class:`~mclandscape.engine.loop.StopRun` from it ends training there, and the
        function returns the members taken until then.

    Returns:
      ``(final_params, snapshots)``, one snapshot per distinct count of ``collect`` in increasing order (fewer
      when a callback stopped the run early).

    Raises:
      NonFiniteError: the loss or a gradient became non-finite (e.g. the learning rate is too large).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from mclandscape.core.objective import function_objective
        >>> objective = function_objective(lambda p, b: jnp.sum((p["w"] - b) ** 2))
        >>> batches = lambda t: jnp.ones(2)  # minimum at w = 1
        >>> final, snaps = train_with_snapshots(objective, {"w": jnp.zeros(2)}, optax.sgd(0.25), batches,
        ...                                     steps=2, collect=[1, 2])
        >>> [s["w"].tolist() for s in snaps], final["w"].tolist()
        ([[0.5, 0.5], [0.75, 0.75]], [0.75, 0.75])

        Epochs of 2 steps (numbered from 1, the last one shorter), a member in the middle of epoch 2:

        >>> seen = []
        >>> final, snaps = train_with_snapshots(objective, {"w": jnp.zeros(2)}, optax.sgd(0.25), batches,
        ...                                     steps=5, collect=[3, 5], steps_per_epoch=2,
        ...                                     callback=lambda epoch, res: seen.append((epoch, len(res[1]))))
        >>> seen
        [(1, 0), (2, 1), (3, 2)]
    """
    steps = integer(steps, "steps", low=1)
    want = sorted({int(c) for c in collect})
    if not want or want[0] < 1 or want[-1] > steps:
        raise ValueError(f"collect steps must be one or more step counts in [1, {steps}], got {want}")
    spe = integer(getattr(batch_fn, "steps_per_epoch", 1) if steps_per_epoch is None else steps_per_epoch,
                  "steps_per_epoch", low=1)
    key = key if key is not None else jax.random.key(0)
    check_objective(objective, params, batch_fn(0), key)
    step = make_step(objective, optimizer)
    snaps: dict[int, PyTree] = {}  # step count -> member, taken in increasing order

    def collect_member(t, state):
        if t in want:
            snaps[t] = jax.tree.map(jnp.copy, state.params)

    callbacks = [] if callback is None else [
        lambda epoch, state, history: callback(epoch, (state.params, list(snaps.values())))]
    res = run(step, step.init(params), batch_fn, epochs=-(-steps // spe), steps_per_epoch=spe, key=key,
              config=LoopConfig(progress=progress, desc="snapshots"), callbacks=callbacks, max_steps=steps,
              step_callbacks=[collect_member])
    return res.state.params, list(snaps.values())


def _sgd(schedule: Callable, schedule_args: tuple, momentum: float, weight_decay: float) -> optax.GradientTransformation:
    """SGD on ``schedule(*schedule_args)`` with L2 ``weight_decay`` added to the gradient (named by value)."""
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(schedule(*schedule_args), momentum=momentum or None))


def snapshot_ensemble(objective: Callable, init_params: PyTree, batch_fn: Callable[[int], Any], *, lr0: float,
                      total_steps: int, num_members: int, momentum: float = 0.9, weight_decay: float = 0.0,
                      key: jax.Array | None = None, steps_per_epoch: int | None = None,
                      progress: bool | None = None, callback: Callable | None = None) -> list[PyTree]:
    """Snapshot ensemble (Huang et al. 2017a): one run with a cyclic cosine learning rate, a member per cycle.

    SGD (``momentum``, L2 ``weight_decay`` added to the gradient) with :func:`snapshot_cosine_schedule` over
    ``total_steps`` — the whole budget — and a member at the end of each of ``num_members`` cycles
    (:func:`train_with_snapshots`).

    Args:
      objective: ``objective(params, batch, key) -> (loss, aux)``.
      init_params: the initial parameters.
      batch_fn: ``t -> batch``.
      lr0: the learning rate at the start of each cycle.
      total_steps: the whole budget in steps.
      num_members: the number of cycles and members.
      momentum: SGD momentum (``0``: none).
      weight_decay: L2 coefficient added to the gradient.
      key: the base key (default ``jax.random.key(0)``).
      steps_per_epoch, progress, callback: as for :func:`train_with_snapshots`.

    Returns:
      The ``num_members`` snapshots, in training order (fewer when ``callback`` stopped training early).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from mclandscape.core.objective import function_objective
        >>> objective = function_objective(lambda p, b: jnp.sum((p["w"] - b) ** 2))
        >>> batches = lambda t: jnp.ones(2)  # minimum at w = 1
        >>> snaps = snapshot_ensemble(objective, {"w": jnp.zeros(2)}, batches, lr0=0.2, total_steps=6,
        ...                           num_members=2, momentum=0.0)
        >>> len(snaps), [round(float(s["w"][0]), 3) for s in snaps]
        (2, [0.622, 0.857])
    """
    # building the transform builds (and so validates) the schedule
    opt = transform(_sgd, snapshot_cosine_schedule, (lr0, total_steps, num_members), momentum, weight_decay)
    return train_with_snapshots(objective, init_params, opt, batch_fn, total_steps,
                                snapshot_steps(total_steps, num_members), key=key, steps_per_epoch=steps_per_epoch,
                                progress=progress, callback=callback)[1]


def fge_ensemble(objective: Callable, trained_params: PyTree, batch_fn: Callable[[int], Any], *, lr1: float,
                 lr2: float, cycle_steps: int, num_members: int, momentum: float = 0.9,
                 weight_decay: float = 0.0, key: jax.Array | None = None, steps_per_epoch: int | None = None,
                 progress: bool | None = None, callback: Callable | None = None) -> list[PyTree]:
    """Fast geometric ensembling (Garipov et al. 2018): from a trained model, a member at every mid-cycle.

    From ``trained_params``, SGD with :func:`fge_schedule` for ``num_members`` cycles of ``cycle_steps``
    (:func:`train_with_snapshots`).

    Args:
      objective: ``objective(params, batch, key) -> (loss, aux)``.
      trained_params: the trained model's parameters.
      batch_fn: ``t -> batch``.
      lr1, lr2: the learning rates at the ends and at the middle of a cycle.
      cycle_steps: the cycle length (even).
      num_members: the number of members.
      momentum: SGD momentum (``0``: none).
      weight_decay: L2 coefficient added to the gradient.
      key: the base key (default ``jax.random.key(0)``).
      steps_per_epoch, progress, callback: as for :func:`train_with_snapshots`.

    Returns:
      The ``num_members`` members, in training order (fewer when ``callback`` stopped training early).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from mclandscape.core.objective import function_objective
        >>> objective = function_objective(lambda p, b: jnp.sum((p["w"] - b) ** 2))
        >>> batches = lambda t: jnp.ones(2)  # minimum at w = 1
        >>> members = fge_ensemble(objective, {"w": jnp.ones(2)}, batches, lr1=0.05, lr2=0.01, cycle_steps=2,
        ...                        num_members=3)
        >>> len(members), all(bool(jnp.allclose(m["w"], 1.0)) for m in members)  # started at the minimum
        (3, True)
    """
    # building the transform builds (and so validates) the schedule
    opt = transform(_sgd, fge_schedule, (lr1, lr2, cycle_steps), momentum, weight_decay)
    collect = fge_collect_steps(cycle_steps, num_members)
    return train_with_snapshots(objective, trained_params, opt, batch_fn, collect[-1], collect, key=key,
                                steps_per_epoch=steps_per_epoch, progress=progress, callback=callback)[1]


def independent_ensemble(train_one: Callable[[int], PyTree], seeds: Sequence[int]) -> list[PyTree]:
    """Independently trained members: ``train_one(seed)`` for each seed.

    Different random initialisations and data orders, the full budget each (the DSP-TT paper's Table 3
    "Individual-Ens").

    Args:
      train_one: ``seed -> params`` (any trainer).
      seeds: distinct integer seeds.

    Returns:
      The members, in the order of ``seeds``. Raises ``ValueError`` for no or repeated seeds and
      :class:`~mclandscape.core.tree.TreeMismatchError` when the members differ in structure.

    Example:
        >>> import jax.numpy as jnp
        >>> members = independent_ensemble(lambda s: {"w": jnp.full(2, float(s))}, [0, 1, 2])
        >>> [float(m["w"][0]) for m in members]
        [0.0, 1.0, 2.0]
    """
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"independent_ensemble needs one or more distinct seeds, got {seeds}")
    members = [train_one(int(s)) for s in seeds]
    for i in range(1, len(members)):
        check_same_structure(members[0], members[i], names=("member[0]", f"member[{i}]"))
    return members
