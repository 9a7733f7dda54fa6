"""The one training loop: :func:`run` drives a step (:func:`mclandscape.engine.step.make_step`) over a batch stream.

Every trainer of mclandscape — endpoints (:func:`mclandscape.engine.train.train_model`), curves and surfaces
(:func:`mclandscape.engine.connector_train.train_connector`), NEB bands, DSP-TT local solves and snapshot
ensembles — is an objective, an Optax transform and a batch stream handed to ``make_step`` and :func:`run`.

:func:`run` runs ``epochs × steps_per_epoch`` steps over a random-access batch stream ``batches(t) -> batch``
(so resuming needs no replay), with the key of step ``t`` ``fold_in(key, t)``: nothing depends on how many
steps ran in this process, so a killed and resumed run ends bit-identical to an uninterrupted one.
``max_steps`` ends a run inside its last epoch (a shorter last epoch, for budgets counted in steps);
``step_callbacks`` see ``(steps completed, state)`` on the host after every step, without waiting for the
device unless they read a value (e.g. to keep a snapshot mid-epoch). Per epoch: one history record (the step
metrics ``objective``, ``loss``, ``grad_norm``, ``acc`` and any other scalar of ``aux`` averaged over the
epoch's examples, over the steps it ran for a last epoch shortened by ``max_steps``; a scalar named ``max_*``
is the maximum over the epoch's steps instead; plus whatever ``on_epoch`` adds), the callbacks, a checkpoint
every ``checkpoint_every`` epochs (:class:`LoopConfig`; the resume contract is
:mod:`mclandscape.engine.resume`'s), progress through tqdm (quiet when not on a terminal). A non-finite step
raises :class:`NonFiniteError` at its epoch's end, before anything of that epoch is written.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from mclandscape.core.objective import function_objective
    >>> from mclandscape.engine.step import make_step
    >>> step = make_step(function_objective(lambda p, b: jnp.sum(p["w"] ** 2)), optax.sgd(0.25))
    >>> seen = []
    >>> res = run(step, step.init({"w": jnp.ones(1)}), lambda t: None, epochs=3, steps_per_epoch=2,
    ...           max_steps=5, key=jax.random.key(0), step_callbacks=[lambda n, state: seen.append(n)])
    >>> seen, int(res.state.step), [h["epoch"] for h in res.history]
    ([1, 2, 3, 4, 5], 5, [1, 2, 3])
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from mclandscape.core import _checks
from mclandscape.core.tree import PyTree, tree_path_names
from mclandscape.engine import distributed, resume
from mclandscape.engine.checkpoint import jsonable
from mclandscape.engine.step import Step, TrainState, accumulate_jit, zero_sums_like

__all__ = ["LoopConfig", "RunResult", "run", "NonFiniteError", "StopRun", "progress_enabled"]


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient (raised with the step and the first bad leaf).

    A ``FloatingPointError``. :func:`run` raises it at the end of the epoch in which the first non-finite step
    happened, before anything of that epoch is saved; the offending step itself applied no update.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from mclandscape.core.objective import function_objective
        >>> from mclandscape.engine.step import make_step
        >>> step = make_step(function_objective(lambda p, b: jnp.sum(jnp.log(p["w"]))), optax.sgd(0.1))
        >>> run(step, step.init({"w": -jnp.ones(1)}), lambda t: None, epochs=1, steps_per_epoch=1,
        ...     key=jax.random.key(0))
        Traceback (most recent call last):
        ...
        mclandscape.engine.loop.NonFiniteError: training stopped: the loss is not finite at step 0 (epoch 1, batch 0)...
    """


