"""Curve mode connectivity (Garipov et al., seed 001): train a low-loss curve between two models, evaluate it.

Curves are :class:`~mclandscape.core.connectors.Connector` objects with fixed end points: a Bézier curve of any
degree (``w(t) = (1-t)^2 w_1 + 2t(1-t) theta + t^2 w_2`` for the slides' quadratic case) or a polygonal
chain with any number of bends (the slides' one-bend chain ``2(t theta + (0.5-t) w_1)`` on ``[0, 0.5]``,
``2((t-0.5) w_2 + (1-t) theta)`` on ``[0.5, 1]``). Training minimises the slides' average loss along the curve

    l(theta) = int_0^1 L(w_theta(t)) dt,        theta <- theta - eta grad l(theta),

estimated per mini-batch by ``k`` values ``t ~ U(0, 1)`` evaluated together; it runs on the connector
trainer (:mod:`mclandscape.engine.connector_train`). Conventions of Garipov's reference implementation
(``dnn-mode-connectivity``) that are the defaults here:

- the L2 regulariser is ``(wd/2) |w(t)|^2`` *at the sampled point* (their ``l2_regularizer`` on the curve
  weights), which reaches only the bends because the ends are fixed (``weight_decay_on="point"``);
  ``weight_decay_on="bends"`` instead decays the bends directly, ``(wd/2) sum_bends |theta|^2``;
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
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mclandscape.core.connectors import Connector, bezier_curve, polychain
from mclandscape.core.losses import cross_entropy
from mclandscape.core.objective import function_objective
from mclandscape.core.tree import PyTree, check_same_structure, tree_distance, tree_gram
from mclandscape.engine.connector_train import ConnectorTrainResult, train_connector, uniform_sampler
from mclandscape.engine.loop import LoopConfig

__all__ = [
    "CURVE_KINDS",
    "make_curve",
    "line_connector",
    "garipov_schedule",
    "curve_optimizer",
    "train_curve",
    "fit_curve",
    "PathEvaluation",
    "evaluate_path",
    "evaluate_curve",
    "path_stats",
    "loss_barrier",
    "point_distances",
    "curve_length",
]

CURVE_KINDS = ("bezier", "polychain")


def _check_distinct(start: PyTree, end: PyTree) -> None:
    if float(tree_distance(start, end)) == 0.0:
        raise ValueError("start and end are identical points: there is no curve to train between them")


def make_curve(start: PyTree, end: PyTree, kind: str = "bezier", *, degree: int = 2, num_bends: int = 1) -> Connector:
    """A curve with fixed ends, inner control points on the straight segment (Garipov's ``init_linear``).

    ``kind="bezier"``: Bézier curve of ``degree`` >= 1 (Garipov's ``num_bends`` counts control points, so
    their default 3 is ``degree=2``); ``kind="polychain"``: chain with ``num_bends`` >= 0 bends.
    """
    if kind == "bezier":
        return bezier_curve(start, end, degree=degree)
    if kind == "polychain":
        return polychain(start, end, num_bends=num_bends)
    raise ValueError(f"unknown curve kind {kind!r}; expected one of {CURVE_KINDS}")


def line_connector(start: PyTree, end: PyTree) -> Connector:
    """The straight segment ``(1 - t) start + t end`` as a degree-1 Bézier curve."""
    return bezier_curve(start, end, degree=1)


def garipov_schedule(base_lr: float, epochs: int, steps_per_epoch: int) -> optax.Schedule:
    """Garipov et al.'s learning rate per step: with ``a = epoch / epochs``, ``base_lr`` for ``a <= 0.5``,
    ``base_lr (1 - 0.99 (a - 0.5) / 0.4)`` for ``a <= 0.9``, else ``0.01 base_lr`` (set once per epoch)."""
    if base_lr <= 0 or epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"need base_lr > 0, epochs >= 1, steps_per_epoch >= 1; got {base_lr}, {epochs}, "
                         f"{steps_per_epoch}")

    def schedule(step):
        a = (step // steps_per_epoch) / epochs
        f = jnp.where(a <= 0.5, 1.0, jnp.where(a <= 0.9, 1.0 - (a - 0.5) / 0.4 * 0.99, 0.01))
        return base_lr * f

    return schedule


@functools.lru_cache(maxsize=64)
def curve_optimizer(lr: float, epochs: int, steps_per_epoch: int, *, momentum: float = 0.9) -> optax.GradientTransformation:
    """SGD with momentum on :func:`garipov_schedule` (weight decay lives in the objective, as in the reference).

    The same arguments give the same transform object, so a second run reuses the compiled step.
    """
    return optax.sgd(garipov_schedule(lr, epochs, steps_per_epoch), momentum=momentum or None)


def _wd_args(weight_decay: float, weight_decay_on: str) -> dict:
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if weight_decay_on == "point":
        return {"point_l2": float(weight_decay), "l2": 0.0}
    if weight_decay_on == "bends":
        return {"point_l2": 0.0, "l2": float(weight_decay)}
    raise ValueError(f"weight_decay_on must be 'point' (Garipov: |w(t)|^2) or 'bends', got {weight_decay_on!r}")


def train_curve(model, start: PyTree, end: PyTree, train, *, kind: str = "bezier", degree: int = 2,
                num_bends: int = 1, init: Connector | None = None, epochs: int = 30, batch_size: int = 128,
                lr: float = 0.015, momentum: float = 0.9, optimizer: optax.GradientTransformation | None = None,
                weight_decay: float = 5e-4, weight_decay_on: str = "point", num_samples: int = 1, seed: int = 0,
                augment: bool = False, strategy: str | None = None, checkpoint_dir=None,
                progress: bool | None = None, loss_fn: Callable = cross_entropy,
                devices: int | None = None) -> ConnectorTrainResult:
    """Train a Bézier curve / polygonal chain between the ``params`` of two models of ``model`` on ``train``.

    The inner control points start on the straight segment (or at ``init``); the ends stay fixed
    bit-for-bit. Objective: the slides' expected loss over ``t ~ U(0, 1)`` with ``num_samples`` t values
    per batch, plus the weight decay (see the module docstring). ``optimizer`` defaults to
    :func:`curve_optimizer` (``lr`` 0.015 and ``weight_decay`` 5e-4 are the reference's VGG16 settings).
    With ``checkpoint_dir`` a second call resumes the same run (same ends, data and settings) and refuses a
    different one. ``devices``: see :func:`mclandscape.engine.connector_train.train_connector`.
    """
    if kind not in CURVE_KINDS:
        raise ValueError(f"unknown curve kind {kind!r}; expected one of {CURVE_KINDS}")
    check_same_structure(start, end, names=("start", "end"))
    _check_distinct(start, end)
    conn = init if init is not None else make_curve(start, end, kind, degree=degree, num_bends=num_bends)
    if conn.kind != kind:
        raise ValueError(f"init is a {conn.kind!r} connector but kind={kind!r}")
    if conn.num_control < 3:
        raise ValueError("a curve with no inner control point (degree 1 / 0 bends) has nothing to train")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    steps_per_epoch = len(train) // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(train)} training examples")
    opt = optimizer or curve_optimizer(float(lr), max(int(epochs), 1), steps_per_epoch, momentum=float(momentum))
    hyper = {"curve": kind, "optimizer": "default" if optimizer is None else "custom", "lr": float(lr),
             "momentum": float(momentum), "weight_decay": float(weight_decay), "weight_decay_on": weight_decay_on}
    return train_connector(model, conn, train, epochs=epochs, tx=opt, batch_size=batch_size,
                           sampler=uniform_sampler(1), num_samples=num_samples, seed=seed, augment=augment,
                           strategy=strategy, loss_fn=loss_fn, hyper=hyper,
                           loop=LoopConfig(checkpoint_dir=checkpoint_dir, progress=progress, desc=f"train {kind}"),
                           metadata={"curve": kind}, devices=devices, **_wd_args(weight_decay, weight_decay_on))


def fit_curve(loss_fn: Callable[[PyTree, Any], jax.Array], connector: Connector, *, epochs: int,
              steps_per_epoch: int = 1, data=None, optimizer: optax.GradientTransformation,
              num_samples: int = 1, weight_decay: float = 0.0, weight_decay_on: str = "point", seed: int = 0,
              strategy: str | None = None) -> ConnectorTrainResult:
    """Train a curve for any ``loss_fn(params, batch) -> scalar`` (e.g. a 2-D potential).

    ``data`` is ``None``, a fixed batch, or a callable ``step -> batch``; every epoch runs ``steps_per_epoch``
    optimizer steps of :func:`mclandscape.engine.connector_train.train_connector`.
    """
    if connector.kind not in CURVE_KINDS:
        raise ValueError(f"fit_curve trains curves ({CURVE_KINDS}), got a {connector.kind!r} connector")
    if isinstance(steps_per_epoch, bool) or int(steps_per_epoch) != steps_per_epoch or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be an integer >= 1, got {steps_per_epoch!r}")
    _check_distinct(jax.tree_util.tree_map(lambda x: x[0], connector.control),
                    jax.tree_util.tree_map(lambda x: x[-1], connector.control))
    return train_connector(function_objective(loss_fn), connector, data, epochs=epochs, tx=optimizer,
                           batch_size=None, steps_per_epoch=int(steps_per_epoch), sampler=uniform_sampler(1),
                           num_samples=num_samples, seed=seed, strategy=strategy,
                           loop=LoopConfig(progress=False), **_wd_args(weight_decay, weight_decay_on))


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
    """
    pts = connector.validate_points(ts)
    c = np.asarray(connector.coefficients(jnp.asarray(pts, jnp.float32)), np.float64)
    a = c[1:] - c[:-1]
    g = _centred_gram(connector)
    sq = np.einsum("pk,kl,pl->p", a, g, a)
    return np.concatenate([[0.0], np.sqrt(np.maximum(sq, 0.0))])


def curve_length(connector: Connector, num_points: int | None = None) -> float:
    """Length of a curve in parameter space.

    Polygonal chains: exactly ``sum_k |theta_{k+1} - theta_k|`` (unless ``num_points`` asks for a polyline);
    Bézier curves: the polyline through ``num_points`` evenly spaced t (default 2001; the error falls as
    ``1/num_points^2``).
    """
    if connector.kind not in CURVE_KINDS:
        raise ValueError(f"curve_length needs a curve, got a {connector.kind!r} connector")
    if connector.kind == "polychain" and num_points is None:
        g = _centred_gram(connector)
        k = connector.num_control
        a = np.zeros((k - 1, k))
        a[np.arange(k - 1), np.arange(k - 1)] = -1.0
        a[np.arange(k - 1), np.arange(1, k)] = 1.0
        return float(np.sum(np.sqrt(np.maximum(np.einsum("pk,kl,pl->p", a, g, a), 0.0))))
    n = 2001 if num_points is None else int(num_points)
    if n < 2:
        raise ValueError(f"num_points must be >= 2, got {num_points}")
    return float(point_distances(connector, np.linspace(0.0, 1.0, n)).sum())


def path_stats(values, dl) -> dict:
    """``start``, ``end``, ``min``, ``max``, ``mean`` and the length-weighted ``int`` of a series along a path.

    ``int = sum_j (v_{j-1} + v_j)/2 dl_j / sum_j dl_j`` (trapezoid in arc length, Garipov's ``stats``); for a
    path of zero length it falls back to the mean.
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
        return loss_barrier(self.ts, getattr(self, series))

    def series(self) -> dict[str, np.ndarray]:
        out = {"train_loss": self.train_loss, "train_err": 100.0 * (1.0 - self.train_acc)}
        if self.test_loss is not None:
            out.update(test_loss=self.test_loss, test_err=100.0 * (1.0 - self.test_acc))
        return out

    def summary(self) -> dict:
        s = {name: path_stats(v, self.dl) for name, v in self.series().items()}
        s["length"] = self.length
        s["train_loss_barrier"] = self.barrier("train_loss")
        if self.test_loss is not None:
            s["test_loss_barrier"] = self.barrier("test_loss")
            s["test_acc_min"] = float(np.min(self.test_acc))
        s["train_acc_min"] = float(np.min(self.train_acc))
        return s

    def to_dict(self) -> dict:
        d = {"t": self.ts.tolist(), "dl": self.dl.tolist(), "length": self.length,
             "train_loss": self.train_loss.tolist(), "train_acc": self.train_acc.tolist()}
        if self.test_loss is not None:
            d.update(test_loss=self.test_loss.tolist(), test_acc=self.test_acc.tolist())
        d["summary"] = self.summary()
        return d


def evaluate_path(model, connector: Connector, train, test=None, *, ts=None, num_points: int = 61,
                  bn_data=None, bn_batches: int | None = None, bn_batch_size: int = 128, batch_size: int = 500,
                  strategy: str = "auto", loss_fn: Callable = cross_entropy) -> PathEvaluation:
    """Evaluate a curve (or a band's polychain) at ``ts`` (default ``num_points`` = 61 evenly spaced t).

    Train and test loss/accuracy via :func:`mclandscape.engine.evaluate.evaluate_points`; models with BatchNorm
    get their statistics recomputed at every point on ``bn_data`` (default: ``train``), Garipov's
    ``update_bn``. ``ts`` must increase from 0 to 1.
    """
    from mclandscape.engine.evaluate import evaluate_points

    if connector.kind not in CURVE_KINDS:
        raise ValueError(f"evaluate_path needs a curve or band, got a {connector.kind!r} connector")
    if ts is None:
        if num_points < 2:
            raise ValueError(f"num_points must be >= 2, got {num_points}")
        ts = np.linspace(0.0, 1.0, num_points)
    ts = connector.validate_points(ts)
    if ts.size < 2 or np.any(np.diff(ts) <= 0) or ts[0] != 0.0 or ts[-1] != 1.0:
        raise ValueError("ts must increase strictly from 0 to 1")
    if model.has_batch_stats and bn_data is None:
        bn_data = train
    kw = dict(batch_size=batch_size, strategy=strategy, bn_data=bn_data, bn_batches=bn_batches,
              bn_batch_size=bn_batch_size, loss_fn=loss_fn)
    tr = evaluate_points(model, connector, ts, train, **kw)
    te = evaluate_points(model, connector, ts, test, **kw) if test is not None else None
    dl = point_distances(connector, ts)
    length = curve_length(connector) if connector.kind == "polychain" else float(dl.sum())
    return PathEvaluation(ts=ts, dl=dl, train_loss=np.asarray(tr.loss), train_acc=np.asarray(tr.accuracy),
                          test_loss=None if te is None else np.asarray(te.loss),
                          test_acc=None if te is None else np.asarray(te.accuracy), length=length)


def evaluate_curve(model, connector: Connector, train, test=None, **kwargs) -> PathEvaluation:
    """Alias of :func:`evaluate_path` with Garipov's 61 evaluation points by default."""
    return evaluate_path(model, connector, train, test, **kwargs)
