"""Connectors: curves, chains, surfaces and simplices whose points are linear combinations of control points.

A connector is a pytree (``flax.struct`` dataclass) holding the control points stacked on one leading axis
(``control`` leaves have shape ``[K, *leaf_shape]``) and static metadata: its ``kind``, the control-grid
``shape`` and a ``fixed`` mask of control points that training must not move. Every connector is linear in
its control points: a point is ``phi(p) = sum_k c_k(p) * theta_k`` with coefficients ``c(p)`` from
:meth:`Connector.coefficients`, so a point never requires copying weights into a model object, and many
points are formed together with one ``einsum`` per leaf (:func:`mclandscape.core.tree.tree_combine`).

References: the Bézier-surface paper (Anonymous, 2024, "Revisiting mode connectivity in neural networks with
Bézier surface"); Garipov et al., 2018 ("Loss surfaces, mode connectivity, and fast ensembling of DNNs").

Kinds and their coefficients:

- ``"bezier"`` (shape ``(n+1,)``): Bézier curve of degree n, ``c_i(t) = B_{i,n}(t)`` (Bézier-surface paper,
  eq. 1-2; Garipov et al.'s Bézier curve). Points are ``t`` values, shape ``[P]``.
- ``"polychain"`` (shape ``(B+2,)``): polygonal chain through ``B`` bends at ``t = k/(B+1)`` (Garipov et al.'s
  PolyChain); ``c_k(t)`` are the piecewise-linear hat functions.
- ``"surface"`` (shape ``(n+1, m+1)``): tensor-product Bézier surface (Bézier-surface paper, eq. 3-6),
  ``c_{ij}(u, v) = B_{i,n}(u) B_{j,m}(v)``, control index ``k = i (m+1) + j``; ``i`` runs along ``u``.
  Points are ``(u, v)`` pairs, shape ``[P, 2]``. Degree (1, 1) is the bilinear four-corner surface
  (appendix A.2). Corners are named by their ``(u, v)``: ``c00, c01, c10, c11``.
- ``"simplex"`` (shape ``(K,)``): barycentric combinations ``sum_k alpha_k theta_k`` with
  ``alpha_k >= 0``, ``sum alpha = 1`` (Bézier-surface paper, §4.1: three models, ``alpha1 + alpha2 + alpha3
  = 1``). Points are ``alpha`` vectors, shape ``[P, K]``.

Points given by a user are checked (:meth:`Connector.validate_points`): values outside [0, 1] raise unless
``extrapolate=True`` asks for the curve or surface continued beyond its ends (polynomials continue, a chain
continues its end segments). :meth:`Connector.coefficients` is the unchecked, jittable core.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mclandscape.core import _checks
from mclandscape.core.bernstein import bernstein, bernstein_derivative, check_unit_interval
from mclandscape.core.tree import PyTree, check_finite, tree_combine, tree_index, tree_stack

__all__ = ["Connector", "bezier_curve", "polychain", "bezier_surface", "bilinear_surface", "bilinear_coefficients",
           "simplex", "from_control"]

_KINDS = ("bezier", "polychain", "surface", "simplex")


def _segment_of(t, n_nodes: int):
    """The chain segment of each ``t`` (clipped to the first / last one) and ``t``'s position along it."""
    seg = jnp.clip(jnp.floor(t * (n_nodes - 1)), 0, n_nodes - 2).astype(jnp.int32)
    return seg, jax.nn.one_hot(seg, n_nodes, dtype=t.dtype), jax.nn.one_hot(seg + 1, n_nodes, dtype=t.dtype)


def _hat(t, n_nodes: int):
    """Piecewise-linear hat functions on nodes k/(n_nodes-1): shape t.shape + (n_nodes,).

    Outside [0, 1] (only reached with ``extrapolate=True``) the first and last segments continue linearly,
    so an extrapolated chain point lies on the line through the end segment (the hats alone would fall to 0).
    """
    s = t[..., None] * (n_nodes - 1) - jnp.arange(n_nodes, dtype=t.dtype)
    hat = jnp.maximum(0.0, 1.0 - jnp.abs(s))
    if n_nodes < 2:
        return hat
    seg, left, right = _segment_of(t, n_nodes)
    loc = (t * (n_nodes - 1) - seg)[..., None]
    return jnp.where(((t < 0) | (t > 1))[..., None], (1.0 - loc) * left + loc * right, hat)


