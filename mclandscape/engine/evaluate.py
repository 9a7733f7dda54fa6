"""The one evaluator: loss, accuracy and output probabilities of many parameter points.

Every family of points mclandscape evaluates is *coefficient rows times a stack of trees*
(:class:`Points`): point ``p`` is ``sum_k rows[p, k] * stack[k]``.

- connectors: Bernstein (or hat, or barycentric) rows over the control points (:func:`connector_points`);
- lines and planes of directions: rows ``[1, alpha, beta]`` over ``[theta, d1, d2]`` (:func:`plane_points`);
- flats of a volume: rows ``[1, s a_1, ..., s a_m]`` over ``[theta*, b_1, ..., b_m]``;
- NEB pivots, ensemble members, any stacked parameters: identity rows, stored as integer indices so that
  point ``p`` is ``stack[rows[p]]`` at no K-fold cost (:func:`stacked_points`).

Each point's parameters are formed *inside* the mapped computation, so at most a chunk of parameter copies
per device exists at any time, however many points there are. :func:`map_points` maps any per-point
function (an analytic potential, a loss on a fixed batch); :func:`evaluate` maps the model metrics
(mean loss and accuracy over a dataset, optionally softmax outputs) with BatchNorm statistics recomputed
per point; :func:`evaluate_points` and :func:`evaluate_params` are its two common front doors.

Strategies (``strategy=``): ``"map"`` (``jax.lax.map`` with ``batch_size=chunk``: chunk 1 is an XLA loop,
chunk c vmaps c points at a time), ``"vmap"`` (all points at once), ``"loop"`` (a Python loop calling the
same compiled function once per point: the one-at-a-time baseline) and ``"auto"``
(:func:`mclandscape.engine.cpu.default_strategy`). With several devices (``devices=``, default all) the
points are sharded over a 1-D mesh with ``jax.shard_map``; the data and the stack are replicated, and the
results equal the single-device ones. In a multi-process job (:mod:`mclandscape.engine.distributed`) the
mesh spans the devices of every process and every process gets all the results.

BatchNorm (models with ``apply_with_stats``): before a point is evaluated its running statistics are
recomputed on ``bn_data`` as the exact average of the per-batch statistics over ``bn_batches`` full
batches, as Garipov et al.'s ``update_bn`` does (with equal batch sizes, the example-weighted average).
This runs inside the same mapped computation, batched over points. Models without BatchNorm, or a call
with ``variables=`` holding the statistics, use them as they are.

First layer (``stem=``): ``"auto"`` lets :mod:`mclandscape.engine.cpu` decide whether to factorise the
first convolution over the control points (exact for any coefficients), ``"factor"`` forces it (for rows
over a stack, i.e. not for identity rows) and ``"off"`` never does. ``compute_dtype`` (e.g. ``"bfloat16"``)
casts each point's parameters and the inputs (mixed precision for accelerators); losses, accuracies and
BatchNorm statistics are accumulated in float32 or wider.

Compilation: the mapped computation is one module-level ``jax.jit`` whose static arguments are the model
(hashed by identity), the loss and the strategy, so a second call with the same model and shapes compiles
nothing.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mclandscape.core.connectors import Connector
from mclandscape.core.losses import cross_entropy
from mclandscape.core.objective import correct_count
from mclandscape.core.tree import PyTree, check_finite, check_same_structure, tree_combine, tree_index, tree_stack
from mclandscape.engine import cpu
from mclandscape.engine.distributed import replicate, to_host
from mclandscape.engine.models.base import Model

__all__ = [
    "Points",
    "connector_points",
    "stacked_points",
    "plane_points",
    "PointMetrics",
    "map_points",
    "evaluate",
    "evaluation_memory",
    "evaluate_points",
    "evaluate_params",
    "evaluate_model",
    "recalibrate_bn",
    "bn_momentum",
    "stage_batches",
    "uv_grid",
    "STRATEGIES",
    "STEM_MODES",
]

STRATEGIES = ("auto", "loop", "map", "vmap")
STEM_MODES = ("auto", "off", "factor")
_AXIS = "points"


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


def _check_stack(stack: PyTree, name: str) -> int:
    leaves = jax.tree_util.tree_leaves(stack)
    if not leaves:
        raise ValueError(f"{name} holds no arrays")
    sizes = {int(np.shape(a)[0]) if np.ndim(a) else -1 for a in leaves}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(f"every leaf of {name} needs the same leading axis, got sizes {sorted(sizes)}")
    return sizes.pop()


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
    p = _check_stack(stacked, "stacked_params")
    return Points(rows=jnp.arange(p, dtype=jnp.int32), stack=stacked)


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
    if d2 is None:
        check_same_structure(origin, d1, names=("params", "direction"))
        rows = np.stack([np.ones_like(a), a], axis=1)
        stack = tree_stack([origin, d1], names=["params", "direction"])
    else:
        b = np.asarray(betas, np.float64).reshape(-1)
        aa, bb = np.meshgrid(a, b, indexing="ij")
        rows = np.stack([np.ones(aa.size), aa.ravel(), bb.ravel()], axis=1)
        stack = tree_stack([origin, d1, d2], names=["params", "d1", "d2"])
    dtype = jnp.promote_types(jnp.float32, jnp.result_type(*jax.tree_util.tree_leaves(stack)))
    return Points(rows=jnp.asarray(rows, dtype), stack=stack)


# ---- the mapped computation -----------------------------------------------------------------------------

def _map_over(fn: Callable, xs, strategy: str, chunk: int):
    if strategy == "vmap":
        return jax.vmap(fn)(xs)
    return jax.lax.map(fn, xs, batch_size=chunk if chunk > 1 else None)


def _varying(tree, mesh):
    """Mark scan carries as varying over the points axis inside ``shard_map`` (``check_vma``)."""
    if mesh is None:
        return tree
    return jax.tree_util.tree_map(lambda a: jax.lax.pcast(a, _AXIS, to="varying"), tree)


def _shard(fn: Callable, mesh, num_args: int):
    """``fn(rows, *replicated)`` sharded over the points axis of ``mesh`` (identity without a mesh)."""
    if mesh is None:
        return fn
    return jax.shard_map(fn, mesh=mesh, in_specs=(P(_AXIS),) + (P(),) * num_args, out_specs=P(_AXIS))


def _map_points_impl(fn, strategy, chunk, mesh, points: Points, args):
    def run(rows, stack, args):
        pts = Points(rows=rows, stack=stack)
        return _map_over(lambda r: fn(pts.form(r), *args), rows, strategy, chunk)

    return _shard(run, mesh, 2)(points.rows, points.stack, args)


_map_points_jit = cpu.tuned_jit(_map_points_impl, static_argnames=("fn", "strategy", "chunk", "mesh"))


def _mesh(devices: int | None):
    avail = jax.devices()
    n = len(avail) if devices is None else int(devices)
    if not 1 <= n <= len(avail):
        raise ValueError(f"devices={devices} but {len(avail)} are available")
    if n == 1:
        return None
    return jax.sharding.Mesh(np.asarray(avail[:n]), (_AXIS,))


def _pad_rows(rows: jax.Array, multiple: int) -> jax.Array:
    """Pad the rows to a multiple of ``multiple`` by repeating the last one (results are cut back)."""
    p = int(rows.shape[0])
    total = -(-p // multiple) * multiple
    if total == p:
        return rows
    return jnp.concatenate([rows, jnp.repeat(rows[-1:], total - p, axis=0)])


def _resolve(strategy: str, chunk_size: int | None, num_points: int, param_bytes: int, has_conv: bool):
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if strategy == "auto":
        strategy, auto_chunk = cpu.default_strategy(num_points, param_bytes, has_conv=has_conv)
        return strategy, int(chunk_size or auto_chunk)
    if strategy == "vmap":
        return strategy, num_points
    return strategy, int(chunk_size or 1)


def _param_bytes(tree) -> int:
    return int(sum(np.size(a) * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(tree)))


def _run_mapped(jitted, points: Points, static: dict, args, strategy: str, chunk: int, devices: int | None,
                analyze: bool = False):
    """Call a mapped computation over all points (padding them to fixed shapes) and cut the results back; with
    ``analyze`` compile it only and return its per-device memory statistics."""
    p = points.num_points
    if analyze:
        if strategy == "loop":
            static, points, strategy, chunk, devices = static, points.replace(rows=points.rows[:1]), "map", 1, 1
        mesh = _mesh(devices)
        ndev = 1 if mesh is None else mesh.size
        rows = _pad_rows(points.rows, (chunk if strategy == "map" else 1) * ndev)
        if mesh is not None:
            rows = jax.device_put(rows, NamedSharding(mesh, P(_AXIS)))
        lowered = jitted.lower(**static, strategy=strategy,
                               chunk=chunk if strategy == "map" else int(rows.shape[0]), mesh=mesh,
                               points=points.replace(rows=rows), args=args)
        return lowered.compile().memory_analysis()
    if strategy == "loop":
        outs = [jitted(**static, strategy="map", chunk=1, mesh=None,
                       points=points.replace(rows=points.rows[i:i + 1]), args=args) for i in range(p)]
        return jax.tree_util.tree_map(lambda *a: np.concatenate([np.asarray(x) for x in a]), *outs)
    mesh = _mesh(devices)
    ndev = 1 if mesh is None else mesh.size
    rows = _pad_rows(points.rows, (chunk if strategy == "map" else 1) * ndev)
    if mesh is not None:
        rows = jax.device_put(rows, NamedSharding(mesh, P(_AXIS)))
        if jax.process_count() > 1:
            # the stack and the data may be arrays on this process's devices only (e.g. parameters fresh from
            # training): make them global, replicated over the job's mesh, next to the sharded rows
            points, args = points.replace(stack=replicate(points.stack, mesh)), replicate(args, mesh)
    out = jitted(**static, strategy=strategy, chunk=chunk if strategy == "map" else int(rows.shape[0]), mesh=mesh,
                 points=points.replace(rows=rows), args=args)
    # sharded over the points axis: in a multi-process job each process holds its devices' points only
    return jax.tree_util.tree_map(lambda a: to_host(a)[:p], out)


def map_points(fn: Callable, points: Points, *args, strategy: str = "map", chunk_size: int | None = None,
               devices: int | None = None):
    """``fn(params, *args)`` at every point, mapped and (over several devices) sharded.

    Args:
      fn: a per-point function of the point's parameters; it must be hashable (a module-level function or a
        frozen dataclass), since it is a static argument of the compiled map.
      points: the :class:`Points`.
      *args: replicated arguments (e.g. a batch).
      strategy: ``"map"``, ``"vmap"`` or ``"loop"`` (see the module docstring); ``"auto"`` means ``"map"``.
      chunk_size: points per vectorised chunk of ``"map"`` (default 1).
      devices: how many devices to shard the points over (default all).

    Returns:
      The outputs stacked over the points, as NumPy arrays.

    Example:
        >>> import jax.numpy as jnp
        >>> pts = stacked_points({"w": jnp.arange(6.0).reshape(3, 2)})
        >>> map_points(_sum_w, pts).tolist()
        [1.0, 5.0, 9.0]
    """
    strategy = "map" if strategy == "auto" else strategy
    strategy, chunk = _resolve(strategy, chunk_size, points.num_points, 0, False)
    return _run_mapped(_map_points_jit, points, {"fn": fn}, tuple(args), strategy, chunk, devices)


def _sum_w(params):  # used by the doctest of map_points
    return jnp.sum(params["w"])


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
    if isinstance(steps, bool) or int(steps) != steps or steps < 2:
        raise ValueError(f"a grid needs an integer number of steps >= 2 per axis, got {steps!r}")
    g = np.linspace(0.0, 1.0, int(steps))
    uu, vv = np.meshgrid(g, g, indexing="ij")
    return np.stack([uu.ravel(), vv.ravel()], axis=1)


def _xy(data) -> tuple[np.ndarray, np.ndarray]:
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
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    bs = min(int(batch_size), n)
    nb = n // bs if drop_last else -(-n // bs)
    total = nb * bs
    keep = min(n, total)
    pad = total - keep

    def prep(a):
        a = np.asarray(a)[:keep]
        if pad:
            a = np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)])
        return jnp.asarray(a.reshape((nb, bs) + a.shape[1:]))

    mask = np.ones(total, np.float32)
    mask[keep:] = 0.0
    return prep(x), (prep(y) if y is not None else None), jnp.asarray(mask.reshape(nb, bs))


def _bn_batches(x, batch_size: int, num_batches: int | None):
    bx, _, _ = stage_batches(np.asarray(x), None, batch_size, drop_last=True)
    if num_batches is not None:
        if isinstance(num_batches, bool) or int(num_batches) != num_batches or num_batches < 1:
            raise ValueError(f"bn_batches must be an integer >= 1, got {num_batches!r}")
        if num_batches > bx.shape[0]:
            raise ValueError(f"bn_batches={num_batches} but bn_data has only {bx.shape[0]} full batches "
                             f"of {bx.shape[1]}")
        bx = bx[:num_batches]
    return bx


def _group_size(num_batches: int, batch_bytes: int, budget: int) -> int:
    """The largest divisor of ``num_batches`` whose staged first-layer outputs fit in ``budget`` bytes."""
    best = 1
    for g in range(1, num_batches + 1):
        if num_batches % g == 0 and g * batch_bytes <= budget:
            best = g
    return best


def _regroup(a, g: int):
    return a.reshape((a.shape[0] // g, g) + a.shape[1:])


# ---- BatchNorm ------------------------------------------------------------------------------------------

def _bn_rngs():
    # BatchNorm passes run in train mode, where a model with dropout asks for a key; its value is irrelevant
    # to the statistics of the layers before the dropout (every zoo model's)
    return {"dropout": jax.random.key(0)}


def _zeros_stats(model: Model, x_example, like: PyTree | None = None) -> PyTree:
    """Zero BatchNorm statistics; with ``like`` (the parameters) in their precision, so float64 parameters get
    float64 statistics (Flax initialises them in float32 whatever the parameters)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x_example)
    if "batch_stats" not in shapes:
        raise ValueError(f"model {model.name} has apply_with_stats but its variables hold no 'batch_stats'")
    leaves = jax.tree_util.tree_leaves(like) if like is not None else []
    wide = jnp.result_type(*leaves) if leaves else jnp.float32
    wide = wide if jnp.issubdtype(wide, jnp.floating) else jnp.float32

    def zeros(sd):
        dt = jnp.promote_types(sd.dtype, wide) if jnp.issubdtype(sd.dtype, jnp.floating) else sd.dtype
        return jnp.zeros(sd.shape, dt)

    return jax.tree_util.tree_map(zeros, shapes["batch_stats"])


