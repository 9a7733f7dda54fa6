"""Endpoint training: a reusable, jitted, deterministic trainer with checkpoints and resume.

The corners of every connector in mclandscape are trained here::

    cfg = TrainConfig(epochs=200, batch_size=128, optimizer="sgd", lr=0.05, momentum=0.9,
                      weight_decay=5e-4, schedule="cosine", augment=True)
    res = train_model(model, train, test, cfg, seed=0, checkpoint_dir="runs/vgg_s0",
                      save_epochs=(160, 180, 200))          # seed 000 A.2 trajectory corners
    corners = train_many(model, train, test, cfg, seeds=(0, 1, 2, 3))   # four independent corners

Determinism: the initial parameters come from ``key`` (default ``jax.random.key(seed)``), the batch order
and augmentation of epoch ``e`` from ``(seed, e)`` (:func:`mclandscape.engine.data.iterate_batches`) and the
dropout key of step ``i`` of epoch ``e`` from ``fold_in(fold_in(dropout_key, e), i)``. Nothing depends on
how many epochs ran in this process, so a run resumed from its latest checkpoint ends with exactly the
parameters of an uninterrupted run (with the same config; changing ``epochs`` under a cosine schedule
changes the schedule itself).

Checkpoints (:mod:`mclandscape.engine.checkpoint`) hold ``{"variables", "opt_state"}`` and metadata with the model
spec, dataset, seed, epoch, metrics, full history and config, so :func:`mclandscape.engine.checkpoint.load_model`
rebuilds a trained model from its directory alone. Epochs listed in ``save_epochs`` are kept; the rolling
"latest" checkpoint used for resuming is replaced every ``checkpoint_every`` epochs.

For other pytrees (connector control points, NEB bands, ...) use :func:`make_train_step`, a jitted
``(params, opt_state, batch, key) -> (params, opt_state, loss, aux)`` step around any loss function.
"""

from __future__ import annotations

import dataclasses
import math
import os
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from mclandscape.core.losses import accuracy, cross_entropy, mse
from mclandscape.core.tree import tree_dot
from mclandscape.engine.checkpoint import CheckpointStore
from mclandscape.engine.data import Dataset, iterate_batches, num_batches
from mclandscape.engine.models.base import Model

PyTree = Any

__all__ = [
    "TrainConfig",
    "TrainResult",
    "cross_entropy",
    "mse",
    "accuracy",
    "loss_function",
    "params_loss",
    "batch_stream",
    "make_schedule",
    "make_optimizer",
    "make_train_step",
    "evaluate_model",
    "train_model",
    "train_many",
]


# ----------------------------------------------------------------------------------------------------------
# losses (shared with the rest of the library: mclandscape.core.losses)


