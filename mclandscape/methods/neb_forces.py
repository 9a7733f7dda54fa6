"""The geometry of a band and its NEB forces (Draxler, Veschgini, Salmhofer and Hamprecht, 2018, "Essentially
no barriers in neural network energy landscape", ICML).

A band is ``N`` pivots ``w_0 .. w_{N-1}`` stacked on a leading axis (every leaf ``[N, ...]``); the end pivots
``w_0 = start`` and ``w_{N-1} = end`` stay fixed, and the band *is* a polygonal chain through the pivots:
:func:`band_connector` wraps the pivots as a ``"polychain"`` :class:`~mclandscape.core.connectors.Connector`
(pivot ``i`` at ``t = i/(N-1)``), evaluated like any other curve.

Forces on an inner pivot ``i`` (Draxler et al. 2018, the NEB force decomposition):

- loss force, perpendicular part: ``F_L^perp_i = -grad L(w_i) + (grad L(w_i) . tau_i) tau_i``, so
  ``F_L^perp_i . tau_i = 0``;
- spring force, parallel part: ``F_E^par_i = k (|w_{i+1} - w_i| / omega_i - |w_i - w_{i-1}| / omega_{i-1})
  tau_i``, the projection of the elastic potential that equalises the spacing relative to the target
  segment weights ``omega`` (mean 1; equal weights give the plain spring of ``V_E = (k/2) sum |w_{i+1} -
  w_i|^2``, in 1-D ``w_k <- w_k - eta k [(w_k - w_{k-1}) - (w_{k+1} - w_k)]``).

The tangent ``tau_i`` is the improved estimate of Henkelman & Jonsson (2000, J. Chem. Phys. 113, 9978):
the segment towards the higher-loss neighbour (``tau+ = w_{i+1} - w_i`` when ``L_{i+1} > L_i > L_{i-1}``,
``tau- = w_i - w_{i-1}`` when ``L_{i+1} < L_i < L_{i-1}``) and, at a loss extremum, the blend
``tau+ dV_max + tau- dV_min`` (if ``L_{i+1} > L_{i-1}``, else the weights swap) with ``dV_max/min`` the
larger/smaller of ``|L_{i+1} - L_i|``, ``|L_{i-1} - L_i|``; normalised. Where the loss is flat on both
sides (``dV_max = 0``) the bisector of the two unit segment vectors is used.

Climbing image (Henkelman, Uberuaga & Jonsson 2000): the highest inner pivot gets no spring and the reversed
parallel loss force, ``F = -grad L + 2 (grad L . tau) tau``, so it climbs to the saddle along the band while
relaxing perpendicular to it.

Precision: everything computes in the pivots' dtype (float64 pivots under ``jax_enable_x64`` keep tangents,
forces, spacing weights and the spring constant in float64; float32 pivots stay float32).

Example:
    >>> import jax.numpy as jnp
    >>> segment_lengths(straight_band(jnp.array([0.0]), jnp.array([1.0]), 3)).tolist()
    [0.5, 0.5]
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mclandscape.core import _checks
from mclandscape.core.connectors import Connector, from_control, polychain
from mclandscape.core.tree import (
    PyTree,
    check_finite,
    check_same_structure,
    tree_distance,
    tree_row_dot,
    tree_row_scale,
)

__all__ = ["NEBForces", "segment_lengths", "improved_tangents", "neb_forces", "band_connector", "straight_band",
           "dense_ts"]


class NEBForces(NamedTuple):
    """Forces on the inner pivots (stacked trees ``[N-2, ...]``) and their norms ``[N-2]``, from
    :func:`neb_forces` (whose example shows them)."""

    total: PyTree          # F_L^perp + F_E^par (climbing image: -grad + 2 (grad . tau) tau)
    perpendicular: PyTree  # F_L^perp = -grad + (grad . tau) tau
    parallel: PyTree       # F_E^par = k (|d_next| - |d_prev|) tau (climbing image: (grad . tau) tau)
    tangent: PyTree        # unit tangents tau
    perp_norm: jax.Array   # |F_L^perp|
    par_norm: jax.Array    # |F^par|



def _rows(tree: PyTree, sl: slice) -> PyTree:
    return jax.tree_util.tree_map(lambda x: x[sl], tree)


def _diffs(pivots: PyTree) -> PyTree:
    """Segment vectors ``w_{j+1} - w_j``, stacked ``[N-1, ...]``."""
    return jax.tree_util.tree_map(lambda x: x[1:] - x[:-1], pivots)


def segment_lengths(pivots: PyTree) -> jax.Array:
    """The lengths of a band's segments.

    Args:
      pivots: stacked pivots ``[N, ...]``.

    Returns:
      ``|w_{j+1} - w_j|`` for j = 0..N-2, shape ``[N-1]`` (in the pivots' dtype, float32 at least).

    Example:
        >>> import jax.numpy as jnp
        >>> segment_lengths(jnp.array([[0.0, 0.0], [3.0, 4.0], [3.0, 5.0]])).tolist()
        [5.0, 1.0]
    """
    d = _diffs(pivots)
    return jnp.sqrt(tree_row_dot(d, d))


def _normalise_rows(tree: PyTree, eps: float = 1e-30) -> PyTree:
    n = jnp.sqrt(tree_row_dot(tree, tree))
    return tree_row_scale(tree, 1.0 / jnp.maximum(n, eps))


def improved_tangents(pivots: PyTree, energies) -> PyTree:
    """Unit tangents ``tau_i`` of the inner pivots i = 1..N-2 (stacked ``[N-2, ...]``).

    Henkelman & Jonsson's improved tangent (see the module docstring). Jittable.

    Args:
      pivots: stacked pivots ``[N, ...]``.
      energies: the N pivot losses.

    Returns:
      The unit tangents as a stacked tree ``[N-2, ...]``.

    Example:
        >>> import jax.numpy as jnp
        >>> piv = jnp.array([[0.0, 0.0], [1.0, 0.0], [1.0, 2.0]])
        >>> improved_tangents(piv, jnp.array([0.0, 1.0, 2.0])).tolist()  # rising: towards the next pivot
        [[0.0, 1.0]]
    """
    e = jnp.asarray(energies)
    d = _diffs(pivots)
    dn = _rows(d, slice(1, None))   # tau+ = w_{i+1} - w_i
    dp = _rows(d, slice(None, -1))  # tau- = w_i - w_{i-1}
    lengths = jnp.sqrt(tree_row_dot(d, d))
    ln, lp = lengths[1:], lengths[:-1]
    de_next = e[2:] - e[1:-1]
    de_prev = e[1:-1] - e[:-2]
    up = (de_next > 0) & (de_prev > 0)
    down = (de_next < 0) & (de_prev < 0)
    vmax = jnp.maximum(jnp.abs(de_next), jnp.abs(de_prev))
    vmin = jnp.minimum(jnp.abs(de_next), jnp.abs(de_prev))
    higher_next = e[2:] > e[:-2]
    a_ext = jnp.where(higher_next, vmax, vmin)
    b_ext = jnp.where(higher_next, vmin, vmax)
    flat = vmax <= 0
    tiny = jnp.finfo(jnp.result_type(ln)).tiny
    a_flat = 1.0 / jnp.maximum(ln, tiny)
    b_flat = 1.0 / jnp.maximum(lp, tiny)
    a = jnp.where(up, 1.0, jnp.where(down, 0.0, jnp.where(flat, a_flat, a_ext)))
    b = jnp.where(up, 0.0, jnp.where(down, 1.0, jnp.where(flat, b_flat, b_ext)))
    tau = jax.tree_util.tree_map(jnp.add, tree_row_scale(dn, a), tree_row_scale(dp, b))
    return _normalise_rows(tau)


def _band_dtype(pivots: PyTree):
    """The floating dtype the band computes in: its pivots' (float32 at least; float64 pivots, which exist
    only with ``jax_enable_x64``, keep spacing weights, spring constant and insertion weights in float64)."""
    leaves = jax.tree_util.tree_leaves(pivots)
    return jnp.promote_types(jnp.float32, jnp.result_type(*[jnp.dtype(a.dtype) for a in leaves]))


def _normalised_spacing(spacing, n_segments: int, dtype=jnp.float32):
    """Target segment weights ``[n_segments]`` with mean 1, in ``dtype`` (the band's)."""
    if spacing is None:
        return jnp.ones((n_segments,), dtype)
    w = jnp.asarray(spacing, dtype)
    return w * (n_segments / jnp.sum(w))


def neb_forces(pivots: PyTree, energies, grads: PyTree, spring_constant: float, *, spacing=None,
               climbing_index=-1) -> NEBForces:
    """NEB forces on the inner pivots from the N pivot losses and the inner pivots' loss gradients.

    Jittable; computed in the pivots' dtype (float64 under ``jax_enable_x64`` for float64 pivots, spacing
    weights included).

    Args:
      pivots: stacked pivots ``[N, ...]``.
      energies: the N pivot losses.
      grads: the loss gradients of the inner pivots 1..N-2, stacked ``[N-2, ...]``.
      spring_constant: the spring's ``k``.
      spacing: optional target segment weights ``[N-1]`` (default equal: the plain spring).
      climbing_index: the pivot index (1..N-2) of the climbing image, or -1 for none.

    Returns:
      :class:`NEBForces`.

    Example:
        >>> import jax.numpy as jnp
        >>> piv = jnp.array([[0.0, 0.0], [0.4, 1.0], [1.0, 0.0]])
        >>> f = neb_forces(piv, jnp.array([0.0, 1.0, 0.0]), jnp.array([[0.0, 2.0]]), 1.0)
        >>> f.tangent.tolist(), f.perpendicular.tolist()  # a loss maximum: the blend of both segments
        ([[1.0, 0.0]], [[0.0, -2.0]])
        >>> round(float(f.par_norm[0]), 4)  # k (|w_2 - w_1| - |w_1 - w_0|)
        0.0892
    """
    tau = improved_tangents(pivots, energies)
    gt = tree_row_dot(grads, tau)
    along = tree_row_scale(tau, gt)
    perp = jax.tree_util.tree_map(lambda g, a: a - g, grads, along)  # -grad + (grad . tau) tau
    lengths = segment_lengths(pivots)
    w = _normalised_spacing(spacing, lengths.shape[0], lengths.dtype)
    rel = lengths / w
    spring = spring_constant * (rel[1:] - rel[:-1])
    idx = jnp.arange(1, lengths.shape[0])
    par = jnp.where(idx == climbing_index, gt, spring)
    parallel = tree_row_scale(tau, par)
    total = jax.tree_util.tree_map(jnp.add, perp, parallel)
    perp_norm = jnp.sqrt(tree_row_dot(perp, perp))
    return NEBForces(total=total, perpendicular=perp, parallel=parallel, tangent=tau, perp_norm=perp_norm,
                     par_norm=jnp.abs(par))


def _num_pivots(pivots: PyTree) -> int:
    """N, the length of the pivots' leading axis, checked to be at least 3."""
    leaves = jax.tree_util.tree_leaves(pivots)
    if not leaves or np.ndim(leaves[0]) < 1:
        raise ValueError("pivots must be stacked trees with a leading pivot axis")
    n = int(np.shape(leaves[0])[0])
    if n < 3:
        raise ValueError(f"a band needs N >= 3 pivots (two fixed ends and at least one free pivot), got N={n}")
    return n


def band_connector(pivots: PyTree) -> Connector:
    """The polygonal chain through stacked pivots.

    Args:
      pivots: stacked pivots ``[N, ...]`` (N >= 3).

    Returns:
      A ``"polychain"`` :class:`~mclandscape.core.connectors.Connector`: pivot i at t = i/(N-1), ends fixed.

    Example:
        >>> import jax.numpy as jnp
        >>> band_connector(jnp.array([0.0, 1.0, 4.0])).points([0.25, 0.75]).tolist()
        [0.5, 2.5]
    """
    n = _num_pivots(pivots)
    return from_control(pivots, "polychain", (n,), [True] + [False] * (n - 2) + [True])


def _check_ends(start: PyTree, end: PyTree) -> None:
    check_same_structure(start, end, names=("start", "end"))
    check_finite(start, "start")
    check_finite(end, "end")
    if float(tree_distance(start, end)) == 0.0:
        raise ValueError("start and end are identical points: a band between them has no direction")


def straight_band(start: PyTree, end: PyTree, num_pivots: int) -> PyTree:
    """Pivots evenly on the straight segment from ``start`` to ``end``.

    Args:
      start, end: the end points (same structure, finite, distinct).
      num_pivots: N >= 3.

    Returns:
      Stacked pivots ``[N, ...]`` whose ends are exactly ``start`` and ``end``.

    Example:
        >>> import jax.numpy as jnp
        >>> straight_band(jnp.array([0.0]), jnp.array([1.0]), 5)[:, 0].tolist()
        [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    n = _checks.integer(num_pivots, "num_pivots", low=3, what="N >= 3: two fixed ends and at least one free pivot")
    _check_ends(start, end)
    return polychain(start, end, num_bends=n - 2).control


def dense_ts(num_pivots: int, sub_pivots: int = 9) -> np.ndarray:
    """Path parameters of the pivots and ``sub_pivots`` evenly spaced points in every gap (increasing).

    Args:
      num_pivots: N >= 2.
      sub_pivots: points strictly inside every gap (Draxler's dense evaluation uses 9).

    Returns:
      ``(N-1)(sub_pivots+1) + 1`` float64 values; pivot i sits at ``t = i/(N-1)``.

    Example:
        >>> dense_ts(3, 1).tolist()
        [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    g = _checks.integer(num_pivots, "num_pivots", low=2) - 1
    sub_pivots = _checks.integer(sub_pivots, "sub_pivots", low=0)
    alphas = np.linspace(0.0, 1.0, sub_pivots + 2)[:-1]
    t = (np.arange(g)[:, None] + alphas[None, :]).reshape(-1) / g
    return np.concatenate([t, [1.0]])
