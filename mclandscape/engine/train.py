"""Endpoint training: train one model, or several seeds of it, on the engine's step and loop.

The corners of every connector in mclandscape are trained here::

    cfg = TrainConfig(epochs=200, batch_size=128, optimizer="sgd", lr=0.05, momentum=0.9,
                      weight_decay=5e-4, schedule="cosine", augment=True)
    res = train_model(model, train, test, cfg, seed=0, checkpoint_dir="runs/vgg_s0",
                      save_epochs=(160, 180, 200))          # trajectory corners (Bézier-surface paper, A.2)
    corners = train_many(model, train, test, cfg, seeds=(0, 1, 2, 3))   # four independent corners

:func:`train_model` is :func:`mclandscape.core.objective.make_objective` (train mode: BatchNorm on batch
statistics, dropout) + an Optax transform (``config.tx`` by default, or any ``tx=``, e.g. a
:func:`mclandscape.methods.deform.scale_by_vdm` chain) + :func:`mclandscape.engine.loop.run` over a
:class:`~mclandscape.engine.data.BatchStream`. Determinism: the initial parameters come from ``key``
(default ``jax.random.key(seed)``), the batch order and augmentation of epoch ``e`` from ``(seed, e)`` and
the dropout key of step ``t`` from ``fold_in(dropout_key, t)``; a run resumed from its latest checkpoint ends
with exactly the parameters of an uninterrupted run.

Checkpoints hold the loop's state and metadata with the model spec, dataset, seed, epoch, metrics, history and
config, so :func:`mclandscape.engine.checkpoint.load_model` rebuilds a trained model from its directory
alone. Resuming checks the run's fingerprint (model, data, seed, key, config; the number of epochs only
under a cosine schedule, whose shape depends on it): a run can be extended, a different run is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mclandscape.core.losses import LOSSES, cross_entropy
from mclandscape.core.objective import call_objective, make_objective
from mclandscape.core.tree import PyTree, check_finite, check_same_structure, tree_digest, tree_index, tree_stack
from mclandscape.engine import cpu
from mclandscape.engine.batches import batch_stream, data_digest, num_batches
from mclandscape.engine.data import Dataset
from mclandscape.engine.distributed import local, training_mesh
from mclandscape.engine.evaluate import evaluate_model
from mclandscape.engine.loop import LoopConfig, run
from mclandscape.engine.models.base import Model
from mclandscape.engine.resume import restore_state
from mclandscape.engine.step import make_step

__all__ = [
    "TrainConfig",
    "TrainResult",
    "make_schedule",
    "make_optimizer",
    "train_model",
    "train_many",
    "MANY_STRATEGIES",
    "MembersObjective",
]

MANY_STRATEGIES = ("auto", "sequential", "vmap", "unroll")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (all JSON-serialisable; recorded in checkpoints).

    - ``optimizer``: ``"sgd"`` (heavy-ball ``momentum``, ``nesterov``), ``"adam"`` or ``"adamw"``.
      ``weight_decay`` is L2 added to the gradient (PyTorch's ``weight_decay``) for sgd/adam and decoupled
      for adamw; it applies to every parameter.
    - ``schedule``: ``"constant"``, ``"cosine"`` (to ``lr * final_lr_fraction`` at the last step) or
      ``"step"`` (multiply by ``gamma`` at each epoch in ``milestones``); ``warmup_epochs`` of linear
      warm-up precede any of them.
    - ``augment``: random crop (pad 4) + horizontal flip of image batches.
    - ``loss``: ``"cross_entropy"``, ``"mse"`` (regression, e.g. ``synthetic`` with ``task="regression"``)
      or ``"mse_onehot"``.

    :meth:`tx` is the Optax transform the config describes; :func:`train_model` also takes any other.

    Example:
        >>> cfg = TrainConfig(epochs=2, optimizer="adam", lr=1e-3)
        >>> cfg.replace(lr=0.1).lr, TrainConfig.from_dict(cfg.to_dict()) == cfg
        (0.1, True)
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    final_lr_fraction: float = 0.0
    warmup_epochs: int = 0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float | None = None
    augment: bool = False
    drop_last: bool = False
    loss: str = "cross_entropy"
    label_smoothing: float = 0.0
    eval_batch_size: int = 1000
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        if self.epochs < 0 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("epochs must be >= 0 and batch sizes >= 1")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine", "step"):
            raise ValueError(f"schedule must be 'constant', 'cosine' or 'step', got {self.schedule!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {self.loss!r}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be positive, got {self.lr}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}")
        return cls(**d)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def tx(self, steps_per_epoch: int) -> optax.GradientTransformation:
        """The Optax transform of this config for ``steps_per_epoch`` steps per epoch (:func:`make_optimizer`)."""
        return make_optimizer(self, steps_per_epoch)


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """The learning-rate schedule of ``config`` as a function of the optimizer step.

    Args:
      config: the :class:`TrainConfig` (``lr``, ``schedule``, ``milestones``, ``gamma``, ``warmup_epochs``,
        ``final_lr_fraction``, ``epochs``).
      steps_per_epoch: optimizer steps per epoch.

    Returns:
      An optax schedule ``step -> learning rate``.

    Example:
        >>> s = make_schedule(TrainConfig(epochs=4, lr=0.1, schedule="step", milestones=(2,)), 10)
        >>> round(float(s(0)), 4), round(float(s(25)), 4)
        (0.1, 0.01)
    """
    spe = max(int(steps_per_epoch), 1)
    total = max(config.epochs * spe, 1)
    warm = config.warmup_epochs * spe
    if config.schedule == "constant":
        main = optax.constant_schedule(config.lr)
    elif config.schedule == "cosine":
        main = optax.cosine_decay_schedule(config.lr, max(total - warm, 1), alpha=config.final_lr_fraction)
    else:
        bounds: dict[int, float] = {}
        for m in config.milestones:
            b = max(m * spe - warm, 0)
            bounds[b] = bounds.get(b, 1.0) * config.gamma
        main = optax.piecewise_constant_schedule(config.lr, bounds)
    if warm > 0:
        return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warm), main], [warm])
    return main


@functools.lru_cache(maxsize=64)
def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD (momentum / Nesterov) or Adam(W) with weight decay, gradient clipping and the schedule.

    The same config (by value) gives the same transform object, so a second run compiles nothing.
    """
    lr = make_schedule(config, steps_per_epoch)
    parts = []
    if config.grad_clip:
        parts.append(optax.clip_by_global_norm(config.grad_clip))
    if config.optimizer == "adamw":
        parts.append(optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps,
                                 weight_decay=config.weight_decay))
    else:
        if config.weight_decay:
            parts.append(optax.add_decayed_weights(config.weight_decay))
        if config.optimizer == "sgd":
            parts.append(optax.sgd(lr, momentum=config.momentum or None, nesterov=config.nesterov))
        else:
            parts.append(optax.adam(lr, b1=config.b1, b2=config.b2, eps=config.eps))
    return optax.chain(*parts) if len(parts) > 1 else parts[0]


