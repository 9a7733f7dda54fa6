"""The one training loop: ``make_step(objective, tx)`` and :func:`run`.

Every trainer of mclandscape — endpoints (:func:`mclandscape.engine.train.train_model`), curves and surfaces
(:func:`mclandscape.engine.connector_train.train_connector`), NEB bands, DSP-TT local solves and snapshot
ensembles — is an objective, an Optax transform and a batch stream handed to these two functions.

**The step.** :func:`make_step` turns ``objective(params, batch, key) -> (loss, aux)`` and any Optax
``GradientTransformation`` into ``step(state, batch, key) -> (state, metrics)`` over a :class:`TrainState`.
A transform with Optax's extra-args interface (``GradientTransformationExtraArgs``) receives the loss value
as the extra argument ``loss``, so a :func:`mclandscape.methods.deform.scale_by_vdm` chain needs nothing
special. ``trainable`` (a pytree of
booleans, or boolean arrays broadcastable against the leaves) freezes the rest: their gradients are zeroed
and their values restored bit for bit after the update (weight decay or momentum cannot move them). For
an objective whose ``aux`` holds ``"batch_stats"`` (a BatchNorm model in train mode) the step carries the
updated statistics in ``state.model_state``. The step is one module-level ``jax.jit``; the objective is an
ordinary (pytree) argument and the transform a static one, so repeated runs compile once.

**Non-finite guard.** A step whose loss or gradient is not finite applies no update (the state stays
finite) and records the step and the first non-finite gradient leaf in ``state.nonfinite``; the loop
checks it at every epoch end, before anything is written, and raises :class:`NonFiniteError` naming both.
Metrics stay on the device between epoch ends.

**The loop.** :func:`run` runs ``epochs × steps_per_epoch`` steps over a random-access batch stream
``batches(t) -> batch`` (so resuming needs no replay), with the key of step ``t`` ``fold_in(key, t)``:
nothing depends on how many steps ran in this process, so a killed and resumed run ends bit-identical to an
uninterrupted one. ``max_steps`` ends a run inside its last epoch (a shorter last epoch, for budgets counted
in steps); ``step_callbacks`` see ``(steps completed, state)`` on the host after every step, without waiting
for the device unless they read a value (e.g. to keep a snapshot mid-epoch). Per epoch: one history record
(the step metrics ``objective``, ``loss`` — the task loss when the objective reports one in ``aux`` —
``grad_norm`` (of the trainable entries), ``acc`` and any other scalar of ``aux`` averaged over the epoch's
examples, over the steps it ran for a last epoch shortened by ``max_steps``; a scalar named ``max_*`` is the
maximum over the epoch's steps instead; plus whatever ``on_epoch`` adds), the callbacks, a checkpoint every
``checkpoint_every`` epochs (:class:`LoopConfig`), progress through tqdm (quiet when not on a terminal).

**Checkpoints and the resume contract.** A checkpoint holds the state and, in its metadata, the run's
``fingerprint`` (model spec, hyper-parameters and a digest of the fixed inputs, chosen by the trainer) and
its history. Rotation keeps the last ``keep`` epochs plus the ``milestones``. Resuming from a directory
whose fingerprint differs raises :class:`ResumeMismatchError` naming the directory and every difference
(``overwrite=True`` deletes the old steps and starts afresh). A latest step that cannot be read falls back
to the newest readable one, with a warning naming both. Every checkpoint records the steps run until its epoch,
so resuming it with another ``max_steps`` or ``steps_per_epoch`` (which would continue from the wrong step)
raises :class:`ResumeMismatchError` too.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from mclandscape.core.objective import function_objective
    >>> step = make_step(function_objective(lambda p, b: jnp.sum(p["w"] ** 2)), optax.sgd(0.25))
    >>> seen = []
    >>> res = run(step, step.init({"w": jnp.ones(1)}), lambda t: None, epochs=3, steps_per_epoch=2,
    ...           max_steps=5, key=jax.random.key(0), step_callbacks=[lambda n, state: seen.append(n)])
    >>> seen, int(res.state.step), [h["epoch"] for h in res.history]
    ([1, 2, 3, 4, 5], 5, [1, 2, 3])
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from mclandscape.core.objective import call_objective
from mclandscape.core.tree import PyTree, tree_path_names
from mclandscape.engine import cpu, distributed, optim
from mclandscape.engine.checkpoint import CheckpointError, CheckpointStore

__all__ = [
    "TrainState",
    "Step",
    "make_step",
    "LoopConfig",
    "RunResult",
    "run",
    "NonFiniteError",
    "ResumeMismatchError",
    "StopRun",
    "fingerprint_diff",
    "restore_state",
    "init_state",
    "split_static",
    "merge_static",
]

FORMAT = "mclandscape.loop/1"


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient (raised with the step and the first bad leaf).

    A ``FloatingPointError``. :func:`run` raises it at the end of the epoch in which the first non-finite step
    happened, before anything of that epoch is saved; the offending step itself applied no update.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from mclandscape.core.objective import function_objective
        >>> step = make_step(function_objective(lambda p, b: jnp.sum(jnp.log(p["w"]))), optax.sgd(0.1))
        >>> run(step, step.init({"w": -jnp.ones(1)}), lambda t: None, epochs=1, steps_per_epoch=1,
        ...     key=jax.random.key(0))
        Traceback (most recent call last):
        ...
        mclandscape.engine.loop.NonFiniteError: training stopped: the loss is not finite at step 0 (epoch 1, batch 0)...
    """


