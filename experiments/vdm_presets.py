"""Presets of the VDM paper (Chen et al., 2021, 'Deforming the loss surface to affect the behaviour of the
optimizer', AAAI) used by ``experiments/vdm.py``: the VDMs of its Table 1 in the paper's notation
(:func:`parse_vdm`, :data:`TABLE1_VDMS`), the optimiser settings of its supplement's 2-D simulations
(:data:`FIG1_SETTINGS`, :data:`FIG4_SETTINGS`, :data:`FIG7_SETTINGS`), and the checks of the slips in the
printed formulas:

- Figure 1's surface (:func:`mclandscape.methods.potentials.vdm_figure1`) is slightly negative on thin strips
  near ``p = -5`` (:func:`fig1_negative_region` measures them);
- Figure 4's printed constant does not make the global minimum 0 (:func:`fig4_minimum` finds it, about
  ``-0.0035``, and the constant that would);
- Figure 7's VDM is printed as ``ln(exp(l - 0.9))``, which equals ``l - 0.9`` and deforms nothing
  (:func:`fig7_printed_vdm`); the evident intent is ``LE(1, 0.9) = ln(exp(l) - 0.9)``.

The surfaces themselves are public test potentials in :mod:`mclandscape.methods.potentials`, the simulation
driver is :func:`mclandscape.methods.simulated.run_simulation`.
"""

from __future__ import annotations

import ast
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np

from mclandscape.methods.deform import AP, LE, VDM, Identity, Squared, custom_vdm
from mclandscape.methods.potentials import VDM_FIGURE4_CONSTANT, vdm_figure4
from mclandscape.methods.simulated import SimSettings

__all__ = [
    "parse_vdm",
    "TABLE1_VDMS",
    "FIG1_SETTINGS",
    "FIG4_SETTINGS",
    "FIG7_SETTINGS",
    "fig7_printed_vdm",
    "fig4_minimum",
    "fig1_negative_region",
]

#: Supplement section C: GDM (lr 0.02, momentum 0.9) for 400 steps on Figure 1's surface.
FIG1_SETTINGS = SimSettings(lr=0.02, momentum=0.9, steps=400)
#: GD (lr 0.2, x0.1 at steps 150 and 225) for 300 steps on Figure 4's surface.
FIG4_SETTINGS = SimSettings(lr=0.2, momentum=None, steps=300, boundaries={150: 0.1, 225: 0.1})
#: GDM (lr 0.02, momentum 0.9) for 100 steps on Figure 7's surface.
FIG7_SETTINGS = SimSettings(lr=0.02, momentum=0.9, steps=100)

# --- parsing "LE(1, 0.9)", "AP(18/pi, 1, 2, 1)", "square", "identity" ---------------------------------

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}


def _eval_number(node) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return float(node.value)
    if isinstance(node, ast.Name) and node.id == "pi":
        return math.pi
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        v = _eval_number(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_eval_number(node.left), _eval_number(node.right))
    raise ValueError(f"not a number expression: {ast.dump(node)}")


def parse_vdm(spec: str) -> VDM:
    """A VDM from the paper's notation.

    Args:
      spec: ``"LE(1, 0.9)"``, ``"AP(18/pi, 1, 2, 1)"``, ``"square"`` (``0.5*l^2``) or ``"identity"`` (also
        ``"none"`` / ``"original"``); coefficients may use ``pi`` and ``+ - * / **`` (nothing is evaluated
        but numbers).

    Returns:
      The :class:`~mclandscape.methods.deform.VDM`.

    Example:
      >>> parse_vdm("AP(18/pi, 1, 2, 1)").name
      'AP(5.72958, 1, 2, 1)'
    """
    s = spec.strip()
    low = s.lower().replace(" ", "")
    if low in ("identity", "none", "original"):
        return Identity()
    if low in ("square", "squared", "0.5*l^2", "0.5l^2", "0.5*l**2"):
        return Squared()
    try:
        node = ast.parse(s, mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"cannot parse VDM {spec!r}: {e.msg}") from None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords):
        raise ValueError(f"cannot parse VDM {spec!r}: expected AP(a1, a2, a3, a4), LE(e1, e2), square or identity")
    args = [_eval_number(a) for a in node.args]
    fam = node.func.id.upper()
    if fam == "AP":
        if len(args) != 4:
            raise ValueError(f"AP takes 4 coefficients (a1, a2, a3, a4), got {len(args)} in {spec!r}")
        return AP(*args)
    if fam == "LE":
        if len(args) != 2:
            raise ValueError(f"LE takes 2 coefficients (e1, e2), got {len(args)} in {spec!r}")
        return LE(*args)
    raise ValueError(f"unknown VDM family {node.func.id!r} in {spec!r}; expected AP or LE")


