"""The resume contract of the training loop: what a checkpoint holds, and when a run may continue from it.

A checkpoint (:class:`~mclandscape.engine.checkpoint.CheckpointStore`, one per epoch saved) holds the
:class:`~mclandscape.engine.step.TrainState` and, in its metadata, the run's ``fingerprint`` (model spec,
hyper-parameters and a digest of the fixed inputs, chosen by the trainer), its history and the steps run
until its epoch. Resuming from a directory whose fingerprint differs raises :class:`ResumeMismatchError`
naming the directory and every difference (``overwrite=True`` deletes the old steps and starts afresh); so
does a checkpoint whose epoch ended after another number of steps (another ``steps_per_epoch`` or
``max_steps``). A latest step that cannot be read falls back to the newest readable one, with a warning
naming both. Rotation is orbax's: the latest ``keep`` checkpoints and the ``milestones`` are preserved
(``LatestN`` and ``CustomSteps`` preservation policies).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from mclandscape.engine.checkpoint import CheckpointError, CheckpointStore
from mclandscape.engine.step import TrainState

__all__ = ["ResumeMismatchError", "fingerprint_diff", "restore_state", "open_store", "resume", "save"]

FORMAT = "mclandscape.loop/1"


class ResumeMismatchError(ValueError):
    """A checkpoint directory holds a different run than the one asked for (a ``ValueError``).

    Raised by :func:`run` when the stored fingerprint differs from the new one; the message names the directory
    and every difference (see the example of :func:`run`).

    Example:
        >>> issubclass(ResumeMismatchError, ValueError)
        True
    """


def fingerprint_diff(old: Any, new: Any, where: str = "") -> list[str]:
    """Where two JSON-like fingerprints differ, one readable line per difference.

    Args:
      old: the fingerprint stored in a checkpoint.
      new: the fingerprint of the run asked for.
      where: the path prefix of the lines (used by the recursion).

    Returns:
      A list of strings (empty when they agree; NaN equals NaN).

    Example:
        >>> fingerprint_diff({"hyper": {"lr": 0.1}, "epochs": 5}, {"hyper": {"lr": 0.5}, "epochs": 5})
        ['hyper.lr: checkpoint 0.1 vs now 0.5']
    """
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        return [line for k in sorted(set(old) | set(new), key=str) for line in fingerprint_diff(
            old.get(k, "<absent>"), new.get(k, "<absent>"), f"{where}.{k}" if where else str(k))]
    if isinstance(old, list | tuple) and isinstance(new, list | tuple) and len(old) == len(new):
        return [line for i, (a, b) in enumerate(zip(old, new, strict=True))
                for line in fingerprint_diff(a, b, f"{where}[{i}]")]
    same = old == new or (isinstance(old, float) and isinstance(new, float) and math.isnan(old) and math.isnan(new))
    return [] if same else [f"{where or '<root>'}: checkpoint {old!r} vs now {new!r}"]


def _state_tree(state: TrainState) -> dict:
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state, "nonfinite": state.nonfinite}
    if state.model_state is not None:
        tree["model_state"] = state.model_state
    return tree


def _from_tree(tree: dict) -> TrainState:
    return TrainState(step=jnp.asarray(tree["step"]), params=tree["params"], opt_state=tree["opt_state"],
                      model_state=tree.get("model_state"), nonfinite=jnp.asarray(tree["nonfinite"]))


def target_of(state: TrainState):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), _state_tree(state))


def restore_state(directory: str | os.PathLike, epoch: int, like: TrainState) -> TrainState:
    """The state saved at ``epoch`` in a run's checkpoint directory (e.g. a milestone kept by
    :class:`~mclandscape.engine.loop.LoopConfig`).

    Args:
      directory: the run's ``checkpoint_dir``.
      epoch: the saved epoch to read.
      like: a :class:`TrainState` of the same structure (e.g. ``step.init(params)``), for shapes and dtypes.

    Returns:
      The :class:`TrainState` of that epoch.

    Example:
        >>> import jax, jax.numpy as jnp, optax, tempfile
        >>> from mclandscape.core.objective import function_objective
        >>> from mclandscape.engine.loop import LoopConfig, run
        >>> from mclandscape.engine.step import make_step
        >>> step = make_step(function_objective(lambda p, b: jnp.sum(p["w"] ** 2)), optax.sgd(0.25))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = run(step, step.init({"w": jnp.ones(1)}), lambda t: None, epochs=2, steps_per_epoch=1,
        ...             key=jax.random.key(0), config=LoopConfig(checkpoint_dir=d, milestones=(1,)))
        ...     first = restore_state(d, 1, step.init({"w": jnp.ones(1)}))
        >>> int(first.step), first.params["w"].tolist()
        (1, [0.5])
    """
    with CheckpointStore(directory, create=False) as store:
        tree, _ = store.restore(int(epoch), target=target_of(like))
    return _from_tree(tree)


def open_store(checkpoint_dir, *, keep: int, milestones: tuple, overwrite: bool) -> CheckpointStore | None:
    """The run's checkpoint directory, rotated by orbax (the latest ``keep`` steps and the ``milestones``).

    Args:
      checkpoint_dir: the directory (``None``: no checkpoints).
      keep: how many of the latest checkpoints stay.
      milestones: epochs whose checkpoints stay forever.
      overwrite: delete every step already there.

    Returns:
      An open :class:`~mclandscape.engine.checkpoint.CheckpointStore`, or ``None``.
    """
    if checkpoint_dir is None:
        return None
    policy = pp.AnyPreservationPolicy([pp.LatestN(int(keep)), pp.CustomSteps(list(milestones))])
    store = CheckpointStore(checkpoint_dir, create=True, preservation_policy=policy)
    if overwrite:
        for s in store.all_steps():
            store.delete(s)
    return store


def resume(store: CheckpointStore, state: TrainState, fingerprint, *, epochs: int, steps_per_epoch: int,
           last_step: int, max_steps: int | None) -> tuple[TrainState, list[dict], int] | None:
    """``(state, history, epoch)`` of the newest readable checkpoint of this run, or ``None`` (a fresh run).

    Args:
      store: the open checkpoint directory.
      state: a state of the run's structure (for shapes and dtypes).
      fingerprint: the run's JSON fingerprint (``None``: not compared).
      epochs, steps_per_epoch, last_step, max_steps: the run's length (see :func:`mclandscape.engine.loop.run`).

    Returns:
      The restored state, the history up to its epoch and that epoch; raises :class:`ResumeMismatchError`
      when the directory holds another run.
    """
    where, steps = store.directory, store.all_steps()
    usable = [s for s in steps if s <= epochs]
    if steps and not usable:
        raise ResumeMismatchError(f"cannot resume from {where}: it holds epochs {steps} but the run asks for "
                                  f"{epochs}; use another checkpoint_dir, or overwrite=True to start afresh")
    failed = []
    for start in reversed(usable):  # the newest readable step
        try:
            meta = store.metadata(start)
            if meta.get("format") != FORMAT:
                raise ResumeMismatchError(f"cannot resume from {where}: step {start} was not written by the training "
                                          f"loop (format {meta.get('format')!r}); use another checkpoint_dir or "
                                          "overwrite=True")
            diff = [] if fingerprint is None else fingerprint_diff(meta.get("fingerprint"), fingerprint)
            if diff:
                raise ResumeMismatchError(f"cannot resume from {where}: it holds a different run (" + "; ".join(diff)
                                          + "). Use another checkpoint_dir, or overwrite=True to start afresh.")
            tree, meta = store.restore(start, target=target_of(state))
        except CheckpointError as e:
            failed.append((start, e))
            continue
        if failed:
            warnings.warn(f"checkpoint step {failed[0][0]} in {where} is unreadable ({failed[0][1]}); "
                          f"resuming from step {start} instead", stacklevel=2)
        ran, expected = meta.get("loop_steps"), min(start * steps_per_epoch, last_step)
        if ran is not None and ran != expected:  # checkpoints of older versions do not record it
            raise ResumeMismatchError(
                f"cannot resume from {where}: its epoch {start} ended after {ran} steps but this run's epoch "
                f"{start} ends after {expected} (steps_per_epoch={steps_per_epoch}, max_steps={max_steps}); use "
                "the settings that wrote it, another checkpoint_dir, or overwrite=True to start afresh.")
        return _from_tree(tree), [dict(h) for h in meta.get("history", [])][:start], start
    if failed:
        raise CheckpointError(f"no readable checkpoint in {where}: steps {[s for s, _ in failed]} are all "
                              f"unreadable (first error: {failed[0][1]})")
    return None


def save(store: CheckpointStore, epoch: int, state: TrainState, *, fingerprint, history: list[dict],
         loop_steps: int, metadata: Mapping | None = None) -> None:
    """Write ``epoch``'s checkpoint: the state, and the fingerprint, history and steps run in its metadata.

    Args:
      store: the open checkpoint directory.
      epoch: the epoch just ended (``0``: the initial state).
      state: the state at its end.
      fingerprint: the run's JSON fingerprint.
      history: the records so far (the latest goes in as ``metrics``).
      loop_steps: the steps run until the end of ``epoch``.
      metadata: extra JSON written with it.
    """
    meta = {**dict(metadata or {}), "format": FORMAT, "fingerprint": fingerprint, "epoch": epoch,
            "loop_steps": loop_steps, "metrics": history[-1] if history else {}, "history": history}
    store.save(epoch, _state_tree(state), meta, overwrite=True)
