"""Training a connector: minimise the expected loss over the points of a curve, chain or surface.

The objective is the uniform-average loss over the connector, ``l(theta) = int L(w_theta(t)) dt`` for
curves (Garipov et al., 2018, "Loss surfaces, mode connectivity, and fast ensembling of DNNs") and eq. 9 of
the Bézier-surface paper (Anonymous, 2024, "Revisiting mode connectivity in neural networks with Bézier
surface") for surfaces, estimated per mini-batch by ``k`` points drawn by a sampler; its gradient is the
unbiased estimate of that paper's eq. 10. :class:`ConnectorObjective` is that estimate as an objective of
the control points, ``objective(control, batch, key) -> (loss, aux)``, so it trains with the engine's one
step and loop (:mod:`mclandscape.engine.loop`): all ``k`` points are evaluated on the same batch and one
optimizer update follows per batch. Only the trainable control points move (the step's mask restores the
others bit for bit).

How the ``k`` points are evaluated (``strategy``): ``"unroll"`` (the k points written out one after
another), ``"map"`` (``jax.lax.map``) or ``"vmap"``; ``"auto"`` (the default) is the engine's rule for
differentiated points (:func:`mclandscape.engine.mapping.resolve`): unrolled on CPU for a convolutional
model, vmapped otherwise.

:func:`train_connector` trains a connector of a model on a dataset, or of any objective on any batch stream
(an analytic potential, a regression loss), as ``(objective, connector, data, config)``: the options are a
:class:`ConnectorConfig`, validated once on construction, which :class:`~mclandscape.methods.curves.CurveConfig`
and :class:`~mclandscape.methods.surface_train.SurfaceConfig` extend. A run with a ``checkpoint_dir`` resumes
after its last saved epoch and, since every random draw derives from ``(seed, step)``, ends exactly where an
uninterrupted run would; its fingerprint (the connector's kind, shape and mask, a digest of the initial control points and of
the data, the model and the hyper-parameters) must match, else the resume is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mclandscape.core import _checks
from mclandscape.core.connectors import _KINDS, Connector
from mclandscape.core.losses import cross_entropy
from mclandscape.core.objective import make_objective
from mclandscape.core.tree import check_finite, tree_combine, tree_digest, tree_dot
from mclandscape.engine import cpu, mapping
from mclandscape.engine.batches import batch_stream, data_digest
from mclandscape.engine.data import Dataset
from mclandscape.engine.distributed import training_mesh
from mclandscape.engine.loop import LoopConfig, run
from mclandscape.engine.optim import Transform
from mclandscape.engine.step import make_step

__all__ = [
    "ConnectorConfig", "ConnectorTrainResult", "ConnectorObjective", "UniformSampler", "uniform_sampler",
    "train_connector", "checkpointed_connector", "check_connector", "dataset_steps", "STRATEGIES",
    "WEIGHT_DECAY_ON",
]

STRATEGIES = ("auto",) + mapping.HOW
WEIGHT_DECAY_ON = ("point", "control")


def check_connector(connector, kinds: Sequence[str], fn: str, *, build: str = "") -> Connector:
    """``connector`` if it is a :class:`Connector` of one of ``kinds``; a ``TypeError`` that says what to do if not.

    Args:
      connector: the value passed as the connector.
      kinds: the accepted connector kinds.
      fn: the caller's name, for the message.
      build: how to build the connector, for the message (e.g. ``"mcl.bezier_curve(start, end, degree=2)"``).

    Returns:
      The connector.

    Raises:
      TypeError: ``connector`` is not a Connector.
      ValueError: the connector is of another kind.

    Example:
        >>> import jax.numpy as jnp
        >>> from mclandscape.core.connectors import bezier_curve
        >>> check_connector(bezier_curve({"w": jnp.zeros(1)}, {"w": jnp.ones(1)}), ("bezier",), "f").kind
        'bezier'
    """
    hint = f"; build it with {build}" if build else ""
    if not isinstance(connector, Connector):
        raise TypeError(f"{fn}(model, connector, train, *, ...) takes a {' or '.join(kinds)} Connector as its "
                        f"second argument and keyword options after train, got a {type(connector).__name__}{hint} "
                        f"and pass it in place of the end points")
    if connector.kind not in kinds:
        raise ValueError(f"{fn} trains {' or '.join(kinds)} connectors, got a {connector.kind!r} connector")
    return connector


def dataset_steps(data, batch_size: int, fn: str) -> int:
    """The full batches of ``batch_size`` in the Dataset ``data``: a ``TypeError`` when ``data`` is no Dataset, a
    ``ValueError`` when the batch is larger than the data.

    Args:
      data: the training data.
      batch_size: a validated batch size (a config's).
      fn: the caller's name, for the message.

    Returns:
      ``len(data) // batch_size``.

    Example:
        >>> import numpy as np
        >>> dataset_steps(Dataset(np.zeros((120, 2), np.float32), np.zeros(120, np.int32), 2, "toy"), 32, "f")
        3
    """
    if not isinstance(data, Dataset):
        raise TypeError(f"{fn}: data must be a Dataset (mcl.load_dataset(...) or mcl.Dataset(x, y, ...)), got "
                        f"{type(data).__name__}")
    if batch_size > len(data):
        raise ValueError(f"batch_size {batch_size} is larger than the training set ({len(data)} examples)")
    return len(data) // batch_size


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    """What :func:`train_connector` computes (validated on construction; equal configs hash equal).

    :class:`~mclandscape.methods.curves.CurveConfig` and :class:`~mclandscape.methods.surface_train.SurfaceConfig`
    extend it (with their own ``epochs`` and default optimizer).

    Attributes:
      epochs: epochs to train (one epoch is ``steps_per_epoch`` updates).
      batch_size: examples per batch of a Dataset (at most its size).
      steps_per_epoch: updates per epoch of a batch stream or a fixed batch (a Dataset gives its own).
      num_samples: ``k``, the points evaluated per batch.
      weight_decay, weight_decay_on: ``"point"``: ``(wd/2) |phi(p)|^2`` at every sampled point (Garipov et al.,
        2018: the L2 regulariser on the curve's weights); ``"control"``: ``(wd/2) sum |theta_k|^2`` over the
        trainable control points (:class:`ConnectorObjective`'s ``point_l2`` and ``l2``).
      optimizer: the Optax transform (:func:`train_connector` needs one).
      loss_fn: the per-example loss of a model (``(logits, y) -> [N]``).
      augment: random crops and flips of image batches.
      strategy: how the ``k`` points are evaluated: ``"auto"`` (default), ``"unroll"``, ``"map"`` or ``"vmap"``
        (module docstring).

    Example:
        >>> ConnectorConfig(weight_decay=5e-4).l2_terms
        {'point_l2': 0.0005, 'l2': 0.0}
        >>> ConnectorConfig(weight_decay_on="bends")
        Traceback (most recent call last):
        ...
        ValueError: weight_decay_on must be one of ['control', 'point'], got 'bends'
    """

    epochs: int = 1
    batch_size: int = 128
    steps_per_epoch: int | None = None
    num_samples: int = 1
    weight_decay: float = 0.0
    weight_decay_on: str = "point"
    optimizer: Any = None
    loss_fn: Callable = cross_entropy
    augment: bool = False
    strategy: str | None = "auto"

    def __post_init__(self):
        object.__setattr__(self, "epochs", _checks.integer(self.epochs, "epochs", low=0))
        self._check_common()

    def _check_common(self, callable_optimizer: bool = False):
        """The checks of the fields every connector config shares (a subclass checks its ``epochs`` itself)."""
        counts = ("batch_size", "num_samples") + (() if self.steps_per_epoch is None else ("steps_per_epoch",))
        for name in counts:  # stored as ints: they become shapes
            object.__setattr__(self, name, _checks.integer(getattr(self, name), name, low=1))
        _checks.real(self.weight_decay, "weight_decay", low=0.0)
        _checks.choice(self.weight_decay_on, "weight_decay_on", WEIGHT_DECAY_ON)
        _checks.choice(self.strategy or "auto", "strategy", STRATEGIES)
        opt = self.optimizer
        if not (opt is None or isinstance(opt, optax.GradientTransformation | Transform)
                or (callable_optimizer and callable(opt))):
            raise TypeError(f"optimizer must be an optax transformation{', a callable' if callable_optimizer else ''}"
                            f" or None, got {opt!r}")

    @property
    def l2_terms(self) -> dict:
        """``{"point_l2": ..., "l2": ...}``: the weight decay as :class:`ConnectorObjective`'s two terms."""
        wd = float(self.weight_decay)
        return {"point_l2": wd, "l2": 0.0} if self.weight_decay_on == "point" else {"point_l2": 0.0, "l2": wd}

    def connector_config(self, **changes) -> ConnectorConfig:
        """The :class:`ConnectorConfig` of this config's shared fields with ``changes`` (e.g. a subclass's
        ``epochs`` and built optimizer)."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(ConnectorConfig)}
        return ConnectorConfig(**{**shared, **changes})


@struct.dataclass
class UniformSampler:
    """Points uniform on [0, 1] (``dim`` 1: ``[k]`` t values) or on [0, 1]^d (``[k, d]``)."""

    dim: int = struct.field(pytree_node=False)

    def __call__(self, key, k):
        return jax.random.uniform(key, (k,) if self.dim == 1 else (k, self.dim))


def uniform_sampler(point_dim: int) -> UniformSampler:
    """Points uniform on [0, 1] or [0, 1]^d (see :class:`UniformSampler`).

    Args:
      point_dim: 1 (t values ``[k]``) or d (points ``[k, d]``).

    Returns:
      A :class:`UniformSampler`, ``sampler(key, k) -> points``.

    Example:
        >>> import jax
        >>> uniform_sampler(2)(jax.random.key(0), 5).shape
        (5, 2)
    """
    return UniformSampler(_checks.integer(point_dim, "point_dim", low=1))


@struct.dataclass(eq=False)  # holds arrays: hashed by identity, like a jax.Array
class ConnectorObjective:
    """``objective(control, batch, key) -> (loss, aux)``: the mini-batch estimate of the expected loss.

    ``loss = (1/k) sum_i w_i (L(phi(p_i); batch) + point_l2/2 |phi(p_i)|^2) + l2/2 sum_{trainable k}
    |theta_k|^2`` with ``p_i ~ sampler``, ``phi(p) = sum_k c_k(p) theta_k``, ``c = coefficients(p)``
    (default the connector's own), ``w = point_weights(connector, p)`` (default 1) and ``L`` the point
    objective's loss. ``point_l2`` is the weight decay of Garipov et al.'s curve training (on the weights at
    the sampled point); ``aux["loss"]`` is the mean task loss of the ``k`` points (no weights, no L2) and
    ``aux["point_losses"]`` the ``k`` losses.

    The fields are static configuration except ``point`` (an objective, a pytree), the ``point_weights`` and
    ``sampler`` data (e.g. an area proposal's tables) and the ``mask`` of trainable control points.
    """

    point: Callable
    template: Connector
    sampler: Callable
    mask: jax.Array
    num_samples: int = struct.field(pytree_node=False, default=1)
    coefficients: Callable | None = None
    point_weights: Callable | None = None
    l2: float = struct.field(pytree_node=False, default=0.0)
    point_l2: float = struct.field(pytree_node=False, default=0.0)
    strategy: str = struct.field(pytree_node=False, default="unroll")
    mesh: jax.sharding.Mesh | None = struct.field(pytree_node=False, default=None)

    def __call__(self, control, batch, key):
        ks, kd = jax.random.split(key)
        pts = self.sampler(ks, self.num_samples)
        coefs = (self.coefficients or self.template.coefficients)(pts)
        cdt = jnp.result_type(*jax.tree_util.tree_leaves(control))
        if jnp.issubdtype(cdt, jnp.floating):  # points in the parameters' precision (float64 under x64)
            coefs = coefs.astype(cdt)
        keys = jax.random.split(kd, self.num_samples)
        if self.mesh is not None and self.mesh.shape.get("points", 1) > 1:
            # the k points split over the mesh's points axis (the vmapped axis below)
            split = NamedSharding(self.mesh, P("points"))
            coefs, keys = jax.lax.with_sharding_constraint((coefs, keys), split)

        def one(args):
            c, kk = args
            params = tree_combine(c, control)
            task, _ = self.point(params, batch, kk)
            reg = 0.5 * self.point_l2 * tree_dot(params, params) if self.point_l2 else jnp.zeros((), task.dtype)
            return task, reg

        losses, regs = mapping.map_over(one, (coefs, keys), self.strategy)
        w = 1.0 if self.point_weights is None else self.point_weights(self.template.replace(control=control), pts)
        value = jnp.mean(w * (losses + regs))
        if self.l2:
            m = self.mask.astype(losses.dtype)
            sq = sum(jnp.sum(m.reshape((-1,) + (1,) * (x.ndim - 1)) * jnp.square(x))
                     for x in jax.tree_util.tree_leaves(control))
            value = value + 0.5 * self.l2 * sq
        return value, {"loss": jnp.mean(losses), "point_losses": losses}


@dataclasses.dataclass(frozen=True)
class ConnectorTrainResult:
    """The trained connector, the optimizer state, one history record per epoch (``epoch`` from 1,
    ``objective``, ``loss``, ``grad_norm``, ``seconds``), the epoch the run resumed from (``None``: a fresh
    run) and the epoch a callback stopped it at (``None``: it ran to the end)."""

    connector: Connector
    opt_state: Any
    history: list[dict]
    resumed_from: int | None = None
    stopped: int | None = None

    @classmethod
    def at(cls, connector: Connector, state, history: list[dict], **kw) -> ConnectorTrainResult:
        """The result as of a loop ``state`` and ``history`` (the loop's ``acc``, meaningless here, dropped)."""
        return cls(connector=connector.replace(control=state.params), opt_state=state.opt_state,
                   history=[{k: v for k, v in h.items() if k != "acc"} for h in history], **kw)


def _stream(data, cfg: ConnectorConfig, seed: int):
    """``(batches, steps_per_epoch, digest)`` for a Dataset, a ``t -> batch`` stream or a fixed batch."""
    if isinstance(data, Dataset):
        dataset_steps(data, cfg.batch_size, "train_connector")
        stream = batch_stream(data, cfg.batch_size, seed=seed, augment=cfg.augment, drop_last=True)
        return stream, stream.steps_per_epoch, data_digest(data)
    if callable(data):
        spe = cfg.steps_per_epoch or getattr(data, "steps_per_epoch", None)
        if spe is None:
            raise ValueError("a batch stream needs steps_per_epoch (in the config, or a stream with .steps_per_epoch)")
        return data, int(spe), getattr(data, "digest", None)
    return (lambda t: data), cfg.steps_per_epoch or 1, tree_digest(data) if data is not None else None


def train_connector(objective, connector: Connector, data, config: ConnectorConfig, *, sampler: Callable | None = None,
                    trainable: np.ndarray | None = None, point_weights: Callable | None = None,
                    coefficients: Callable | None = None, seed: int = 0, loop: LoopConfig | None = None,
                    callbacks: Sequence[Callable] = (), hyper: Mapping | None = None,
                    metadata: Mapping | None = None, run_start: Connector | None = None,
                    devices: int | None = None) -> ConnectorTrainResult:
    """Train the trainable control points of ``connector`` for ``config.epochs`` epochs.

    Args:
      objective: a :class:`~mclandscape.engine.models.Model` (trained in train mode, as Garipov et al. train
        curves: dropout on, BatchNorm on batch statistics; ``config.loss_fn`` is its per-example loss) or any
        point objective ``(params, batch, key) -> (loss, aux)``.
      connector: the connector; its ``fixed`` mask, ``&``-ed with ``trainable``, says what moves.
      data: a :class:`~mclandscape.engine.data.Dataset` (shuffled full batches of ``config.batch_size`` per
        epoch, random crops and flips with ``config.augment``), a random-access stream ``t -> batch`` (with
        ``config.steps_per_epoch``) or one fixed batch (``None`` for a potential).
      config: the :class:`ConnectorConfig` (its ``optimizer`` is the Optax transform).
      sampler: ``sampler(key, k) -> points`` (default uniform on the connector's parameter domain).
      trainable, point_weights, coefficients: a ``[K]`` mask ``&``-ed with the connector's; see
        :class:`ConnectorObjective` for the others.
      seed: the sampling, dropout and batch-order seed.
      loop: checkpoints, rotation, resume and progress (:class:`~mclandscape.engine.loop.LoopConfig`).
      callbacks: ``callback(epoch, state, history)`` after every epoch (``epoch`` from 1, as in the history);
        raising :class:`~mclandscape.engine.loop.StopRun` ends the run there.
      hyper: hyper-parameters that built the optimizer (learning rate, schedule, ...), recorded in the
        fingerprint.
      metadata: extra JSON stored with the checkpoints.
      run_start: when this call continues a run in segments (the same ``checkpoint_dir``, a larger ``epochs``,
        e.g. with a sampler rebuilt between segments), the connector the run started from; the fingerprint
        records it instead of ``connector``.
      devices: how many devices to train on (default all of the job's, across processes): the ``k`` points
        and the batch are split over a ``("points", "data")`` mesh
        (:func:`mclandscape.engine.distributed.training_mesh`; with a points split the points are vmapped);
        the result equals one device's to float rounding.

    Returns:
      A :class:`ConnectorTrainResult` (``history``: one record per epoch, ``epoch`` from 1).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from mclandscape.core.connectors import bezier_curve
        >>> bowl = lambda p, batch, key: (jnp.sum(p["w"] ** 2), {})
        >>> c = bezier_curve({"w": jnp.array([-1.0, 1.0])}, {"w": jnp.array([1.0, 1.0])}, 2)
        >>> cfg = ConnectorConfig(epochs=2, steps_per_epoch=5, num_samples=4, optimizer=optax.sgd(0.1))
        >>> res = train_connector(bowl, c, None, cfg, loop=LoopConfig(progress=False))
        >>> [r["epoch"] for r in res.history], bool(res.connector.control["w"][1, 1] < 1.0)
        ([1, 2], True)
    """
    cfg = config
    if not isinstance(cfg, ConnectorConfig) or cfg.optimizer is None:
        raise TypeError(f"train_connector needs a ConnectorConfig with an optimizer, got {cfg!r}")
    mask = _trainable(check_connector(connector, _KINDS, "train_connector"), trainable)
    check_finite(connector.control, "connector control points")
    model, point = _point_objective(objective, cfg.loss_fn)
    batches, spe, digest = _stream(data, cfg, seed)
    sampler = sampler or uniform_sampler(connector.point_dim)
    leaves = jax.tree_util.tree_leaves(batches(0))
    mesh = training_mesh(int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) else 1, cfg.num_samples,
                         devices=devices)
    how, _ = mapping.resolve(cfg.strategy or "auto", cfg.num_samples,
                             has_conv=cpu.has_conv(connector.control, stacked=1), grad=True)
    if mesh is not None and mesh.shape["points"] > 1:
        how = "vmap"  # the points are split over devices along the vmapped axis
    obj = ConnectorObjective(point=point, template=connector.replace(control=None), sampler=sampler,
                             mask=jnp.asarray(mask), num_samples=cfg.num_samples, coefficients=coefficients,
                             point_weights=point_weights, strategy=how, mesh=mesh, **cfg.l2_terms)
    step = make_step(obj, cfg.optimizer, trainable=jax.tree_util.tree_map(lambda _: jnp.asarray(mask),
                                                                          connector.control), mesh=mesh)
    hyper = {"epochs": cfg.epochs, "num_samples": cfg.num_samples, **cfg.l2_terms,
             "batch_size": cfg.batch_size if isinstance(data, Dataset) else None, "steps_per_epoch": spe,
             "seed": int(seed), "augment": bool(cfg.augment), "sampler": _describe(sampler),
             "coefficients": _describe(coefficients), "point_weights": _describe(point_weights),
             "loss_fn": _describe(cfg.loss_fn), **dict(hyper or {})}
    fingerprint = {"trainer": "connector", "kind": connector.kind, "shape": list(connector.shape),
                   "trainable": mask.tolist(), "model": None if model is None else model.spec,
                   "objective": None if model is not None else type(point).__name__, "hyper": hyper,
                   "inputs": {"control": tree_digest((run_start or connector).control), "data": digest}}
    res = run(step, step.init(connector.control), batches, epochs=cfg.epochs, steps_per_epoch=spe,
              key=jax.random.key(seed), config=loop or LoopConfig(desc=f"train {connector.kind}"),
              fingerprint=fingerprint, callbacks=callbacks,
              metadata={"kind": connector.kind, "shape": list(connector.shape), **dict(metadata or {})})
    return ConnectorTrainResult.at(connector, res.state, res.history, resumed_from=res.resumed_from,
                                   stopped=res.stopped)


def _trainable(connector: Connector, trainable) -> np.ndarray:
    """The ``[K]`` mask of the control points that move: the connector's own, ``&``-ed with ``trainable``."""
    mask = np.asarray(connector.trainable, bool)
    if trainable is not None:
        t = np.asarray(trainable, bool).reshape(-1)
        if t.size != connector.num_control:
            raise ValueError(f"trainable mask has {t.size} entries for {connector.num_control} control points")
        mask = mask & t
    if not mask.any():
        raise ValueError("no trainable control point: the mask fixes every control point")
    return mask


def _point_objective(objective, loss_fn) -> tuple[Any, Callable]:
    """``(model or None, point objective)``: a Model is trained in train mode with ``loss_fn``."""
    if hasattr(objective, "apply") and hasattr(objective, "init"):
        return objective, make_objective(objective, loss_fn, train=True)
    if not callable(objective):
        raise ValueError(f"objective must be a Model or a callable (params, batch, key) -> (loss, aux), "
                         f"got {type(objective).__name__}")
    return None, objective


def _describe(obj) -> str | None:
    """What a sampler, weighting or loss is, for the fingerprint: the class and its static fields (its arrays,
    e.g. an area proposal rebuilt between segments, are not part of the run's identity)."""
    if obj is None:
        return None
    if dataclasses.is_dataclass(obj):
        static = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
                  if not f.metadata.get("pytree_node", True)}
        return f"{type(obj).__name__}{static}"
    return getattr(obj, "__qualname__", type(obj).__name__)


def checkpointed_connector(connector: Connector, tx: optax.GradientTransformation,
                           checkpoint_dir) -> tuple[Connector, int]:
    """The connector as saved by the newest checkpoint of a :func:`train_connector` run in ``checkpoint_dir``.

    Whether that run matches is checked when training resumes.

    Args:
      connector: the run's connector (the template of the restored control points).
      tx: the run's optax transformation (the template of the optimizer state).
      checkpoint_dir: the run's directory.

    Returns:
      ``(connector, epoch)``; ``(connector, 0)`` when there is no checkpoint.

    Example:
        >>> import tempfile, jax.numpy as jnp, optax
        >>> from mclandscape.core.connectors import bezier_curve
        >>> c = bezier_curve({"w": jnp.zeros(1)}, {"w": jnp.ones(1)}, 2)
        >>> checkpointed_connector(c, optax.sgd(0.1), tempfile.mkdtemp())[1]
        0
    """
    from mclandscape.engine.checkpoint import latest_step
    from mclandscape.engine.resume import restore_state
    from mclandscape.engine.step import init_state

    last = latest_step(checkpoint_dir)
    if not last:
        return connector, 0
    like = init_state(connector.control, tx)
    return connector.replace(control=restore_state(checkpoint_dir, last, like).params), int(last)
