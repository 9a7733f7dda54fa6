"""Ensembles of networks and the metrics of their quality and diversity — the library's one implementation.

Used by DSP-TT (the DSP-TT paper: Anonymous, 2020, "Constructing multiple high-quality deep neural networks: a
TRUST-TECH based approach", ICLR 2021 submission, §4-5: Tier-1, Tier-0-1, Tier-0-1-2 ensembles, Tables 1-3)
and by Bézier-surface ensembling (the Bézier-surface paper: Anonymous, 2024, "Revisiting mode connectivity in
neural networks with Bézier surface": ensembles of grid points of a surface). Everything starts from the
*stacked member output probabilities* ``probs[M, N, C]`` (M members, N examples, C classes), which any caller
can produce (:func:`member_probs` does it for parameter sets of a :class:`~mclandscape.engine.models.base.Model`
through :func:`mclandscape.engine.evaluate.evaluate_params`).

Combination rules (DSP-TT paper, §4: "averaging ... or voting"):

- ``"mean"``: the ensemble's probabilities are the (optionally weighted) mean of the members'
  probabilities; its prediction the arg-max;
- ``"vote"``: each member votes for its arg-max class; the ensemble predicts the class with most votes, ties
  broken by the larger mean probability (then the lower class index). A vote has no probabilities, so its
  NLL is reported as ``None``.

Metrics (DSP-TT paper, Tables 1-3):

- ``test_error``: fraction of misclassified examples, in ``[0, 1]`` (tables print it in percent);
- ``nll``: mean negative log-likelihood ``-mean_n log p_n[y_n]`` of the ensemble probabilities (Table 1's
  "loss"); a zero probability of the true class gives ``inf``;
- ``output_correlation``: mean over member pairs of the Pearson correlation coefficient between their
  output probability vectors, each member's ``[N, C]`` outputs flattened to one vector (Huang et al. 2017a,
  as used in Tables 2-3);
- ``param_distance``: mean over member pairs of the Euclidean distance between their parameter vectors
  (Garipov et al. 2018, Table 3).

Baselines at equal budget (Tables 2-3): :func:`independent_ensemble` (members trained from different
random initialisations), :func:`snapshot_ensemble` (Huang et al. 2017a: one run with a cyclic cosine learning
rate, a snapshot at the end of each cycle) and :func:`fge_ensemble` (Garipov et al. 2018: from a trained
model, a cyclic piecewise-linear learning rate between ``lr1`` and ``lr2``, a member at each cycle's minimum).
Both train on the engine (:func:`train_with_snapshots`: :func:`mclandscape.engine.loop.make_step` and
:func:`mclandscape.engine.loop.run`) an objective of the one protocol ``objective(params, batch, key) -> (loss,
aux)`` (:mod:`mclandscape.core.objective`, e.g. :func:`~mclandscape.core.objective.make_objective` of a model);
a run whose loss or gradient becomes non-finite raises :class:`~mclandscape.engine.loop.NonFiniteError`. Like
every trainer, they number epochs from 1 as passes over the data (``steps_per_epoch``, by default the batch
stream's own, e.g. :class:`~mclandscape.engine.data.BatchStream`), show a tqdm bar when stderr is a terminal
(``progress=None``) and call ``callback(epoch, (params, members_so_far))`` after each epoch (raising
:class:`~mclandscape.engine.loop.StopRun` ends training); members are taken after their step counts whether or
not those end an epoch, so the epoch length changes nothing but the numbering.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mclandscape.core.objective import check_objective
from mclandscape.core.tree import PyTree, check_same_structure, tree_gram, tree_stack
from mclandscape.engine.evaluate import evaluate_params
from mclandscape.engine.loop import LoopConfig, run
from mclandscape.engine.step import make_step

__all__ = [
    "METHODS",
    "EnsembleMetrics",
    "average_probs",
    "vote",
    "ensemble_probs",
    "test_error",
    "nll",
    "pairwise_output_correlation",
    "output_correlation",
    "pairwise_param_distances",
    "param_distance",
    "ensemble_from_probs",
    "member_probs",
    "ensemble_from_params",
    "snapshot_cosine_schedule",
    "fge_schedule",
    "snapshot_steps",
    "fge_collect_steps",
    "train_with_snapshots",
    "snapshot_ensemble",
    "fge_ensemble",
    "independent_ensemble",
]

METHODS = ("mean", "vote")


# ---------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------


def _check_probs(probs, name: str = "probs") -> np.ndarray:
    p = np.asarray(probs)
    if p.ndim != 3:
        raise ValueError(f"{name} must have shape [M members, N examples, C classes], got shape {p.shape}")
    m, n, c = p.shape
    if m < 1 or n < 1 or c < 2:
        raise ValueError(f"{name} needs at least 1 member, 1 example and 2 classes, got shape {p.shape}")
    if not np.issubdtype(p.dtype, np.floating):
        raise ValueError(f"{name} must hold floating-point probabilities, got dtype {p.dtype}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} holds non-finite values")
    if np.any(p < 0):
        raise ValueError(f"{name} holds negative probabilities (min {p.min():.3g}); pass softmax outputs, "
                         "not logits")
    sums = p.astype(np.float64).sum(-1)
    if np.max(np.abs(sums - 1.0)) > 1e-3:
        raise ValueError(f"{name} rows must sum to 1 over classes (max deviation {np.max(np.abs(sums - 1)):.3g}); "
                         "pass softmax outputs, not logits")
    return p


def _check_labels(labels, n: int, c: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels must have shape [{n}] to match the probabilities, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= c):
        raise ValueError(f"labels must lie in [0, {c}), got range [{y.min()}, {y.max()}]")
    return y


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"ensemble method must be one of {METHODS}, got {method!r}")


# ---------------------------------------------------------------------------------------------------------
# combining members
# ---------------------------------------------------------------------------------------------------------


def average_probs(probs, weights: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """Ensemble probabilities ``sum_m w_m probs[m] / sum_m w_m`` (uniform weights by default).

    Args:
      probs: ``[M, N, C]`` member probabilities (rows sum to 1).
      weights: ``[M]`` non-negative member weights, not all zero (``None``: uniform).

    Returns:
      ``[N, C]`` float64 probabilities.

    Example:
        >>> import numpy as np
        >>> probs = np.array([[[0.9, 0.1], [0.4, 0.6]], [[0.6, 0.4], [0.2, 0.8]]])  # [M=2, N=2, C=2]
        >>> average_probs(probs).round(3).tolist()
        [[0.75, 0.25], [0.3, 0.7]]
        >>> average_probs(probs, weights=[3, 1]).round(3).tolist()
        [[0.825, 0.175], [0.35, 0.65]]
    """
    p = _check_probs(probs).astype(np.float64)
    if weights is None:
        return p.mean(0)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (p.shape[0],):
        raise ValueError(f"weights must have shape [{p.shape[0]}] (one per member), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {w}")
    return np.tensordot(w / w.sum(), p, axes=1)


def vote(probs) -> tuple[np.ndarray, np.ndarray]:
    """Majority vote of the members' arg-max classes.

    Ties are broken by the larger mean probability, then by the lower class index.

    Args:
      probs: ``[M, N, C]`` member probabilities.

    Returns:
      ``(predictions[N], vote_fractions[N, C])``.

    Example:
        >>> import numpy as np
        >>> probs = np.array([[[0.9, 0.1], [0.4, 0.6]], [[0.6, 0.4], [0.2, 0.8]]])  # [M=2, N=2, C=2]
        >>> pred, fractions = vote(probs)
        >>> pred.tolist(), fractions.tolist()
        ([0, 1], [[1.0, 0.0], [0.0, 1.0]])
    """
    p = _check_probs(probs)
    m, n, c = p.shape
    member_pred = p.argmax(-1)  # [M, N]
    counts = np.zeros((n, c), dtype=np.int64)
    for row in member_pred:
        counts[np.arange(n), row] += 1
    mean = p.astype(np.float64).mean(0)
    top = counts == counts.max(-1, keepdims=True)
    pred = np.where(top, mean, -np.inf).argmax(-1)
    return pred, counts / m


def ensemble_probs(probs, method: str = "mean", weights=None) -> tuple[np.ndarray, np.ndarray | None]:
    """The ensemble's predictions and probabilities under a combination rule.

    Args:
      probs: ``[M, N, C]`` member probabilities.
      method: ``"mean"`` (average the probabilities) or ``"vote"`` (majority vote).
      weights: ``[M]`` member weights (``"mean"`` only).

    Returns:
      ``(predictions[N], probabilities[N, C] or None)``; a vote has no probabilities.

    Example:
        >>> import numpy as np
        >>> probs = np.array([[[0.9, 0.1], [0.4, 0.6]], [[0.6, 0.4], [0.2, 0.8]]])  # [M=2, N=2, C=2]
        >>> pred, q = ensemble_probs(probs, "vote")
        >>> pred.tolist(), q is None
        ([0, 1], True)
    """
    _check_method(method)
    if method == "mean":
        q = average_probs(probs, weights)
        return q.argmax(-1), q
    if weights is not None:
        raise ValueError("weights are only supported for method='mean'")
    return vote(probs)[0], None


# ---------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------


def test_error(predictions_or_probs, labels) -> float:
    """Fraction of misclassified examples, in ``[0, 1]``.

    Args:
      predictions_or_probs: integer predictions ``[N]`` or probabilities ``[N, C]`` (their arg-max is taken).
      labels: ``[N]`` integer classes.

    Returns:
      A ``float``.

    Example:
        >>> import numpy as np
        >>> test_error(np.array([0, 1, 1]), np.array([0, 0, 1])), test_error(np.array([[0.7, 0.3]]), np.array([0]))
        (0.3333333333333333, 0.0)
    """
    a = np.asarray(predictions_or_probs)
    if a.ndim == 2:
        pred = a.argmax(-1)
    elif a.ndim == 1:
        pred = a
        if not np.issubdtype(pred.dtype, np.integer):
            raise ValueError(f"predictions must be integer classes, got dtype {pred.dtype}")
    else:
        raise ValueError(f"test_error takes predictions [N] or probabilities [N, C], got shape {a.shape}")
    y = np.asarray(labels)
    if y.shape != pred.shape:
        raise ValueError(f"labels shape {y.shape} does not match predictions shape {pred.shape}")
    if y.size == 0:
        raise ValueError("test_error of an empty set is undefined")
    return float(np.mean(pred != y))


test_error.__test__ = False  # keep pytest from collecting it as a test when imported into a test module


def nll(probs, labels) -> float:
    """Mean negative log-likelihood ``-mean_n log probs[n, y_n]`` (the DSP-TT paper's Table 1 "loss").

    Args:
      probs: ``[N, C]`` probabilities (rows sum to 1).
      labels: ``[N]`` integer classes.

    Returns:
      A ``float``; ``inf`` if a true class has probability 0.

    Example:
        >>> import numpy as np
        >>> round(nll(np.array([[0.75, 0.25], [0.3, 0.7]]), np.array([0, 0])), 4)
        0.7458
    """
    q = np.asarray(probs, dtype=np.float64)
    if q.ndim != 2:
        raise ValueError(f"nll takes probabilities [N, C], got shape {q.shape}")
    _check_probs(q[None])
    y = _check_labels(labels, q.shape[0], q.shape[1])
    py = q[np.arange(q.shape[0]), y]
    with np.errstate(divide="ignore"):
        return float(-np.mean(np.log(py))) + 0.0  # + 0.0: a perfect fit is 0.0, not -0.0


def pairwise_output_correlation(probs) -> np.ndarray:
    """``[M, M]`` Pearson correlation between the members' flattened ``[N*C]`` output probabilities.

    Args:
      probs: ``[M, N, C]`` member probabilities, at least 2 members.

    Returns:
      An ``[M, M]`` float64 array with ones on the diagonal. Raises ``ValueError`` for a member with constant
      outputs (its correlation is undefined).

    Example:
        >>> import numpy as np
        >>> probs = np.array([[[0.9, 0.1], [0.4, 0.6]], [[0.6, 0.4], [0.2, 0.8]]])  # [M=2, N=2, C=2]
        >>> pairwise_output_correlation(probs).round(4).tolist()
        [[1.0, 0.5369], [0.5369, 1.0]]
    """
    p = _check_probs(probs).astype(np.float64)
    m = p.shape[0]
    if m < 2:
        raise ValueError("output correlation needs at least 2 members")
    flat = p.reshape(m, -1)
    centred = flat - flat.mean(1, keepdims=True)
    sd = np.sqrt((centred**2).sum(1))
    if np.any(sd == 0):
        k = int(np.argmin(sd))
        raise ValueError(f"member {k} has constant outputs, so its Pearson correlation is undefined")
    return (centred @ centred.T) / np.outer(sd, sd)


def output_correlation(probs) -> float:
    """Mean pairwise Pearson correlation of member outputs (DSP-TT paper, Tables 2-3, "Output Correlation").

    Args:
      probs: ``[M, N, C]`` member probabilities, at least 2 members.

    Returns:
      A ``float`` in ``[-1, 1]``: the mean of :func:`pairwise_output_correlation` over distinct pairs.

    Example:
        >>> import numpy as np
        >>> probs = np.array([[[0.9, 0.1], [0.4, 0.6]], [[0.6, 0.4], [0.2, 0.8]]])  # [M=2, N=2, C=2]
        >>> round(output_correlation(probs), 4)
        0.5369
    """
    r = pairwise_output_correlation(probs)
    iu = np.triu_indices(r.shape[0], 1)
    return float(r[iu].mean())


def _as_stacked(members) -> PyTree:
    if isinstance(members, list | tuple):
        if len(members) == 0:
            raise ValueError("no members given")
        return tree_stack(list(members), names=[f"member[{i}]" for i in range(len(members))])
    leaves = jax.tree_util.tree_leaves(members)
    if not leaves:
        raise ValueError("members hold no arrays")
    sizes = {int(np.shape(a)[0]) if np.ndim(a) else -1 for a in leaves}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(f"stacked members need one common leading axis, got sizes {sorted(sizes)}")
    return members


def pairwise_param_distances(members) -> np.ndarray:
    """``[M, M]`` Euclidean distances between members' parameter vectors.

    Computed from the Gram matrix of the members centred on their mean (exact up to float32 rounding of the
    centred products, no cancellation of the large uncentred norms).

    Args:
      members: a list of same-structured parameter pytrees, or one stacked pytree (leaves ``[M, ...]``).

    Returns:
      An ``[M, M]`` float64 array with zeros on the diagonal.

    Example:
        >>> import jax.numpy as jnp
        >>> members = [{"w": jnp.zeros(2)}, {"w": jnp.array([3.0, 4.0])}]
        >>> pairwise_param_distances(members).round(4).tolist()
        [[0.0, 5.0], [5.0, 0.0]]
    """
    stacked = _as_stacked(members)
    m = int(np.shape(jax.tree_util.tree_leaves(stacked)[0])[0])
    mean = jax.tree_util.tree_map(lambda x: jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), 0),
                                  stacked)
    centred = jax.tree_util.tree_map(lambda x, mu: x - mu[None], stacked, mean)
    g = np.asarray(tree_gram(centred), dtype=np.float64)
    d2 = np.diag(g)[:, None] + np.diag(g)[None, :] - 2.0 * g
    d2[np.arange(m), np.arange(m)] = 0.0
    # rounding can leave tiny negative squares for (near-)identical members; they are distance 0
    return np.sqrt(np.maximum(d2, 0.0))


def param_distance(members) -> float:
    """Mean pairwise Euclidean parameter distance (DSP-TT paper, Table 3, "Parameter Distance").

    Args:
      members: a list of at least 2 parameter pytrees, or one stacked pytree.

    Returns:
      A ``float``.

    Example:
        >>> import jax.numpy as jnp
        >>> members = [{"w": jnp.zeros(2)}, {"w": jnp.array([3.0, 4.0])}, {"w": jnp.array([0.0, 4.0])}]
        >>> round(param_distance(members), 4)
        4.0
    """
    d = pairwise_param_distances(members)
    if d.shape[0] < 2:
        raise ValueError("parameter distance needs at least 2 members")
    return float(d[np.triu_indices(d.shape[0], 1)].mean())


# ---------------------------------------------------------------------------------------------------------
# one ensemble, all metrics
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EnsembleMetrics:
    """Metrics of one ensemble (DSP-TT paper, Tables 1-3), as :func:`ensemble_from_probs` computes them.

    Attributes:
      method: the combination rule, ``"mean"`` or ``"vote"``.
      members: the number of members M.
      test_error: the ensemble's error rate in ``[0, 1]``.
      nll: the ensemble's mean negative log-likelihood (``None`` for a vote).
      output_correlation: mean pairwise output correlation (``None`` for a single member).
      param_distance: mean pairwise parameter distance (``None`` for one member or without parameters).
      member_test_error, member_nll: each member's own error and NLL.

    Example:
        >>> import numpy as np
        >>> m = ensemble_from_probs(np.array([[[0.0, 1.0]], [[1.0, 0.0]]]), np.array([0]))
        >>> m.to_json()["member_nll"]
        ['inf', 0.0]
    """

    method: str
    members: int
    test_error: float
    nll: float | None
    output_correlation: float | None
    param_distance: float | None
    member_test_error: list[float]
    member_nll: list[float]

    def to_json(self) -> dict:
        """The metrics as a JSON-ready dict (infinities as ``"inf"`` / ``"-inf"``, NaN as ``None``).

        Returns:
          A dict of the fields.
        """
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
            return v

        return {k: ([clean(x) for x in v] if isinstance(v, list) else clean(v))
                for k, v in dataclasses.asdict(self).items()}


def ensemble_from_probs(probs, labels, *, method: str = "mean", weights=None, params=None) -> EnsembleMetrics:
    """All ensemble metrics from stacked member probabilities.

    Args:
      probs: ``[M, N, C]`` member probabilities.
      labels: ``[N]`` integer classes.
      method: ``"mean"`` or ``"vote"``.
      weights: ``[M]`` member weights (``"mean"`` only).
      params: the members' parameters (a list of pytrees or one stacked pytree, in the order of ``probs``);
        adds the mean pairwise parameter distance.

    Returns:
      An :class:`EnsembleMetrics`.

    Example:
        >>> import numpy as np
        >>> probs = np.array([[[0.9, 0.1], [0.4, 0.6]], [[0.6, 0.4], [0.2, 0.8]]])  # [M=2, N=2, C=2]
        >>> m = ensemble_from_probs(probs, np.array([0, 0]))
        >>> m.members, m.test_error, round(m.nll, 4), round(m.output_correlation, 4), m.param_distance
        (2, 0.5, 0.7458, 0.5369, None)
    """
    _check_method(method)
    p = _check_probs(probs)
    y = _check_labels(labels, p.shape[1], p.shape[2])
    pred, q = ensemble_probs(p, method, weights)
    m = p.shape[0]
    dist = None
    if params is not None:
        stacked = _as_stacked(params)
        pm = int(np.shape(jax.tree_util.tree_leaves(stacked)[0])[0])
        if pm != m:
            raise ValueError(f"params hold {pm} members but probs hold {m}")
        dist = param_distance(stacked) if m > 1 else None
    return EnsembleMetrics(
        method=method, members=m, test_error=test_error(pred, y), nll=None if q is None else nll(q, y),
        output_correlation=output_correlation(p) if m > 1 else None, param_distance=dist,
        member_test_error=[test_error(p[i], y) for i in range(m)],
        member_nll=[nll(p[i], y) for i in range(m)])


def member_probs(model, members, data, *, batch_size: int = 500, bn_data=None, **kwargs) -> np.ndarray:
    """Output probabilities of parameter sets of ``model`` on ``data``, through the one evaluator.

    Args:
      model: the :class:`~mclandscape.engine.models.base.Model`.
      members: a list of ``params`` pytrees, or one stacked pytree.
      data: a Dataset or ``(x, y)``.
      batch_size: examples per evaluation batch.
      bn_data: data on which BatchNorm statistics are recomputed per member (BatchNorm models).
      **kwargs: for :func:`mclandscape.engine.evaluate.evaluate_params` (e.g. ``strategy``, ``chunk_size``).

    Returns:
      ``[M, N, C]`` NumPy probabilities.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from mclandscape.engine.models import get_model
        >>> model = get_model("mlp", widths=(4,), num_classes=3)
        >>> x, y = jax.random.normal(jax.random.key(0), (8, 5)), jnp.arange(8) % 3
        >>> members = [model.init(jax.random.key(s), x)["params"] for s in (1, 2)]
        >>> probs = member_probs(model, members, (x, y))
        >>> probs.shape, bool(np.allclose(probs.sum(-1), 1, atol=1e-5))
        ((2, 8, 3), True)
    """
    stacked = _as_stacked(members)
    out = evaluate_params(model, stacked, data, batch_size=batch_size, bn_data=bn_data, return_probs=True,
                          **kwargs)
    return np.asarray(out.probs)


def ensemble_from_params(model, members, data, *, method: str = "mean", batch_size: int = 500, bn_data=None,
                         weights=None) -> EnsembleMetrics:
    """Ensemble metrics of parameter sets ``members`` of ``model`` on ``data``.

    :func:`member_probs`, then :func:`ensemble_from_probs` with the parameter distances of ``members``.

    Args:
      model: the :class:`~mclandscape.engine.models.base.Model`.
      members: a list of ``params`` pytrees, or one stacked pytree.
      data: a Dataset or ``(x, y)``.
      method: ``"mean"`` or ``"vote"``.
      batch_size: examples per evaluation batch.
      bn_data: data on which BatchNorm statistics are recomputed per member.
      weights: ``[M]`` member weights (``"mean"`` only).

    Returns:
      An :class:`EnsembleMetrics`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from mclandscape.engine.models import get_model
        >>> model = get_model("mlp", widths=(4,), num_classes=3)
        >>> x, y = jax.random.normal(jax.random.key(0), (8, 5)), jnp.arange(8) % 3
        >>> members = [model.init(jax.random.key(s), x)["params"] for s in (1, 2)]
        >>> m = ensemble_from_params(model, members, (x, y))
        >>> m.members, 0.0 <= m.test_error <= 1.0, m.param_distance > 0
        (2, True, True)
    """
    stacked = _as_stacked(members)
    probs = member_probs(model, stacked, data, batch_size=batch_size, bn_data=bn_data)
    y = data.y if hasattr(data, "y") else data[1]
    return ensemble_from_probs(probs, np.asarray(y), method=method, weights=weights, params=stacked)


# ---------------------------------------------------------------------------------------------------------
# baselines: learning-rate schedules
# ---------------------------------------------------------------------------------------------------------


def _check_pos_int(v, name: str) -> int:
    if isinstance(v, bool) or int(v) != v or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return int(v)


def _check_pos(v, name: str) -> float:
    f = float(v)
    if not math.isfinite(f) or f <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return f


def snapshot_cosine_schedule(lr0: float, total_steps: int, num_cycles: int) -> Callable[[Any], Any]:
    """Cyclic cosine annealing of snapshot ensembles (Huang et al. 2017a, eq. 2).

    ``lr(t) = lr0 / 2 * (cos(pi * mod(t, L) / L) + 1)`` with cycle length ``L = ceil(total_steps / num_cycles)``
    (``t`` counted from 0), restarting at ``lr0`` at the start of every cycle.

    Args:
      lr0: the learning rate at the start of each cycle (``> 0``).
      total_steps: the whole budget in steps.
      num_cycles: the number of cycles (``<= total_steps``).

    Returns:
      An Optax schedule ``t -> lr``.

    Example:
        >>> lr = snapshot_cosine_schedule(0.1, total_steps=100, num_cycles=4)
        >>> [round(float(lr(t)), 4) for t in (0, 12, 24, 25)]
        [0.1, 0.0531, 0.0004, 0.1]
    """
    lr0 = _check_pos(lr0, "lr0")
    total = _check_pos_int(total_steps, "total_steps")
    cycles = _check_pos_int(num_cycles, "num_cycles")
    if cycles > total:
        raise ValueError(f"num_cycles ({cycles}) exceeds total_steps ({total})")
    length = math.ceil(total / cycles)

    def schedule(t):
        return lr0 / 2.0 * (jnp.cos(jnp.pi * jnp.mod(t, length) / length) + 1.0)

    return schedule


def snapshot_steps(total_steps: int, num_cycles: int) -> list[int]:
    """The completed step counts after which snapshot ensembles take their members.

    The end of each cosine cycle of :func:`snapshot_cosine_schedule`; the last one at ``total_steps``.

    Args:
      total_steps: the whole budget in steps.
      num_cycles: the number of cycles.

    Returns:
      A sorted list of step counts.

    Example:
        >>> snapshot_steps(100, 4), snapshot_steps(10, 3)
        ([25, 50, 75, 100], [4, 8, 10])
    """
    total = _check_pos_int(total_steps, "total_steps")
    cycles = _check_pos_int(num_cycles, "num_cycles")
    length = math.ceil(total / cycles)
    return sorted({min(length * (c + 1), total) for c in range(cycles)})


def fge_schedule(lr1: float, lr2: float, cycle_steps: int) -> Callable[[Any], Any]:
    """Garipov et al. (2018) FGE cycle: from ``lr1`` down to ``lr2`` at mid-cycle and back.

    With ``s(i) = (mod(i - 1, c) + 1) / c`` for step ``i >= 1``, ``lr = (1 - 2s) lr1 + 2s lr2`` for ``s <= 1/2``
    and ``(2 - 2s) lr2 + (2s - 1) lr1`` otherwise. The optax step count ``t`` (from 0) is step ``i = t + 1``.

    Args:
      lr1: the learning rate at the ends of a cycle (``> 0``).
      lr2: the learning rate at mid-cycle (``> 0``).
      cycle_steps: the cycle length ``c``, even and ``>= 2``.

    Returns:
      An Optax schedule ``t -> lr``.

    Example:
        >>> lr = fge_schedule(0.05, 0.01, cycle_steps=4)
        >>> [round(float(lr(t)), 4) for t in range(5)]
        [0.03, 0.01, 0.03, 0.05, 0.03]
    """
    lr1 = _check_pos(lr1, "lr1")
    lr2 = _check_pos(lr2, "lr2")
    c = _check_pos_int(cycle_steps, "cycle_steps")
    if c < 2 or c % 2:
        raise ValueError(f"cycle_steps must be an even integer >= 2 (members are taken at mid-cycle), got {c}")

    def schedule(t):
        s = (jnp.mod(t, c) + 1) / c
        return jnp.where(s <= 0.5, (1 - 2 * s) * lr1 + 2 * s * lr2, (2 - 2 * s) * lr2 + (2 * s - 1) * lr1)

    return schedule


def fge_collect_steps(cycle_steps: int, num_members: int) -> list[int]:
    """Completed step counts at which FGE takes members: mid-cycle, where the learning rate is ``lr2``.

    Args:
      cycle_steps: the cycle length.
      num_members: how many members.

    Returns:
      A list of ``num_members`` step counts.

    Example:
        >>> fge_collect_steps(4, 3)
        [2, 6, 10]
    """
    c = _check_pos_int(cycle_steps, "cycle_steps")
    m = _check_pos_int(num_members, "num_members")
    return [k * c + c // 2 for k in range(m)]


# ---------------------------------------------------------------------------------------------------------
# baselines: training with snapshots
# ---------------------------------------------------------------------------------------------------------


def _steps_per_epoch(batch_fn, steps_per_epoch) -> int:
    if steps_per_epoch is None:
        steps_per_epoch = getattr(batch_fn, "steps_per_epoch", 1)
    return _check_pos_int(steps_per_epoch, "steps_per_epoch")


def train_with_snapshots(objective: Callable, params: PyTree, optimizer: optax.GradientTransformation,
                         batch_fn: Callable[[int], Any], steps: int, collect: Sequence[int], *,
                         key: jax.Array | None = None, steps_per_epoch: int | None = None,
                         progress: bool | None = None,
                         callback: Callable[[int, tuple[PyTree, list[PyTree]]], None] | None = None
                         ) -> tuple[PyTree, list[PyTree]]:
    """Train on the engine's loop and copy the parameters after chosen step counts.

    :func:`~mclandscape.engine.loop.make_step` of ``objective`` and ``optimizer``, run by
    :func:`~mclandscape.engine.loop.run` for exactly ``steps`` steps in epochs of ``steps_per_epoch`` steps
    (the last one shorter when they do not divide ``steps``); a step callback copies the parameters after each
    count in ``collect``, inside an epoch or at its end. Step ``t`` reads ``batch_fn(t)`` with the key
    ``fold_in(key, t)`` whatever the epoch length, so the members do not depend on ``steps_per_epoch``.

    Args:
      objective: ``objective(params, batch, key) -> (loss, aux)``.
      params: the initial parameters.
      optimizer: any Optax ``GradientTransformation``.
      batch_fn: ``t -> batch`` for step ``t`` (from 0).
      steps: the steps to run (``>= 1``).
      collect: completed step counts (each in ``[1, steps]``) after which a member is taken.
      key: the base key (step ``t`` gets ``fold_in(key, t)``); default ``jax.random.key(0)``.
      steps_per_epoch: steps per epoch (default ``batch_fn.steps_per_epoch`` when the batch function has one,
        as :class:`~mclandscape.engine.data.BatchStream` does: epochs are passes over the data, numbered from
        1 as in every trainer; a plain callable without it: one step per epoch).
      progress: a progress bar over the epochs (``None``: when stderr is a terminal).
      callback: ``callback(epoch, (params, members))`` after each epoch with the parameters and the members
        taken so far; raising :class:`~mclandscape.engine.loop.StopRun` from it ends training there, and the
        function returns the members taken until then.

    Returns:
      ``(final_params, snapshots)``, one snapshot per distinct count of ``collect`` in increasing order (fewer
      when a callback stopped the run early).

    Raises:
      NonFiniteError: the loss or a gradient became non-finite (e.g. the learning rate is too large).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from mclandscape.core.objective import function_objective
        >>> objective = function_objective(lambda p, b: jnp.sum((p["w"] - b) ** 2))
        >>> batches = lambda t: jnp.ones(2)  # minimum at w = 1
        >>> final, snaps = train_with_snapshots(objective, {"w": jnp.zeros(2)}, optax.sgd(0.25), batches,
        ...                                     steps=2, collect=[1, 2])
        >>> [s["w"].tolist() for s in snaps], final["w"].tolist()
        ([[0.5, 0.5], [0.75, 0.75]], [0.75, 0.75])

        Epochs of 2 steps (numbered from 1, the last one shorter), a member in the middle of epoch 2:

        >>> seen = []
        >>> final, snaps = train_with_snapshots(objective, {"w": jnp.zeros(2)}, optax.sgd(0.25), batches,
        ...                                     steps=5, collect=[3, 5], steps_per_epoch=2,
        ...                                     callback=lambda epoch, res: seen.append((epoch, len(res[1]))))
        >>> seen
        [(1, 0), (2, 1), (3, 2)]
    """
    steps = _check_pos_int(steps, "steps")
    want = sorted({int(c) for c in collect})
    if not want:
        raise ValueError("collect is empty: give the step counts at which to take members")
    if want[0] < 1 or want[-1] > steps:
        raise ValueError(f"collect steps must lie in [1, {steps}], got {want}")
    if not callable(batch_fn):
        raise ValueError(f"batch_fn must be a callable t -> batch, got {batch_fn!r}")
    spe = _steps_per_epoch(batch_fn, steps_per_epoch)
    key = key if key is not None else jax.random.key(0)
    check_objective(objective, params, batch_fn(0), key)
    step = make_step(objective, optimizer)
    snaps: dict[int, PyTree] = {}
    wanted = set(want)

    def collect_member(t, state):
        if t in wanted:
            snaps[t] = jax.tree_util.tree_map(jnp.copy, state.params)

    callbacks = [] if callback is None else [
        lambda epoch, state, history: callback(epoch, (state.params, [snaps[t] for t in want if t in snaps]))]
    res = run(step, step.init(params), batch_fn, epochs=-(-steps // spe), steps_per_epoch=spe, key=key,
              config=LoopConfig(progress=progress, desc="snapshots"), callbacks=callbacks, max_steps=steps,
              step_callbacks=[collect_member])
    return res.state.params, [snaps[t] for t in want if t in snaps]


def snapshot_ensemble(objective: Callable, init_params: PyTree, batch_fn: Callable[[int], Any], *, lr0: float,
                      total_steps: int, num_members: int, momentum: float = 0.9, weight_decay: float = 0.0,
                      key: jax.Array | None = None, steps_per_epoch: int | None = None,
                      progress: bool | None = None, callback: Callable | None = None) -> list[PyTree]:
    """Snapshot ensemble (Huang et al. 2017a): one run with a cyclic cosine learning rate, a member per cycle.

    SGD (``momentum``, L2 ``weight_decay`` added to the gradient) with :func:`snapshot_cosine_schedule` over
    ``total_steps`` — the whole budget — and a member at the end of each of ``num_members`` cycles
    (:func:`train_with_snapshots`).

    Args:
      objective: ``objective(params, batch, key) -> (loss, aux)``.
      init_params: the initial parameters.
      batch_fn: ``t -> batch``.
      lr0: the learning rate at the start of each cycle.
      total_steps: the whole budget in steps.
      num_members: the number of cycles and members.
      momentum: SGD momentum (``0``: none).
      weight_decay: L2 coefficient added to the gradient.
      key: the base key (default ``jax.random.key(0)``).
      steps_per_epoch, progress, callback: as for :func:`train_with_snapshots`.

    Returns:
      The ``num_members`` snapshots, in training order (fewer when ``callback`` stopped training early).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from mclandscape.core.objective import function_objective
        >>> objective = function_objective(lambda p, b: jnp.sum((p["w"] - b) ** 2))
        >>> batches = lambda t: jnp.ones(2)  # minimum at w = 1
        >>> snaps = snapshot_ensemble(objective, {"w": jnp.zeros(2)}, batches, lr0=0.2, total_steps=6,
        ...                           num_members=2, momentum=0.0)
        >>> len(snaps), [round(float(s["w"][0]), 3) for s in snaps]
        (2, [0.622, 0.857])
    """
    sched = snapshot_cosine_schedule(lr0, total_steps, num_members)
    opt = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(sched, momentum=momentum or None))
    _, snaps = train_with_snapshots(objective, init_params, opt, batch_fn, total_steps,
                                    snapshot_steps(total_steps, num_members), key=key,
                                    steps_per_epoch=steps_per_epoch, progress=progress, callback=callback)
    return snaps


def fge_ensemble(objective: Callable, trained_params: PyTree, batch_fn: Callable[[int], Any], *, lr1: float,
                 lr2: float, cycle_steps: int, num_members: int, momentum: float = 0.9,
                 weight_decay: float = 0.0, key: jax.Array | None = None, steps_per_epoch: int | None = None,
                 progress: bool | None = None, callback: Callable | None = None) -> list[PyTree]:
    """Fast geometric ensembling (Garipov et al. 2018): from a trained model, a member at every mid-cycle.

    From ``trained_params``, SGD with :func:`fge_schedule` for ``num_members`` cycles of ``cycle_steps``
    (:func:`train_with_snapshots`).

    Args:
      objective: ``objective(params, batch, key) -> (loss, aux)``.
      trained_params: the trained model's parameters.
      batch_fn: ``t -> batch``.
      lr1, lr2: the learning rates at the ends and at the middle of a cycle.
      cycle_steps: the cycle length (even).
      num_members: the number of members.
      momentum: SGD momentum (``0``: none).
      weight_decay: L2 coefficient added to the gradient.
      key: the base key (default ``jax.random.key(0)``).
      steps_per_epoch, progress, callback: as for :func:`train_with_snapshots`.

    Returns:
      The ``num_members`` members, in training order (fewer when ``callback`` stopped training early).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from mclandscape.core.objective import function_objective
        >>> objective = function_objective(lambda p, b: jnp.sum((p["w"] - b) ** 2))
        >>> batches = lambda t: jnp.ones(2)  # minimum at w = 1
        >>> members = fge_ensemble(objective, {"w": jnp.ones(2)}, batches, lr1=0.05, lr2=0.01, cycle_steps=2,
        ...                        num_members=3)
        >>> len(members), all(bool(jnp.allclose(m["w"], 1.0)) for m in members)  # started at the minimum
        (3, True)
    """
    sched = fge_schedule(lr1, lr2, cycle_steps)
    opt = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(sched, momentum=momentum or None))
    collect = fge_collect_steps(cycle_steps, num_members)
    _, snaps = train_with_snapshots(objective, trained_params, opt, batch_fn, collect[-1], collect, key=key,
                                    steps_per_epoch=steps_per_epoch, progress=progress, callback=callback)
    return snaps


def independent_ensemble(train_one: Callable[[int], PyTree], seeds: Sequence[int]) -> list[PyTree]:
    """Independently trained members: ``train_one(seed)`` for each seed.

    Different random initialisations and data orders, the full budget each (the DSP-TT paper's Table 3
    "Individual-Ens").

    Args:
      train_one: ``seed -> params`` (any trainer).
      seeds: distinct integer seeds.

    Returns:
      The members, in the order of ``seeds``. Raises ``ValueError`` for no or repeated seeds and
      :class:`~mclandscape.core.tree.TreeMismatchError` when the members differ in structure.

    Example:
        >>> import jax.numpy as jnp
        >>> members = independent_ensemble(lambda s: {"w": jnp.full(2, float(s))}, [0, 1, 2])
        >>> [float(m["w"][0]) for m in members]
        [0.0, 1.0, 2.0]
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("independent_ensemble needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    members = [train_one(int(s)) for s in seeds]
    for i in range(1, len(members)):
        check_same_structure(members[0], members[i], names=("member[0]", f"member[{i}]"))
    return members