def _hat_derivative(t, n_nodes: int):
    """d/dt of the hat functions; on a node the derivative of the segment to the right (left at t=1)."""
    _, left, right = _segment_of(t, n_nodes)
    return (n_nodes - 1) * (right - left)


def _outer(a, b):
    """Row-wise tensor product of ``[P, n]`` and ``[P, m]`` coefficients: ``[P, n m]``, index ``i m + j``."""
    return (a[:, :, None] * b[:, None, :]).reshape(a.shape[0], -1)


@struct.dataclass
class Connector:
    """Control points ``control`` (leaves ``[K, ...]``) of a linear connector, plus static metadata.

    Build one with :func:`bezier_curve`, :func:`polychain`, :func:`bezier_surface`, :func:`bilinear_surface`,
    :func:`simplex` or :func:`from_control`. A point is ``phi(p) = sum_k c_k(p) theta_k``.

    Attributes:
      control: the control points stacked on a leading axis of size ``K = prod(shape)``.
      kind: ``"bezier"``, ``"polychain"``, ``"surface"`` or ``"simplex"`` (static).
      shape: the control-grid shape, ``(K,)`` or ``(n+1, m+1)`` (static).
      fixed: ``K`` booleans, True where training must not move the control point (static).

    Example:
        >>> import jax.numpy as jnp
        >>> curve = bezier_curve({"w": jnp.array([0.0, 0.0])}, {"w": jnp.array([2.0, 0.0])}, degree=2)
        >>> curve.kind, curve.shape, curve.fixed, curve.point(0.5)["w"].tolist()
        ('bezier', (3,), (True, False, True), [1.0, 0.0])
    """

    control: PyTree
    kind: str = struct.field(pytree_node=False)
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    fixed: tuple[bool, ...] = struct.field(pytree_node=False)

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def num_control(self) -> int:
        """The number ``K`` of control points."""
        return int(np.prod(self.shape))

    @property
    def point_dim(self) -> int:
        """Number of coordinates of one point: 1 (t), 2 (u, v) or K (barycentric alpha)."""
        return {"bezier": 1, "polychain": 1, "surface": 2, "simplex": self.num_control}[self.kind]

    @property
    def trainable(self) -> np.ndarray:
        """Boolean mask ``[K]``: True where the control point may move."""
        return ~np.asarray(self.fixed, dtype=bool)

    # ---- coefficients ------------------------------------------------------------------------
    def coefficients(self, points) -> jax.Array:
        """Coefficient matrix ``[P, K]`` of the points (jittable: the values are not checked).

        Args:
          points: ``[P]`` t values (curves; ``[P, 1]`` too), ``[P, 2]`` (u, v) pairs (surfaces) or ``[P, K]``
            barycentric weights (simplices). Use :meth:`validate_points` on user input first.

        Returns:
          ``c[P, K]`` with ``phi(p) = sum_k c[p, k] theta_k`` (Bernstein products, hat functions or the
          weights themselves), in the points' floating dtype.

        Example:
            >>> import jax.numpy as jnp
            >>> c = bezier_curve({"w": jnp.zeros(1)}, {"w": jnp.ones(1)}, degree=2)
            >>> c.coefficients(jnp.array([0.0, 0.5])).tolist()
            [[1.0, 0.0, 0.0], [0.25, 0.5, 0.25]]
        """
        pts = self._as_points(points)
        if self.kind == "bezier":
            return bernstein(pts, self.shape[0] - 1)
        if self.kind == "polychain":
            return _hat(pts, self.shape[0])
        if self.kind == "surface":
            return _outer(bernstein(pts[:, 0], self.shape[0] - 1), bernstein(pts[:, 1], self.shape[1] - 1))
        return pts  # simplex: the barycentric coordinates are the coefficients

    def derivative_coefficients(self, points) -> tuple[jax.Array, ...]:
        """Coefficients of the partial derivatives of ``phi``: ``(d/dt,)`` or ``(d/du, d/dv)``, each ``[P, K]``.

        For surfaces these give ``phi_u`` and ``phi_v``, the tangent vectors whose cross-product norm is
        the area element (Bézier-surface paper, eq. 8). Jittable; the points are not checked.

        Args:
          points: as for :meth:`coefficients` (not simplices: they have no single parameterisation).

        Returns:
          A tuple of ``[P, K]`` arrays, one per parameter axis.

        Example:
            >>> import jax.numpy as jnp
            >>> c = bezier_curve({"w": jnp.zeros(1)}, {"w": jnp.ones(1)}, degree=1)
            >>> c.derivative_coefficients(jnp.array([0.3]))[0].tolist()
            [[-1.0, 1.0]]
        """
        pts = self._as_points(points)
        if self.kind == "bezier":
            return (bernstein_derivative(pts, self.shape[0] - 1),)
        if self.kind == "polychain":
            return (_hat_derivative(pts, self.shape[0]),)
        if self.kind == "surface":
            n, m = self.shape[0] - 1, self.shape[1] - 1
            bu, bv = bernstein(pts[:, 0], n), bernstein(pts[:, 1], m)
            return _outer(bernstein_derivative(pts[:, 0], n), bv), _outer(bu, bernstein_derivative(pts[:, 1], m))
        raise ValueError("a simplex has no single parameterisation to differentiate; use the coefficients")

    # ---- points ------------------------------------------------------------------------------
    def _one(self, p, extrapolate: bool):
        """One point as a ``[1]`` / ``[1, d]`` array, checked when it is concrete."""
        pts = jnp.asarray(p)
        if pts.ndim > 1 or pts.size != self.point_dim:
            what = "a scalar t" if self.point_dim == 1 else f"one point of shape ({self.point_dim},)"
            raise ValueError(f"a {self.kind} point is {what}, got shape {pts.shape}; use points() for several")
        return self._checked(pts.reshape(1, -1) if self.point_dim > 1 else pts.reshape(1), extrapolate)

    def _checked(self, pts, extrapolate: bool):
        if not isinstance(pts, jax.core.Tracer):  # under jit the values are unknown: nothing to check
            self.validate_points(np.asarray(pts), extrapolate=extrapolate)
        return pts

    def point(self, p, *, extrapolate: bool = False) -> PyTree:
        """The parameters at one point ``t``, ``(u, v)`` or ``alpha`` (Bézier-surface paper, eq. 6).

        Args:
          p: a scalar ``t`` (curves), a pair ``(u, v)`` (surfaces) or ``K`` barycentric weights (simplices).
          extrapolate: allow ``t``, ``u``, ``v`` (or weights) outside [0, 1]; otherwise such a point raises
            ``ValueError`` (checked for concrete values; under ``jit`` the point is not checked).

        Returns:
          A pytree shaped like one control point.

        Example:
            >>> import jax.numpy as jnp
            >>> line = bezier_curve({"w": jnp.array([0.0])}, {"w": jnp.array([2.0])}, degree=1)
            >>> line.point(0.25)["w"].tolist(), line.point(1.5, extrapolate=True)["w"].tolist()
            ([0.5], [3.0])
        """
        return tree_index(tree_combine(self.coefficients(self._one(p, extrapolate)), self.control), 0)

    def points(self, ps, *, extrapolate: bool = False) -> PyTree:
        """Parameters at P points, stacked on a leading axis (materialises P parameter copies).

        Args:
          ps: ``[P]`` t values, ``[P, 2]`` (u, v) pairs or ``[P, K]`` weights (see :meth:`validate_points`).
          extrapolate: allow values outside [0, 1] (see :meth:`point`; under ``jit`` nothing is checked).

        Returns:
          A pytree with leaves ``[P, ...]``.

        Example:
            >>> import jax.numpy as jnp
            >>> line = bezier_curve({"w": jnp.array([0.0])}, {"w": jnp.array([2.0])}, degree=1)
            >>> line.points(jnp.array([0.0, 0.5, 1.0]))["w"].tolist()
            [[0.0], [1.0], [2.0]]
        """
        return tree_combine(self.coefficients(self._checked(ps, extrapolate)), self.control)

    def derivatives(self, p, *, extrapolate: bool = False) -> tuple[PyTree, ...]:
        """Tangent vectors at one point: ``(phi_t,)`` or ``(phi_u, phi_v)`` as pytrees.

        Args:
          p: one point, as for :meth:`point`.
          extrapolate: as for :meth:`point`.

        Returns:
          A tuple of pytrees shaped like one control point.

        Example:
            >>> import jax.numpy as jnp
            >>> line = bezier_curve({"w": jnp.array([0.0])}, {"w": jnp.array([2.0])}, degree=1)
            >>> line.derivatives(0.3)[0]["w"].tolist()
            [2.0]
        """
        pts = self._one(p, extrapolate)
        return tuple(tree_index(tree_combine(c, self.control), 0) for c in self.derivative_coefficients(pts))

    # ---- validation --------------------------------------------------------------------------
    def validate_points(self, points, *, atol: float = 1e-6, extrapolate: bool = False) -> np.ndarray:
        """Host-side check of a point set; returns it as a ``[P]`` or ``[P, d]`` float64 array or raises.

        Args:
          points: ``[P]`` t values (curves; ``[P, 1]`` is accepted), ``[P, 2]`` (u, v) pairs (surfaces) or
            ``[P, K]`` barycentric weights (simplices). A single surface point is ``[[u, v]]``.
          atol: tolerance of the barycentric sum-to-1 check.
          extrapolate: accept values outside [0, 1] (an extension of the curve or surface beyond its ends;
            barycentric weights must still sum to 1). Nothing is ever clipped.

        Returns:
          The points as a float64 NumPy array.

        Raises:
          ValueError: an empty, non-finite or wrongly shaped point set, a value outside [0, 1] (unless
            ``extrapolate``), or barycentric weights that do not sum to 1.

        Example:
            >>> import jax.numpy as jnp
            >>> s = bilinear_surface(*[{"w": jnp.zeros(1)}] * 4)
            >>> s.validate_points([[0.0, 0.5], [1.0, 1.0]]).shape
            (2, 2)
        """
        arr = self._shaped(np.asarray(points, dtype=np.float64))
        named = zip("uv", arr.T, strict=True) if self.kind == "surface" else [("t" if arr.ndim == 1 else "alpha", arr)]
        for name, values in named:
            check_unit_interval(values, name, bounded=not extrapolate)
        sums = arr.sum(axis=-1)
        if self.kind == "simplex" and np.any(np.abs(sums - 1.0) > atol):
            raise ValueError(f"barycentric weights must sum to 1; got a sum of {sums[np.argmax(np.abs(sums - 1))]!r}")
        return arr

    def _float_dtype(self):
        return jnp.result_type(jnp.float32, *jax.tree_util.tree_leaves(self.control))

    def _shaped(self, pts):
        """``pts`` as ``[P]`` (curves; ``[P, 1]`` and, for traced points, a scalar are accepted) or ``[P, d]``."""
        if self.point_dim == 1:
            if pts.ndim == 2 and pts.shape[1] == 1:
                pts = pts[:, 0]
            if pts.ndim != 1:
                raise ValueError(f"curve points must be a 1-D array of t values, got shape {pts.shape}")
        elif pts.ndim != 2 or pts.shape[1] != self.point_dim:
            coords = "(u, v)" if self.kind == "surface" else f"{self.point_dim} barycentric weights"
            raise ValueError(f"{self.kind} points must have shape [P, {self.point_dim}] (one row {coords} per "
                             f"point), got shape {pts.shape}; a single point is [[...]] or use point()")
        return pts

    def _as_points(self, points):
        pts = jnp.asarray(points)
        if not jnp.issubdtype(pts.dtype, jnp.floating):
            pts = pts.astype(self._float_dtype())
        return self._shaped(pts.reshape(-1) if pts.ndim == 0 else pts)


