"""Endpoint training: train one model on the engine's step and loop (several seeds: :mod:`mclandscape.engine.many`).

The corners of every connector in mclandscape are trained here::

    cfg = TrainConfig(epochs=200, batch_size=128, optimizer="sgd", lr=0.05, momentum=0.9,
                      weight_decay=5e-4, schedule="cosine", augment=True)
    res = train_model(model, train, test, cfg, seed=0, checkpoint_dir="runs/vgg_s0",
                      save_epochs=(160, 180, 200))          # trajectory corners (Bézier-surface paper, A.2)

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
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mclandscape.core import _checks
from mclandscape.core.losses import LOSSES, cross_entropy
from mclandscape.core.objective import make_objective
from mclandscape.core.tree import PyTree, check_finite, tree_digest, tree_index, tree_stack
from mclandscape.engine import optim
from mclandscape.engine.batches import batch_stream, data_digest
from mclandscape.engine.data import Dataset
from mclandscape.engine.distributed import local, training_mesh
from mclandscape.engine.evaluate import evaluate
from mclandscape.engine.loop import LoopConfig, run
from mclandscape.engine.models.base import Model, check_variables
from mclandscape.engine.points import stacked_points
from mclandscape.engine.resume import restore_state
from mclandscape.engine.step import MembersObjective, make_step

__all__ = ["TrainConfig", "TrainResult", "make_schedule", "make_optimizer", "train_model"]


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

    :func:`make_optimizer` builds the Optax transform the config describes; :func:`train_model` also takes any
    other.

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
        object.__setattr__(self, "milestones", tuple(_checks.integer(m, "milestones", low=0) for m in self.milestones))
        for name, low in (("epochs", 0), ("batch_size", 1), ("eval_batch_size", 1), ("warmup_epochs", 0)):
            _checks.integer(getattr(self, name), name, low=low)
        _checks.choice(self.optimizer, "optimizer", ("sgd", "adam", "adamw"))
        _checks.choice(self.schedule, "schedule", ("constant", "cosine", "step"))
        _checks.choice(self.loss, "loss", LOSSES)
        _checks.real(self.lr, "lr", low=0.0, low_open=True)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "milestones": list(self.milestones)}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The config of ``d`` (e.g. a checkpoint's ``"config"``; an unknown field is a ``TypeError`` naming it)."""
        return cls(**d)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


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
    warm = config.warmup_epochs * spe
    if config.schedule == "constant":
        main = optax.constant_schedule(config.lr)
    elif config.schedule == "cosine":
        decay_steps = max(config.epochs * spe - warm, 1)
        main = optax.cosine_decay_schedule(config.lr, decay_steps, alpha=config.final_lr_fraction)
    else:
        bounds: dict[int, float] = {}
        for m in config.milestones:
            b = max(m * spe - warm, 0)
            bounds[b] = bounds.get(b, 1.0) * config.gamma
        main = optax.piecewise_constant_schedule(config.lr, bounds)
    if warm > 0:
        return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warm), main], [warm])
    return main


def _build_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    lr = make_schedule(config, steps_per_epoch)
    parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip else []
    if config.optimizer == "adamw":
        parts.append(optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay))
    else:
        if config.weight_decay:
            parts.append(optax.add_decayed_weights(config.weight_decay))
        if config.optimizer == "sgd":
            parts.append(optax.sgd(lr, momentum=config.momentum or None, nesterov=config.nesterov))
        else:
            parts.append(optax.adam(lr, b1=config.b1, b2=config.b2, eps=config.eps))
    return optax.chain(*parts) if len(parts) > 1 else parts[0]


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optim.Transform:
    """SGD (momentum / Nesterov) or Adam(W) with weight decay, gradient clipping and the schedule.

    Named by value (:func:`mclandscape.engine.optim.transform`): an equal config and step count give an equal
    transform, so a second run compiles nothing.

    Example:
        >>> make_optimizer(TrainConfig(lr=0.1), 10) == make_optimizer(TrainConfig(lr=0.1), 10)
        True
    """
    return optim.transform(_build_optimizer, config, int(steps_per_epoch))


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
    key = jax.random.key(seed) if key is None else jnp.asarray(key)
    return key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)


def _check_labels(model: Model, variables: PyTree, ds: Dataset, loss: str, name: str) -> None:
    """Integer labels must index the model's outputs (else cross-entropy silently gives NaN)."""
    y = np.asarray(ds.y)
    if loss == "mse" or not np.issubdtype(y.dtype, np.integer) or y.size == 0:
        return
    k = int(jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((1, *ds.input_shape), ds.x.dtype)).shape[-1])
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= k:
        raise ValueError(f"{name} set {ds.name!r} has labels in [{lo}, {hi}] but model {model.name} has {k} outputs "
                         f"(labels must lie in [0, {k - 1}])")


