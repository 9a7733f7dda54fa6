"""The point-evaluation engine: loss, accuracy and output probabilities of many parameter points.

Two entry points share one engine:

- :func:`evaluate_params` takes P parameter pytrees stacked on a leading axis (band pivots, ensemble
  members, lattice voxels);
- :func:`evaluate_points` takes a :class:`~mclandscape.connectors.Connector` and P points on it; each
  point's parameters are formed inside the mapped computation from one coefficient row
  (``sum_k c_k theta_k``, seed 000 eq. 6), so at most ``chunk_size`` parameter copies per device exist at
  any time, never all P.

Strategies (``strategy=``):

- ``"loop"``: a Python loop over points calling one jitted single-point function;
- ``"map"``: one jitted ``jax.lax.map`` over points with ``batch_size=chunk_size`` (chunk 1 is an XLA
  loop; chunk c vmaps c points at a time);
- ``"vmap"``: ``jax.vmap`` over chunks of ``chunk_size`` points, chunks looped in Python;
- ``"auto"``: ``"map"`` with chunk 1 on CPU (measured: per-point ``vmap`` gives each point its own
  convolution kernels and was 2-35x slower on this CPU; for a 64-128-128-10 MLP on 360 digits
  ``lax.map`` took ~0.26 ms/point against ~0.67 ms/point for a full vmap), and ``"map"`` with a chunk
  bounded by memory (``chunk_bytes``) on GPU/TPU. ``benchmarks/surface_sampling.py`` measures the choice.

With several devices, points are sharded over a 1-D mesh with ``jax.shard_map`` (data and control points
replicated); results equal the single-device ones.

BatchNorm (models with ``apply_with_stats``): before a point is evaluated its running statistics are
recomputed on ``bn_data`` as the exact average of the per-batch statistics over ``bn_batches`` full
batches, as Garipov et al.'s ``update_bn`` does (with equal batch sizes, the example-weighted average).
This runs inside the same mapped computation, batched over points.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .connectors import Connector
from .losses import correct as _correct
from .losses import cross_entropy
from .models.base import Model
from .tree import PyTree, check_finite, tree_combine

__all__ = [
    "PointMetrics",
    "evaluate_params",
    "evaluate_points",
    "recalibrate_bn",
    "bn_momentum",
    "stage_batches",
    "uv_grid",
    "auto_strategy",
    "STRATEGIES",
]

STRATEGIES = ("auto", "loop", "map", "vmap")


@dataclasses.dataclass(frozen=True)
class PointMetrics:
    """Per-point results: ``loss[P]`` (mean task loss), ``accuracy[P]`` (NaN for non-integer targets) and
    optionally ``probs[P, N, C]`` (softmax outputs per example)."""

    loss: np.ndarray
    accuracy: np.ndarray
    probs: np.ndarray | None = None
    strategy: str = ""
    chunk_size: int = 1


def uv_grid(steps: int = 11) -> np.ndarray:
    """The (u, v) grid ``[steps*steps, 2]`` with spacing ``1/(steps-1)``, u major (default step 0.1)."""
    if steps < 2:
        raise ValueError(f"a grid needs at least 2 steps per axis, got {steps}")
    g = np.linspace(0.0, 1.0, steps)
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
    """
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("empty dataset")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bs = min(batch_size, n)
    nb = n // bs if drop_last else -(-n // bs)
    if nb == 0:
        raise ValueError(f"no full batch of {bs} examples in {n}")
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


def _zeros_stats(model: Model, params: PyTree, x_example) -> PyTree:
    shapes = jax.eval_shape(model.init, jax.random.key(0), x_example)
    if "batch_stats" not in shapes:
        raise ValueError(f"model {model.name} has apply_with_stats but its variables hold no 'batch_stats'")
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["batch_stats"])


_BN_RNG = {"dropout": jax.random.key(0)}


