"""Connectors: curves, chains, surfaces and simplices whose points are linear combinations of control points.

A connector is a pytree (``flax.struct`` dataclass) holding the control points stacked on one leading axis
(``control`` leaves have shape ``[K, *leaf_shape]``) and static metadata: its ``kind``, the control-grid
``shape`` and a ``fixed`` mask of control points that training must not move. Every connector is linear in
its control points: a point is ``phi(p) = sum_k c_k(p) * theta_k`` with coefficients ``c(p)`` from
:meth:`Connector.coefficients`, so a point never requires copying weights into a model object, and many
points are formed together with one ``einsum`` per leaf (:func:`mclandscape.core.tree.tree_combine`).

Kinds and their coefficients:

- ``"bezier"`` (shape ``(n+1,)``): Bézier curve of degree n, ``c_i(t) = B_{i,n}(t)`` (seed 000 eq. 1-2;
  Garipov et al., seed 001). Points are ``t`` values, shape ``[P]``.
- ``"polychain"`` (shape ``(B+2,)``): polygonal chain through ``B`` bends at ``t = k/(B+1)`` (Garipov's
  PolyChain, seed 001); ``c_k(t)`` are the piecewise-linear hat functions.
- ``"surface"`` (shape ``(n+1, m+1)``): tensor-product Bézier surface (seed 000 eq. 3-6),
  ``c_{ij}(u, v) = B_{i,n}(u) B_{j,m}(v)``, control index ``k = i (m+1) + j``; ``i`` runs along ``u``.
  Points are ``(u, v)`` pairs, shape ``[P, 2]``. Degree (1, 1) is the bilinear four-corner surface
  (seed 000 appendix A.2).
- ``"simplex"`` (shape ``(K,)``): barycentric combinations ``sum_k alpha_k theta_k`` with
  ``alpha_k >= 0``, ``sum alpha = 1`` (seed 000 §4.1: three models, ``alpha1 + alpha2 + alpha3 = 1``).
  Points are ``alpha`` vectors, shape ``[P, K]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mclandscape.core.bernstein import bernstein, bernstein_derivative, check_unit_interval
from mclandscape.core.tree import PyTree, check_finite, check_same_structure, tree_combine, tree_index, tree_stack

__all__ = [
    "Connector",
    "bezier_curve",
    "polychain",
    "bezier_surface",
    "bilinear_surface",
    "bilinear_coefficients",
    "simplex",
    "from_control",
]

_KINDS = ("bezier", "polychain", "surface", "simplex")


def _hat(t, n_nodes: int):
    """Piecewise-linear hat functions on nodes k/(n_nodes-1): shape t.shape + (n_nodes,)."""
    s = t[..., None] * (n_nodes - 1) - jnp.arange(n_nodes, dtype=t.dtype)
    return jnp.maximum(0.0, 1.0 - jnp.abs(s))


def _hat_derivative(t, n_nodes: int):
    """d/dt of the hat functions; on a node the derivative of the segment to the right (left at t=1)."""
    seg = jnp.clip(jnp.floor(t * (n_nodes - 1)), 0, n_nodes - 2).astype(jnp.int32)
    d = (n_nodes - 1) * (jax.nn.one_hot(seg + 1, n_nodes, dtype=t.dtype) - jax.nn.one_hot(seg, n_nodes, dtype=t.dtype))
    return d


@struct.dataclass
class Connector:
    """Control points ``control`` (leaves ``[K, ...]``) of a linear connector, plus static metadata."""

    control: PyTree
    kind: str = struct.field(pytree_node=False)
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    fixed: tuple[bool, ...] = struct.field(pytree_node=False)

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def num_control(self) -> int:
        return int(np.prod(self.shape))

    @property
    def degree(self) -> tuple[int, ...]:
        """Polynomial degree per parameter axis (``(n,)`` for curves, ``(n, m)`` for surfaces)."""
        return tuple(s - 1 for s in self.shape)

    @property
    def point_dim(self) -> int:
        """Number of coordinates of one point: 1 (t), 2 (u, v) or K (barycentric alpha)."""
        return {"bezier": 1, "polychain": 1, "surface": 2, "simplex": self.num_control}[self.kind]

    @property
    def trainable(self) -> np.ndarray:
        """Boolean mask ``[K]``: True where the control point may move."""
        return ~np.asarray(self.fixed, dtype=bool)

    def with_fixed(self, fixed: Sequence[bool] | np.ndarray) -> Connector:
        """Same control points with another fixed mask (length K, or the grid shape)."""
        f = np.asarray(fixed, dtype=bool).reshape(-1)
        if f.size != self.num_control:
            raise ValueError(f"fixed mask has {f.size} entries for {self.num_control} control points")
        return self.replace(fixed=tuple(bool(x) for x in f))

    def control_point(self, index) -> PyTree:
        """One control point by flat index ``k`` or, for surfaces, by ``(i, j)``."""
        k = int(np.ravel_multi_index(index, self.shape)) if isinstance(index, tuple) else int(index)
        if not 0 <= k < self.num_control:
            raise ValueError(f"control index {index} outside a {self.shape} control grid")
        return tree_index(self.control, k)

    # ---- coefficients ------------------------------------------------------------------------
    def coefficients(self, points) -> jax.Array:
        """Coefficient matrix ``[P, K]`` of the points (jittable; see :meth:`validate_points`)."""
        pts = self._as_points(points)
        if self.kind == "bezier":
            return bernstein(pts, self.shape[0] - 1)
        if self.kind == "polychain":
            return _hat(pts, self.shape[0])
        if self.kind == "surface":
            bu = bernstein(pts[:, 0], self.shape[0] - 1)
            bv = bernstein(pts[:, 1], self.shape[1] - 1)
            return (bu[:, :, None] * bv[:, None, :]).reshape(pts.shape[0], -1)
        return pts  # simplex: the barycentric coordinates are the coefficients

    def derivative_coefficients(self, points) -> tuple[jax.Array, ...]:
        """Coefficients of the partial derivatives of ``phi``: ``(d/dt,)`` or ``(d/du, d/dv)``, each [P, K].

        For surfaces these give ``phi_u`` and ``phi_v``, the tangent vectors whose cross-product norm is
        the area element of seed 000 eq. 8.
        """
        pts = self._as_points(points)
        if self.kind == "bezier":
            return (bernstein_derivative(pts, self.shape[0] - 1),)
        if self.kind == "polychain":
            return (_hat_derivative(pts, self.shape[0]),)
        if self.kind == "surface":
            n, m = self.shape[0] - 1, self.shape[1] - 1
            bu, dbu = bernstein(pts[:, 0], n), bernstein_derivative(pts[:, 0], n)
            bv, dbv = bernstein(pts[:, 1], m), bernstein_derivative(pts[:, 1], m)
            du = (dbu[:, :, None] * bv[:, None, :]).reshape(pts.shape[0], -1)
            dv = (bu[:, :, None] * dbv[:, None, :]).reshape(pts.shape[0], -1)
            return du, dv
        raise ValueError("a simplex has no single parameterisation to differentiate; use the coefficients")

    # ---- points ------------------------------------------------------------------------------
    def point(self, p) -> PyTree:
        """The parameters at one point (``t``, ``(u, v)`` or ``alpha``) (seed 000 eq. 6)."""
        pts = jnp.asarray(p)
        single = pts.reshape(1, -1) if self.point_dim > 1 else pts.reshape(1)
        return tree_index(tree_combine(self.coefficients(single), self.control), 0)

    def points(self, ps) -> PyTree:
        """Parameters at P points, stacked on a leading axis (materialises P parameter copies)."""
        return tree_combine(self.coefficients(ps), self.control)

    def derivatives(self, p) -> tuple[PyTree, ...]:
        """Tangent vectors at one point: ``(phi_t,)`` or ``(phi_u, phi_v)`` as pytrees."""
        pts = jnp.asarray(p).reshape(1, -1) if self.point_dim > 1 else jnp.asarray(p).reshape(1)
        return tuple(tree_index(tree_combine(c, self.control), 0) for c in self.derivative_coefficients(pts))

    # ---- validation --------------------------------------------------------------------------
    def validate_points(self, points, *, atol: float = 1e-6) -> np.ndarray:
        """Host-side check of a point set; returns it as ``[P]`` or ``[P, d]`` float array or raises.

        ``t``, ``u``, ``v`` must lie in [0, 1]; barycentric points must be non-negative and sum to 1
        (within ``atol``). Nothing is clipped.
        """
        arr = np.asarray(points, dtype=np.float64)
        if arr.size == 0:
            raise ValueError("empty set of points: give at least one point")
        if self.kind in ("bezier", "polychain"):
            if arr.ndim > 1 and arr.shape[-1] == 1:
                arr = arr[..., 0]
            if arr.ndim != 1:
                raise ValueError(f"curve points must be a 1-D array of t values, got shape {arr.shape}")
            return check_unit_interval(arr, "t")
        if arr.ndim == 1 and arr.shape[0] == self.point_dim:
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[1] != self.point_dim:
            raise ValueError(f"{self.kind} points must have shape [P, {self.point_dim}], got {arr.shape}")
        if self.kind == "surface":
            check_unit_interval(arr[:, 0], "u")
            check_unit_interval(arr[:, 1], "v")
            return arr
        check_unit_interval(arr, "alpha")
        s = arr.sum(axis=1)
        if np.any(np.abs(s - 1.0) > atol):
            raise ValueError(f"barycentric weights must sum to 1; got a sum of {s[np.argmax(np.abs(s - 1))]!r}")
        return arr

    def _as_points(self, points):
        pts = jnp.asarray(points)
        if not jnp.issubdtype(pts.dtype, jnp.floating):
            pts = pts.astype(jnp.float32)
        if self.point_dim == 1:
            return pts.reshape(-1)
        return pts.reshape(-1, self.point_dim)


# ---- constructors -------------------------------------------------------------------------------

def _check_models(models: Sequence[PyTree], names: Sequence[str]) -> None:
    for i in range(1, len(models)):
        check_same_structure(models[0], models[i], names=(names[0], names[i]))
    for m, n in zip(models, names, strict=True):
        check_finite(m, n)


def from_control(control: PyTree, kind: str, shape: Sequence[int], fixed: Sequence[bool] | None = None) -> Connector:
    """Build a connector from already stacked control points ``[K, ...]`` (K = prod(shape))."""
    if kind not in _KINDS:
        raise ValueError(f"unknown connector kind {kind!r}; expected one of {_KINDS}")
    shape = tuple(int(s) for s in shape)
    if any(s < 1 for s in shape):
        raise ValueError(f"control grid shape must be positive, got {shape}")
    k = int(np.prod(shape))
    leaves = jax.tree_util.tree_leaves(control)
    if not leaves:
        raise ValueError("control points hold no arrays")
    for x in leaves:
        if np.shape(x)[:1] != (k,):
            raise ValueError(f"every control leaf needs a leading axis of {k} control points, got shape {np.shape(x)}")
    if fixed is None:
        fixed = (False,) * k
    fixed = tuple(bool(f) for f in np.asarray(fixed, dtype=bool).reshape(-1))
    if len(fixed) != k:
        raise ValueError(f"fixed mask has {len(fixed)} entries for {k} control points")
    return Connector(control=control, kind=kind, shape=shape, fixed=fixed)


def bezier_curve(start: PyTree, end: PyTree, degree: int = 2, *, bends: Sequence[PyTree] | None = None) -> Connector:
    """Bézier curve of ``degree`` >= 1 from ``start`` (t = 0) to ``end`` (t = 1) (seed 000 eq. 1-2).

    The ``degree - 1`` inner control points are ``bends`` if given, else placed evenly on the straight
    segment (``theta_i = (1 - i/n) start + (i/n) end``), the initialisation of Garipov et al. End points
    are fixed.
    """
    if int(degree) != degree or degree < 1:
        raise ValueError(f"Bézier degree must be an integer >= 1, got {degree!r}")
    n = int(degree)
    if bends is None:
        inner = []
        if n > 1:
            _check_models([start, end], ["start", "end"])
            w = np.linspace(0.0, 1.0, n + 1)[1:-1]
            stacked = tree_stack([start, end])
            inner = [tree_combine(jnp.asarray([1 - a, a]), stacked) for a in w]
    else:
        inner = list(bends)
        if len(inner) != n - 1:
            raise ValueError(f"a degree-{n} Bézier curve has {n - 1} inner control points, got {len(inner)} bends")
    models = [start, *inner, end]
    names = ["start", *[f"bend[{i}]" for i in range(len(inner))], "end"]
    _check_models(models, names)
    fixed = [True] + [False] * (n - 1) + [True]
    return from_control(tree_stack(models, names=names), "bezier", (n + 1,), fixed)


def polychain(start: PyTree, end: PyTree, num_bends: int = 1, *, bends: Sequence[PyTree] | None = None) -> Connector:
    """Polygonal chain with ``num_bends`` >= 0 bends at ``t = k/(num_bends+1)`` (Garipov's PolyChain).

    Bends start evenly on the straight segment unless given; end points are fixed.
    """
    if int(num_bends) != num_bends or num_bends < 0:
        raise ValueError(f"num_bends must be a non-negative integer, got {num_bends!r}")
    b = int(num_bends)
    if bends is None:
        _check_models([start, end], ["start", "end"])
        w = np.linspace(0.0, 1.0, b + 2)[1:-1]
        stacked = tree_stack([start, end])
        inner = [tree_combine(jnp.asarray([1 - a, a]), stacked) for a in w]
    else:
        inner = list(bends)
        if len(inner) != b:
            raise ValueError(f"expected {b} bends, got {len(inner)}")
    models = [start, *inner, end]
    names = ["start", *[f"bend[{i}]" for i in range(b)], "end"]
    _check_models(models, names)
    return from_control(tree_stack(models, names=names), "polychain", (b + 2,), [True] + [False] * b + [True])


def bilinear_coefficients(n: int, m: int) -> np.ndarray:
    """Weights ``[(n+1)(m+1), 4]`` of the corners (c00, c0m, cn0, cnm) in the bilinear initialisation.

    Seed 000 Algorithm 2 lines 1-6 / appendix A.2: ``theta_ij = (1-t)(1-s) theta_00 + t(1-s) theta_n0 +
    (1-t)s theta_0m + ts theta_nm`` with ``t = i/n``, ``s = j/m``. (Degree-0 directions use t = 0.)
    """
    t = np.arange(n + 1) / max(n, 1)
    s = np.arange(m + 1) / max(m, 1)
    tt, ss = np.meshgrid(t, s, indexing="ij")
    w = np.stack([(1 - tt) * (1 - ss), (1 - tt) * ss, tt * (1 - ss), tt * ss], axis=-1)
    return w.reshape(-1, 4)


def bezier_surface(c00: PyTree, c0m: PyTree, cn0: PyTree, cnm: PyTree, n: int = 2, m: int = 2) -> Connector:
    """Tensor-product Bézier surface with an (n+1) x (m+1) control grid (seed 000 eq. 3-6).

    Corners: ``phi(0,0) = c00``, ``phi(0,1) = c0m``, ``phi(1,0) = cn0``, ``phi(1,1) = cnm`` exactly; they
    are fixed. Interior and edge control points are initialised bilinearly (Algorithm 2, lines 1-6), so
    the untrained surface equals the bilinear surface of the four corners at every (u, v): degree
    elevation of a bilinear patch places its control points at the bilinear values of (i/n, j/m).
    """
    for name, d in (("n", n), ("m", m)):
        if int(d) != d or d < 1:
            raise ValueError(f"surface degree {name} must be an integer >= 1 (>= 2 control points), got {d!r}")
    n, m = int(n), int(m)
    corners = [c00, c0m, cn0, cnm]
    _check_models(corners, ["c00", "c0m", "cn0", "cnm"])
    w = bilinear_coefficients(n, m)
    control = tree_combine(jnp.asarray(w), tree_stack(corners))
    # Corners exactly equal to the given models (no rounding from the weighted sum).
    corner_idx = [0, m, n * (m + 1), n * (m + 1) + m]
    control = jax.tree_util.tree_map(
        lambda c, *cs: c.at[jnp.asarray(corner_idx)].set(jnp.stack(cs)), control, *corners)
    fixed = np.zeros((n + 1, m + 1), dtype=bool)
    fixed[0, 0] = fixed[0, m] = fixed[n, 0] = fixed[n, m] = True
    return from_control(control, "surface", (n + 1, m + 1), fixed.reshape(-1))


def bilinear_surface(c00: PyTree, c01: PyTree, c10: PyTree, c11: PyTree) -> Connector:
    """The four-corner bilinear surface ``(1-u)(1-v) c00 + (1-u)v c01 + u(1-v) c10 + uv c11``.

    Seed 000 appendix A.2/A.3. For n = m = 2 the seed writes it through coefficients C_00 ... C_22; those
    reduce to the bilinear weights above (see ``tests/test_connectors.py``).
    """
    return bezier_surface(c00, c01, c10, c11, n=1, m=1)


def simplex(models: Sequence[PyTree], *, fixed: bool = True) -> Connector:
    """Barycentric combinations of K >= 2 models (seed 000 §4.1, Figure 3 uses K = 3)."""
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"a simplex needs at least 2 models, got {len(models)}")
    names = [f"model[{i}]" for i in range(len(models))]
    _check_models(models, names)
    return from_control(tree_stack(models, names=names), "simplex", (len(models),), [fixed] * len(models))

