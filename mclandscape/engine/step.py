"""The one training step: ``make_step(objective, tx)`` turns an objective and an Optax transform into a step.

:func:`make_step` turns ``objective(params, batch, key) -> (loss, aux)`` and any Optax
``GradientTransformation`` into ``step(state, batch, key) -> (state, metrics)`` over a :class:`TrainState`.
A transform with Optax's extra-args interface (``GradientTransformationExtraArgs``) receives the loss value
as the extra argument ``loss``, so a :func:`mclandscape.methods.deform.scale_by_vdm` chain needs nothing
special. ``trainable`` (a pytree of booleans, or boolean arrays broadcastable against the leaves) freezes the
rest: their gradients are zeroed and their values restored bit for bit after the update (weight decay or
momentum cannot move them). For an objective whose ``aux`` holds ``"batch_stats"`` (a BatchNorm model in
train mode) the step carries the updated statistics in ``state.model_state``. The step is one module-level
``jax.jit``; the objective is an ordinary (pytree) argument and the transform a static one, so repeated runs
compile once.

**Non-finite guard.** A step whose loss or gradient is not finite applies no update (the state stays
finite) and records the step and the first non-finite gradient leaf in ``state.nonfinite``; the loop
(:func:`mclandscape.engine.loop.run`) checks it at every epoch end, before anything is written, and raises
:class:`~mclandscape.engine.loop.NonFiniteError` naming both. Metrics stay on the device between epoch ends.

**Metrics.** ``objective``, ``loss`` (the task loss when the objective reports one in ``aux``),
``grad_norm`` (of the trainable entries), ``acc`` (``aux["correct"] / aux["count"]``: example weights may be
fractional) and any other scalar of ``aux``; ``aux["count"]`` weighs the step in the epoch's averages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mclandscape.core.objective import call_objective, per_count
from mclandscape.core.tree import PyTree
from mclandscape.engine import cpu, distributed, mapping, optim

__all__ = ["TrainState", "Step", "make_step", "init_state", "split_static", "merge_static", "MembersObjective"]


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


def _step_impl(objective_static, tx, mesh, objective_arrays, trainable, state: TrainState, batch, key):
    objective = merge_static(objective_static, objective_arrays)
    if state.model_state is not None and hasattr(objective, "with_state"):
        objective = objective.with_state(state.model_state)
    (value, aux), grads = jax.value_and_grad(lambda p, b, k: call_objective(objective, p, b, k),
                                             has_aux=True)(state.params, batch, key)
    if trainable is not None:  # boolean masks broadcast from the left, e.g. [K] over control points [K, ...]
        mask = jax.tree_util.tree_map(lambda m, p: jnp.reshape(jnp.asarray(m, bool), jnp.shape(m) + (1,) * (
            jnp.ndim(p) - jnp.ndim(m))), trainable, state.params)
        grads = jax.tree_util.tree_map(lambda g, m: jnp.where(m, g, jnp.zeros_like(g)), grads, mask)
    leaf_ok = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)] or [jnp.array(True)])
    loss_ok = jnp.isfinite(value)
    ok = loss_ok & jnp.all(leaf_ok)
    extra = {"loss": value} if isinstance(optim.unwrap(tx), optax.GradientTransformationExtraArgs) else {}
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
    params = optax.apply_updates(state.params, updates)
    if trainable is not None:
        params = jax.tree_util.tree_map(lambda new, old, m: jnp.where(m, new, old), params, state.params, mask)
    model_state = state.model_state
    if isinstance(aux, Mapping) and "batch_stats" in aux and model_state is not None:
        model_state = {**model_state, "batch_stats": aux["batch_stats"]}
    first_bad = jnp.argmin(leaf_ok).astype(jnp.int32)
    record = jnp.stack([state.step.astype(jnp.int32), jnp.where(jnp.all(leaf_ok), -1, first_bad),
                        (~loss_ok).astype(jnp.int32)])
    nonfinite = jnp.where((state.nonfinite[0] < 0) & ~ok, record, state.nonfinite)
    kept = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), (params, opt_state, model_state),
                                  (state.params, state.opt_state, state.model_state))  # a non-finite step: no update
    new = TrainState(state.step + 1, *kept, nonfinite=nonfinite)
    metrics = {"objective": value, "loss": value, "grad_norm": optax.tree.norm(grads)}
    if isinstance(aux, Mapping):
        metrics.update({k: v for k, v in aux.items() if k not in ("batch_stats", "correct") and jnp.ndim(v) == 0})
        if "correct" in aux and "count" in aux:  # fractional example weights: a count below 1 is not clipped
            metrics["acc"] = jnp.where(aux["count"] > 0, per_count(aux["correct"], aux["count"]), 0.0)  # weight 0
    if mesh is not None:  # one update, the same on every device: the state stays replicated
        rep = NamedSharding(mesh, P())
        new, metrics = jax.lax.with_sharding_constraint((new, metrics), rep)
    return new, metrics


_step_jit = jax.jit(_step_impl, static_argnames=("objective_static", "tx", "mesh"),
                    compiler_options=cpu.COMPILER_OPTIONS)


def accumulate(sums: dict, metrics: dict) -> dict:
    """Epoch sums of the step metrics, weighted by the batch's example count (``max_*``: running maxima)."""
    w = jnp.asarray(metrics.get("count", 1.0), jnp.float32)
    out = {k: (jnp.maximum(sums[k], v) if k.startswith("max_") else sums[k] + v * w)
           for k, v in metrics.items() if k != "count"}
    return {**out, "__weight__": sums["__weight__"] + w}