#: The deformations of the paper's Table 1 (ResNet-20 on CIFAR-100), in the table's order.
TABLE1_VDMS: tuple[str, ...] = ("square", "LE(1, 0.60)", "LE(1, 0.70)", "LE(1, 0.90)", "LE(1, 0.99)",
                                "AP(5, 1, 2, 1)", "AP(18/pi, 1, 2, 1)", "AP(6, 1, 2, 1)", "AP(10, 1, 2, 1)")


# --- the slips of the printed simulations --------------------------------------------------------------


def fig7_printed_vdm() -> VDM:
    """The Figure 7 VDM exactly as printed, ``ln(exp(l - 0.9))`` (``= l - 0.9``, derivative 1: no deformation).

    Returns:
      A :func:`~mclandscape.methods.deform.custom_vdm`.

    Example:
      >>> float(fig7_printed_vdm().derivative(2.0))
      1.0
    """
    return custom_vdm(lambda l: jnp.log(jnp.exp(l - 0.9)), name="ln(exp(l-0.9)) [as printed]",
                      check_losses=np.linspace(0.0, 20.0, 401))


def _min_refine(fn, p0: np.ndarray, iters: int = 60) -> tuple[np.ndarray, float]:
    """Refine a grid minimum by Newton steps (JAX gradient and Hessian), keeping only steps that lower ``fn``."""
    dtype = jnp.result_type(float)  # float64 under jax_enable_x64
    p = np.asarray(p0, np.float64)
    f = lambda q: float(fn(jnp.asarray(q, dtype)))  # noqa: E731
    g = jax.jit(jax.grad(fn))
    h = jax.jit(jax.hessian(fn))
    for _ in range(iters):
        gv = np.asarray(g(jnp.asarray(p, dtype)), np.float64)
        hv = np.asarray(h(jnp.asarray(p, dtype)), np.float64)
        try:
            step = np.linalg.solve(hv, gv)
        except np.linalg.LinAlgError:
            break
        if not np.all(np.isfinite(step)) or np.linalg.norm(step) > 0.1:
            break
        q = p - step
        if f(q) > f(p):
            break
        p = q
    return p, f(p)


def fig4_minimum(grid: int = 2001, box: float = 10.0) -> dict:
    """Global minimum of the Figure 4 surface with the printed constant on ``[-box, box]^2``.

    A dense grid, then Newton steps from its best point.

    Args:
      grid: grid points per axis.
      box: half-width of the square.

    Returns:
      ``{"point", "min_loss_with_printed_constant", "printed_constant", "constant_for_zero_minimum"}``.

    Example:
      >>> m = fig4_minimum(grid=201)
      >>> bool(m["min_loss_with_printed_constant"] < 0)
      True
    """
    g = jnp.linspace(-box, box, grid)
    vals = jax.jit(lambda a: jax.vmap(lambda x: vdm_figure4(jnp.stack([jnp.full_like(g, x), g], -1)))(a))(g)
    vals = np.asarray(vals)
    i, j = np.unravel_index(np.argmin(vals), vals.shape)
    p, v = _min_refine(vdm_figure4, np.array([float(g[i]), float(g[j])]))
    v = min(v, float(vals[i, j]))
    return {"point": [float(p[0]), float(p[1])], "min_loss_with_printed_constant": v,
            "printed_constant": VDM_FIGURE4_CONSTANT, "constant_for_zero_minimum": VDM_FIGURE4_CONSTANT - v}


def fig1_negative_region(num: int = 400001, box: float = 12.0) -> dict:
    """Where Figure 1's factor ``f`` is negative (so the surface ``10 f(p1) f(p2)`` can be < 0) and how low the
    surface gets on ``[-box, box]^2``; ``f`` is evaluated in float64 NumPy on a fine 1-D grid (the surface is a
    product of two 1-D factors).

    Args:
      num: grid points.
      box: half-width of the interval.

    Returns:
      ``{"factor_min", "factor_argmin", "negative_interval", "min_loss_in_box", "box"}``.

    Example:
      >>> r = fig1_negative_region(num=20001)
      >>> bool(-5.01 < r["negative_interval"][0] < r["negative_interval"][1] < -4.99)
      True
    """
    x = np.linspace(-box, box, num)
    f = (0.2 * (0.01 * (x + 0.5) ** 2 + 1.32 * np.arctan(0.5 * x - 2) ** 2 + np.arctan(10 * (x + 5)) ** 2)
         - 0.5232)
    neg = x[f < 0]
    fmin, fmax = float(f.min()), float(f.max())
    # l = 10 f(p1) f(p2): most negative = 10 * fmin * fmax (one factor at its min, the other at its max)
    return {"factor_min": fmin, "factor_argmin": float(x[np.argmin(f)]),
            "negative_interval": [float(neg.min()), float(neg.max())] if neg.size else None,
            "min_loss_in_box": 10.0 * fmin * fmax if fmin < 0 else 10.0 * fmin ** 2,
            "box": box}