def bn_momentum(model: Model, params: PyTree, x: np.ndarray) -> PyTree:
    """Recover each BatchNorm layer's running-average momentum from two calls on one batch.

    A Flax BatchNorm update is ``r' = m r + (1 - m) b`` with the batch statistic ``b``. Starting from
    ``r = 0`` gives ``(1 - m) b``; from ``r = 1`` gives ``m + (1 - m) b``; their difference is ``m``. This
    makes the exact recalibration work for any Flax model with standard BatchNorm, whatever momentum.
    """
    x = jnp.asarray(x)
    zeros = _zeros_stats(model, params, x[:1])
    ones = jax.tree_util.tree_map(jnp.ones_like, zeros)
    _, s0 = model.apply_with_stats({"params": params, "batch_stats": zeros}, x, rngs=_BN_RNG)
    _, s1 = model.apply_with_stats({"params": params, "batch_stats": ones}, x, rngs=_BN_RNG)

    def mom(a, b):
        m = np.asarray(b - a, np.float64)
        mm = float(np.mean(m))
        if not np.allclose(m, mm, atol=1e-4) or not 0.0 <= mm < 1.0 - 1e-6:
            raise ValueError("BatchNorm running statistics are not a momentum average r' = m r + (1-m) b "
                             f"with one m per layer in [0, 1) (found m in [{m.min():.4g}, {m.max():.4g}])")
        return jnp.asarray(mm, jnp.float32)

    return jax.tree_util.tree_map(mom, s0, s1)


def _bn_stats_fn(model: Model, zeros: PyTree, momentum: PyTree):
    """Pure function params, bn_x[nb, B, ...] -> exact average batch statistics over the nb batches."""

    def stats(params, bn_x):
        def body(acc, xb):
            _, s0 = model.apply_with_stats({"params": params, "batch_stats": zeros}, xb, rngs=_BN_RNG)
            b = jax.tree_util.tree_map(lambda s, m: s / (1.0 - m), s0, momentum)
            return jax.tree_util.tree_map(jnp.add, acc, b), None

        acc, _ = jax.lax.scan(body, zeros, bn_x)
        return jax.tree_util.tree_map(lambda a: a / bn_x.shape[0], acc)

    return stats


def recalibrate_bn(model: Model, params: PyTree, bn_data, *, batch_size: int = 128,
                   num_batches: int | None = None) -> PyTree:
    """BatchNorm statistics of one parameter point, averaged exactly over ``num_batches`` full batches.

    ``bn_data`` is a Dataset or ``(x, y)`` (or an ``x`` array); batches are taken in order. Garipov's
    ``update_bn`` computes the same cumulative average (of per-batch means and biased variances).
    """
    if not model.has_batch_stats:
        raise ValueError(f"model {model.name} has no BatchNorm statistics to recalibrate")
    x = bn_data if isinstance(bn_data, np.ndarray | jax.Array) else _xy(bn_data)[0]
    bx = _bn_batches(x, batch_size, num_batches)
    mom = bn_momentum(model, params, bx[0])
    zeros = _zeros_stats(model, params, bx[0][:1])
    return jax.jit(_bn_stats_fn(model, zeros, mom))(params, bx)


def _bn_batches(x, batch_size: int, num_batches: int | None):
    bx, _, _ = stage_batches(np.asarray(x), None, batch_size, drop_last=True)
    if num_batches is not None:
        if num_batches < 1:
            raise ValueError(f"bn_batches must be >= 1, got {num_batches}")
        if num_batches > bx.shape[0]:
            raise ValueError(f"bn_batches={num_batches} but bn_data has only {bx.shape[0]} full batches "
                             f"of {bx.shape[1]}")
        bx = bx[:num_batches]
    return bx


