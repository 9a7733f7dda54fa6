"""Volumetric exploration of low-loss regions: flats, voxel lattices, the modified BFS and H_c(s).

Implements N. Schager, "Volumetric investigation into neural network loss landscapes" (Bachelor's thesis,
Universität Kassel, 2025); section numbers below refer to it.

- **Flats** (§4.2.1-4.2.2): from m+1 minima θ_0..θ_m the directions b_i = θ_i − θ_anchor span an m-dimensional
  affine subspace anchored at a chosen minimum, with either the raw basis B = [b_1..b_m] or its QR
  orthonormalisation Q (§2.5, §4.2.1). :func:`full_space_flat` explores the whole parameter space of a
  low-dimensional network (§5.1, "B = None" in Algorithm 3). :attr:`Flat.raw_angles_deg` are the angles
  between the raw basis vectors (§6.3).
- **Lattice** (§4.1, §4.3.1): an integer coordinate a ∈ Z^m maps to θ(a) = θ* + s·B·a, computed from the
  integers every time, so the traversal never compares floating-point positions. A batch of voxels is a
  family of points of the one evaluator (:mod:`mclandscape.engine.evaluate`): coefficient rows
  ``[1, s·a_1, ..., s·a_m]`` over the stack ``[θ*, b_1, ..., b_m]`` (:meth:`Flat.lattice_points`; for the
  full space the stack is ``[θ*, e_1, ..., e_d]``). :class:`LatticeLoss` evaluates them with
  :func:`~mclandscape.engine.evaluate.map_points`, which forms each voxel's parameters inside its mapped,
  fixed-shape chunks (and shards the voxels over devices), so a voxel's loss is the same bits in any batch.
- **Losses** (:class:`ParamLoss`): any hashable ``fn(theta, aux)`` of the raveled parameter vector (an
  analytic landscape), or :func:`model_vector_loss`, the model's objective
  (:func:`mclandscape.core.objective.make_objective`, inference mode) on a full batch.
- **Traversal** (Algorithm 3, §4.3.3): :func:`grid_traversal` — threshold c = n·ε with ε = f(θ*) (§4.3.2),
  visited set, FIFO queue, future queue, dropout, random dequeue after ``sampling_switch_iter``, step
  limit. Many frontier voxels are expanded per wave and all their new neighbours are evaluated in one
  vectorised (and, with several devices, sharded) call; with ``dropout = 0`` the waves reproduce the
  one-at-a-time FIFO algorithm exactly (same accepted voxels, same queues, same number of evaluations,
  even when the step limit cuts the run short). Losses, ε and c are held and compared in one dtype, the
  dtype of the losses (float32, or float64 with ``jax_enable_x64``).
- **Heuristic** (§4.3.4): H_c(s) = number of *accepted* voxels (f ≤ c) reached from the origin;
  :func:`h_sweep` computes it for a grid of step widths s and multipliers n, continuing each larger
  threshold from the future queue of the previous one; :func:`fit_log_linear` fits log H = log A + B·c
  with the correlation coefficient R (§6.1).

Deviations from the thesis's text (each a slip; the evident intent is implemented and tested):

- Algorithm 3 returns ``0`` when ``iterations = limit``; here the partial result is returned flagged
  ``truncated=True``, and only when work was actually left (the thesis's test also fires when the queue
  empties exactly at the limit).
- Algorithm 3's ``visited`` set also holds rejected voxels; H_c(s) counts accepted voxels only.
- Continuing with ``queue = future_queue`` (as Algorithm 3's inputs suggest) would expand voxels that were
  never checked against the new threshold; here the future queue is re-checked against the new c from the
  stored losses (no re-evaluation), and voxels still above c stay in the future queue.
- §4.3.3 defines R_c(s) = {a | f(θ* + B a s) ≤ c}, the whole sublevel set; the BFS (and H_c(s)) only
  reaches its connected component that contains the origin (a separate low basin is excluded).
- §4.1 writes a ∈ Z^d; inside a flat the lattice is Z^m (Z^d only for the full space).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mclandscape.core.objective import make_objective
from mclandscape.core.tree import PyTree, check_same_structure, tree_combine, tree_ravel
from mclandscape.engine.points import Points, map_points

__all__ = [
    "Flat",
    "flat_from_minima",
    "full_space_flat",
    "ParamLoss",
    "model_vector_loss",
    "LatticeLoss",
    "LatticeCodec",
    "VoxelStore",
    "KeyQueue",
    "TraversalState",
    "TraversalResult",
    "grid_traversal",
    "HSweep",
    "h_sweep",
    "LogLinearFit",
    "fit_log_linear",
    "mean_log_h",
    "neighbour_offsets",
]


# --------------------------------------------------------------------------------------------------------
# Flats (§4.2)
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Flat:
    """An m-dimensional affine subspace θ* + span(B) of parameter space (§4.2).

    Attributes:
      anchor: θ* as a flat vector ``[d]`` (exactly the anchor minimum's parameters).
      basis: ``[d, m]`` columns (raw differences b_i or their QR orthonormalisation Q), or ``None`` for the
        full parameter space (m = d, B = I).
      kind: ``"qr"``, ``"raw"`` or ``"full"``.
      unravel: flat vector -> parameter pytree.
      raw_angles_deg: ``[m, m]`` angles between the raw basis vectors b_i (§6.3), ``None`` for ``full``.
      raw_norms: lengths |b_i|.
      minima_coords: ``[m+1, m]`` coordinates of every minimum in the flat at step 1 (θ_j = θ* + B c_j);
        divide by s for lattice coordinates (the anchor is the origin).
      cell_factor: sqrt(det BᵀB), the m-volume of a unit lattice cell (1 for ``qr`` and ``full``), so a
        voxel of step s has volume ``cell_factor · s^m``.
      anchor_index: which of the minima is θ*.

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
    raw_angles_deg: np.ndarray | None
    raw_norms: np.ndarray | None
    minima_coords: np.ndarray | None
    cell_factor: float
    anchor_index: int = 0

    @property
    def dim(self) -> int:
        """m, the dimension of the lattice."""
        return int(self.anchor.shape[0]) if self.basis is None else int(self.basis.shape[1])

    @property
    def ambient_dim(self) -> int:
        """d, the number of parameters."""
        return int(self.anchor.shape[0])

    @functools.cached_property
    def stack(self) -> jax.Array:
        """``[m+1, d]``: θ*, then the basis vectors b_1..b_m (e_1..e_d for the full space), the stack the
        lattice rows combine (a one-leaf tree of :class:`~mclandscape.engine.evaluate.Points`)."""
        dtype = self.anchor.dtype
        dirs = jnp.eye(self.ambient_dim, dtype=dtype) if self.basis is None else jnp.asarray(self.basis, dtype).T
        return jnp.concatenate([self.anchor[None, :], dirs], axis=0)

    def cell_volume(self, step: float) -> float:
        """m-volume of one voxel, ``cell_factor · s^m``.

        Args:
          step: the step width s > 0.

        Returns:
          The volume as a Python float.
        """
        _check_step(step)
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
        _check_step(step)
        a = _check_coords(coords, self.dim)
        dtype = np.dtype(self.anchor.dtype)
        exact = 2 ** (int(jnp.finfo(dtype).nmant) + 1)
        if a.size and max(-int(a.min()), int(a.max())) > exact:
            raise ValueError(f"a lattice coordinate exceeds {exact}, beyond which {dtype} cannot hold it exactly; "
                             "use a larger step or bound the traversal with `limit` or `radius`")
        rows = np.empty((a.shape[0], self.dim + 1), dtype)
        rows[:, 0] = 1
        rows[:, 1:] = a.astype(dtype) * dtype.type(step)
        return rows

    def lattice_points(self, coords, step: float) -> Points:
        """The voxels ``coords [K, m]`` at step width s as :class:`~mclandscape.engine.evaluate.Points`.

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
        a = np.asarray(coords)
        if a.ndim == 0 or a.shape[-1] != self.dim:
            raise ValueError(f"lattice coordinates need a last axis of size m={self.dim}, got shape {a.shape}")
        rows = self.lattice_rows(a.reshape(-1, self.dim), step)
        out = tree_combine(jnp.asarray(rows), self.stack)
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
        return {
            "kind": self.kind,
            "dim": self.dim,
            "ambient_dim": self.ambient_dim,
            "anchor_index": self.anchor_index,
            "cell_factor": self.cell_factor,
            "raw_angles_deg": None if self.raw_angles_deg is None else self.raw_angles_deg.tolist(),
            "raw_norms": None if self.raw_norms is None else self.raw_norms.tolist(),
            "minima_coords": None if self.minima_coords is None else self.minima_coords.tolist(),
        }


def _check_coords(coords, dim: int) -> np.ndarray:
    a = np.asarray(coords)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"lattice coordinates must be integers, got dtype {a.dtype}")
    if a.ndim != 2 or a.shape[1] != dim:
        raise ValueError(f"coords must have shape [K, {dim}] (K voxels of an m={dim} lattice), got {a.shape}")
    return a


def _ravel_minima(minima: Sequence[PyTree]):
    minima = list(minima)
    for i in range(1, len(minima)):
        check_same_structure(minima[0], minima[i], names=("minima[0]", f"minima[{i}]"))
    vecs = []
    for i, p in enumerate(minima):
        v, unravel = tree_ravel(p)
        if not jnp.issubdtype(v.dtype, jnp.floating):
            raise ValueError(f"minima[{i}] has non-floating parameters (dtype {v.dtype})")
        if not bool(jnp.all(jnp.isfinite(v))):
            raise ValueError(f"minima[{i}] holds non-finite parameters")
        vecs.append((v, unravel))
    return vecs


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
    if basis not in ("qr", "raw"):
        raise ValueError(f"basis must be 'qr' or 'raw', got {basis!r}")
    if not isinstance(anchor, int | np.integer) or not 0 <= anchor < len(minima):
        raise ValueError(f"anchor must be an index into the {len(minima)} minima, got {anchor!r}")
    if not rtol > 0:
        raise ValueError(f"rtol must be positive, got {rtol}")
    vecs = _ravel_minima(minima)
    theta0, unravel = vecs[anchor]
    dtype = theta0.dtype
    order = [i for i in range(len(minima)) if i != anchor]
    t0 = np.asarray(theta0, np.float64)
    b = np.stack([np.asarray(vecs[i][0], np.float64) - t0 for i in order], axis=1)  # [d, m], exact differences
    d, m = b.shape
    if m > d:
        raise ValueError(f"{m + 1} minima are linearly dependent in a {d}-dimensional parameter space "
                         f"(at most {d + 1} minima span a flat)")
    norms = np.linalg.norm(b, axis=0)
    for j, i in enumerate(order):
        if norms[j] == 0:
            raise ValueError(f"minima[{i}] equals the anchor minima[{anchor}]: b = 0 spans no direction")
    q, r = np.linalg.qr(b, mode="reduced")
    sign = np.where(np.diag(r) < 0, -1.0, 1.0)
    q = q * sign[None, :]
    r = r * sign[:, None]
    rel = np.abs(np.diag(r)) / norms
    for j, i in enumerate(order):
        if rel[j] < rtol:
            raise ValueError(
                f"minima are linearly dependent: b = minima[{i}] - minima[{anchor}] lies in the span of the "
                f"previous directions up to a relative residual {rel[j]:.3g} < rtol={rtol:g}")
    gram = b.T @ b
    cos = gram / np.outer(norms, norms)
    angles = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    np.fill_diagonal(angles, 0.0)
    if basis == "qr":
        used = q
        coords_dirs = r  # b_j = Q r_j
        cell = 1.0
    else:
        used = b
        coords_dirs = np.eye(m)
        cell = float(np.prod(np.abs(np.diag(r))))  # sqrt(det BᵀB)
    minima_coords = np.zeros((len(minima), m))
    for j, i in enumerate(order):
        minima_coords[i] = coords_dirs[:, j]
    return Flat(
        anchor=theta0,
        basis=jnp.asarray(used, dtype),
        kind=basis,
        unravel=unravel,
        raw_angles_deg=angles,
        raw_norms=norms,
        minima_coords=minima_coords,
        cell_factor=cell,
        anchor_index=int(anchor),
    )


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
    (v, unravel), = _ravel_minima([theta_star])
    return Flat(anchor=v, basis=None, kind="full", unravel=unravel, raw_angles_deg=None, raw_norms=None,
                minima_coords=None, cell_factor=1.0, anchor_index=0)


# --------------------------------------------------------------------------------------------------------
# Losses on the lattice
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ParamLoss:
    """A scalar loss f(θ) of a raveled parameter vector θ ∈ R^d: ``fn(theta, aux) -> scalar``.

    ``fn`` is a static argument of the one evaluator's compiled map
    (:func:`~mclandscape.engine.evaluate.map_points`), so it must be hashable: a module-level function, or a
    frozen dataclass (hashed by value). ``aux`` (data, fixed variables) is an ordinary argument, so the same
    ``fn`` compiles once per bucket size and is reused across flats, anchors, step widths and new ``aux``
    values of the same shapes.

    Attributes:
      fn: ``fn(theta [d], aux) -> scalar``.
      aux: any pytree of arrays passed to ``fn`` (``None`` for none).
      dim: d, checked against the flat's number of parameters (optional).
      chunk: voxels per vectorised chunk of the evaluator's ``lax.map``. Every voxel is computed by the
        same fixed-shape kernel whatever the batch size, so its loss is bit-identical in any bucket (a plain
        ``vmap`` over the whole batch is not: XLA picks shape-dependent kernels). θ is formed chunk by
        chunk, so memory stays at ``chunk × d`` floats even when d is in the millions.

    Example:
        >>> import jax.numpy as jnp
        >>> loss = ParamLoss(lambda theta, aux: jnp.sum((theta - aux) ** 2), aux=jnp.ones(2), dim=2)
        >>> float(loss(jnp.array([1.0, 3.0])))
        4.0
    """

    fn: Callable[[jax.Array, Any], jax.Array]
    aux: Any = None
    dim: int | None = None
    chunk: int = 16

    def __post_init__(self):
        if not callable(self.fn):
            raise ValueError(f"fn must be callable fn(theta, aux) -> scalar, got {self.fn!r}")
        try:
            hash(self.fn)
        except TypeError as err:
            raise ValueError(f"fn must be hashable (a module-level function or a frozen dataclass): it is a "
                             f"static argument of the compiled evaluator; got {type(self.fn).__name__}") from err
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int | np.integer) or self.chunk < 1:
            raise ValueError(f"chunk must be a positive integer, got {self.chunk!r}")
        if self.dim is not None and (isinstance(self.dim, bool) or not isinstance(self.dim, int | np.integer)
                                     or self.dim < 1):
            raise ValueError(f"dim must be a positive integer or None, got {self.dim!r}")

    def __call__(self, theta) -> jax.Array:
        """f(θ) of one parameter vector ``[d]`` (not compiled; for checks), a scalar array."""
        return self.fn(jnp.asarray(theta), self.aux)


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
        out, offset = [], 0
        for shape, dtype in zip(self.shapes, self.dtypes, strict=True):
            size = math.prod(shape)
            out.append(vec[offset:offset + size].reshape(shape).astype(dtype))
            offset += size
        return jax.tree_util.tree_unflatten(self.treedef, out)


@dataclasses.dataclass(frozen=True)
class _ObjectiveOfVector:
    """``fn(theta, (objective, batch))``: the objective's value at the parameters ``unravel(theta)``."""

    unravel: _Unravel

    def __call__(self, theta, aux):
        objective, batch = aux
        value, _ = objective(self.unravel(theta), batch, None)
        return value


def _data_xy(data) -> tuple[jax.Array, jax.Array]:
    if hasattr(data, "x") and hasattr(data, "y"):
        x, y = data.x, data.y
    elif isinstance(data, tuple | list) and len(data) == 2:
        x, y = data
    else:
        raise ValueError(f"data must be a Dataset (with .x and .y) or an (x, y) pair, got {type(data).__name__}")
    x, y = jnp.asarray(np.asarray(x)), jnp.asarray(np.asarray(y))
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"data needs as many targets as inputs (at least one): x {x.shape}, y {y.shape}")
    return x, y


