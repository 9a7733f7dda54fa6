"""Analytic test potentials: 2-D (and n-D) surfaces with known minima and saddles.

Every potential is a pure function ``f(p, batch=None) -> loss`` of points ``p = [..., d]`` (the last axis holds
the coordinates; leading axes broadcast), so it can be handed to the path methods as it is
(:func:`mclandscape.methods.neb.neb` takes ``f(p, batch)``), wrapped into the objective protocol by
:func:`mclandscape.core.objective.function_objective`, or evaluated on a grid. ``batch`` is ignored. The
computation follows the dtype of ``p`` (float64 points give float64 values under ``jax_enable_x64``; integer
points are promoted to the default float type).

- :func:`muller_brown`: the Müller-Brown potential (Müller and Brown, 1979, 'Location of saddle points and
  minimum energy paths by a constrained simplex optimization procedure', Theoretica Chimica Acta 53), the
  standard test of minimum-energy-path methods such as the nudged elastic band (Draxler et al., 2018,
  'Essentially no barriers in neural network energy landscape'). Its three minima and two saddles are
  :data:`MULLER_BROWN_MINIMA` and :data:`MULLER_BROWN_SADDLES` (located here by Newton's method in float64);
- :func:`double_well`: ``(p_0^2 - 1)^2 + stiffness / 2 * sum_{i >= 1} p_i^2``, two minima ``(+-1, 0, ...)``
  separated by a saddle at the origin of height 1;
- :func:`vdm_figure1`, :func:`vdm_figure4`, :func:`vdm_figure7`: the simulated 2-D loss surfaces of Chen et
  al., 2021 ('Deforming the loss surface to affect the behaviour of the optimizer', AAAI), supplement section
  C, as printed there (the slips of the printed formulas are discussed with each function).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["StationaryPoint", "muller_brown", "MULLER_BROWN_MINIMA", "MULLER_BROWN_SADDLES", "double_well",
           "vdm_figure1", "vdm_figure1_factor", "vdm_figure4", "VDM_FIGURE4_CONSTANT", "vdm_figure7"]


class StationaryPoint(NamedTuple):
    """A stationary point of a potential: its coordinates and its value there."""

    point: tuple[float, ...]
    energy: float


def _points(p, dim: int | None, name: str) -> jax.Array:
    """``p`` as a floating array ``[..., d]`` (integers promoted to the default float type)."""
    p = jnp.asarray(p)
    p = p.astype(jnp.result_type(p, float))  # integers become the default float type, floats stay
    if p.ndim == 0:
        raise ValueError(f"{name} takes points [..., d] (coordinates on the last axis), got a scalar")
    if dim is not None and p.shape[-1] != dim:
        raise ValueError(f"{name} takes points [..., {dim}] (coordinates on the last axis), got shape {p.shape}")
    return p


# Müller and Brown (1979), eq. 1: V(x, y) = sum_k A_k exp(a_k (x - x0_k)^2 + b_k (x - x0_k)(y - y0_k) + c_k (y - y0_k)^2)
# rows: A, a, b, c, x0, y0
_MB = np.array([[-200.0, -100.0, -170.0, 15.0], [-1.0, -1.0, -6.5, 0.7], [0.0, 0.0, 11.0, 0.6],
                [-10.0, -10.0, -6.5, 0.7], [1.0, 0.0, -0.5, -1.0], [0.0, 0.5, 1.5, 1.0]])

#: The three minima of :func:`muller_brown`: ``A`` (the global one), ``B`` and the intermediate ``C``.
MULLER_BROWN_MINIMA: dict[str, StationaryPoint] = {
    "A": StationaryPoint((-0.558224, 1.441726), -146.6995),
    "B": StationaryPoint((0.623499, 0.028038), -108.1667),
    "C": StationaryPoint((-0.050011, 0.466694), -80.7678),
}
#: The two saddles of :func:`muller_brown` (one negative Hessian eigenvalue each): ``AC`` between minima A and
#: C (the highest point of the minimum-energy path from A to B) and ``CB`` between C and B.
MULLER_BROWN_SADDLES: dict[str, StationaryPoint] = {
    "AC": StationaryPoint((-0.822002, 0.624313), -40.6648),
    "CB": StationaryPoint((0.212487, 0.292988), -72.2489),
}


def muller_brown(p, batch: Any = None) -> jax.Array:
    """The Müller-Brown potential (Müller and Brown, 1979, eq. 1).

    ``V(x, y) = sum_k A_k exp(a_k (x - x0_k)^2 + b_k (x - x0_k)(y - y0_k) + c_k (y - y0_k)^2)`` with
    ``A = (-200, -100, -170, 15)``, ``a = (-1, -1, -6.5, 0.7)``, ``b = (0, 0, 11, 0.6)``,
    ``c = (-10, -10, -6.5, 0.7)``, ``x0 = (1, 0, -0.5, -1)``, ``y0 = (0, 0.5, 1.5, 1)``. Minima and saddles:
    :data:`MULLER_BROWN_MINIMA`, :data:`MULLER_BROWN_SADDLES`.

    Args:
      p: points ``[..., 2]``.
      batch: ignored (the ``f(p, batch)`` signature of the path methods).

    Returns:
      The potential ``[...]`` in the dtype of ``p``.

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(muller_brown(jnp.array(MULLER_BROWN_MINIMA["A"].point))), 2)
      -146.7
      >>> muller_brown(jnp.zeros((4, 3, 2))).shape
      (4, 3)
    """
    del batch
    p = _points(p, 2, "muller_brown")
    A, a, b, c, x0, y0 = jnp.asarray(_MB, p.dtype)
    dx, dy = p[..., 0, None] - x0, p[..., 1, None] - y0
    return jnp.sum(A * jnp.exp(a * dx * dx + b * dx * dy + c * dy * dy), axis=-1)


def double_well(p, batch: Any = None, *, stiffness: float = 8.0) -> jax.Array:
    """The double well ``(p_0^2 - 1)^2 + stiffness / 2 * sum_{i >= 1} p_i^2`` in any dimension ``d >= 1``.

    Two minima ``(+-1, 0, ...)`` of value 0 separated by the ridge ``p_0 = 0``; the saddle at the origin has
    value 1. The Hessian at the minima is ``diag(8, stiffness, ...)`` (isotropic for the default 8), at the
    saddle ``diag(-4, stiffness, ...)``.

    Args:
      p: points ``[..., d]``.
      batch: ignored.
      stiffness: curvature across the wells (``> 0``).

    Returns:
      The potential ``[...]`` in the dtype of ``p``.

    Example:
      >>> import jax.numpy as jnp
      >>> [float(double_well(jnp.array(q))) for q in ([-1.0, 0.0], [0.0, 0.0], [1.0, 0.5])]
      [0.0, 1.0, 1.0]
    """
    del batch
    if not stiffness > 0:
        raise ValueError(f"double_well: stiffness must be > 0, got {stiffness!r}")
    p = _points(p, None, "double_well")
    return (p[..., 0] ** 2 - 1.0) ** 2 + 0.5 * stiffness * jnp.sum(p[..., 1:] ** 2, axis=-1)


# --- the simulated surfaces of Chen et al. (2021), supplement section C ------------------------------------

#: The constant printed in the Figure 4 surface (it leaves the global minimum about -0.0035, not 0).
VDM_FIGURE4_CONSTANT = 0.426931992284953


def vdm_figure1_factor(x) -> jax.Array:
    """``f(x) = 0.2 (0.01 (x + 0.5)^2 + 1.32 arctan(0.5 x - 2)^2 + arctan(10 (x + 5))^2) - 0.5232``, the
    one-dimensional factor of :func:`vdm_figure1` (``vdm_figure1(p) = 10 f(p1) f(p2)``).

    Args:
      x: coordinates (any shape).

    Returns:
      ``f(x)`` elementwise, in the dtype of ``x``.

    Example:
      >>> bool(vdm_figure1_factor(-5.0) < 0)  # f dips slightly below 0 near x = -5
      True
    """
    x = jnp.asarray(x)
    x = x.astype(jnp.result_type(x, float))
    return 0.2 * (0.01 * (x + 0.5) ** 2 + 1.32 * jnp.arctan(0.5 * x - 2) ** 2 + jnp.arctan(10 * (x + 5)) ** 2) - 0.5232


def vdm_figure1(p, batch: Any = None) -> jax.Array:
    """The Figure 1 surface of Chen et al., 2021 (supplement section C), exactly as printed.

    ``(0.2 (0.01 (p1 + 0.5)^2 + 1.32 arctan(0.5 p1 - 2)^2 + arctan(10 (p1 + 5))^2) - 0.5232) x ((0.02 (p2 +
    0.5)^2 + 2.64 arctan(0.5 p2 - 2)^2 + 2 arctan(10 (p2 + 5))^2) - 5.232)``: a sharp minimum near
    ``p = (-5, -5)`` and a flat one near ``(4, 4)``. The second factor is 10x the first's form, so the surface
    is ``10 f(p1) f(p2)`` (:func:`vdm_figure1_factor`); ``f`` dips slightly below 0 near ``-5`` (minimum about
    ``-5.7e-5``), so the surface is slightly negative on thin strips there.

    Args:
      p: points ``[..., 2]``.
      batch: ignored.

    Returns:
      The loss ``[...]`` in the dtype of ``p``.

    Example:
      >>> import jax.numpy as jnp
      >>> p = jnp.array([0.3, -2.0])
      >>> bool(jnp.isclose(vdm_figure1(p), 10 * vdm_figure1_factor(0.3) * vdm_figure1_factor(-2.0), rtol=1e-5))
      True
    """
    del batch
    p = _points(p, 2, "vdm_figure1")
    p1, p2 = p[..., 0], p[..., 1]
    first = 0.2 * (0.01 * (p1 + 0.5) ** 2 + 1.32 * jnp.arctan(0.5 * p1 - 2) ** 2
                   + jnp.arctan(10 * (p1 + 5)) ** 2) - 0.5232
    second = (0.02 * (p2 + 0.5) ** 2 + 2.64 * jnp.arctan(0.5 * p2 - 2) ** 2
              + 2 * jnp.arctan(10 * (p2 + 5)) ** 2) - 5.232
    return first * second


def vdm_figure4(p, batch: Any = None, *, constant: float = VDM_FIGURE4_CONSTANT) -> jax.Array:
    """The Figure 4 surface of Chen et al., 2021 (supplement section C), many minima of different sharpness.

    ``0.132 (ln(sin(4.7 sin(p1)) + 1.2) + ln(sin(4.7 sin(p2)) + 1.2)) + 0.01 sin(10 p1) sin(6 p2) + 0.001 p1^2 +
    0.001 p2^2 + constant``. The printed formula has ``sin(x)`` in its first term; it is read as ``sin(p1)``
    (the surface has no ``x`` and is symmetric in form). The printed constant
    (:data:`VDM_FIGURE4_CONSTANT`, the default) does not make the global minimum exactly 0.

    Args:
      p: points ``[..., 2]``.
      batch: ignored.
      constant: the additive constant.

    Returns:
      The loss ``[...]`` in the dtype of ``p``.

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(vdm_figure4(jnp.zeros(2), constant=0.0)), 4)  # 0.264 ln(1.2)
      0.0481
    """
    del batch
    p = _points(p, 2, "vdm_figure4")
    p1, p2 = p[..., 0], p[..., 1]
    return (0.132 * (jnp.log(jnp.sin(4.7 * jnp.sin(p1)) + 1.2) + jnp.log(jnp.sin(4.7 * jnp.sin(p2)) + 1.2))
            + 0.01 * (jnp.sin(10 * p1) * jnp.sin(6 * p2)) + 0.001 * p1 ** 2 + 0.001 * p2 ** 2 + constant)


def vdm_figure7(p, batch: Any = None) -> jax.Array:
    """The Figure 7 surface of Chen et al., 2021 (supplement section C), exactly as printed.

    ``0.12 g1(p1) g2(p2)`` with ``g1(x) = (0.1 x)^2 + cos x + sin(3x)/3 + cos(5x)/5 + sin(7x)/7 + 1.331`` and
    ``g2(x) = (0.158 x)^2 + cos x + sin(3x)/3 + cos(5x)/5 + sin(7x)/7 + 1.25``: a minimum sharp in one
    direction next to flatter ones.

    Args:
      p: points ``[..., 2]``.
      batch: ignored.

    Returns:
      The loss ``[...]`` in the dtype of ``p``.

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(vdm_figure7(jnp.zeros(2))), 4)  # 0.12 * (1 + 0.2 + 1.331) * (1 + 0.2 + 1.25)
      0.7441
    """
    del batch
    p = _points(p, 2, "vdm_figure7")
    p1, p2 = p[..., 0], p[..., 1]
    g1 = ((0.1 * p1) ** 2 + jnp.cos(p1) + jnp.sin(3 * p1) / 3 + jnp.cos(5 * p1) / 5 + jnp.sin(7 * p1) / 7
          + 1.331)
    g2 = ((0.158 * p2) ** 2 + jnp.cos(p2) + jnp.sin(3 * p2) / 3 + jnp.cos(5 * p2) / 5 + jnp.sin(7 * p2) / 7
          + 1.25)
    return 0.12 * g1 * g2