def auto_strategy(num_points: int, param_bytes: int, *, backend: str | None = None,
                  chunk_bytes: int = 1 << 30) -> tuple[str, int]:
    """The default ``(strategy, chunk_size)`` for a backend (see the module docstring)."""
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return "map", 1
    chunk = int(max(1, min(num_points, 64, chunk_bytes // max(param_bytes, 1))))
    return "map", chunk


def _per_point_fn(model, loss_fn, with_probs, has_bn, make_params):
    def per_point(desc, shared, xs, ys, ms, bn_x, zeros, mom):
        params = make_params(desc, shared)
        variables = {"params": params}
        if has_bn:
            variables["batch_stats"] = _bn_stats_fn(model, zeros, mom)(params, bn_x)

        def body(carry, batch):
            xb, yb, mb = batch
            logits = model.apply(variables, xb, train=False)
            lsum = jnp.sum(loss_fn(logits, yb) * mb)
            if jnp.issubdtype(yb.dtype, jnp.integer):
                csum = jnp.sum(_correct(logits, yb) * mb)
            else:
                csum = jnp.asarray(jnp.nan, jnp.float32)
            out = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) if with_probs else None
            return (carry[0] + lsum, carry[1] + csum), out

        (lsum, csum), probs = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
                                           (xs, ys, ms))
        n = jnp.sum(ms)
        return lsum / n, csum / n, probs

    return per_point


def _make_params_stacked(desc, shared):
    return desc


def _make_params_connector(desc, shared):
    return tree_combine(desc, shared)


@functools.lru_cache(maxsize=64)
def _compiled(model, loss_fn, with_probs, has_bn, kind, strategy, chunk, ndev):
    make_params = _make_params_connector if kind == "connector" else _make_params_stacked
    per_point = _per_point_fn(model, loss_fn, with_probs, has_bn, make_params)

    def run(descs, shared, xs, ys, ms, bn_x, zeros, mom):
        f = lambda d: per_point(d, shared, xs, ys, ms, bn_x, zeros, mom)
        if strategy == "map":
            return jax.lax.map(f, descs, batch_size=chunk if chunk > 1 else None)
        if strategy == "vmap":
            return jax.vmap(f)(descs)
        raise ValueError(strategy)

    if strategy == "loop":
        return jax.jit(lambda d, *a: per_point(d, *a))
    if ndev > 1:
        mesh = Mesh(np.asarray(jax.devices()[:ndev]), ("p",))
        run = jax.shard_map(run, mesh=mesh, in_specs=(P("p"), P(), P(), P(), P(), P(), P(), P()),
                            out_specs=P("p"), check_vma=False)
    return jax.jit(run)


def _evaluate(model: Model, kind: str, descs: PyTree, shared: PyTree, params_example: PyTree, data, *,
              batch_size: int, strategy: str, chunk_size: int | None, bn_data, bn_batches: int | None,
              bn_batch_size: int, return_probs: bool, loss_fn: Callable, devices: int | None) -> PointMetrics:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    x, y = _xy(data)
    num_points = int(jax.tree_util.tree_leaves(descs)[0].shape[0])
    if num_points == 0:
        raise ValueError("empty set of points: give at least one point")
    xs, ys, ms = stage_batches(x, y, batch_size)
    has_bn = model.has_batch_stats
    if has_bn:
        if bn_data is None:
            raise ValueError(f"model {model.name} has BatchNorm: pass bn_data (training data) so each point's "
                             "statistics are recomputed before it is evaluated")
        bx_all = bn_data if isinstance(bn_data, np.ndarray | jax.Array) else _xy(bn_data)[0]
        bn_x = _bn_batches(bx_all, bn_batch_size, bn_batches)
        zeros = _zeros_stats(model, params_example, bn_x[0][:1])
        mom = bn_momentum(model, params_example, bn_x[0])
    else:
        bn_x, zeros, mom = jnp.zeros((0,)), {}, {}
    param_bytes = sum(np.size(a) * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(params_example))
    if strategy == "auto":
        strategy, auto_chunk = auto_strategy(num_points, param_bytes)
        chunk_size = chunk_size or auto_chunk
    chunk = int(chunk_size or (1 if strategy == "map" else min(num_points, 16)))
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ndev = len(jax.devices()) if devices is None else int(devices)
    if not 1 <= ndev <= len(jax.devices()):
        raise ValueError(f"devices={devices} but {len(jax.devices())} are available")
    if strategy == "loop":
        ndev = 1
    args = (shared, xs, ys, ms, bn_x, zeros, mom)
    fn = _compiled(model, loss_fn, bool(return_probs), has_bn, kind, strategy, chunk, ndev)

    if strategy == "loop":
        outs = [fn(jax.tree_util.tree_map(lambda a, i=i: a[i], descs), *args) for i in range(num_points)]
        loss = np.asarray([o[0] for o in outs])
        acc = np.asarray([o[1] for o in outs])
        probs = np.stack([np.asarray(o[2]) for o in outs]) if return_probs else None
    else:
        # Pad the point set so every call has a fixed shape: to a multiple of the chunk for the
        # Python-chunked vmap, and of the device count when sharded.
        step = chunk * ndev if strategy == "vmap" else ndev
        total = -(-num_points // step) * step
        padded = jax.tree_util.tree_map(
            lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], total - num_points, axis=0)]) if total > num_points
            else a, descs)
        if ndev > 1:
            mesh = Mesh(np.asarray(jax.devices()[:ndev]), ("p",))
            padded = jax.device_put(padded, NamedSharding(mesh, P("p")))
        if strategy == "vmap":
            pieces = [fn(jax.tree_util.tree_map(lambda a, s=s: a[s:s + step], padded), *args)
                      for s in range(0, total, step)]
            res = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *pieces)
        else:
            res = fn(padded, *args)
        loss = np.asarray(res[0])[:num_points]
        acc = np.asarray(res[1])[:num_points]
        probs = np.asarray(res[2])[:num_points] if return_probs else None
    if probs is not None:
        probs = probs.reshape((num_points, -1) + probs.shape[3:])[:, : x.shape[0]]
    return PointMetrics(loss=loss, accuracy=acc, probs=probs, strategy=strategy, chunk_size=chunk)