def model_vector_loss(model, data, variables: PyTree, *, loss: str | Callable = "cross_entropy",
                      chunk: int = 16) -> ParamLoss:
    """Full-batch mean loss of ``model`` on ``data`` as a function of the raveled parameter vector.

    The loss is the model's objective (:func:`mclandscape.core.objective.make_objective` with the one loss
    registry :func:`mclandscape.core.losses.get_loss`) in inference mode, with every collection of
    ``variables`` but ``params`` (e.g. a BatchNorm model's running statistics) held fixed.

    Args:
      model: a :class:`mclandscape.engine.models.Model`.
      data: a :class:`mclandscape.engine.data.Dataset` (or any object with ``x`` and ``y``, or an ``(x, y)``
        pair) small enough for one batch (Iris, synthetic sets; §5.1-5.2).
      variables: the model's variables: ``variables['params']`` gives the parameter structure (raveled in the
        order of :func:`flat_from_minima`), the other collections stay at their values.
      loss: ``"cross_entropy"``, ``"mse"``, ``"mse_onehot"`` or a per-example callable
        ``(outputs, targets) -> [N]``.
      chunk: see :class:`ParamLoss`.

    Returns:
      A :class:`ParamLoss` with ``dim`` = the number of parameters. Its ``fn`` hashes by the parameter
      structure, its objective and data are ``aux``, so a second loss for the same model and shapes reuses
      the compiled evaluator.

    Raises:
      ValueError: variables without ``params``, an unknown loss, mismatched data, or a BatchNorm model
        without running statistics in ``variables``.

    Example:
        >>> import jax, numpy as np
        >>> from mclandscape.engine.models import get_model
        >>> model = get_model("mlp", widths=[2], num_classes=2)
        >>> x, y = np.ones((4, 2), np.float32), np.array([0, 1, 0, 1])
        >>> loss = model_vector_loss(model, (x, y), model.init(jax.random.key(0), x))
        >>> loss.dim  # (2·2 + 2) + (2·2 + 2) parameters
        12
    """
    if not hasattr(variables, "items") or "params" not in variables:
        raise ValueError("variables must be a dict of collections with a 'params' entry")
    x, y = _data_xy(data)
    objective = make_objective(model, loss, train=False, variables=variables)
    vec, _ = tree_ravel(variables["params"])
    return ParamLoss(fn=_ObjectiveOfVector(_Unravel.of(variables["params"])), aux=(objective, (x, y)),
                     dim=int(vec.shape[0]), chunk=chunk)