def loss_function(name: str, label_smoothing: float = 0.0) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``"cross_entropy"`` (optionally label-smoothed) or ``"mse"`` (squared error summed over outputs) as a
    per-example loss ``(outputs, targets) -> [N]`` (:mod:`mclandscape.core.losses`)."""
    if name == "cross_entropy":
        if not label_smoothing:
            return lambda out, y: cross_entropy(out.astype(jnp.promote_types(out.dtype, jnp.float32)), y)

        def smoothed(out, y):
            out = out.astype(jnp.promote_types(out.dtype, jnp.float32))
            targets = optax.smooth_labels(jax.nn.one_hot(y, out.shape[-1], dtype=out.dtype), label_smoothing)
            return optax.softmax_cross_entropy(out, targets)

        return smoothed
    if name == "mse":
        return mse
    raise ValueError(f"unknown loss {name!r}; choose 'cross_entropy' or 'mse'")


def _mse_onehot(out: jax.Array, y: jax.Array) -> jax.Array:
    onehot = jax.nn.one_hot(y, out.shape[-1], dtype=out.dtype)
    return jnp.sum((out - onehot) ** 2, axis=-1)


def params_loss(model: Model, variables: PyTree | None = None, *, loss: str | Callable = "cross_entropy",
                train: bool | None = None, l2: float = 0.0) -> Callable[[PyTree, tuple], jax.Array]:
    """``loss(params, batch) -> mean loss`` of ``model`` as a function of its parameters alone: the one
    "network on a batch" objective that the methods (Hessians, NEB, DSP-TT) differentiate.

    ``batch`` is ``(x, y)`` or ``(x, y, key)``; ``key`` drives dropout in train mode. ``loss`` is
    ``"cross_entropy"``, ``"mse"`` (squared error against targets of the outputs' shape), ``"mse_onehot"``
    (squared error of the outputs against one-hot integer labels, summed over classes: finite minima on
    separable data, where cross-entropy's infimum is at infinity) or a per-example ``(outputs, y) -> [N]``.
    ``l2`` adds ``l2 / 2 * |params|^2``.

    ``train`` (default: whether the model has BatchNorm) runs the network as a training step does
    (BatchNorm on batch statistics, dropout when a key is given); ``train=False`` is inference, which needs
    the running statistics of a BatchNorm model in ``variables`` (``ValueError`` otherwise). The other
    collections of ``variables`` (``batch_stats``) are held fixed, never updated.
    """
    if isinstance(loss, str):
        per_example = {"cross_entropy": cross_entropy, "mse": mse, "mse_onehot": _mse_onehot}.get(loss)
        if per_example is None:
            raise ValueError(f"loss must be 'cross_entropy', 'mse', 'mse_onehot' or a callable, got {loss!r}")
    elif callable(loss):
        per_example = loss
    else:
        raise ValueError(f"loss must be a string or a callable, got {loss!r}")
    if isinstance(l2, bool) or not isinstance(l2, int | float) or not math.isfinite(l2) or l2 < 0:
        raise ValueError(f"l2 must be >= 0 and finite, got {l2!r}")
    if variables is not None and not hasattr(variables, "items"):
        raise ValueError("variables must be a dict of collections (e.g. {'params': ..., 'batch_stats': ...})")
    rest = {k: v for k, v in dict(variables or {}).items() if k != "params"}
    train = model.has_batch_stats if train is None else bool(train)
    if model.has_batch_stats and "batch_stats" not in rest:
        if not train:
            raise ValueError(f"model {model.name} has BatchNorm: inference mode (train=False) needs its running "
                             "statistics in variables['batch_stats'], or use train=True (batch statistics)")
        lazy: dict = {}
    else:
        lazy = None

    def fn(params, batch):
        if len(batch) not in (2, 3):
            raise ValueError(f"batch must be (x, y) or (x, y, key), got a sequence of {len(batch)}")
        x, y = batch[0], batch[1]
        key = batch[2] if len(batch) == 3 else None
        fixed = rest
        if lazy is not None:  # train mode ignores the running statistics, but Flax needs the collection
            if "batch_stats" not in lazy:
                shapes = jax.eval_shape(model.init, jax.random.key(0), x[:1])
                lazy["batch_stats"] = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                                             shapes["batch_stats"])
            fixed = rest | lazy
        rngs = {"dropout": key} if (train and key is not None) else None
        out = model.apply(fixed | {"params": params}, x, train=train, rngs=rngs)
        value = jnp.mean(per_example(out, y))
        if l2:
            value = value + 0.5 * l2 * tree_dot(params, params)
        return value

    return fn


def batch_stream(ds: Dataset, batch_size: int, *, seed: int = 0, augment: bool = False,
                 keys: bool = False) -> Callable[[int], tuple]:
    """A resumable mini-batch stream ``t -> (x, y)`` (``(x, y, key)`` with ``keys=True``, the dropout key
    ``fold_in(key(seed), t)``): epoch after epoch of :func:`mclandscape.engine.data.iterate_batches` with
    ``drop_last=True``, reshuffled per epoch. Batch ``t`` depends only on ``(seed, t)``, so a search resumed
    at step ``t`` sees the batches an uninterrupted one would (the current epoch is cached on the host)."""
    n = int(np.shape(ds.y)[0])
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the dataset size {n}")
    per_epoch = n // int(batch_size)
    cache: dict = {}
    base = jax.random.key(seed)

    def get(t: int):
        if int(t) < 0:
            raise ValueError(f"batch index must be >= 0, got {t}")
        epoch, j = divmod(int(t), per_epoch)
        if cache.get("epoch") != epoch:
            cache["epoch"] = epoch
            cache["batches"] = [(jnp.asarray(x), jnp.asarray(y)) for x, y in
                                iterate_batches(ds, int(batch_size), seed=seed, epoch=epoch, shuffle=True,
                                                augment=augment, drop_last=True)]
        x, y = cache["batches"][j]
        return (x, y, jax.random.fold_in(base, int(t))) if keys else (x, y)

    get.steps_per_epoch = per_epoch  # type: ignore[attr-defined]
    return get


# ----------------------------------------------------------------------------------------------------------
# configuration and optimizers


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
    - ``loss``: ``"cross_entropy"`` or ``"mse"`` (regression, e.g. ``synthetic`` with ``task="regression"``).
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
        if self.loss not in ("cross_entropy", "mse"):
            raise ValueError(f"loss must be 'cross_entropy' or 'mse', got {self.loss!r}")
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


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """The learning-rate schedule of ``config`` as a function of the optimizer step."""
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


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD (momentum / Nesterov) or Adam(W) with weight decay, gradient clipping and the schedule."""
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


# ----------------------------------------------------------------------------------------------------------
# generic step builder


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *, jit: bool = True,
                    donate: bool = False) -> Callable:
    """A gradient step for any parameter pytree.

    ``loss_fn(params, batch, key) -> (loss, aux)`` (scalar loss, any aux pytree). Returns
    ``step(params, opt_state, batch, key) -> (params, opt_state, loss, aux)``, jitted unless ``jit=False``;
    ``donate=True`` donates ``params``/``opt_state`` buffers (useful on accelerators). Initialise the
    optimizer state with ``optimizer.init(params)``. Example::

        def loss_fn(control, batch, key):
            t = jax.random.uniform(key)
            out = model.apply(point(control, t), batch[0])
            return cross_entropy(out, batch[1]).mean(), None
        step = make_train_step(loss_fn, optax.adam(1e-3))
        control, opt_state, loss, _ = step(control, opt_state, (x, y), key)
    """

    def step(params, opt_state, batch, key):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss, aux

    if not jit:
        return step
    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


# ----------------------------------------------------------------------------------------------------------
# evaluation


def _split_variables(variables: PyTree):
    variables = dict(variables)
    params = variables.pop("params")
    stats = variables.pop("batch_stats", None)
    return params, stats, variables


def _join_variables(params, stats, rest):
    out = dict(rest)
    out["params"] = params
    if stats is not None:
        out["batch_stats"] = stats
    return out


class _Compiled:
    """The jitted train / eval functions of one (model, config, steps-per-epoch); shared by train_many."""

    def __init__(self, model: Model, config: TrainConfig, steps_per_epoch: int):
        self.model = model
        self.config = config
        self.tx = make_optimizer(config, steps_per_epoch)
        per_example = loss_function(config.loss, config.label_smoothing)
        eval_loss = loss_function(config.loss)
        classify = config.loss == "cross_entropy"
        has_bs = model.has_batch_stats
        donate = (0, 1, 2) if jax.default_backend() != "cpu" else ()

        def train_step(params, stats, opt_state, rest, x, y, mask, epoch_key, i):
            key = jax.random.fold_in(epoch_key, i)
            count = jnp.sum(mask)

            def lf(p):
                variables = _join_variables(p, stats, rest)
                if has_bs:
                    out, new_stats = model.apply_with_stats(variables, x, rngs={"dropout": key})
                else:
                    out, new_stats = model.apply(variables, x, train=True, rngs={"dropout": key}), None
                per = jnp.where(mask, per_example(out, y), 0.0)
                return jnp.sum(per) / count, (out, new_stats, jnp.sum(jnp.where(mask, eval_loss(out, y), 0.0)))

            (_, (out, new_stats, loss_sum)), grads = jax.value_and_grad(lf, has_aux=True)(params)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            correct = (jnp.sum(jnp.where(mask, jnp.argmax(out, -1) == y, False)) if classify
                       else jnp.zeros((), jnp.int32))
            return params, (new_stats if has_bs else stats), opt_state, loss_sum, correct

        def eval_step(variables, x, y, mask):
            out = model.apply(variables, x, train=False)
            loss_sum = jnp.sum(jnp.where(mask, eval_loss(out, y), 0.0))
            correct = jnp.sum(jnp.where(mask, jnp.argmax(out, -1) == y, False)) if classify else jnp.zeros(
                (), jnp.int32)
            return loss_sum, correct

        self.donates = bool(donate)
        self.train_step = jax.jit(train_step, donate_argnums=donate)
        self.eval_step = jax.jit(eval_step)

    def keep(self, tree):
        """A copy of ``tree`` that survives the next (buffer-donating, on accelerators) train step."""
        return jax.tree_util.tree_map(jnp.copy, tree) if self.donates else tree

    def pad_batch(self, x, y):
        """A partial last batch is padded to the full batch size with a zero-weight mask, so one compiled
        step serves every batch; the gradient is that of the real examples' mean loss. BatchNorm models get
        the partial batch as it is (padding would change the batch statistics) and one extra compile."""
        bs, m = self.config.batch_size, len(x)
        if m == bs or self.model.has_batch_stats:
            return x, y, np.ones(m, bool)
        mask = np.zeros(bs, bool)
        mask[:m] = True
        x = np.concatenate([x, np.zeros((bs - m, *x.shape[1:]), x.dtype)])
        y = np.concatenate([y, np.zeros((bs - m, *y.shape[1:]), y.dtype)])
        return x, y, mask

    def evaluate(self, variables, ds: Dataset, batch_size: int) -> dict:
        return _evaluate(self.eval_step, variables, ds, batch_size, self.config.loss == "cross_entropy")


def _evaluate(eval_step, variables, ds: Dataset, batch_size: int, classify: bool) -> dict:
    n = len(ds)
    if n == 0:
        return {"loss": float("nan"), "acc": float("nan")}
    bs = min(batch_size, n)
    loss_sums, corrects = [], []
    for start in range(0, n, bs):
        x, y = ds.x[start:start + bs], ds.y[start:start + bs]
        m = len(x)
        mask = np.ones(bs, bool)
        if m < bs:  # pad the last batch so one compiled shape serves the whole set
            mask[m:] = False
            x = np.concatenate([x, np.repeat(x[:1], bs - m, 0)])
            y = np.concatenate([y, np.repeat(y[:1], bs - m, 0)])
        ls, c = eval_step(variables, x, y, mask)
        loss_sums.append(ls)
        corrects.append(c)
    loss = float(jnp.sum(jnp.stack(loss_sums))) / n
    acc = float(jnp.sum(jnp.stack(corrects))) / n if classify else float("nan")
    return {"loss": loss, "acc": acc}


def evaluate_model(model: Model, variables: PyTree, ds: Dataset, *, batch_size: int = 1000,
                   loss: str = "cross_entropy") -> dict:
    """``{"loss", "acc"}`` of ``model`` on ``ds`` in evaluation mode (running BatchNorm statistics, no
    dropout). ``acc`` is NaN for ``loss="mse"``."""
    eval_loss = loss_function(loss)
    classify = loss == "cross_entropy"

    @jax.jit
    def eval_step(variables, x, y, mask):
        out = model.apply(variables, x, train=False)
        loss_sum = jnp.sum(jnp.where(mask, eval_loss(out, y), 0.0))
        correct = jnp.sum(jnp.where(mask, jnp.argmax(out, -1) == y, False)) if classify else jnp.zeros(())
        return loss_sum, correct

    return _evaluate(eval_step, variables, ds, batch_size, classify)


# ----------------------------------------------------------------------------------------------------------
# training


@dataclasses.dataclass
class TrainResult:
    """Outcome of :func:`train_model`.

    ``history``: one dict per epoch (``epoch, train_loss, train_acc, test_loss, test_acc, lr``; test
    entries are NaN without a test set). ``snapshots``: ``{epoch: variables}`` for the epochs in
    ``save_epochs`` (seed 000 A.2 trajectory corners), kept in memory even without a checkpoint directory.
    ``resumed_from``: the epoch restored from ``checkpoint_dir`` (``None`` for a fresh run).
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


def _metadata(model: Model, train: Dataset, config: TrainConfig, seed: int, key_data: list, epoch: int,
              history: list[dict]) -> dict:
    return {
        "format": "mclandscape.engine.train/1",
        "model": model.spec,
        "dataset": {"name": train.name, "num_train": len(train), "num_classes": train.num_classes},
        "input_shape": list(train.input_shape),
        "seed": int(seed),
        "key_data": key_data,
        "epoch": int(epoch),
        "metrics": dict(history[-1]) if history else {},
        "history": [dict(h) for h in history],
        "config": config.to_dict(),
    }


def _check_resumable(meta: dict, expected: dict, directory) -> None:
    """The checkpoint in ``directory`` must come from the same model, data, seed and config (epochs aside)."""
    problems = []
    for k in ("model", "seed", "key_data", "input_shape"):
        if meta.get(k) != expected[k]:
            problems.append(f"{k}: checkpoint {meta.get(k)!r} vs now {expected[k]!r}")
    if {k: (meta.get("dataset") or {}).get(k) for k in ("name", "num_train")} != {
            k: expected["dataset"][k] for k in ("name", "num_train")}:
        problems.append(f"dataset: checkpoint {meta.get('dataset')!r} vs now {expected['dataset']!r}")
    old = dict(meta.get("config") or {})
    new = dict(expected["config"])
    for d in (old, new):
        d.pop("epochs", None)
        d.pop("eval_batch_size", None)
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            problems.append(f"config.{k}: checkpoint {old.get(k)!r} vs now {new.get(k)!r}")
    if problems:
        raise ValueError(f"cannot resume from {directory}: it holds a different run ("
                         + "; ".join(problems) + "). Use another checkpoint_dir or resume=False.")


def _to_key(key, seed: int):
    if key is None:
        return jax.random.key(seed)
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return key


def _train(compiled: _Compiled, train: Dataset, test: Dataset | None, *, seed: int, key, checkpoint_dir,
           save_epochs: Sequence[int], checkpoint_every: int, progress: bool, callback, resume: bool,
           init_variables) -> TrainResult:
    model, config = compiled.model, compiled.config
    if len(train) == 0:
        raise ValueError("the training set is empty")
    if model.spec.get("kwargs", {}).get("num_classes") is not None and config.loss == "cross_entropy":
        k = model.spec["kwargs"]["num_classes"]
        if train.num_classes and k < train.num_classes:
            raise ValueError(f"model has {k} outputs but dataset {train.name!r} has {train.num_classes} classes")
    key = _to_key(key, seed)
    key_data = np.asarray(jax.random.key_data(key)).astype(np.int64).ravel().tolist()
    init_key, dropout_key = jax.random.split(key)
    x0 = jnp.asarray(train.x[:1])
    save_epochs = sorted({int(e) for e in save_epochs})
    history: list[dict] = []
    snapshots: dict[int, PyTree] = {}
    start = 0
    resumed_from = None
    store = CheckpointStore(checkpoint_dir, create=True) if checkpoint_dir is not None else None
    expected = _metadata(model, train, config, seed, key_data, 0, [])
    try:
        steps = [s for s in store.all_steps() if s <= config.epochs] if (store is not None and resume) else []
        if steps:
            _check_resumable(store.metadata(steps[-1]), expected, checkpoint_dir)
            # the target only needs shapes: skip the (compile-heavy) initialisation
            if init_variables is not None:
                abstract = jax.eval_shape(lambda: dict(init_variables))
            else:
                abstract = jax.eval_shape(lambda k, x: dict(model.init(k, x)), init_key, x0)
            target = {"variables": abstract, "opt_state": jax.eval_shape(compiled.tx.init, abstract["params"])}
            state, meta = store.restore(steps[-1], target=target)
            variables, opt_state = dict(state["variables"]), state["opt_state"]
            history = [dict(h) for h in meta.get("history", [])]
            start = resumed_from = steps[-1]
            for e in save_epochs:
                if e < start and e in store.all_steps():
                    snapshots[e] = store.restore(e, target=target)[0]["variables"]
                elif e == start:
                    snapshots[e] = compiled.keep(variables)
        else:
            if init_variables is not None:  # copied: the caller's arrays must survive buffer donation
                variables = jax.tree_util.tree_map(lambda v: jnp.array(v, copy=True), dict(init_variables))
            else:
                variables = dict(model.init(init_key, x0))
            opt_state = compiled.tx.init(variables["params"])
        if 0 in save_epochs and 0 not in snapshots and start == 0:
            snapshots[0] = compiled.keep(variables)
            if store is not None:
                store.save(0, {"variables": variables, "opt_state": opt_state},
                           _metadata(model, train, config, seed, key_data, 0, history), overwrite=True)

        spe = num_batches(len(train), config.batch_size, config.drop_last)
        schedule = make_schedule(config, spe)
        params, stats, rest = _split_variables(variables)
        bar = tqdm(total=config.epochs, initial=start, disable=not progress, leave=False,
                   desc=f"{model.name} seed {seed}", unit="epoch", dynamic_ncols=True)
        last_saved = start if resumed_from is not None else None
        try:
            for epoch in range(start, config.epochs):
                ekey = jax.random.fold_in(dropout_key, epoch)
                loss_sums, corrects = [], []
                for i, (x, y) in enumerate(iterate_batches(train, config.batch_size, seed=seed, epoch=epoch,
                                                           shuffle=True, augment=config.augment,
                                                           drop_last=config.drop_last)):
                    x, y, mask = compiled.pad_batch(x, y)
                    params, stats, opt_state, ls, c = compiled.train_step(
                        params, stats, opt_state, rest, x, y, mask, ekey, np.int32(i))
                    loss_sums.append(ls)
                    corrects.append(c)
                n_seen = (spe * config.batch_size) if config.drop_last else len(train)
                variables = _join_variables(params, stats, rest)
                rec = {"epoch": epoch + 1,
                       "train_loss": float(jnp.sum(jnp.stack(loss_sums))) / n_seen,
                       "train_acc": (float(jnp.sum(jnp.stack(corrects))) / n_seen
                                     if config.loss == "cross_entropy" else float("nan")),
                       "lr": float(schedule(max((epoch + 1) * spe - 1, 0)))}
                if test is not None:
                    ev = compiled.evaluate(variables, test, config.eval_batch_size)
                    rec["test_loss"], rec["test_acc"] = ev["loss"], ev["acc"]
                else:
                    rec["test_loss"] = rec["test_acc"] = float("nan")
                history.append(rec)
                e1 = epoch + 1
                if e1 in save_epochs:
                    snapshots[e1] = compiled.keep(variables)
                if store is not None and (e1 in save_epochs or e1 == config.epochs
                                          or e1 % max(checkpoint_every, 1) == 0):
                    store.save(e1, {"variables": variables, "opt_state": opt_state},
                               _metadata(model, train, config, seed, key_data, e1, history), overwrite=True)
                    if last_saved is not None and last_saved not in save_epochs and last_saved != e1:
                        if last_saved in store.all_steps():
                            store.delete(last_saved)
                    last_saved = e1
                bar.update(1)
                bar.set_postfix(loss=f"{rec['train_loss']:.4f}", acc=f"{rec['train_acc']:.3f}",
                                test_acc=f"{rec['test_acc']:.3f}")
                if callback is not None:
                    callback(e1, TrainResult(compiled.keep(variables), compiled.keep(opt_state), history,
                                             config, seed, model, snapshots,
                                             str(checkpoint_dir) if checkpoint_dir else None, resumed_from))
        finally:
            bar.close()
        variables = _join_variables(params, stats, rest)
    finally:
        if store is not None:
            store.close()
    return TrainResult(variables, opt_state, history, config, seed, model, snapshots,
                       str(checkpoint_dir) if checkpoint_dir is not None else None, resumed_from)


_COMPILED: dict = {}
_COMPILED_MAX = 16


def _compiled_for(model: Model, config: TrainConfig, steps_per_epoch: int) -> _Compiled:
    """Reuse the jitted functions of an earlier run of the same model object and config (the seed does not
    enter the compiled code), so repeated or resumed runs in one process skip XLA compilation."""
    ckey = (id(model), config.replace(seed=0), int(steps_per_epoch))
    hit = _COMPILED.get(ckey)
    if hit is not None and hit[0]() is model:
        return hit[1]
    compiled = _Compiled(model, config, steps_per_epoch)
    if len(_COMPILED) >= _COMPILED_MAX:
        _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[ckey] = (weakref.ref(model), compiled)
    return compiled


def train_model(model: Model, train: Dataset, test: Dataset | None, config: TrainConfig, *,
                seed: int | None = None, key=None, checkpoint_dir: str | os.PathLike | None = None,
                save_epochs: Sequence[int] = (), checkpoint_every: int = 1, progress: bool = True,
                callback: Callable[[int, TrainResult], None] | None = None, resume: bool = True,
                init_variables: PyTree | None = None) -> TrainResult:
    """Train ``model`` on ``train`` for ``config.epochs`` epochs, evaluating on ``test`` after each.

    - ``seed`` (default ``config.seed``) fixes the batch order/augmentation and, unless ``key`` is given,
      the initialisation and dropout keys (``jax.random.key(seed)``).
    - ``checkpoint_dir``: save ``{"variables", "opt_state"}`` with JSON metadata every
      ``checkpoint_every`` epochs (the previous rolling checkpoint is deleted), at every epoch of
      ``save_epochs`` (kept) and at the end. With ``resume=True`` a later call resumes from the latest
      checkpoint at or below ``config.epochs``; a checkpoint from a different model, dataset, seed or
      config raises ``ValueError``. Epoch 0 in ``save_epochs`` stores the initialisation.
    - ``callback(epoch, result)`` runs after each epoch (after its checkpoint); raising from it stops
      training (this is how tests simulate a kill).
    - ``init_variables``: start from these variables instead of ``model.init``.

    Returns a :class:`TrainResult` (variables, optimizer state, per-epoch history, snapshots).
    """
    seed = config.seed if seed is None else int(seed)
    spe = num_batches(len(train), config.batch_size, config.drop_last)
    compiled = _compiled_for(model, config, spe)
    return _train(compiled, train, test, seed=seed, key=key, checkpoint_dir=checkpoint_dir,
                  save_epochs=save_epochs, checkpoint_every=checkpoint_every, progress=progress,
                  callback=callback, resume=resume, init_variables=init_variables)


def train_many(model: Model, train: Dataset, test: Dataset | None, config: TrainConfig,
               seeds: Sequence[int], *, checkpoint_dir: str | os.PathLike | None = None,
               save_epochs: Sequence[int] = (), checkpoint_every: int = 1, progress: bool = True,
               resume: bool = True) -> list[TrainResult]:
    """Independent runs of :func:`train_model`, one per seed (e.g. the four corners of a surface).

    The jitted step is compiled once and shared. With ``checkpoint_dir`` each run checkpoints (and
    resumes) in ``checkpoint_dir/seed_<seed>``.
    """
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    spe = num_batches(len(train), config.batch_size, config.drop_last)
    compiled = _compiled_for(model, config, spe)
    results = []
    for s in seeds:
        cdir = os.path.join(os.fspath(checkpoint_dir), f"seed_{s}") if checkpoint_dir is not None else None
        results.append(_train(compiled, train, test, seed=s, key=None, checkpoint_dir=cdir,
                              save_epochs=save_epochs, checkpoint_every=checkpoint_every, progress=progress,
                              callback=None, resume=resume, init_variables=None))
    return results
