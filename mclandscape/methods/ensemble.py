"""Ensembles of networks and the metrics of their quality and diversity — the library's one implementation.

Used by DSP-TT (the DSP-TT paper: Anonymous, 2020, "Constructing multiple high-quality deep neural networks: a
TRUST-TECH based approach", ICLR 2021 submission, §4-5: Tier-1, Tier-0-1, Tier-0-1-2 ensembles, Tables 1-3)
and by Bézier-surface ensembling (the Bézier-surface paper: Anonymous, 2024, "Revisiting mode connectivity in
neural networks with Bézier surface": ensembles of grid points of a surface). Everything starts from the
*stacked member output probabilities* ``probs[M, N, C]`` (M members, N examples, C classes), which any caller
can produce (:func:`member_probs` does it for parameter sets of a :class:`~mclandscape.engine.models.base.Model`
through :func:`mclandscape.engine.evaluate.evaluate`).

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

The baselines of equal budget (snapshot, FGE and independent ensembles): :mod:`mclandscape.methods.snapshots`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mclandscape.core._checks import choice
from mclandscape.core.tree import tree_gram, tree_stack
from mclandscape.engine.evaluate import evaluate
from mclandscape.engine.points import Points, data_xy, stacked_points

__all__ = [
    "METHODS", "EnsembleMetrics", "average_probs", "vote", "test_error", "nll",
    "pairwise_output_correlation", "output_correlation", "pairwise_param_distances", "param_distance",
    "ensemble_from_probs", "member_probs", "ensemble_from_params",
]

METHODS = ("mean", "vote")


# ---------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------


def _check_probs(probs) -> np.ndarray:
    p = np.asarray(probs)
    if p.ndim != 3 or min(p.shape) < 1 or p.shape[2] < 2:
        raise ValueError(f"probs must have shape [M members, N examples, C classes] with M, N >= 1 and C >= 2, "
                         f"got shape {p.shape}")
    deviation = np.max(np.abs(p.astype(np.float64).sum(-1) - 1.0))
    if not np.all(np.isfinite(p)) or p.min() < 0 or deviation > 1e-3:
        raise ValueError(f"probs must hold softmax outputs, not logits: no non-finite values "
                         f"({np.size(p) - np.sum(np.isfinite(p))} found), no negative probabilities (min {p.min():.3g}) "
                         f"and rows that sum to 1 over classes (max deviation {deviation:.3g})")
    return p


def _check_labels(labels, n: int, c: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= c:
        raise ValueError(f"labels must be integer class indices in [0, {c}) of shape [{n}] to match the "
                         f"probabilities, got {y.dtype} of shape {y.shape}"
                         f"{f' with values in [{y.min()}, {y.max()}]' if y.size else ''}")
    return y


def _points(members) -> Points:
    """A list of parameter pytrees (stacked, naming the member that differs) or one stacked pytree, as points."""
    if isinstance(members, list | tuple):
        members = tree_stack(members, names=[f"member[{i}]" for i in range(len(members))])
    return stacked_points(members)


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
    if w.shape != (p.shape[0],) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be {p.shape[0]} finite, non-negative member weights, not all zero, got {w}")
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
    counts = np.eye(p.shape[2], dtype=np.int64)[p.argmax(-1)].sum(0)  # [N, C] votes per class
    mean = p.astype(np.float64).mean(0)
    top = counts == counts.max(-1, keepdims=True)
    pred = np.where(top, mean, -np.inf).argmax(-1)
    return pred, counts / p.shape[0]


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
    pred, y = (a.argmax(-1) if a.ndim == 2 else a), np.asarray(labels)
    if pred.ndim != 1 or not np.issubdtype(pred.dtype, np.integer) or y.shape != pred.shape or y.size == 0:
        raise ValueError(f"test_error takes integer predictions [N] or probabilities [N, C] and labels [N], N >= 1, "
                         f"got {a.dtype} of shape {a.shape} and labels of shape {y.shape}")
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
    with np.errstate(divide="ignore"):
        return float(-np.mean(np.log(q[np.arange(len(y)), y]))) + 0.0  # + 0.0: a perfect fit is 0.0, not -0.0


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
    flat = _check_probs(probs).astype(np.float64).reshape(len(probs), -1)
    if len(flat) < 2:
        raise ValueError("output correlation needs at least 2 members")
    if np.any(flat.std(1) == 0):
        raise ValueError(f"member {int(np.argmin(flat.std(1)))} has constant outputs, so its Pearson correlation is "
                         f"undefined")
    return np.corrcoef(flat)


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
    return float(r[np.triu_indices(len(r), 1)].mean())


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
    centred = jax.tree.map(lambda x: x - jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), 0),
                           _points(members).stack)
    g = np.asarray(tree_gram(centred), dtype=np.float64)
    d2 = np.diag(g)[:, None] + np.diag(g)[None, :] - 2.0 * g
    np.fill_diagonal(d2, 0.0)
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

        return jax.tree.map(clean, dataclasses.asdict(self))


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
    p = _check_probs(probs)
    y = _check_labels(labels, p.shape[1], p.shape[2])
    if choice(method, "method", METHODS) == "vote" and weights is not None:
        raise ValueError("weights are only supported for method='mean'")
    q = average_probs(p, weights) if method == "mean" else None  # a vote has no probabilities
    pred = vote(p)[0] if q is None else q.argmax(-1)
    m, dist = p.shape[0], None
    if params is not None:
        points = _points(params)
        if points.num_points != m:
            raise ValueError(f"params hold {points.num_points} members but probs hold {m}")
        dist = param_distance(points.stack) if m > 1 else None
    return EnsembleMetrics(
        method=method, members=m, test_error=test_error(pred, y), nll=None if q is None else nll(q, y),
        output_correlation=output_correlation(p) if m > 1 else None, param_distance=dist,
        member_test_error=[test_error(p[i], y) for i in range(m)],
        member_nll=[nll(p[i], y) for i in range(m)])


def member_probs(model, members, data, *, batch_size: int = 500, bn_data=None, **kwargs) -> np.ndarray:
    """Output probabilities of parameter sets of ``model`` on ``data``: a view of the engine's ``evaluate``.

    Args:
      model: the :class:`~mclandscape.engine.models.base.Model`.
      members: a list of ``params`` pytrees, or one stacked pytree.
      data: a Dataset or ``(x, y)``.
      batch_size: examples per evaluation batch.
      bn_data: data on which BatchNorm statistics are recomputed per member (BatchNorm models).
      **kwargs: for :func:`mclandscape.engine.evaluate.evaluate` (e.g. ``strategy``, ``chunk_size``).

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
    return np.asarray(evaluate(model, _points(members), data, batch_size=batch_size, bn_data=bn_data,
                               return_probs=True, **kwargs).probs)


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
    stacked = _points(members).stack
    probs = member_probs(model, stacked, data, batch_size=batch_size, bn_data=bn_data)
    return ensemble_from_probs(probs, data_xy(data)[1], method=method, weights=weights, params=stacked)