@functools.partial(jax.jit, static_argnums=0)
def _bn_probe(model: Model, params, zeros, x):
    ones = jax.tree_util.tree_map(jnp.ones_like, zeros)
    _, s0 = model.apply_with_stats({"params": params, "batch_stats": zeros}, x, rngs=_bn_rngs())
    _, s1 = model.apply_with_stats({"params": params, "batch_stats": ones}, x, rngs=_bn_rngs())
    return jax.tree_util.tree_map(jnp.subtract, s1, s0)


def bn_momentum(model: Model, params: PyTree, x) -> PyTree:
    """Recover each BatchNorm layer's running-average momentum from two calls on one batch.

    A Flax BatchNorm update is ``r' = m r + (1 - m) b`` with the batch statistic ``b``. Starting from
    ``r = 0`` gives ``(1 - m) b``; from ``r = 1`` gives ``m + (1 - m) b``; their difference is ``m``. This
    makes the exact recalibration work for any Flax model with standard BatchNorm, whatever momentum.

    Args:
      model: a model with BatchNorm.
      params: its ``params``.
      x: one input batch.

    Returns:
      A tree shaped like the ``batch_stats`` with one momentum per statistic (in the parameters' precision).

    Example:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from mclandscape.engine.models.base import from_flax
        >>> class Net(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x, train=False):
        ...         return nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(2)(x))
        >>> model = from_flax(Net(), "bn_doc", has_batch_stats=True)
        >>> x = jnp.arange(12.0).reshape(6, 2)
        >>> mom = bn_momentum(model, model.init(jax.random.key(0), x)["params"], x)
        >>> round(float(mom["BatchNorm_0"]["mean"]), 4)
        0.9
    """
    x = jnp.asarray(x)
    diff = _bn_probe(model, params, _zeros_stats(model, x[:1], params), x)

    def mom(m):
        dt = jnp.promote_types(jnp.float32, m.dtype)
        m = np.asarray(m, np.float64)
        mm = float(np.mean(m))
        if not np.allclose(m, mm, atol=1e-4) or not 0.0 <= mm < 1.0 - 1e-6:
            raise ValueError("BatchNorm running statistics are not a momentum average r' = m r + (1-m) b "
                             f"with one m per layer in [0, 1) (found m in [{m.min():.4g}, {m.max():.4g}])")
        # in the statistics' precision (float64 under x64): a float32 0.9 would bias float64 statistics
        return jnp.asarray(mm, dt)

    return jax.tree_util.tree_map(mom, diff)


