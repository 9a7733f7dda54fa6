"""DSP-TT's settings and exit detector: the rho schedules of eq. 3, the moving-average exit check (§3.2.1), the
local solver and the search's configuration and records.

The method is that of the DSP-TT paper (Anonymous, 2020, 'Constructing multiple high-quality deep neural
networks: a TRUST-TECH based approach', ICLR 2021 submission); the search that uses these settings is
:mod:`mclandscape.methods.trusttech`, whose module docstring gives the readings of eq. 3.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from mclandscape.core._checks import choice, integer, real
from mclandscape.core.tree import PyTree

__all__ = ["READINGS", "RhoSchedule", "rho2_from_lr", "DetectorState", "ExitDetector", "START", "UP", "EXIT",
           "LocalSolver", "DSPConfig", "ExitRecord", "TierResult"]

READINGS = ("additive", "growth")
BatchFn = Callable[[int], Any]
Objective = Callable[[PyTree, Any, jax.Array | None], tuple[jax.Array, Any]]  # (params, batch, key) -> (loss, aux)


def _kind(ok: bool, name: str, want: str, value) -> None:
    """Refuse an argument of the wrong kind: ``ValueError("<name> must be <want>, got <its type>")``."""
    if not ok:
        raise ValueError(f"{name} must be {want}, got {type(value).__name__}")


# ---------------------------------------------------------------------------------------------------------
# rho schedules (DSP-TT paper, eq. 3, §5 hyper-parameters)
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RhoSchedule:
    """Step-size schedules of the DSP-TT paper, eq. 3.

    ``rho1(i) = min(increment * i, rho_max)`` for the i-th iteration (``i >= 1``) of a direction: it grows from
    0 by ``increment`` per iteration (0.001 in §5) and stops at ``rho_max``, so ``rho1(i) in (0, rho_max]``.
    ``rho2`` is the constant calibration step (0.1x the tier-0 learning rate in §5, :func:`rho2_from_lr`);
    ``rho2 = 0`` is the original TRUST-TECH search along a fixed direction. ``reading`` selects how the
    forward step uses ``rho1`` (module docstring): ``"additive"`` (default) or ``"growth"``.

    Example:
      >>> r = RhoSchedule(increment=1e-3, rho_max=0.05)
      >>> r.rho1(1), r.rho1(30), r.rho1(500)
      (0.001, 0.03, 0.05)
    """

    increment: float = 1e-3
    rho_max: float = 1.0
    rho2: float = 1e-2
    reading: str = "additive"

    def __post_init__(self):
        inc = real(self.increment, "RhoSchedule.increment", low=0.0, low_open=True, what="rho1 grows from 0 by it")
        rmax = real(self.rho_max, "RhoSchedule.rho_max", low=0.0, low_open=True, what="rho1 lies in (0, rho_max]")
        if inc > rmax:
            raise ValueError(f"RhoSchedule.increment ({inc}) exceeds rho_max ({rmax}): rho1 would start above "
                             "its maximum")
        real(self.rho2, "RhoSchedule.rho2", low=0.0, what="the calibration step")
        choice(self.reading, "RhoSchedule.reading", READINGS)

    def rho1(self, i: int) -> float:
        """``rho1(i) = min(increment * i, rho_max)`` for iteration ``i >= 1`` of a direction."""
        return float(min(self.increment * integer(i, "rho1's iteration i", low=1), self.rho_max))


def rho2_from_lr(tier0_lr: float, fraction: float = 0.1) -> float:
    """The calibration step ``rho2 = fraction * tier0_lr`` (DSP-TT paper, §5: 0.1x the tier-0 learning rate).

    Args:
      tier0_lr: the initial learning rate of the tier-0 training (``> 0``).
      fraction: the fraction (``> 0``).

    Returns:
      ``rho2``.

    Example:
      >>> round(rho2_from_lr(0.05), 6)
      0.005
    """
    return real(tier0_lr, "tier0_lr", low=0.0, low_open=True) * real(fraction, "fraction", low=0.0, low_open=True)


# ---------------------------------------------------------------------------------------------------------
# exit detection (§3.2.1: moving average + up/down buffer)
# ---------------------------------------------------------------------------------------------------------


@struct.dataclass
class DetectorState:
    """State of one direction's exit detector, as arrays (a pytree: the search step updates it in the graph).

    Attributes:
      count: iterations seen (int32).
      ema, base, peak: the moving average, its first value and its maximum (the losses' dtype).
      peak_iteration: the iteration of the maximum (int32).
      phase: :data:`START`, :data:`UP` (climbing) or :data:`EXIT` (int32).
      buffer: the last ``buffer_size`` up (``+1``) / down (``-1``) states, oldest first (``0``: not yet filled).
    """

    count: jax.Array
    ema: jax.Array
    base: jax.Array
    peak: jax.Array
    peak_iteration: jax.Array
    phase: jax.Array
    buffer: jax.Array


START, UP, EXIT = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class ExitDetector:
    """Exit-point detector on noisy (mini-batch) losses along one search path (DSP-TT paper, §3.2.1).

    ``ema_decay`` beta: ``ema_i = beta * ema_{i-1} + (1 - beta) * loss_i`` (``ema_1 = loss_1``). Each iteration
    pushes ``+1`` (EMA rose) or ``-1`` (EMA fell or stayed) into a buffer of the last ``buffer_size`` states.
    Phase ``START`` becomes ``UP`` when the full buffer holds at least ``vote * buffer_size`` ups and the
    EMA is ``min_rise`` above its first value; phase ``UP`` becomes ``EXIT`` when the full buffer holds at
    least ``vote * buffer_size`` downs and the EMA has fallen at least ``min_drop`` (a fraction of the rise
    ``peak - base``) below its peak. ``min_rise`` and ``min_drop`` are this implementation's guards against
    mini-batch noise (the paper names none; 0 disables them): a noisy plateau produces short runs of EMA
    decreases, a crossing into a neighbouring stability region a sustained fall. :meth:`update` is
    traceable, so the search evaluates it inside its compiled step.

    Example:
      >>> import jax.numpy as jnp
      >>> det, fired = ExitDetector(ema_decay=0.0, buffer_size=3, vote=1.0), []
      >>> state = det.init(jnp.float32)
      >>> for loss in [0, 1, 2, 3, 4, 3.5, 3, 2.5, 2]:  # a climb, then a steady fall
      ...     state, exited = det.update(state, jnp.float32(loss))
      ...     fired.append(bool(exited))
      >>> fired.index(True) + 1, int(state.peak_iteration)  # the exit at iteration 8, the EMA peak at 5
      (8, 5)
    """

    ema_decay: float = 0.9
    buffer_size: int = 10
    vote: float = 0.8
    min_rise: float = 0.0
    min_drop: float = 0.0

    def __post_init__(self):
        for name in ("ema_decay", "min_drop"):  # both in [0, 1)
            if real(getattr(self, name), f"ExitDetector.{name}", low=0.0, high=1.0) == 1.0:
                raise ValueError(f"ExitDetector.{name} must be in [0, 1), got 1.0")
        integer(self.buffer_size, "ExitDetector.buffer_size", low=1)
        real(self.vote, "ExitDetector.vote", low=0.5, low_open=True, high=1.0, what="a majority of the buffer")
        real(self.min_rise, "ExitDetector.min_rise", low=0.0)

    def init(self, dtype, num: int | None = None) -> DetectorState:
        """The state before the first loss (``num``: stacked for that many directions)."""
        lead = () if num is None else (int(num),)
        zero = jnp.zeros(lead, jnp.int32)
        nan = jnp.full(lead, jnp.nan, dtype)
        return DetectorState(count=zero, ema=nan, base=nan, peak=nan, peak_iteration=zero, phase=zero,
                             buffer=jnp.zeros(lead + (int(self.buffer_size),), jnp.int32))

    def update(self, state: DetectorState, loss: jax.Array) -> tuple[DetectorState, jax.Array]:
        """Feed one loss (traceable); returns the new state and whether an exit was declared at this iteration."""
        count = state.count + 1
        first = state.count == 0
        ema = jnp.where(first, loss, self.ema_decay * state.ema + (1.0 - self.ema_decay) * loss).astype(loss.dtype)
        sign = jnp.where(ema > state.ema, 1, -1).astype(jnp.int32)
        buffer = jnp.where(first, state.buffer, jnp.concatenate([state.buffer[1:], sign[None]]))
        base = jnp.where(first, loss, state.base)
        rose = first | (ema > state.peak)
        peak = jnp.where(rose, ema, state.peak)
        peak_it = jnp.where(rose, count, state.peak_iteration)
        full = ~first & (buffer[0] != 0)
        needed = int(math.ceil(self.vote * self.buffer_size - 1e-9))  # the votes of the buffer a transition needs
        climbing = (state.phase == START) & full & (jnp.sum(buffer == 1) >= needed) & (ema - base >= self.min_rise)
        fallen = peak - ema >= self.min_drop * (peak - base)
        exited = (state.phase == UP) & full & (jnp.sum(buffer == -1) >= needed) & fallen
        phase = jnp.where(climbing, UP, jnp.where(exited, EXIT, state.phase)).astype(jnp.int32)
        return DetectorState(count=count, ema=ema, base=base, peak=peak, peak_iteration=peak_it, phase=phase,
                             buffer=buffer), exited


# ---------------------------------------------------------------------------------------------------------
# configuration and records
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LocalSolver:
    """The local solver that converges from an exit point to a LOS (:func:`local_solve`).

    Attributes:
      optimizer: any Optax ``GradientTransformation`` (e.g. the tier-0 recipe shortened).
      steps: the most steps it runs (``>= 1``).
      batch_fn: its batches ``t -> batch`` (``None``: the search's batches).
      grad_tol: stop after the first step whose gradient norm (on its batch, at the parameters before the
        update) is below ``grad_tol`` — checked inside the compiled step after every step; meaningful with full
        batches. ``None``: run all ``steps``.
      check_every: the host looks whether the solver has converged every that many steps (the steps after
        convergence apply nothing, so this changes the cost, not the result).
    """

    optimizer: optax.GradientTransformation
    steps: int
    batch_fn: BatchFn | None = None
    grad_tol: float | None = None
    check_every: int = 100

    def __post_init__(self):
        integer(self.steps, "LocalSolver.steps", low=1)
        integer(self.check_every, "LocalSolver.check_every", low=1)
        if self.grad_tol is not None:
            real(self.grad_tol, "LocalSolver.grad_tol", low=0.0, low_open=True)


@dataclasses.dataclass(frozen=True)
class DSPConfig:
    """Settings of one tier of DSP-TT search.

    ``num_directions``: search directions from the origin (5 in §5.2). ``init_norm``: Euclidean norm of the
    random initial directions. ``max_steps``: total search steps over all directions;
    ``max_iterations``: iterations of one direction before it is abandoned without exit (``None``: only
    ``max_steps``). ``record_path``: keep the last ``record_path`` points of each path (for
    :func:`~mclandscape.methods.verification.verify_exit`; 0 keeps none). ``checkpoint_every``: also checkpoint
    the search state every that many steps (0: only at exits and solutions). ``sync_every``: the search steps
    run on the device without the host looking; the host reads their losses (and the exit flags) every
    ``sync_every`` steps and at every checkpoint (an exit freezes the steps after it until the host has run
    the local solver, so the result does not depend on ``sync_every``).
    """

    num_directions: int = 5
    rho: RhoSchedule = dataclasses.field(default_factory=RhoSchedule)
    detector: ExitDetector = dataclasses.field(default_factory=ExitDetector)
    init_norm: float = 1e-2
    max_steps: int = 10_000
    max_iterations: int | None = None
    record_path: int = 0
    checkpoint_every: int = 0
    sync_every: int = 50

    def __post_init__(self):
        for name, low in (("num_directions", 1), ("max_steps", 1), ("sync_every", 1), ("record_path", 0),
                          ("checkpoint_every", 0)):
            integer(getattr(self, name), f"DSPConfig.{name}", low=low)
        if self.max_iterations is not None:
            integer(self.max_iterations, "DSPConfig.max_iterations", low=1)
        real(self.init_norm, "DSPConfig.init_norm", low=0.0, low_open=True)
        _kind(isinstance(self.rho, RhoSchedule), "DSPConfig.rho", "a RhoSchedule", self.rho)
        _kind(isinstance(self.detector, ExitDetector), "DSPConfig.detector", "an ExitDetector", self.detector)


@dataclasses.dataclass(frozen=True)
class ExitRecord:
    """One exit point: direction ``direction`` exited at its iteration ``iteration`` (global search step
    ``step``) with ``rho1`` and distance ``distance = |d|`` from the origin; ``peak_iteration`` is the EMA
    peak (boundary-crossing estimate). After the local solver: ``solution_loss`` (last batch loss),
    ``solver_steps``, ``solution_distance`` (from the origin) and ``exit_to_solution``."""

    direction: int
    step: int
    iteration: int
    rho1: float
    distance: float
    loss: float
    ema: float
    base_ema: float
    peak_ema: float
    peak_iteration: int
    cosine_to_initial: float
    solution_loss: float | None = None
    solver_steps: int | None = None
    solution_distance: float | None = None
    exit_to_solution: float | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TierResult:
    """Result of one tier of search from ``origin``: ``solutions[j]`` was reached from ``exits[j]``.

    ``traces[k]`` holds the per-iteration record of direction ``k`` (``iteration``, ``step``, ``loss``,
    ``ema``, ``rho1``, ``norm``); ``failed`` lists directions abandoned without exit; ``paths[k]`` the recorded
    path window (list of ``(iteration, d)``) when ``record_path > 0``; ``steps`` the search steps used."""

    origin: PyTree
    solutions: list[PyTree]
    exits: list[ExitRecord]
    traces: list[dict]
    failed: list[int]
    steps: int
    paths: list[list[tuple[int, PyTree]]] = dataclasses.field(default_factory=list)
    exit_points: list[PyTree] = dataclasses.field(default_factory=list)

    @property
    def solver_steps(self) -> int:
        """Local-solver steps spent on all solutions of this tier."""
        return int(sum(e.solver_steps or 0 for e in self.exits))
