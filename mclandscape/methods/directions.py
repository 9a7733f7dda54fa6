"""Li et al. (2018) loss-landscape views: normalised random directions, 1-D loss curves and 2-D loss planes.

Chen et al. (2021, "Deforming the loss surface to affect the behaviour of the optimizer", AAAI), §4.1 and
Fig. 5, draw loss curves ``f(α) = L(θ* + α d)`` around the minima found with and without a vertical
deformation mapping (VDM), with ``d`` a random Gaussian direction rescaled by *filter normalisation* (Li et
al. 2018, "Visualizing the loss landscape of neural nets"): every filter ``d_{i,j}`` of the direction is rescaled to
the norm of the corresponding filter of the model, ``d_{i,j} <- d_{i,j} / |d_{i,j}| · |θ_{i,j}|``, which
removes the scale invariance of ReLU networks so curves of different models are comparable.

Conventions in Flax layouts. A *filter* is one output unit: the slice at a fixed index of the **last**
axis of a kernel (``Conv`` ``[h, w, in, out]``, ``Dense`` ``[in, out]``; PyTorch's first axis). Leaves with
``ndim <= 1`` (biases, BatchNorm scale/bias) are treated by ``bias_bn``:

- ``"zero"``: their direction is 0, they do not move (Li et al.'s ``ignore='biasbn'``);
- ``"copy"``: their direction equals the parameter itself (Li et al.'s default when not ignored);
- ``"normalize"``: normalised like any other leaf (each scalar is a filter of its own).

Normalisations (``norm``): ``"filter"`` (per filter, above), ``"layer"`` (per leaf: ``d <- d/|d|·|θ|``),
``"weight"`` (element-wise ``d <- d ⊙ θ``), ``"unit"`` (the whole direction scaled to norm 1) and
``"none"``. Only the ``params`` collection moves; BatchNorm running statistics stay as trained (with
:func:`loss_curve`/:func:`loss_plane` they are recomputed per point when ``bn_data`` is given, see
:func:`mclandscape.engine.evaluate.evaluate`).

Grid evaluation goes through the one evaluator (:mod:`mclandscape.engine.evaluate`): a line or plane is
:func:`~mclandscape.engine.points.plane_points`, rows ``[1, α, β]`` over the stack ``[θ, d1, d2]``. Each point's
parameters are formed inside the mapped computation, so memory holds the three trees and at most a chunk of
parameter copies, whatever the grid size (a 51×51 plane of VGG16 would otherwise be 2,601 copies, ~158 GB;
``benchmarks/loss_plane_memory.py`` measures it). :func:`loss_curve` and :func:`loss_plane` evaluate the model
with :func:`~mclandscape.engine.evaluate.evaluate` (first-layer factorisation, BatchNorm recomputed per point
from ``bn_data``); a pure function of the parameters maps over the same points with
:func:`~mclandscape.engine.points.map_points`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mclandscape.core import _checks
from mclandscape.core.tree import PyTree, check_same_structure, tree_norm, tree_random_normal
from mclandscape.engine.evaluate import evaluate
from mclandscape.engine.models.base import Model
from mclandscape.engine.points import plane_points

__all__ = [
    "NORMS",
    "BIAS_BN",
    "normalize_direction",
    "random_direction",
    "random_directions",
    "filter_norms",
    "Landscape",
    "loss_curve",
    "loss_plane",
]

NORMS = ("filter", "layer", "weight", "unit", "none")
BIAS_BN = ("zero", "copy", "normalize")


def filter_norms(leaf) -> jax.Array:
    """Norm of every filter of a leaf: the slices along its last (output) axis.

    Args:
      leaf: a parameter array; a scalar is one filter, a vector has one filter per entry.

    Returns:
      ``[out]`` norms (``[1]`` for a scalar).

    Example:
        >>> import jax.numpy as jnp
        >>> filter_norms(jnp.array([[3.0, 0.0], [4.0, 1.0]])).tolist()
        [5.0, 1.0]
    """
    x = jnp.asarray(leaf)
    if x.ndim == 0:
        return jnp.abs(x)[None]
    if x.ndim == 1:
        return jnp.abs(x)
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(x.ndim - 1))))


def _normalize_leaf(d, w, norm: str, bias_bn: str, eps: float):
    if d.shape != w.shape:
        raise ValueError(f"direction leaf shape {d.shape} differs from parameter shape {w.shape}")
    if d.ndim <= 1:
        if bias_bn == "zero":
            return jnp.zeros_like(d)
        if bias_bn == "copy":
            return w.astype(d.dtype)
    if norm == "filter":
        if d.ndim <= 1:
            return (jnp.sign(d) * jnp.abs(w)).astype(d.dtype)
        axes = tuple(range(d.ndim - 1))
        dn = jnp.sqrt(jnp.sum(jnp.square(d), axis=axes, keepdims=True))
        wn = jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True))
        return (d * (wn / (dn + eps))).astype(d.dtype)
    if norm == "layer":
        return (d * (jnp.linalg.norm(w.ravel()) / (jnp.linalg.norm(d.ravel()) + eps))).astype(d.dtype)
    if norm == "weight":
        return (d * w).astype(d.dtype)
    return d


def normalize_direction(direction: PyTree, params: PyTree, *, norm: str = "filter", bias_bn: str = "zero",
                        eps: float = 1e-10) -> PyTree:
    """Rescale ``direction`` against ``params`` (Li et al. 2018 filter, layer or weight normalisation).

    Args:
      direction: a pytree shaped like ``params``.
      params: the centre ``θ`` (same structure and shapes).
      norm: ``"filter"``, ``"layer"``, ``"weight"``, ``"unit"`` or ``"none"`` (see the module docstring).
      bias_bn: how leaves with ``ndim <= 1`` are treated: ``"zero"``, ``"copy"`` or ``"normalize"``.
      eps: guards zero-norm filters (as Li et al.'s ``1e-10``).

    Returns:
      The normalised direction. Raises ``ValueError`` for an unknown option, a zero direction with
      ``norm="unit"``, or trees that do not match.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0]]), "bias": jnp.ones(2)}
        >>> d = {"kernel": jnp.array([[1.0, 0.0], [0.0, 2.0]]), "bias": jnp.array([5.0, 5.0])}
        >>> out = normalize_direction(d, params)  # every filter (column) gets the norm of params' filter
        >>> out["kernel"].tolist(), out["bias"].tolist()
        ([[5.0, 0.0], [0.0, 1.0]], [0.0, 0.0])
    """
    _checks.choice(norm, "norm", NORMS)
    _checks.choice(bias_bn, "bias_bn", BIAS_BN)
    check_same_structure(direction, params, names=("direction", "params"), check_dtype=False)
    # "unit" and "none" leave the (non bias/BN) leaves as drawn; "unit" then scales the whole direction
    out = jax.tree_util.tree_map(lambda d, w: _normalize_leaf(d, w, norm, bias_bn, eps), direction, params)
    if norm == "unit":
        n = tree_norm(out)
        if float(n) == 0.0:
            raise ValueError("normalize_direction(norm='unit'): the direction is zero")
        out = optax.tree.scale(1.0 / n, out)
    return out


def random_direction(key: jax.Array, params: PyTree, *, norm: str = "filter", bias_bn: str = "zero") -> PyTree:
    """A Gaussian direction shaped like ``params``, normalised by :func:`normalize_direction`.

    Args:
      key: a PRNG key.
      params: the centre ``θ``.
      norm, bias_bn: see :func:`normalize_direction`.

    Returns:
      A pytree like ``params``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> params = {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0]]), "bias": jnp.ones(2)}
        >>> d = random_direction(jax.random.key(0), params)
        >>> bool(jnp.allclose(filter_norms(d["kernel"]), filter_norms(params["kernel"]))), d["bias"].tolist()
        (True, [0.0, 0.0])
    """
    d = tree_random_normal(key, params)
    return normalize_direction(d, params, norm=norm, bias_bn=bias_bn)


def random_directions(key: jax.Array, params: PyTree, num: int = 2, *, norm: str = "filter",
                      bias_bn: str = "zero") -> list[PyTree]:
    """``num`` independent normalised random directions (two span Li et al.'s 2-D plane).

    In high dimension independent Gaussian directions are nearly orthogonal.

    Args:
      key: a PRNG key (split into ``num``).
      params: the centre ``θ``.
      num: how many directions (``>= 1``).
      norm, bias_bn: see :func:`normalize_direction`.

    Returns:
      A list of ``num`` pytrees like ``params``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> params = {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0]]), "bias": jnp.ones(2)}
        >>> d1, d2 = random_directions(jax.random.key(0), params, 2)
        >>> bool(jnp.allclose(filter_norms(d2["kernel"]), filter_norms(params["kernel"])))
        True
        >>> bool(jnp.any(d1["kernel"] != d2["kernel"]))
        True
    """
    return [random_direction(k, params, norm=norm, bias_bn=bias_bn)
            for k in jax.random.split(key, _checks.integer(num, "num", low=1))]


def _as_dtype_of(direction: PyTree, params: PyTree) -> PyTree:
    """The direction in the parameters' dtypes (the points are cast to them anyway)."""
    return jax.tree_util.tree_map(lambda d, w: jnp.asarray(d).astype(jnp.result_type(w)), direction, params)


