"""TRUST-TECH with dynamic search paths (DSP-TT): multiple local optimal solutions from one.

The method of the DSP-TT paper (Anonymous, 2020, 'Constructing multiple high-quality deep neural networks: a
TRUST-TECH based approach', ICLR 2021 submission). Starting from a local optimal solution (LOS) ``omega0`` (the
*tier-0* solution), DSP-TT keeps several search directions ``d^(k)`` (pytrees shaped like the parameters). At
each search step one direction, chosen at random among those still searching, is advanced (DSP-TT paper,
Algorithm 1):

1. *forward search step* (``Update(model, Delta_k, rho1)``): ``d <- d + rho1(i) * d / |d|``;
2. *exit check* (``CheckExit``) on the mini-batch loss at ``omega0 + d`` — an exponential moving average of the
   losses of that direction and a buffer of up/down states (:class:`ExitDetector`);
3. if an exit point was found, a *local solver* (any Optax optimizer, :class:`LocalSolver`) converges from
   ``omega0 + d`` to a tier-1 solution and the direction retires; otherwise
4. *calibration step* (``Calibrate(model, rho2, Delta_k, batch)``): ``d <- d + rho2 * f(omega0 + d)`` with ``f``
   the negative-gradient dynamics of the paper's eq. 2 (an Optax gradient transformation, ``-grad`` by
   default).

Only one direction enters the computation at a time (the step function takes a single direction), so memory
stays near that of ordinary training plus the stored directions. Everything is computed in the parameters'
dtype (float64 parameters under ``jax_enable_x64`` give float64 steps, losses and ``rho``).

The reading of eq. 3
--------------------
Eq. 3 reads ``d_i = rho1(i) * d_{i-1} + rho2(i) * f(omega0 + d_i)`` with ``rho1(i) in (0, rho_max]`` growing
from 0 by a fixed increment per iteration (0.001 in §5). Taken literally with ``rho1 < 1`` the first term
*shrinks* the direction: at ``i = 1`` the direction is multiplied by 0.001, after which ``d`` sits at
``omega0`` where ``f = 0`` and the search never leaves the tier-0 basin. The text around eq. 3 — "an
exploration step forward along the current direction", a *pace of search step* ``rho1`` that grows until an
exit is found or ``rho_max`` is reached, exit distance highly correlated with ``rho1`` (§5.4) — describes a
search moving outward with a growing step. :class:`RhoSchedule` therefore implements two outward readings and
keeps the literal one to show the difference:

- ``"additive"`` (default): ``d_i = d_{i-1} + rho1(i) * d_{i-1}/|d_{i-1}| + rho2 * f(omega0 + d_i')`` — the
  search advances a distance ``rho1(i)`` along the current (calibrated) direction, so the distance travelled
  after ``i`` iterations is about ``increment * i^2 / 2`` (then ``rho_max`` per iteration) independently of
  the scale of ``d_0``. The step is in parameter units, so ``rho_max`` must suit the parameter scale: the
  calibration can only hold the path in a valley while ``rho1 <~ rho2 * |grad|``, and with too large a
  ``rho_max`` the path becomes a straight ray into high loss;
- ``"growth"``: ``d_i = (1 + rho1(i)) * d_{i-1} + rho2 * f(omega0 + d_i')`` — a growth factor ``1 + rho1``;
- ``"literal"``: ``d_i = rho1(i) * d_{i-1} + rho2 * f(omega0 + d_i')`` — eq. 3 as printed (never escapes).

In all three ``f`` is evaluated explicitly at the point after the forward step, ``d_i' = `` forward-stepped
``d_{i-1}`` (eq. 3 writes the implicit ``f(omega0 + d_i)``; Algorithm 1 evaluates it after ``Update``).
``rho2`` is a constant fraction (0.1 in §5) of the tier-0 learning rate (:func:`rho2_from_lr`).

Exit detection (§3.2.1)
-----------------------
The losses of one direction are smoothed by an exponential moving average; each step pushes "up" or "down"
(the sign of the EMA change) into a buffer of the last ``buffer_size`` states. The direction is *climbing* once
the buffer holds at least ``vote`` ups (and the EMA has risen ``min_rise`` above its start), and an *exit* is
declared when, while climbing, the buffer holds at least ``vote`` downs (and the EMA has fallen ``min_drop`` of
its rise below its peak): the loss "decreases steadily", so the search path has crossed the stability boundary
into a neighbouring stability region. The exit point is the point where the exit is declared (already inside
the new region); the EMA peak before it (an estimate of the boundary crossing) is recorded too. On mini-batch
losses a detector can also fire on a noisy plateau; the guards ``min_rise`` / ``min_drop`` (not in the paper)
reduce that.

Tier-by-tier search and verification
------------------------------------
:func:`tier_by_tier`: tier 1 from ``omega0``, tier 2 from the best tier-1 solution (§5.2). Every exit point and
every solution found is checkpointed through :mod:`mclandscape.engine.checkpoint`, and a search restarted with
the same arguments and checkpoint directory resumes where it was killed, producing the same solutions as an
uninterrupted run (the direction chosen and the mini-batch used at global step ``t`` are functions of ``(key,
t)`` only). Whether an exit point really separates two optima (§5.1, Figure 3c) is measured by
:func:`~mclandscape.methods.verification.verify_exit` (:mod:`mclandscape.methods.verification`, re-exported
here).

The engine under the search
---------------------------
Every loss here is the library's one objective protocol ``objective(params, batch, key) -> (loss, aux)``
(:mod:`mclandscape.core.objective`): :func:`model_loss_fn` is :func:`~mclandscape.core.objective.make_objective`
of a :class:`~mclandscape.engine.models.base.Model`, an analytic potential is wrapped by
:func:`~mclandscape.core.objective.function_objective`. The search and the exit check use the objective's value
``loss`` (what is differentiated, L2 included); ``aux`` is ignored. Batches come from any random-access
stream ``t -> batch`` (:func:`dataset_batches` is :func:`mclandscape.engine.data.batch_stream`).

- The search (:func:`dsp_search`) keeps its own driver — one direction per step, a host-side exit check
  after every step — around one module-level jitted step (:func:`dsp_step`) whose static arguments are the
  objective's configuration (model, loss, L2, mode: hashed by value, the model by identity), the
  calibration transform and the reading; ``rho1``, ``rho2``, the step index and the objective's fixed arrays
  are traced. A second search with the same objective (or a new one from the same model and loss) and the
  same shapes compiles nothing.
- The local solver (:func:`local_solve`) is the engine's training loop: :func:`mclandscape.engine.loop.make_step`
  with the solver's Optax transform and :func:`mclandscape.engine.loop.run`, one step per loop epoch, so that
  the gradient-norm criterion ``grad_tol`` is checked after *every* step on that step's gradient norm (taken
  at the parameters before its update; the run ends after the first step that meets it, its update
  applied). A non-finite loss or gradient raises the engine's
  :class:`~mclandscape.engine.loop.NonFiniteError` (nothing non-finite is applied).
- Devices and processes: ``devices`` (default all of the job's, across the processes of a ``jax.distributed``
  job; ``1``: one device) puts the search step and the local solves on the engine's data-parallel mesh
  (:func:`~mclandscape.engine.distributed.training_mesh`, as :func:`~mclandscape.engine.train.train_model`):
  batches split over the ``data`` axis, everything else replicated. Values brought to the host go through
  :func:`~mclandscape.engine.distributed.to_host`, returned trees through
  :func:`~mclandscape.engine.distributed.local`, so the results are equal on every process.
- Progress and callbacks follow the engine's trainers: ``progress=None`` shows a tqdm bar only when stderr is
  a terminal, and the search's callback gets the 1-based count of search steps done.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from mclandscape.core.losses import LOSSES
from mclandscape.core.objective import call_objective, check_objective, make_objective
from mclandscape.core.tree import (
    PyTree,
    check_finite,
    check_same_structure,
    tree_add,
    tree_axpy,
    tree_cosine,
    tree_distance,
    tree_norm,
    tree_random_normal,
    tree_scale,
)
from mclandscape.engine import cpu, distributed
from mclandscape.engine.batches import BatchStream, batch_stream
from mclandscape.engine.checkpoint import CheckpointStore
from mclandscape.engine.distributed import training_mesh
from mclandscape.engine.loop import LoopConfig, NonFiniteError, StopRun, _progress_enabled, run
from mclandscape.engine.step import Step, make_step, merge_static, split_static
from mclandscape.methods.verification import (
    EndPointClusters,
    FlowDiagnostics,
    FlowSettings,
    VerificationResult,
    _check_real,
    output_distance,
    project,
    random_orthonormal_pair,
    verify_exit,
)

__all__ = [
    "READINGS",
    "RhoSchedule",
    "rho2_from_lr",
    "ExitDetector",
    "DetectorState",
    "LocalSolver",
    "DSPConfig",
    "ExitRecord",
    "TierResult",
    "initial_directions",
    "forward_step",
    "dsp_step",
    "local_solve",
    "dsp_search",
    "tier_by_tier",
    "exit_statistics",
    "model_loss_fn",
    "dataset_batches",
    "full_batch",
    # exit-point verification (mclandscape.methods.verification)
    "verify_exit",
    "VerificationResult",
    "EndPointClusters",
    "FlowSettings",
    "FlowDiagnostics",
    "output_distance",
    "random_orthonormal_pair",
    "project",
]

READINGS = ("additive", "growth", "literal")

Objective = Callable[[PyTree, Any, jax.Array | None], tuple[jax.Array, Any]]  # (params, batch, key) -> (loss, aux)

NEGATIVE_GRADIENT = optax.scale(-1.0)  # f = -grad c (DSP-TT paper, eq. 2 with R = I)
BatchFn = Callable[[int], Any]


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
    forward step uses ``rho1`` (module docstring): ``"additive"`` (default), ``"growth"`` or ``"literal"``.

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
        inc = _check_real(self.increment, "RhoSchedule.increment (rho1 increase per iteration)")
        rmax = _check_real(self.rho_max, "RhoSchedule.rho_max")
        r2 = _check_real(self.rho2, "RhoSchedule.rho2 (calibration step)")
        if inc <= 0:
            raise ValueError(f"RhoSchedule.increment must be > 0 so that rho1 grows from 0, got {inc}")
        if rmax <= 0:
            raise ValueError(f"RhoSchedule.rho_max must be > 0 (rho1 lies in (0, rho_max]), got {rmax}")
        if inc > rmax:
            raise ValueError(f"RhoSchedule.increment ({inc}) exceeds rho_max ({rmax}): rho1 would start above "
                             "its maximum")
        if r2 < 0:
            raise ValueError(f"RhoSchedule.rho2 must be >= 0 (a step size along f), got {r2}")
        if self.reading not in READINGS:
            raise ValueError(f"RhoSchedule.reading must be one of {READINGS}, got {self.reading!r}")

    def rho1(self, i: int) -> float:
        """``rho1(i) = min(increment * i, rho_max)`` for iteration ``i >= 1`` of a direction."""
        if isinstance(i, bool) or int(i) != i or i < 1:
            raise ValueError(f"rho1 is defined for iterations i >= 1 (integers), got {i!r}")
        return float(min(self.increment * int(i), self.rho_max))

    def rho2_at(self, i: int) -> float:
        """Calibration step ``rho2(i)`` (constant)."""
        if isinstance(i, bool) or int(i) != i or i < 1:
            raise ValueError(f"rho2 is defined for iterations i >= 1 (integers), got {i!r}")
        return float(self.rho2)


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
    lr = _check_real(tier0_lr, "tier0_lr")
    fr = _check_real(fraction, "fraction")
    if lr <= 0:
        raise ValueError(f"tier0_lr must be > 0, got {lr}")
    if fr <= 0:
        raise ValueError(f"fraction must be > 0, got {fr}")
    return lr * fr


# ---------------------------------------------------------------------------------------------------------
# exit detection (§3.2.1: moving average + up/down buffer)
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DetectorState:
    """Host-side state of one direction's exit detector (JSON-serialisable)."""

    count: int = 0
    ema: float | None = None
    base: float | None = None
    peak: float | None = None
    peak_iteration: int = 0
    phase: str = "start"  # "start" -> "up" (climbing) -> "exit"
    buffer: tuple[int, ...] = ()

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"buffer": list(self.buffer)}

    @classmethod
    def from_json(cls, d: dict) -> DetectorState:
        return cls(**(dict(d) | {"buffer": tuple(int(b) for b in d["buffer"])}))