class ResumeMismatchError(ValueError):
    """A checkpoint directory holds a different run than the one asked for (a ``ValueError``).

    Raised by :func:`run` when the stored fingerprint differs from the new one; the message names the directory
    and every difference (see the example of :func:`run`).

    Example:
        >>> issubclass(ResumeMismatchError, ValueError)
        True
    """


class StopRun(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a callback to end a run after the current epoch (e.g. converged).

    The run returns normally with ``RunResult.stopped`` set to that epoch; its checkpoint, if any, has already
    been written.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from mclandscape.core.objective import function_objective
        >>> step = make_step(function_objective(lambda p, b: jnp.sum(p["w"] ** 2)), optax.sgd(0.1))
        >>> def stop_early(epoch, state, history):
        ...     if history[-1]["loss"] < 0.5:
        ...         raise StopRun
        >>> res = run(step, step.init({"w": jnp.ones(1)}), lambda t: None, epochs=10, steps_per_epoch=1,
        ...           key=jax.random.key(0), callbacks=[stop_early])
        >>> res.stopped, len(res.history)
        (3, 3)
    """


@struct.dataclass(eq=False)  # holds arrays: hashed by identity, like a jax.Array
class TrainState:
    """What a training step carries from one step to the next (a pytree).

    Attributes:
      step: the number of steps taken (int32 scalar).
      params: the parameters being trained.
      opt_state: the Optax state.
      model_state: the fixed collections a BatchNorm model updates (``{"batch_stats": ...}``) or ``None``.
      nonfinite: ``[step, leaf, loss_bad]`` of the first non-finite step (``-1`` everywhere while every step was
        finite).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> state = init_state({"w": jnp.zeros(2)}, optax.sgd(0.1))
        >>> int(state.step), state.nonfinite.tolist()
        (0, [-1, -1, -1])
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    model_state: PyTree = None
    nonfinite: jax.Array = None


def init_state(params: PyTree, tx: optax.GradientTransformation, model_state: PyTree | None = None) -> TrainState:
    """The :class:`TrainState` before the first step of ``tx`` from ``params``.

    Args:
      params: the initial parameters (copied: the caller's arrays stay valid when a step donates its buffers).
      tx: the Optax transform whose state is initialised.
      model_state: the fixed collections a BatchNorm model updates, or ``None``.

    Returns:
      A :class:`TrainState` at step 0.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> state = init_state({"w": jnp.ones(3)}, optax.adam(1e-3))
        >>> int(state.step), state.params["w"].shape
        (0, (3,))
    """
    params = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      model_state=model_state, nonfinite=jnp.full((3,), -1, jnp.int32))