@dataclasses.dataclass(frozen=True, eq=False)
class LatticeLoss:
    """f(θ* + s·B·a) for batches of integer voxels a: the evaluator used by :func:`grid_traversal`.

    Calls take ``coords [K, m]`` (integers) and return the losses ``[K]`` (float32, or float64 for a float64
    loss). Batches are cut into pieces of at most ``max_batch`` voxels, each padded (with the origin) to a
    power-of-two bucket that is a multiple of the loss's ``chunk`` times the device count, so only a handful
    of shapes are ever compiled; each piece is :meth:`Flat.lattice_points` evaluated by
    :func:`~mclandscape.engine.evaluate.map_points` (``lax.map`` over chunks, sharded over devices), so
    every voxel's loss is the same bits in any bucket and on any number of devices.

    Attributes:
      flat: the :class:`Flat`.
      step: the step width s > 0.
      loss: the :class:`ParamLoss`.
      max_batch: most voxels per evaluator call.
      devices: how many devices to shard the voxels over (default all).

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> ev = LatticeLoss(full_space_flat(jnp.zeros(2)), 0.5, ParamLoss(lambda t, aux: 1.0 + jnp.sum(t ** 2)))
        >>> ev(np.array([[0, 0], [1, -2]])).tolist(), ev.bucket(3)
        ([1.0, 2.25], 16)
    """

    flat: Flat
    step: float
    loss: ParamLoss
    max_batch: int = 4096
    devices: int | None = None

    def __post_init__(self):
        _check_step(self.step)
        if not isinstance(self.flat, Flat):
            raise ValueError(f"flat must be a Flat, got {type(self.flat).__name__}")
        if not isinstance(self.loss, ParamLoss):
            raise ValueError(f"loss must be a ParamLoss, got {type(self.loss).__name__}")
        if self.loss.dim is not None and self.loss.dim != self.flat.ambient_dim:
            raise ValueError(f"loss is defined on {self.loss.dim} parameters but the flat lives in "
                             f"{self.flat.ambient_dim}")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int | np.integer) or self.max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {self.max_batch!r}")
        avail = jax.device_count()
        if self.devices is not None and (isinstance(self.devices, bool) or not isinstance(self.devices, int | np.integer)
                                         or not 1 <= self.devices <= avail):
            raise ValueError(f"devices must be None or an integer in [1, {avail}], got {self.devices!r}")

    @property
    def dim(self) -> int:
        """m, the lattice dimension."""
        return self.flat.dim

    @property
    def num_devices(self) -> int:
        """Devices the voxels are sharded over."""
        return jax.device_count() if self.devices is None else int(self.devices)

    def bucket(self, k: int, ndev: int | None = None) -> int:
        """Padded size used for ``k`` voxels.

        Args:
          k: the number of voxels.
          ndev: the device count (default :attr:`num_devices`).

        Returns:
          A power of two ≥ ``k``, rounded up to a multiple of ``chunk · ndev``.
        """
        unit = int(self.loss.chunk) * (self.num_devices if ndev is None else int(ndev))
        b = 1 << max(0, math.ceil(math.log2(max(k, 1))))
        return -(-b // unit) * unit

    def __call__(self, coords) -> np.ndarray:
        """The losses of the voxels ``coords``.

        Args:
          coords: integer lattice coordinates ``[K, m]``.

        Returns:
          ``[K]`` losses as NumPy values in the loss's dtype (float32, or float64 for a float64 loss; also for
          ``K = 0``).
        """
        a = _check_coords(coords, self.dim)
        ndev = self.num_devices
        stack = self.flat.stack
        outs = []
        for lo in range(0, a.shape[0], self.max_batch):
            piece = a[lo:lo + self.max_batch]
            k = piece.shape[0]
            padded = np.zeros((self.bucket(k, ndev), self.dim), a.dtype)
            padded[:k] = piece
            rows = self.flat.lattice_rows(padded, self.step)
            vals = map_points(self.loss.fn, Points(rows=rows, stack=stack), self.loss.aux, strategy="map",
                              chunk_size=int(self.loss.chunk), devices=ndev)
            if vals.shape != (rows.shape[0],) or not np.issubdtype(vals.dtype, np.floating):
                raise ValueError(f"the loss must return one floating scalar per voxel; got {vals.dtype} values "
                                 f"of shape {vals.shape[1:]} per voxel")
            outs.append(vals[:k])
        if not outs:  # no voxels: the dtype the loss would return (traced, nothing compiled or run)
            point = jax.ShapeDtypeStruct((self.flat.ambient_dim,), jnp.promote_types(jnp.float32, stack.dtype))
            return np.zeros(0, jax.eval_shape(self.loss.fn, point, self.loss.aux).dtype)
        return np.concatenate(outs)


# --------------------------------------------------------------------------------------------------------
# Compact integer storage
# --------------------------------------------------------------------------------------------------------


class LatticeCodec:
    """Packs integer coordinates ``[K, m]`` into non-negative int64 keys (⌊63/m⌋ bits per axis).

    Coordinates must lie in ``[-2^(b-1), 2^(b-1) - 1]`` with b = ⌊63/m⌋ (b ≥ 4, so m ≤ 15); anything outside
    raises ``ValueError`` (never wrapped or clipped).

    Args:
      dim: the lattice dimension m (1..15).

    Example:
        >>> import numpy as np
        >>> codec = LatticeCodec(2)
        >>> keys = codec.pack(np.array([[0, 0], [-3, 5]]))
        >>> codec.bits, codec.unpack(keys).tolist()
        (31, [[0, 0], [-3, 5]])
    """

    def __init__(self, dim: int):
        if not isinstance(dim, int | np.integer) or dim < 1:
            raise ValueError(f"lattice dimension must be a positive integer, got {dim!r}")
        bits = 63 // int(dim)
        if bits < 4:
            raise ValueError(f"lattice dimension m={dim} is too large for packed int64 voxel keys (max 15)")
        self.dim = int(dim)
        self.bits = bits
        self.offset = 1 << (bits - 1)
        self.mask = (1 << bits) - 1
        self.shifts = np.arange(self.dim, dtype=np.int64) * bits

    @property
    def max_coord(self) -> int:
        return self.offset - 1

    def pack(self, coords) -> np.ndarray:
        """Keys of integer coordinates.

        Args:
          coords: ``[K, m]`` integers inside the packable range.

        Returns:
          ``[K]`` non-negative int64 keys.
        """
        a = np.asarray(coords, np.int64)
        if a.ndim != 2 or a.shape[1] != self.dim:
            raise ValueError(f"coords must have shape [K, {self.dim}], got {a.shape}")
        if a.size and (a.min() < -self.offset or a.max() > self.offset - 1):
            raise ValueError(
                f"a voxel coordinate left the packable range [{-self.offset}, {self.offset - 1}] of an "
                f"m={self.dim} lattice; bound the traversal with `limit` or `radius`, or use a larger step")
        return np.bitwise_or.reduce((a + self.offset) << self.shifts[None, :], axis=1)

    def unpack(self, keys) -> np.ndarray:
        """The inverse of :meth:`pack`.

        Args:
          keys: ``[K]`` keys.

        Returns:
          ``[K, m]`` int64 coordinates.
        """
        k = np.asarray(keys, np.int64).reshape(-1)
        return ((k[:, None] >> self.shifts[None, :]) & self.mask) - self.offset


_EMPTY = np.int64(-1)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


class VoxelStore:
    """Visited voxels and their losses: an open-addressing hash table of int64 keys with floating values.

    Vectorised over batches of keys (linear probing, multiplicative hashing, load ≤ 1/2): 12 bytes per slot
    with float32 values (16 with float64), i.e. 24-48 bytes per visited voxel, so 10^7 voxels take a few
    hundred MiB.

    Args:
      capacity: initial number of slots (rounded up to a power of two; the table grows as needed).
      dtype: the dtype of the stored losses (values are stored exactly in it).

    Example:
        >>> import numpy as np
        >>> store = VoxelStore(dtype=np.float64)
        >>> store.insert([7, 3], [0.5, 0.25])
        >>> len(store), store.contains([3, 4]).tolist(), store.get([7]).tolist()
        (2, [True, False], [0.5])
    """

    max_load = 0.5

    def __init__(self, capacity: int = 1024, dtype=np.float32):
        dtype = np.dtype(dtype)
        if not np.issubdtype(dtype, np.floating):
            raise ValueError(f"the stored losses need a floating dtype, got {dtype}")
        self.dtype = dtype
        self._alloc(max(16, 1 << math.ceil(math.log2(max(capacity, 1)))))

    def _alloc(self, cap: int):
        self._keys = np.full(cap, _EMPTY, np.int64)
        self._vals = np.zeros(cap, self.dtype)
        self._size = 0
        self._mask = np.int64(cap - 1)
        self._shift = np.uint64(64 - int(math.log2(cap)))

    @property
    def capacity(self) -> int:
        return int(self._keys.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self._keys.nbytes + self._vals.nbytes)

    def __len__(self) -> int:
        return self._size

    def _hash(self, keys: np.ndarray) -> np.ndarray:
        return ((keys.astype(np.uint64) * _GOLDEN) >> self._shift).astype(np.int64)

    def _probe(self, keys: np.ndarray):
        """Slot of each key, or of the empty slot that ends its probe sequence; and whether it was found."""
        n = keys.shape[0]
        out = np.empty(n, np.int64)
        found = np.zeros(n, bool)
        idx = np.arange(n)
        kk = keys
        s = self._hash(keys)
        while idx.size:
            tk = self._keys[s]
            hit = tk == kk
            done = hit | (tk == _EMPTY)
            out[idx[done]] = s[done]
            found[idx[hit]] = True
            keep = ~done
            idx, kk, s = idx[keep], kk[keep], (s[keep] + 1) & self._mask
        return out, found

    def contains(self, keys) -> np.ndarray:
        """``[K]`` booleans: which of ``keys`` are stored."""
        keys = np.asarray(keys, np.int64).reshape(-1)
        return self._probe(keys)[1]

    def get(self, keys) -> np.ndarray:
        """Stored losses of ``keys`` (all must be present)."""
        keys = np.asarray(keys, np.int64).reshape(-1)
        slots, found = self._probe(keys)
        if not found.all():
            raise KeyError(f"{int((~found).sum())} voxel key(s) are not in the store")
        return self._vals[slots]

    def insert(self, keys, values) -> None:
        """Add new distinct keys with their values (a key already present raises ``ValueError``)."""
        keys = np.asarray(keys, np.int64).reshape(-1)
        values = np.asarray(values, self.dtype).reshape(-1)
        if keys.shape != values.shape:
            raise ValueError(f"{keys.shape[0]} keys but {values.shape[0]} values")
        if keys.size == 0:
            return
        if keys.min() < 0:
            raise ValueError("voxel keys must be non-negative")
        if (self._size + keys.size) > self.max_load * self.capacity:
            self._grow(self._size + keys.size)
        if self._probe(keys)[1].any():
            raise ValueError("insert() got a key that is already stored")
        self._place(keys, values)

    def _place(self, keys, values):
        idx = np.arange(keys.shape[0])
        s = self._hash(keys)
        while idx.size:
            free = np.flatnonzero(self._keys[s] == _EMPTY)
            placed = np.zeros(idx.size, bool)
            if free.size:
                _, first = np.unique(s[free], return_index=True)
                win = free[first]
                self._keys[s[win]] = keys[idx[win]]
                self._vals[s[win]] = values[idx[win]]
                placed[win] = True
            keep = ~placed
            idx, s = idx[keep], (s[keep] + 1) & self._mask
        self._size += keys.shape[0]

    def _grow(self, need: int):
        old_k, old_v = self.items()
        cap = self.capacity
        while need > self.max_load * cap:
            cap *= 2
        self._alloc(cap)
        self._place(old_k, old_v)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, values) of all stored voxels, in slot order."""
        used = self._keys != _EMPTY
        return self._keys[used], self._vals[used]

    def copy(self) -> VoxelStore:
        new = VoxelStore.__new__(VoxelStore)
        new.dtype = self.dtype
        new._keys, new._vals = self._keys.copy(), self._vals.copy()
        new._size, new._mask, new._shift = self._size, self._mask, self._shift
        return new


class KeyQueue:
    """A growable int64 queue: FIFO pops from the front, uniform random pops, appends at the back.

    Args:
      capacity: initial buffer size (it grows as needed).

    Example:
        >>> q = KeyQueue()
        >>> q.push([4, 5, 6])
        >>> q.pop_front(2).tolist(), len(q)
        ([4, 5], 1)
    """

    def __init__(self, capacity: int = 256):
        self._buf = np.empty(max(16, int(capacity)), np.int64)
        self._head = 0
        self._tail = 0

    def __len__(self) -> int:
        return self._tail - self._head

    @property
    def nbytes(self) -> int:
        return int(self._buf.nbytes)

    def push(self, keys) -> None:
        """Append ``keys`` (int64) at the back."""
        keys = np.asarray(keys, np.int64).reshape(-1)
        n = keys.size
        if n == 0:
            return
        if self._tail + n > self._buf.shape[0]:
            live = len(self)
            cap = self._buf.shape[0]
            while live + n > cap // 2 and live + n > cap - cap // 4:
                cap *= 2
            buf = np.empty(cap, np.int64) if cap != self._buf.shape[0] else self._buf
            buf[:live] = self._buf[self._head:self._tail]
            self._buf, self._head, self._tail = buf, 0, live
        self._buf[self._tail:self._tail + n] = keys
        self._tail += n

    def pop_front(self, k: int) -> np.ndarray:
        """Remove and return the first ``k`` keys (fewer if the queue is shorter)."""
        k = min(int(k), len(self))
        out = self._buf[self._head:self._head + k].copy()
        self._head += k
        if self._head == self._tail:
            self._head = self._tail = 0
        return out

    def pop_random(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """Pop ``k`` keys one after another, each uniformly from what is left (swap with the last)."""
        k = min(int(k), len(self))
        out = np.empty(k, np.int64)
        buf = self._buf
        for j in range(k):
            i = self._head + int(rng.integers(self._tail - self._head))
            out[j] = buf[i]
            self._tail -= 1
            buf[i] = buf[self._tail]
        if self._head == self._tail:
            self._head = self._tail = 0
        return out

    def take_all(self) -> np.ndarray:
        """Remove and return every key in order."""
        return self.pop_front(len(self))

    def to_array(self) -> np.ndarray:
        """A copy of the queued keys in order (the queue is unchanged)."""
        return self._buf[self._head:self._tail].copy()

    def copy(self) -> KeyQueue:
        new = KeyQueue(len(self) + 16)
        new.push(self.to_array())
        return new


# --------------------------------------------------------------------------------------------------------
# The modified BFS (Algorithm 3)
# --------------------------------------------------------------------------------------------------------


class TraversalState:
    """The memory of Algorithm 3 between calls: visited voxels with their losses, queue and future queue.

    A voxel is *accepted* when its loss is ≤ the current threshold c; every visited voxel was evaluated once
    and its loss kept, so accepted = {visited voxels with loss ≤ c} and the future queue holds exactly the
    visited voxels above c. :func:`grid_traversal` updates the state in place; use :meth:`copy` to keep one.

    Losses, ε and every threshold are held in one dtype (``dtype``: that of the losses at the origin,
    float32 or float64), and every comparison ``f ≤ c`` is made in it, so a voxel whose loss equals c is
    accepted whether it is met fresh or re-checked from the store.

    Args:
      dim: the lattice dimension m.
      epsilon: ε = f(θ*), the loss at the origin (rounded to ``dtype``).
      dtype: the floating dtype of the losses.

    Example:
        >>> import numpy as np
        >>> st = TraversalState(2, 0.1, dtype=np.float32)
        >>> st.epsilon == float(np.float32(0.1)), bool(st.threshold_for(3.0) == np.float32(3 * st.epsilon))
        (True, True)
    """

    def __init__(self, dim: int, epsilon: float, dtype=np.float32):
        self.codec = LatticeCodec(dim)
        self.store = VoxelStore(dtype=dtype)
        self.queue = KeyQueue()
        self.future = KeyQueue()
        self.epsilon = float(self.store.dtype.type(epsilon))  # held exactly as the losses are
        self.threshold = self.store.dtype.type(-np.inf)
        self.accepted = 0
        self.evaluations = 0

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the losses, ε and the thresholds."""
        return self.store.dtype

    def threshold_for(self, n: float):
        """The threshold for multiplier ``n``.

        Args:
          n: the multiplier (c = n·ε).

        Returns:
          c as a NumPy scalar of :attr:`dtype` (the float64 product rounded once).
        """
        return _threshold(n, self.epsilon, self.dtype)

    @property
    def dim(self) -> int:
        return self.codec.dim

    @property
    def visited(self) -> int:
        return len(self.store)

    @property
    def nbytes(self) -> int:
        """Bytes held by the NumPy buffers (hash table, queue, future queue)."""
        return self.store.nbytes + self.queue.nbytes + self.future.nbytes

    def copy(self) -> TraversalState:
        new = TraversalState.__new__(TraversalState)
        new.codec = self.codec
        new.store, new.queue, new.future = self.store.copy(), self.queue.copy(), self.future.copy()
        new.epsilon, new.threshold = self.epsilon, self.threshold
        new.accepted, new.evaluations = self.accepted, self.evaluations
        return new

    def accepted_keys(self) -> np.ndarray:
        """Sorted keys of the accepted voxels (loss ≤ current threshold)."""
        k, v = self.store.items()
        return np.sort(k[v <= self.threshold])

    def accepted_coords(self) -> np.ndarray:
        """``[H, m]`` integer coordinates of the accepted voxels (sorted by key)."""
        return self.codec.unpack(self.accepted_keys())

    def visited_items(self) -> tuple[np.ndarray, np.ndarray]:
        """(coords ``[V, m]``, losses ``[V]``) of every visited voxel, sorted by key."""
        k, v = self.store.items()
        order = np.argsort(k)
        return self.codec.unpack(k[order]), v[order]