@dataclasses.dataclass(frozen=True)
class ExitDetector:
    """Exit-point detector on noisy (mini-batch) losses along one search path (DSP-TT paper, §3.2.1).

    ``ema_decay`` beta: ``ema_i = beta * ema_{i-1} + (1 - beta) * loss_i`` (``ema_1 = loss_1``). Each iteration
    pushes ``+1`` (EMA rose) or ``-1`` (EMA fell or stayed) into a buffer of the last ``buffer_size`` states.
    Phase ``"start"`` becomes ``"up"`` when the full buffer holds at least ``vote * buffer_size`` ups and the
    EMA is ``min_rise`` above its first value; phase ``"up"`` becomes ``"exit"`` when the full buffer holds at
    least ``vote * buffer_size`` downs and the EMA has fallen at least ``min_drop`` (a fraction of the rise
    ``peak - base``) below its peak. ``min_rise`` and ``min_drop`` are this implementation's guards against
    mini-batch noise (the paper names none; 0 disables them): a noisy plateau produces short runs of EMA
    decreases, a crossing into a neighbouring stability region a sustained fall.

    Example:
      >>> det, state, fired = ExitDetector(ema_decay=0.0, buffer_size=3, vote=1.0), DetectorState(), []
      >>> for loss in [0, 1, 2, 3, 4, 3.5, 3, 2.5, 2]:  # a climb, then a steady fall
      ...     state, exited = det.update(state, loss)
      ...     fired.append(exited)
      >>> fired.index(True) + 1, state.peak_iteration  # the exit at iteration 8, the EMA peak at 5
      (8, 5)
    """

    ema_decay: float = 0.9
    buffer_size: int = 10
    vote: float = 0.8
    min_rise: float = 0.0
    min_drop: float = 0.0

    def __post_init__(self):
        b = _check_real(self.ema_decay, "ExitDetector.ema_decay")
        if not 0.0 <= b < 1.0:
            raise ValueError(f"ExitDetector.ema_decay must be in [0, 1), got {b}")
        if isinstance(self.buffer_size, bool) or int(self.buffer_size) != self.buffer_size or self.buffer_size < 1:
            raise ValueError(f"ExitDetector.buffer_size must be an integer >= 1, got {self.buffer_size!r}")
        v = _check_real(self.vote, "ExitDetector.vote")
        if not 0.5 < v <= 1.0:
            raise ValueError(f"ExitDetector.vote must be in (0.5, 1] (a majority of the buffer), got {v}")
        if _check_real(self.min_rise, "ExitDetector.min_rise") < 0:
            raise ValueError(f"ExitDetector.min_rise must be >= 0, got {self.min_rise}")
        if not 0.0 <= _check_real(self.min_drop, "ExitDetector.min_drop") < 1.0:
            raise ValueError(f"ExitDetector.min_drop must be a fraction in [0, 1), got {self.min_drop}")

    @property
    def needed(self) -> int:
        return int(math.ceil(self.vote * self.buffer_size - 1e-9))

    def update(self, state: DetectorState, loss: float) -> tuple[DetectorState, bool]:
        """Feed one loss; returns the new state and whether an exit was declared at this iteration."""
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"non-finite loss {loss} on the search path (iteration {state.count + 1}); the "
                             "search diverged - lower RhoSchedule.rho_max / increment or the calibration step")
        count = state.count + 1
        if state.ema is None:
            return DetectorState(count=count, ema=loss, base=loss, peak=loss, peak_iteration=count,
                                 phase="start", buffer=()), False
        ema = self.ema_decay * state.ema + (1.0 - self.ema_decay) * loss
        buffer = (state.buffer + (1 if ema > state.ema else -1,))[-self.buffer_size:]
        peak, peak_it = state.peak, state.peak_iteration
        if ema > peak:
            peak, peak_it = ema, count
        phase = state.phase
        full = len(buffer) == self.buffer_size
        exited = False
        if phase == "start":
            if full and buffer.count(1) >= self.needed and ema - state.base >= self.min_rise:
                phase = "up"
        elif phase == "up":
            fallen = peak - ema >= self.min_drop * (peak - state.base)
            if full and buffer.count(-1) >= self.needed and fallen:
                phase, exited = "exit", True
        return DetectorState(count=count, ema=ema, base=state.base, peak=peak, peak_iteration=peak_it,
                             phase=phase, buffer=buffer), exited


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
        update) is below ``grad_tol`` — checked after every step; meaningful with full batches. ``None``: run
        all ``steps``.
    """

    optimizer: optax.GradientTransformation
    steps: int
    batch_fn: BatchFn | None = None
    grad_tol: float | None = None

    def __post_init__(self):
        if isinstance(self.steps, bool) or int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"LocalSolver.steps must be an integer >= 1, got {self.steps!r}")
        if self.grad_tol is not None and _check_real(self.grad_tol, "LocalSolver.grad_tol") <= 0:
            raise ValueError(f"LocalSolver.grad_tol must be > 0 or None, got {self.grad_tol}")


@dataclasses.dataclass(frozen=True)
class DSPConfig:
    """Settings of one tier of DSP-TT search.

    ``num_directions``: search directions from the origin (5 in §5.2). ``init_norm``: Euclidean norm of the
    random initial directions. ``max_steps``: total search steps over all directions;
    ``max_iterations``: iterations of one direction before it is abandoned without exit (``None``: only
    ``max_steps``). ``record_path``: keep the last ``record_path`` points of each path (for
    :func:`verify_exit`; 0 keeps none). ``checkpoint_every``: also checkpoint the search state every that many
    steps (0: only at exits and solutions).
    """

    num_directions: int = 5
    rho: RhoSchedule = dataclasses.field(default_factory=RhoSchedule)
    detector: ExitDetector = dataclasses.field(default_factory=ExitDetector)
    init_norm: float = 1e-2
    max_steps: int = 10_000
    max_iterations: int | None = None
    record_path: int = 0
    checkpoint_every: int = 0

    def __post_init__(self):
        for name in ("num_directions", "max_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"DSPConfig.{name} must be an integer >= 1, got {v!r}")
        if self.max_iterations is not None and (int(self.max_iterations) != self.max_iterations
                                                or self.max_iterations < 1):
            raise ValueError(f"DSPConfig.max_iterations must be an integer >= 1 or None, got {self.max_iterations!r}")
        for name in ("record_path", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 0:
                raise ValueError(f"DSPConfig.{name} must be an integer >= 0, got {v!r}")
        if _check_real(self.init_norm, "DSPConfig.init_norm") <= 0:
            raise ValueError(f"DSPConfig.init_norm must be > 0, got {self.init_norm}")
        if not isinstance(self.rho, RhoSchedule):
            raise ValueError(f"DSPConfig.rho must be a RhoSchedule, got {type(self.rho).__name__}")
        if not isinstance(self.detector, ExitDetector):
            raise ValueError(f"DSPConfig.detector must be an ExitDetector, got {type(self.detector).__name__}")


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


# ---------------------------------------------------------------------------------------------------------
# search directions and one step
# ---------------------------------------------------------------------------------------------------------


def _float_dtype(tree: PyTree):
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    return np.dtype(jnp.result_type(*leaves)) if leaves else np.dtype(jnp.result_type(float))


def _direction_key(key: jax.Array, k: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(key, 0x7D1), k)


def initial_directions(key: jax.Array, origin: PyTree, num: int, norm: float = 1e-2) -> list[PyTree]:
    """``num`` random (standard-normal) initial directions shaped like ``origin``, each scaled to ``norm``.

    Args:
      key: a PRNG key (direction ``k`` depends on ``(key, k)`` only).
      origin: the pytree whose structure, shapes and dtypes the directions take.
      num: how many.
      norm: their Euclidean norm.

    Returns:
      A list of ``num`` pytrees.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> dirs = initial_directions(jax.random.key(0), {"w": jnp.zeros(4)}, 2, norm=0.5)
      >>> [round(float(tree_norm(d)), 4) for d in dirs]
      [0.5, 0.5]
    """
    if isinstance(num, bool) or int(num) != num or num < 1:
        raise ValueError(f"number of directions must be an integer >= 1, got {num!r}")
    if _check_real(norm, "norm") <= 0:
        raise ValueError(f"direction norm must be > 0, got {norm}")
    out = []
    for k in range(int(num)):
        d = tree_random_normal(_direction_key(key, k), origin)
        out.append(tree_scale(d, norm / tree_norm(d)))
    return out


def _check_directions(directions: Sequence[PyTree], origin: PyTree) -> None:
    if len(directions) == 0:
        raise ValueError("no search directions given (need at least one)")
    for k, d in enumerate(directions):
        check_same_structure(origin, d, names=("origin", f"direction[{k}]"))
        check_finite(d, f"direction[{k}]")
        n = float(tree_norm(d))
        if n == 0.0:
            raise ValueError(f"direction[{k}] is the zero vector: a search direction needs a nonzero norm")


def forward_step(direction: PyTree, rho1, reading: str = "additive") -> PyTree:
    """The forward search step of one reading of the DSP-TT paper's eq. 3 (module docstring).

    Args:
      direction: the current direction ``d``.
      rho1: the forward step of this iteration.
      reading: ``"additive"`` (``d + rho1 d / |d|``), ``"growth"`` (``(1 + rho1) d``) or ``"literal"``
        (``rho1 d``).

    Returns:
      The direction after the forward step.

    Example:
      >>> import jax.numpy as jnp
      >>> [float(x) for x in forward_step(jnp.array([3.0, 4.0]), 0.5)]  # half a unit further along d
      [3.299999952316284, 4.400000095367432]
    """
    if reading == "additive":
        return tree_axpy(rho1 / tree_norm(direction), direction, direction)
    if reading == "growth":
        return tree_scale(direction, 1.0 + rho1)
    if reading == "literal":
        return tree_scale(direction, rho1)
    raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")


def dsp_step(objective: Objective, calibration: optax.GradientTransformation, reading: str,
             direction: PyTree, cal_state, origin: PyTree, batch, rng, rho1, rho2):
    """One DSP iteration of one direction (DSP-TT paper, Algorithm 1 lines 7, 8, 13; eq. 3).

    Args:
      objective: ``objective(params, batch, key) -> (loss, aux)``.
      calibration: the dynamics ``f`` as an Optax gradient transformation (``f = calibration(grad)``).
      reading: the reading of eq. 3 (:data:`READINGS`).
      direction, cal_state: the direction ``d`` and its calibration state.
      origin: the tier's origin ``omega0``.
      batch, rng: the batch and the key passed to the objective.
      rho1, rho2: the forward and calibration steps of this iteration.

    Returns:
      ``(d_forward, d_calibrated, new_cal_state, loss)``: the direction after the forward step, after the
      calibration ``d_forward + rho2 * f(origin + d_forward)``, the new calibration state, and the objective's
      value at ``origin + d_forward`` on ``batch`` (used by the exit check).
    """
    fwd = forward_step(direction, rho1, reading)
    point = tree_add(origin, fwd)
    (loss, _), grads = jax.value_and_grad(functools.partial(call_objective, objective), has_aux=True)(
        point, batch, rng)
    f, new_state = calibration.update(grads, cal_state, point)
    cal = tree_axpy(rho2, f, fwd)
    return fwd, cal, new_state, loss


def _search_step_impl(objective_static, calibration, reading, mesh, objective_arrays, direction, cal_state,
                      origin, batch, key, t, rho1, rho2):
    objective = merge_static(objective_static, objective_arrays)
    fwd, cal, state, loss = dsp_step(objective, calibration, reading, direction, cal_state, origin, batch,
                                     jax.random.fold_in(key, t), rho1, rho2)
    # loss and |d| in their own (promoted) dtype: float64 parameters keep float64 losses for the exit check
    out = fwd, cal, state, jnp.stack([loss, tree_norm(fwd)])
    if mesh is not None:  # the batch was split over the mesh's data axis: one result, the same on every device
        out = jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P()))
    return out


# one module-level jit: the objective's configuration, the calibration, the reading and the mesh are static
# (hashable), the objective's arrays, the direction, the step index and rho1 / rho2 are traced
_search_step_jit = jax.jit(_search_step_impl, static_argnames=("objective_static", "calibration", "reading", "mesh"),
                           compiler_options=cpu.COMPILER_OPTIONS)


def _search_step(objective, calibration, reading, direction, cal_state, origin, batch, key, t, rho1, rho2,
                 layout: Step | None = None):
    # layout: an engine step on the data-parallel mesh, made once per search, whose place() splits the batch
    static, arrays = split_static(objective)
    mesh = None if layout is None else layout.mesh
    if mesh is not None:  # the engine's data-parallel layout (Step.place): batch split, everything else replicated
        arrays, direction, cal_state, origin, key, t, rho1, rho2 = distributed.put(
            (arrays, direction, cal_state, origin, key, t, rho1, rho2), NamedSharding(mesh, P()))
        batch = layout.place(batch)
    return _search_step_jit(objective_static=static, calibration=calibration, reading=reading, mesh=mesh,
                            objective_arrays=arrays, direction=direction, cal_state=cal_state, origin=origin,
                            batch=batch, key=key, t=t, rho1=rho1, rho2=rho2)


# ---------------------------------------------------------------------------------------------------------
# devices (the engine's data-parallel training mesh)
# ---------------------------------------------------------------------------------------------------------


def _check_devices(devices) -> int | None:
    """``devices`` validated: ``None`` (all of the job's devices) or an integer in ``[1, jax.device_count()]``."""
    if devices is None:
        return None
    if isinstance(devices, bool) or not isinstance(devices, int | np.integer):
        raise ValueError(f"devices must be None (all devices of the job) or an integer >= 1, got {devices!r}")
    available = jax.device_count()
    if not 1 <= int(devices) <= available:
        raise ValueError(f"devices={int(devices)} but the job has {available} device(s) (jax.device_count()); "
                         f"give 1..{available}, or None for all of them")
    return int(devices)


def _batch_mesh(batch, devices: int | None) -> jax.sharding.Mesh | None:
    """The engine's training mesh (:func:`~mclandscape.engine.distributed.training_mesh`) for batches like
    ``batch``: its size is the leading dimension of the batch's first leaf; ``None`` (one device) for one device
    or a batch without an array leading it (``None``, scalars, non-array leaves)."""
    devices = _check_devices(devices)
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves or not isinstance(leaves[0], jax.Array | np.ndarray) or np.ndim(leaves[0]) == 0:
        return None
    size = int(np.shape(leaves[0])[0])
    return training_mesh(size, devices=devices) if size >= 1 else None


def _replicator(mesh: jax.sharding.Mesh | None) -> Callable[[PyTree], PyTree]:
    """``tree -> tree`` replicated over ``mesh`` (global arrays across processes); the identity without a mesh."""
    if mesh is None:
        return lambda tree: tree
    rep = NamedSharding(mesh, P())
    return lambda tree: distributed.put(tree, rep)


def local_solve(objective: Objective, params: PyTree, solver: LocalSolver, batch_fn: BatchFn, key: jax.Array, *,
                progress: bool | None = None, devices: int | None = None) -> tuple[PyTree, dict]:
    """Run the local solver from ``params`` (an exit point) on the engine's loop.

    :func:`~mclandscape.engine.loop.make_step` of ``objective`` and ``solver.optimizer``, run by
    :func:`~mclandscape.engine.loop.run` for at most ``solver.steps`` steps over ``solver.batch_fn or
    batch_fn`` (batch ``t`` at step ``t``, dropout key ``fold_in(key, t)``). Each step is one loop *epoch*
    (``steps_per_epoch=1``) on purpose: the loop looks at its callbacks only at epoch ends, and the stopping
    test of ``solver.grad_tol`` is per step — a callback ends the run (``StopRun``) after the first step whose
    gradient norm is below it. So the history, the progress bar and ``info["steps"]`` count steps.

    With several devices the steps run data-parallel as :func:`mclandscape.engine.train.train_model`'s do:
    ``make_step(..., mesh=training_mesh(batch_size, devices=devices))``, each batch split over the mesh's
    ``data`` axis (``batch_size`` the leading dimension of the first leaf of batch 0), the state replicated, one
    update the same on every device; the result equals one device's up to the order of the gradient's
    reduction. Batches without an array leading them (``None``, scalars) run on one device.

    Args:
      objective: ``objective(params, batch, key) -> (loss, aux)``.
      params: the starting point.
      solver: a :class:`LocalSolver`.
      batch_fn: the batches when ``solver.batch_fn`` is ``None``.
      key: the base key of the steps.
      progress: a tqdm bar over the steps (``None``: only when stderr is a terminal, as every trainer).
      devices: how many of the job's devices to train on (default all, across processes; ``1``: one device).

    Returns:
      ``(solution, info)``: ``solution`` a process-local value (replicated arrays on this process's devices, as
      :func:`~mclandscape.engine.loop.run` returns them); ``info``: ``steps`` (steps run), ``loss`` (the
      objective's value on the last step's batch, at the parameters before its update), ``task_loss`` (the
      task loss the objective reports in ``aux["loss"]``, without L2; equal to ``loss`` when it reports none)
      and ``grad_norm`` (of that step).

    Raises:
      NonFiniteError: the loss or the gradient became non-finite (the solver diverged).
      ValueError: a bad ``solver``, ``batch_fn`` or ``devices``, or an objective off the protocol.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mclandscape.core.objective import function_objective
      >>> obj = function_objective(lambda p, b: 0.5 * jnp.sum(p ** 2))  # gradient norm halves every step
      >>> sol, info = local_solve(obj, jnp.array([0.6, 0.8]), LocalSolver(optax.sgd(0.5), 100, grad_tol=0.01),
      ...                         lambda t: None, jax.random.key(0), progress=False)
      >>> info["steps"], [round(float(x), 5) for x in sol]  # stopped after step 8: 0.5**7 < 0.01
      (8, [0.00234, 0.00313])
    """
    if not isinstance(solver, LocalSolver):
        raise ValueError(f"solver must be a LocalSolver, got {type(solver).__name__}")
    batches = solver.batch_fn or batch_fn
    if not callable(batches):
        raise ValueError(f"batch_fn must be a callable t -> batch, got {batches!r}")
    _check_devices(devices)
    first = batches(0)
    check_objective(objective, params, first, key)
    step = make_step(objective, solver.optimizer, mesh=_batch_mesh(first, devices))
    tol = solver.grad_tol

    def converged(epoch, state, history):
        if tol is not None and history[-1]["grad_norm"] < tol:
            raise StopRun

    def record(epoch, state, raw):  # the few numbers kept per step
        return {"loss": raw["objective"], "task_loss": raw.get("loss", raw["objective"]),
                "grad_norm": raw["grad_norm"]}

    try:
        res = run(step, step.init(params), batches, epochs=solver.steps, steps_per_epoch=1, key=key,
                  config=LoopConfig(progress=progress, desc="local solve"), callbacks=[converged], on_epoch=record)
    except NonFiniteError as e:
        raise NonFiniteError(f"the local solver diverged ({e}); lower its learning rate") from e
    last = res.history[-1]
    return res.params, {"steps": len(res.history), "loss": last["loss"], "task_loss": last["task_loss"],
                        "grad_norm": last["grad_norm"]}


# ---------------------------------------------------------------------------------------------------------
# checkpointing of a search (resume)
# ---------------------------------------------------------------------------------------------------------


def _named(tree: PyTree) -> dict:
    """``{"l0": leaf0, "l1": leaf1, ...}`` — a checkpoint-friendly flat view of any pytree."""
    return {f"l{j}": jnp.asarray(x) for j, x in enumerate(jax.tree_util.tree_leaves(tree))}


def _from_named(like: PyTree, named: dict) -> PyTree:
    leaves, treedef = jax.tree_util.tree_flatten(like)
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(named[f"l{j}"]) for j in range(len(leaves))])