# ---- constructors -------------------------------------------------------------------------------

def _stack(models: Sequence[PyTree], names: Sequence[str]) -> PyTree:
    """The models stacked on a leading axis, each checked to be finite and to match the first (named in errors)."""
    for m, n in zip(models, names, strict=True):
        check_finite(m, n)
    return tree_stack(models, names=names)


def from_control(control: PyTree, kind: str, shape: Sequence[int], fixed: Sequence[bool] | None = None) -> Connector:
    """A connector from already stacked control points ``[K, ...]`` (``K = prod(shape)``).

    Args:
      control: the control points, every leaf with a leading axis of size ``K``.
      kind: ``"bezier"``, ``"polychain"``, ``"surface"`` or ``"simplex"``.
      shape: the control-grid shape (``(K,)``, or ``(n+1, m+1)`` for a surface).
      fixed: ``K`` booleans, True where training must not move the point (default: none fixed).

    Returns:
      A :class:`Connector`.

    Example:
        >>> import jax.numpy as jnp
        >>> c = from_control({"w": jnp.arange(3.0)[:, None]}, "bezier", (3,))
        >>> c.point(0.5)["w"].tolist(), c.fixed
        ([1.0], (False, False, False))
    """
    _checks.choice(kind, "connector kind", _KINDS)
    shape = tuple(_checks.integer(s, "control grid shape", low=1) for s in shape)
    k = int(np.prod(shape))
    leaves = jax.tree_util.tree_leaves(control)
    if not leaves or any(np.shape(x)[:1] != (k,) for x in leaves):
        raise ValueError(f"every control leaf needs a leading axis of {k} control points, got shapes "
                         f"{[np.shape(x) for x in leaves]}")
    fixed = tuple(bool(f) for f in np.asarray((False,) * k if fixed is None else fixed, dtype=bool).reshape(-1))
    if len(fixed) != k:
        raise ValueError(f"fixed mask has {len(fixed)} entries for {k} control points")
    return Connector(control=control, kind=kind, shape=shape, fixed=fixed)