def split_static(tree) -> tuple[Any, tuple]:
    """Split a pytree into a hashable static part and its array leaves (the way a jitted step takes an objective).

    Args:
      tree: any pytree (e.g. an :class:`~mclandscape.core.objective.Objective`).

    Returns:
      ``(static, arrays)``: the tree definition and non-array leaves (hashable, a static jit argument) and the
      tuple of array leaves (traced). :func:`merge_static` inverts it.

    Example:
        >>> import numpy as np
        >>> static, arrays = split_static({"a": np.ones(2), "name": "mlp"})
        >>> len(arrays), merge_static(static, arrays)["name"]
        (1, 'mlp')
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    is_arr = tuple(isinstance(x, jax.Array | np.ndarray | np.generic | int | float | complex) and
                   not isinstance(x, bool) for x in leaves)
    static = (treedef, is_arr, tuple(None if a else x for a, x in zip(is_arr, leaves, strict=True)))
    return static, tuple(x for a, x in zip(is_arr, leaves, strict=True) if a)


def merge_static(static, arrays):
    """Inverse of :func:`split_static`: rebuild the tree from its static part and its array leaves.

    Args:
      static: the first value :func:`split_static` returned.
      arrays: the array leaves, in order (possibly traced).

    Returns:
      The pytree.

    Example:
        >>> import numpy as np
        >>> static, arrays = split_static({"a": np.ones(2), "name": "mlp"})
        >>> merge_static(static, (np.zeros(2),))["a"].tolist()
        [0.0, 0.0]
    """
    treedef, is_arr, others = static
    it = iter(arrays)
    return jax.tree_util.tree_unflatten(treedef, [next(it) if a else o for a, o in zip(is_arr, others, strict=True)])


def _mask_like(trainable, params):
    """Boolean masks shaped to broadcast against every leaf of ``params`` (``None``: all trainable)."""
    if trainable is None:
        return None
    return jax.tree_util.tree_map(lambda m, p: jnp.broadcast_to(jnp.asarray(m, bool).reshape(
        jnp.shape(m) + (1,) * (jnp.ndim(p) - jnp.ndim(m))), jnp.shape(p)) if jnp.ndim(m) else jnp.asarray(m, bool),
        trainable, params)


def _step_impl(objective_static, tx, mesh, objective_arrays, trainable, state: TrainState, batch, key):
    objective = merge_static(objective_static, objective_arrays)
    if state.model_state is not None and hasattr(objective, "with_state"):
        objective = objective.with_state(state.model_state)
    (value, aux), grads = jax.value_and_grad(lambda p, b, k: call_objective(objective, p, b, k),
                                             has_aux=True)(state.params, batch, key)
    mask = _mask_like(trainable, state.params)
    if mask is not None:
        grads = jax.tree_util.tree_map(lambda g, m: jnp.where(m, g, jnp.zeros_like(g)), grads, mask)
    leaf_ok = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)] or [jnp.array(True)])
    loss_ok = jnp.isfinite(value)
    ok = loss_ok & jnp.all(leaf_ok)
    if isinstance(optim.unwrap(tx), optax.GradientTransformationExtraArgs):
        updates, opt_state = tx.update(grads, state.opt_state, state.params, loss=value)
    else:
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if mask is not None:
        params = jax.tree_util.tree_map(lambda new, old, m: jnp.where(m, new, old), params, state.params, mask)
    model_state = state.model_state
    if isinstance(aux, Mapping) and "batch_stats" in aux and model_state is not None:
        model_state = {**model_state, "batch_stats": aux["batch_stats"]}
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    first_bad = jnp.argmin(leaf_ok).astype(jnp.int32)
    record = jnp.stack([state.step.astype(jnp.int32), jnp.where(jnp.all(leaf_ok), -1, first_bad),
                        (~loss_ok).astype(jnp.int32)])
    nonfinite = jnp.where((state.nonfinite[0] < 0) & ~ok, record, state.nonfinite)
    new = TrainState(step=state.step + 1, params=keep(params, state.params),
                     opt_state=keep(opt_state, state.opt_state),
                     model_state=None if model_state is None else keep(model_state, state.model_state),
                     nonfinite=nonfinite)
    metrics = {"objective": value, "loss": value, "grad_norm": optax.tree.norm(grads)}
    if isinstance(aux, Mapping):
        metrics.update({k: v for k, v in aux.items() if k not in ("batch_stats", "correct") and jnp.ndim(v) == 0})
        if "correct" in aux and "count" in aux:
            metrics["acc"] = aux["correct"] / jnp.maximum(aux["count"], 1)
    if mesh is not None:  # one update, the same on every device: the state stays replicated
        rep = NamedSharding(mesh, P())
        new, metrics = jax.lax.with_sharding_constraint((new, metrics), rep)
    return new, metrics


_step_jit = jax.jit(_step_impl, static_argnames=("objective_static", "tx", "mesh"),
                    compiler_options=cpu.COMPILER_OPTIONS)


def _accumulate(sums: dict, metrics: dict) -> dict:
    """Epoch sums of the step metrics, weighted by the batch's example count (``max_*``: running maxima)."""
    metrics = dict(metrics)
    w = metrics.pop("count", None)
    w = jnp.ones((), jnp.float32) if w is None else w.astype(jnp.float32)
    out = {k: (jnp.maximum(sums[k], v) if k.startswith("max_") else sums[k] + v * w) for k, v in metrics.items()}
    out["__weight__"] = sums["__weight__"] + w
    return out