def _fingerprint(origin: PyTree, config: DSPConfig, tier: int) -> str:
    leaves = jax.tree_util.tree_leaves(origin)
    sums = [float(np.sum(np.asarray(x, dtype=np.float64))) for x in leaves]
    return json.dumps({"tier": tier, "num_directions": config.num_directions,
                       "rho": dataclasses.asdict(config.rho), "detector": dataclasses.asdict(config.detector),
                       "shapes": [list(np.shape(x)) for x in leaves], "sums": [round(s, 6) for s in sums]},
                      sort_keys=True)


# ---------------------------------------------------------------------------------------------------------
# one tier of search (Algorithm 1)
# ---------------------------------------------------------------------------------------------------------


def dsp_search(
    objective: Objective,
    origin: PyTree,
    key: jax.Array,
    *,
    config: DSPConfig,
    batch_fn: BatchFn,
    solver: LocalSolver,
    calibration: optax.GradientTransformation | None = None,
    directions: Sequence[PyTree] | None = None,
    checkpoint_dir: str | None = None,
    tier: int = 1,
    callback: Callable[[int, dict], None] | None = None,
    progress: bool | None = None,
    devices: int | None = None,
) -> TierResult:
    """One tier of DSP-TT search from ``origin`` (DSP-TT paper, Algorithm 1 with eq. 3).

    With ``checkpoint_dir`` the state is saved at every exit point, every solution and every
    ``config.checkpoint_every`` steps (only the latest state is kept: directions, calibration states, detector
    states, traces, exits and every solution found), and an existing checkpoint there is resumed — a killed
    search restarted with the same arguments ends with the same result as an uninterrupted one (recorded
    ``paths`` restart empty).

    With several devices (``devices``, default all of the job's, across processes) the search step and the
    local solves run data-parallel on the engine's training mesh
    (:func:`~mclandscape.engine.distributed.training_mesh` of the batch size, the leading dimension of the
    first leaf of ``batch_fn(0)``; the local solves take theirs from their own batches): each batch is split
    over the mesh's ``data`` axis, the direction, the origin and the calibration state are replicated, and
    every device computes the same step. The numbers equal one device's up to the order of the loss and
    gradient reductions; ``devices=1``, or batches without an array leading them (``None``, scalars), keep
    the single-device path. Everything returned (solutions, exit points, paths, the callback's ``d``) is a
    process-local value (:func:`mclandscape.engine.distributed.local`) and every number a host value, equal on
    every process of a multi-process job.

    Args:
      objective: ``objective(params, batch, key) -> (loss, aux)`` (:mod:`mclandscape.core.objective`); its
        value on the mini-batch ``batch_fn(t)`` of global step ``t`` (key ``fold_in(key', t)``) is what the
        exit detector sees and the calibration differentiates.
      origin: the tier-0 (or tier-n) solution ``omega0``.
      key: drives the random initial directions, the choice of direction per step and the objective's keys.
      config: a :class:`DSPConfig`.
      batch_fn: the search's batches ``t -> batch`` (random access: resuming replays nothing).
      solver: the :class:`LocalSolver` run from every exit point (:func:`local_solve`).
      calibration: the dynamics ``f`` (an Optax gradient transformation returning the descent direction at
        unit step), default ``optax.scale(-1.0)`` i.e. ``f = -grad`` (DSP-TT paper, eq. 2 with ``R = I``).
      directions: overrides the ``config.num_directions`` random initial directions.
      checkpoint_dir: where the search checkpoints and resumes (``None``: no checkpoints).
      tier: the tier number (recorded, and part of the checkpoint's fingerprint).
      callback: ``callback(count, info)`` after every search step, ``count`` the number of search steps done
        (1-based, counting the steps before a resume: the first call gets 1, the last ``result.steps``), as
        every trainer's callback counts. ``info``: ``step`` (the 0-based global index of the step just done,
        ``count - 1``, the numbering of ``ExitRecord.step`` and of the traces), tier, direction, iteration (of
        that direction), loss, ema, rho1, norm, exited, ``d`` (the direction after the forward step, so
        ``origin + d`` is the point whose loss was checked). It runs after the exit's local solve, if any.
      progress: a tqdm bar over the search steps, passed on to the local solves (``None``: only when stderr is
        a terminal, as every trainer).
      devices: how many of the job's devices the search step and the local solves use (default all, across
        processes; ``1``: one device).

    Returns:
      A :class:`TierResult`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mclandscape.core.objective import function_objective
      >>> from mclandscape.methods.potentials import double_well
      >>> cfg = DSPConfig(num_directions=1, rho=RhoSchedule(2e-2, 1.0, 0.01), detector=ExitDetector(0.5, 3, 1.0),
      ...                 max_steps=100)
      >>> res = dsp_search(function_objective(double_well), jnp.array([-1.0, 0.0]), jax.random.key(0), config=cfg,
      ...                  batch_fn=lambda t: None, solver=LocalSolver(optax.sgd(0.1), 100, grad_tol=1e-4),
      ...                  directions=[jnp.array([0.1, 0.02])])
      >>> len(res.exits), [round(float(x), 3) for x in res.solutions[0]]  # from (-1, 0) to the other well
      (1, [1.0, 0.0])
    """
    if not isinstance(config, DSPConfig):
        raise ValueError(f"config must be a DSPConfig, got {type(config).__name__}")
    if not isinstance(solver, LocalSolver):
        raise ValueError(f"solver must be a LocalSolver, got {type(solver).__name__}")
    if not callable(objective):
        raise ValueError(f"objective must be callable (params, batch, key) -> (loss, aux), got {objective!r}")
    if not callable(batch_fn):
        raise ValueError(f"batch_fn must be a callable t -> batch, got {batch_fn!r}")
    _check_devices(devices)
    check_finite(origin, "origin")
    calibration = calibration if calibration is not None else NEGATIVE_GRADIENT
    if not isinstance(calibration, optax.GradientTransformation):
        raise ValueError(f"calibration must be an optax GradientTransformation, got {type(calibration).__name__}")
    generated = directions is None
    if generated:
        dirs = initial_directions(key, origin, config.num_directions, config.init_norm)
    else:
        dirs = list(directions)
        _check_directions(dirs, origin)
    num = len(dirs)
    rho, det = config.rho, config.detector
    cal_states = [calibration.init(tree_add(origin, d)) for d in dirs]
    # with a mesh, the search's own arrays live on it (global, replicated) between steps; what leaves the
    # search (callback, result, local solves) is made process-local with distributed.local
    mesh = _batch_mesh(batch_fn(0), devices)
    layout = None if mesh is None else make_step(objective, NEGATIVE_GRADIENT, mesh=mesh)
    place = _replicator(mesh)
    origin_p = place(origin)
    dirs, cal_states = [place(d) for d in dirs], [place(c) for c in cal_states]
    detectors = [DetectorState() for _ in range(num)]
    active = [True] * num
    traces = [{k: [] for k in ("iteration", "step", "loss", "ema", "rho1", "norm")} for _ in range(num)]
    exits: list[ExitRecord] = []
    solutions: list[PyTree] = []
    failed: list[int] = []
    paths = [collections.deque(maxlen=config.record_path) for _ in range(num)] if config.record_path else []
    pending: dict | None = None  # exit found, solution not yet computed
    t = 0
    loss_key = jax.random.fold_in(key, 0x5EA)
    solver_key = jax.random.fold_in(key, 0x501)
    sel_seed = int(jax.random.randint(jax.random.fold_in(key, 0x5E1), (), 0, 2**31 - 1))
    fingerprint = _fingerprint(origin, config, tier)
    dtype = _float_dtype(origin)  # rho1 and rho2 enter the step in the parameters' dtype

    def state_tree() -> dict:
        tree = {}
        for k in range(num):
            tree[f"dir{k}"] = _named(dirs[k])
            if jax.tree_util.tree_leaves(cal_states[k]):
                tree[f"cal{k}"] = _named(cal_states[k])
        for j, sol in enumerate(solutions):
            tree[f"sol{j}"] = _named(place(sol))
        if pending is not None:
            tree["pending"] = _named(place(pending["point"]))
        return tree

    store = None
    if checkpoint_dir is not None:
        store = CheckpointStore(checkpoint_dir, create=True)

    def save(kind: str):
        if store is None:
            return
        meta = {
            "kind": kind, "fingerprint": fingerprint, "t": t, "active": active, "failed": failed,
            "detectors": [d.to_json() for d in detectors], "traces": traces,
            "exits": [e.to_json() for e in exits], "num_solutions": len(solutions),
            "pending": None if pending is None else {k: v for k, v in pending.items() if k != "point"},
        }
        store.save(t, state_tree(), meta, overwrite=True)
        for old in store.all_steps():
            if old != t:
                store.delete(old)

    def host_float(x) -> float:  # a (possibly global) scalar as a host float, equal on every process
        return float(distributed.to_host(x))

    def _search_loop(bar) -> TierResult:
        nonlocal pending, t, active

        def solve_pending():
            nonlocal pending
            rec = ExitRecord(**pending["record"])
            sol, info = local_solve(objective, pending["point"], solver, batch_fn,
                                    jax.random.fold_in(solver_key, rec.direction), progress=progress,
                                    devices=devices)
            sol_p = place(sol)
            rec = dataclasses.replace(
                rec, solution_loss=info["loss"], solver_steps=info["steps"],
                solution_distance=host_float(tree_distance(sol_p, origin_p)),
                exit_to_solution=host_float(tree_distance(sol_p, place(pending["point"]))))
            solutions.append(sol)
            exits.append(rec)
            pending = None
            save("solution")

        if pending is not None:
            solve_pending()

        while any(active) and t < config.max_steps:
            idx = [k for k in range(num) if active[k]]
            k = idx[int(np.random.default_rng([sel_seed, t]).integers(len(idx)))]
            i = detectors[k].count + 1
            rho1, rho2 = rho.rho1(i), rho.rho2_at(i)
            fwd, cal, cstate, scalars = _search_step(objective, calibration, rho.reading, dirs[k], cal_states[k],
                                                     origin_p, batch_fn(t), loss_key, np.int32(t),
                                                     np.asarray(rho1, dtype), np.asarray(rho2, dtype), layout=layout)
            loss, norm = (float(v) for v in distributed.to_host(scalars))
            fwd_local = distributed.local(fwd)
            state, exited = det.update(detectors[k], loss)
            detectors[k] = state
            tr = traces[k]
            for name, v in (("iteration", i), ("step", t), ("loss", loss), ("ema", state.ema), ("rho1", rho1),
                            ("norm", norm)):
                tr[name].append(v)
            if paths:
                paths[k].append((i, fwd_local))
            t += 1
            if exited:
                if generated:
                    d0 = initial_directions(key, origin, k + 1, config.init_norm)[k]
                else:
                    d0 = directions[k]
                record = ExitRecord(direction=k, step=t - 1, iteration=i, rho1=rho1, distance=norm, loss=loss,
                                    ema=state.ema, base_ema=state.base, peak_ema=state.peak,
                                    peak_iteration=state.peak_iteration,
                                    cosine_to_initial=host_float(tree_cosine(fwd, place(d0))))
                active[k] = False
                dirs[k] = fwd
                pending = {"record": record.to_json(), "point": distributed.local(tree_add(origin_p, fwd))}
                save("exit")
                solve_pending()
            else:
                dirs[k], cal_states[k] = cal, cstate
                if config.max_iterations is not None and i >= config.max_iterations:
                    active[k] = False
                    failed.append(k)
                if config.checkpoint_every and t % config.checkpoint_every == 0:
                    save("periodic")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}", exits=len(exits), active=sum(active))
            if callback is not None:  # the count of steps done (1-based); info["step"] the 0-based index
                callback(t, {"step": t - 1, "direction": k, "iteration": i, "loss": loss, "ema": state.ema,
                             "rho1": rho1, "norm": norm, "exited": exited, "d": fwd_local, "tier": tier})
        if any(active):
            failed.extend(k for k in range(num) if active[k] and k not in failed)
            active = [False] * num
            save("end")
        return TierResult(origin=origin, solutions=solutions, exits=exits, traces=traces, failed=sorted(failed),
                          steps=t, paths=[list(p) for p in paths],
                          exit_points=[distributed.local(tree_add(origin_p, dirs[e.direction])) for e in exits])

    try:
        if store is not None and store.latest_step() is not None:
            meta = store.metadata()
            if meta.get("fingerprint") != fingerprint:
                raise ValueError(f"checkpoint in {checkpoint_dir!r} belongs to a different search (origin, "
                                 "tier or configuration differ); use a fresh directory")
            solutions = [origin] * int(meta["num_solutions"])
            if meta["pending"] is not None:
                pending = {"point": origin}
            tree, _ = store.restore(target=state_tree())
            dirs = [place(_from_named(dirs[k], tree[f"dir{k}"])) for k in range(num)]
            cal_states = [place(_from_named(cal_states[k], tree[f"cal{k}"])) if f"cal{k}" in tree
                          else cal_states[k] for k in range(num)]
            solutions = [distributed.local(_from_named(origin, tree[f"sol{j}"])) for j in range(len(solutions))]
            t = int(meta["t"])
            active = [bool(a) for a in meta["active"]]
            failed = [int(f) for f in meta["failed"]]
            detectors = [DetectorState.from_json(d) for d in meta["detectors"]]
            traces = meta["traces"]
            exits = [ExitRecord(**e) for e in meta["exits"]]
            if meta["pending"] is not None:
                pending = dict(meta["pending"]) | {"point": distributed.local(_from_named(origin, tree["pending"]))}
        bar = tqdm(total=config.max_steps, initial=t, disable=not _progress_enabled(progress), leave=False,
                   desc=f"DSP-TT tier {tier}", unit="step", dynamic_ncols=True)
        try:
            return _search_loop(bar)
        finally:
            bar.close()
    finally:
        if store is not None:
            store.close()



