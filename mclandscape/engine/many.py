"""Several seeds of one training run: :func:`train_many`, one after another or stacked in one compiled step.

The stacked way trains S independent members at once through :class:`MembersObjective` (the sum of their
objectives, whose gradient is every member's own) and a transform applied per member::

    corners = train_many(model, train, test, cfg, seeds=(0, 1, 2, 3))   # four independent corners
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mclandscape.core.objective import call_objective, make_objective, per_count
from mclandscape.core.tree import PyTree, tree_index, tree_stack
from mclandscape.engine import cpu, mapping, optim
from mclandscape.engine.batches import batch_stream, num_batches
from mclandscape.engine.data import Dataset
from mclandscape.engine.distributed import local, training_mesh
from mclandscape.engine.loop import LoopConfig, run
from mclandscape.engine.models.base import Model
from mclandscape.engine.resume import restore_state
from mclandscape.engine.step import make_step
from mclandscape.engine.train import (
    TrainConfig,
    TrainResult,
    _fingerprint,
    _metadata,
    _to_key,
    epoch_record,
    initial_variables,
    make_optimizer,
    make_schedule,
    train_model,
)

__all__ = ["train_many", "MembersObjective", "MANY_STRATEGIES"]

MANY_STRATEGIES = ("auto", "sequential", "vmap", "unroll")


def _has_conv(model: Model, train: Dataset) -> bool:
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *train.input_shape),
                                                                                 train.x.dtype))
    return cpu.has_conv(shapes.get("params", shapes))


# ``"auto"`` stacks the seeds when the dispatches it saves, (seeds - 1) per step, are at least this many: the
# stacked step takes longer to compile, which the saved dispatches must pay back (benchmarks/train_many.py
# measures both; see train_many's docstring)
AUTO_STACK_MIN_SAVED_STEPS = 5000


def _many_strategy(strategy: str, model: Model, train: Dataset, config: TrainConfig, seeds: list[int],
                   checkpoint_dir) -> str:
    """The way :func:`train_many` trains, ``"auto"`` resolved by the rule in its docstring."""
    if strategy not in MANY_STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {MANY_STRATEGIES}")
    if strategy != "auto":
        return strategy
    if len(seeds) == 1 or checkpoint_dir is not None:
        return "sequential"  # one directory per seed, each a run load_model reads
    if mapping.resolve("auto", len(seeds), has_conv=_has_conv(model, train), grad=True)[0] == "unroll":
        return "sequential"  # where stacked convolutions would be unrolled, one run per seed is as fast
    saved = (len(seeds) - 1) * config.epochs * num_batches(len(train), config.batch_size, config.drop_last)
    return "vmap" if saved >= AUTO_STACK_MIN_SAVED_STEPS else "sequential"


def _vmapped(tx) -> optax.GradientTransformation:
    tx = optim.unwrap(tx)
    return optax.GradientTransformation(jax.vmap(tx.init), lambda u, st, p=None: jax.vmap(tx.update)(u, st, p))


def _per_member(tx) -> optim.Transform:
    """``tx`` applied to every member of stacked parameters on its own (clipping, norms and counts per member),
    named by ``tx``'s value."""
    return optim.transform(_vmapped, tx)