def _chain(kind: str, start: PyTree, end: PyTree, num_inner: int, bends: Sequence[PyTree] | None) -> Connector:
    """A curve through ``start``, the ``num_inner`` inner control points and ``end``, the end points fixed; the
    inner points default to even steps along the straight segment (Garipov et al.'s initialisation)."""
    if bends is None:
        ends = _stack([start, end], ["start", "end"])
        bends = [tree_combine(jnp.asarray([1 - a, a]), ends) for a in np.linspace(0.0, 1.0, num_inner + 2)[1:-1]]
    elif len(bends) != num_inner:
        raise ValueError(f"a {kind} with {num_inner} inner control points got {len(bends)} bends")
    names = ["start", *[f"bend[{i}]" for i in range(num_inner)], "end"]
    control = _stack([start, *bends, end], names)
    return from_control(control, kind, (num_inner + 2,), [True] + [False] * num_inner + [True])


def bezier_curve(start: PyTree, end: PyTree, degree: int = 2, *, bends: Sequence[PyTree] | None = None) -> Connector:
    """Bézier curve of ``degree`` >= 1 from ``start`` (t = 0) to ``end`` (t = 1) (Bézier-surface paper, eq. 1-2).

    The ``degree - 1`` inner control points are ``bends`` if given, else placed evenly on the straight
    segment (``theta_i = (1 - i/n) start + (i/n) end``), the initialisation of Garipov et al. (2018). The
    end points are fixed.

    Args:
      start, end: the end models (pytrees of the same structure, shapes and dtypes).
      degree: the polynomial degree ``n``; ``n + 1`` control points (Garipov's ``num_bends=3`` is degree 2).
      bends: the ``n - 1`` inner control points (default: on the straight segment).

    Returns:
      A :class:`Connector` of kind ``"bezier"`` and shape ``(n + 1,)``.

    Raises:
      TreeMismatchError: the models differ in structure, shape or dtype (the message names the leaf).

    Example:
        >>> import jax.numpy as jnp
        >>> c = bezier_curve({"w": jnp.array([0.0, 0.0])}, {"w": jnp.array([2.0, 2.0])}, degree=2)
        >>> c.control["w"].tolist(), c.fixed
        ([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]], (True, False, True))
    """
    n = _checks.integer(degree, "Bézier degree", low=1, what="n + 1 control points")
    return _chain("bezier", start, end, n - 1, bends)


