"""Bézier-surface mode connectivity: training, evaluating and using n x m Bézier surfaces.

The Bézier-surface paper (Anonymous, 2024, "Revisiting mode connectivity in neural networks with Bézier
surface"); equation, algorithm and appendix numbers below are that paper's.

A surface is a :class:`~mclandscape.core.connectors.Connector` of kind ``"surface"`` with an ``(n+1) x (m+1)``
control grid ``theta_ij`` (flat index ``k = i (m+1) + j``; ``i`` runs along ``u``), its four corners fixed
(four trained networks) and the other control points initialised bilinearly
(:func:`mclandscape.core.connectors.bezier_surface`, Algorithm 2 lines 1-6). Its points are

    phi(u, v) = sum_i sum_j B_{i,n}(u) B_{j,m}(v) theta_ij                                   (eq. 6)

Training (:func:`train_surface`) follows the three-phase "outer-to-inner" schedule of Algorithms 1 and 2,
each phase minimising the mini-batch estimate of a uniform-average loss over ``k`` sampled points
(eq. 9-10), all ``k`` points evaluated on the same batch in one vectorised step and one optimizer update per
batch, through :func:`mclandscape.engine.connector_train.train_connector`:

- **Phase 1** (E1 epochs; Alg. 1 lines 2-4, Alg. 2 lines 8-16): the two edge curves ``u = 0`` and ``u = 1``,
  ``phi(0, v) = sum_j B_{j,m}(v) theta_0j`` and ``phi(1, v) = sum_j B_{j,m}(v) theta_nj``. Points
  ``(u, v)`` with ``u`` alternating over {0, 1} (random start) and ``v ~ U[0, 1]`` (Alg. 2 line 14 sums both
  edges at each sampled ``v``; Alg. 1 line 3 writes "sample u" where the edges vary ``v``). Trainable:
  ``theta_0j`` and ``theta_nj`` for ``0 < j < m`` — the only control points these curves depend on, corners
  excluded (§4.2 "Phase 1").
- **Phase 2** (E2 epochs; Alg. 1 lines 5-7, Alg. 2 lines 17-26): the family of u-direction curves
  ``C_j(u) = sum_i B_{i,n}(u) theta_ij`` for every fixed ``j = 0..m`` — the inner sums of eq. 5, Bézier
  curves in ``u`` from ``theta_0j`` to ``theta_nj``. For ``0 < j < m`` they are *not* curves on the surface
  (``phi(u, v) = sum_j B_{j,m}(v) C_j(u)``), so their points are given as pairs ``(u, j)`` (``j`` stored as a
  float) with their own coefficients (:func:`curve_family_coefficients`). ``u ~ U[0, 1]``; ``j`` runs over
  ``0..m`` stratified (random start, then cyclic), so each batch covers all curves once ``k >= m+1`` as in
  Alg. 2 lines 20-24. Trainable: ``theta_ij`` for ``0 < i < n`` and all ``j`` — the inner control points of
  each curve; the curve end points ``theta_0j``, ``theta_nj`` were shaped in phase 1 and stay fixed.
  **A slip in the paper**: Alg. 2 line 25 repeats line 15's "for each learnable theta_ij, i in {0, n}"; taken
  literally phase 2 would move only the phase-1 points, leave every inner curve control point (including
  the inner points ``theta_i0``, ``theta_im`` of the edges v = 0 and v = 1) untrained until phase 3, and
  contradict §4.2's "optimize the control points along the curves". We implement the evident intent
  ``i in {1, ..., n-1}`` (``tests/test_surface.py::test_phase_masks_and_line25_slip`` shows the slip).
  Also Alg. 1 line 7 writes ``j in {0, ..., n-1}`` and Alg. 2 line 21 mixes indices
  (``theta_0n B_{n,m}``); the curve family above is what both describe.
- **Phase 3** (E3 epochs; Alg. 1 lines 8-10, Alg. 2 lines 27-34): the whole surface, ``(u, v) ~ U[0, 1]^2``;
  trainable: every non-corner control point.

Every phase evaluates exactly ``k`` points per batch (so steps cost the same in every phase). Control points
a phase does not train stay bit-identical (the trainer's mask), and the corners never move. Each phase has
its own optimizer state and learning-rate schedule, and its own checkpoint directory
(``checkpoint_dir/phase{1,2,3}``): calling :func:`train_surface` again with the same ``checkpoint_dir``
skips finished phases (restoring their result) and resumes the interrupted one after its last saved epoch.

Beyond the paper: the area-weighted objective of eq. 7-8 made exact (``objective="area"``, phase 3). The
tangents ``phi_u = sum_k a_k(u, v) theta_k`` and ``phi_v = sum_k b_k(u, v) theta_k`` are fixed linear
combinations of the control points (derivative coefficients ``a``, ``b``), so with the Gram matrix
``G = Theta Theta^T`` of the control points (centred on their mean: ``a`` and ``b`` sum to zero, so centring
changes nothing but the rounding) the area element of the parameter-space surface is

    |phi_u x phi_v| = sqrt(|phi_u|^2 |phi_v|^2 - (phi_u . phi_v)^2)
                    = sqrt((a^T G a)(b^T G b) - (a^T G b)^2)                                 (eq. 8 numerator)

at a cost of one K x K Gram matrix per step, for any parameter dimension. ``q_uv`` (eq. 8) divides it by the
surface area ``Z`` (Gauss-Legendre quadrature of the same formula). Two estimators of eq. 7:

- ``area_estimator="importance"``: uniform samples weighted by ``w = |phi_u x phi_v| / Z`` (unbiased:
  ``E_U[w L] = E_q[L]``);
- ``area_estimator="sample"``: samples drawn from a piecewise-constant approximation ``p`` of ``q_uv``
  (the area element at the centres of ``cells x cells`` cells, mixed with ``proposal_mix`` of the uniform
  density so ``p > 0`` everywhere), rebuilt from the current surface every ``proposal_refresh`` epochs,
  with the exact correction ``w = q_uv / p`` (close to 1), so the estimate stays unbiased.

``area_gradient="full"`` differentiates through ``q_uv`` (the exact gradient of eq. 7, including how moving
control points redistributes area); ``"fixed"`` treats the weights as constants at the current surface.

Evaluation and use of a surface: :func:`surface_grid` (train loss / test accuracy over the 11 x 11 grid of
step 0.1 with BatchNorm statistics recomputed per point, Figures 4-5), :func:`subset_approximation`
(appendix B), :func:`merge_best` (model merging, Table 1), :func:`surface_ensembles` (Table 3, through
:mod:`mclandscape.methods.ensemble`), linear surfaces without training (:func:`triangle_points` /
:func:`evaluate_triangle` for §4.1 and Figure 3; the untrained bilinear surface; :func:`trajectory_surface`
for A.2/A.3), and layer-specific optimisation (:func:`layer_mask`, :func:`masked_optimizer`; A.6, Table 4).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import tempfile
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from mclandscape.core.bernstein import bernstein
from mclandscape.core.connectors import Connector, bezier_surface, simplex
from mclandscape.core.losses import cross_entropy
from mclandscape.core.tree import PyTree, tree_gram, tree_path_names
from mclandscape.engine.connector_train import (
    check_batch_size,
    check_connector,
    checkpointed_connector,
    train_connector,
    weight_decay_args,
)
from mclandscape.engine.data import Dataset
from mclandscape.engine.evaluate import evaluate_points
from mclandscape.engine.loop import LoopConfig
from mclandscape.engine.models.base import Model
from mclandscape.engine.points import uv_grid

__all__ = [
    "PHASES",
    "OBJECTIVES",
    "AREA_ESTIMATORS",
    "AREA_GRADIENTS",
    "phase_trainable",
    "phase_sampler",
    "curve_family_coefficients",
    "control_gram",
    "area_element",
    "surface_area",
    "area_density",
    "area_weights",
    "area_proposal",
    "layer_mask",
    "masked_optimizer",
    "SurfaceTrainResult",
    "train_surface",
    "SurfaceGrid",
    "surface_grid",
    "extrema",
    "subset_approximation",
    "merge_best",
    "corner_indices",
    "surface_ensembles",
    "triangle_points",
    "TriangleResult",
    "evaluate_triangle",
    "trajectory_surface",
]

PHASES = (1, 2, 3)
OBJECTIVES = ("uniform", "area")
AREA_ESTIMATORS = ("importance", "sample")
AREA_GRADIENTS = ("full", "fixed")


# ---------------------------------------------------------------------------------------------------------
# phases: masks, samplers, the phase-2 curve family
# ---------------------------------------------------------------------------------------------------------


def _grid_shape(shape: Sequence[int]) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or shape[0] < 2 or shape[1] < 2:
        raise ValueError(f"a surface control grid needs shape (n+1, m+1) with n, m >= 1, got {shape}")
    return shape


def _check_phase(phase) -> int:
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    return int(phase)


def phase_trainable(shape: Sequence[int], phase: int) -> np.ndarray:
    """Boolean mask ``[(n+1)(m+1)]`` of the control points phase ``phase`` trains (see the module docstring).

    Phase 1: ``theta_0j``, ``theta_nj`` with ``0 < j < m``; phase 2: ``theta_ij`` with ``0 < i < n``, all
    ``j`` (Alg. 2 line 25 read as ``i in {1..n-1}``); phase 3: all but the four corners. Phases 1 and 2 are
    disjoint and together cover every non-corner point. Combine with a connector's own mask by ``&``.

    Args:
      shape: the control grid ``(n+1, m+1)``, n, m >= 1.
      phase: 1, 2 or 3.

    Returns:
      A boolean NumPy array, u-major (index ``i (m+1) + j``).

    Example:
        >>> phase_trainable((3, 3), 1).reshape(3, 3).astype(int).tolist()
        [[0, 1, 0], [0, 0, 0], [0, 1, 0]]
        >>> phase_trainable((3, 3), 2).reshape(3, 3).astype(int).tolist()
        [[0, 0, 0], [1, 1, 1], [0, 0, 0]]
    """
    n1, m1 = _grid_shape(shape)
    phase = _check_phase(phase)
    n, m = n1 - 1, m1 - 1
    t = np.zeros((n1, m1), dtype=bool)
    if phase == 1:
        t[[0, n], 1:m] = True
    elif phase == 2:
        t[1:n, :] = True
    else:
        t[:, :] = True
        t[0, 0] = t[0, m] = t[n, 0] = t[n, m] = False
    return t.reshape(-1)


@struct.dataclass
class PhaseSampler:
    """``sampler(key, k) -> points [k, 2]`` of one training phase (see :func:`phase_sampler`)."""

    shape: tuple[int, int] = struct.field(pytree_node=False)
    phase: int = struct.field(pytree_node=False)

    @staticmethod
    def _stratified(key, k, count):
        ko, kv = jax.random.split(key)
        off = jax.random.randint(ko, (), 0, count)
        idx = (off + jnp.arange(k)) % count
        v = jax.random.uniform(kv, (k,))  # the default float: float64 under jax_enable_x64
        return idx.astype(v.dtype), v

    def __call__(self, key, k):
        if self.phase == 1:
            u, v = self._stratified(key, k, 2)
            return jnp.stack([u, v], axis=1)
        if self.phase == 2:
            j, u = self._stratified(key, k, self.shape[1])
            return jnp.stack([u, j], axis=1)
        return jax.random.uniform(key, (k, 2))


def phase_sampler(shape: Sequence[int], phase: int) -> PhaseSampler:
    """``sampler(key, k) -> points [k, 2]`` of phase ``phase`` (jittable).

    Phase 1: ``(u, v)`` with ``u`` alternating over {0, 1} from a random start and ``v ~ U[0, 1]``.
    Phase 2: ``(u, j)`` with ``u ~ U[0, 1]`` and curve index ``j`` cycling over ``0..m`` from a random start
    (use with :func:`curve_family_coefficients`). Phase 3: ``(u, v) ~ U[0, 1]^2``.

    Args:
      shape: the control grid ``(n+1, m+1)``.
      phase: 1, 2 or 3.

    Returns:
      A :class:`PhaseSampler` (points in the default float dtype: float64 under ``jax_enable_x64``).

    Example:
        >>> import jax
        >>> pts = phase_sampler((3, 3), 1)(jax.random.key(0), 4)
        >>> pts.shape, sorted(set(pts[:, 0].tolist()))
        ((4, 2), [0.0, 1.0])
    """
    return PhaseSampler(_grid_shape(shape), _check_phase(phase))


@struct.dataclass
class CurveFamilyCoefficients:
    """Coefficients ``[P, K]`` of the phase-2 curves at points ``(u, j)`` (see :func:`curve_family_coefficients`)."""

    shape: tuple[int, int] = struct.field(pytree_node=False)

    def __call__(self, points):
        n1, m1 = self.shape
        pts = _uv_points(points)
        bu = bernstein(pts[:, 0], n1 - 1)
        oh = jax.nn.one_hot(jnp.round(pts[:, 1]).astype(jnp.int32), m1, dtype=bu.dtype)
        return (bu[:, :, None] * oh[:, None, :]).reshape(pts.shape[0], n1 * m1)


def curve_family_coefficients(shape: Sequence[int]) -> CurveFamilyCoefficients:
    """Coefficients ``[P, K]`` of the phase-2 curves ``C_j(u) = sum_i B_{i,n}(u) theta_ij`` at points ``(u, j)``.

    Row ``p`` holds ``B_{i,n}(u_p)`` at index ``i (m+1) + j_p`` and zeros elsewhere (``j`` is rounded to the
    nearest integer; it must lie in ``0..m``, which :func:`phase_sampler` guarantees).

    Args:
      shape: the control grid ``(n+1, m+1)``.

    Returns:
      A :class:`CurveFamilyCoefficients`, ``coefficients(points [P, 2]) -> [P, K]`` (jittable).

    Example:
        >>> import jax.numpy as jnp
        >>> c = curve_family_coefficients((2, 2))(jnp.array([[0.25, 1.0]]))
        >>> c.tolist()  # the curve j = 1 from theta_01 to theta_11 at u = 0.25
        [[0.0, 0.75, 0.0, 0.25]]
    """
    return CurveFamilyCoefficients(_grid_shape(shape))


# ---------------------------------------------------------------------------------------------------------
# the exact area element (eq. 7-8)
# ---------------------------------------------------------------------------------------------------------


def _uv_points(points) -> jax.Array:
    """``points`` as a floating ``[P, 2]`` array (ValueError for another shape; nothing is reshaped silently)."""
    pts = jnp.asarray(points)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"surface points must have shape [P, 2] (one row (u, v) per point), got shape {pts.shape}")
    return pts if jnp.issubdtype(pts.dtype, jnp.floating) else pts.astype(jnp.float32)


def _check_surface(connector: Connector) -> None:
    if not isinstance(connector, Connector) or connector.kind != "surface":
        kind = getattr(connector, "kind", type(connector).__name__)
        raise ValueError(f"expected a Bézier surface connector (kind 'surface'), got {kind!r}")


def _control_gram(connector: Connector) -> jax.Array:
    def centre(x):
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        return x - jnp.mean(x, axis=0, keepdims=True)

    return tree_gram(jax.tree_util.tree_map(centre, connector.control))


def control_gram(connector: Connector) -> jax.Array:
    """Gram matrix ``[K, K]`` of the control points centred on their mean (float32 or wider; jittable).

    Derivative coefficients sum to zero, so ``a^T G a`` equals the uncentred value; centring avoids the
    cancellation of large parameter norms.

    Args:
      connector: a surface.

    Returns:
      ``G[k, l] = <theta_k - mean, theta_l - mean>`` in the control points' precision (at least float32).

    Example:
        >>> import jax.numpy as jnp
        >>> from mclandscape.core.connectors import bilinear_surface
        >>> sq = bilinear_surface(*[{"w": jnp.array(c)} for c in ([0., 0.], [0., 1.], [1., 0.], [1., 1.])])
        >>> control_gram(sq).shape
        (4, 4)
    """
    _check_surface(connector)
    return _control_gram_jit(connector)


def _safe_sqrt(x):
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def _area_from_gram(connector: Connector, points, gram) -> jax.Array:
    du, dv = connector.derivative_coefficients(points)
    g = gram.astype(jnp.promote_types(gram.dtype, du.dtype))
    hi = jax.lax.Precision.HIGHEST
    gu = jnp.matmul(du.astype(g.dtype), g, precision=hi)
    gv = jnp.matmul(dv.astype(g.dtype), g, precision=hi)
    uu = jnp.sum(gu * du, axis=-1)
    vv = jnp.sum(gv * dv, axis=-1)
    uv = jnp.sum(gu * dv, axis=-1)
    return _safe_sqrt(uu * vv - uv * uv)


_control_gram_jit = jax.jit(_control_gram)
_area_jit = jax.jit(_area_from_gram)


def area_element(connector: Connector, points, *, gram=None) -> jax.Array:
    """``|phi_u x phi_v|`` at points ``[P, 2]`` (eq. 8 numerator), exact, from the Gram matrix (jittable).

    Args:
      connector: a surface.
      points: ``[P, 2]`` (u, v) pairs (a 1-D array raises: nothing is reshaped).
      gram: :func:`control_gram` of ``connector`` (default: computed); pass it to reuse one matrix.

    Returns:
      ``[P]`` area elements in the Gram matrix's precision.

    Example:
        >>> import jax.numpy as jnp
        >>> from mclandscape.core.connectors import bilinear_surface
        >>> sq = bilinear_surface(*[{"w": jnp.array(c)} for c in ([0., 0.], [0., 1.], [1., 0.], [1., 1.])])
        >>> area_element(sq, jnp.array([[0.2, 0.7], [0.5, 0.5]])).round(6).tolist()  # the unit square
        [1.0, 1.0]
    """
    _check_surface(connector)
    gram = _control_gram_jit(connector) if gram is None else gram
    return _area_jit(connector, _uv_points(points).astype(gram.dtype), gram)


def _gauss_legendre_grid(q: int) -> tuple[np.ndarray, np.ndarray]:
    if int(q) != q or q < 1:
        raise ValueError(f"quadrature order must be an integer >= 1, got {q!r}")
    x, w = np.polynomial.legendre.leggauss(int(q))
    x, w = (x + 1.0) / 2.0, w / 2.0
    uu, vv = np.meshgrid(x, x, indexing="ij")
    # float64 on the host: each use casts them to the control points' precision
    return np.stack([uu.ravel(), vv.ravel()], 1), np.outer(w, w).ravel()


def surface_area(connector: Connector, *, quadrature: int = 24, gram=None) -> jax.Array:
    """``Z = int_0^1 int_0^1 |phi_u x phi_v| du dv`` (eq. 8 normaliser) by ``quadrature``^2-point Gauss-Legendre.

    The nodes and weights are float64 on the host and cast to the control points' precision, so a float64
    surface (``jax_enable_x64``) gets a float64 area.

    Args:
      connector: a surface.
      quadrature: Gauss-Legendre points per axis (>= 1).
      gram: :func:`control_gram` of ``connector`` (default: computed).

    Returns:
      A scalar array.

    Example:
        >>> import jax.numpy as jnp
        >>> from mclandscape.core.connectors import bilinear_surface
        >>> half = bilinear_surface(*[{"w": jnp.array(c)} for c in ([0., 0.], [0., 0.5], [1., 0.], [1., 0.5])])
        >>> round(float(surface_area(half, quadrature=4)), 6)
        0.5
    """
    _check_surface(connector)
    pts, w = _gauss_legendre_grid(quadrature)
    gram = _control_gram_jit(connector) if gram is None else gram
    return jnp.sum(jnp.asarray(w, gram.dtype) * _area_jit(connector, jnp.asarray(pts, gram.dtype), gram))


def area_density(connector: Connector, points, *, quadrature: int = 24) -> jax.Array:
    """``q_uv(u, v)`` of eq. 8 at points ``[P, 2]``: area element over the surface area.

    Args:
      connector: a surface of positive area.
      points: ``[P, 2]`` (u, v) pairs.
      quadrature: Gauss-Legendre points per axis for the area.

    Returns:
      ``[P]`` densities (they integrate to 1 over the unit square).

    Example:
        >>> import jax.numpy as jnp
        >>> from mclandscape.core.connectors import bilinear_surface
        >>> half = bilinear_surface(*[{"w": jnp.array(c)} for c in ([0., 0.], [0., 0.5], [1., 0.], [1., 0.5])])
        >>> area_density(half, jnp.array([[0.3, 0.3]]), quadrature=4).round(6).tolist()
        [1.0]
    """
    gram = _control_gram_jit(connector)
    z = surface_area(connector, quadrature=quadrature, gram=gram)
    if not np.isfinite(float(z)) or float(z) <= 0:
        raise ValueError(f"the surface has area {float(z)!r}: q_uv is undefined for a degenerate surface")
    return area_element(connector, points, gram=gram) / z


@struct.dataclass(eq=False)  # holds arrays: hashed by identity, like a jax.Array
class ProposalDensity:
    """``p(points)``: the piecewise-constant density of an :func:`area_proposal` (``cells x cells`` cells)."""

    density: jax.Array
    cells: int = struct.field(pytree_node=False)

    def __call__(self, points):
        c = self.cells
        pts = _uv_points(points)
        ij = jnp.clip(jnp.floor(pts * c).astype(jnp.int32), 0, c - 1)
        return self.density[ij[:, 0] * c + ij[:, 1]]


@struct.dataclass(eq=False)  # holds arrays: hashed by identity, like a jax.Array
class ProposalSampler:
    """``sampler(key, k)``: a cell drawn by its mass, then a uniform point inside it (:func:`area_proposal`)."""

    log_mass: jax.Array
    cells: int = struct.field(pytree_node=False)

    def __call__(self, key, k):
        c = self.cells
        kc, kj = jax.random.split(key)
        idx = jax.random.categorical(kc, self.log_mass, shape=(k,))
        jit = jax.random.uniform(kj, (k, 2))
        cell = jnp.stack([idx // c, idx % c], axis=1).astype(jit.dtype)
        return (cell + jit) / c


@struct.dataclass(eq=False)  # holds arrays: hashed by identity, like a jax.Array
class AreaWeights:
    """``point_weights(connector, points) -> w[k]``: ``w = q_uv(points) / p(points)`` (see :func:`area_weights`)."""

    nodes: jax.Array
    node_weights: jax.Array
    gradient: str = struct.field(pytree_node=False)
    proposal: ProposalDensity | None = None

    def __call__(self, connector, points):
        gram = _control_gram(connector)
        pts = _uv_points(points).astype(gram.dtype)
        z = jnp.sum(self.node_weights.astype(gram.dtype) * _area_from_gram(connector, self.nodes.astype(gram.dtype),
                                                                            gram))
        w = _area_from_gram(connector, pts, gram) / z
        if self.proposal is not None:
            w = w / self.proposal(pts)
        return jax.lax.stop_gradient(w) if self.gradient == "fixed" else w


def area_weights(*, quadrature: int = 24, gradient: str = "full",
                 proposal: ProposalDensity | None = None) -> AreaWeights:
    """``point_weights(connector, points) -> w[k]`` for the trainer: ``w = q_uv(points) / p(points)``.

    ``p`` is the sampling density (``None``: uniform, ``p = 1``; importance weights). With ``gradient="full"``
    the weights are differentiated (exact gradient of eq. 7); ``"fixed"`` stops their gradient.

    Args:
      quadrature: Gauss-Legendre points per axis for the area ``Z``.
      gradient: ``"full"`` or ``"fixed"``.
      proposal: the density of :func:`area_proposal` the points are drawn from (``None``: uniform).

    Returns:
      An :class:`AreaWeights` (the weights follow the control points' precision).

    Example:
        >>> import jax.numpy as jnp
        >>> from mclandscape.core.connectors import bilinear_surface
        >>> sq = bilinear_surface(*[{"w": jnp.array(c)} for c in ([0., 0.], [0., 1.], [1., 0.], [1., 1.])])
        >>> area_weights(quadrature=4)(sq, jnp.array([[0.1, 0.9]])).round(6).tolist()
        [1.0]
    """
    if gradient not in AREA_GRADIENTS:
        raise ValueError(f"area gradient must be one of {AREA_GRADIENTS}, got {gradient!r}")
    pts_q, w_q = _gauss_legendre_grid(quadrature)
    return AreaWeights(nodes=jnp.asarray(pts_q), node_weights=jnp.asarray(w_q), gradient=gradient, proposal=proposal)


def area_proposal(connector: Connector, *, cells: int = 32, mix: float = 0.1
                  ) -> tuple[ProposalSampler, ProposalDensity]:
    """A piecewise-constant approximation ``p`` of ``q_uv`` of the current surface: ``(sampler, density)``.

    Cell masses are the area element at the centres of ``cells x cells`` cells, normalised, mixed with
    ``mix`` of the uniform distribution (``0 < mix <= 1`` keeps ``p > 0`` everywhere). ``sampler(key, k)``
    draws a cell by its mass and a uniform point inside it; ``density(points)`` is ``p`` at the points.

    Args:
      connector: a surface.
      cells: cells per axis (>= 1).
      mix: the uniform share, in (0, 1].

    Returns:
      ``(ProposalSampler, ProposalDensity)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from mclandscape.core.connectors import bilinear_surface
        >>> sq = bilinear_surface(*[{"w": jnp.array(c)} for c in ([0., 0.], [0., 1.], [1., 0.], [1., 1.])])
        >>> sampler, density = area_proposal(sq, cells=4)
        >>> sampler(jax.random.key(0), 3).shape, density(jnp.array([[0.5, 0.5]])).round(6).tolist()
        ((3, 2), [1.0])
    """
    _check_surface(connector)
    if int(cells) != cells or cells < 1:
        raise ValueError(f"cells must be an integer >= 1, got {cells!r}")
    if not 0.0 < mix <= 1.0:
        raise ValueError(f"mix must lie in (0, 1] so the proposal covers the whole square, got {mix!r}")
    c = int(cells)
    mid = (np.arange(c) + 0.5) / c
    uu, vv = np.meshgrid(mid, mid, indexing="ij")
    a = np.asarray(area_element(connector, np.stack([uu.ravel(), vv.ravel()], 1)), np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError("the area element is not finite on the surface (non-finite control points?)")
    total = a.sum()
    mass = (1 - mix) * a / total + mix / c**2 if total > 0 else np.full(c * c, 1.0 / c**2)
    mass = mass / mass.sum()
    dt = connector._float_dtype()
    return (ProposalSampler(log_mass=jnp.asarray(np.log(mass), dt), cells=c),
            ProposalDensity(density=jnp.asarray(mass * c * c, dt), cells=c))


# ---------------------------------------------------------------------------------------------------------
# layer-specific optimisation (A.6, Table 4)
# ---------------------------------------------------------------------------------------------------------


def layer_mask(params: PyTree, pattern: str) -> PyTree:
    """Pytree of Python bools shaped like ``params``: True where the leaf path matches the regex ``pattern``.

    Paths read like ``['conv2']['kernel']`` (:func:`mclandscape.core.tree.tree_path_names`); ``re.search`` is
    used, so ``"conv2|fc|head"`` selects the last convolution and the dense layers of ``simple_cnn``.

    Args:
      params: one parameter pytree.
      pattern: a regular expression.

    Returns:
      A pytree of bools.

    Raises:
      ValueError: an invalid pattern, or one matching no parameter (the message lists the paths).

    Example:
        >>> import jax.numpy as jnp
        >>> layer_mask({"body": {"kernel": jnp.zeros(2)}, "head": {"kernel": jnp.zeros(2)}}, "head")
        {'body': {'kernel': False}, 'head': {'kernel': True}}
    """
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"invalid layer pattern {pattern!r}: {e}") from e
    leaves, treedef = jax.tree_util.tree_flatten(params)
    paths = tree_path_names(params)
    flags = [bool(rx.search(p)) for p in paths]
    if not any(flags):
        raise ValueError(f"layer pattern {pattern!r} matches no parameter; paths are {paths}")
    return jax.tree_util.tree_unflatten(treedef, flags)


def masked_optimizer(optimizer: optax.GradientTransformation, mask: PyTree) -> optax.GradientTransformation:
    """``optimizer`` on leaves where ``mask`` is True, zero updates elsewhere (frozen leaves stay bit-identical).

    ``optax.masked`` alone would pass the raw gradient through on unmasked leaves; this uses
    ``optax.multi_transform`` with ``optax.set_to_zero`` instead.

    Args:
      optimizer: the optax transformation for the trained leaves.
      mask: a pytree of bools (e.g. :func:`layer_mask`).

    Returns:
      An optax transformation.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> p = {"a": jnp.ones(1), "b": jnp.ones(1)}
        >>> tx = masked_optimizer(optax.sgd(1.0), {"a": True, "b": False})
        >>> u, _ = tx.update({"a": jnp.ones(1), "b": jnp.ones(1)}, tx.init(p), p)
        >>> u["a"].tolist(), u["b"].tolist()
        ([-1.0], [0.0])
    """
    labels = jax.tree_util.tree_map(lambda f: "train" if f else "freeze", mask)
    return optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)


# ---------------------------------------------------------------------------------------------------------
# training (Algorithms 1 and 2)
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SurfaceTrainResult:
    """Outcome of :func:`train_surface`.

    Attributes:
      connector: the trained surface.
      history: per phase, one record per epoch (``{"epoch", "objective", "loss", "grad_norm", "seconds"}``,
        ``epoch`` from 1 within the phase).
      wall_time: per phase, seconds (summed over the epochs, including resumed runs).
      trained: per phase, the control-point indices it trained.
      skipped: per skipped phase, why.
    """

    connector: Connector
    history: dict[int, list[dict]]
    wall_time: dict[int, float]
    trained: dict[int, list[int]]
    skipped: dict[int, str]

    @property
    def phase(self) -> int | None:
        """The phase of the newest history record (``None`` before any epoch)."""
        done = [p for p, h in self.history.items() if h]
        return max(done) if done else None


@functools.lru_cache(maxsize=64)
def _default_optimizer(lr: float, momentum: float, schedule: str, steps: int) -> optax.GradientTransformation:
    # cached by value: a second train_surface with the same settings reuses the compiled steps
    if schedule == "cosine":
        lr_s = optax.cosine_decay_schedule(lr, max(steps, 1))
    elif schedule == "constant":
        lr_s = lr
    else:
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    return optax.sgd(lr_s, momentum=momentum or None)


@functools.lru_cache(maxsize=64)
def _masked_cached(opt: optax.GradientTransformation, treedef, flags: tuple) -> optax.GradientTransformation:
    return masked_optimizer(opt, jax.tree_util.tree_unflatten(treedef, list(flags)))


def _clean(history) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "acc"} for h in history]


def train_surface(model: Model, surface: Connector, train, *, epochs: Sequence[int] = (2, 2, 6),
                  batch_size: int = 128, lr: float = 0.05, momentum: float = 0.9,
                  optimizer: optax.GradientTransformation | Callable[[int, int], optax.GradientTransformation]
                  | None = None, schedule: str = "cosine", weight_decay: float = 0.0,
                  weight_decay_on: str = "control", num_samples: int = 8, loss_fn: Callable = cross_entropy,
                  seed: int = 0, augment: bool = False, strategy: str | None = None,
                  checkpoint_dir: str | os.PathLike | None = None, keep: int = 1, overwrite: bool = False,
                  progress: bool | None = None, callback: Callable[[int, SurfaceTrainResult], None] | None = None,
                  devices: int | None = None, objective: str = "uniform", area_estimator: str = "importance",
                  area_gradient: str = "full", area_quadrature: int = 24, proposal_cells: int = 32,
                  proposal_mix: float = 0.1, proposal_refresh: int = 1, layers: str | None = None
                  ) -> SurfaceTrainResult:
    """Train a Bézier surface with the three-phase outer-to-inner schedule (Bézier-surface paper, Alg. 1-2, eq. 9-10).

    Same calling convention and shared keywords as :func:`mclandscape.methods.curves.train_curve`:
    ``(model, connector, train, *, ...)``.

    Args:
      model: the :class:`~mclandscape.engine.models.Model` (trained in train mode).
      surface: the surface, e.g. ``mcl.bezier_surface(c00, c01, c10, c11, n=2, m=2)`` (corners fixed,
        other control points bilinear), or a surface trained before.
      train: the training :class:`~mclandscape.engine.data.Dataset`.
      epochs: ``(E1, E2, E3)``; a phase with 0 epochs, or with no trainable control point for this grid
        (phase 1 when m = 1, phase 2 when n = 1), is skipped and reported in ``skipped``.
      batch_size: examples per batch, in ``[1, len(train)]``.
      lr, momentum, schedule: the default optimizer, SGD(``lr``, ``momentum``) with a per-phase ``schedule``
        (``"cosine"`` or ``"constant"``).
      optimizer: an optax transformation (a fresh state per phase), a callable ``(phase, steps_in_phase) ->
        transformation``, or ``None`` for the default.
      weight_decay, weight_decay_on: ``(wd/2) sum |theta_k|^2`` over the trainable control points
        (``"control"``) or ``(wd/2) |phi(u, v)|^2`` at the sampled points (``"point"``).
      num_samples: ``k``, the points evaluated together per batch (the paper uses 80).
      loss_fn: per-example loss ``(logits, y) -> [N]``.
      seed: batch order, point samples and dropout (each phase derives its own).
      augment: random crops and flips of image batches.
      strategy: how the ``k`` points are evaluated (:mod:`mclandscape.engine.connector_train`).
      checkpoint_dir, keep, overwrite: per-phase checkpoints (``phase1``, ``phase2``, ``phase3``) at every epoch
        end (the last ``keep`` stay); a second call with the same directory and the same run (surface, data,
        model and every argument) skips finished phases and resumes, a different run is refused;
        ``overwrite=True`` starts afresh.
      progress: a progress bar per phase (``None``: when stderr is a terminal).
      callback: ``callback(epoch, result)`` after every epoch: ``epoch`` from 1 within the phase (as in
        ``history``), ``result`` a :class:`SurfaceTrainResult` as of that epoch (``result.phase`` is the
        phase). Raising :class:`~mclandscape.engine.loop.StopRun` ends training there; the later phases are
        reported in ``skipped``.
      devices: how many devices each step runs on (see :func:`mclandscape.engine.connector_train.train_connector`).
      objective: ``"uniform"`` (eq. 9) or ``"area"`` (eq. 7-8 in phase 3; phases 1-2 train curves and use
        eq. 9 for both); ``area_estimator``, ``area_gradient``, ``area_quadrature``, ``proposal_cells``,
        ``proposal_mix``, ``proposal_refresh``: see the module docstring.
      layers: a regex on parameter paths (:func:`layer_mask`); only matching leaves are trained, the others
        keep their bilinear initialisation (appendix A.6, Table 4).

    Returns:
      A :class:`SurfaceTrainResult`.

    Raises:
      TypeError: ``surface`` is not a Connector (e.g. four corners were passed), or ``train`` is not a Dataset.
      ValueError: a bad option.

    Example:
        >>> import jax
        >>> import mclandscape as mcl
        >>> train = mcl.load_dataset("iris", "train")
        >>> model = mcl.get_model("mlp", widths=[4], num_classes=3)
        >>> corners = [model.init(jax.random.key(s), train.x[:1])["params"] for s in range(4)]
        >>> res = train_surface(model, mcl.bezier_surface(*corners, n=2, m=2), train, epochs=(1, 0, 1),
        ...                     num_samples=2, batch_size=60, progress=False)
        >>> sorted(res.history), res.skipped, [r["epoch"] for r in res.history[3]]
        ([1, 3], {2: '0 epochs'}, [1])
    """
    surface = check_connector(surface, ("surface",), "train_surface",
                              build="mcl.bezier_surface(c00, c01, c10, c11, n=2, m=2)")
    if not isinstance(train, Dataset):
        raise TypeError(f"train_surface: train must be a Dataset (mcl.load_dataset(...) or mcl.Dataset(x, y, ...)), "
                        f"got {type(train).__name__}")
    shape = _grid_shape(surface.shape)
    try:
        e = [int(x) for x in epochs]
        ok = len(e) == 3 and all(x >= 0 for x in e) and all(x == y and not isinstance(y, bool)
                                                            for x, y in zip(e, epochs, strict=True))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"epochs must be three non-negative integers (E1, E2, E3), got {epochs!r}")
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples (k) must be an integer >= 1, got {num_samples!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if area_estimator not in AREA_ESTIMATORS:
        raise ValueError(f"area_estimator must be one of {AREA_ESTIMATORS}, got {area_estimator!r}")
    if area_gradient not in AREA_GRADIENTS:
        raise ValueError(f"area_gradient must be one of {AREA_GRADIENTS}, got {area_gradient!r}")
    if isinstance(proposal_refresh, bool) or int(proposal_refresh) != proposal_refresh or proposal_refresh < 1:
        raise ValueError(f"proposal_refresh must be an integer >= 1 (epochs), got {proposal_refresh!r}")
    batch_size = check_batch_size(batch_size, len(train))
    wd = weight_decay_args(weight_decay, weight_decay_on)
    steps_per_epoch = len(train) // batch_size
    lmask = layer_mask(jax.tree_util.tree_map(lambda a: a[0], surface.control), layers) if layers else None

    def make_opt(phase: int) -> optax.GradientTransformation:
        steps = steps_per_epoch * e[phase - 1]
        if optimizer is None:
            opt = _default_optimizer(float(lr), float(momentum), schedule, steps)
        elif isinstance(optimizer, optax.GradientTransformation):
            opt = optimizer
        elif callable(optimizer):
            opt = optimizer(phase, steps)
        else:
            raise ValueError(f"optimizer must be an optax GradientTransformation, a callable or None, got {optimizer!r}")
        if lmask is None:
            return opt
        flags, treedef = jax.tree_util.tree_flatten(lmask)
        return _masked_cached(opt, treedef, tuple(flags))

    conn = surface
    history: dict[int, list[dict]] = {}
    wall: dict[int, float] = {}
    trained: dict[int, list[int]] = {}
    skipped: dict[int, str] = {}
    tmp = None
    try:
        for phase in PHASES:
            mask = phase_trainable(shape, phase) & surface.trainable
            if e[phase - 1] == 0:
                skipped[phase] = "0 epochs"
                continue
            if not mask.any():
                skipped[phase] = f"no trainable control point in phase {phase} for a {shape[0]}x{shape[1]} grid"
                continue
            trained[phase] = [int(i) for i in np.flatnonzero(mask)]
            opt = make_opt(phase)
            ckdir = None if checkpoint_dir is None else os.path.join(os.fspath(checkpoint_dir), f"phase{phase}")
            sample = objective == "area" and phase == 3 and area_estimator == "sample"
            hyper = {"phase": phase, "phase_epochs": e, "epochs": e[phase - 1], "objective": objective,
                     "optimizer": "default" if optimizer is None else "custom", "lr": float(lr),
                     "momentum": float(momentum), "schedule": schedule, "layers": layers,
                     "weight_decay_on": weight_decay_on}
            if objective == "area" and phase == 3:
                hyper.update(area_estimator=area_estimator, area_gradient=area_gradient,
                             area_quadrature=int(area_quadrature))
                if sample:
                    hyper.update(proposal_cells=int(proposal_cells), proposal_mix=float(proposal_mix),
                                 proposal_refresh=int(proposal_refresh))
            callbacks = []
            if callback is not None:
                def cb(epoch, st, hist, _phase=phase, _conn=conn):
                    callback(epoch, SurfaceTrainResult(
                        connector=_conn.replace(control=st.params), history={**history, _phase: _clean(hist)},
                        wall_time={**wall, _phase: float(sum(r.get("seconds", 0.0) for r in hist))},
                        trained=dict(trained), skipped=dict(skipped)))

                callbacks.append(cb)
            common = dict(tx=opt, batch_size=batch_size, num_samples=int(num_samples), trainable=mask,
                          seed=seed + 7919 * phase, augment=augment, strategy=strategy, callbacks=callbacks,
                          loss_fn=loss_fn, hyper=hyper, metadata={"phase": phase, "objective": objective},
                          devices=devices, **wd)
            if sample:
                # The proposal follows the surface: rebuilt every proposal_refresh epochs from the current control
                # points. Checkpoints fall on those boundaries, so a resumed run rebuilds the same proposals.
                if ckdir is None:
                    tmp = tempfile.TemporaryDirectory(prefix="mcl_surface_")
                    ckdir = tmp.name
                start = conn
                conn, done = (conn, 0) if overwrite else checkpointed_connector(conn, opt, ckdir)
                res = None
                while res is None or done < e[2]:
                    end = min(e[2], done + int(proposal_refresh))
                    prop_sampler, dens = area_proposal(conn, cells=proposal_cells, mix=proposal_mix)
                    w = area_weights(quadrature=area_quadrature, gradient=area_gradient, proposal=dens)
                    loop = LoopConfig(checkpoint_dir=ckdir, checkpoint_every=int(proposal_refresh), keep=keep,
                                      overwrite=overwrite and res is None, progress=progress,
                                      desc=f"surface phase {phase}")
                    res = train_connector(model, conn, train, epochs=end, sampler=prop_sampler, point_weights=w,
                                          loop=loop, run_start=start, **common)
                    conn, done = res.connector, end
                    if res.stopped is not None:
                        break
            else:
                loop = LoopConfig(checkpoint_dir=ckdir, keep=keep, overwrite=overwrite, progress=progress,
                                  desc=f"surface phase {phase}")
                res = train_connector(model, conn, train, epochs=e[phase - 1], sampler=phase_sampler(shape, phase),
                                      coefficients=curve_family_coefficients(shape) if phase == 2 else None,
                                      point_weights=(area_weights(quadrature=area_quadrature, gradient=area_gradient)
                                                     if objective == "area" and phase == 3 else None),
                                      loop=loop, **common)
                conn = res.connector
            history[phase] = list(res.history)
            wall[phase] = float(sum(r.get("seconds", 0.0) for r in res.history))
            if res.stopped is not None:
                for later in PHASES[phase:]:
                    skipped[later] = f"stopped by the callback after phase {phase}, epoch {res.stopped}"
                break
    finally:
        if tmp is not None:
            tmp.cleanup()
    return SurfaceTrainResult(connector=conn, history=history, wall_time=wall, trained=trained, skipped=skipped)


# ---------------------------------------------------------------------------------------------------------
# evaluation: grids, appendix-B subsets, merging, ensembling
# ---------------------------------------------------------------------------------------------------------


def _xy(data) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(data, "x") and hasattr(data, "y"):
        return np.asarray(data.x), np.asarray(data.y)
    if isinstance(data, tuple | list) and len(data) == 2:
        return np.asarray(data[0]), np.asarray(data[1])
    raise ValueError("data must be a Dataset (with .x and .y) or an (x, y) tuple of arrays")


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
        a = getattr(self, name)
        s = self.steps - 1
        return np.asarray([a[0, 0], a[0, s], a[s, 0], a[s, s]])


def surface_grid(model: Model, connector: Connector, train, test, *, steps: int = 11, batch_size: int = 500,
                 bn_data=None, bn_batches: int | None = None, bn_batch_size: int = 128, return_probs: bool = False,
                 strategy: str = "auto", chunk_size: int | None = None, loss_fn: Callable = cross_entropy,
                 devices: int | None = None, train_eval=None) -> SurfaceGrid:
    """Train and test loss/accuracy over the ``steps x steps`` (u, v) grid (Bézier-surface paper, Figures 4-5).

    Through :func:`mclandscape.engine.evaluate.evaluate_points` (default step 0.1, 11 x 11). BatchNorm
    statistics, as in :func:`mclandscape.methods.curves.evaluate_curve`, are recomputed at every point on
    ``bn_data``, which defaults to ``train``; models without BatchNorm ignore it.

    Args:
      model: the :class:`~mclandscape.engine.models.Model`.
      connector: a surface.
      train: the training data (the default ``bn_data`` and, unless ``train_eval``, the train-loss grid).
      test: the test data.
      steps: grid points per axis (>= 2).
      batch_size: evaluation batch size.
      bn_data, bn_batches, bn_batch_size: the BatchNorm data (default ``train``), how many full batches of
        ``bn_batch_size`` (default all).
      return_probs: keep the test softmax outputs (for :func:`surface_ensembles`).
      strategy, chunk_size, devices: see :func:`mclandscape.engine.evaluate.evaluate`.
      loss_fn: per-example loss.
      train_eval: data for the train-loss grid instead of ``train`` (appendix B: a few batches).

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
    kw = dict(batch_size=batch_size, strategy=strategy, chunk_size=chunk_size, devices=devices, loss_fn=loss_fn,
              bn_data=train if bn_data is None else bn_data, bn_batches=bn_batches, bn_batch_size=bn_batch_size)
    tr = evaluate_points(model, connector, pts, train if train_eval is None else train_eval, **kw)
    te = evaluate_points(model, connector, pts, test, return_probs=return_probs, **kw)
    s = (steps, steps)
    return SurfaceGrid(steps=steps, points=pts, train_loss=tr.loss.reshape(s), train_acc=tr.accuracy.reshape(s),
                       test_loss=te.loss.reshape(s), test_acc=te.accuracy.reshape(s), test_probs=te.probs)


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
    xtr, ytr = _xy(train)
    xte, yte = _xy(test)
    if train_batches < 1:
        raise ValueError(f"train_batches must be >= 1, got {train_batches}")
    ntr = min(len(ytr), train_batches * batch_size)
    nte = max(1, len(yte) // 4) if test_size is None else int(test_size)
    if not 1 <= nte <= len(yte):
        raise ValueError(f"test_size must lie in [1, {len(yte)}], got {test_size}")
    rng = np.random.default_rng(seed)
    itr = rng.permutation(len(ytr))[:ntr]
    ite = rng.permutation(len(yte))[:nte]
    if full is None:
        full = surface_grid(model, connector, train, test, steps=steps, bn_data=bn_data, bn_batches=bn_batches,
                            bn_batch_size=bn_batch_size, strategy=strategy)
    sub = surface_grid(model, connector, train, (xte[ite], yte[ite]), steps=full.steps, bn_data=bn_data,
                       bn_batches=bn_batches, bn_batch_size=bn_batch_size, strategy=strategy,
                       train_eval=(xtr[itr], ytr[itr]))

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
    if int(steps) != steps or steps < 2:
        raise ValueError(f"a triangle grid needs steps >= 2, got {steps!r}")
    s = int(steps) - 1
    pts = [(a, b, s - a - b) for a in range(s + 1) for b in range(s + 1 - a)]
    return np.asarray(pts, dtype=np.float64) / s


@dataclasses.dataclass(frozen=True)
class TriangleResult:
    """Loss and accuracy at the barycentric ``points [P, 3]`` of the three-model linear surface."""

    points: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray


def evaluate_triangle(model: Model, models: Sequence[PyTree], data, *, steps: int = 11, bn_data=None,
                      batch_size: int = 500, bn_batches: int | None = None, bn_batch_size: int = 128,
                      strategy: str = "auto") -> TriangleResult:
    """The linear surface ``phi = alpha1 theta1 + alpha2 theta2 + alpha3 theta3`` (§4.1, Figure 3) on ``data``.

    BatchNorm data as in :func:`mclandscape.engine.evaluate.evaluate_points` (this function sees one data set):
    ``bn_data`` must be given for a model with BatchNorm.

    Args:
      model: the :class:`~mclandscape.engine.models.Model`.
      models: the three parameter pytrees.
      data: the data to evaluate on.
      steps: points per edge of :func:`triangle_points`.
      bn_data, batch_size, bn_batches, bn_batch_size, strategy: see :func:`mclandscape.engine.evaluate.evaluate`.

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
    if model.has_batch_stats and bn_data is None:
        raise ValueError(f"model {model.name} has BatchNorm: pass bn_data (training data)")
    pts = triangle_points(steps)
    r = evaluate_points(model, simplex(models), pts, data, batch_size=batch_size,
                        strategy=strategy, bn_data=bn_data, bn_batches=bn_batches, bn_batch_size=bn_batch_size)
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
