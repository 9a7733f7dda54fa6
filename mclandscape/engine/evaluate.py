"""The one evaluator: loss, accuracy and output probabilities of many parameter points on one or more datasets.

:func:`evaluate` maps the model metrics (mean loss and accuracy over a dataset, optionally softmax outputs)
over :class:`~mclandscape.engine.points.Points` with BatchNorm statistics recomputed per point
(:mod:`mclandscape.engine.batchnorm`). Given several datasets (``data={"train": ..., "test": ...}``) it
recomputes each point's statistics once and evaluates every dataset with them. The points say where:
:func:`~mclandscape.engine.points.connector_points` (t values, (u, v) pairs or weights of a connector),
:func:`~mclandscape.engine.points.stacked_points` (parameter trees stacked on a leading axis; one model is a
stack of one) and :func:`~mclandscape.engine.points.plane_points`.

Strategies (``strategy=``): ``"map"`` (``jax.lax.map`` with ``batch_size=chunk``: chunk 1 is an XLA loop,
chunk c vmaps c points at a time), ``"vmap"`` (all points at once), ``"unroll"`` (the points written out one
after another) and ``"auto"`` (:func:`mclandscape.engine.mapping.resolve`). With several devices
(``devices=``, default all) the points are sharded over a 1-D mesh (:func:`mclandscape.engine.points.map_points`
explains how).

BatchNorm (models with ``apply_with_stats``): before a point is evaluated its running statistics are
recomputed on ``bn_data`` as the exact average of the per-batch statistics over ``bn_batches`` full
batches, as Garipov et al.'s ``update_bn`` does. This runs inside the same mapped computation, batched over
points. Models without BatchNorm, or a call with ``variables=`` holding the statistics, use them as they are.

First layer (``stem=``): ``"auto"`` lets :mod:`mclandscape.engine.cpu` decide whether to factorise the
first convolution over the control points (exact for any coefficients), ``"factor"`` forces it (for rows
over a stack, i.e. not for identity rows) and ``"off"`` never does. ``compute_dtype`` (e.g. ``"bfloat16"``)
casts each point's parameters and the inputs (mixed precision for accelerators); losses, accuracies and
BatchNorm statistics are accumulated in float32 or wider.

Compilation: the mapped computation is one module-level ``jax.jit`` whose static arguments are the model,
the loss and the strategy, so a second call with the same model and shapes compiles nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mclandscape.core import _checks
from mclandscape.core.losses import cross_entropy
from mclandscape.core.objective import correct_count
from mclandscape.core.tree import PyTree, check_finite, tree_index
from mclandscape.engine import cpu, mapping
from mclandscape.engine.batchnorm import bn_batches, bn_momentum, bn_rngs, zeros_stats
from mclandscape.engine.models.base import Model
from mclandscape.engine.points import Points, data_xy, run_mapped, shard, stage_batches, varying
from mclandscape.engine.step import memory_stats

__all__ = ["PointMetrics", "evaluate", "evaluation_memory", "STEM_MODES"]

STEM_MODES = ("auto", "off", "factor")


@dataclasses.dataclass(frozen=True)
class _Metric:
    """The static description of what is computed per point (a static argument: hashes by value, the
    model and the loss by their own hash)."""

    model: Model
    loss_fn: Callable
    with_probs: tuple[bool, ...]  # one per dataset
    recompute_bn: bool
    dtype: np.dtype | None  # compute dtype (hashes by value)
    factor: cpu.FirstConv | None

    @property
    def stem(self) -> str:
        return "factor" if self.factor is not None else "off"


def _with_zero_stats(model: Model, fixed: dict, zeros) -> dict:
    return {**fixed, "batch_stats": zeros} if model.has_batch_stats and "batch_stats" not in fixed else dict(fixed)


def _first_layer(metric: _Metric, rest: dict, stack: PyTree, x):
    """The first convolution of every stacked tree on ``x`` (``[B, ..., K, Cout]``), one convolution with the
    kernels stacked along the output channels. The model runs once (on the first tree) to find the layer
    and its input as the model prepares it; the rest of that pass is dead code, removed by XLA."""
    enter, cap = cpu.capture_first_conv()
    with enter:
        metric.model.apply({**rest, "params": optax.tree.cast(tree_index(stack, 0), metric.dtype)},
                           optax.tree.cast(x, metric.dtype), train=False)
    conv = metric.factor.params(optax.tree.cast(stack, metric.dtype))
    return cpu.stacked_first_conv(cap.module, conv["kernel"], conv.get("bias"), cap.input)


# ---- the mapped computation (traced) --------------------------------------------------------------------

class _Ctx(NamedTuple):
    """What every step of the mapped computation shares (inside the trace)."""

    metric: _Metric
    pts: Points
    fixed: dict
    zeros: PyTree
    mom: PyTree
    how: str
    chunk: int
    mesh: object
    acc_dtype: object


def _features(c: _Ctx, xg):
    """``[gb, B, ..., K, Cout]``: the first convolution of every stacked tree on a group of batches."""
    if c.metric.factor is None:
        return None
    h = _first_layer(c.metric, _with_zero_stats(c.metric.model, c.fixed, c.zeros), c.pts.stack,
                     xg.reshape((-1,) + xg.shape[2:]))
    return h.reshape(xg.shape[:2] + h.shape[1:])


def _forward(c: _Ctx, params, rest: dict, xb, row, feats_b, with_stats: bool):
    """One point's forward pass on a batch (its first layer combined from ``feats_b`` when factorised)."""
    model, variables = c.metric.model, {**rest, "params": params}
    xb = xb if c.metric.dtype is None else xb.astype(c.metric.dtype)
    first = lambda _m, _x: cpu.combine_features(row, feats_b)  # noqa: E731
    with contextlib.nullcontext() if feats_b is None else cpu.replace_first_conv(first):
        if with_stats:
            return model.apply_with_stats(variables, xb, rngs=bn_rngs())
        return model.apply(variables, xb, train=False)