@dataclasses.dataclass
class TrainResult:
    """Outcome of :func:`train_model`.

    ``history``: one dict per epoch (``epoch`` from 1, ``train_loss``, ``train_acc``, ``test_loss``,
    ``test_acc``, ``lr``; test entries are NaN without a test set, ``lr`` without a config transform).
    ``snapshots``: ``{epoch: variables}`` for the epochs in ``save_epochs`` (kept in memory even without a
    checkpoint directory). ``resumed_from``: the epoch restored from ``checkpoint_dir`` (``None``: a fresh run).
    """

    variables: PyTree
    opt_state: PyTree
    history: list[dict]
    config: TrainConfig
    seed: int
    model: Model
    snapshots: dict[int, PyTree] = dataclasses.field(default_factory=dict)
    checkpoint_dir: str | None = None
    resumed_from: int | None = None

    @property
    def params(self) -> PyTree:
        return self.variables["params"]

    @property
    def epoch(self) -> int:
        return self.history[-1]["epoch"] if self.history else 0

    @property
    def final(self) -> dict:
        """Metrics of the last epoch (``{}`` before any)."""
        return dict(self.history[-1]) if self.history else {}


def _to_key(key, seed: int):
    if key is None:
        return jax.random.key(seed)
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return key


def _check_labels(model: Model, variables: PyTree, ds: Dataset, loss: str, name: str) -> None:
    """Integer labels must index the model's outputs (else cross-entropy silently gives NaN)."""
    y = np.asarray(ds.y)
    if loss == "mse" or not np.issubdtype(y.dtype, np.integer) or y.size == 0:
        return
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, jax.ShapeDtypeStruct((1, *ds.input_shape),
                                                                                          ds.x.dtype))
    k = int(out.shape[-1])
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= k:
        raise ValueError(f"{name} set {ds.name!r} has labels in [{lo}, {hi}] but model {model.name} has {k} outputs "
                         f"(labels must lie in [0, {k - 1}])")


