"""Gradient descent (with or without momentum) on a 2-D surface, with a vertical deformation mapping, from many
starts at once: the simulations of Chen et al., 2021 ('Deforming the loss surface to affect the behaviour of the
optimizer', AAAI), supplement section C.

The optimiser is the paper's Algorithm 1, ``optax.chain(scale_by_vdm(vdm), optax.sgd(lr, momentum))``
(:func:`make_sim_optimizer`), run by :func:`run_simulation` on any surface ``p[..., 2] -> loss`` (the paper's
surfaces are :func:`mclandscape.methods.potentials.vdm_figure1`, ``vdm_figure4`` and ``vdm_figure7``; the
paper's optimiser settings are presets of ``experiments/vdm_presets.py``). The computation follows the dtype
of the initial points (float64 under ``jax_enable_x64``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mclandscape.core._checks import integer, real
from mclandscape.engine.points import map_points, stacked_points
from mclandscape.methods.deform import VDM, Identity, check_vdm_state, scale_by_vdm
from mclandscape.methods.potentials import _points

__all__ = ["SimSettings", "make_sim_optimizer", "run_simulation"]


@dataclasses.dataclass(frozen=True)
class SimSettings:
    """One simulation's optimiser: GD (``momentum=None``) or GD with momentum, its learning rate, optionally
    decayed by the factors ``boundaries = {step: factor}`` (a piecewise-constant schedule), and its steps.

    Example:
      >>> SimSettings(lr=0.2, momentum=None, steps=300, boundaries={150: 0.1}).steps
      300
    """

    lr: float
    momentum: float | None
    steps: int
    boundaries: dict | None = None  # {step: factor} for step decay

    def __post_init__(self):
        real(self.lr, "SimSettings.lr", low=0.0, low_open=True)
        if self.momentum is not None and real(self.momentum, "SimSettings.momentum", low=0.0, high=1.0) == 1.0:
            raise ValueError("SimSettings.momentum must be None or in [0, 1), got 1.0")
        integer(self.steps, "SimSettings.steps", low=1)


def make_sim_optimizer(vdm: VDM, s: SimSettings) -> optax.GradientTransformationExtraArgs:
    """GD/GDM on the deformed loss: ``chain(scale_by_vdm(vdm), sgd)`` (Chen et al., 2021, Algorithm 1).

    Args:
      vdm: the :class:`~mclandscape.methods.deform.VDM`.
      s: the :class:`SimSettings`.

    Returns:
      An Optax transformation whose ``update`` needs the loss as ``loss=``.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = make_sim_optimizer(Identity(), SimSettings(lr=0.1, momentum=None, steps=1))
      >>> u, _ = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), jnp.zeros(2), loss=jnp.float32(1.0))
      >>> [round(float(v), 6) for v in u]
      [-0.1, -0.1]
    """
    lr = optax.piecewise_constant_schedule(s.lr, s.boundaries) if s.boundaries else s.lr
    return optax.chain(scale_by_vdm(vdm), optax.sgd(lr, momentum=s.momentum))


def _simulate_impl(loss_fn, vdm, lr, momentum, steps, boundaries, inits):
    tx = make_sim_optimizer(vdm, SimSettings(lr, momentum, steps, dict(boundaries) if boundaries else None))

    def one(p0):
        def step(carry, _):
            p, s = carry
            l, g = jax.value_and_grad(loss_fn)(p)
            u, s = tx.update(g, s, p, loss=l)
            p = optax.apply_updates(p, u)
            return (p, s), p

        (_, state), ps = jax.lax.scan(step, (p0, tx.init(p0)), None, length=steps)
        traj = jnp.concatenate([p0[None], ps])
        return traj, jax.vmap(loss_fn)(traj), state

    return jax.vmap(one)(inits)


# one module-level jit keyed by value: the surface, the VDM and the optimiser's numbers are static
_simulate = jax.jit(_simulate_impl, static_argnums=(0, 1, 2, 3, 4, 5))


@dataclasses.dataclass(frozen=True)
class _HessianEigenvalues:
    """``p -> eigenvalues of the Hessian of loss_fn at p`` (ascending), hashable for the engine's map."""

    loss_fn: Callable

    def __call__(self, p):
        return jnp.linalg.eigvalsh(jax.hessian(self.loss_fn)(p))


def run_simulation(loss_fn: Callable, vdm: VDM | None, inits, settings: SimSettings) -> dict:
    """GD/GDM on the deformed loss from every initial point at once (Chen et al., 2021, supplement section C).

    Not a training loop of the engine (:func:`mclandscape.engine.loop.make_step` / ``run``): it is a
    vectorised simulation, one ``jax.lax.scan`` over the steps ``vmap``-ed over N starts (one module-level
    ``jax.jit`` keyed by the surface, the VDM and the settings' values), every trajectory with its own loss and
    hence its own VDM factor ``δ'(ℓ_i)``. The engine's step takes one scalar loss per step (a sum over starts
    would give every start the factor of the summed loss) and dispatches one step per Python iteration. The
    optimiser is the same ``chain(scale_by_vdm(vdm), sgd)`` the engine runs (:func:`make_sim_optimizer`); the
    end points' Hessians are one mapped evaluation of the engine
    (:func:`~mclandscape.engine.points.map_points`).
    Everything is computed in the dtype of ``inits`` (float64 under ``jax_enable_x64``; integers become the
    default float type).

    Args:
      loss_fn: a surface ``p[..., 2] -> loss`` (e.g. :func:`mclandscape.methods.potentials.vdm_figure7`).
      vdm: the VDM (``None``: the original optimiser).
      inits: initial points ``[..., 2]`` (e.g. ``[N, 2]`` or one ``[2]``; leading axes are flattened).
      settings: the :class:`SimSettings`.

    Returns:
      ``{"trajectories": [N, steps+1, 2], "losses": [N, steps+1]`` (original surface), ``"ends": [N, 2],
      "final_loss": [N], "eigenvalues": [N, 2]`` (of the *original* surface's Hessian at the end points,
      ascending), ``"vdm"``: its name``}``. A start whose loss left the VDM's domain raises ``ValueError``
      (:func:`~mclandscape.methods.deform.check_vdm_state`).

    Example:
      >>> from mclandscape.methods.potentials import double_well
      >>> out = run_simulation(double_well, None, [[-0.5, 0.3], [0.4, -0.2]], SimSettings(0.05, 0.9, 200))
      >>> out["trajectories"].shape, [round(float(x), 3) for x in out["ends"][:, 0]]
      ((2, 201, 2), [-1.0, 1.0])
    """
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be a surface p[..., 2] -> loss, got {type(loss_fn).__name__}")
    if not isinstance(settings, SimSettings):
        raise ValueError(f"settings must be a SimSettings, got {type(settings).__name__}")
    vdm = vdm or Identity()
    inits = _points(inits, 2, "run_simulation's inits").reshape(-1, 2)
    boundaries = tuple(sorted(settings.boundaries.items())) if settings.boundaries else None
    traj, losses, states = _simulate(loss_fn, vdm, settings.lr, settings.momentum, settings.steps, boundaries, inits)
    check_vdm_state(states, vdm)
    ends = traj[:, -1]
    eig = map_points(_HessianEigenvalues(loss_fn), stacked_points(ends), strategy="vmap", devices=1)
    return {"trajectories": np.asarray(traj), "losses": np.asarray(losses), "ends": np.asarray(ends),
            "final_loss": np.asarray(losses[:, -1]), "eigenvalues": np.asarray(eig), "vdm": vdm.name}