def _zero_sums(metrics: Mapping) -> dict:
    zeros = {k: (jnp.full((), -jnp.inf, jnp.float32) if k.startswith("max_") else jnp.zeros((), jnp.float32))
             for k in metrics if k != "count"}
    zeros["__weight__"] = jnp.zeros((), jnp.float32)
    return zeros


_accumulate_jit = jax.jit(_accumulate)


def _loop_step_impl(objective_static, tx, mesh, objective_arrays, trainable, state, batch, key, t, sums):
    # the loop's step: the key of step t, the step, and the epoch sums in one compiled call, so a step of a
    # small problem costs one dispatch instead of one per metric
    new, metrics = _step_impl(objective_static, tx, mesh, objective_arrays, trainable, state, batch,
                              jax.random.fold_in(key, t))
    return new, _accumulate(sums, metrics)


_loop_step_jit = jax.jit(_loop_step_impl, static_argnames=("objective_static", "tx", "mesh"),
                         compiler_options=cpu.COMPILER_OPTIONS)


@dataclasses.dataclass(frozen=True, eq=False)
class Step:
    """``step(state, batch, key) -> (state, metrics)`` for one objective and transform (made by :func:`make_step`).

    Attributes:
      objective: ``objective(params, batch, key) -> (loss, aux)``.
      tx: the Optax transform.
      trainable: the trainable mask, or ``None``.
      mesh: the device mesh the step runs on, or ``None`` (one device).
      data_axis: the mesh axis a batch is split over.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from mclandscape.core.objective import function_objective
        >>> step = make_step(function_objective(lambda p, b: jnp.sum(p["w"] ** 2)), optax.sgd(0.5),
        ...                  trainable={"w": jnp.array([True, False])})
        >>> state, _ = step(step.init({"w": jnp.ones(2)}), None, jax.random.key(0))
        >>> state.params["w"].tolist()
        [0.0, 1.0]
    """

    objective: Callable
    tx: optax.GradientTransformation
    trainable: PyTree | None = None
    mesh: jax.sharding.Mesh | None = None
    data_axis: str = "data"

    def init(self, params: PyTree, model_state: PyTree | None = None) -> TrainState:
        """The state before the first step (:func:`init_state` with this step's transform).

        Args:
          params: the initial parameters.
          model_state: the fixed collections a BatchNorm model updates, or ``None``.

        Returns:
          A :class:`TrainState`.
        """
        return init_state(params, self.tx, model_state)

    def place(self, batch):
        """The batch as global arrays on this step's mesh.

        Args:
          batch: a pytree of host or device arrays.

        Returns:
          The batch split along its first axis over the mesh's data axis where that axis divides it, replicated
          otherwise (e.g. a smaller last batch).
        """
        n = self.mesh.shape[self.data_axis] if self.data_axis in self.mesh.axis_names else 1
        split, rep = NamedSharding(self.mesh, P(self.data_axis)), NamedSharding(self.mesh, P())
        return jax.tree_util.tree_map(
            lambda a: distributed.put(a, split if n > 1 and jnp.ndim(a) and jnp.shape(a)[0] % n == 0 else rep), batch)

    def _arguments(self, state, batch, key) -> dict:
        static, arrays = split_static(self.objective)
        trainable = self.trainable
        if self.mesh is not None:
            state, arrays, trainable, key = distributed.put((state, arrays, trainable, key),
                                                            NamedSharding(self.mesh, P()))
            batch = self.place(batch)
        return dict(objective_static=static, tx=self.tx, mesh=self.mesh, objective_arrays=arrays,
                    trainable=trainable, state=state, batch=batch, key=key)

    def __call__(self, state: TrainState, batch, key) -> tuple[TrainState, dict]:
        return _step_jit(**self._arguments(state, batch, key))

    def zero_sums(self, state: TrainState, batch, key) -> dict:
        """Zeros shaped like the epoch sums :meth:`step_and_sum` accumulates (traced abstractly, nothing runs).

        Args:
          state, batch, key: arguments of one step.

        Returns:
          A dict of float32 zeros (``-inf`` for ``max_*`` metrics) with the key ``"__weight__"``.
        """
        args = self._arguments(state, batch, key)
        static = {k: args.pop(k) for k in ("objective_static", "tx", "mesh")}
        return _zero_sums(jax.eval_shape(lambda dynamic: _step_impl(**static, **dynamic)[1], args))

    def step_and_sum(self, state: TrainState, batch, key, t: int, sums: dict) -> tuple[TrainState, dict]:
        """One step with the key ``fold_in(key, t)``, its metrics added to the epoch ``sums`` (the loop's path).

        Args:
          state: the current :class:`TrainState`.
          batch: the batch of step ``t``.
          key: the run's base key.
          t: the global step number.
          sums: the epoch sums so far (from :meth:`zero_sums`).

        Returns:
          ``(new_state, new_sums)``, in one compiled call.
        """
        args = self._arguments(state, batch, key)
        if self.mesh is not None:
            sums = distributed.put(sums, NamedSharding(self.mesh, P()))
        return _loop_step_jit(**args, t=np.int32(t), sums=sums)

    def memory(self, state: TrainState, batch, key) -> dict:
        """The compiled step's memory per device from XLA's analysis (compiles, does not run).

        Args:
          state, batch, key: arguments of one step.

        Returns:
          A dict of ``argument_bytes``, ``output_bytes``, ``temp_bytes``, ``alias_bytes`` and their total
          ``peak_bytes``.
        """
        m = _step_jit.lower(**self._arguments(state, batch, key)).compile().memory_analysis()
        return {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
                "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes),
                "peak_bytes": int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                                  - m.alias_size_in_bytes)}