def _fingerprint(model: Model, train: Dataset, config: TrainConfig, seed: int, key_data: list, tx_given: bool,
                 init_variables) -> dict:
    cfg = config.to_dict()
    cfg.pop("eval_batch_size", None)
    if config.schedule != "cosine":  # the trajectory's prefix does not depend on the length: runs extend
        cfg.pop("epochs", None)
    return {"trainer": "train_model", "model": model.spec, "seed": int(seed), "key_data": key_data,
            "dataset": {"name": train.name, "num_train": len(train), "input_shape": list(train.input_shape)},
            "config": cfg, "tx": "custom" if tx_given else "config",
            "inputs": {"data": data_digest(train),
                       "init": None if init_variables is None else tree_digest(init_variables)}}


def _metadata(model: Model, train: Dataset, config: TrainConfig, seed: int) -> dict:
    return {"model": model.spec, "dataset": {"name": train.name, "num_train": len(train),
                                             "num_classes": train.num_classes},
            "input_shape": list(train.input_shape), "seed": int(seed), "config": config.to_dict()}


def train_model(model: Model, train: Dataset, test: Dataset | None, config: TrainConfig, *,
                seed: int | None = None, key=None, tx: optax.GradientTransformation | None = None,
                checkpoint_dir: str | os.PathLike | None = None, save_epochs: Sequence[int] = (),
                checkpoint_every: int = 1, keep: int = 1, progress: bool | None = None,
                callback: Callable[[int, TrainResult], None] | None = None, overwrite: bool = False,
                init_variables: PyTree | None = None, devices: int | None = None) -> TrainResult:
    """Train ``model`` on ``train`` for ``config.epochs`` epochs, evaluating on ``test`` after each.

    Args:
      model: the :class:`~mclandscape.engine.models.Model`.
      train, test: datasets (``test`` may be ``None``).
      config: the :class:`TrainConfig` (batch size, epochs, loss, optimizer and schedule).
      seed: (default ``config.seed``) fixes the batch order and augmentation and, unless ``key`` is given, the
        initialisation and dropout keys (``jax.random.key(seed)``).
      key: the initialisation and dropout key (overrides the seed's).
      tx: an Optax transform instead of ``config.tx(steps_per_epoch)`` (its hyper-parameters are then the
        caller's to record); transforms with extra arguments receive the loss as ``loss=``.
      checkpoint_dir: checkpoints every ``checkpoint_every`` epochs (the last ``keep`` stay), at every epoch of
        ``save_epochs`` (kept) and at the end; a later call resumes from the newest checkpoint at or below
        ``config.epochs`` whose run matches (else :class:`~mclandscape.engine.loop.ResumeMismatchError`);
        ``overwrite=True`` starts afresh. Epoch 0 in ``save_epochs`` stores the initialisation.
      progress: a progress bar (``None``: when stderr is a terminal).
      callback: ``callback(epoch, result)`` after each epoch (after its checkpoint); raising from it stops
        training.
      init_variables: start from these variables instead of ``model.init``.
      devices: how many devices to train on (default all of the job's, across processes): each batch is split
        over them (:func:`mclandscape.engine.distributed.training_mesh`); the result equals one device's to
        float rounding.

    Returns:
      A :class:`TrainResult`. A non-finite loss or gradient stops training with
      :class:`~mclandscape.engine.loop.NonFiniteError` naming the step and the first non-finite leaf.

    Example:
        >>> from mclandscape.engine.data import load_dataset
        >>> from mclandscape.engine.models import get_model
        >>> train = load_dataset("iris", "train")
        >>> res = train_model(get_model("mlp", widths=[8], num_classes=3), train, None,
        ...                   TrainConfig(epochs=2, batch_size=32, optimizer="adam", lr=1e-2), progress=False)
        >>> [sorted(r) for r in res.history][0]
        ['epoch', 'lr', 'test_acc', 'test_loss', 'train_acc', 'train_loss']
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    seed = config.seed if seed is None else int(seed)
    if len(train) == 0:
        raise ValueError("the training set is empty")
    if tx is not None and not isinstance(tx, optax.GradientTransformation):
        raise ValueError(f"tx must be an optax GradientTransformation, got {type(tx).__name__}")
    key = _to_key(key, seed)
    key_data = np.asarray(jax.random.key_data(key)).astype(np.int64).ravel().tolist()
    init_key, dropout_key = jax.random.split(key)
    x0 = jnp.asarray(train.x[:1])
    if init_variables is not None:
        if not hasattr(init_variables, "items") or "params" not in init_variables:
            raise ValueError("init_variables must be a dict of collections with 'params'")
        expected = jax.eval_shape(lambda k, x: dict(model.init(k, x)), init_key, x0)
        check_same_structure(expected, dict(init_variables), names=(f"a fresh {model.name}", "init_variables"))
        variables = dict(init_variables)
    else:
        variables = dict(model.init(init_key, x0))
    check_finite(variables, "initial variables")
    _check_labels(model, variables, train, config.loss, "training")
    if test is not None:
        _check_labels(model, variables, test, config.loss, "test")
    stream = batch_stream(train, config.batch_size, seed=seed, augment=config.augment, drop_last=config.drop_last,
                          pad=not model.has_batch_stats)
    spe = stream.steps_per_epoch
    schedule = None if tx is not None else make_schedule(config, spe)
    tx_given = tx is not None
    tx = tx if tx_given else make_optimizer(config, spe)
    objective = make_objective(model, config.loss, train=True, label_smoothing=config.label_smoothing)
    step = make_step(objective, tx, mesh=training_mesh(config.batch_size, devices=devices))
    rest = {k: v for k, v in variables.items() if k != "params"}
    state = step.init(variables["params"], rest or None)
    save_epochs = sorted({int(e) for e in save_epochs})
    cdir = None if checkpoint_dir is None else str(checkpoint_dir)
    snapshots: dict[int, PyTree] = {}

    def as_variables(st) -> dict:
        return {**dict(st.model_state or {}), "params": st.params}

    def record(epoch, st, raw):
        rec = {"train_loss": raw["loss"], "train_acc": raw.get("acc", float("nan")),
               "test_loss": float("nan"), "test_acc": float("nan"),
               "lr": float(schedule(max(epoch * spe - 1, 0))) if schedule is not None else float("nan")}
        if test is not None:
            ev = evaluate_model(model, as_variables(st), test, batch_size=config.eval_batch_size,
                                loss_fn=objective.per_example if config.loss != "cross_entropy" else cross_entropy)
            rec["test_loss"], rec["test_acc"] = ev["loss"], ev["acc"]
        if config.loss == "mse":
            rec["train_acc"] = rec["test_acc"] = float("nan")
        return rec

    def keep_snapshot(epoch, st, history):
        if epoch in save_epochs:
            snapshots[epoch] = jax.tree_util.tree_map(jnp.copy, as_variables(st))

    callbacks = [keep_snapshot]
    if callback is not None:
        callbacks.append(lambda epoch, st, history: callback(epoch, TrainResult(
            as_variables(st), st.opt_state, [dict(h) for h in history], config, seed, model, dict(snapshots),
            cdir, None)))
    if 0 in save_epochs:
        snapshots[0] = jax.tree_util.tree_map(jnp.copy, variables)
    loop = LoopConfig(checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, keep=keep,
                      milestones=tuple(save_epochs), overwrite=overwrite, progress=progress,
                      desc=f"{model.name} seed {seed}")
    res = run(step, state, stream, epochs=config.epochs, steps_per_epoch=spe, key=dropout_key, config=loop,
              fingerprint=_fingerprint(model, train, config, seed, key_data, tx_given, init_variables),
              callbacks=callbacks, on_epoch=record, metadata=_metadata(model, train, config, seed))
    if res.resumed_from is not None:  # milestones before the resume point come back from their checkpoints
        for e in save_epochs:
            if e not in snapshots and e <= res.resumed_from:
                snapshots[e] = as_variables(restore_state(checkpoint_dir, e, res.state))
    history = [{k: v for k, v in h.items() if k != "seconds"} for h in res.history]
    return TrainResult(as_variables(res.state), res.state.opt_state, history, config, seed, model,
                       dict(sorted(snapshots.items())), cdir, res.resumed_from)


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
    if jax.default_backend() == "cpu" and _has_conv(model, train):
        return "sequential"  # vmapped convolutions run as slow grouped ones; unrolled ones gained nothing
    saved = (len(seeds) - 1) * config.epochs * num_batches(len(train), config.batch_size, config.drop_last)
    return "vmap" if saved >= AUTO_STACK_MIN_SAVED_STEPS else "sequential"


@functools.lru_cache(maxsize=64)
def _per_member(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` applied to every member of stacked parameters on its own (clipping, norms and counts per member)."""
    return optax.GradientTransformation(jax.vmap(tx.init), lambda u, st, p=None: jax.vmap(tx.update)(u, st, p))


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

        if self.members == "unroll" and not split:
            outs = [one(tree_index(params, i), None if state is None else tree_index(state, i),
                        jax.tree_util.tree_map(lambda a, i=i: a[:, i], data), keys[i]) for i in range(n)]
            values, aux = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outs)
        else:
            values, aux = jax.vmap(one, in_axes=(0, None if state is None else 0, 1, 0))(params, state, data, keys)
        if not isinstance(aux, dict) or not {"loss", "count"} <= set(aux):
            raise ValueError("MembersObjective: the inner objective's aux must hold 'loss' and 'count' "
                             "(as make_objective's does)")
        out = {"loss": jnp.mean(aux["loss"]), "count": aux["count"][0]}
        acc = aux["correct"] / jnp.maximum(aux["count"], 1) if "correct" in aux else jnp.full((n,), jnp.nan)
        for i in range(n):
            out[f"member{i}_loss"], out[f"member{i}_acc"] = aux["loss"][i], acc[i]
        if "batch_stats" in aux:
            out["batch_stats"] = aux["batch_stats"]
        return jnp.sum(values), out


