"""The simulated 2-D loss surfaces of seed 003's supplement (section C) and GD/GDM runs on them.

Seed 003: Chen, Jin, Du, Li and Liu (2020), "Deforming the loss surface to affect the behaviour of the
optimizer" (arXiv:2009.08274).

Each surface is a pure function of ``p = [..., 2]`` (``p[..., 0] = p1``, ``p[..., 1] = p2``). The formulas
are the supplement's, character for character where they make sense; the slips are handled openly:

- Figure 1: ``ℓ = (0.2(0.01(p1+0.5)² + 1.32 arctan(0.5p1−2)² + arctan(10(p1+5))²) − 0.5232) ×
  ((0.02(p2+0.5)² + 2.64 arctan(0.5p2−2)² + 2 arctan(10(p2+5))²) − 5.232)``. Its second factor is 10× the
  first's form, so ``ℓ = 10·f(p1)·f(p2)``; ``f`` dips slightly below 0 near ``p = −5`` (min ≈ −5.7e-5 on
  ``(−5.0008, −4.9975)``), so the loss is slightly negative on thin strips there.
  :func:`fig1_negative_region` measures it. Implemented as printed.
- Figure 4: printed ``0.132(ln(sin(4.7 sin(x)) + 1.2) + ln(sin(4.7 sin(p2)) + 1.2)) + 0.01 sin(10p1) sin(6p2)
  + 0.001p1² + 0.001p2² + 0.426931992284953``; ``x`` is evidently ``p1`` (the surface is symmetric in form
  and has no ``x``), and the constant does not make the global minimum exactly 0 (it is ≈ −0.0035,
  :func:`fig4_minimum`). The default uses the printed constant; ``constant=`` selects another.
- Figure 7: ``ℓ = 0.12 g1(p1) g2(p2)`` as printed; the VDM is printed as ``δ(ℓ) = ln(exp(ℓ − 0.9))`` which
  equals ``ℓ − 0.9`` and deforms nothing (``δ' ≡ 1``); the evident intent is LE(1, 0.9) =
  ``ln(exp(ℓ) − 0.9)``. Both are run (:func:`fig7_printed_vdm`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mclandscape.methods.deform import VDM, Identity, check_vdm_state, custom_vdm, scale_by_vdm

FIG4_PRINTED_CONSTANT = 0.426931992284953


def _split(p):
    p = jnp.asarray(p)
    if p.shape[-1] != 2:
        raise ValueError(f"the simulated surfaces take points [..., 2], got shape {p.shape}")
    return p[..., 0], p[..., 1]


def fig1_factor(p):
    """``f(p) = 0.2(0.01(p+0.5)² + 1.32 arctan(0.5p−2)² + arctan(10(p+5))²) − 0.5232`` (Figure 1's p1 factor)."""
    return 0.2 * (0.01 * (p + 0.5) ** 2 + 1.32 * jnp.arctan(0.5 * p - 2) ** 2 + jnp.arctan(10 * (p + 5)) ** 2) - 0.5232


def fig1_loss(p):
    """Seed 003 Figure 1 surface, exactly as printed in supplement section C."""
    p1, p2 = _split(p)
    first = 0.2 * (0.01 * (p1 + 0.5) ** 2 + 1.32 * jnp.arctan(0.5 * p1 - 2) ** 2
                   + jnp.arctan(10 * (p1 + 5)) ** 2) - 0.5232
    second = (0.02 * (p2 + 0.5) ** 2 + 2.64 * jnp.arctan(0.5 * p2 - 2) ** 2
              + 2 * jnp.arctan(10 * (p2 + 5)) ** 2) - 5.232
    return first * second


def fig4_loss(p, constant: float = FIG4_PRINTED_CONSTANT):
    """Seed 003 Figure 4 surface with ``sin(x)`` read as ``sin(p1)``; ``constant`` defaults to the printed one."""
    p1, p2 = _split(p)
    return (0.132 * (jnp.log(jnp.sin(4.7 * jnp.sin(p1)) + 1.2) + jnp.log(jnp.sin(4.7 * jnp.sin(p2)) + 1.2))
            + 0.01 * (jnp.sin(10 * p1) * jnp.sin(6 * p2)) + 0.001 * p1 ** 2 + 0.001 * p2 ** 2 + constant)


def fig7_loss(p):
    """Seed 003 Figure 7 surface, exactly as printed."""
    p1, p2 = _split(p)
    g1 = ((0.1 * p1) ** 2 + jnp.cos(p1) + jnp.sin(3 * p1) / 3 + jnp.cos(5 * p1) / 5 + jnp.sin(7 * p1) / 7
          + 1.331)
    g2 = ((0.158 * p2) ** 2 + jnp.cos(p2) + jnp.sin(3 * p2) / 3 + jnp.cos(5 * p2) / 5 + jnp.sin(7 * p2) / 7
          + 1.25)
    return 0.12 * g1 * g2


def fig7_printed_vdm() -> VDM:
    """The Figure 7 VDM exactly as printed, ``δ(ℓ) = ln(exp(ℓ − 0.9))`` (= ``ℓ − 0.9``, ``δ' ≡ 1``)."""
    return custom_vdm(lambda l: jnp.log(jnp.exp(l - 0.9)), name="ln(exp(l-0.9)) [as printed]",
                      check_losses=np.linspace(0.0, 20.0, 401))


def _min_refine(fn, p0: np.ndarray, iters: int = 60) -> tuple[np.ndarray, float]:
    """Refine a grid minimum by Newton steps (JAX gradient and Hessian), keeping only steps that lower ``fn``."""
    p = np.asarray(p0, np.float64)
    f = lambda q: float(fn(jnp.asarray(q, jnp.float32)))
    g = jax.jit(jax.grad(fn))
    h = jax.jit(jax.hessian(fn))
    for _ in range(iters):
        gv = np.asarray(g(jnp.asarray(p, jnp.float32)), np.float64)
        hv = np.asarray(h(jnp.asarray(p, jnp.float32)), np.float64)
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
    """Global minimum of the Figure 4 surface (printed constant) on ``[−box, box]²``: dense grid + Newton.

    Returns the point, the minimum value, and the constant that would make the minimum exactly 0.
    """
    g = jnp.linspace(-box, box, grid)
    vals = jax.jit(lambda a: jax.vmap(lambda x: fig4_loss(jnp.stack([jnp.full_like(g, x), g], -1)))(a))(g)
    vals = np.asarray(vals)
    i, j = np.unravel_index(np.argmin(vals), vals.shape)
    p, v = _min_refine(fig4_loss, np.array([float(g[i]), float(g[j])]))
    v = min(v, float(vals[i, j]))
    return {"point": [float(p[0]), float(p[1])], "min_loss_with_printed_constant": v,
            "printed_constant": FIG4_PRINTED_CONSTANT, "constant_for_zero_minimum": FIG4_PRINTED_CONSTANT - v}


def fig1_negative_region(num: int = 400001, box: float = 12.0) -> dict:
    """Where Figure 1's factor ``f`` is negative (so ``ℓ = 10 f(p1) f(p2)`` can be < 0) and how low ``ℓ``
    gets on ``[−box, box]²``. ``f`` is evaluated in float64 NumPy on a fine 1-D grid (the surface is a product
    of two 1-D factors)."""
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


@dataclasses.dataclass(frozen=True)
class SimSettings:
    """One supplement simulation: optimiser (GD or GDM), learning rate (or schedule), momentum, steps."""

    lr: float
    momentum: float | None
    steps: int
    boundaries: dict | None = None  # {step: factor} for step decay


FIG1_SETTINGS = SimSettings(lr=0.02, momentum=0.9, steps=400)
FIG4_SETTINGS = SimSettings(lr=0.2, momentum=None, steps=300, boundaries={150: 0.1, 225: 0.1})
FIG7_SETTINGS = SimSettings(lr=0.02, momentum=0.9, steps=100)


def make_sim_optimizer(vdm: VDM, s: SimSettings) -> optax.GradientTransformationExtraArgs:
    """``chain(scale_by_vdm(vdm), sgd)`` — GD/GDM on ``δ∘ℓ`` (seed 003 Algorithm 1)."""
    lr = optax.piecewise_constant_schedule(s.lr, s.boundaries) if s.boundaries else s.lr
    return optax.chain(scale_by_vdm(vdm), optax.sgd(lr, momentum=s.momentum))


def run_simulation(loss_fn: Callable, vdm: VDM | None, inits, settings: SimSettings) -> dict:
    """GD/GDM on ``δ∘ℓ`` from every initial point at once (seed 003 supplement section C).

    Not a training loop of the engine (:func:`mclandscape.engine.loop.make_step` / ``run``): it is a
    vectorised simulation, one ``jax.lax.scan`` over the steps ``vmap``-ed over N starts, every trajectory
    with its own loss and hence its own VDM factor ``δ'(ℓ_i)``. The engine's step takes one scalar loss per
    step (a sum over starts would give every start the factor of the summed loss) and dispatches one step
    per Python iteration (100 random starts × 300 steps would be 30,000 dispatches instead of one call). The
    optimiser is the same ``chain(scale_by_vdm(vdm), sgd)`` the engine runs (:func:`make_sim_optimizer`).

    Args:
      loss_fn: a surface ``p[..., 2] -> loss`` (e.g. :func:`fig7_loss`).
      vdm: the VDM (``None``: the original optimiser).
      inits: initial points ``[N, 2]`` (or one ``[2]``).
      settings: the :class:`SimSettings`.

    Returns:
      ``{"trajectories": [N, steps+1, 2], "losses": [N, steps+1]`` (original surface), ``"ends": [N, 2],
      "final_loss": [N], "eigenvalues": [N, 2]`` (of the *original* surface's Hessian at the end points,
      ascending), ``"vdm"``: its name``}``. A start whose loss left the VDM's domain raises ``ValueError``
      (:func:`~mclandscape.methods.deform.check_vdm_state`).
    """
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be a surface p[..., 2] -> loss, got {type(loss_fn).__name__}")
    if not isinstance(settings, SimSettings):
        raise ValueError(f"settings must be a SimSettings, got {type(settings).__name__}")
    vdm = vdm or Identity()
    tx = make_sim_optimizer(vdm, settings)
    inits = jnp.asarray(inits, jnp.float32).reshape(-1, 2)

    def one(p0):
        def step(carry, _):
            p, s = carry
            l, g = jax.value_and_grad(loss_fn)(p)
            u, s = tx.update(g, s, p, loss=l)
            p = optax.apply_updates(p, u)
            return (p, s), p

        (_, state), ps = jax.lax.scan(step, (p0, tx.init(p0)), None, length=settings.steps)
        traj = jnp.concatenate([p0[None], ps])
        return traj, jax.vmap(loss_fn)(traj), state

    traj, losses, states = jax.jit(jax.vmap(one))(inits)
    check_vdm_state(states, vdm)
    ends = traj[:, -1]
    eig = jax.jit(jax.vmap(lambda p: jnp.linalg.eigvalsh(jax.hessian(loss_fn)(p))))(ends)
    return {"trajectories": np.asarray(traj), "losses": np.asarray(losses), "ends": np.asarray(ends),
            "final_loss": np.asarray(losses[:, -1]), "eigenvalues": np.asarray(eig), "vdm": vdm.name}