# ---------------------------------------------------------------------------------------------------------
# tier-by-tier search (§5.2)
# ---------------------------------------------------------------------------------------------------------


def tier_by_tier(
    objective: Objective,
    origin: PyTree,
    key: jax.Array,
    *,
    config: DSPConfig,
    batch_fn: BatchFn,
    solver: LocalSolver,
    score_fn: Callable[[PyTree], float],
    tiers: int = 2,
    calibration: optax.GradientTransformation | None = None,
    checkpoint_dir: str | None = None,
    callback: Callable[[int, dict], None] | None = None,
    progress: bool | None = None,
    devices: int | None = None,
) -> list[TierResult]:
    """Tier-by-tier DSP-TT (DSP-TT paper, §5.2): tier 1 from ``origin``; tier ``n+1`` from the best tier-``n``
    solution, the one with the lowest ``score_fn(params)`` (e.g. loss on the training or a validation set).

    Each tier is a :func:`dsp_search` (same ``objective``, ``config``, ``batch_fn``, ``solver``,
    ``calibration``, ``callback``, ``progress``, ``devices``; key ``fold_in(key, n)``) that checkpoints into
    ``checkpoint_dir/tier<n>`` and resumes from there.

    Args:
      objective: ``objective(params, batch, key) -> (loss, aux)``.
      origin: the tier-0 solution.
      key: the base key (tier ``n`` searches with ``fold_in(key, n)``).
      config: the :class:`DSPConfig` of every tier.
      batch_fn: the search's batches ``t -> batch``.
      solver: the :class:`LocalSolver` of every exit point.
      score_fn: ``score_fn(params) -> float``; the lowest-scoring solution of a tier is the next tier's origin
        (its value is brought to the host with ``float``).
      tiers: how many tiers (``>= 1``).
      calibration: the dynamics ``f`` (default ``-grad``), as for :func:`dsp_search`.
      checkpoint_dir: the root of the tiers' checkpoint directories (``None``: no checkpoints).
      callback: ``callback(count, info)`` after every search step of every tier; ``count`` is 1-based within
        a tier's search and ``info["tier"]`` names the tier (:func:`dsp_search`).
      progress: a tqdm bar over each tier's search steps and its local solves (``None``: only when stderr is a
        terminal).
      devices: how many of the job's devices to run on (default all, across processes; ``1``: one device).

    Returns:
      One :class:`TierResult` per tier.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mclandscape.core.objective import function_objective
      >>> from mclandscape.methods.potentials import double_well
      >>> cfg = DSPConfig(num_directions=2, rho=RhoSchedule(2e-2, 0.1, 0.01), detector=ExitDetector(0.5, 3, 1.0),
      ...                 init_norm=0.1, max_steps=200)
      >>> tiers = tier_by_tier(function_objective(double_well), jnp.array([-1.0]), jax.random.key(0), config=cfg,
      ...                      batch_fn=lambda t: None, solver=LocalSolver(optax.sgd(0.05), 200),
      ...                      score_fn=lambda p: -float(p[0]), tiers=2)  # tier 2 from the solution of largest x
      >>> len(tiers), [round(float(x), 2) for x in tiers[1].origin]
      (2, [1.0])
    """
    if isinstance(tiers, bool) or int(tiers) != tiers or tiers < 1:
        raise ValueError(f"tiers must be an integer >= 1, got {tiers!r}")
    _check_devices(devices)
    results: list[TierResult] = []
    start = origin
    for n in range(1, int(tiers) + 1):
        sub = None if checkpoint_dir is None else f"{checkpoint_dir}/tier{n}"
        res = dsp_search(objective, start, jax.random.fold_in(key, n), config=config, batch_fn=batch_fn,
                         solver=solver, calibration=calibration, checkpoint_dir=sub, tier=n, callback=callback,
                         progress=progress, devices=devices)
        results.append(res)
        if n == tiers:
            break
        if not res.solutions:
            raise ValueError(f"tier {n} found no exit point in {res.steps} steps, so tier {n + 1} has no "
                             "origin; raise DSPConfig.max_steps or rho_max")
        scores = [float(score_fn(s)) for s in res.solutions]
        start = res.solutions[int(np.argmin(scores))]
    return results


