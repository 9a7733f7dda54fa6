"""Bézier-surface geometry: the training phases' masks and samplers, the exact area element (eq. 7-8).

The Bézier-surface paper (Anonymous, 2024, "Revisiting mode connectivity in neural networks with Bézier
surface"); equation, algorithm and appendix numbers below are that paper's.

A surface is a :class:`~mclandscape.core.connectors.Connector` of kind ``"surface"`` with an ``(n+1) x (m+1)``
control grid ``theta_ij`` (flat index ``k = i (m+1) + j``; ``i`` runs along ``u``), its four corners fixed
(four trained networks) and the other control points initialised bilinearly
(:func:`mclandscape.core.connectors.bezier_surface`, Algorithm 2 lines 1-6). Its points are

    phi(u, v) = sum_i sum_j B_{i,n}(u) B_{j,m}(v) theta_ij                                   (eq. 6)

:func:`phase_trainable`, :func:`phase_sampler` and :func:`curve_family_coefficients` say what each phase of
the three-phase training (:func:`mclandscape.methods.surface_train.train_surface`, whose docstring describes
the phases) trains and where it samples.

The area-weighted objective of eq. 7-8, made exact. The tangents ``phi_u = sum_k a_k(u, v) theta_k`` and
``phi_v = sum_k b_k(u, v) theta_k`` are fixed linear combinations of the control points (derivative
coefficients ``a``, ``b``), so with the Gram matrix ``G = Theta Theta^T`` of the control points (centred on
their mean: ``a`` and ``b`` sum to zero, so centring changes nothing but the rounding) the area element of the
parameter-space surface is

    |phi_u x phi_v| = sqrt(|phi_u|^2 |phi_v|^2 - (phi_u . phi_v)^2)
                    = sqrt((a^T G a)(b^T G b) - (a^T G b)^2)                                 (eq. 8 numerator)

at a cost of one K x K Gram matrix per step, for any parameter dimension. ``q_uv`` (eq. 8) divides it by the
surface area ``Z`` (Gauss-Legendre quadrature of the same formula). Two estimators of eq. 7:

- ``area_estimator="importance"``: uniform samples weighted by ``w = |phi_u x phi_v| / Z`` (unbiased:
  ``E_U[w L] = E_q[L]``; :func:`area_weights`);
- ``area_estimator="sample"``: samples drawn from a piecewise-constant approximation ``p`` of ``q_uv``
  (:func:`area_proposal`: the area element at the centres of ``cells x cells`` cells, mixed with
  ``proposal_mix`` of the uniform density so ``p > 0`` everywhere), rebuilt from the current surface every
  ``proposal_refresh`` epochs, with the exact correction ``w = q_uv / p`` (close to 1), so the estimate stays
  unbiased.

``area_gradient="full"`` differentiates through ``q_uv`` (the exact gradient of eq. 7, including how moving
control points redistributes area); ``"fixed"`` treats the weights as constants at the current surface.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mclandscape.core import _checks
from mclandscape.core.bernstein import bernstein
from mclandscape.core.connectors import Connector
from mclandscape.core.tree import tree_gram

__all__ = [
    "PHASES", "AREA_GRADIENTS", "phase_trainable", "phase_sampler", "curve_family_coefficients", "area_element", "surface_area", "area_density", "area_weights", "area_proposal",
]

PHASES = (1, 2, 3)
AREA_GRADIENTS = ("full", "fixed")


# ---------------------------------------------------------------------------------------------------------
# phases: masks, samplers, the phase-2 curve family
# ---------------------------------------------------------------------------------------------------------


def _grid_shape(shape: Sequence[int]) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or shape[0] < 2 or shape[1] < 2:
        raise ValueError(f"a surface control grid needs shape (n+1, m+1) with n, m >= 1, got {shape}")
    return shape


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
    phase = _checks.choice(phase, "phase", PHASES)
    n, m = n1 - 1, m1 - 1
    t = np.zeros((n1, m1), dtype=bool)
    if phase == 1:
        t[[0, n], 1:m] = True
    elif phase == 2:
        t[1:n, :] = True
    else:
        t[:] = True
        t[0, 0] = t[0, m] = t[n, 0] = t[n, m] = False
    return t.reshape(-1)


@struct.dataclass
class PhaseSampler:
    """``sampler(key, k) -> points [k, 2]`` of one training phase (see :func:`phase_sampler`)."""

    shape: tuple[int, int] = struct.field(pytree_node=False)
    phase: int = struct.field(pytree_node=False)

    def __call__(self, key, k):
        if self.phase == 3:
            return jax.random.uniform(key, (k, 2))
        # stratified: phase 1's u over the two edges {0, 1}, phase 2's curve index j over 0..m, from a random start
        count = 2 if self.phase == 1 else self.shape[1]
        ko, kv = jax.random.split(key)
        idx = (jax.random.randint(ko, (), 0, count) + jnp.arange(k)) % count
        x = jax.random.uniform(kv, (k,))  # the default float: float64 under jax_enable_x64
        return jnp.stack([idx.astype(x.dtype), x] if self.phase == 1 else [x, idx.astype(x.dtype)], axis=1)


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
    return PhaseSampler(_grid_shape(shape), int(_checks.choice(phase, "phase", PHASES)))


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
      gram: the Gram matrix of the centred control points (default: computed); pass it to reuse one matrix.

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
    x, w = np.polynomial.legendre.leggauss(_checks.integer(q, "quadrature", low=1))
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
      gram: the Gram matrix of the centred control points (default: computed).

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
    _checks.choice(gradient, "gradient", AREA_GRADIENTS)
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
    c = _checks.integer(cells, "cells", low=1)
    _checks.real(mix, "mix", low=0.0, high=1.0, low_open=True, what="so the proposal covers the whole square")
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