@dataclasses.dataclass(frozen=True)
class Landscape:
    """Loss and accuracy on a line or a plane of parameter space (returned by :func:`loss_curve`, :func:`loss_plane`).

    Attributes:
      alphas: ``[A]`` coordinates along the first direction.
      betas: ``[B]`` coordinates along the second direction (``None`` for a curve).
      loss: ``[A]`` for a curve, ``[A, B]`` (alpha major) for a plane.
      accuracy: shaped like ``loss``.

    Example:
        >>> import numpy as np
        >>> view = Landscape(alphas=np.array([-1.0, 1.0]), betas=None, loss=np.array([0.5, 0.7]),
        ...                  accuracy=np.array([0.9, 0.8]))
        >>> float(view.alphas[np.argmin(view.loss)])
        -1.0
    """

    alphas: np.ndarray
    betas: np.ndarray | None
    loss: np.ndarray
    accuracy: np.ndarray


def _check_axis(a, name: str) -> np.ndarray:
    a = np.asarray(a, np.float64).ravel()
    if a.size < 2:
        raise ValueError(f"{name} needs at least 2 values, got {a.size}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds non-finite values")
    return a


def loss_curve(model: Model, params: PyTree, direction: PyTree, alphas, data, **eval_kwargs) -> Landscape:
    """1-D loss curve ``L(θ + α d)`` over ``alphas`` (Chen et al. 2021, §4.1 and Fig. 5).

    Args:
      model: the :class:`~mclandscape.engine.models.Model`.
      params: the centre ``θ`` (the ``params`` collection).
      direction: ``d``, shaped like ``params`` (e.g. :func:`random_direction`).
      alphas: at least 2 finite values.
      data: a Dataset or ``(x, y)``.
      **eval_kwargs: for :func:`mclandscape.engine.evaluate.evaluate`: ``batch_size``, ``strategy``,
        ``chunk_size``, ``bn_data`` (BatchNorm models: statistics recomputed per point), ``variables``,
        ``stem``, ``compute_dtype``, ...

    Returns:
      A :class:`Landscape` with ``loss``/``accuracy`` ``[A]``. Memory does not grow with the number of points
      (rows ``[1, α]`` over ``[θ, d]``, formed point by point).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from mclandscape.engine.models import get_model
        >>> model = get_model("mlp", widths=(4,), num_classes=3)
        >>> x, y = jax.random.normal(jax.random.key(0), (16, 5)), jnp.arange(16) % 3
        >>> params = model.init(jax.random.key(1), x)["params"]
        >>> from mclandscape.core.losses import cross_entropy
        >>> curve = loss_curve(model, params, random_direction(jax.random.key(2), params), [-1.0, 0.0, 1.0], (x, y))
        >>> at_centre = cross_entropy(model.apply({"params": params}, x), y).mean()
        >>> curve.loss.shape, bool(abs(curve.loss[1] - at_centre) < 1e-5)
        ((3,), True)
    """
    return _view(model, params, [direction], [alphas], data, eval_kwargs)