def _scan_points(c: _Ctx, rows, per_point, groups, init, body):
    """Every point's sum of ``body`` over the staged batches: an outer scan over the groups of batches (each
    group's first-layer features computed once) of every point's (mapped) scan over the group's batches.
    ``body(carry, params, row, extra, group, i, features_i) -> (carry, out)``; ``per_point``: each point's
    ``extra`` (stacked over the points, or ``None``)."""
    def group(acc, g):
        feats = _features(c, g[0])

        def one(args):
            row, extra = args
            params = optax.tree.cast(c.pts.form(row), c.metric.dtype)
            step = lambda a, i: body(a, params, row, extra, g, i, None if feats is None else feats[i])  # noqa: E731
            return jax.lax.scan(step, varying(init, c.mesh), jnp.arange(g[0].shape[0]))

        sums, outs = mapping.map_over(one, (rows, per_point), c.how, c.chunk)
        return jax.tree_util.tree_map(jnp.add, acc, sums), outs

    acc0 = jax.tree_util.tree_map(lambda z: jnp.zeros((rows.shape[0],) + z.shape, z.dtype), init)
    return jax.lax.scan(group, varying(acc0, c.mesh), groups)


def _bn_statistics(c: _Ctx, rows, bn_x):
    """Every point's BatchNorm statistics: the exact average of its per-batch statistics over the BN batches."""
    def body(acc, params, row, _, g, i, fb):
        _, s0 = _forward(c, params, {**c.fixed, "batch_stats": c.zeros}, g[0][i], row, fb, True)
        return jax.tree_util.tree_map(lambda a, s, m: a + s.astype(c.acc_dtype) / (1.0 - m), acc, s0, c.mom), None

    init = jax.tree_util.tree_map(lambda z: jnp.zeros(z.shape, c.acc_dtype), c.zeros)
    stats, _ = _scan_points(c, rows, None, (bn_x,), init, body)
    n = bn_x.shape[0] * bn_x.shape[1]
    return jax.tree_util.tree_map(lambda a, z: (a / n).astype(z.dtype), stats, c.zeros)


def _dataset_metrics(c: _Ctx, rows, stats, data, with_probs: bool):
    """Mean loss, accuracy (and, with ``with_probs``, softmax outputs) of every point on one staged dataset."""
    def body(acc, params, row, st, g, i, fb):
        rest = dict(c.fixed) if st is None else {**c.fixed, "batch_stats": st}
        logits = _forward(c, params, rest, g[0][i], row, fb, False).astype(c.acc_dtype)
        yb, mb = g[1][i], g[2][i].astype(c.acc_dtype)
        out = jax.nn.softmax(logits, axis=-1) if with_probs else None
        return (acc[0] + jnp.sum(c.metric.loss_fn(logits, yb) * mb), acc[1] + correct_count(logits, yb, mb)), out

    zero = jnp.zeros((), c.acc_dtype)
    (lsum, csum), probs = _scan_points(c, rows, stats, data, (zero, zero), body)
    n = jnp.sum(data[2])
    if with_probs:  # [ng, P, gb, B, C] -> [P, ng * gb * B, C]
        probs = jnp.moveaxis(probs, 1, 0).reshape((rows.shape[0], -1) + probs.shape[4:])
    return lsum / n, csum / n, probs