def exit_statistics(result: TierResult) -> dict:
    """Summary of a tier's exits (DSP-TT paper, §5.4 quantities): counts, iterations / rho1 / distance at exit."""
    its = [e.iteration for e in result.exits]
    out = {"directions": len(result.traces), "exits": len(result.exits), "failed": list(result.failed),
           "search_steps": result.steps}
    for name, vals in (("iterations", its), ("rho1", [e.rho1 for e in result.exits]),
                       ("distance", [e.distance for e in result.exits]),
                       ("solution_distance", [e.solution_distance for e in result.exits]),
                       ("cosine_to_initial", [e.cosine_to_initial for e in result.exits])):
        out[f"mean_{name}"] = float(np.mean(vals)) if vals else None
    out["per_exit"] = [e.to_json() for e in result.exits]
    return out


# ---------------------------------------------------------------------------------------------------------
# models and data
# ---------------------------------------------------------------------------------------------------------


def model_loss_fn(model, variables: PyTree, *, train: bool | None = None, loss: str | Callable = "cross_entropy",
                  l2: float = 0.0) -> Objective:
    """The objective ``objective(params, (x, y), key) -> (loss, aux)`` of ``model`` with its other variable
    collections held fixed: :func:`mclandscape.core.objective.make_objective` (``key`` is the dropout key).

    Args:
      model: a :class:`~mclandscape.engine.models.base.Model`.
      variables: the model's variables; every collection but ``"params"`` is held fixed.
      train: apply the model in train mode (batch statistics, dropout with ``key``); default: whether the
        model has BatchNorm.
      loss: ``"cross_entropy"`` (softmax cross-entropy with integer labels), ``"mse_onehot"`` (squared error of
        the outputs against one-hot targets, summed over classes and averaged over examples — a loss with
        finite minima on separable data, where cross-entropy's infimum lies at infinity), ``"mse"`` or a
        per-example callable ``(outputs, y) -> [N]``.
      l2: adds ``l2 / 2 * |params|^2`` to the value (which also makes the minima isolated and finite);
        ``aux["loss"]`` is the task loss without it.

    Returns:
      An :class:`~mclandscape.core.objective.Objective` (a pytree: a new one from the same model and loss
      reuses the compiled search and solver steps).
    """
    if isinstance(loss, str) and loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)} or a per-example callable, got {loss!r}")
    if not isinstance(loss, str) and not callable(loss):
        raise ValueError(f"loss must be a name or a per-example callable (outputs, y) -> [N], got {loss!r}")
    return make_objective(model, loss, l2=_check_real(l2, "l2"), train=train, variables=variables)