# ---- model metrics ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Metric:
    """The static description of what is computed per point (a static argument: hashes by value, the
    model and the loss by identity)."""

    model: Model
    loss_fn: Callable
    with_probs: bool
    recompute_bn: bool
    dtype: str | None
    factor: cpu.FirstConv | None


def _cast(tree, dtype):
    if dtype is None:
        return tree
    return jax.tree_util.tree_map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _with_zero_stats(model: Model, fixed: dict, zeros) -> dict:
    rest = dict(fixed)
    if model.has_batch_stats and "batch_stats" not in rest:
        rest["batch_stats"] = zeros
    return rest


def _first_layer(model: Model, factor: cpu.FirstConv, rest: dict, stack: PyTree, x, dtype):
    """The first convolution of every stacked tree on ``x`` (``[B, ..., K, Cout]``), one convolution with the
    kernels stacked along the output channels. The model runs once (on the first tree) to find the layer
    and its input as the model prepares it; the rest of that pass is dead code, removed by XLA."""
    x = x if dtype is None else x.astype(dtype)
    enter, cap = cpu.capture_first_conv()
    with enter:
        model.apply({**rest, "params": _cast(tree_index(stack, 0), dtype)}, x, train=False)
    conv = factor.params(_cast(stack, dtype))
    return cpu.stacked_first_conv(cap.module, conv["kernel"], conv.get("bias"), cap.input)


