"""Bernstein polynomials B_{i,n}(t) = C(n, i) t^i (1 - t)^(n - i), the basis of Bézier curves and surfaces.

As in eq. 1 (curves) and eq. 4 (surfaces) of the Bézier-surface paper (Anonymous, 2024, "Revisiting mode
connectivity in neural networks with Bézier surface"). Vectorised over ``t`` (any shape), exact at t = 0 and
t = 1 in value and gradient: powers are formed by repeated multiplication (no ``0 ** 0`` or ``log(0)``), so
``jax.grad`` is finite everywhere on [0, 1].
"""

from __future__ import annotations

from math import comb

import jax.numpy as jnp
import numpy as np

from mclandscape.core import _checks

__all__ = ["bernstein", "bernstein_derivative", "check_unit_interval"]


def _int_powers(x, n: int):
    """[x^0, x^1, ..., x^n] stacked on a new last axis, by repeated multiplication (grad-safe at 0)."""
    p = [jnp.ones_like(x)]
    for _ in range(n):
        p.append(p[-1] * x)
    return jnp.stack(p, axis=-1)


def _args(t, n):
    """``t`` as a floating array (integers promoted to float32) and the degree ``n`` checked as an ``int``."""
    t = jnp.asarray(t)
    return (t if jnp.issubdtype(t.dtype, jnp.floating) else t.astype(jnp.float32)), _checks.integer(
        n, "Bernstein degree", low=0)


def bernstein(t, n: int):
    """All n+1 Bernstein basis values ``B_{i,n}(t)``, i = 0..n (Bézier-surface paper, eq. 1 and eq. 4).

    Args:
      t: the parameter values, any shape (integers are promoted to float32). Not validated: use
        :func:`check_unit_interval` for user input.
      n: the degree, a non-negative integer; degree 0 is the constant 1 (a single control point).

    Returns:
      An array of shape ``t.shape + (n + 1,)``; the values along the last axis sum to 1.

    Example:
        >>> import jax.numpy as jnp
        >>> bernstein(jnp.array([0.0, 0.5]), 2).tolist()
        [[1.0, 0.0, 0.0], [0.25, 0.5, 0.25]]
    """
    t, n = _args(t, n)
    coef = jnp.asarray([comb(n, i) for i in range(n + 1)], dtype=t.dtype)
    tp = _int_powers(t, n)            # t^i
    sp = _int_powers(1.0 - t, n)      # (1-t)^j
    return coef * tp * sp[..., ::-1]  # C(n,i) t^i (1-t)^(n-i)


def bernstein_derivative(t, n: int):
    """d/dt of every ``B_{i,n}(t)``: ``n (B_{i-1,n-1}(t) - B_{i,n-1}(t))`` (the tangent of a Bézier curve).

    Args:
      t: the parameter values, any shape.
      n: the degree, a non-negative integer.

    Returns:
      An array of shape ``t.shape + (n + 1,)``; the values along the last axis sum to 0.

    Example:
        >>> import jax.numpy as jnp
        >>> bernstein_derivative(jnp.array(0.5), 2).tolist()
        [-1.0, 0.0, 1.0]
    """
    t, n = _args(t, n)
    zero = jnp.zeros(t.shape + (1,), t.dtype)
    if n == 0:
        return zero
    b = bernstein(t, n - 1)
    return n * (jnp.concatenate([zero, b], -1) - jnp.concatenate([b, zero], -1))


def check_unit_interval(x, name: str = "t", *, bounded: bool = True) -> np.ndarray:
    """Host-side validation that every value of ``x`` lies in [0, 1]; nothing is clipped.

    Args:
      x: the values (any shape, non-empty).
      name: the parameter's name in the error message.
      bounded: check the bounds; ``False`` checks only that ``x`` is non-empty and finite (extrapolation).

    Returns:
      ``x`` as a float64 NumPy array. Raises a ``ValueError`` that names the parameter and the first offending
      value (or an empty, NaN or inf input).

    Example:
        >>> check_unit_interval([0.0, 0.5, 1.0]).tolist()
        [0.0, 0.5, 1.0]
        >>> check_unit_interval([0.5, 1.5], "t")
        Traceback (most recent call last):
        ...
        ValueError: t must lie in [0, 1]; got 1.5 (1 value(s) outside)
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.size == 0:
        raise ValueError(f"{name}: empty set of points")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or inf")
    bad = (arr < 0.0) | (arr > 1.0)
    if bounded and np.any(bad):
        first = float(arr[bad].flat[0])
        raise ValueError(f"{name} must lie in [0, 1]; got {first!r} ({int(bad.sum())} value(s) outside)")
    return arr