def polychain(start: PyTree, end: PyTree, num_bends: int = 1, *, bends: Sequence[PyTree] | None = None) -> Connector:
    """Polygonal chain with ``num_bends`` >= 0 bends at ``t = k/(num_bends+1)`` (Garipov et al., 2018, PolyChain).

    Args:
      start, end: the end models (same structure, shapes and dtypes).
      num_bends: the number ``B`` of bends; ``B + 2`` control points.
      bends: the ``B`` bends (default: evenly on the straight segment).

    Returns:
      A :class:`Connector` of kind ``"polychain"`` and shape ``(B + 2,)``, end points fixed.

    Raises:
      TreeMismatchError: the models differ in structure, shape or dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> c = polychain({"w": jnp.array([0.0])}, {"w": jnp.array([2.0])}, 1, bends=[{"w": jnp.array([4.0])}])
        >>> c.point(0.25)["w"].tolist(), c.point(0.5)["w"].tolist()
        ([2.0], [4.0])
    """
    return _chain("polychain", start, end, _checks.integer(num_bends, "num_bends", low=0, what="the bends"), bends)


def bilinear_coefficients(n: int, m: int) -> np.ndarray:
    """Weights ``[(n+1)(m+1), 4]`` of the corners ``(c00, c01, c10, c11)`` in the bilinear initialisation.

    Bézier-surface paper, Algorithm 2 lines 1-6 and appendix A.2: ``theta_ij = (1-t)(1-s) c00 + (1-t)s c01 +
    t(1-s) c10 + ts c11`` with ``t = i/n``, ``s = j/m``. (Degree-0 directions use t = 0.)

    Args:
      n, m: the surface degrees along u and v.

    Returns:
      A float64 array; row ``i (m+1) + j`` holds the four weights of control point ``theta_ij``.

    Example:
        >>> bilinear_coefficients(2, 1)[2].tolist()  # theta_10: halfway between c00 and c10
        [0.5, 0.0, 0.5, 0.0]
    """
    t = np.arange(n + 1) / max(n, 1)
    s = np.arange(m + 1) / max(m, 1)
    tt, ss = np.meshgrid(t, s, indexing="ij")
    w = np.stack([(1 - tt) * (1 - ss), (1 - tt) * ss, tt * (1 - ss), tt * ss], axis=-1)
    return w.reshape(-1, 4)