def _evaluate_impl(metric: _Metric, strategy: str, chunk: int, mesh, points: Points, args):
    """Per batch group: the first layer of every stacked tree (when factorised), then every point's BatchNorm
    statistics and loss sums over the group's batches (see the module docstring)."""
    xs, ys, ms, bn_x, zeros, mom, fixed = args
    model = metric.model
    dtype = None if metric.dtype is None else jnp.dtype(metric.dtype)
    acc_dtype = jnp.promote_types(jnp.float32, jnp.result_type(*jax.tree_util.tree_leaves(points.stack)))

    def run(rows, stack, xs, ys, ms, bn_x, zeros, mom, fixed):
        pts = Points(rows=rows, stack=stack)
        num_p = rows.shape[0]

        def features(xg):
            """``[gb, B, ..., K, Cout]``: the first convolution of every stacked tree on a group of batches."""
            if metric.factor is None:
                return None
            h = _first_layer(model, metric.factor, _with_zero_stats(model, fixed, zeros), stack,
                             xg.reshape((-1,) + xg.shape[2:]), dtype)
            return h.reshape(xg.shape[:2] + h.shape[1:])

        def forward(params, variables_rest, xb, row, feats_b, with_stats: bool):
            variables = {**variables_rest, "params": params}
            xb = xb if dtype is None else xb.astype(dtype)
            if feats_b is None:
                if with_stats:
                    return model.apply_with_stats(variables, xb, rngs=_bn_rngs())
                return model.apply(variables, xb, train=False)
            replace = cpu.replace_first_conv(lambda _m, _x: cpu.combine_features(row, feats_b))
            with replace:
                if with_stats:
                    return model.apply_with_stats(variables, xb, rngs=_bn_rngs())
                return model.apply(variables, xb, train=False)

        # BatchNorm statistics of every point: exact average of per-batch statistics over the BN batches.
        stats = None
        if metric.recompute_bn:
            def bn_group(acc, xg):
                feats = features(xg)

                def one(row):
                    params = _cast(pts.form(row), dtype)

                    def body(a, i):
                        fb = None if feats is None else feats[i]
                        _, s0 = forward(params, {**fixed, "batch_stats": zeros}, xg[i], row, fb, True)
                        b = jax.tree_util.tree_map(lambda s, m: s.astype(acc_dtype) / (1.0 - m), s0, mom)
                        return jax.tree_util.tree_map(jnp.add, a, b), None

                    init = _varying(jax.tree_util.tree_map(lambda z: jnp.zeros(z.shape, acc_dtype), zeros), mesh)
                    a, _ = jax.lax.scan(body, init, jnp.arange(xg.shape[0]))
                    return a

                return jax.tree_util.tree_map(jnp.add, acc, _map_over(one, rows, strategy, chunk)), None

            acc0 = _varying(jax.tree_util.tree_map(lambda z: jnp.zeros((num_p,) + z.shape, acc_dtype), zeros), mesh)
            stats, _ = jax.lax.scan(bn_group, acc0, bn_x)
            nbn = bn_x.shape[0] * bn_x.shape[1]
            stats = jax.tree_util.tree_map(lambda a, z: (a / nbn).astype(z.dtype), stats, zeros)

        def group(carry, g):
            xg, yg, mg = g
            feats = features(xg)

            def one(args_p):
                row, st = args_p
                params = _cast(pts.form(row), dtype)
                rest = dict(fixed) if st is None else {**fixed, "batch_stats": st}

                def body(acc, i):
                    fb = None if feats is None else feats[i]
                    logits = forward(params, rest, xg[i], row, fb, False).astype(acc_dtype)
                    yb, mb = yg[i], mg[i].astype(acc_dtype)
                    lsum = jnp.sum(metric.loss_fn(logits, yb) * mb)
                    csum = correct_count(logits, yb, mb)
                    out = jax.nn.softmax(logits, axis=-1) if metric.with_probs else None
                    return (acc[0] + lsum, acc[1] + csum), out

                init = _varying((jnp.zeros((), acc_dtype), jnp.zeros((), acc_dtype)), mesh)
                (l, c), probs = jax.lax.scan(body, init, jnp.arange(xg.shape[0]))
                return l, c, probs

            l, c, probs = _map_over(one, (rows, stats), strategy, chunk)
            return (carry[0] + l, carry[1] + c), probs

        init = _varying((jnp.zeros((num_p,), acc_dtype), jnp.zeros((num_p,), acc_dtype)), mesh)
        (lsum, csum), probs = jax.lax.scan(group, init, (xs, ys, ms))
        n = jnp.sum(ms)
        if metric.with_probs:  # [ng, P, gb, B, C] -> [P, ng * gb * B, C]
            probs = jnp.moveaxis(probs, 1, 0)
            probs = probs.reshape((num_p, -1) + probs.shape[4:])
        return lsum / n, csum / n, probs

    return _shard(run, mesh, 8)(points.rows, points.stack, xs, ys, ms, bn_x, zeros, mom, fixed)