def _evaluate_impl(metric: _Metric, strategy: str, chunk: int, mesh, points: Points, args):
    """Every point's BatchNorm statistics (once), then its metrics on every staged dataset."""
    datasets, bn_x, zeros, mom, fixed = args
    acc_dtype = jnp.promote_types(jnp.float32, jnp.result_type(*jax.tree_util.tree_leaves(points.stack)))

    def run(rows, stack, datasets, bn_x, zeros, mom, fixed):
        c = _Ctx(metric, Points(rows=rows, stack=stack), fixed, zeros, mom, strategy, chunk, mesh, acc_dtype)
        stats = _bn_statistics(c, rows, bn_x) if metric.recompute_bn else None
        return tuple(_dataset_metrics(c, rows, stats, d, w) for d, w in zip(datasets, metric.with_probs, strict=True))

    return shard(run, mesh, 6)(points.rows, points.stack, datasets, bn_x, zeros, mom, fixed)


_evaluate_jit = jax.jit(_evaluate_impl, static_argnames=("metric", "strategy", "chunk", "mesh"),
                        compiler_options=cpu.COMPILER_OPTIONS)


# ---- planning the call (host) ---------------------------------------------------------------------------

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


def _datasets(data) -> tuple[tuple | None, list]:
    """``(names, [(x, y), ...])`` of one dataset or a dict of them."""
    if isinstance(data, Mapping):
        if not data:
            raise ValueError("data is an empty dict: give at least one dataset")
        return tuple(data), [data_xy(d) for d in data.values()]
    return None, [data_xy(data)]


def _with_probs(return_probs, names: tuple | None) -> tuple[bool, ...]:
    """Per dataset, whether its softmax outputs are returned."""
    if isinstance(return_probs, bool | np.bool_):
        return (bool(return_probs),) * (1 if names is None else len(names))
    wanted = {return_probs} if isinstance(return_probs, str) else set(return_probs)
    if names is None or not wanted <= set(names):
        raise ValueError(f"return_probs must be True / False, or names of the datasets in data ({names}), "
                         f"got {return_probs!r}")
    return tuple(n in wanted for n in names)


def _bn_inputs(model: Model, fixed: dict, bn_data, bn_batch_size: int, num_bn: int | None, example):
    """``(recompute, bn_x, zeros, mom)``: the staged BatchNorm batches and their constants."""
    if not (model.has_batch_stats and "batch_stats" not in fixed):
        return False, jnp.zeros((1, 1, 1), jnp.float32), {}, {}  # one dummy batch, never read
    if bn_data is None:
        raise ValueError(f"model {model.name} has BatchNorm: pass bn_data (training data) so each point's "
                         "statistics are recomputed before it is evaluated, or variables={'batch_stats': ...}")
    bn_x = bn_batches(bn_data, bn_batch_size, num_bn)
    return True, bn_x, zeros_stats(model, bn_x[0][:1], example), bn_momentum(model, example, bn_x[0])


def _choose_factor(model: Model, points: Points, fixed: dict, zeros, stem: str, x1) -> cpu.FirstConv | None:
    """The first convolution to factorise over the control points (``None``: none; see the module docstring)."""
    example = points.example()
    if stem == "off" or (stem == "auto" and (points.indexed or not cpu.has_conv(example))):
        return None
    if points.indexed:
        raise ValueError("stem='factor' needs rows over a stack (a connector, a plane): identity rows (stacked "
                         "parameters) have no control points to share the first layer")
    rest = _with_zero_stats(model, fixed, zeros)
    conv = cpu.first_conv(lambda v, xx: model.apply({**rest, **v}, xx, train=False), {"params": example},
                          jnp.asarray(x1))
    if stem == "factor" and conv is None:
        raise ValueError(f"stem='factor' needs a Flax model whose first convolution is fed by the input "
                         f"alone; {model.name} has none")
    return conv if stem == "factor" or cpu.use_factorisation(conv, points.num_points, points.num_stacked) else None