def evaluate_params(model: Model, stacked_params: PyTree, data, *, batch_size: int = 500,
                    strategy: str = "auto", chunk_size: int | None = None, bn_data=None,
                    bn_batches: int | None = None, bn_batch_size: int = 128, return_probs: bool = False,
                    loss_fn: Callable = cross_entropy, devices: int | None = None,
                    check: bool = True) -> PointMetrics:
    """Mean loss and accuracy on ``data`` of P parameter sets stacked on a leading axis.

    ``stacked_params`` holds the ``params`` collection only (use :func:`mclandscape.tree.tree_stack`);
    BatchNorm statistics are recomputed per point from ``bn_data`` (see the module docstring).
    """
    leaves = jax.tree_util.tree_leaves(stacked_params)
    if not leaves:
        raise ValueError("stacked_params holds no arrays")
    p = {int(np.shape(a)[0]) if np.ndim(a) else -1 for a in leaves}
    if len(p) != 1 or -1 in p:
        raise ValueError(f"every leaf of stacked_params needs the same leading (points) axis, got sizes {sorted(p)}")
    if check:
        check_finite(stacked_params, "stacked_params")
    example = jax.tree_util.tree_map(lambda a: a[0], stacked_params)
    return _evaluate(model, "stacked", stacked_params, None, example, data, batch_size=batch_size,
                     strategy=strategy, chunk_size=chunk_size, bn_data=bn_data, bn_batches=bn_batches,
                     bn_batch_size=bn_batch_size, return_probs=return_probs, loss_fn=loss_fn, devices=devices)


def evaluate_points(model: Model, connector: Connector, points, data, *, batch_size: int = 500,
                    strategy: str = "auto", chunk_size: int | None = None, bn_data=None,
                    bn_batches: int | None = None, bn_batch_size: int = 128, return_probs: bool = False,
                    loss_fn: Callable = cross_entropy, devices: int | None = None,
                    check: bool = True) -> PointMetrics:
    """Mean loss and accuracy on ``data`` at P points of a connector (t values, (u, v) pairs or alphas).

    Points are validated (in [0, 1], barycentric sums 1; nothing is clipped). Each point's parameters
    ``phi(p) = sum_k c_k(p) theta_k`` (seed 000 eq. 6) are formed inside the mapped computation.
    """
    pts = connector.validate_points(points)
    if check:
        check_finite(connector.control, "connector control points")
    coef = connector.coefficients(jnp.asarray(pts, jnp.float32))
    example = jax.tree_util.tree_map(lambda a: a[0], connector.control)
    return _evaluate(model, "connector", coef, connector.control, example, data, batch_size=batch_size,
                     strategy=strategy, chunk_size=chunk_size, bn_data=bn_data, bn_batches=bn_batches,
                     bn_batch_size=bn_batch_size, return_probs=return_probs, loss_fn=loss_fn, devices=devices)