def make_step(objective: Callable, tx: optax.GradientTransformation, *, trainable: PyTree | None = None,
              mesh: jax.sharding.Mesh | None = None, data_axis: str = "data") -> Step:
    """One gradient step of ``objective`` with the Optax transform ``tx`` (see the module docstring).

    Args:
      objective: ``objective(params, batch, key) -> (loss, aux)``.
      tx: any ``optax.GradientTransformation`` (extra arguments are passed as ``loss=``), or one named by value
        (:func:`mclandscape.engine.optim.transform`: equal settings share the compiled step).
      trainable: ``None`` (everything trains) or a pytree shaped like the parameters whose leaves are booleans
        or boolean arrays broadcastable from the left (e.g. ``[K]`` for control points ``[K, ...]``).
      mesh: train on the devices of this mesh (:func:`mclandscape.engine.distributed.training_mesh`; across
        processes in a multi-process job): each batch is split over its ``data_axis``, the state is
        replicated, XLA reduces the gradients across the devices, and every device applies the same update.
      data_axis: the name of the mesh axis a batch is split over.

    Returns:
      A :class:`Step`. Raises ``ValueError`` when ``objective`` is not callable, ``tx`` is not an Optax
      transform or ``mesh`` is not a ``jax.sharding.Mesh``.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from mclandscape.core.objective import function_objective
        >>> step = make_step(function_objective(lambda p, b: jnp.sum((p["w"] - b) ** 2)), optax.sgd(0.25))
        >>> state = step.init({"w": jnp.zeros(2)})
        >>> state, metrics = step(state, jnp.ones(2), jax.random.key(0))
        >>> state.params["w"].tolist(), float(metrics["loss"])
        ([0.5, 0.5], 2.0)
    """
    if not callable(objective):
        raise ValueError(f"objective must be callable (params, batch, key) -> (loss, aux), got {objective!r}")
    if not isinstance(optim.unwrap(tx), optax.GradientTransformation):
        raise ValueError(f"tx must be an optax GradientTransformation (or optim.transform), got {type(tx).__name__}")
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    return Step(objective=objective, tx=tx, trainable=trainable, mesh=mesh, data_axis=data_axis)