_evaluate_jit = cpu.tuned_jit(_evaluate_impl, static_argnames=("metric", "strategy", "chunk", "mesh"))


@dataclasses.dataclass(frozen=True)
class PointMetrics:
    """Per-point results: ``loss[P]`` (mean task loss), ``accuracy[P]`` (NaN unless the targets are integer
    class labels) and optionally ``probs[P, N, C]`` (softmax outputs per example); the strategy, chunk and
    first-layer mode that were used."""

    loss: np.ndarray
    accuracy: np.ndarray
    probs: np.ndarray | None = None
    strategy: str = ""
    chunk_size: int = 1
    stem: str = "off"


def _evaluate(model: Model, points: Points, data, *, batch_size: int = 500, bn_data=None,
             bn_batches: int | None = None, bn_batch_size: int = 128, variables: PyTree | None = None,
             return_probs: bool = False, loss_fn: Callable = cross_entropy, strategy: str = "auto",
             chunk_size: int | None = None, devices: int | None = None, stem: str = "auto", compute_dtype=None,
             stem_bytes: int = 1 << 29, check: bool = True, analyze: bool = False):
    """:func:`evaluate` (``analyze=False``) or :func:`evaluation_memory` (``analyze=True``)."""
    if not isinstance(points, Points):
        raise ValueError(f"points must be Points (see connector_points / stacked_points), got {type(points).__name__}")
    if stem not in STEM_MODES:
        raise ValueError(f"unknown stem mode {stem!r}; expected one of {STEM_MODES}")
    num_points = points.num_points
    if num_points == 0:
        raise ValueError("empty set of points: give at least one point")
    if check:
        check_finite(points.stack, "the parameters")
    dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"compute_dtype must be a floating dtype, got {compute_dtype!r}")
    x, y = _xy(data)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"data has {x.shape[0]} inputs but {y.shape[0]} targets")
    fixed = {k: v for k, v in dict(variables or {}).items() if k != "params"}
    example = points.example()
    recompute = model.has_batch_stats and "batch_stats" not in fixed
    xs, ys, ms = stage_batches(x, y, batch_size)
    if recompute:
        if bn_data is None:
            raise ValueError(f"model {model.name} has BatchNorm: pass bn_data (training data) so each point's "
                             "statistics are recomputed before it is evaluated, or variables={'batch_stats': ...}")
        bx = bn_data if isinstance(bn_data, np.ndarray | jax.Array) else _xy(bn_data)[0]
        bn_x = _bn_batches(bx, bn_batch_size, bn_batches)
        zeros = _zeros_stats(model, bn_x[0][:1], example)
        mom = bn_momentum(model, example, bn_x[0])
    else:
        bn_x, zeros, mom = jnp.zeros((0, 1, 1), jnp.float32), {}, {}
    strategy, chunk = _resolve(strategy, chunk_size, num_points, _param_bytes(example), cpu.has_conv(example))

    factor = None
    if stem != "off" and not points.indexed and (stem == "factor" or cpu.has_conv(example)):
        rest = _with_zero_stats(model, fixed, zeros)
        conv = cpu.first_conv(lambda v, xx: model.apply({**rest, **v}, xx, train=False), {"params": example},
                              jnp.asarray(x[:1]))
        if stem == "factor":
            if conv is None:
                raise ValueError(f"stem='factor' needs a Flax model whose first convolution is fed by the input "
                                 f"alone; {model.name} has none")
            factor = conv
        elif cpu.use_factorisation(conv, num_points, points.num_stacked):
            factor = conv
    elif stem == "factor":
        raise ValueError("stem='factor' needs rows over a stack (a connector, a plane): identity rows (stacked "
                         "parameters) have no control points to share the first layer")
    if factor is not None and strategy == "loop":
        factor = None if stem == "auto" else factor

    if factor is not None:  # stage the first-layer outputs of groups of batches, at most stem_bytes at a time
        if stem_bytes < 1:
            raise ValueError(f"stem_bytes must be >= 1, got {stem_bytes}")
        out = jax.eval_shape(lambda xb: _first_layer(model, factor, _with_zero_stats(model, fixed, zeros),
                                                     points.stack, xb, dtype), xs[0])
        batch_bytes = int(np.prod(out.shape)) * jnp.dtype(out.dtype).itemsize
        xs_g, ys_g, ms_g = (_regroup(a, _group_size(xs.shape[0], batch_bytes, stem_bytes)) for a in (xs, ys, ms))
        bn_g = _regroup(bn_x, _group_size(bn_x.shape[0], batch_bytes, stem_bytes)) if recompute else bn_x[None]
    else:
        xs_g, ys_g, ms_g = xs[None], ys[None], ms[None]
        bn_g = bn_x[None]
    metric = _Metric(model=model, loss_fn=loss_fn, with_probs=bool(return_probs), recompute_bn=recompute,
                     dtype=None if dtype is None else dtype.name, factor=factor)
    args = (xs_g, ys_g, ms_g, bn_g, zeros, mom, fixed)
    if analyze:
        stats = _run_mapped(_evaluate_jit, points, {"metric": metric}, args, strategy, chunk, devices, analyze=True)
        return {"argument_bytes": int(stats.argument_size_in_bytes), "output_bytes": int(stats.output_size_in_bytes),
                "temp_bytes": int(stats.temp_size_in_bytes), "alias_bytes": int(stats.alias_size_in_bytes),
                "peak_bytes": int(stats.argument_size_in_bytes + stats.output_size_in_bytes
                                  + stats.temp_size_in_bytes - stats.alias_size_in_bytes),
                "strategy": strategy, "chunk_size": chunk, "stem": "factor" if factor is not None else "off"}
    loss, acc, probs = _run_mapped(_evaluate_jit, points, {"metric": metric}, args, strategy, chunk, devices)
    if return_probs:
        probs = np.asarray(probs)[:, : x.shape[0]]
    else:
        probs = None
    return PointMetrics(loss=np.asarray(loss), accuracy=np.asarray(acc), probs=probs, strategy=strategy,
                        chunk_size=chunk, stem="factor" if factor is not None else "off")


