"""Mapping a per-point function over many points: one primitive and one strategy resolver.

Every place that evaluates a function at many points (the evaluator's points, a connector's ``k`` sampled
points, a NEB band's pivots, stacked ensemble members) maps it with :func:`map_over` in one of three ways:

- ``"unroll"``: the points written out one after another (a Python loop at trace time);
- ``"map"``: ``jax.lax.map`` (an XLA loop; with ``chunk > 1`` it vmaps ``chunk`` points at a time);
- ``"vmap"``: all points at once.

``"auto"`` is resolved by :func:`resolve`, the only place in the package that asks which backend runs.
On XLA's CPU backend vmapped points give every point its own kernels, which XLA runs as grouped
convolutions, slowly, so convolutional models are mapped one point at a time there
(``benchmarks/surface_training.py`` measures the differentiated strategies, ``benchmarks/convfc_curve.py``
and ``benchmarks/surface_sampling.py`` the evaluated ones).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mclandscape.core import _checks

__all__ = ["HOW", "map_over", "resolve", "backend"]

HOW = ("unroll", "map", "vmap")


def map_over(fn: Callable, xs, how: str, chunk: int = 1):
    """``fn`` applied to every slice of ``xs`` along its leading axis, the outputs stacked.

    Args:
      fn: a function of one slice (a pytree).
      xs: a pytree whose leaves share a leading axis.
      how: ``"unroll"``, ``"map"`` or ``"vmap"`` (see the module docstring).
      chunk: with ``"map"``, the points vmapped together per loop iteration (``1``: one at a time).

    Returns:
      The outputs stacked on a leading axis (the same for every ``how``, to float rounding).

    Example:
        >>> import jax.numpy as jnp
        >>> [map_over(lambda v: v * 2, jnp.arange(3.0), how).tolist() for how in HOW]
        [[0.0, 2.0, 4.0], [0.0, 2.0, 4.0], [0.0, 2.0, 4.0]]
    """
    if how == "vmap":
        return jax.vmap(fn)(xs)
    if how == "map":
        return jax.lax.map(fn, xs, batch_size=chunk if chunk > 1 else None)
    if how == "unroll":
        n = int(jnp.shape(jax.tree_util.tree_leaves(xs)[0])[0])
        outs = [fn(jax.tree_util.tree_map(lambda a, i=i: a[i], xs)) for i in range(n)]
        return jax.tree_util.tree_map(lambda *o: jnp.stack(o), *outs)
    raise ValueError(f"how must be one of {HOW}, got {how!r}")


def backend() -> str:
    """JAX's default backend (``"cpu"``, ``"gpu"``, ``"tpu"``): the one question the engine asks of it.

    Returns:
      The platform name.

    Example:
        >>> backend() in ("cpu", "gpu", "tpu")
        True
    """
    return jax.default_backend()


def resolve(how: str, num_points: int, *, has_conv: bool, grad: bool = False, param_bytes: int = 0,
            chunk_size: int | None = None, on: str | None = None, chunk_bytes: int = 1 << 30) -> tuple[str, int]:
    """``(how, chunk)`` for mapping a per-point function over ``num_points`` points.

    ``"auto"``, differentiated (``grad``: training several points in one step): ``"unroll"`` on CPU for a
    convolutional model, else ``"vmap"``. ``"auto"``, evaluated: ``"map"`` with chunks of ``min(16, P)`` on
    CPU, one point at a time for a convolutional model (``benchmarks/surface_sampling.py`` measures both
    choices for an MLP and the simple CNN), and elsewhere chunks as large as ``chunk_bytes`` of parameter copies
    allow (at most 64).
    An explicit ``how`` is kept; ``"vmap"`` takes all points in one chunk.

    Args:
      how: ``"auto"``, ``"unroll"``, ``"map"`` or ``"vmap"``.
      num_points: how many points are mapped.
      has_conv: whether the model has convolutions (:func:`mclandscape.engine.cpu.has_conv`).
      grad: whether the mapped function is differentiated (training).
      param_bytes: the bytes of one point's parameters (sizes the chunks off CPU).
      chunk_size: the chunk of ``"map"`` (default: as above for ``"auto"``, else 1).
      on: the backend (default :func:`backend`).
      chunk_bytes: the memory budget of one chunk of parameter copies off CPU.

    Returns:
      ``(how, chunk)``. Raises ``ValueError`` naming ``strategy`` or ``chunk_size`` when they are not valid.

    Example:
        >>> resolve("auto", 121, has_conv=False, on="cpu"), resolve("auto", 121, has_conv=True, on="cpu")
        (('map', 16), ('map', 1))
        >>> resolve("auto", 121, has_conv=True, param_bytes=2**28, on="gpu")
        ('map', 4)
        >>> [resolve("auto", 8, has_conv=True, grad=True, on=b) for b in ("cpu", "gpu")]
        [('unroll', 1), ('vmap', 8)]
    """
    if how not in ("auto",) + HOW:
        raise ValueError(f"unknown strategy {how!r}; expected one of {('auto',) + HOW}")
    chunk_size = None if chunk_size is None else _checks.integer(chunk_size, "chunk_size", low=1)
    num_points = max(1, int(num_points))
    cpu = how == "auto" and (on or backend()) == "cpu"
    if how == "auto" and not grad and chunk_size is None:
        auto = (1 if has_conv else min(16, num_points)) if cpu else \
            min(num_points, 64, chunk_bytes // max(int(param_bytes), 1))
        return "map", int(max(1, auto))
    if how == "auto":
        how = ("unroll" if cpu and has_conv else "vmap") if grad else "map"
    return how, num_points if how == "vmap" else int(chunk_size or 1)
