"""Bézier surfaces evaluated and used: grids, appendix-B subsets, model merging, ensembling, linear surfaces.

The Bézier-surface paper (Anonymous, 2024, "Revisiting mode connectivity in neural networks with Bézier
surface"). :func:`surface_grid` (train loss / test accuracy over the 11 x 11 grid of step 0.1 with BatchNorm
statistics recomputed per point, Figures 4-5) and :func:`evaluate_triangle` are named views of the engine's
one evaluation, :func:`mclandscape.engine.evaluate.evaluate`. :func:`subset_approximation` (appendix B),
:func:`merge_best` (model merging, Table 1), :func:`surface_ensembles` (Table 3, through
:mod:`mclandscape.methods.ensemble`), linear surfaces without training (:func:`triangle_points` /
:func:`evaluate_triangle` for §4.1 and Figure 3; the untrained bilinear surface; :func:`trajectory_surface`
for A.2/A.3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mclandscape.core import _checks
from mclandscape.core.connectors import Connector, bezier_surface, simplex
from mclandscape.core.tree import PyTree
from mclandscape.engine.evaluate import evaluate
from mclandscape.engine.models.base import Model
from mclandscape.engine.points import connector_points, data_xy, uv_grid
from mclandscape.methods.surface import _check_surface

__all__ = [
    "SurfaceGrid", "surface_grid", "extrema", "subset_approximation", "merge_best", "corner_indices",
    "surface_ensembles", "triangle_points", "TriangleResult", "evaluate_triangle", "trajectory_surface",
]


@dataclasses.dataclass(frozen=True)
class SurfaceGrid:
    """Metrics over the ``steps x steps`` (u, v) grid; arrays ``[steps, steps]`` indexed ``[i_u, i_v]``.

    ``train_loss``/``train_acc`` on the training data, ``test_loss``/``test_acc`` on the test data (model in
    evaluation mode, BatchNorm statistics recomputed per point from the training data). ``test_probs``
    (``[steps*steps, N, C]``, u-major) when requested, for ensembling.
    """

    steps: int
    points: np.ndarray
    train_loss: np.ndarray
    train_acc: np.ndarray
    test_loss: np.ndarray
    test_acc: np.ndarray
    test_probs: np.ndarray | None = None

    @property
    def axis(self) -> np.ndarray:
        return np.linspace(0.0, 1.0, self.steps)

    def corner_values(self, name: str) -> np.ndarray:
        """The metric ``name`` at the corners (0,0), (0,1), (1,0), (1,1): the four corner models."""
        return np.asarray(getattr(self, name)).reshape(-1)[corner_indices(self.steps)]



def surface_grid(model: Model, connector: Connector, train, test, *, steps: int = 11, return_probs: bool = False,
                 train_eval=None, **kwargs) -> SurfaceGrid:
    """Train and test loss/accuracy over the ``steps x steps`` (u, v) grid (Bézier-surface paper, Figures 4-5).

    A view of :func:`mclandscape.engine.evaluate.evaluate` at :func:`~mclandscape.engine.points.uv_grid`
    (default step 0.1, 11 x 11). BatchNorm statistics, as in :func:`mclandscape.methods.curves.evaluate_curve`,
    are recomputed at every point on ``bn_data``, which defaults to ``train``; models without BatchNorm
    ignore it.

    Args:
      model: the :class:`~mclandscape.engine.models.Model`.
      connector: a surface.
      train: the training data (the default ``bn_data`` and, unless ``train_eval``, the train-loss grid).
      test: the test data.
      steps: grid points per axis (>= 2).
      return_probs: keep the test softmax outputs (for :func:`surface_ensembles`).
      train_eval: data for the train-loss grid instead of ``train`` (appendix B: a few batches).
      **kwargs: for :func:`~mclandscape.engine.evaluate.evaluate` (``batch_size``, ``bn_data``,
        ``bn_batches``, ``bn_batch_size``, ``strategy``, ``chunk_size``, ``loss_fn``, ``devices``, ...).

    Returns:
      A :class:`SurfaceGrid`.

    Example:
        >>> import jax
        >>> import mclandscape as mcl
        >>> train, test = mcl.load_dataset("iris", "train"), mcl.load_dataset("iris", "test")
        >>> model = mcl.get_model("mlp", widths=[4], num_classes=3)
        >>> corners = [model.init(jax.random.key(s), train.x[:1])["params"] for s in range(4)]
        >>> g = surface_grid(model, mcl.bilinear_surface(*corners), train, test, steps=3)
        >>> g.train_loss.shape, g.corner_values("test_acc").shape
        ((3, 3), (4,))
    """
    _check_surface(connector)
    pts = uv_grid(steps)
    if kwargs.get("bn_data") is None:
        kwargs["bn_data"] = train
    sets = {"train": train if train_eval is None else train_eval, "test": test}
    # one call for both sets: each point's BatchNorm statistics are recomputed once, for train and test
    m = evaluate(model, connector_points(connector, pts), sets, return_probs=("test",) if return_probs else False,
                 **kwargs)
    s = (steps, steps)
    return SurfaceGrid(steps=steps, points=pts, train_loss=m["train"].loss.reshape(s),
                       train_acc=m["train"].accuracy.reshape(s), test_loss=m["test"].loss.reshape(s),
                       test_acc=m["test"].accuracy.reshape(s), test_probs=m["test"].probs)


def extrema(values: np.ndarray) -> dict:
    """Positions ``(u, v)`` of the minimum ("valley") and maximum ("peak") of a ``[S, S]`` grid (appendix B).

    Args:
      values: a square grid ``[S, S]`` of finite values, indexed ``[i_u, i_v]`` on :func:`uv_grid`'s axes.

    Returns:
      ``{"valley": [u, v], "peak": [u, v], "min": ..., "max": ...}``.

    Example:
        >>> import numpy as np
        >>> extrema(np.array([[3.0, 1.0], [2.0, 5.0]]))
        {'valley': [0.0, 1.0], 'peak': [1.0, 1.0], 'min': 1.0, 'max': 5.0}
    """
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 2:
        raise ValueError(f"expected a square [S, S] grid with S >= 2, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("grid holds non-finite values")
    ax = np.linspace(0.0, 1.0, a.shape[0])

    def pos(flat):
        i, j = np.unravel_index(flat, a.shape)
        return [round(float(ax[i]), 6), round(float(ax[j]), 6)]

    return {"valley": pos(np.argmin(a)), "peak": pos(np.argmax(a)),
            "min": float(a.min()), "max": float(a.max())}


def subset_approximation(model: Model, connector: Connector, train, test, *, full: SurfaceGrid | None = None,
                         steps: int = 11, train_batches: int = 4, batch_size: int = 128, test_size: int | None = None,
                         seed: int = 0, bn_data=None, bn_batches: int | None = None, bn_batch_size: int = 128,
                         strategy: str = "auto") -> dict:
    """Appendix B: the grids from data subsets compared with the full-data grids.

    The train-loss grid from ``train_batches`` random batches of ``batch_size`` (B.1) and the test-accuracy
    grid from a random test subset of ``test_size`` examples (default a quarter; B.2): valley and peak
    positions of both, the largest absolute difference and the correlation over the grid.

    Args:
      model: the :class:`~mclandscape.engine.models.Model`.
      connector: a surface.
      train, test: the data (``train`` also gives the BatchNorm data unless ``bn_data``).
      full: the full-data :class:`SurfaceGrid` (default: computed).
      steps: grid points per axis.
      train_batches, batch_size: the train subset.
      test_size: the test subset size (default a quarter).
      seed: the subsets' seed.
      bn_data, bn_batches, bn_batch_size, strategy: as for :func:`surface_grid`.

    Returns:
      A JSON-ready dict.

    Example:
        >>> import jax
        >>> import mclandscape as mcl
        >>> train, test = mcl.load_dataset("iris", "train"), mcl.load_dataset("iris", "test")
        >>> model = mcl.get_model("mlp", widths=[4], num_classes=3)
        >>> cs = [model.init(jax.random.key(s), train.x[:1])["params"] for s in range(4)]
        >>> r = subset_approximation(model, mcl.bilinear_surface(*cs), train, test, steps=3, train_batches=1,
        ...                          batch_size=32)
        >>> r["train_examples"], r["test_examples"], sorted(r["train_loss"]["full"])
        (32, 7, ['max', 'min', 'peak', 'valley'])
    """
    xtr, ytr = data_xy(train)
    xte, yte = data_xy(test)
    ntr = min(len(ytr), _checks.integer(train_batches, "train_batches", low=1) * batch_size)
    nte = max(1, len(yte) // 4) if test_size is None else _checks.integer(test_size, "test_size", low=1)
    if nte > len(yte):
        raise ValueError(f"test_size must lie in [1, {len(yte)}], got {test_size}")
    rng = np.random.default_rng(seed)
    itr = rng.permutation(len(ytr))[:ntr]
    ite = rng.permutation(len(yte))[:nte]
    kw = dict(bn_data=bn_data, bn_batches=bn_batches, bn_batch_size=bn_batch_size, strategy=strategy)
    full = full or surface_grid(model, connector, train, test, steps=steps, **kw)
    sub = surface_grid(model, connector, train, (xte[ite], yte[ite]), steps=full.steps, train_eval=(xtr[itr], ytr[itr]),
                       **kw)

    def compare(a, b):
        fa, fb = extrema(a), extrema(b)
        corr = float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) if np.std(a) > 0 and np.std(b) > 0 else None
        return {"full": fa, "subset": fb, "valley_same": fa["valley"] == fb["valley"],
                "peak_same": fa["peak"] == fb["peak"], "max_abs_diff": float(np.max(np.abs(a - b))),
                "correlation": corr}

    return {"train_examples": int(ntr), "test_examples": int(nte),
            "train_loss": compare(full.train_loss, sub.train_loss),
            "test_acc": compare(full.test_acc, sub.test_acc),
            "subset_grid": {"train_loss": sub.train_loss.tolist(), "test_acc": sub.test_acc.tolist()}}


def merge_best(grid: SurfaceGrid) -> dict:
    """Model merging (§4.3, Table 1): the grid point of least *train* loss (no test peeking) and its test accuracy.

    The point of best test accuracy is reported separately, for comparison with Table 1.

    Args:
      grid: a :class:`SurfaceGrid`.

    Returns:
      A dict with ``u``, ``v``, ``train_loss``, ``test_acc``, ``test_loss`` and ``best_test_*``.

    Example:
        >>> import numpy as np
        >>> z = np.zeros((2, 2))
        >>> g = SurfaceGrid(2, np.zeros((4, 2)), np.array([[1.0, 0.5], [2.0, 3.0]]), z, z, np.array([[0.1, 0.8],
        ...                 [0.9, 0.2]]))
        >>> m = merge_best(g)
        >>> (m["u"], m["v"], m["test_acc"]), (m["best_test_u"], m["best_test_v"])
        ((0.0, 1.0, 0.8), (1.0, 0.0))
    """
    ax = grid.axis
    i, j = np.unravel_index(int(np.argmin(grid.train_loss)), grid.train_loss.shape)
    bi, bj = np.unravel_index(int(np.argmax(grid.test_acc)), grid.test_acc.shape)
    return {"by": "train_loss", "u": float(ax[i]), "v": float(ax[j]), "train_loss": float(grid.train_loss[i, j]),
            "test_acc": float(grid.test_acc[i, j]), "test_loss": float(grid.test_loss[i, j]),
            "best_test_acc": float(grid.test_acc[bi, bj]), "best_test_u": float(ax[bi]), "best_test_v": float(ax[bj])}


def corner_indices(steps: int) -> list[int]:
    """Flat indices (u-major) of the grid points (0,0), (0,1), (1,0), (1,1) of :func:`uv_grid`.

    Args:
      steps: grid points per axis.

    Returns:
      Four indices, in the corner order ``c00, c01, c10, c11``.

    Example:
        >>> corner_indices(11)
        [0, 10, 110, 120]
    """
    s = int(steps)
    return [0, s - 1, (s - 1) * s, s * s - 1]


def surface_ensembles(grid: SurfaceGrid, labels, *, method: str = "mean") -> dict:
    """Output ensembling (§4.3, Table 3): all grid models (step 0.1 by default) against the four corners.

    Uses :func:`mclandscape.methods.ensemble.ensemble_from_probs` on the grid's ``test_probs`` (evaluate the grid
    with ``return_probs=True``).

    Args:
      grid: a :class:`SurfaceGrid` with ``test_probs``.
      labels: the test labels ``[N]``.
      method: how member outputs are combined (see ``ensemble_from_probs``).

    Returns:
      ``{"corner": EnsembleMetrics, "surface": EnsembleMetrics}``.

    Example:
        >>> import jax
        >>> import mclandscape as mcl
        >>> train, test = mcl.load_dataset("iris", "train"), mcl.load_dataset("iris", "test")
        >>> model = mcl.get_model("mlp", widths=[4], num_classes=3)
        >>> cs = [model.init(jax.random.key(s), train.x[:1])["params"] for s in range(4)]
        >>> g = surface_grid(model, mcl.bilinear_surface(*cs), train, test, steps=3, return_probs=True)
        >>> sorted(surface_ensembles(g, test.y))
        ['corner', 'surface']
    """
    from mclandscape.methods.ensemble import ensemble_from_probs

    if grid.test_probs is None:
        raise ValueError("the grid holds no output probabilities: evaluate it with return_probs=True")
    probs = np.asarray(grid.test_probs)
    y = np.asarray(labels)
    return {"corner": ensemble_from_probs(probs[corner_indices(grid.steps)], y, method=method),
            "surface": ensemble_from_probs(probs, y, method=method)}


# ---------------------------------------------------------------------------------------------------------
# linear surfaces (§4.1, Figure 3; A.2, A.3)
# ---------------------------------------------------------------------------------------------------------


def triangle_points(steps: int = 11) -> np.ndarray:
    """Barycentric grid ``[steps (steps+1) / 2, 3]`` of ``(alpha1, alpha2, alpha3)`` summing to 1 (§4.1).

    Args:
      steps: points per edge (>= 2); the spacing is ``1/(steps-1)`` (default step 0.1).

    Returns:
      A float64 array.

    Example:
        >>> triangle_points(3).tolist()
        [[0.0, 0.0, 1.0], [0.0, 0.5, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]
    """
    s = _checks.integer(steps, "steps", low=2, what="a triangle grid") - 1
    pts = [(a, b, s - a - b) for a in range(s + 1) for b in range(s + 1 - a)]
    return np.asarray(pts, dtype=np.float64) / s


@dataclasses.dataclass(frozen=True)
class TriangleResult:
    """Loss and accuracy at the barycentric ``points [P, 3]`` of the three-model linear surface."""

    points: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray


def evaluate_triangle(model: Model, models: Sequence[PyTree], data, *, steps: int = 11, **kwargs) -> TriangleResult:
    """The linear surface ``phi = alpha1 theta1 + alpha2 theta2 + alpha3 theta3`` (§4.1, Figure 3) on ``data``.

    A view of :func:`mclandscape.engine.evaluate.evaluate` at :func:`triangle_points`. This function sees one
    data set: ``bn_data`` must be given for a model with BatchNorm.

    Args:
      model: the :class:`~mclandscape.engine.models.Model`.
      models: the three parameter pytrees.
      data: the data to evaluate on.
      steps: points per edge of :func:`triangle_points`.
      **kwargs: for :func:`~mclandscape.engine.evaluate.evaluate` (``bn_data``, ``batch_size``,
        ``bn_batches``, ``bn_batch_size``, ``strategy``, ...).

    Returns:
      A :class:`TriangleResult`.

    Example:
        >>> import jax
        >>> import mclandscape as mcl
        >>> data = mcl.load_dataset("iris", "test")
        >>> model = mcl.get_model("mlp", widths=[4], num_classes=3)
        >>> cs = [model.init(jax.random.key(s), data.x[:1])["params"] for s in range(3)]
        >>> evaluate_triangle(model, cs, data, steps=3).loss.shape
        (6,)
    """
    models = list(models)
    if len(models) != 3:
        raise ValueError(f"the triangle of §4.1 takes exactly 3 models, got {len(models)}")
    pts = triangle_points(steps)
    r = evaluate(model, connector_points(simplex(models), pts), data, **kwargs)
    return TriangleResult(points=pts, loss=r.loss, accuracy=r.accuracy)


def trajectory_surface(snapshots: Sequence[PyTree], *, n: int = 2, m: int = 2) -> Connector:
    """A.2/A.3: the linear Bézier surface whose corners are four snapshots of *one* training trajectory.

    Interior control points are bilinear, so every point is a convex combination of the four snapshots.

    Args:
      snapshots: ``(theta_00, theta_01, theta_10, theta_11)`` (e.g. epochs 220, 200, 180, 160 in the paper).
      n, m: the degrees (keyword-only).

    Returns:
      A :class:`~mclandscape.core.connectors.Connector` of kind ``"surface"``.

    Example:
        >>> import jax.numpy as jnp
        >>> snaps = [{"w": jnp.array([float(e)])} for e in (220, 200, 180, 160)]
        >>> trajectory_surface(snaps, n=2, m=2).point(jnp.array([0.5, 0.5]))["w"].tolist()
        [190.0]
    """
    snaps = list(snapshots)
    if len(snaps) != 4:
        raise ValueError(f"a trajectory surface takes 4 snapshots (the corners), got {len(snaps)}")
    return bezier_surface(*snaps, n=n, m=m)
