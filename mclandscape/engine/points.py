"""Families of parameter points, and one function mapped over all of them on every device.

Every family of points mclandscape evaluates is *coefficient rows times a stack of trees*
(:class:`Points`): point ``p`` is ``sum_k rows[p, k] * stack[k]``.

- connectors: Bernstein (or hat, or barycentric) rows over the control points (:func:`connector_points`);
- lines and planes of directions: rows ``[1, alpha, beta]`` over ``[theta, d1, d2]`` (:func:`plane_points`);
- flats of a volume: rows ``[1, s a_1, ..., s a_m]`` over ``[theta*, b_1, ..., b_m]``;
- NEB pivots, ensemble members, any stacked parameters: identity rows, stored as integer indices so that
  point ``p`` is ``stack[rows[p]]`` at no K-fold cost (:func:`stacked_points`).

Each point's parameters are formed *inside* the mapped computation, so at most a chunk of parameter copies
per device exists at any time, however many points there are. :func:`map_points` maps any per-point
function (an analytic potential, a loss on a fixed batch) with the engine's one primitive
(:func:`mclandscape.engine.mapping.map_over`); :func:`mclandscape.engine.evaluate.evaluate` maps the model
metrics. With several devices (``devices=``, default all) the points are sharded over a 1-D mesh with
``jax.shard_map``; the data and the stack are replicated, and the results equal the single-device ones. In a
multi-process job (:mod:`mclandscape.engine.distributed`) the mesh spans the devices of every process and
every process gets all the results. :func:`stage_batches` stages a dataset once for every point.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mclandscape.core import _checks
from mclandscape.core.connectors import Connector
from mclandscape.core.tree import PyTree, tree_combine, tree_index, tree_stack
from mclandscape.engine import cpu, distributed, mapping

__all__ = ["Points", "connector_points", "stacked_points", "plane_points", "uv_grid", "map_points", "stage_batches"]

AXIS = "points"


# ---- families of points ---------------------------------------------------------------------------------

@struct.dataclass(eq=False)  # holds arrays: hashed by identity, like a jax.Array
class Points:
    """P points, each a combination of the K trees of ``stack`` (leaves ``[K, ...]``).

    ``rows`` is ``[P, K]`` (point ``p`` is ``sum_k rows[p, k] * stack[k]``) or an integer vector ``[P]``
    (identity rows: point ``p`` is ``stack[rows[p]]``).

    Example:
        >>> import jax.numpy as jnp
        >>> pts = plane_points({"w": jnp.zeros(2)}, {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])},
        ...                    [0.0, 1.0], [2.0])
        >>> pts.num_points, pts.point(1)["w"].tolist()
        (2, [1.0, 2.0])
    """

    rows: jax.Array
    stack: PyTree

    @property
    def num_points(self) -> int:
        return int(jnp.shape(self.rows)[0])

    @property
    def num_stacked(self) -> int:
        return int(jnp.shape(jax.tree_util.tree_leaves(self.stack)[0])[0])

    @property
    def indexed(self) -> bool:
        """Whether the rows are identity rows stored as indices."""
        return jnp.issubdtype(jnp.result_type(self.rows), jnp.integer)

    def form(self, row) -> PyTree:
        """The parameters of one point from its row (traceable)."""
        if self.indexed:
            return tree_index(self.stack, row)
        return tree_combine(row, self.stack)

    def point(self, p: int) -> PyTree:
        """The parameters of point ``p``."""
        return self.form(self.rows[p])

    def example(self) -> PyTree:
        """One stacked tree (shapes and dtypes of a point)."""
        return tree_index(self.stack, 0)


def connector_points(connector: Connector, points, *, extrapolate: bool = False) -> Points:
    """The points of a connector as :class:`Points` (coefficient rows over its control points).

    Args:
      connector: a :class:`~mclandscape.core.connectors.Connector`.
      points: ``[P]`` t values, ``[P, 2]`` (u, v) pairs or ``[P, K]`` barycentric weights (validated by
        :meth:`~mclandscape.core.connectors.Connector.validate_points`, never clipped).
      extrapolate: accept values outside [0, 1] (the connector continued beyond its ends).

    Returns:
      :class:`Points` with rows in the control points' floating precision (float32 or wider).

    Example:
        >>> import jax.numpy as jnp
        >>> from mclandscape.core.connectors import bezier_curve
        >>> pts = connector_points(bezier_curve({"w": jnp.zeros(1)}, {"w": jnp.ones(1)}, 1), [0.0, 0.25])
        >>> pts.num_points, pts.point(1)["w"].tolist()
        (2, [0.25])
    """
    pts = connector.validate_points(points, extrapolate=extrapolate)
    dtype = jnp.promote_types(jnp.float32, jnp.result_type(*jax.tree_util.tree_leaves(connector.control)))
    return Points(rows=connector.coefficients(jnp.asarray(pts, dtype)), stack=connector.control)


def stacked_points(stacked: PyTree) -> Points:
    """P parameter trees stacked on a leading axis (:func:`mclandscape.core.tree.tree_stack`), as points.

    Args:
      stacked: a tree whose leaves share a leading axis of size P.

    Returns:
      :class:`Points` with identity rows (stored as indices: no K-fold cost).

    Example:
        >>> import jax.numpy as jnp
        >>> pts = stacked_points({"w": jnp.arange(6.0).reshape(3, 2)})
        >>> pts.indexed, pts.point(2)["w"].tolist()
        (True, [4.0, 5.0])
    """
    sizes = {int(np.shape(a)[0]) if np.ndim(a) else -1 for a in jax.tree_util.tree_leaves(stacked)}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(f"every leaf of stacked_params needs one common leading axis, got sizes {sorted(sizes)}")
    return Points(rows=jnp.arange(sizes.pop(), dtype=jnp.int32), stack=stacked)


def plane_points(origin: PyTree, d1: PyTree, d2: PyTree | None, alphas, betas=None) -> Points:
    """``origin + alpha d1 + beta d2`` on the grid ``alphas x betas`` (alpha major), or the line ``origin + alpha d1``.

    Args:
      origin: the centre parameters.
      d1, d2: the directions (``d2=None``: a line).
      alphas, betas: the coefficients along ``d1`` and ``d2``.

    Returns:
      :class:`Points` with rows ``[1, alpha(, beta)]`` over the stack ``[origin, d1(, d2)]``.

    Example:
        >>> import jax.numpy as jnp
        >>> line = plane_points({"w": jnp.zeros(1)}, {"w": jnp.ones(1)}, None, [0.0, 2.0])
        >>> line.point(1)["w"].tolist()
        [2.0]
    """
    a = np.asarray(alphas, np.float64).reshape(-1)
    if d2 is None:  # tree_stack refuses trees of another structure, naming the leaf
        rows = np.stack([np.ones_like(a), a], axis=1)
        stack = tree_stack([origin, d1], names=["params", "direction"])
    else:
        aa, bb = np.meshgrid(a, np.asarray(betas, np.float64).reshape(-1), indexing="ij")
        rows = np.stack([np.ones(aa.size), aa.ravel(), bb.ravel()], axis=1)
        stack = tree_stack([origin, d1, d2], names=["params", "d1", "d2"])
    dtype = jnp.promote_types(jnp.float32, jnp.result_type(*jax.tree_util.tree_leaves(stack)))
    return Points(rows=jnp.asarray(rows, dtype), stack=stack)


# ---- one function over all points, on every device -------------------------------------------------------

def varying(tree, mesh):
    """Mark scan carries as varying over the points axis inside ``shard_map`` (``check_vma``)."""
    if mesh is None:
        return tree
    return jax.tree_util.tree_map(lambda a: jax.lax.pcast(a, AXIS, to="varying"), tree)


def shard(fn: Callable, mesh, num_args: int):
    """``fn(rows, *replicated)`` sharded over the points axis of ``mesh`` (identity without a mesh)."""
    if mesh is None:
        return fn
    return jax.shard_map(fn, mesh=mesh, in_specs=(P(AXIS),) + (P(),) * num_args, out_specs=P(AXIS))


def _map_points_impl(fn, strategy, chunk, mesh, points: Points, args):
    def run(rows, stack, args):
        pts = Points(rows=rows, stack=stack)
        return mapping.map_over(lambda r: fn(pts.form(r), *args), rows, strategy, chunk)

    return shard(run, mesh, 2)(points.rows, points.stack, args)


_map_points_jit = jax.jit(_map_points_impl, static_argnames=("fn", "strategy", "chunk", "mesh"),
                          compiler_options=cpu.COMPILER_OPTIONS)


def run_mapped(jitted, points: Points, static: dict, args, strategy: str, chunk: int, devices: int | None,
               analyze: bool = False):
    """Call a mapped computation ``jitted(**static, strategy, chunk, mesh, points, args)`` over all points
    (padded to fixed shapes) and cut the results back; with ``analyze`` only compile it and return the
    compiled computation."""
    p, n = points.num_points, distributed.num_devices(devices)
    mesh = None if n == 1 else distributed.mesh(axes=(AXIS,), devices=n)
    multiple = (chunk if strategy == "map" else 1) * n  # rows padded by repeating the last one, results cut back
    rows = jnp.concatenate([points.rows, jnp.repeat(points.rows[-1:], -p % multiple, axis=0)])
    if mesh is not None:
        rows = jax.device_put(rows, NamedSharding(mesh, P(AXIS)))
        if jax.process_count() > 1 and not analyze:
            # the stack and the data may be arrays on this process's devices only (e.g. parameters fresh from
            # training): make them global, replicated over the job's mesh, next to the sharded rows
            points, args = points.replace(stack=distributed.replicate(points.stack, mesh)), \
                distributed.replicate(args, mesh)
    call = dict(**static, strategy=strategy, chunk=chunk if strategy == "map" else int(rows.shape[0]),
                mesh=mesh, points=points.replace(rows=rows), args=args)
    if analyze:
        return jitted.lower(**call).compile()
    # sharded over the points axis: in a multi-process job each process holds its devices' points only
    return jax.tree_util.tree_map(lambda a: distributed.to_host(a)[:p], jitted(**call))


def map_points(fn: Callable, points: Points, *args, strategy: str = "map", chunk_size: int | None = None,
               devices: int | None = None):
    """``fn(params, *args)`` at every point, mapped and (over several devices) sharded.

    Args:
      fn: a per-point function of the point's parameters; it must be hashable (a module-level function or a
        frozen dataclass), since it is a static argument of the compiled map.
      points: the :class:`Points`.
      *args: replicated arguments (e.g. a batch).
      strategy: ``"map"``, ``"vmap"`` or ``"unroll"`` (:func:`mclandscape.engine.mapping.map_over`);
        ``"auto"`` means ``"map"``.
      chunk_size: points per vectorised chunk of ``"map"`` (default 1).
      devices: how many devices to shard the points over (default all).

    Returns:
      The outputs stacked over the points, as NumPy arrays.

    Example:
        >>> import jax.numpy as jnp
        >>> pts = stacked_points({"w": jnp.arange(6.0).reshape(3, 2)})
        >>> map_points(lambda p: jnp.sum(p["w"]), pts).tolist()
        [1.0, 5.0, 9.0]
    """
    strategy, chunk = mapping.resolve("map" if strategy == "auto" else strategy, points.num_points,
                                      has_conv=False, chunk_size=chunk_size)
    return run_mapped(_map_points_jit, points, {"fn": fn}, tuple(args), strategy, chunk, devices)


# ---- data staging ---------------------------------------------------------------------------------------

def uv_grid(steps: int = 11) -> np.ndarray:
    """The (u, v) grid ``[steps*steps, 2]`` with spacing ``1/(steps-1)``, u major (default step 0.1).

    Args:
      steps: points per axis (>= 2).

    Returns:
      A float64 array.

    Example:
        >>> uv_grid(2).tolist()
        [[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
    """
    g = np.linspace(0.0, 1.0, _checks.integer(steps, "steps", low=2, what="points per axis"))
    uu, vv = np.meshgrid(g, g, indexing="ij")
    return np.stack([uu.ravel(), vv.ravel()], axis=1)


def data_xy(data) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(data, "x") and hasattr(data, "y"):
        return np.asarray(data.x), np.asarray(data.y)
    if isinstance(data, tuple | list) and len(data) == 2:
        return np.asarray(data[0]), np.asarray(data[1])
    raise ValueError("data must be a Dataset (with .x and .y) or an (x, y) tuple of arrays")


def stage_batches(x: np.ndarray, y: np.ndarray | None, batch_size: int, *, drop_last: bool = False):
    """Reshape a dataset into ``[num_batches, batch_size, ...]`` device arrays with a validity mask.

    The last partial batch is zero-padded and masked out (or dropped with ``drop_last``). Staged once,
    these arrays are shared by every point.

    Args:
      x: inputs ``[N, ...]``.
      y: targets ``[N, ...]`` or ``None``.
      batch_size: examples per batch (capped at N).
      drop_last: drop the partial last batch instead of padding it.

    Returns:
      ``(xs, ys, mask)`` with ``mask`` ``[num_batches, batch_size]`` (1 for real examples).

    Example:
        >>> import numpy as np
        >>> xs, ys, mask = stage_batches(np.zeros((5, 2)), np.arange(5), 2)
        >>> xs.shape, mask.tolist()
        ((3, 2, 2), [[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    """
    n = int(np.shape(x)[0])
    if n == 0:
        raise ValueError("empty dataset")
    bs = min(_checks.integer(batch_size, "batch_size", low=1), n)
    nb = n // bs if drop_last else -(-n // bs)
    keep = min(n, nb * bs)

    def prep(a):  # the first nb * bs examples, zero-padded
        a = np.asarray(a)[:keep]
        a = np.concatenate([a, np.zeros((nb * bs - keep,) + a.shape[1:], a.dtype)])
        return jnp.asarray(a.reshape((nb, bs) + a.shape[1:]))

    mask = (np.arange(nb * bs) < keep).astype(np.float32)
    return prep(x), (prep(y) if y is not None else None), jnp.asarray(mask.reshape(nb, bs))
