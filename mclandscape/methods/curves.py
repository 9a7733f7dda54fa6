"""Curve mode connectivity: train a low-loss curve between two models, evaluate it.

Garipov et al., 2018 ("Loss surfaces, mode connectivity, and fast ensembling of DNNs"). Curves are
:class:`~mclandscape.core.connectors.Connector` objects with fixed end points: a Bézier curve of any degree
(``w(t) = (1-t)^2 w_1 + 2t(1-t) theta + t^2 w_2`` in the quadratic case, ``mcl.bezier_curve``) or a polygonal
chain with any number of bends (the one-bend chain ``2(t theta + (0.5-t) w_1)`` on ``[0, 0.5]``,
``2((t-0.5) w_2 + (1-t) theta)`` on ``[0.5, 1]``, ``mcl.polychain``). Training (:func:`train_curve`, called
like :func:`mclandscape.methods.surface_train.train_surface` as ``(model, connector, data, config)``) minimises
the average loss along the curve

    l(theta) = int_0^1 L(w_theta(t)) dt,        theta <- theta - eta grad l(theta),

estimated per mini-batch by ``k`` values ``t ~ U(0, 1)`` evaluated together; it runs on the connector
trainer (:mod:`mclandscape.engine.connector_train`). Conventions of Garipov's reference implementation
(``dnn-mode-connectivity``) that are the defaults here:

- the L2 regulariser is ``(wd/2) |w(t)|^2`` *at the sampled point* (their ``l2_regularizer`` on the curve
  weights), which reaches only the bends because the ends are fixed (``weight_decay_on="point"``);
  ``weight_decay_on="control"`` instead decays the bends directly, ``(wd/2) sum_bends |theta|^2``;
- SGD with momentum 0.9 and their learning-rate schedule (:func:`garipov_schedule`: constant for the first
  half of training, linear decay to 1 % at 90 %, then 1 %), one t per batch (``num_samples=1``);
- evaluation at 61 evenly spaced t with BatchNorm statistics recomputed at every point on the training
  data (their ``update_bn``), reporting train loss, test loss and accuracy and, for every series, min /
  max / mean and the length-weighted integral ``sum_j (v_j + v_{j+1})/2 |w(t_{j+1}) - w(t_j)| / length``.

Path metrics: the loss barrier ``max_t [L(w(t)) - ((1-t) L(w(0)) + t L(w(1)))]`` (:func:`loss_barrier`;
the straight line is the degree-1 curve :func:`line_connector`), and the curve length in parameter space
(:func:`curve_length`; exact for chains, a fine polyline for Bézier curves). Distances along the curve use
the Gram matrix of the control points (``|sum_k a_k theta_k|^2 = a^T G a``), so no parameter copy per point
is materialised.

:func:`fit_curve` is the same training for any ``loss_fn(params, batch)`` (analytic potentials).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mclandscape.core import _checks
from mclandscape.core.connectors import Connector, bezier_curve
from mclandscape.core.objective import function_objective
from mclandscape.core.tree import PyTree, tree_distance, tree_gram, tree_index
from mclandscape.engine.connector_train import (
    ConnectorConfig,
    ConnectorTrainResult,
    check_connector,
    dataset_steps,
    train_connector,
    uniform_sampler,
)
from mclandscape.engine.data import Dataset
from mclandscape.engine.evaluate import evaluate
from mclandscape.engine.loop import LoopConfig
from mclandscape.engine.optim import transform
from mclandscape.engine.points import connector_points

__all__ = [
    "CURVE_KINDS", "line_connector", "garipov_schedule", "CurveConfig", "train_curve",
    "fit_curve", "PathEvaluation", "evaluate_curve", "path_stats", "loss_barrier", "point_distances", "curve_length",
]

CURVE_KINDS = ("bezier", "polychain")


def line_connector(start: PyTree, end: PyTree) -> Connector:
    """The straight segment ``(1 - t) start + t end`` as a degree-1 Bézier curve.

    Args:
      start, end: the end models.

    Returns:
      A :class:`~mclandscape.core.connectors.Connector` of kind ``"bezier"`` with 2 control points.

    Example:
        >>> import jax.numpy as jnp
        >>> line_connector({"w": jnp.array([0.0])}, {"w": jnp.array([4.0])}).point(0.25)["w"].tolist()
        [1.0]
    """
    return bezier_curve(start, end, degree=1)


def garipov_schedule(base_lr: float, epochs: int, steps_per_epoch: int) -> optax.Schedule:
    """Garipov et al.'s learning rate per step.

    With ``a = epoch / epochs``: ``base_lr`` for ``a <= 0.5``, ``base_lr (1 - 0.99 (a - 0.5) / 0.4)`` for
    ``a <= 0.9``, else ``0.01 base_lr`` (constant within an epoch).

    Args:
      base_lr: the initial learning rate (> 0).
      epochs: the length of training in epochs (>= 1).
      steps_per_epoch: optimizer steps per epoch (>= 1).

    Returns:
      An optax schedule ``step -> learning rate``.

    Example:
        >>> s = garipov_schedule(0.1, epochs=10, steps_per_epoch=2)
        >>> [round(float(s(e * 2)), 4) for e in (0, 7, 9)]
        [0.1, 0.0505, 0.001]
    """
    if base_lr <= 0 or epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"need base_lr > 0, epochs >= 1, steps_per_epoch >= 1; got {base_lr}, {epochs}, "
                         f"{steps_per_epoch}")

    def schedule(step):
        a = (step // steps_per_epoch) / epochs
        f = jnp.where(a <= 0.5, 1.0, jnp.where(a <= 0.9, 1.0 - (a - 0.5) / 0.4 * 0.99, 0.01))
        return base_lr * f

    return schedule


def _garipov_sgd(lr: float, epochs: int, steps_per_epoch: int, momentum: float) -> optax.GradientTransformation:
    return optax.sgd(garipov_schedule(lr, epochs, steps_per_epoch), momentum=momentum or None)


@dataclasses.dataclass(frozen=True)
class CurveConfig(ConnectorConfig):
    """What :func:`train_curve` computes: a :class:`~mclandscape.engine.connector_train.ConnectorConfig` (the
    batch size, ``k``, weight decay, loss, augmentation and strategy, checked there) with Garipov's defaults.

    Attributes:
      epochs: epochs to train.
      lr, momentum: the default optimizer's base learning rate and momentum: SGD with momentum on
        :func:`garipov_schedule` (0.015 and weight decay 5e-4 are the reference's VGG16 settings; the weight
        decay lives in the objective, as in the reference), used when ``optimizer`` is ``None``.
      weight_decay, weight_decay_on: ``(wd/2) |w(t)|^2`` at the sampled point (``"point"``, Garipov's) or on the
        trainable control points (``"control"``).
      steps_per_epoch: the optimizer steps per epoch of :func:`fit_curve` (:func:`train_curve`: the data's).

    Example:
        >>> CurveConfig(epochs=2).lr
        0.015
        >>> CurveConfig(weight_decay_on="bends")
        Traceback (most recent call last):
        ...
        ValueError: weight_decay_on must be one of ['control', 'point'], got 'bends'
    """

    epochs: int = 30
    weight_decay: float = 5e-4
    lr: float = 0.015
    momentum: float = 0.9

    def __post_init__(self):
        super().__post_init__()
        _checks.real(self.lr, "lr", low=0.0, low_open=True)
        _checks.real(self.momentum, "momentum", low=0.0)


def _fit(objective, curve: Connector, data, cfg: CurveConfig, steps_per_epoch: int, *, seed: int,
         callback: Callable | None, loop: LoopConfig, devices: int | None = None) -> ConnectorTrainResult:
    """Train a curve on the connector trainer with Garipov's defaults (:func:`train_curve`, :func:`fit_curve`)."""
    if not isinstance(cfg, CurveConfig):
        raise TypeError(f"config must be a CurveConfig, got {type(cfg).__name__}")
    if float(tree_distance(tree_index(curve.control, 0), tree_index(curve.control, -1))) == 0.0:
        raise ValueError("start and end are identical points: there is no curve to train between them")
    if not curve.trainable.any() or curve.num_control < 3:
        raise ValueError("a curve with no trainable inner control point (degree 1 / 0 bends) has nothing to train")
    opt = cfg.optimizer or transform(_garipov_sgd, float(cfg.lr), max(cfg.epochs, 1), steps_per_epoch,
                                     float(cfg.momentum))
    hyper = {"curve": curve.kind, "optimizer": "default" if cfg.optimizer is None else "custom", "lr": float(cfg.lr),
             "momentum": float(cfg.momentum), "weight_decay": float(cfg.weight_decay),
             "weight_decay_on": cfg.weight_decay_on}
    callbacks = [] if callback is None else [lambda e, st, h: callback(e, ConnectorTrainResult.at(curve, st, h))]
    return train_connector(objective, curve, data, cfg.connector_config(optimizer=opt), sampler=uniform_sampler(1),
                           seed=seed, hyper=hyper, loop=loop, callbacks=callbacks, metadata={"curve": curve.kind},
                           devices=devices)


def train_curve(model, curve: Connector, data: Dataset, config: CurveConfig | None = None, *, seed: int = 0,
                checkpoint_dir: str | os.PathLike | None = None, keep: int = 1, overwrite: bool = False,
                progress: bool | None = None, callback: Callable[[int, ConnectorTrainResult], None] | None = None,
                devices: int | None = None) -> ConnectorTrainResult:
    """Train the bends of a Bézier curve or polygonal chain of ``model`` on ``data`` (Garipov et al., 2018).

    The objective is the expected loss over ``t ~ U(0, 1)``, ``num_samples`` t values per batch, plus the
    weight decay (module docstring); the ends stay fixed bit for bit. Same calling convention as
    :func:`mclandscape.methods.surface_train.train_surface`: ``(model, connector, data, config, *, ...)``.

    Args:
      model: the :class:`~mclandscape.engine.models.Model` (trained in train mode: dropout on, BatchNorm on
        batch statistics).
      curve: the curve, e.g. ``mcl.bezier_curve(start, end, degree=2)`` or ``mcl.polychain(start, end,
        num_bends=1)`` (inner points on the straight segment, Garipov's ``init_linear``), or a curve trained
        before.
      data: the training :class:`~mclandscape.engine.data.Dataset` (shuffled full batches each epoch).
      config: the :class:`CurveConfig` (default ``CurveConfig()``).
      seed: batch order, t samples and dropout.
      checkpoint_dir, keep, overwrite: checkpoints after every epoch (the last ``keep`` stay); a second call
        with the same directory resumes the same run (same curve, data, config and seed) and refuses another;
        ``overwrite=True`` starts afresh.
      progress: a progress bar (``None``: when stderr is a terminal).
      callback: ``callback(epoch, result)`` after every epoch (``epoch`` from 1, as in the history; ``result``
        a :class:`ConnectorTrainResult` as of that epoch); raising
        :class:`~mclandscape.engine.loop.StopRun` ends training there.
      devices: how many devices to train on (see :func:`mclandscape.engine.connector_train.train_connector`).

    Returns:
      A :class:`ConnectorTrainResult` (``history``: one record per epoch, ``epoch`` from 1).

    Raises:
      TypeError: ``curve`` is not a Connector (e.g. the two end points were passed), ``data`` is not a
        Dataset or ``config`` not a CurveConfig.
      ValueError: a batch size larger than the data, identical ends, or a curve with nothing to train.

    Example:
        >>> import jax
        >>> import mclandscape as mcl
        >>> train = mcl.load_dataset("iris", "train")
        >>> model = mcl.get_model("mlp", widths=[4], num_classes=3)
        >>> p0, p1 = (model.init(jax.random.key(s), train.x[:1])["params"] for s in (0, 1))
        >>> res = train_curve(model, mcl.bezier_curve(p0, p1, degree=2), train, CurveConfig(epochs=2, batch_size=60),
        ...                   progress=False)
        >>> [r["epoch"] for r in res.history], res.connector.shape
        ([1, 2], (3,))
    """
    curve = check_connector(curve, CURVE_KINDS, "train_curve",
                            build="mcl.bezier_curve(start, end, degree=2) or mcl.polychain(start, end, num_bends=1)")
    cfg = CurveConfig() if config is None else config
    spe = dataset_steps(data, cfg.batch_size, "train_curve")
    loop = LoopConfig(checkpoint_dir=checkpoint_dir, keep=keep, overwrite=overwrite, progress=progress,
                      desc=f"train {curve.kind}")
    return _fit(model, curve, data, cfg, spe, seed=seed, callback=callback, loop=loop, devices=devices)


def fit_curve(loss_fn: Callable[[PyTree, Any], jax.Array], connector: Connector, config: CurveConfig, *, data=None,
              seed: int = 0, progress: bool | None = None,
              callback: Callable[[int, ConnectorTrainResult], None] | None = None) -> ConnectorTrainResult:
    """Train a curve for any ``loss_fn(params, batch) -> scalar`` (e.g. a 2-D potential).

    Args:
      loss_fn: the loss of one parameter point on a batch.
      connector: the curve (its ends fixed).
      config: the :class:`CurveConfig`; ``steps_per_epoch`` optimizer steps per epoch (default 1).
      data: ``None``, a fixed batch, or a callable ``step -> batch``.
      seed, progress, callback: as for :func:`train_curve`.

    Returns:
      A :class:`ConnectorTrainResult`.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from mclandscape.core.connectors import bezier_curve
        >>> bowl = lambda p, batch: jnp.sum(p ** 2)
        >>> c = bezier_curve(jnp.array([-1.0, 1.0]), jnp.array([1.0, 1.0]), degree=2)
        >>> cfg = CurveConfig(epochs=20, steps_per_epoch=5, optimizer=optax.sgd(0.1), num_samples=4, weight_decay=0)
        >>> res = fit_curve(bowl, c, cfg)
        >>> bool(res.connector.control[1, 1] < 0.5)   # the bend moved towards the bowl's bottom
        True
    """
    check_connector(connector, CURVE_KINDS, "fit_curve")
    return _fit(function_objective(loss_fn), connector, data, config, config.steps_per_epoch or 1, seed=seed,
                callback=callback, loop=LoopConfig(progress=progress, desc=f"fit {connector.kind}"))


# ---- geometry along a path -----------------------------------------------------------------------------

def _centred_gram(connector: Connector) -> np.ndarray:
    """Gram matrix of the control points relative to the first one (float64 on the host)."""
    first = jax.tree_util.tree_map(lambda x: x[:1], connector.control)
    centred = jax.tree_util.tree_map(lambda x, f: x - f, connector.control, first)
    return np.asarray(tree_gram(centred), np.float64)


def point_distances(connector: Connector, ts) -> np.ndarray:
    """``dl[j] = |w(t_j) - w(t_{j-1})|`` (``dl[0] = 0``) for consecutive points of a curve, shape ``[P]``.

    Uses ``|sum_k a_k theta_k|^2 = a^T G a`` with the coefficient differences ``a`` (which sum to zero, so
    the Gram matrix of the control points relative to the first one gives the same value, well conditioned).

    Args:
      connector: a curve.
      ts: ``[P]`` t values in [0, 1].

    Returns:
      A float64 array ``[P]``.

    Example:
        >>> import jax.numpy as jnp
        >>> line = line_connector(jnp.array([0.0, 0.0]), jnp.array([3.0, 4.0]))
        >>> point_distances(line, [0.0, 0.5, 1.0]).round(4).tolist()
        [0.0, 2.5, 2.5]
    """
    pts = connector.validate_points(ts)
    c = np.asarray(connector.coefficients(jnp.asarray(pts, connector._float_dtype())), np.float64)
    a = c[1:] - c[:-1]
    g = _centred_gram(connector)
    sq = np.einsum("pk,kl,pl->p", a, g, a)
    return np.concatenate([[0.0], np.sqrt(np.maximum(sq, 0.0))])


def curve_length(connector: Connector, num_points: int | None = None) -> float:
    """Length of a curve in parameter space.

    Args:
      connector: a curve.
      num_points: polygonal chains: exactly ``sum_k |theta_{k+1} - theta_k|`` when ``None``, else the polyline
        through ``num_points`` evenly spaced t; Bézier curves: that polyline, default 2001 points (the error
        falls as ``1/num_points^2``).

    Returns:
      The length as a float.

    Example:
        >>> import jax.numpy as jnp
        >>> from mclandscape.core.connectors import polychain
        >>> chain = polychain(jnp.array([0.0, 0.0]), jnp.array([6.0, 0.0]), 1, bends=[jnp.array([3.0, 4.0])])
        >>> round(curve_length(chain), 4)
        10.0
    """
    if connector.kind not in CURVE_KINDS:
        raise ValueError(f"curve_length needs a curve, got a {connector.kind!r} connector")
    if connector.kind == "polychain" and num_points is None:
        g = _centred_gram(connector)
        a = np.diff(np.eye(connector.num_control), axis=0)  # rows e_{k+1} - e_k: the segments
        return float(np.sum(np.sqrt(np.maximum(np.einsum("pk,kl,pl->p", a, g, a), 0.0))))
    n = 2001 if num_points is None else _checks.integer(num_points, "num_points", low=2)
    return float(point_distances(connector, np.linspace(0.0, 1.0, n)).sum())


def path_stats(values, dl) -> dict:
    """``start``, ``end``, ``min``, ``max``, ``mean`` and the length-weighted ``int`` of a series along a path.

    ``int = sum_j (v_{j-1} + v_j)/2 dl_j / sum_j dl_j`` (trapezoid in arc length, Garipov's ``stats``); for a
    path of zero length it falls back to the mean.

    Args:
      values: ``[P]`` values at the points of the path (P >= 2).
      dl: ``[P]`` distances from the previous point (``dl[0] = 0``; :func:`point_distances`).

    Returns:
      A dict of floats.

    Example:
        >>> path_stats([1.0, 3.0, 3.0], [0.0, 1.0, 3.0])["int"]
        2.75
    """
    v = np.asarray(values, np.float64)
    d = np.asarray(dl, np.float64)
    if v.shape != d.shape or v.ndim != 1 or v.size < 2:
        raise ValueError(f"values and dl must be 1-D of the same length >= 2, got {v.shape} and {d.shape}")
    total = d[1:].sum()
    integral = float(np.sum(0.5 * (v[:-1] + v[1:]) * d[1:]) / total) if total > 0 else float(v.mean())
    return {"start": float(v[0]), "end": float(v[-1]), "min": float(v.min()), "max": float(v.max()),
            "mean": float(v.mean()), "int": integral}


def loss_barrier(ts, losses) -> float:
    """``max_t [L(t) - ((1 - t) L(0) + t L(1))]`` over the evaluated points (``ts`` must run from 0 to 1).

    For the straight line this is the usual linear-interpolation barrier; for a curve or a band ``t`` is its
    own path parameter. The ends contribute 0, so the barrier is >= 0, and 0 when the path never rises above
    the chord (e.g. a curve through a region of lower loss than both ends).

    Args:
      ts: ``[P]`` path parameters from 0 to 1.
      losses: ``[P]`` finite losses at ``ts``.

    Returns:
      The barrier as a float.

    Example:
        >>> loss_barrier([0.0, 0.5, 1.0], [1.0, 3.0, 2.0])
        1.5
    """
    t = np.asarray(ts, np.float64).reshape(-1)
    v = np.asarray(losses, np.float64).reshape(-1)
    if t.shape != v.shape or t.size < 2:
        raise ValueError(f"ts and losses must have the same length >= 2, got {t.shape} and {v.shape}")
    if not (np.isclose(t[0], 0.0) and np.isclose(t[-1], 1.0)):
        raise ValueError(f"ts must start at 0 and end at 1 (the path's end points), got {t[0]} .. {t[-1]}")
    if not np.all(np.isfinite(v)):
        raise ValueError("losses hold NaN or inf")
    return float(np.max(v - ((1.0 - t) * v[0] + t * v[-1])))


@dataclasses.dataclass(frozen=True)
class PathEvaluation:
    """Losses and accuracies at points ``ts`` of a path, with ``dl`` (``dl[0] = 0``) and the path length.

    ``test_*`` are ``None`` when no test set was given. :meth:`summary` gives the stats of every series and
    the barriers.
    """

    ts: np.ndarray
    dl: np.ndarray
    train_loss: np.ndarray
    train_acc: np.ndarray
    test_loss: np.ndarray | None
    test_acc: np.ndarray | None
    length: float

    def barrier(self, series: str = "train_loss") -> float:
        """:func:`loss_barrier` of ``series`` (``"train_loss"`` or ``"test_loss"``)."""
        return loss_barrier(self.ts, getattr(self, series))

    def series(self) -> dict[str, np.ndarray]:
        """The loss and error (in %) series by name."""
        out = {"train_loss": self.train_loss, "train_err": 100.0 * (1.0 - self.train_acc)}
        if self.test_loss is not None:
            out.update(test_loss=self.test_loss, test_err=100.0 * (1.0 - self.test_acc))
        return out

    def summary(self) -> dict:
        """:func:`path_stats` of every series, the length, the barriers and the minimum accuracies."""
        s = {name: path_stats(v, self.dl) for name, v in self.series().items()}
        s["length"] = self.length
        s["train_loss_barrier"] = self.barrier("train_loss")
        if self.test_loss is not None:
            s["test_loss_barrier"] = self.barrier("test_loss")
            s["test_acc_min"] = float(np.min(self.test_acc))
        s["train_acc_min"] = float(np.min(self.train_acc))
        return s

    def to_dict(self) -> dict:
        """A JSON-ready dict of the series and the summary."""
        d = {"t": self.ts.tolist(), "dl": self.dl.tolist(), "length": self.length,
             "train_loss": self.train_loss.tolist(), "train_acc": self.train_acc.tolist()}
        if self.test_loss is not None:
            d.update(test_loss=self.test_loss.tolist(), test_acc=self.test_acc.tolist())
        d["summary"] = self.summary()
        return d


def evaluate_curve(model, connector: Connector, train, test=None, *, ts=None, num_points: int = 61,
                   **kwargs) -> PathEvaluation:
    """Train and test loss/accuracy along a curve (or a band's polychain) at ``ts``.

    A view of :func:`mclandscape.engine.evaluate.evaluate` at the points ``ts`` of ``connector``. BatchNorm
    statistics, as in :func:`mclandscape.methods.surface_grid.surface_grid`, are recomputed at every point on
    ``bn_data``, which defaults to ``train`` (Garipov's ``update_bn``); models without BatchNorm ignore it.

    Args:
      model: the :class:`~mclandscape.engine.models.Model`.
      connector: a curve.
      train: the training data (the train series, and the default ``bn_data``).
      test: the test data (``None``: no test series).
      ts: the t values, strictly increasing from 0 to 1 (default ``num_points`` evenly spaced, Garipov's 61).
      num_points: see ``ts``.
      **kwargs: for :func:`~mclandscape.engine.evaluate.evaluate` (``batch_size``, ``bn_data``,
        ``bn_batches``, ``bn_batch_size``, ``strategy``, ``chunk_size``, ``loss_fn``, ``devices``, ...).

    Returns:
      A :class:`PathEvaluation`.

    Example:
        >>> import jax
        >>> import mclandscape as mcl
        >>> train = mcl.load_dataset("iris", "train")
        >>> model = mcl.get_model("mlp", widths=[4], num_classes=3)
        >>> p0, p1 = (model.init(jax.random.key(s), train.x[:1])["params"] for s in (0, 1))
        >>> ev = evaluate_curve(model, line_connector(p0, p1), train, num_points=5)
        >>> ev.train_loss.shape, ev.test_loss is None, bool(ev.barrier() >= 0)
        ((5,), True, True)
    """
    check_connector(connector, CURVE_KINDS, "evaluate_curve")
    ts = connector.validate_points(np.linspace(0.0, 1.0, _checks.integer(num_points, "num_points", low=2))
                                   if ts is None else ts)
    if ts.size < 2 or np.any(np.diff(ts) <= 0) or ts[0] != 0.0 or ts[-1] != 1.0:
        raise ValueError("ts must increase strictly from 0 to 1")
    if kwargs.get("bn_data") is None:
        kwargs["bn_data"] = train
    sets = {"train": train} if test is None else {"train": train, "test": test}
    m = evaluate(model, connector_points(connector, ts), sets, **kwargs)  # BatchNorm recalibrated once per point
    dl = point_distances(connector, ts)
    length = curve_length(connector) if connector.kind == "polychain" else float(dl.sum())
    te = m.get("test")
    return PathEvaluation(ts=ts, dl=dl, train_loss=np.asarray(m["train"].loss),
                          train_acc=np.asarray(m["train"].accuracy),
                          test_loss=None if te is None else np.asarray(te.loss),
                          test_acc=None if te is None else np.asarray(te.accuracy), length=length)
