"""BatchNorm statistics of a parameter point, recomputed exactly on training data.

Before a point of a BatchNorm model is evaluated its running statistics are recomputed on ``bn_data`` as the
exact average of the per-batch statistics over ``bn_batches`` full batches, as Garipov et al.'s ``update_bn``
does (with equal batch sizes, the example-weighted average). :func:`bn_momentum` recovers each layer's
running-average momentum from two calls, so this works for any Flax model with standard BatchNorm;
:func:`recalibrate_bn` does it for one point, and the evaluator (:mod:`mclandscape.engine.evaluate`) for many
points inside its mapped computation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mclandscape.core import _checks
from mclandscape.core.tree import PyTree
from mclandscape.engine import cpu
from mclandscape.engine.models.base import Model
from mclandscape.engine.points import data_xy, stage_batches

__all__ = ["bn_momentum", "recalibrate_bn"]


def bn_batches(bn_data, batch_size: int, num_batches: int | None):
    """The inputs of ``bn_data`` (a Dataset, ``(x, y)`` or an ``x`` array) as ``num_batches`` full batches."""
    x = bn_data if isinstance(bn_data, np.ndarray | jax.Array) else data_xy(bn_data)[0]
    bx, _, _ = stage_batches(np.asarray(x), None, batch_size, drop_last=True)
    if num_batches is not None:
        if _checks.integer(num_batches, "bn_batches", low=1) > bx.shape[0]:
            raise ValueError(f"bn_batches={num_batches} but bn_data has only {bx.shape[0]} full batches "
                             f"of {bx.shape[1]}")
        bx = bx[:num_batches]
    return bx


def bn_rngs():
    # BatchNorm passes run in train mode, where a model with dropout asks for a key; its value is irrelevant
    # to the statistics of the layers before the dropout (every zoo model's)
    return {"dropout": jax.random.key(0)}


def zeros_stats(model: Model, x_example, like: PyTree | None = None) -> PyTree:
    """Zero BatchNorm statistics; with ``like`` (the parameters) in their precision, so float64 parameters get
    float64 statistics (Flax initialises them in float32 whatever the parameters)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x_example)
    if "batch_stats" not in shapes:
        raise ValueError(f"model {model.name} has apply_with_stats but its variables hold no 'batch_stats'")
    wide = jnp.result_type(jnp.float32, *jax.tree_util.tree_leaves(like))  # float64 parameters: float64 statistics

    def zeros(sd):
        dt = jnp.promote_types(sd.dtype, wide) if jnp.issubdtype(sd.dtype, jnp.floating) else sd.dtype
        return jnp.zeros(sd.shape, dt)

    return jax.tree_util.tree_map(zeros, shapes["batch_stats"])


@functools.partial(jax.jit, static_argnums=0)
def _bn_probe(model: Model, params, zeros, x):
    ones = jax.tree_util.tree_map(jnp.ones_like, zeros)
    _, s0 = model.apply_with_stats({"params": params, "batch_stats": zeros}, x, rngs=bn_rngs())
    _, s1 = model.apply_with_stats({"params": params, "batch_stats": ones}, x, rngs=bn_rngs())
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
    diff = _bn_probe(model, params, zeros_stats(model, x[:1], params), x)

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


def _recalibrate_impl(model: Model, params, bn_x, zeros, mom):
    def body(acc, xb):
        _, s0 = model.apply_with_stats({"params": params, "batch_stats": zeros}, xb, rngs=bn_rngs())
        b = jax.tree_util.tree_map(lambda s, m: s.astype(jnp.promote_types(s.dtype, jnp.float32)) / (1.0 - m), s0, mom)
        return jax.tree_util.tree_map(jnp.add, acc, b), None

    init = jax.tree_util.tree_map(lambda z: jnp.zeros(z.shape, jnp.promote_types(z.dtype, jnp.float32)), zeros)
    acc, _ = jax.lax.scan(body, init, bn_x)
    return jax.tree_util.tree_map(lambda a, z: (a / bn_x.shape[0]).astype(z.dtype), acc, zeros)


_recalibrate_jit = jax.jit(_recalibrate_impl, static_argnums=0, compiler_options=cpu.COMPILER_OPTIONS)


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
    bx = bn_batches(bn_data, batch_size, num_batches)
    return _recalibrate_jit(model, params, bx, zeros_stats(model, bx[0][:1], params),
                           bn_momentum(model, params, bx[0]))