def evaluate(model: Model, points: Points, data, *, batch_size: int = 500, bn_data=None,
             bn_batches: int | None = None, bn_batch_size: int = 128, variables: PyTree | None = None,
             return_probs: bool = False, loss_fn: Callable = cross_entropy, strategy: str = "auto",
             chunk_size: int | None = None, devices: int | None = None, stem: str = "auto", compute_dtype=None,
             stem_bytes: int = 1 << 29, check: bool = True) -> PointMetrics:
    """Mean loss and accuracy on ``data`` at every point of ``points`` (see the module docstring).

    Args:
      model: the :class:`~mclandscape.engine.models.Model`.
      points: the :class:`Points` (their stack holds the ``params`` collection only).
      data: a Dataset or ``(x, y)``; evaluated in batches of ``batch_size`` (a partial last batch is masked).
      batch_size: examples per evaluation batch.
      bn_data: training data for the BatchNorm statistics of each point (models with BatchNorm, unless
        ``variables`` holds them); ``bn_batches`` full batches of ``bn_batch_size`` (default all).
      bn_batches, bn_batch_size: see ``bn_data``.
      variables: other collections shared by every point (e.g. ``{"batch_stats": ...}`` of a trained model).
      return_probs: also return the softmax outputs ``[P, N, C]``.
      loss_fn: per-example loss ``(logits, y) -> [N]``.
      strategy, chunk_size, devices, stem, compute_dtype: see the module docstring.
      stem_bytes: bounds the memory of the staged first-layer outputs of the factorised path.
      check: refuse non-finite parameters.

    Returns:
      :class:`PointMetrics`; losses and accuracies in the parameters' precision (at least float32).

    Example:
        >>> import jax
        >>> import mclandscape as mcl
        >>> data = mcl.load_dataset("iris", "test")
        >>> model = mcl.get_model("mlp", widths=[4], num_classes=3)
        >>> p = model.init(jax.random.key(0), data.x[:1])["params"]
        >>> m = evaluate(model, plane_points(p, p, None, [0.0, 1.0]), data)   # p and 2 p
        >>> m.loss.shape, m.accuracy.shape
        ((2,), (2,))
    """
    return _evaluate(model, points, data, batch_size=batch_size, bn_data=bn_data, bn_batches=bn_batches,
                     bn_batch_size=bn_batch_size, variables=variables, return_probs=return_probs, loss_fn=loss_fn,
                     strategy=strategy, chunk_size=chunk_size, devices=devices, stem=stem,
                     compute_dtype=compute_dtype, stem_bytes=stem_bytes, check=check)