@struct.dataclass(eq=False)  # holds arrays: hashed by identity, like a jax.Array
class MembersObjective:
    """The objective of S independent members trained in one step: the sum of their own objectives.

    The gradient of the sum with respect to the stacked parameters is every member's own gradient, so one
    :func:`~mclandscape.engine.loop.make_step` over this objective and a transform applied per member (each
    member's optimizer state stacked likewise) trains S independent runs at once.

    Attributes:
      inner: one member's objective ``inner(params, batch, key) -> (loss, aux)`` (e.g.
        :func:`~mclandscape.core.objective.make_objective` in train mode).
      keys: ``[S]`` the members' dropout keys; member ``s`` at step ``t`` gets ``fold_in(keys[s], t)``, the key
        :func:`train_model` with its seed uses.
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


def _train_stacked(model: Model, train: Dataset, test: Dataset | None, config: TrainConfig, seeds: list[int], *,
                   how: str, checkpoint_dir, save_epochs, checkpoint_every, keep, progress, overwrite, devices
                   ) -> list[TrainResult]:
    """``train_many`` with every seed in one compiled step (``how``: ``"vmap"`` or ``"unroll"``)."""
    keys = [_to_key(None, s) for s in seeds]
    split_keys = [jax.random.split(k) for k in keys]  # (init, dropout) per seed, as train_model splits them
    members = [initial_variables(model, train, test if i == 0 else None, config, k[0])
               for i, k in enumerate(split_keys)]
    streams = [batch_stream(train, config.batch_size, seed=s, augment=config.augment, drop_last=config.drop_last,
                            pad=not model.has_batch_stats) for s in seeds]
    spe = streams[0].steps_per_epoch
    schedule = make_schedule(config, spe)
    mesh = training_mesh(config.batch_size, len(seeds), devices=devices)
    inner = make_objective(model, config.loss, train=True, label_smoothing=config.label_smoothing)
    objective = MembersObjective(inner=inner, keys=jnp.stack([k[1] for k in split_keys]),
                                 members="unroll" if how == "unroll" else "vmap", mesh=mesh)
    step = make_step(objective, _per_member(make_optimizer(config, spe)), mesh=mesh)
    stacked = tree_stack(members)
    rest = {k: v for k, v in stacked.items() if k != "params"}
    state = step.init(stacked["params"], rest or None)

    def batches(t):  # seed s's own batch of step t (its order and augmentation), stacked on axis 1
        parts = [st(t) for st in streams]
        return tuple(jnp.stack(leaves, axis=1) for leaves in zip(*parts, strict=True)), np.int32(t)

    def member(st, i) -> dict:
        return {**tree_index(dict(st.model_state or {}), i), "params": tree_index(st.params, i)}

    def record(epoch, st, raw):  # one record per seed, as train_model's record
        lr = float(schedule(max(epoch * spe - 1, 0)))
        return {"members": [epoch_record(model, member(st, i), test, config, inner, raw[f"member{i}_loss"],
                                         raw[f"member{i}_acc"], lr) for i in range(len(seeds))]}

    save_epochs = sorted({int(e) for e in save_epochs})
    snapshots: dict[int, list] = {}
    if 0 in save_epochs:
        snapshots[0] = [jax.tree_util.tree_map(jnp.copy, v) for v in members]

    def keep_snapshot(epoch, st, history):
        if epoch in save_epochs:
            snapshots[epoch] = [local(jax.tree_util.tree_map(jnp.copy, member(st, i))) for i in range(len(seeds))]

    cdir = None if checkpoint_dir is None else os.path.join(os.fspath(checkpoint_dir),
                                                            f"{how}_seeds_" + "_".join(map(str, seeds)))
    fingerprint = {"trainer": "train_many", "strategy": how, "members": [
        _fingerprint(model, train, config, s, np.asarray(jax.random.key_data(k)).astype(np.int64).ravel().tolist(),
                     False, None) for s, k in zip(seeds, keys, strict=True)]}
    loop = LoopConfig(checkpoint_dir=cdir, checkpoint_every=checkpoint_every, keep=keep,
                      milestones=tuple(save_epochs), overwrite=overwrite, progress=progress,
                      desc=f"{model.name} seeds {seeds}")
    res = run(step, state, batches, epochs=config.epochs, steps_per_epoch=spe, key=jax.random.key(0), config=loop,
              fingerprint=fingerprint, callbacks=[keep_snapshot], on_epoch=record,
              metadata={**_metadata(model, train, config, seeds[0]), "seed": None, "seeds": seeds,
                        "stacked": {"strategy": how, "axis": 0, "seeds": seeds}})
    if res.resumed_from is not None:  # milestones before the resume point come back from their checkpoints
        for e in save_epochs:
            if e not in snapshots and e <= res.resumed_from:
                old = restore_state(cdir, e, res.state)
                snapshots[e] = [local(member(old, i)) for i in range(len(seeds))]
    out = []
    for i, s in enumerate(seeds):
        history = [{"epoch": h["epoch"], **h["members"][i]} for h in res.history]
        out.append(TrainResult(member(res.state, i), tree_index(res.state.opt_state, i), history, config, s, model,
                               {e: snaps[i] for e, snaps in sorted(snapshots.items())}, cdir, res.resumed_from))
    return out


def train_many(model: Model, train: Dataset, test: Dataset | None, config: TrainConfig, seeds: Sequence[int], *,
               checkpoint_dir: str | os.PathLike | None = None, save_epochs: Sequence[int] = (),
               checkpoint_every: int = 1, keep: int = 1, progress: bool | None = None, overwrite: bool = False,
               devices: int | None = None, strategy: str = "auto") -> list[TrainResult]:
    """Independent runs of :func:`train_model`, one per seed (e.g. the four corners of a surface).

    Every way gives each seed the initialisation, batch order, augmentation and dropout keys of
    ``train_model(seed=s)``, and the results agree with it to float rounding per step:

    - ``"sequential"``: one :func:`train_model` after another (each data-parallel over the devices), sharing
      one compiled step; checkpoints in ``checkpoint_dir/seed_<seed>``, each a run :func:`load_model` reads.
    - ``"vmap"``: every seed in one compiled step (:class:`MembersObjective`): parameters, optimizer states
      (the Optax transform applied per seed, so clipping by the global norm and schedules act per seed) and
      BatchNorm statistics stacked over a leading seed axis; one :func:`~mclandscape.engine.loop.run` (one
      dispatch per step for all seeds). With several devices the seeds are split over the ``"points"`` axis
      of :func:`~mclandscape.engine.distributed.training_mesh` (``gcd(devices, len(seeds))`` devices, a
      whole number of seeds each) and each batch over ``"data"``, across the processes of a multi-process job.
      One checkpoint directory ``checkpoint_dir/vmap_seeds_<s0>_<s1>...`` holds the stacked run (a
      fingerprint of every seed's run; resumed bit-identically; its metadata's ``"stacked"`` says so, and
      :func:`~mclandscape.engine.checkpoint.load_model` refuses it and names the alternative: read it with
      :func:`~mclandscape.engine.checkpoint.restore_checkpoint` and index the seed axis). ``save_epochs``
      snapshots are kept per seed. A non-finite step of any seed stops all of them.
    - ``"unroll"``: as ``"vmap"`` but the seeds' forward and backward passes are written out one after
      another inside the compiled step (XLA's CPU backend runs vmapped convolutions, one kernel per seed, as
      slow grouped convolutions); with a ``"points"`` split over several devices the seeds are vmapped.
      Checkpoints in ``checkpoint_dir/unroll_seeds_...``.
    - ``"auto"``: ``"sequential"`` for one seed, with a ``checkpoint_dir`` (per-seed directories) and, on CPU, for convolutional models; otherwise ``"vmap"`` when the dispatches it
      saves, ``(len(seeds) - 1) * epochs * steps_per_epoch``, reach ``AUTO_STACK_MIN_SAVED_STEPS`` (5000),
      else ``"sequential"``. Why: the stacked step saves a dispatch per seed and step but compiles longer, and
      on CPU a vmapped convolution becomes a slow grouped one; ``benchmarks/train_many.py`` measures the
      epoch time, the compile time and the dispatches saved (the constant was set from its runs on a 2-core
      CPU, where the figures moved with the machine's load; off CPU the rule is not measured: rerun it with
      ``--real``). Below the count, ``"sequential"`` also keeps every seed bit-identical to
      ``train_model(seed=s)``.

    "To float rounding" holds per step; over many steps of a ReLU network a rounding difference can move a
    seed's trajectory, as a 1e-7 relative change of its initialisation does (the benchmark reports both).

    Args:
      model, train, test, config: as for :func:`train_model`.
      seeds: distinct seeds, one run each.
      checkpoint_dir: where the runs checkpoint (and resume), laid out as above.
      save_epochs, checkpoint_every, keep, progress, overwrite, devices: as for :func:`train_model`.
      strategy: ``"auto"``, ``"sequential"``, ``"vmap"`` or ``"unroll"`` (``MANY_STRATEGIES``).

    Returns:
      One :class:`TrainResult` per seed, in the order of ``seeds`` (host-local arrays on every process of a
      multi-process job). Raises ``ValueError`` for no seeds, repeated seeds or an unknown ``strategy``.

    Example:
        >>> from mclandscape.engine.data import load_dataset
        >>> from mclandscape.engine.models import get_model
        >>> net, iris = get_model("mlp", widths=[4], num_classes=3), load_dataset("iris", "train")
        >>> cfg = TrainConfig(epochs=2, batch_size=60)
        >>> runs = train_many(net, iris, None, cfg, seeds=(0, 1), strategy="vmap", progress=False)
        >>> one = train_model(net, iris, None, cfg, seed=1, progress=False)
        >>> [r.seed for r in runs], [r.epoch for r in runs], sorted(runs[1].final)
        ([0, 1], [2, 2], ['epoch', 'lr', 'test_acc', 'test_loss', 'train_acc', 'train_loss'])
        >>> bool(abs(runs[1].final["train_loss"] - one.final["train_loss"]) < 1e-5)
        True
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("train_many needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    how = _many_strategy(strategy, model, train, config, seeds, checkpoint_dir)
    if how != "sequential":
        return _train_stacked(model, train, test, config, seeds, how=how, checkpoint_dir=checkpoint_dir,
                              save_epochs=save_epochs, checkpoint_every=checkpoint_every, keep=keep,
                              progress=progress, overwrite=overwrite, devices=devices)
    return [train_model(model, train, test, config, seed=s,
                        checkpoint_dir=None if checkpoint_dir is None else os.path.join(os.fspath(checkpoint_dir),
                                                                                        f"seed_{s}"),
                        save_epochs=save_epochs, checkpoint_every=checkpoint_every, keep=keep, progress=progress,
                        overwrite=overwrite, devices=devices) for s in seeds]
