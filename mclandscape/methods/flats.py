"""Flats and their voxel lattices: the m-dimensional subspaces explored by the volume measurement.

Implements §4.1-4.2 of N. Schager, "Volumetric investigation into neural network loss landscapes" (Bachelor's
thesis, Universität Kassel, 2025); section numbers below refer to it.

- **Flats** (§4.2.1-4.2.2): from m+1 minima θ_0..θ_m the directions b_i = θ_i − θ_anchor span an m-dimensional
  affine subspace anchored at a chosen minimum, with either the raw basis B = [b_1..b_m] or its QR
  orthonormalisation Q (§2.5, §4.2.1). :func:`full_space_flat` explores the whole parameter space of a
  low-dimensional network (§5.1, "B = None" in Algorithm 3). :attr:`Flat.raw_angles_deg` are the angles
  between the raw basis vectors (§6.3).
- **Lattice** (§4.1, §4.3.1): an integer coordinate a ∈ Z^m maps to θ(a) = θ* + s·B·a, computed from the
  integers every time, so the traversal never compares floating-point positions. A batch of voxels is a
  family of :class:`~mclandscape.engine.points.Points`: coefficient rows ``[1, s·a_1, ..., s·a_m]`` over
  the stack ``[θ*, b_1, ..., b_m]`` (:meth:`Flat.lattice_points`; for the full space ``[θ*, e_1, ..., e_d]``).
  §4.1 writes a ∈ Z^d; inside a flat the lattice is Z^m (Z^d only for the full space).

Example:
    >>> import jax.numpy as jnp
    >>> full_space_flat(jnp.zeros(3)).dim
    3
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mclandscape.core._checks import choice, integer, real
from mclandscape.core.tree import PyTree, check_finite, check_same_structure, tree_combine, tree_ravel
from mclandscape.engine.points import Points

__all__ = ["Flat", "flat_from_minima", "full_space_flat"]



@dataclasses.dataclass(frozen=True, eq=False)
class Flat:
    """An m-dimensional affine subspace θ* + span(B) of parameter space (§4.2).

    Attributes:
      anchor: θ* as a flat vector ``[d]`` (exactly the anchor minimum's parameters).
      basis: ``[d, m]`` columns (raw differences b_i or their QR orthonormalisation Q), or ``None`` for the
        full parameter space (m = d, B = I).
      kind: ``"qr"``, ``"raw"`` or ``"full"``.
      unravel: flat vector -> parameter pytree (hashable by the parameter structure).
      raw_angles_deg: ``[m, m]`` angles between the raw basis vectors b_i (§6.3), ``None`` for ``full``.
      raw_norms: lengths |b_i|.
      minima_coords: ``[m+1, m]`` coordinates of every minimum in the flat at step 1 (θ_j = θ* + B c_j);
        divide by s for lattice coordinates (the anchor is the origin).
      cell_factor: sqrt(det BᵀB), the m-volume of a unit lattice cell (1 for ``qr`` and ``full``), so a
        voxel of step s has volume ``cell_factor · s^m``.
      anchor_index: which of the minima is θ*.
      stack: ``[m+1, d]``, θ* then the basis vectors b_1..b_m (e_1..e_d for the full space): the stack the
        lattice rows combine (a one-leaf tree of :class:`~mclandscape.engine.points.Points`), formed once when
        the flat is made.

    Example:
        >>> import jax.numpy as jnp
        >>> flat = flat_from_minima([jnp.zeros(3), jnp.array([2.0, 0.0, 0.0]), jnp.array([0.0, 0.0, 1.0])])
        >>> flat.dim, flat.ambient_dim, flat.point([[1, 2]], 0.5).tolist()
        (2, 3, [[0.5, 0.0, 1.0]])
    """

    anchor: jax.Array
    basis: jax.Array | None
    kind: str
    unravel: Callable[[jax.Array], PyTree]
    raw_angles_deg: np.ndarray | None = None
    raw_norms: np.ndarray | None = None
    minima_coords: np.ndarray | None = None
    cell_factor: float = 1.0
    anchor_index: int = 0
    stack: jax.Array = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        dtype = self.anchor.dtype
        dirs = jnp.eye(self.ambient_dim, dtype=dtype) if self.basis is None else jnp.asarray(self.basis, dtype).T
        object.__setattr__(self, "stack", jnp.concatenate([self.anchor[None, :], dirs], axis=0))

    @property
    def dim(self) -> int:
        """m, the dimension of the lattice."""
        return int(self.anchor.shape[0]) if self.basis is None else int(self.basis.shape[1])

    @property
    def ambient_dim(self) -> int:
        """d, the number of parameters."""
        return int(self.anchor.shape[0])

    def cell_volume(self, step: float) -> float:
        """m-volume of one voxel, ``cell_factor · s^m``.

        Args:
          step: the step width s > 0.

        Returns:
          The volume as a Python float.
        """
        return float(self.cell_factor * step ** self.dim)

    def lattice_rows(self, coords, step: float) -> np.ndarray:
        """The coefficient rows ``[K, m+1]`` = ``[1, s·a_1, ..., s·a_m]`` of integer voxels ``coords [K, m]``.

        Args:
          coords: integer lattice coordinates, shape ``[K, m]``.
          step: the step width s > 0.

        Returns:
          NumPy rows in the anchor's dtype (s·a_i is rounded once, the same bits for a voxel every time).

        Raises:
          ValueError: non-integer coordinates, a wrong shape, or a coordinate too large for the anchor's dtype
            to hold exactly (beyond 2^24 in float32), where two voxels could share one row.
        """
        step = _check_step(step)
        a = _check_coords(coords, self.dim)
        dtype = np.dtype(self.anchor.dtype)
        exact = 2 ** (int(jnp.finfo(dtype).nmant) + 1)
        if a.size and max(-int(a.min()), int(a.max())) > exact:
            raise ValueError(f"a lattice coordinate exceeds {exact}, beyond which {dtype} cannot hold it exactly; "
                             "use a larger step or bound the traversal with `limit` or `radius`")
        return np.concatenate([np.ones((a.shape[0], 1), dtype), a.astype(dtype) * dtype.type(step)], axis=1)

    def lattice_points(self, coords, step: float) -> Points:
        """The voxels ``coords [K, m]`` at step width s as :class:`~mclandscape.engine.points.Points`.

        Args:
          coords: integer lattice coordinates ``[K, m]``.
          step: the step width s > 0.

        Returns:
          Rows :meth:`lattice_rows` over :attr:`stack`; each point is the raveled vector θ(a) = θ* + s·B·a.
        """
        return Points(rows=jnp.asarray(self.lattice_rows(coords, step)), stack=self.stack)

    def point(self, coords, step: float) -> jax.Array:
        """θ(a) = θ* + s·B·a for integer coordinates ``coords`` ``[..., m]`` (§4.2.2).

        Args:
          coords: integers whose last axis has size m.
          step: the step width s > 0.

        Returns:
          ``[..., d]`` parameter vectors (the origin is θ* exactly).
        """
        a = np.atleast_1d(coords)
        out = tree_combine(jnp.asarray(self.lattice_rows(a.reshape(-1, a.shape[-1]), step)), self.stack)
        return out.reshape(a.shape[:-1] + (self.ambient_dim,))

    def params(self, coords, step: float) -> PyTree:
        """θ(a) as a parameter pytree.

        Args:
          coords: one voxel, integers of shape ``[m]``.
          step: the step width s > 0.

        Returns:
          The parameters, structured like the minima.
        """
        a = np.asarray(coords)
        if a.shape != (self.dim,):
            raise ValueError(f"params() takes one voxel of shape ({self.dim},), got {a.shape}")
        return self.unravel(self.point(a, step))

    def describe(self) -> dict:
        """JSON-serialisable summary (kind, m, d, angles, norms, minima coordinates, cell factor)."""
        out = {k: getattr(self, k) for k in ("kind", "dim", "ambient_dim", "anchor_index", "cell_factor")}
        for k in ("raw_angles_deg", "raw_norms", "minima_coords"):
            out[k] = None if getattr(self, k) is None else getattr(self, k).tolist()
        return out


def _check_coords(coords, dim: int) -> np.ndarray:
    a = np.asarray(coords)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"lattice coordinates must be integers, got dtype {a.dtype}")
    if a.ndim != 2 or a.shape[1] != dim:
        raise ValueError(f"coords must have shape [K, {dim}] (K voxels of an m={dim} lattice), got {a.shape}")
    return a


@dataclasses.dataclass(frozen=True)
class _Unravel:
    """Flat vector -> parameter tree, as ``jax.flatten_util.ravel_pytree`` orders the leaves; hashable by
    value (tree structure, shapes, dtypes), so losses built for the same architecture share compiled code."""

    treedef: Any
    shapes: tuple
    dtypes: tuple

    @classmethod
    def of(cls, tree: PyTree) -> _Unravel:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        return cls(treedef, tuple(tuple(int(s) for s in np.shape(a)) for a in leaves),
                   tuple(jnp.result_type(a).name for a in leaves))

    def __call__(self, vec: jax.Array) -> PyTree:
        parts = jnp.split(vec, np.cumsum([math.prod(shape) for shape in self.shapes])[:-1])
        return jax.tree_util.tree_unflatten(self.treedef, [
            x.reshape(shape).astype(dtype) for x, shape, dtype in zip(parts, self.shapes, self.dtypes, strict=True)])


def _ravel_minima(minima: Sequence[PyTree]):
    """The minima as flat vectors, checked (one structure, floating and finite), and their common unravel."""
    vecs = []
    for i, p in enumerate(minima):
        check_same_structure(minima[0], p, names=("minima[0]", f"minima[{i}]"))
        check_finite(p, f"minima[{i}]")
        v, _ = tree_ravel(p)
        if not jnp.issubdtype(v.dtype, jnp.floating):
            raise ValueError(f"minima[{i}] has non-floating parameters (dtype {v.dtype})")
        vecs.append(v)
    return vecs, _Unravel.of(minima[0])


def flat_from_minima(
    minima: Sequence[PyTree],
    *,
    anchor: int = 0,
    basis: str = "qr",
    rtol: float = 1e-4,
) -> Flat:
    """The flat through m+1 minima (§4.2.1): b_i = θ_i − θ_anchor, raw or QR-orthonormalised.

    Args:
      minima: same-structured parameter pytrees (at least two).
      anchor: index of θ* (the origin of the lattice); the other minima give the directions in their order.
      basis: ``"qr"`` orthonormalises B = [b_1..b_m] by a tall-skinny Householder QR in float64 on the host
        (``d × m``; d can be millions), with signs chosen so diag(R) > 0 (q_1 points along b_1); ``"raw"``
        keeps B itself (§5.4).
      rtol: relative tolerance of the linear-independence check.

    Returns:
      The :class:`Flat`.

    Raises:
      ValueError: fewer than two minima, an anchor out of range, an unknown basis, or linearly dependent
        minima (some b_i has a component orthogonal to b_1..b_{i-1} below ``rtol·|b_i|``, including b_i = 0).

    Example:
        >>> import jax.numpy as jnp
        >>> minima = [{"w": jnp.zeros(2)}, {"w": jnp.array([3.0, 0.0])}, {"w": jnp.array([1.0, 1.0])}]
        >>> qr = flat_from_minima(minima)
        >>> qr.minima_coords.round(3).tolist(), round(float(qr.raw_angles_deg[0, 1]), 1)
        ([[0.0, 0.0], [3.0, 0.0], [1.0, 1.0]], 45.0)
        >>> flat_from_minima(minima, basis="raw").cell_factor  # |det [b_1 b_2]|
        3.0
    """
    minima = list(minima)
    if len(minima) < 2:
        raise ValueError(f"a flat needs at least two minima (m+1 >= 2 for an m-dimensional flat), got {len(minima)}")
    choice(basis, "basis", ("qr", "raw"))
    anchor = choice(integer(anchor, "anchor"), "anchor", range(len(minima)))
    rtol = real(rtol, "rtol", low=0, low_open=True)
    vecs, unravel = _ravel_minima(minima)
    theta0 = vecs[anchor]
    order = [i for i in range(len(minima)) if i != anchor]
    t0 = np.asarray(theta0, np.float64)
    b = np.stack([np.asarray(vecs[i], np.float64) - t0 for i in order], axis=1)  # [d, m], exact differences
    d, m = b.shape
    if m > d:
        raise ValueError(f"{m + 1} minima are linearly dependent in a {d}-dimensional parameter space "
                         f"(at most {d + 1} minima span a flat)")
    norms = np.linalg.norm(b, axis=0)
    for j, i in enumerate(order):
        if norms[j] == 0:
            raise ValueError(f"minima[{i}] equals the anchor minima[{anchor}]: b = 0 spans no direction")
    # QR with diag(R) > 0 (q_1 along b_1); a direction whose component orthogonal to the earlier ones is below
    # rtol times its length makes the minima linearly dependent
    q, r = np.linalg.qr(b, mode="reduced")
    sign = np.where(np.diag(r) < 0, -1.0, 1.0)
    q, r = q * sign[None, :], r * sign[:, None]
    rel = np.abs(np.diag(r)) / norms
    for j, i in enumerate(order):
        if rel[j] < rtol:
            raise ValueError(f"minima are linearly dependent: b = minima[{i}] - minima[{anchor}] lies in the span of "
                             f"the previous directions up to a relative residual {rel[j]:.3g} < rtol={rtol:g}")
    angles = np.degrees(np.arccos(np.clip(b.T @ b / np.outer(norms, norms), -1.0, 1.0)))
    np.fill_diagonal(angles, 0.0)
    qr = basis == "qr"
    minima_coords = np.zeros((len(minima), m))
    minima_coords[order] = (r if qr else np.eye(m)).T  # b_j = Q r_j
    return Flat(anchor=theta0, basis=jnp.asarray(q if qr else b, theta0.dtype), kind=basis, unravel=unravel,
                raw_angles_deg=angles, raw_norms=norms, minima_coords=minima_coords,
                cell_factor=1.0 if qr else float(np.prod(np.abs(np.diag(r)))),  # raw: sqrt(det BᵀB) = |det R|
                anchor_index=int(anchor))


def full_space_flat(theta_star: PyTree) -> Flat:
    """The whole parameter space around θ* (m = d, B = I; Algorithm 3 with ``B = None``, §5.1).

    Args:
      theta_star: the minimum (a parameter pytree of floating, finite arrays).

    Returns:
      The :class:`Flat` with ``basis=None``.

    Example:
        >>> import jax.numpy as jnp
        >>> flat = full_space_flat({"b": jnp.array([1.0]), "w": jnp.array([0.0, 2.0])})
        >>> flat.kind, flat.dim, flat.params([0, 1, -1], 0.5)["w"].tolist()  # raveled order: b, w
        ('full', 3, [0.5, 1.5])
    """
    (v,), unravel = _ravel_minima([theta_star])
    return Flat(anchor=v, basis=None, kind="full", unravel=unravel)


def _check_step(step) -> float:
    return real(step, "step width s", low=0, low_open=True)