def zero_sums_like(metrics: Mapping) -> dict:
    return {k: (jnp.full((), -jnp.inf, jnp.float32) if k.startswith("max_") else jnp.zeros((), jnp.float32))
            for k in [*metrics, "__weight__"] if k != "count"}


accumulate_jit = jax.jit(accumulate)


def _loop_step_impl(objective_static, tx, mesh, objective_arrays, trainable, state, batch, key, t, sums):
    # the loop's step: the key of step t, the step, and the epoch sums in one compiled call, so a step of a
    # small problem costs one dispatch instead of one per metric
    new, metrics = _step_impl(objective_static, tx, mesh, objective_arrays, trainable, state, batch,
                              jax.random.fold_in(key, t))
    return new, accumulate(sums, metrics)


_loop_step_jit = jax.jit(_loop_step_impl, static_argnames=("objective_static", "tx", "mesh"),
                         compiler_options=cpu.COMPILER_OPTIONS)


def memory_stats(compiled) -> dict:
    """XLA's memory analysis of a compiled computation, per device: ``argument_bytes``, ``output_bytes``,
    ``temp_bytes``, ``alias_bytes`` and their total less aliasing, ``peak_bytes``."""
    m = compiled.memory_analysis()
    out = {f"{k}_bytes": int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    return {**out, "peak_bytes": out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]}