@dataclasses.dataclass(frozen=True)
class TraversalResult:
    """Outcome of one :func:`grid_traversal` call.

    ``H`` is H_c(s) (accepted voxels, origin included; §4.3.4); ``iterations`` the dequeued voxels;
    ``evaluations`` the losses computed in this call (a continuation only evaluates new voxels);
    ``truncated`` is True when the step limit stopped the run with voxels still queued (the thesis returns 0);
    ``dropped`` counts neighbours skipped by dropout, ``out_of_bounds`` neighbours outside ``radius``.

    Example:
        >>> import jax.numpy as jnp
        >>> ev = LatticeLoss(full_space_flat(jnp.zeros(1)), 1.0, ParamLoss(lambda t, aux: 1.0 + jnp.sum(t ** 2)))
        >>> res = grid_traversal(ev, 2.0)  # c = 2: the voxels -1, 0, 1 (losses 2, 1, 2)
        >>> res.H, res.evaluations, res.future_size, res.truncated
        (3, 5, 2, False)
    """

    n: float
    threshold: float
    epsilon: float
    H: int
    iterations: int
    evaluations: int
    visited: int
    queue_size: int
    future_size: int
    truncated: bool
    dropped: int
    out_of_bounds: int
    wall_time: float
    state: TraversalState = dataclasses.field(repr=False, compare=False)

    def summary(self) -> dict:
        """Every field but the state, as a dict of plain Python values (JSON-serialisable)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "state"}


def neighbour_offsets(dim: int) -> np.ndarray:
    """The 2m lattice neighbours of Algorithm 3 in the order +e_1, −e_1, +e_2, −e_2, ...

    Args:
      dim: the lattice dimension m.

    Returns:
      ``[2m, m]`` int64 offsets.

    Example:
        >>> neighbour_offsets(2).tolist()
        [[1, 0], [-1, 0], [0, 1], [0, -1]]
    """
    eye = np.eye(dim, dtype=np.int64)
    return np.stack([eye, -eye], axis=1).reshape(2 * dim, dim)


def _numpy_rng(key) -> np.random.Generator:
    if isinstance(key, np.random.Generator):
        return key
    if isinstance(key, int | np.integer):
        return np.random.default_rng(int(key))
    try:
        data = np.asarray(jax.random.key_data(key)) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) \
            else np.asarray(key)
    except (AttributeError, TypeError) as err:
        raise ValueError(f"key must be an int, a NumPy Generator or a JAX PRNG key, got {key!r}") from err
    return np.random.default_rng(data.astype(np.uint32).ravel().tolist())


def _check_step(step) -> None:
    if not isinstance(step, int | float | np.integer | np.floating) or not math.isfinite(step) or step <= 0:
        raise ValueError(f"step width s must be a positive finite number, got {step!r}")


def _threshold(n: float, epsilon: float, dtype):
    """c = n·ε computed in float64 and rounded once to the loss dtype (the dtype every comparison uses)."""
    return np.dtype(dtype).type(float(n) * float(epsilon))


def _as_losses(values, k: int, dtype=None) -> np.ndarray:
    """An evaluator's output as ``[k]`` losses in ``dtype`` (default: its own floating dtype, at least
    float32)."""
    vals = np.asarray(values)
    if not (np.issubdtype(vals.dtype, np.floating) or np.issubdtype(vals.dtype, np.integer)):
        raise ValueError(f"evaluate returned {vals.dtype} values; losses must be real numbers")
    vals = vals.reshape(-1)
    if vals.shape[0] != k:
        raise ValueError(f"evaluate returned {vals.shape[0]} losses for {k} voxel(s)")
    if dtype is None:
        dtype = np.result_type(vals.dtype, np.float32) if np.issubdtype(vals.dtype, np.floating) else np.float32
    return vals.astype(dtype, copy=False)


def _check_multiplier(n) -> float:
    if not isinstance(n, int | float | np.integer | np.floating) or not math.isfinite(n) or n < 1:
        raise ValueError(f"threshold multiplier n must be a finite number >= 1 (c = n·ε ≥ ε), got {n!r}")
    return float(n)


def grid_traversal(
    evaluate: Callable[[np.ndarray], np.ndarray],
    n: float,
    *,
    state: TraversalState | None = None,
    dim: int | None = None,
    dropout: float = 0.0,
    limit: int | None = None,
    sampling_switch_iter: int | None = None,
    batch_size: int = 1024,
    radius: int | None = None,
    key: Any = 0,
) -> TraversalResult:
    """Algorithm 3 of the thesis (modified BFS for grid traversal, §4.3.3), batched.

    Without ``state`` the run starts at the origin: ε = f(θ*) (must be positive), visited = queue = {0}.
    With the ``state`` of an earlier run at a smaller threshold it continues: the future queue is re-checked
    against the new c = n·ε from the stored losses (nothing is re-evaluated), the voxels now below c join
    the queue, and the traversal goes on (thresholds may not decrease). Losses, ε and c are compared in one
    dtype, the dtype of the losses at the origin (float32, or float64 for a float64 loss); c = n·ε is
    rounded once to it, and a voxel with f = c exactly is accepted.

    Each iteration dequeues a voxel (FIFO; uniformly at random once the iteration index exceeds
    ``sampling_switch_iter``), and each neighbour a ± e_i not yet visited is — unless skipped with
    probability ``dropout`` (only after the switch) — evaluated, marked visited, and appended to the queue if
    f ≤ c, else to the future queue. ``limit`` bounds the iterations of this call.

    Batching: up to ``batch_size`` voxels are dequeued per wave and the new neighbours of the whole wave are
    evaluated together, in the order the one-at-a-time algorithm would meet them. In FIFO order the voxels of
    a wave are all dequeued before any neighbour they add, so the result is exactly that of
    ``batch_size=1`` (the literal algorithm) when ``dropout = 0``. Waves never straddle the switch. After
    the switch a wave pops ``batch_size`` random voxels at once, and with ``dropout > 0`` each distinct new
    neighbour of a wave gets one skip draw.

    Args:
      evaluate: ``evaluate(coords [K, m] integers) -> losses [K]``, usually a :class:`LatticeLoss`.
      n: the threshold multiplier (c = n·ε, n ≥ 1).
      state: the :class:`TraversalState` of an earlier call to continue (updated in place).
      dim: the lattice dimension m, when ``evaluate`` has no ``dim`` attribute.
      dropout: probability of skipping a new neighbour (after the switch only).
      limit: most iterations (dequeued voxels) of this call.
      sampling_switch_iter: iteration index after which voxels are dequeued at random.
      batch_size: most voxels dequeued per wave.
      radius: restricts the lattice to max_i |a_i| ≤ radius; neighbours outside are counted in
        ``out_of_bounds``.
      key: int, NumPy Generator or JAX key seeding the dropout and random dequeues.

    Returns:
      A :class:`TraversalResult` (its ``state`` continues the traversal).

    Example:
        >>> import jax.numpy as jnp
        >>> ev = LatticeLoss(full_space_flat(jnp.zeros(2)), 0.5, ParamLoss(lambda t, aux: 1.0 + jnp.sum(t ** 2)))
        >>> first = grid_traversal(ev, 1.3)  # the disc |a|² ≤ 1.2: the origin and its 4 neighbours
        >>> more = grid_traversal(ev, 2.0, state=first.state)  # |a|² ≤ 4; only new voxels are evaluated
        >>> first.H, first.evaluations, more.H, more.evaluations
        (5, 13, 13, 12)

    Raises:
      ValueError: bad arguments, a non-positive or non-finite ε, a decreasing threshold, a state of another
        lattice dimension, or an evaluator returning the wrong number of losses.
    """
    n = _check_multiplier(n)
    if not isinstance(dropout, int | float | np.floating) or not 0.0 <= float(dropout) <= 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
    if limit is not None and (not isinstance(limit, int | np.integer) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if sampling_switch_iter is not None and (not isinstance(sampling_switch_iter, int | np.integer)
                                             or sampling_switch_iter < 0):
        raise ValueError(f"sampling_switch_iter must be a non-negative integer or None, got {sampling_switch_iter!r}")
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if radius is not None and (not isinstance(radius, int | np.integer) or radius < 1):
        raise ValueError(f"radius must be a positive integer or None, got {radius!r}")
    rng = _numpy_rng(key)
    t_start = time.perf_counter()
    evals = 0

    if state is None:
        m = dim if dim is not None else getattr(evaluate, "dim", None)
        if m is None:
            raise ValueError("pass dim= (the lattice dimension m) when evaluate has no .dim")
        origin = np.zeros((1, int(m)), np.int64)
        eps0 = _as_losses(evaluate(origin), 1)
        eps = float(eps0[0])
        if not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"the loss at the anchor ε = f(θ*) = {eps!r} must be positive and finite for the "
                             f"threshold c = n·ε (§4.3.2)")
        state = TraversalState(int(m), eps, dtype=eps0.dtype)
        okey = state.codec.pack(origin)
        state.store.insert(okey, eps0)
        state.queue.push(okey)
        state.accepted = 1
        evals = 1
    else:
        m = getattr(evaluate, "dim", state.dim)
        if (dim is not None and dim != state.dim) or m != state.dim:
            raise ValueError(f"state is an m={state.dim} lattice but the evaluator is m={m if dim is None else dim}")
    m = state.dim
    codec = state.codec
    c = state.threshold_for(n)
    if c < state.threshold:
        raise ValueError(f"thresholds must not decrease when continuing: c = {float(c):g} < previous "
                         f"{float(state.threshold):g}")

    # Re-check the future queue against the new threshold from the stored losses (same dtype as c).
    if len(state.future):
        fk = state.future.take_all()
        ok = state.store.get(fk) <= c
        state.queue.push(fk[ok])
        state.future.push(fk[~ok])
        state.accepted += int(ok.sum())
    state.threshold = c

    offsets = neighbour_offsets(m)
    it = dropped = oob = 0
    while len(state.queue) and (limit is None or it < limit):
        random_phase = sampling_switch_iter is not None and it > sampling_switch_iter
        k = min(batch_size, len(state.queue))
        if limit is not None:
            k = min(k, limit - it)
        if sampling_switch_iter is not None and not random_phase:
            k = min(k, sampling_switch_iter + 1 - it)
        keys = state.queue.pop_random(k, rng) if random_phase else state.queue.pop_front(k)
        nb = (codec.unpack(keys)[:, None, :] + offsets[None, :, :]).reshape(-1, m)
        if radius is not None:
            inside = np.all(np.abs(nb) <= radius, axis=1)
            oob += int((~inside).sum())
            nb = nb[inside]
        nk = codec.pack(nb)
        new = ~state.store.contains(nk)
        nk, nb = nk[new], nb[new]
        if nk.size:
            _, first = np.unique(nk, return_index=True)
            first.sort()
            nk, nb = nk[first], nb[first]
        if random_phase and dropout > 0 and nk.size:
            skip = rng.random(nk.size) < dropout
            dropped += int(skip.sum())
            nk, nb = nk[~skip], nb[~skip]
        if nk.size:
            losses = _as_losses(evaluate(nb), nk.shape[0], state.dtype)
            evals += nk.size
            state.store.insert(nk, losses)
            ok = losses <= c
            state.queue.push(nk[ok])
            state.future.push(nk[~ok])
            state.accepted += int(ok.sum())
        it += k
    state.evaluations += evals
    return TraversalResult(
        n=n, threshold=float(c), epsilon=state.epsilon, H=state.accepted, iterations=it, evaluations=evals,
        visited=state.visited, queue_size=len(state.queue), future_size=len(state.future),
        truncated=len(state.queue) > 0, dropped=dropped, out_of_bounds=oob,
        wall_time=time.perf_counter() - t_start, state=state,
    )


# --------------------------------------------------------------------------------------------------------
# H_c(s) sweeps and the log-linear fit (§4.3.4, §6.1)
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LogLinearFit:
    """log H = log A + B·c fitted by least squares; R is the correlation coefficient of (c, log H) (§6.1).

    R is NaN when log H is constant (the correlation is undefined).

    Example:
        >>> fit = LogLinearFit(A=2.0, B=1.0, R=1.0, num_points=3)
        >>> fit.predict([0.0]).tolist(), fit.to_dict()["A"]
        ([2.0], 2.0)
    """

    A: float
    B: float
    R: float
    num_points: int

    @property
    def log_A(self) -> float:
        return math.log(self.A)

    def predict(self, c) -> np.ndarray:
        """H ≈ A·exp(B·c) at thresholds ``c`` (float64 array)."""
        return self.A * np.exp(self.B * np.asarray(c, np.float64))

    def to_dict(self) -> dict:
        return {"A": self.A, "B": self.B, "R": None if math.isnan(self.R) else self.R, "num_points": self.num_points}


def fit_log_linear(c, H) -> LogLinearFit:
    """Fit H_c(s) ≈ A·e^{B·c} (§6.1) to thresholds ``c`` and counts ``H`` (natural log).

    Args:
      c: thresholds ``[N]``.
      H: positive counts ``[N]``.

    Returns:
      The :class:`LogLinearFit`.

    Raises:
      ValueError: fewer than two points, mismatched lengths, non-finite values, H ≤ 0 or equal thresholds.

    Example:
        >>> import numpy as np
        >>> fit = fit_log_linear([1.0, 2.0, 3.0], 5.0 * np.exp(0.7 * np.array([1.0, 2.0, 3.0])))
        >>> round(fit.A, 6), round(fit.B, 6), round(fit.R, 6)
        (5.0, 0.7, 1.0)
    """
    c = np.asarray(c, np.float64).reshape(-1)
    H = np.asarray(H, np.float64).reshape(-1)
    if c.shape != H.shape:
        raise ValueError(f"{c.size} thresholds but {H.size} counts")
    if c.size < 2:
        raise ValueError(f"a log-linear fit needs at least two points, got {c.size}")
    if not np.all(np.isfinite(c)) or not np.all(np.isfinite(H)):
        raise ValueError("thresholds and counts must be finite")
    if np.any(H <= 0):
        raise ValueError("H_c(s) must be positive to take its logarithm")
    if np.ptp(c) == 0:
        raise ValueError("all thresholds are equal; the slope B is undefined")
    y = np.log(H)
    dc, dy = c - c.mean(), y - y.mean()
    B = float(np.dot(dc, dy) / np.dot(dc, dc))
    logA = float(y.mean() - B * c.mean())
    R = float("nan") if np.ptp(y) == 0 else float(np.dot(dc, dy) / math.sqrt(np.dot(dc, dc) * np.dot(dy, dy)))
    return LogLinearFit(A=float(math.exp(logA)), B=float(B), R=R, num_points=int(c.size))


@dataclasses.dataclass(frozen=True)
class HSweep:
    """H_c(s) over step widths ``steps [S]`` and multipliers ``multipliers [N]`` (thresholds c = n·ε).

    Tables are ``[S, N]``: ``H`` (accepted voxels), ``evaluations`` (losses computed by that call),
    ``visited`` (cumulative), ``truncated``, ``wall_time`` (seconds per call). ``loss_dtype`` is the dtype
    the losses and thresholds were compared in.

    Example:
        >>> import jax.numpy as jnp
        >>> loss = ParamLoss(lambda t, aux: 1.0 + jnp.sum(t ** 2))
        >>> sweep = h_sweep(full_space_flat(jnp.zeros(1)), loss, [0.5, 1.0], [2.0, 5.0])
        >>> sweep.H.tolist(), sweep.thresholds.tolist(), sweep.volume().tolist()
        ([[5, 9], [3, 5]], [2.0, 5.0], [[2.5, 4.5], [3.0, 5.0]])
    """

    steps: np.ndarray
    multipliers: np.ndarray
    epsilon: float
    H: np.ndarray
    evaluations: np.ndarray
    visited: np.ndarray
    truncated: np.ndarray
    wall_time: np.ndarray
    dim: int
    cell_factor: float
    flat: dict = dataclasses.field(default_factory=dict)
    loss_dtype: str = "float32"

    @property
    def thresholds(self) -> np.ndarray:
        """``[N]`` thresholds c = n·ε exactly as the traversal compared them (rounded to ``loss_dtype``)."""
        return np.asarray([_threshold(n, self.epsilon, self.loss_dtype) for n in self.multipliers], np.float64)

    def volume(self) -> np.ndarray:
        """H·cell_factor·s^m: the voxel estimate of the m-volume of the explored component (§6.4)."""
        return self.H * self.cell_factor * self.steps[:, None] ** self.dim

    def fit(self, *, include_truncated: bool = False) -> dict:
        """Per-step fits and the pooled fit over all steps (§6.1); truncated runs are left out unless asked.

        Returns ``{"per_step": [LogLinearFit | None], "pooled": LogLinearFit | None}`` (None where fewer
        than two usable points with distinct thresholds remain).
        """
        c = self.thresholds
        per, cs, hs = [], [], []
        for i in range(len(self.steps)):
            use = self.H[i] > 0
            if not include_truncated:
                use &= ~self.truncated[i]
            per.append(fit_log_linear(c[use], self.H[i, use]) if use.sum() >= 2 and np.ptp(c[use]) > 0
                       else None)
            cs.append(c[use])
            hs.append(self.H[i, use])
        cc, hh = np.concatenate(cs), np.concatenate(hs)
        pooled = fit_log_linear(cc, hh) if cc.size >= 2 and np.ptp(cc) > 0 else None
        return {"per_step": per, "pooled": pooled}

    def to_dict(self) -> dict:
        fits = self.fit()
        return {
            "steps": self.steps.tolist(),
            "multipliers": self.multipliers.tolist(),
            "epsilon": self.epsilon,
            "thresholds": self.thresholds.tolist(),
            "H": self.H.tolist(),
            "volume": self.volume().tolist(),
            "evaluations": self.evaluations.tolist(),
            "visited": self.visited.tolist(),
            "truncated": self.truncated.tolist(),
            "wall_time": self.wall_time.tolist(),
            "dim": self.dim,
            "cell_factor": self.cell_factor,
            "loss_dtype": self.loss_dtype,
            "flat": self.flat,
            "fit_per_step": [None if f is None else f.to_dict() for f in fits["per_step"]],
            "fit_pooled": None if fits["pooled"] is None else fits["pooled"].to_dict(),
        }


def h_sweep(
    flat: Flat,
    loss: ParamLoss,
    steps: Sequence[float],
    multipliers: Sequence[float],
    *,
    limit: int | None = None,
    dropout: float = 0.0,
    sampling_switch_iter: int | None = None,
    batch_size: int = 1024,
    max_batch: int = 4096,
    radius: int | None = None,
    key: Any = 0,
    continue_future_queue: bool = True,
    progress: Callable[[str], None] | None = None,
    devices: int | None = None,
) -> HSweep:
    """H_c(s) for every step width s and threshold c = n·ε (§4.3.4, Figures 5.1-5.6).

    For each s the multipliers are run in order, each continuing from the state of the previous one (future
    queue re-checked, no voxel evaluated twice). Every step width reuses the same compiled evaluator (the
    step only enters the lattice rows), so a sweep compiles one function per bucket size.

    Args:
      flat: the :class:`Flat`.
      loss: the :class:`ParamLoss`.
      steps: step widths s > 0.
      multipliers: threshold multipliers n, strictly increasing, ≥ 1.
      limit, dropout, sampling_switch_iter, batch_size, radius: see :func:`grid_traversal` (``limit``
        applies to each call).
      max_batch: most voxels per evaluator call (:class:`LatticeLoss`).
      key: seeds the random streams; that of call (i, j) is derived from ``key`` and (i, j).
      continue_future_queue: ``False`` restarts from the origin for every threshold instead.
      progress: called with one line per (s, n).
      devices: how many devices to shard the voxels over (default all).

    Returns:
      The :class:`HSweep`.

    Example:
        >>> import jax.numpy as jnp
        >>> loss = ParamLoss(lambda t, aux: 1.0 + jnp.sum(t ** 2))
        >>> sweep = h_sweep(full_space_flat(jnp.zeros(2)), loss, [0.5], [1.3, 2.0, 3.0])
        >>> sweep.H.tolist(), round(sweep.fit()["pooled"].B, 3)  # lattice points with |a|² ≤ 1.2, 4, 8
        ([[5, 13, 25]], 0.927)
    """
    steps = np.asarray([float(s) for s in steps], np.float64)
    mult = np.asarray([_check_multiplier(x) for x in multipliers], np.float64)
    if steps.size == 0 or mult.size == 0:
        raise ValueError("need at least one step width and one multiplier")
    for s in steps:
        _check_step(float(s))
    if np.any(np.diff(mult) <= 0):
        raise ValueError(f"multipliers must be strictly increasing, got {mult.tolist()}")
    base = _numpy_rng(key).integers(2 ** 63)
    S, N = steps.size, mult.size
    H = np.zeros((S, N), np.int64)
    ev = np.zeros((S, N), np.int64)
    vis = np.zeros((S, N), np.int64)
    trunc = np.zeros((S, N), bool)
    wall = np.zeros((S, N), np.float64)
    eps = dtype = None
    for i, s in enumerate(steps):
        evaluator = LatticeLoss(flat, float(s), loss, max_batch=max_batch, devices=devices)
        state = None
        for j, nn in enumerate(mult):
            res = grid_traversal(evaluator, float(nn), state=state if continue_future_queue else None,
                                 dropout=dropout, limit=limit, sampling_switch_iter=sampling_switch_iter,
                                 batch_size=batch_size, radius=radius,
                                 key=np.random.default_rng([int(base), i, j]))
            state = res.state
            H[i, j], ev[i, j], vis[i, j], trunc[i, j], wall[i, j] = (
                res.H, res.evaluations, res.visited, res.truncated, res.wall_time)
            eps, dtype = res.epsilon, res.state.dtype.name
            if progress is not None:
                progress(f"s={s:g} n={nn:g} c={res.threshold:.4g}: H={res.H} evals={res.evaluations} "
                         f"visited={res.visited} truncated={res.truncated} {res.wall_time:.2f}s")
    return HSweep(steps=steps, multipliers=mult, epsilon=float(eps), H=H, evaluations=ev, visited=vis,
                  truncated=trunc, wall_time=wall, dim=flat.dim, cell_factor=flat.cell_factor,
                  flat=flat.describe(), loss_dtype=dtype)


def mean_log_h(sweeps: Sequence[HSweep]) -> dict:
    """Average log H_c(s) over sweeps from different minima on a common (steps, multipliers) grid (§5.5).

    Args:
      sweeps: :class:`HSweep` results on one (steps, multipliers) grid.

    Returns:
      ``{"steps", "multipliers", "mean_c" [N], "mean_log_H" [S, N], "std_log_H" [S, N], "any_truncated"
      [S, N]}`` as lists; the thresholds differ between minima (c = n·ε_i), so the mean c is reported.

    Example:
        >>> import jax.numpy as jnp
        >>> loss = ParamLoss(lambda t, aux: 1.0 + jnp.sum(t ** 2))
        >>> sweeps = [h_sweep(full_space_flat(jnp.full(1, a)), loss, [0.5], [2.0]) for a in (0.0, 1.0)]
        >>> out = mean_log_h(sweeps)  # ε = 1 and 2, so c = 2 and 4
        >>> [s.H.tolist() for s in sweeps], out["mean_c"]
        ([[[5]], [[7]]], [3.0])
    """
    sweeps = list(sweeps)
    if not sweeps:
        raise ValueError("mean_log_h needs at least one sweep")
    for k, sw in enumerate(sweeps[1:], 1):
        if not (np.array_equal(sw.steps, sweeps[0].steps) and np.array_equal(sw.multipliers, sweeps[0].multipliers)):
            raise ValueError(f"sweep {k} has a different (steps, multipliers) grid than sweep 0")
    logs = np.stack([np.log(np.maximum(sw.H, 1)) for sw in sweeps])
    return {
        "steps": sweeps[0].steps.tolist(),
        "multipliers": sweeps[0].multipliers.tolist(),
        "mean_c": np.mean([sw.thresholds for sw in sweeps], axis=0).tolist(),
        "mean_log_H": logs.mean(0).tolist(),
        "std_log_H": logs.std(0).tolist(),
        "any_truncated": np.any([sw.truncated for sw in sweeps], axis=0).tolist(),
    }