def bezier_surface(c00: PyTree, c01: PyTree, c10: PyTree, c11: PyTree, *, n: int = 2, m: int = 2) -> Connector:
    """Tensor-product Bézier surface with an ``(n+1) x (m+1)`` control grid (Bézier-surface paper, eq. 3-6).

    Corners are named by their ``(u, v)``: ``phi(0,0) = c00``, ``phi(0,1) = c01``, ``phi(1,0) = c10``,
    ``phi(1,1) = c11`` exactly (the same order as :func:`bilinear_surface`); they are fixed. Interior and edge
    control points are initialised bilinearly (Algorithm 2, lines 1-6), so the untrained surface equals the
    bilinear surface of the four corners at every (u, v): degree elevation of a bilinear patch places its
    control points at the bilinear values of (i/n, j/m).

    Args:
      c00, c01, c10, c11: the corner models (same structure, shapes and dtypes).
      n, m: the degrees along u and v (keyword-only), each >= 1.

    Returns:
      A :class:`Connector` of kind ``"surface"`` and shape ``(n + 1, m + 1)``; control index ``i (m+1) + j``.

    Raises:
      TreeMismatchError: the corners differ in structure, shape or dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> corners = [{"w": jnp.array([float(i)])} for i in range(4)]
        >>> s = bezier_surface(*corners, n=2, m=2)
        >>> s.shape, s.point(jnp.array([1.0, 0.0]))["w"].tolist(), s.point(jnp.array([0.5, 0.5]))["w"].tolist()
        ((3, 3), [2.0], [1.5])
    """
    n = _checks.integer(n, "surface degree n", low=1, what=">= 2 control points along u")
    m = _checks.integer(m, "surface degree m", low=1, what=">= 2 control points along v")
    corners = [c00, c01, c10, c11]
    control = tree_combine(jnp.asarray(bilinear_coefficients(n, m)), _stack(corners, ["c00", "c01", "c10", "c11"]))
    # Corners exactly equal to the given models (no rounding from the weighted sum).
    corner_idx = [0, m, n * (m + 1), n * (m + 1) + m]
    control = jax.tree_util.tree_map(
        lambda c, *cs: c.at[jnp.asarray(corner_idx)].set(jnp.stack(cs)), control, *corners)
    fixed = np.zeros((n + 1, m + 1), dtype=bool)
    fixed[0, 0] = fixed[0, m] = fixed[n, 0] = fixed[n, m] = True
    return from_control(control, "surface", (n + 1, m + 1), fixed.reshape(-1))