def _grouped(staged, bn_x, metric: _Metric, points: Points, fixed: dict, zeros, stem_bytes: int):
    """The staged batches ``[n, ...]`` as ``[n // g, g, ...]``, ``g`` the largest divisor of ``n`` whose staged
    first-layer outputs fit in ``stem_bytes`` (all in one group unfactorised)."""
    _checks.integer(stem_bytes, "stem_bytes", low=1)
    batch_bytes = 0
    if metric.factor is not None:
        rest = _with_zero_stats(metric.model, fixed, zeros)
        out = jax.eval_shape(lambda xb: _first_layer(metric, rest, points.stack, xb), staged[0][0][0])
        batch_bytes = int(np.prod(out.shape)) * jnp.dtype(out.dtype).itemsize

    def regroup(a):
        n = a.shape[0]
        g = max((g for g in range(1, n + 1) if n % g == 0 and g * batch_bytes <= stem_bytes), default=1)
        return a.reshape((n // g, g) + a.shape[1:])

    return tuple(tuple(regroup(a) for a in s) for s in staged), regroup(bn_x)


def _plan(model: Model, points: Points, data, *, batch_size: int = 500, bn_data=None, bn_batches: int | None = None,
          bn_batch_size: int = 128, variables: PyTree | None = None, return_probs: bool | tuple = False,
          loss_fn: Callable = cross_entropy, strategy: str = "auto", chunk_size: int | None = None,
          stem: str = "auto", compute_dtype=None, stem_bytes: int = 1 << 29, check: bool = True) -> tuple:
    """Validate a call of :func:`evaluate` and stage what its mapped computation takes: ``(metric, args,
    strategy, chunk, names, sizes)`` (``names``: the datasets' names, ``None`` for one dataset, not a dict)."""
    if not isinstance(points, Points):
        raise ValueError(f"points must be Points (see connector_points / stacked_points), got {type(points).__name__}")
    _checks.choice(stem, "stem mode", STEM_MODES)
    if points.num_points == 0:
        raise ValueError("empty set of points: give at least one point")
    if check:
        check_finite(points.stack, "the parameters")
    dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"compute_dtype must be a floating dtype, got {compute_dtype!r}")
    names, sets = _datasets(data)
    for x, y in sets:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"data has {x.shape[0]} inputs but {y.shape[0]} targets")
    fixed = {k: v for k, v in dict(variables or {}).items() if k != "params"}
    example = points.example()
    recompute, bn_x, zeros, mom = _bn_inputs(model, fixed, bn_data, bn_batch_size, bn_batches, example)
    how, chunk = mapping.resolve(strategy, points.num_points, has_conv=cpu.has_conv(example), chunk_size=chunk_size,
                                 param_bytes=sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(example)))
    metric = _Metric(model=model, loss_fn=loss_fn, with_probs=_with_probs(return_probs, names),
                     recompute_bn=recompute, dtype=dtype,
                     factor=_choose_factor(model, points, fixed, zeros, stem, sets[0][0][:1]))
    staged = [stage_batches(x, y, batch_size) for x, y in sets]
    groups, bn_g = _grouped(staged, bn_x, metric, points, fixed, zeros, stem_bytes)
    return metric, (groups, bn_g, zeros, mom, fixed), how, chunk, names, tuple(int(x.shape[0]) for x, _ in sets)