def _train_stacked(model: Model, train: Dataset, test: Dataset | None, config: TrainConfig, seeds: list[int], *,
                   how: str, checkpoint_dir, save_epochs, checkpoint_every, keep, progress, overwrite, devices
                   ) -> list[TrainResult]:
    """``train_many`` with every seed in one compiled step (``how``: ``"vmap"`` or ``"unroll"``)."""
    if len(train) == 0:
        raise ValueError("the training set is empty")
    x0 = jnp.asarray(train.x[:1])
    keys = [_to_key(None, s) for s in seeds]
    split_keys = [jax.random.split(k) for k in keys]  # (init, dropout) per seed, as train_model splits them
    members = [dict(model.init(k[0], x0)) for k in split_keys]
    for s, v in zip(seeds, members, strict=True):
        check_finite(v, f"initial variables of seed {s}")
    _check_labels(model, members[0], train, config.loss, "training")
    if test is not None:
        _check_labels(model, members[0], test, config.loss, "test")
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
    loss_fn = inner.per_example if config.loss != "cross_entropy" else cross_entropy

    def batches(t):  # seed s's own batch of step t (its order and augmentation), stacked on axis 1
        parts = [st(t) for st in streams]
        return tuple(jnp.stack(leaves, axis=1) for leaves in zip(*parts, strict=True)), np.int32(t)

    def member(st, i) -> dict:
        return {**tree_index(dict(st.model_state or {}), i), "params": tree_index(st.params, i)}

    def record(epoch, st, raw):  # one record per seed, as train_model's record
        lr = float(schedule(max(epoch * spe - 1, 0)))
        recs = []
        for i in range(len(seeds)):
            rec = {"train_loss": raw[f"member{i}_loss"], "train_acc": raw[f"member{i}_acc"],
                   "test_loss": float("nan"), "test_acc": float("nan"), "lr": lr}
            if test is not None:
                ev = evaluate_model(model, member(st, i), test, batch_size=config.eval_batch_size, loss_fn=loss_fn)
                rec["test_loss"], rec["test_acc"] = ev["loss"], ev["acc"]
            if config.loss == "mse":
                rec["train_acc"] = rec["test_acc"] = float("nan")
            recs.append(rec)
        return {"members": recs}

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
      :func:`~mclandscape.engine.checkpoint.load_model` refuses it, naming the stacked leaf: read it with
      :func:`~mclandscape.engine.checkpoint.restore_checkpoint` and index the seed axis). ``save_epochs``
      snapshots are kept per seed. A non-finite step of any seed stops all of them.
    - ``"unroll"``: as ``"vmap"`` but the seeds' forward and backward passes are written out one after
      another inside the compiled step (XLA's CPU backend runs vmapped convolutions, one kernel per seed, as
      slow grouped convolutions); with a ``"points"`` split over several devices the seeds are vmapped.
      Checkpoints in ``checkpoint_dir/unroll_seeds_...``.
    - ``"auto"``: ``"sequential"`` for one seed, with a ``checkpoint_dir`` (per-seed directories, as before
      ``strategy`` existed) and, on CPU, for convolutional models; otherwise ``"vmap"`` when the dispatches it
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