def evaluation_memory(model: Model, points: Points, data, *, batch_size: int = 500, bn_data=None,
             bn_batches: int | None = None, bn_batch_size: int = 128, variables: PyTree | None = None,
             return_probs: bool = False, loss_fn: Callable = cross_entropy, strategy: str = "auto",
             chunk_size: int | None = None, devices: int | None = None, stem: str = "auto", compute_dtype=None,
             stem_bytes: int = 1 << 29, check: bool = True) -> dict:
    """Compile :func:`evaluate`'s computation for these arguments without running it; its memory per device.

    From XLA's analysis: ``argument_bytes``, ``output_bytes``, ``temp_bytes``, ``alias_bytes`` and
    ``peak_bytes`` (their total, less aliasing), with the ``strategy``, ``chunk_size`` and ``stem`` chosen.
    What grows with the number of points is only the rows and the per-point outputs: at most a chunk of
    parameter copies exists at any time (``benchmarks/scaling.py`` and ``benchmarks/loss_plane_memory.py``
    measure it).

    Args:
      model, points, data, **options: as for :func:`evaluate`.

    Returns:
      A dict of byte counts and the chosen strategy.

    Example:
        >>> import jax
        >>> import mclandscape as mcl
        >>> data = mcl.load_dataset("iris", "test")
        >>> model = mcl.get_model("mlp", widths=[4], num_classes=3)
        >>> p = model.init(jax.random.key(0), data.x[:1])["params"]
        >>> mem = evaluation_memory(model, plane_points(p, p, None, [0.0, 1.0]), data, strategy="map")
        >>> mem["peak_bytes"] > 0, mem["strategy"]
        (True, 'map')
    """
    return _evaluate(model, points, data, batch_size=batch_size, bn_data=bn_data, bn_batches=bn_batches,
                     bn_batch_size=bn_batch_size, variables=variables, return_probs=return_probs, loss_fn=loss_fn,
                     strategy=strategy, chunk_size=chunk_size, devices=devices, stem=stem,
                     compute_dtype=compute_dtype, stem_bytes=stem_bytes, check=check, analyze=True)


def evaluate_points(model: Model, connector: Connector, points, data, *, extrapolate: bool = False,
                    **kwargs) -> PointMetrics:
    """Mean loss and accuracy on ``data`` at P points of a connector (t values, (u, v) pairs or alphas).

    Each point's parameters ``phi(p) = sum_k c_k(p) theta_k`` are formed inside the mapped computation.
    BatchNorm statistics come from ``bn_data``, which must be given for a model with BatchNorm (this function
    sees one data set; :func:`mclandscape.methods.curves.evaluate_curve` and
    :func:`mclandscape.methods.surface.surface_grid` default it to their ``train``).

    Args:
      model: the :class:`~mclandscape.engine.models.Model`.
      connector: the :class:`~mclandscape.core.connectors.Connector`.
      points: ``[P]`` t values, ``[P, 2]`` (u, v) pairs or ``[P, K]`` weights; validated (in [0, 1],
        barycentric sums 1; nothing is clipped).
      data: a Dataset or ``(x, y)``.
      extrapolate: accept points outside [0, 1].
      **kwargs: see :func:`evaluate` (``batch_size``, ``bn_data``, ``strategy``, ...).

    Returns:
      :class:`PointMetrics` (``loss`` and ``accuracy`` ``[P]`` in the parameters' precision or float32).

    Example:
        >>> import jax
        >>> import mclandscape as mcl
        >>> data = mcl.load_dataset("iris", "test")
        >>> model = mcl.get_model("mlp", widths=[4], num_classes=3)
        >>> p0, p1 = (model.init(jax.random.key(s), data.x[:1])["params"] for s in (0, 1))
        >>> m = evaluate_points(model, mcl.bezier_curve(p0, p1, degree=1), [0.0, 0.5, 1.0], data)
        >>> m.loss.shape, bool(((m.accuracy >= 0) & (m.accuracy <= 1)).all())
        ((3,), True)
    """
    if kwargs.get("check", True):
        check_finite(connector.control, "connector control points")
    return evaluate(model, connector_points(connector, points, extrapolate=extrapolate), data,
                    **{**kwargs, "check": False})