class StopRun(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a callback to end a run after the current epoch (e.g. converged).

    The run returns normally with ``RunResult.stopped`` set to that epoch; its checkpoint, if any, has already
    been written.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from mclandscape.core.objective import function_objective
        >>> from mclandscape.engine.step import make_step
        >>> step = make_step(function_objective(lambda p, b: jnp.sum(p["w"] ** 2)), optax.sgd(0.1))
        >>> def stop_early(epoch, state, history):
        ...     if history[-1]["loss"] < 0.5:
        ...         raise StopRun
        >>> res = run(step, step.init({"w": jnp.ones(1)}), lambda t: None, epochs=10, steps_per_epoch=1,
        ...           key=jax.random.key(0), callbacks=[stop_early])
        >>> res.stopped, len(res.history)
        (3, 3)
    """


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How a run is driven (not what it computes, which the fingerprint describes).

    Attributes:
      checkpoint_dir: where checkpoints go (``None``: no checkpoints, no resume).
      checkpoint_every: epochs between checkpoints (the last epoch is always saved).
      keep: how many of the latest checkpoints stay (``>= 1``).
      milestones: epochs whose checkpoints are kept forever (``0``: the initial state).
      overwrite: delete an existing run in ``checkpoint_dir`` instead of resuming it.
      progress: a tqdm bar (``None``: only when stderr is a terminal).
      desc: the bar's label.

    Example:
        >>> LoopConfig(checkpoint_every=5, milestones=(10, 0, 10)).milestones
        (0, 10)
        >>> LoopConfig(keep=0)
        Traceback (most recent call last):
        ...
        ValueError: keep must be an integer >= 1, got 0
    """

    checkpoint_dir: str | os.PathLike | None = None
    checkpoint_every: int = 1
    keep: int = 1
    milestones: tuple[int, ...] = ()
    overwrite: bool = False
    progress: bool | None = None
    desc: str = "train"

    def __post_init__(self):
        milestones = {_checks.integer(m, "milestones", low=0, what="epochs") for m in self.milestones}
        object.__setattr__(self, "milestones", tuple(sorted(milestones)))
        for name in ("checkpoint_every", "keep"):
            _checks.integer(getattr(self, name), name, low=1)


@dataclasses.dataclass
class RunResult:
    """What :func:`run` returns.

    Attributes:
      state: the final :class:`TrainState` (``params`` is a shortcut to ``state.params``).
      history: one record per epoch (``epoch``, the averaged step metrics, ``seconds``, whatever ``on_epoch``
        adds), including the epochs before a resume.
      resumed_from: the epoch the run resumed from (``None`` for a fresh run).
      stopped: the epoch a callback stopped it at with :class:`StopRun` (``None``: it ran to the end).

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from mclandscape.core.objective import function_objective
        >>> from mclandscape.engine.step import make_step
        >>> step = make_step(function_objective(lambda p, b: jnp.sum(p["w"] ** 2)), optax.sgd(0.25))
        >>> res = run(step, step.init({"w": jnp.ones(1)}), lambda t: None, epochs=2, steps_per_epoch=1,
        ...           key=jax.random.key(0))
        >>> res.params["w"].tolist(), [h["epoch"] for h in res.history], res.resumed_from, res.stopped
        ([0.25], [1, 2], None, None)
    """

    state: TrainState
    history: list[dict]
    resumed_from: int | None = None
    stopped: int | None = None

    @property
    def params(self) -> PyTree:
        return self.state.params


def _check_length(epochs, steps_per_epoch, max_steps) -> tuple[int, int, int]:
    """``(epochs, steps_per_epoch, steps in all)``, or a ``ValueError`` naming the bad argument."""
    epochs, spe = _checks.integer(epochs, "epochs", low=0), _checks.integer(steps_per_epoch, "steps_per_epoch", low=1)
    if max_steps is None:
        return epochs, spe, epochs * spe
    if isinstance(max_steps, bool) or int(max_steps) != max_steps or \
            not (epochs - 1) * spe < int(max_steps) <= epochs * spe:
        raise ValueError(f"max_steps must be an integer in ({(epochs - 1) * spe}, {epochs * spe}] for {epochs} "
                         f"epochs of {spe} steps, got {max_steps!r}")
    return epochs, spe, int(max_steps)


def _record(epoch: int, state: TrainState, sums: dict, seconds: float, on_epoch) -> dict:
    """The epoch's history record: example means of the step metrics (``max_*``: maxima), ``seconds``."""
    host = {k: float(v) for k, v in jax.device_get(sums).items()}
    total = host.pop("__weight__")  # examples in the epoch: epoch means are example means
    raw = {**{k: v if k.startswith("max_") else v / total for k, v in host.items()}, "seconds": seconds}
    return {"epoch": epoch, **(on_epoch(epoch, state, raw) if on_epoch is not None else raw)}


def _check_finite_state(state: TrainState, names: list[str], steps_per_epoch: int) -> None:
    rec = np.asarray(state.nonfinite)
    if rec[0] < 0:
        return
    step, leaf, loss_bad = int(rec[0]), int(rec[1]), bool(rec[2])
    e, i = divmod(step, steps_per_epoch)
    what = "the loss is not finite" if loss_bad else "the gradient is not finite"
    where = f"; first non-finite gradient leaf: {names[leaf]}" if 0 <= leaf < len(names) else ""
    raise NonFiniteError(f"training stopped: {what} at step {step} (epoch {e + 1}, batch {i}){where}. "
                         "Nothing after the last finite step was applied or saved; lower the learning rate, or "
                         "check the inputs and labels.")


def progress_enabled(progress: bool | None) -> bool:
    """Whether a progress bar is shown: the rule of every trainer's and search's ``progress`` argument.

    Args:
      progress: ``True``/``False``, or ``None``: shown only when stderr is a terminal.

    Returns:
      ``bool(progress)``, or whether stderr is a terminal for ``None``.

    Example:
        >>> progress_enabled(True), progress_enabled(False)
        (True, False)
    """
    return bool(getattr(sys.stderr, "isatty", lambda: False)()) if progress is None else bool(progress)


def run(step: Step, state: TrainState, batches: Callable[[int], Any], *, epochs: int, steps_per_epoch: int,
        key: jax.Array, config: LoopConfig = LoopConfig(), fingerprint: Mapping | None = None,
        callbacks: Sequence[Callable[[int, TrainState, list], None]] = (),
        on_epoch: Callable[[int, TrainState, dict], dict] | None = None, metadata: Mapping | None = None,
        max_steps: int | None = None, step_callbacks: Sequence[Callable[[int, TrainState], None]] = ()
        ) -> RunResult:
    """Run ``epochs`` epochs of ``steps_per_epoch`` steps (``max_steps`` in all), with checkpoints and resume.

    See the module docstring and, for checkpoints and resuming, :mod:`mclandscape.engine.resume`.

    Args:
      step: a :class:`Step` (or any ``step(state, batch, key) -> (state, metrics)`` callable).
      state: the initial state (``step.init(params)``); replaced by the checkpoint's when resuming.
      batches: ``t -> batch`` for the global step ``t`` (random access).
      epochs: the number of epochs (``>= 0``).
      steps_per_epoch: steps per epoch (``>= 1``).
      key: the base key; step ``t`` gets ``fold_in(key, t)``.
      config: a :class:`LoopConfig` (checkpoints, rotation, resume, progress).
      fingerprint: JSON-like description of the run, stored with every checkpoint and compared on resume
        (``None``: no comparison).
      callbacks: ``callback(epoch, state, history)`` after each epoch (1-based) and its checkpoint; raising
        :class:`StopRun` ends the run there (e.g. converged), any other exception propagates.
      on_epoch: ``on_epoch(epoch, state, metrics) -> record``: the epoch's history record from the averaged step
        metrics (``objective``, ``loss``, ``acc`` when reported, ``seconds``), e.g. adding test metrics. Default:
        the metrics themselves with ``epoch``.
      metadata: extra JSON written with every checkpoint (the latest record goes in as ``metrics``).
      max_steps: stop after this many steps in all (default ``epochs * steps_per_epoch``); the last epoch is
        then shorter and its record averages the steps it ran. It must lie in
        ``((epochs - 1) * steps_per_epoch, epochs * steps_per_epoch]`` (else ``ValueError``). A checkpoint written
        at the end of that shorter epoch resumes like any other.
      step_callbacks: ``callback(steps_done, state)`` on the host after every step (``steps_done`` from 1,
        global across a resume), e.g. to copy the parameters mid-epoch; nothing waits for the device unless
        the callback reads a value. Any exception it raises propagates (to end a run early, raise
        :class:`StopRun` from ``callbacks``, at an epoch end).

    Returns:
      A :class:`RunResult`. Raises :class:`NonFiniteError` for a non-finite step and
      :class:`~mclandscape.engine.resume.ResumeMismatchError` when ``config.checkpoint_dir`` holds a run with
      another fingerprint (or whose epoch ends fall on other step counts: another ``steps_per_epoch`` or
      ``max_steps``).

    Example:
        >>> import jax, jax.numpy as jnp, optax, tempfile
        >>> from mclandscape.core.objective import function_objective
        >>> from mclandscape.engine.resume import ResumeMismatchError
        >>> from mclandscape.engine.step import make_step
        >>> step = make_step(function_objective(lambda p, b: jnp.sum((p["w"] - b) ** 2)), optax.sgd(0.1))
        >>> go = lambda epochs, d, lr: run(step, step.init({"w": jnp.zeros(2)}), lambda t: jnp.ones(2),
        ...                                epochs=epochs, steps_per_epoch=2, key=jax.random.key(0),
        ...                                config=LoopConfig(checkpoint_dir=d), fingerprint={"lr": lr})
        >>> with tempfile.TemporaryDirectory() as d:
        ...     first = go(3, d, 0.1)
        ...     longer = go(4, d, 0.1)          # resumes at epoch 3, runs one more
        ...     try:
        ...         go(4, d, 0.5)
        ...     except ResumeMismatchError as e:
        ...         print(str(e).split("(")[1].split(")")[0])
        lr: checkpoint 0.1 vs now 0.5
        >>> [round(h["loss"], 4) for h in first.history]
        [1.64, 0.6717, 0.2751]
        >>> longer.resumed_from, len(longer.history)
        (3, 4)

        ``max_steps`` (a shorter last epoch) and ``step_callbacks`` (after every step):

        >>> done = []
        >>> res = run(step, step.init({"w": jnp.zeros(2)}), lambda t: jnp.ones(2), epochs=2, steps_per_epoch=3,
        ...           max_steps=4, key=jax.random.key(0), step_callbacks=[lambda n, state: done.append(n)])
        >>> done, int(res.state.step), len(res.history)
        ([1, 2, 3, 4], 4, 2)
    """
    epochs, spe, last_step = _check_length(epochs, steps_per_epoch, max_steps)
    fingerprint = None if fingerprint is None else jsonable(dict(fingerprint))
    names = tree_path_names(state.params)
    history, start, resumed_from, stopped = [], 0, None, None
    store = resume.open_store(config.checkpoint_dir, keep=config.keep, milestones=config.milestones,
                              overwrite=config.overwrite)
    save = lambda e, state: resume.save(store, e, state, fingerprint=fingerprint, history=history,  # noqa: E731
                                        loop_steps=min(e * spe, last_step), metadata=metadata)
    try:
        restored = None if store is None else resume.resume(store, state, fingerprint, epochs=epochs,
                                                            steps_per_epoch=spe, last_step=last_step,
                                                            max_steps=max_steps)
        if restored is not None:
            state, history, start = restored
            resumed_from = start
        elif store is not None and 0 in config.milestones:
            save(0, state)
        with tqdm(total=epochs, initial=start, disable=not progress_enabled(config.progress), leave=False,
                  desc=config.desc, unit="epoch", dynamic_ncols=True) as bar:
            zeros = None
            for epoch in range(start, epochs):
                t0, e1 = time.perf_counter(), epoch + 1
                sums = None
                for t in range(epoch * spe, min(e1 * spe, last_step)):
                    batch = batches(t)
                    if hasattr(step, "step_and_sum"):  # a Step: the key, the step and the sums in one call
                        zeros = step.zero_sums(state, batch, key) if zeros is None else zeros
                        state, sums = step.step_and_sum(state, batch, key, t, zeros if sums is None else sums)
                    else:  # any other step(state, batch, key) callable
                        state, metrics = step(state, batch, jax.random.fold_in(key, t))
                        sums = accumulate_jit(zero_sums_like(metrics) if sums is None else sums, metrics)
                    for cb in step_callbacks:
                        cb(t + 1, state)
                _check_finite_state(state, names, spe)
                history.append(_record(e1, state, sums, time.perf_counter() - t0, on_epoch))
                if store is not None and (e1 % config.checkpoint_every == 0 or e1 in (epochs, *config.milestones)):
                    save(e1, state)
                bar.update(1)
                bar.set_postfix(**{k: f"{v:.4g}" for k, v in history[-1].items() if k in ("loss", "train_loss",
                                                                                          "test_acc")})
                try:
                    for cb in callbacks:
                        cb(e1, state, history)
                except StopRun:
                    stopped = e1
                    break
    finally:
        if store is not None:
            store.close()
    return RunResult(state=distributed.local(state), history=history, resumed_from=resumed_from, stopped=stopped)