def _describe(model: Model, train: Dataset, config: TrainConfig, seeds: list[int], keys: list, how: str | None,
              tx_given: bool, init_variables) -> tuple[dict, dict]:
    """``(fingerprint, metadata)`` of one run (``how=None``) or of the seeds stacked in one run."""
    cfg = config.to_dict()
    cfg.pop("eval_batch_size")
    if config.schedule != "cosine":  # the trajectory's prefix does not depend on the length: runs extend
        cfg.pop("epochs")
    inputs = {"data": data_digest(train), "init": None if init_variables is None else tree_digest(init_variables)}
    prints = [{"trainer": "train_model", "model": model.spec, "seed": s,
               "key_data": np.asarray(jax.random.key_data(k)).astype(np.int64).ravel().tolist(),
               "dataset": {"name": train.name, "num_train": len(train), "input_shape": list(train.input_shape)},
               "config": cfg, "tx": "custom" if tx_given else "config", "inputs": inputs}
              for s, k in zip(seeds, keys, strict=True)]
    metadata = {"model": model.spec, "dataset": {"name": train.name, "num_train": len(train),
                                                 "num_classes": train.num_classes},
                "input_shape": list(train.input_shape), "seed": seeds[0], "config": config.to_dict()}
    if how is None:
        return prints[0], metadata
    return ({"trainer": "train_many", "strategy": how, "members": prints},
            {**metadata, "seed": None, "seeds": seeds, "stacked": {"strategy": how, "axis": 0, "seeds": seeds}})


def _initial_variables(model: Model, train: Dataset, test: Dataset | None, config: TrainConfig, init_key,
                       init_variables: PyTree | None = None) -> dict:
    """The checked starting variables of a run: ``init_variables`` (checked against ``model``) or a fresh
    ``model.init(init_key, x)``; finite, with labels that fit the model's outputs."""
    if len(train) == 0:
        raise ValueError("the training set is empty")
    x0 = jnp.asarray(train.x[:1])
    if init_variables is not None:
        check_variables(model, init_variables, x0, name="init_variables", check_dtype=True)
    variables = dict(model.init(init_key, x0) if init_variables is None else init_variables)
    check_finite(variables, "initial variables")
    _check_labels(model, variables, train, config.loss, "training")
    if test is not None:
        _check_labels(model, variables, test, config.loss, "test")
    return variables


def _epoch_record(model: Model, variables: PyTree, test: Dataset | None, config: TrainConfig, objective,
                  train_loss, train_acc, lr: float) -> dict:
    """One epoch's history entry: the training metrics and, with a test set, the test loss and accuracy of
    ``variables`` (accuracies are NaN under ``loss="mse"``)."""
    rec = {"train_loss": train_loss, "train_acc": train_acc, "test_loss": float("nan"), "test_acc": float("nan"),
           "lr": lr}
    if test is not None:
        loss_fn = objective.per_example if config.loss != "cross_entropy" else cross_entropy
        ev = evaluate(model, stacked_points(tree_stack([variables["params"]])), test, variables=variables,
                      batch_size=config.eval_batch_size, loss_fn=loss_fn, strategy="map", devices=1, stem="off")
        rec["test_loss"], rec["test_acc"] = float(ev.loss[0]), float(ev.accuracy[0])
    if config.loss == "mse":
        rec["train_acc"] = rec["test_acc"] = float("nan")
    return rec