def evaluate_params(model: Model, stacked_params: PyTree, data, **kwargs) -> PointMetrics:
    """Mean loss and accuracy on ``data`` of P parameter sets stacked on a leading axis.

    Args:
      model: the :class:`~mclandscape.engine.models.Model`.
      stacked_params: the ``params`` collections stacked on a leading axis
        (:func:`mclandscape.core.tree.tree_stack`).
      data: a Dataset or ``(x, y)``.
      **kwargs: see :func:`evaluate`.

    Returns:
      :class:`PointMetrics`.

    Example:
        >>> import jax
        >>> import mclandscape as mcl
        >>> data = mcl.load_dataset("iris", "test")
        >>> model = mcl.get_model("mlp", widths=[4], num_classes=3)
        >>> ps = [model.init(jax.random.key(s), data.x[:1])["params"] for s in range(3)]
        >>> evaluate_params(model, tree_stack(ps), data).loss.shape
        (3,)
    """
    return evaluate(model, stacked_points(stacked_params), data, **kwargs)


def evaluate_model(model: Model, variables: PyTree, data, *, batch_size: int = 1000,
                   loss_fn: Callable = cross_entropy) -> dict:
    """``{"loss", "acc"}`` of one model in evaluation mode with its own variables.

    Running BatchNorm statistics as stored, no dropout; ``acc`` is NaN unless the targets are class labels.

    Args:
      model: the :class:`~mclandscape.engine.models.Model`.
      variables: a dict of collections with ``"params"``.
      data: a Dataset or ``(x, y)``.
      batch_size: examples per evaluation batch.
      loss_fn: per-example loss.

    Returns:
      ``{"loss": float, "acc": float}``.

    Example:
        >>> import jax
        >>> import mclandscape as mcl
        >>> data = mcl.load_dataset("iris", "test")
        >>> model = mcl.get_model("mlp", widths=[4], num_classes=3)
        >>> r = evaluate_model(model, model.init(jax.random.key(0), data.x[:1]), data)
        >>> sorted(r), 0.0 <= r["acc"] <= 1.0
        (['acc', 'loss'], True)
    """
    if not hasattr(variables, "items") or "params" not in variables:
        raise ValueError("variables must be a dict with a 'params' collection")
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], variables["params"])
    m = evaluate(model, stacked_points(params), data, batch_size=batch_size, variables=variables,
                 loss_fn=loss_fn, strategy="map", chunk_size=1, devices=1, stem="off")
    return {"loss": float(m.loss[0]), "acc": float(m.accuracy[0])}


def _recalibrate_impl(model: Model, params, bn_x, zeros, mom):
    def body(acc, xb):
        _, s0 = model.apply_with_stats({"params": params, "batch_stats": zeros}, xb, rngs=_bn_rngs())
        b = jax.tree_util.tree_map(lambda s, m: s.astype(jnp.promote_types(s.dtype, jnp.float32)) / (1.0 - m),
                                   s0, mom)
        return jax.tree_util.tree_map(jnp.add, acc, b), None

    init = jax.tree_util.tree_map(lambda z: jnp.zeros(z.shape, jnp.promote_types(z.dtype, jnp.float32)), zeros)
    acc, _ = jax.lax.scan(body, init, bn_x)
    return jax.tree_util.tree_map(lambda a, z: (a / bn_x.shape[0]).astype(z.dtype), acc, zeros)


_recalibrate_jit = cpu.tuned_jit(_recalibrate_impl, static_argnums=0)


def recalibrate_bn(model: Model, params: PyTree, bn_data, *, batch_size: int = 128,
                   num_batches: int | None = None) -> PyTree:
    """BatchNorm statistics of one parameter point, averaged exactly over ``num_batches`` full batches.

    Garipov et al.'s ``update_bn`` computes the same cumulative average (of per-batch means and biased
    variances). Batches are taken in order.

    Args:
      model: a model with BatchNorm.
      params: the point's ``params``.
      bn_data: a Dataset, ``(x, y)`` or an ``x`` array.
      batch_size: examples per batch.
      num_batches: full batches to average (default all).

    Returns:
      The ``batch_stats`` tree, in the parameters' precision (float64 for float64 parameters).

    Example:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from mclandscape.engine.models.base import from_flax
        >>> class Net(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x, train=False):
        ...         return nn.BatchNorm(use_running_average=not train)(x)
        >>> model = from_flax(Net(), "bn_doc2", has_batch_stats=True)
        >>> x = jnp.arange(8.0).reshape(4, 2)
        >>> stats = recalibrate_bn(model, model.init(jax.random.key(0), x)["params"], x, batch_size=4)
        >>> stats["BatchNorm_0"]["mean"].round(4).tolist()
        [3.0, 4.0]
    """
    if not model.has_batch_stats:
        raise ValueError(f"model {model.name} has no BatchNorm statistics to recalibrate")
    x = bn_data if isinstance(bn_data, np.ndarray | jax.Array) else _xy(bn_data)[0]
    bx = _bn_batches(x, batch_size, num_batches)
    return _recalibrate_jit(model, params, bx, _zeros_stats(model, bx[0][:1], params),
                           bn_momentum(model, params, bx[0]))