def dataset_batches(ds, batch_size: int, *, seed: int = 0, augment: bool = False) -> BatchStream:
    """A resumable mini-batch stream ``t -> (x, y)`` over epochs of ``ds``:
    :func:`mclandscape.engine.data.batch_stream` (full batches only, reshuffled per epoch from ``seed``), so
    batch ``t`` depends only on ``(seed, t)``; ``.steps_per_epoch`` is the number of batches per epoch."""
    return batch_stream(ds, batch_size, seed=seed, augment=augment, drop_last=True)


def full_batch(ds) -> BatchFn:
    """The whole dataset ``(x, y)`` as one batch at every step (full-gradient DSP-TT, DSP-TT paper, Figure 3a);
    ``.steps_per_epoch`` is 1.

    The batch is the dataset in its stored order, one constant pair of device arrays (not a
    :func:`~mclandscape.engine.data.batch_stream` of one batch per epoch, which would reshuffle — and copy —
    the whole set at every step and change the order of the loss's reduction from step to step)."""
    if not hasattr(ds, "x") or not hasattr(ds, "y"):
        raise ValueError(f"full_batch needs a Dataset (with .x and .y), got {type(ds).__name__}")
    if len(ds.x) == 0:
        raise ValueError("full_batch of an empty dataset")
    batch = (jnp.asarray(ds.x), jnp.asarray(ds.y))

    def get(t: int):
        return batch

    get.steps_per_epoch = 1  # type: ignore[attr-defined]
    return get