@dataclasses.dataclass(frozen=True, eq=False)
class Step:
    """``step(state, batch, key) -> (state, metrics)`` for one objective and transform (made by :func:`make_step`).

    Attributes:
      objective: ``objective(params, batch, key) -> (loss, aux)``.
      tx: the Optax transform.
      trainable: the trainable mask, or ``None``.
      mesh: the device mesh the step runs on, or ``None`` (one device).

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
        n = self.mesh.shape.get("data", 1)
        split, rep = NamedSharding(self.mesh, P("data")), NamedSharding(self.mesh, P())
        return jax.tree_util.tree_map(
            lambda a: distributed.put(a, split if n > 1 and jnp.ndim(a) and jnp.shape(a)[0] % n == 0 else rep), batch)

    def _arguments(self, state, batch, key, **extra) -> dict:
        static, arrays = split_static(self.objective)
        trainable = self.trainable
        if self.mesh is not None:  # everything but the batch replicated
            state, arrays, trainable, key, extra = distributed.put((state, arrays, trainable, key, extra),
                                                                   NamedSharding(self.mesh, P()))
            batch = self.place(batch)
        return dict(objective_static=static, tx=self.tx, mesh=self.mesh, objective_arrays=arrays,
                    trainable=trainable, state=state, batch=batch, key=key, **extra)

    def __call__(self, state: TrainState, batch, key) -> tuple[TrainState, dict]:
        return _step_jit(**self._arguments(state, batch, key))

    def zero_sums(self, state: TrainState, batch, key) -> dict:
        """Zeros shaped like the epoch sums :meth:`step_and_sum` accumulates (traced abstractly, nothing runs).

        Args:
          state, batch, key: arguments of one step.

        Returns:
          A dict of float32 zeros (``-inf`` for ``max_*`` metrics) with the key ``"__weight__"``.
        """
        return zero_sums_like(_step_jit.eval_shape(**self._arguments(state, batch, key))[1])

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
        return _loop_step_jit(**self._arguments(state, batch, key, sums=sums), t=np.int32(t))

    def memory(self, state: TrainState, batch, key) -> dict:
        """The compiled step's memory per device from XLA's analysis (compiles, does not run).

        Args:
          state, batch, key: arguments of one step.

        Returns:
          A dict of ``argument_bytes``, ``output_bytes``, ``temp_bytes``, ``alias_bytes`` and their total
          ``peak_bytes``.
        """
        return memory_stats(_step_jit.lower(**self._arguments(state, batch, key)).compile())


@struct.dataclass(eq=False)  # holds arrays: hashed by identity, like a jax.Array
class MembersObjective:
    """The objective of S independent members trained in one step: the sum of their own objectives.

    The gradient of the sum with respect to the stacked parameters is every member's own gradient, so one
    :func:`make_step` over this objective and a transform applied per member (each
    member's optimizer state stacked likewise) trains S independent runs at once.

    Attributes:
      inner: one member's objective ``inner(params, batch, key) -> (loss, aux)`` (e.g.
        :func:`~mclandscape.core.objective.make_objective` in train mode).
      keys: ``[S]`` the members' dropout keys; member ``s`` at step ``t`` gets ``fold_in(keys[s], t)``, the key
        :func:`~mclandscape.engine.train.train_model` with its seed uses.
      state: the members' stacked fixed collections (``{"batch_stats": [S, ...]}``) or ``None``.
      members: ``"vmap"`` (the members vmapped) or ``"unroll"`` (written out one after another in the compiled
        step, so a convolution keeps its own kernel instead of becoming a grouped one). With a mesh whose
        ``"points"`` axis has several devices the members are vmapped and split over that axis.
      mesh: the step's ``("points", "data")`` mesh, or ``None``.

    The batch is ``(data, t)``: every leaf of ``data`` is ``[B, S, ...]`` (member ``s`` reads ``data[:, s]``,
    its own stream's batch) and ``t`` is the global step. ``aux``: ``loss`` (the members' mean task loss),
    ``count`` (examples per member), per member ``member<i>_loss`` and ``member<i>_acc``, and the stacked
    ``batch_stats`` of a BatchNorm model.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> def inner(p, b, key):  # one member: (loss, aux with the task loss and the example count)
        ...     loss = jnp.sum((p["w"] - b[0]) ** 2)
        ...     return loss, {"loss": loss, "count": jnp.asarray(1.0)}
        >>> obj = MembersObjective(inner=inner, keys=jax.random.split(jax.random.key(0), 2))
        >>> data = (jnp.array([[1.0, 2.0]]), jnp.ones((1, 2)), jnp.ones((1, 2)))   # [B=1, S=2]
        >>> loss, aux = obj({"w": jnp.zeros(2)}, (data, 0), None)
        >>> float(loss), round(float(aux["member1_loss"]), 3)
        (5.0, 4.0)
    """

    inner: Callable
    keys: jax.Array
    state: PyTree = None
    members: str = struct.field(pytree_node=False, default="vmap")
    mesh: jax.sharding.Mesh | None = struct.field(pytree_node=False, default=None)

    def with_state(self, state: PyTree) -> MembersObjective:
        """The same objective with the members' stacked fixed collections."""
        return self.replace(state=state)

    def __call__(self, params, batch, key=None):
        data, t = batch
        n = self.keys.shape[0]
        keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(self.keys)
        state = self.state
        split = self.mesh is not None and self.mesh.shape.get("points", 1) > 1
        if split:  # the members split over the mesh's points axis (the vmapped axis below)
            params, keys, state = jax.lax.with_sharding_constraint((params, keys, state),
                                                                   NamedSharding(self.mesh, P("points")))

        def one(p, st, b, k):
            return call_objective(self.inner if st is None else self.inner.with_state(st), p, b, k)

        per_member = (params, state, jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, 1, 0), data), keys)
        values, aux = mapping.map_over(lambda a: one(*a), per_member, "vmap" if split else self.members)
        if not isinstance(aux, dict) or not {"loss", "count"} <= set(aux):
            raise ValueError("MembersObjective: the inner objective's aux must hold 'loss' and 'count' "
                             "(as make_objective's does)")
        out = {"loss": jnp.mean(aux["loss"]), "count": aux["count"][0]}
        acc = per_count(aux["correct"], aux["count"]) if "correct" in aux else jnp.full((n,), jnp.nan)
        for i in range(n):
            out[f"member{i}_loss"], out[f"member{i}_acc"] = aux["loss"][i], acc[i]
        if "batch_stats" in aux:
            out["batch_stats"] = aux["batch_stats"]
        return jnp.sum(values), out


def make_step(objective: Callable, tx: optax.GradientTransformation, *, trainable: PyTree | None = None,
              mesh: jax.sharding.Mesh | None = None) -> Step:
    """One gradient step of ``objective`` with the Optax transform ``tx`` (see the module docstring).

    Args:
      objective: ``objective(params, batch, key) -> (loss, aux)``.
      tx: any ``optax.GradientTransformation`` (extra arguments are passed as ``loss=``), or one named by value
        (:func:`mclandscape.engine.optim.transform`: equal settings share the compiled step).
      trainable: ``None`` (everything trains) or a pytree shaped like the parameters whose leaves are booleans
        or boolean arrays broadcastable from the left (e.g. ``[K]`` for control points ``[K, ...]``).
      mesh: train on the devices of this mesh (:func:`mclandscape.engine.distributed.training_mesh`; across
        processes in a multi-process job): each batch is split over its ``"data"`` axis, the state is
        replicated, XLA reduces the gradients across the devices, and every device applies the same update.

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
    return Step(objective=objective, tx=tx, trainable=trainable, mesh=mesh)