# ---- the loop -------------------------------------------------------------------------------------------

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
        object.__setattr__(self, "milestones", tuple(sorted({int(m) for m in self.milestones})))
        for name in ("checkpoint_every", "keep"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if any(m < 0 for m in self.milestones):
            raise ValueError(f"milestones must be epochs >= 0, got {self.milestones}")


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
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += fingerprint_diff(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{where}.{k}" if where else str(k))
        return out
    if isinstance(old, list | tuple) and isinstance(new, list | tuple) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            out += fingerprint_diff(a, b, f"{where}[{i}]")
        return out
    same = old == new or (isinstance(old, float) and isinstance(new, float) and math.isnan(old) and math.isnan(new))
    return [] if same else [f"{where or '<root>'}: checkpoint {old!r} vs now {new!r}"]


def _jsonify(obj):
    """Tuples become lists (what a JSON round trip does), so fingerprints compare as stored."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonify(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonify(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _state_tree(state: TrainState) -> dict:
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state, "nonfinite": state.nonfinite}
    if state.model_state is not None:
        tree["model_state"] = state.model_state
    return tree


def _from_tree(tree: dict) -> TrainState:
    return TrainState(step=jnp.asarray(tree["step"]), params=tree["params"], opt_state=tree["opt_state"],
                      model_state=tree.get("model_state"), nonfinite=jnp.asarray(tree["nonfinite"]))


def _restore_latest(store: CheckpointStore, target, fingerprint, directory, max_epoch: int):
    """``(state, metadata, epoch)`` of the newest readable step ``<= max_epoch`` (``None`` when there is none)."""
    steps = store.all_steps()
    later = [s for s in steps if s > max_epoch]
    steps = [s for s in steps if s <= max_epoch]
    if later and not steps:
        raise ResumeMismatchError(f"cannot resume from {directory}: it holds epochs {later} but the run asks for "
                                  f"{max_epoch}; use another checkpoint_dir, or overwrite=True to start afresh")
    failed = []
    for s in reversed(steps):
        try:
            meta = store.metadata(s)
        except CheckpointError as e:
            failed.append((s, e))
            continue
        if meta.get("format") != FORMAT:
            raise ResumeMismatchError(f"cannot resume from {directory}: step {s} was not written by the "
                                      f"training loop (format {meta.get('format')!r}); use another checkpoint_dir "
                                      "or overwrite=True")
        if fingerprint is not None:
            diff = fingerprint_diff(meta.get("fingerprint"), fingerprint)
            if diff:
                raise ResumeMismatchError(f"cannot resume from {directory}: it holds a different run ("
                                          + "; ".join(diff) + "). Use another checkpoint_dir, or overwrite=True "
                                          "to start afresh.")
        try:
            tree, meta = store.restore(s, target=target)
        except CheckpointError as e:
            failed.append((s, e))
            continue
        if failed:
            warnings.warn(f"checkpoint step {failed[0][0]} in {directory} is unreadable ({failed[0][1]}); "
                          f"resuming from step {s} instead", stacklevel=3)
        return _from_tree(tree), meta, s
    if failed:
        raise CheckpointError(f"no readable checkpoint in {directory}: steps {[s for s, _ in failed]} are all "
                              f"unreadable (first error: {failed[0][1]})")
    return None


def _target(state: TrainState):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), _state_tree(state))


def restore_state(directory: str | os.PathLike, epoch: int, like: TrainState) -> TrainState:
    """The state saved at ``epoch`` in a run's checkpoint directory (e.g. a milestone kept by :class:`LoopConfig`).

    Args:
      directory: the run's ``checkpoint_dir``.
      epoch: the saved epoch to read.
      like: a :class:`TrainState` of the same structure (e.g. ``step.init(params)``), for shapes and dtypes.

    Returns:
      The :class:`TrainState` of that epoch.

    Example:
        >>> import jax, jax.numpy as jnp, optax, tempfile
        >>> from mclandscape.core.objective import function_objective
        >>> step = make_step(function_objective(lambda p, b: jnp.sum(p["w"] ** 2)), optax.sgd(0.25))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = run(step, step.init({"w": jnp.ones(1)}), lambda t: None, epochs=2, steps_per_epoch=1,
        ...             key=jax.random.key(0), config=LoopConfig(checkpoint_dir=d, milestones=(1,)))
        ...     first = restore_state(d, 1, step.init({"w": jnp.ones(1)}))
        >>> int(first.step), first.params["w"].tolist()
        (1, [0.5])
    """
    with CheckpointStore(directory, create=False) as store:
        tree, _ = store.restore(int(epoch), target=_target(like))
    return _from_tree(tree)


def _check_finite_state(state: TrainState, names: list[str], epoch: int, steps_per_epoch: int) -> None:
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


def _progress_enabled(progress: bool | None) -> bool:
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(progress)


def run(step: Step, state: TrainState, batches: Callable[[int], Any], *, epochs: int, steps_per_epoch: int,
        key: jax.Array, config: LoopConfig = LoopConfig(), fingerprint: Mapping | None = None,
        callbacks: Sequence[Callable[[int, TrainState, list], None]] = (),
        on_epoch: Callable[[int, TrainState, dict], dict] | None = None, metadata: Mapping | None = None,
        max_steps: int | None = None, step_callbacks: Sequence[Callable[[int, TrainState], None]] = ()
        ) -> RunResult:
    """Run ``epochs`` epochs of ``steps_per_epoch`` steps (``max_steps`` in all), with checkpoints and resume.

    See the module docstring.

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
      :class:`ResumeMismatchError` when ``config.checkpoint_dir`` holds a run with another fingerprint (or whose
      epoch ends fall on other step counts: another ``steps_per_epoch`` or ``max_steps``).

    Example:
        >>> import jax, jax.numpy as jnp, optax, tempfile
        >>> from mclandscape.core.objective import function_objective
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
    for name, v in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
        if isinstance(v, bool) or int(v) != v or v < (0 if name == "epochs" else 1):
            raise ValueError(f"{name} must be an integer >= {0 if name == 'epochs' else 1}, got {v!r}")
    epochs, spe = int(epochs), int(steps_per_epoch)
    last_step = epochs * spe  # steps run in all (exclusive end of t)
    if max_steps is not None:
        if isinstance(max_steps, bool) or int(max_steps) != max_steps or \
                not (epochs - 1) * spe < int(max_steps) <= last_step:
            raise ValueError(f"max_steps must be an integer in ({(epochs - 1) * spe}, {last_step}] for {epochs} "
                             f"epochs of {spe} steps, got {max_steps!r}")
        last_step = int(max_steps)
    fingerprint = None if fingerprint is None else _jsonify(dict(fingerprint))
    names = tree_path_names(state.params)
    history: list[dict] = []
    start = 0
    resumed_from = stopped = None
    store = None
    if config.checkpoint_dir is not None:
        store = CheckpointStore(config.checkpoint_dir, create=True)

    def save(e1: int) -> None:
        meta = {**dict(metadata or {}), "format": FORMAT, "fingerprint": fingerprint, "epoch": e1,
                "loop_steps": min(e1 * spe, last_step), "metrics": history[-1] if history else {},
                "history": history}
        store.save(e1, _state_tree(state), meta, overwrite=True)
        _rotate(store, config)

    try:
        if store is not None:
            if config.overwrite:
                for s in store.all_steps():
                    store.delete(s)
            restored = _restore_latest(store, _target(state), fingerprint, config.checkpoint_dir, epochs)
            if restored is not None:
                state, meta, start = restored
                ran, expected = meta.get("loop_steps"), min(start * spe, last_step)
                if ran is not None and ran != expected:  # checkpoints of older versions do not record it
                    raise ResumeMismatchError(
                        f"cannot resume from {config.checkpoint_dir}: its epoch {start} ended after {ran} steps but "
                        f"this run's epoch {start} ends after {expected} (steps_per_epoch={spe}, max_steps="
                        f"{max_steps}); use the settings that wrote it, another checkpoint_dir, or overwrite=True "
                        "to start afresh.")
                history = [dict(h) for h in meta.get("history", [])][:start]
                resumed_from = start
            elif 0 in config.milestones:
                save(0)
        bar = tqdm(total=epochs, initial=start, disable=not _progress_enabled(config.progress), leave=False,
                   desc=config.desc, unit="epoch", dynamic_ncols=True)
        try:
            zeros = None
            for epoch in range(start, epochs):
                t0 = time.perf_counter()
                sums = None
                for t in range(epoch * spe, min((epoch + 1) * spe, last_step)):
                    batch = batches(t)
                    if not hasattr(step, "step_and_sum"):  # any other step(state, batch, key) callable
                        state, metrics = step(state, batch, jax.random.fold_in(key, t))
                        sums = _accumulate_jit(_zero_sums(metrics) if sums is None else sums, metrics)
                    else:
                        if sums is None:
                            zeros = step.zero_sums(state, batch, key) if zeros is None else zeros
                            sums = zeros
                        state, sums = step.step_and_sum(state, batch, key, t, sums)
                    for cb in step_callbacks:
                        cb(t + 1, state)
                _check_finite_state(state, names, epoch, spe)
                e1 = epoch + 1
                host = {k: float(v) for k, v in jax.device_get(sums).items()}
                total = host.pop("__weight__")  # examples in the epoch: epoch means are example means
                raw = {**{k: v if k.startswith("max_") else v / total for k, v in host.items()},
                       "seconds": time.perf_counter() - t0}
                record = {"epoch": e1, **(on_epoch(e1, state, raw) if on_epoch is not None else raw)}
                history.append(record)
                if store is not None and (e1 % config.checkpoint_every == 0 or e1 == epochs or
                                          e1 in config.milestones):
                    save(e1)
                bar.update(1)
                shown = {k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "train_loss", "test_acc")}
                bar.set_postfix(**shown)
                try:
                    for cb in callbacks:
                        cb(e1, state, history)
                except StopRun:
                    stopped = e1
                    break
        finally:
            bar.close()
    finally:
        if store is not None:
            store.close()
    return RunResult(state=distributed.local(state), history=history, resumed_from=resumed_from, stopped=stopped)


def _rotate(store: CheckpointStore, config: LoopConfig) -> None:
    steps = store.all_steps()
    rolling = [s for s in steps if s not in config.milestones]
    for s in rolling[:-config.keep]:
        store.delete(s)