def bilinear_surface(c00: PyTree, c01: PyTree, c10: PyTree, c11: PyTree) -> Connector:
    """The four-corner bilinear surface ``(1-u)(1-v) c00 + (1-u)v c01 + u(1-v) c10 + uv c11``.

    The degree-(1, 1) :func:`bezier_surface` (Bézier-surface paper, appendix A.2/A.3; the paper writes the
    n = m = 2 case through coefficients C_00 ... C_22, which reduce to these bilinear weights, see
    ``tests/test_connectors.py``). Corners as in :func:`bezier_surface`.

    Args:
      c00, c01, c10, c11: the models at ``(u, v) = (0, 0), (0, 1), (1, 0), (1, 1)``.

    Returns:
      A :class:`Connector` of kind ``"surface"`` and shape ``(2, 2)``.

    Example:
        >>> import jax.numpy as jnp
        >>> s = bilinear_surface(*[{"w": jnp.array([float(i)])} for i in range(4)])
        >>> s.point(jnp.array([0.5, 0.5]))["w"].tolist()
        [1.5]
    """
    return bezier_surface(c00, c01, c10, c11, n=1, m=1)


def simplex(models: Sequence[PyTree], *, fixed: bool = True) -> Connector:
    """Barycentric combinations ``sum_k alpha_k theta_k`` of K >= 2 models (Bézier-surface paper, §4.1).

    Args:
      models: the K vertex models (same structure, shapes and dtypes); §4.1 and Figure 3 use K = 3.
      fixed: whether the vertices are fixed for training.

    Returns:
      A :class:`Connector` of kind ``"simplex"``; its points are ``[P, K]`` weights summing to 1.

    Example:
        >>> import jax.numpy as jnp
        >>> s = simplex([{"w": jnp.array([0.0])}, {"w": jnp.array([3.0])}, {"w": jnp.array([6.0])}])
        >>> s.point(jnp.array([0.5, 0.25, 0.25]))["w"].tolist()
        [2.25]
    """
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"a simplex needs at least 2 models, got {len(models)}")
    control = _stack(models, [f"model[{i}]" for i in range(len(models))])
    return from_control(control, "simplex", (len(models),), [fixed] * len(models))