def evaluate(model: Model, points: Points, data, *, batch_size: int = 500, bn_data=None,
             bn_batches: int | None = None, bn_batch_size: int = 128, variables: PyTree | None = None,
             return_probs: bool | tuple[str, ...] = False, loss_fn: Callable = cross_entropy,
             strategy: str = "auto", chunk_size: int | None = None, devices: int | None = None,
             stem: str = "auto", compute_dtype=None, stem_bytes: int = 1 << 29,
             check: bool = True) -> PointMetrics | dict[str, PointMetrics]:
    """Mean loss and accuracy on ``data`` at every point of ``points`` (see the module docstring).

    Args:
      model: the :class:`~mclandscape.engine.models.Model`.
      points: the :class:`~mclandscape.engine.points.Points` (their stack holds the ``params`` collection only).
      data: a Dataset or ``(x, y)``, or a dict of them (e.g. ``{"train": train, "test": test}``: each
        point's BatchNorm statistics are recomputed once for all of them); evaluated in batches of
        ``batch_size`` (a partial last batch is masked).
      batch_size: examples per evaluation batch.
      bn_data: training data for the BatchNorm statistics of each point (models with BatchNorm, unless
        ``variables`` holds them); ``bn_batches`` full batches of ``bn_batch_size`` (default all).
      bn_batches, bn_batch_size: see ``bn_data``.
      variables: other collections shared by every point (e.g. ``{"batch_stats": ...}`` of a trained model).
      return_probs: also return the softmax outputs ``[P, N, C]`` (for a dict of datasets: ``True`` for every
        one, or the names of those that need them, e.g. ``("test",)``).
      loss_fn: per-example loss ``(logits, y) -> [N]``.
      strategy, chunk_size, devices, stem, compute_dtype: see the module docstring.
      stem_bytes: bounds the memory of the staged first-layer outputs of the factorised path.
      check: refuse non-finite parameters.

    Returns:
      :class:`PointMetrics` (a dict of them, by name, for a dict of datasets); losses and accuracies in the
      parameters' precision (at least float32).

    Example:
        >>> import jax
        >>> import mclandscape as mcl
        >>> from mclandscape.core.tree import tree_stack
        >>> from mclandscape.engine.points import connector_points, plane_points, stacked_points
        >>> data = mcl.load_dataset("iris", "test")
        >>> model = mcl.get_model("mlp", widths=[4], num_classes=3)
        >>> p = model.init(jax.random.key(0), data.x[:1])["params"]
        >>> m = evaluate(model, plane_points(p, p, None, [0.0, 1.0]), data)   # p and 2 p
        >>> m.loss.shape, m.accuracy.shape
        ((2,), (2,))
        >>> one = evaluate(model, stacked_points(tree_stack([p])), data)      # one model: a stack of one
        >>> bool(abs(one.loss[0] - m.loss[0]) < 1e-6)
        True
        >>> q = model.init(jax.random.key(1), data.x[:1])["params"]
        >>> evaluate(model, connector_points(mcl.bezier_curve(p, q, degree=1), [0.0, 0.5, 1.0]), data).loss.shape
        (3,)
        >>> both = evaluate(model, plane_points(p, p, None, [0.0, 1.0]), {"a": data, "b": data})
        >>> sorted(both), bool((both["b"].loss == m.loss).all())
        (['a', 'b'], True)
    """
    metric, args, how, chunk, names, sizes = _plan(
        model, points, data, batch_size=batch_size, bn_data=bn_data, bn_batches=bn_batches,
        bn_batch_size=bn_batch_size, variables=variables, return_probs=return_probs, loss_fn=loss_fn,
        strategy=strategy, chunk_size=chunk_size, stem=stem, compute_dtype=compute_dtype, stem_bytes=stem_bytes,
        check=check)
    outs = run_mapped(_evaluate_jit, points, {"metric": metric}, args, how, chunk, devices)
    results = [PointMetrics(loss=np.asarray(loss), accuracy=np.asarray(acc),
                            probs=np.asarray(probs)[:, :n] if want else None, strategy=how, chunk_size=chunk,
                            stem=metric.stem)
               for (loss, acc, probs), n, want in zip(outs, sizes, metric.with_probs, strict=True)]
    return results[0] if names is None else dict(zip(names, results, strict=True))


def evaluation_memory(model: Model, points: Points, data, *, devices: int | None = None, **options) -> dict:
    """Compile :func:`evaluate`'s computation for these arguments without running it; its memory per device.

    From XLA's analysis: ``argument_bytes``, ``output_bytes``, ``temp_bytes``, ``alias_bytes`` and
    ``peak_bytes`` (their total, less aliasing), with the ``strategy``, ``chunk_size`` and ``stem`` chosen.
    What grows with the number of points is only the rows and the per-point outputs: at most a chunk of
    parameter copies exists at any time (``benchmarks/scaling.py`` and ``benchmarks/loss_plane_memory.py``
    measure it).

    Args:
      model, points, data, devices, **options: as for :func:`evaluate`.

    Returns:
      A dict of byte counts and the chosen strategy.

    Example:
        >>> import jax
        >>> import mclandscape as mcl
        >>> from mclandscape.engine.points import plane_points
        >>> data = mcl.load_dataset("iris", "test")
        >>> model = mcl.get_model("mlp", widths=[4], num_classes=3)
        >>> p = model.init(jax.random.key(0), data.x[:1])["params"]
        >>> mem = evaluation_memory(model, plane_points(p, p, None, [0.0, 1.0]), data, strategy="map")
        >>> mem["peak_bytes"] > 0, mem["strategy"]
        (True, 'map')
    """
    metric, args, how, chunk, _, _ = _plan(model, points, data, **options)
    compiled = run_mapped(_evaluate_jit, points, {"metric": metric}, args, how, chunk, devices, analyze=True)
    return {**memory_stats(compiled), "strategy": how, "chunk_size": chunk, "stem": metric.stem}