def _view(model: Model, params: PyTree, dirs: list, axes: list, data, eval_kwargs: dict) -> Landscape:
    """:func:`~mclandscape.engine.evaluate.evaluate` on the line or plane of ``dirs`` over ``axes``."""
    axes = [_check_axis(x, name) for x, name in zip(axes, ("alphas", "betas"), strict=False)]
    for name, d in zip(("direction", "d2") if len(dirs) == 1 else ("d1", "d2"), dirs, strict=False):
        check_same_structure(params, d, names=("params", name), check_dtype=False)
    dirs = [_as_dtype_of(d, params) for d in dirs]
    pts = plane_points(params, dirs[0], dirs[1] if len(dirs) > 1 else None, *axes)
    m = evaluate(model, pts, data, **eval_kwargs)
    shape = tuple(x.size for x in axes)
    return Landscape(alphas=axes[0], betas=axes[1] if len(axes) > 1 else None,
                     loss=np.asarray(m.loss).reshape(shape), accuracy=np.asarray(m.accuracy).reshape(shape))


def loss_plane(model: Model, params: PyTree, d1: PyTree, d2: PyTree, alphas, betas, data,
               **eval_kwargs) -> Landscape:
    """2-D loss surface ``L(θ + α d1 + β d2)`` on the grid ``alphas × betas`` (Li et al. 2018).

    Args:
      model, params, data, eval_kwargs: as for :func:`loss_curve`.
      d1, d2: the two directions (e.g. :func:`random_directions`).
      alphas, betas: at least 2 finite values each.

    Returns:
      A :class:`Landscape` with ``loss``/``accuracy`` ``[A, B]`` (alpha major). The grid is
      :func:`~mclandscape.engine.points.plane_points` (rows ``[1, α, β]`` over ``[θ, d1, d2]``), evaluated
      by the one evaluator: memory holds three trees and a chunk of points, whatever the grid size.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from mclandscape.engine.models import get_model
        >>> model = get_model("mlp", widths=(4,), num_classes=3)
        >>> x, y = jax.random.normal(jax.random.key(0), (16, 5)), jnp.arange(16) % 3
        >>> params = model.init(jax.random.key(1), x)["params"]
        >>> d1, d2 = random_directions(jax.random.key(2), params)
        >>> plane = loss_plane(model, params, d1, d2, [-0.5, 0.5], [-0.5, 0.0, 0.5], (x, y))
        >>> plane.loss.shape, plane.accuracy.shape, bool((plane.accuracy >= 0).all())
        ((2, 3), (2, 3), True)
    """
    return _view(model, params, [d1, d2], [alphas, betas], data, eval_kwargs)