def _train(model: Model, train: Dataset, test: Dataset | None, config: TrainConfig, seeds: list[int], keys: list, *,
           how: str | None = None, tx=None, init_variables: PyTree | None = None, checkpoint_dir: str | None = None,
           save_epochs: Sequence[int] = (), checkpoint_every: int = 1, keep: int = 1, progress: bool | None = None,
           overwrite: bool = False, devices: int | None = None, callback=None) -> list[TrainResult]:
    """One run per seed: :func:`train_model`'s (``how=None``, one seed) or every seed stacked in one compiled step
    (``how``: ``"vmap"`` or ``"unroll"``; :func:`mclandscape.engine.many.train_many`)."""
    splits = [jax.random.split(k) for k in keys]  # (init, dropout) per seed
    members = [_initial_variables(model, train, test if i == 0 else None, config, k[0], init_variables)
               for i, k in enumerate(splits)]
    streams = [batch_stream(train, config.batch_size, seed=s, augment=config.augment, drop_last=config.drop_last,
                            pad=not model.has_batch_stats) for s in seeds]
    spe = streams[0].steps_per_epoch
    schedule = None if tx is not None else make_schedule(config, spe)
    inner = make_objective(model, config.loss, train=True, label_smoothing=config.label_smoothing)
    mesh = training_mesh(config.batch_size, len(seeds), devices=devices)
    fingerprint, metadata = _describe(model, train, config, seeds, keys, how, tx is not None, init_variables)
    if how is None:
        pick = lambda tree, i: tree  # noqa: E731
        objective, batches, run_key, start = inner, streams[0], splits[0][1], members[0]
        tx = make_optimizer(config, spe) if tx is None else tx
        metric = lambda raw, i: (raw["loss"], raw.get("acc", float("nan")))  # noqa: E731
    else:
        pick = tree_index
        objective = MembersObjective(inner=inner, keys=jnp.stack([k[1] for k in splits]),
                                     members="unroll" if how == "unroll" else "vmap", mesh=mesh)
        tx, run_key, start = optim.per_member(make_optimizer(config, spe)), jax.random.key(0), tree_stack(members)
        metric = lambda raw, i: (raw[f"member{i}_loss"], raw[f"member{i}_acc"])  # noqa: E731

        def batches(t):  # seed s's own batch of step t (its order and augmentation), stacked on axis 1
            return jax.tree.map(lambda *b: jnp.stack(b, axis=1), *[s(t) for s in streams]), np.int32(t)

    step = make_step(objective, tx, mesh=mesh)
    state = step.init(start["params"], {k: v for k, v in start.items() if k != "params"} or None)
    loop = LoopConfig(checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, keep=keep,
                      milestones=tuple(save_epochs), overwrite=overwrite, progress=progress,
                      desc=f"{model.name} seeds {seeds}" if how else f"{model.name} seed {seeds[0]}")
    member = lambda st, i: {**pick(dict(st.model_state or {}), i), "params": pick(st.params, i)}  # noqa: E731
    snapshots = {0: [jax.tree.map(jnp.copy, v) for v in members]} if 0 in loop.milestones else {}

    def record(epoch, st, raw):
        lr = float(schedule(max(epoch * spe - 1, 0))) if schedule is not None else float("nan")
        recs = [_epoch_record(model, member(st, i), test, config, inner, *metric(raw, i), lr)
                for i in range(len(seeds))]
        return recs[0] if how is None else {"members": recs}

    def keep_snapshot(epoch, st, history):
        if epoch in loop.milestones:
            snapshots[epoch] = [local(jax.tree.map(jnp.copy, member(st, i))) for i in range(len(seeds))]

    def results(st, history, resumed_from) -> list[TrainResult]:
        return [TrainResult(member(st, i), pick(st.opt_state, i),
                            [{"epoch": h["epoch"], **h["members"][i]} if how else dict(h) for h in history], config,
                            s, model, {e: v[i] for e, v in sorted(snapshots.items())}, checkpoint_dir, resumed_from)
                for i, s in enumerate(seeds)]

    callbacks = [keep_snapshot]
    if callback is not None:
        callbacks.append(lambda epoch, st, history: callback(epoch, results(st, history, None)[0]))
    res = run(step, state, batches, epochs=config.epochs, steps_per_epoch=spe, key=run_key, config=loop,
              fingerprint=fingerprint, callbacks=callbacks, on_epoch=record, metadata=metadata)
    if res.resumed_from is not None:  # milestones before the resume point come back from their checkpoints
        for e in loop.milestones:
            if e not in snapshots and e <= res.resumed_from:
                old = restore_state(checkpoint_dir, e, res.state)
                snapshots[e] = [local(member(old, i)) for i in range(len(seeds))]
    return results(res.state, res.history, res.resumed_from)


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
      tx: an Optax transform instead of ``make_optimizer(config, steps_per_epoch)`` (its hyper-parameters are
        then the caller's to record); transforms with extra arguments receive the loss as ``loss=``.
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
    seed = int(config.seed if seed is None else seed)
    return _train(model, train, test, config, [seed], [_to_key(key, seed)], tx=tx, init_variables=init_variables,
                  checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir), save_epochs=save_epochs,
                  checkpoint_every=checkpoint_every, keep=keep, progress=progress, overwrite=overwrite,
                  devices=devices, callback=callback)[0]
