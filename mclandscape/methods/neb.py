"""Nudged Elastic Band between two points of parameter space, on the engine's step and loop.

Implements the NEB of Draxler, Veschgini, Salmhofer and Hamprecht, 2018 ("Essentially no barriers in neural
network energy landscape", ICML); the forces and the band's geometry are in
:mod:`mclandscape.methods.neb_forces`, AutoNEB in :mod:`mclandscape.methods.autoneb`. The curves of Garipov et
al., 2018 are in :mod:`mclandscape.methods.curves`.

**The band as an objective.** The pivots ``[N, ...]`` are the parameters of an objective
(:class:`BandObjective`, ``objective(pivots, batch, key) -> (loss, aux)``): its value is the total of the
pivot losses and its gradient, defined with ``jax.custom_vjp``, is the negated NEB force on the inner pivots
and zero on the ends, so each pivot costs one forward and one backward pass, the update
``w_i <- w_i + eta (F_L^perp_i + F_E^par_i)`` is plain SGD on it (Draxler et al. use SGD with momentum), and
the relaxation is one :func:`mclandscape.engine.loop.make_step` (any Optax transform, the ends frozen bit for
bit by the step's trainable mask, the non-finite guard) driven by :func:`mclandscape.engine.loop.run`.

**Inputs.** The pivot loss is an objective of the engine's protocol ``(params, batch, key) -> (loss, aux)``:
:func:`mclandscape.core.objective.make_objective` for a network (called with the step's key: dropout),
:func:`mclandscape.core.objective.function_objective` for an analytic potential. ``data`` is ``None``, a
fixed batch, or a batch stream ``t -> batch`` (:func:`mclandscape.engine.data.batch_stream`) read at the
global step ``t`` (AutoNEB's cycles continue one step count). The key of step ``t`` of a run starting at
global step ``s`` is ``fold_in(fold_in(key(seed), s), t)``; every pivot of a step sees the same batch and key.

**Stopping.** NEB stops when both ``F_L^perp`` and ``F_E^par`` vanish. One loop epoch is ``check_every``
steps (a run of ``steps`` not divisible by it ends with a shorter epoch, ``run(max_steps=)``); the objective
reports ``max_perp_force`` / ``max_par_force`` (largest norm over the inner pivots), the epoch record holds
their maxima over the epoch's steps, and a callback stops the run (``StopRun``) once both are below ``tol``
over a whole epoch in which the climbing image (if any) was on throughout. The climbing image switches on
after ``climb_after`` steps: every batch carries the flag (:class:`NEBBatch`), so both phases share one
compiled step. ``NEBResult.losses`` are the pivot losses of the returned band on the last step's batch and
key.

**Pivot strategies** (``NEBConfig.strategy``), all inside the one compiled step: ``"vmap"`` (``jax.vmap``
over pivots), ``"map"`` (``jax.lax.map``: one pivot's activations in memory at a time) and ``"unroll"`` (the
pivots written out one after another). ``"auto"`` is ``"unroll"`` on CPU for pivots holding a convolution
kernel (XLA's CPU convolutions run the differentiated per-pivot kernels of ``vmap`` slowly) and ``"vmap"``
otherwise; ``benchmarks/neb_step.py`` times them against a one-pivot-at-a-time loop.

Example:
    >>> import jax.numpy as jnp
    >>> from mclandscape.core.objective import function_objective
    >>> cfg = NEBConfig(steps=200, spring_constant=1.0, learning_rate=0.1, tol=1e-4)
    >>> flat = function_objective(lambda p, batch: jnp.sum(p ** 2) * 0.0)
    >>> res = neb(flat, jnp.array([0.0]), jnp.array([1.0]), init=jnp.array([[0.0], [0.2], [1.0]]), config=cfg)
    >>> round(float(res.pivots[1, 0]), 3), res.converged
    (0.5, True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mclandscape.core import _checks
from mclandscape.core.connectors import Connector
from mclandscape.core.objective import call_objective
from mclandscape.core.tree import PyTree, check_same_structure, tree_distance, tree_index
from mclandscape.engine import cpu, mapping
from mclandscape.engine.distributed import training_mesh
from mclandscape.engine.loop import LoopConfig, NonFiniteError, StopRun, run
from mclandscape.engine.optim import Transform, transform
from mclandscape.engine.points import map_points, stacked_points
from mclandscape.engine.step import Step, make_step
from mclandscape.methods.neb_forces import (
    _band_dtype,
    _check_ends,
    _normalised_spacing,
    _num_pivots,
    _rows,
    band_connector,
    neb_forces,
    straight_band,
)

__all__ = ["NEBConfig", "NEBResult", "NEBBatch", "BandObjective", "STRATEGIES", "make_neb_step", "neb"]

STRATEGIES = ("auto", "map", "vmap", "unroll")


@dataclasses.dataclass(frozen=True)
class NEBConfig:
    """Hyper-parameters of one NEB run.

    Args:
      steps: optimizer steps (>= 0).
      spring_constant: the spring's ``k`` (>= 0, finite).
      learning_rate, momentum: of the default optimizer ``optax.sgd(learning_rate, momentum)``.
      optimizer: any Optax transform instead: an :func:`mclandscape.engine.optim.transform` (keyed by value)
        or a built transform (keyed by identity: reuse one object to reuse the compiled step).
      tol: the run stops once the largest perpendicular and parallel force norms stay below ``tol`` for
        ``check_every`` steps (see the module docstring).
      climbing, climb_after: the climbing image, switched on after ``climb_after`` steps of the run.
      check_every: steps per loop epoch (one history record and one stopping check each).
      strategy: how the pivots' losses and gradients are computed (``STRATEGIES``; module docstring).

    Example:
        >>> cfg = NEBConfig(steps=100, spring_constant=0.5, climbing=True, climb_after=50)
        >>> cfg.check_every, cfg.make_optimizer() == NEBConfig(steps=5).make_optimizer()  # SGD named by value
        (10, True)
    """

    steps: int = 1000
    spring_constant: float = 1.0
    learning_rate: float = 0.01
    momentum: float = 0.9
    optimizer: optax.GradientTransformation | Transform | None = None
    tol: float = 1e-3
    climbing: bool = False
    climb_after: int = 0
    check_every: int = 10
    strategy: str = "auto"

    def __post_init__(self):
        for name, low in (("steps", 0), ("climb_after", 0), ("check_every", 1)):
            _checks.integer(getattr(self, name), name, low=low)
        for name in ("spring_constant", "tol", "momentum"):
            _checks.real(getattr(self, name), name, low=0.0, high=1.0 if name == "momentum" else None)
        if self.optimizer is None:
            _checks.real(self.learning_rate, "learning_rate", low=0.0, low_open=True)
        elif not isinstance(self.optimizer, optax.GradientTransformation | Transform):
            raise TypeError(f"optimizer must be an optax GradientTransformation, got {type(self.optimizer).__name__}")
        _checks.choice(self.strategy, "strategy", STRATEGIES)

    def make_optimizer(self) -> optax.GradientTransformation | Transform:
        """The run's Optax transform.

        Returns:
          ``optimizer``, or ``transform(optax.sgd, learning_rate, momentum=momentum or None)`` (equal for
          equal settings, so a second run compiles nothing).
        """
        if self.optimizer is not None:
            return self.optimizer
        return transform(optax.sgd, float(self.learning_rate), momentum=float(self.momentum) or None)


class _Band:
    """The pivots of a result that holds a ``band`` (a polychain connector)."""

    @property
    def pivots(self) -> PyTree:
        """The stacked pivots ``[N, ...]``."""
        return self.band.control

    @property
    def num_pivots(self) -> int:
        """N."""
        return self.band.num_control


@dataclasses.dataclass(frozen=True)
class NEBResult(_Band):
    """Outcome of :func:`neb`: the band as a polychain connector and the run's record.

    ``losses`` are the pivot losses of the returned band on the last step's batch (NaN after 0 steps);
    ``steps`` the steps taken; ``converged`` whether the stopping rule ended the run; ``perp_force`` /
    ``par_force`` the largest force norms over inner pivots and over the last record's steps; ``history``
    one record per loop epoch of ``check_every`` steps: ``epoch`` (from 1, as in every trainer; a shorter
    last epoch is numbered on), ``step`` (global, counted across AutoNEB cycles), ``max_loss``
    (highest pivot loss seen in those steps), ``mean_loss`` (mean pivot loss, averaged over them),
    ``perp_force``, ``par_force`` (their maxima), ``force_norm`` (mean norm of the total NEB force on the
    band) and ``seconds``. ``spacing`` are the target segment weights ``[N-1]`` (mean 1) the run used.
    :func:`neb`'s example shows one.
    """

    band: Connector
    losses: np.ndarray
    steps: int
    converged: bool
    perp_force: float
    par_force: float
    spacing: np.ndarray
    history: list[dict]


def _point_loss(params, point, batch, key):
    """The loss of one pivot under the objective ``point`` (protocol checked as it is traced)."""
    return call_objective(point, params, batch, key)[0]


# ---- the band as an objective -----------------------------------------------------------------------------

class NEBBatch(NamedTuple):
    """A batch of a NEB step.

    Attributes:
      data: the pivots' batch (``None``, a fixed pytree or a mini-batch).
      climb: whether the climbing image is on (a boolean scalar array: both phases share one compiled step).

    Example:
        >>> import jax.numpy as jnp
        >>> NEBBatch(None, jnp.asarray(True)).climb.dtype.name
        'bool'
    """

    data: Any
    climb: jax.Array


def _energies_grads(point, strategy: str, pivots: PyTree, data, key, mesh=None):
    """Losses of all N pivots ``[N]`` and loss gradients of the inner ones (stacked ``[N-2, ...]``).

    With a ``mesh`` whose ``"points"`` axis has several devices (``strategy="vmap"``), the inner pivots are
    split over that axis: each device computes whole pivots."""
    vg = lambda p: jax.value_and_grad(_point_loss)(p, point, data, key)  # noqa: E731
    value = lambda p: _point_loss(p, point, data, key)  # noqa: E731
    inner = _rows(pivots, slice(1, -1))
    if strategy != "unroll" and mesh is not None and mesh.shape.get("points", 1) > 1:
        inner = jax.lax.with_sharding_constraint(inner, NamedSharding(mesh, P("points")))
    ends = jax.tree_util.tree_map(lambda x: jnp.stack([x[0], x[-1]]), pivots)
    e_in, g = mapping.map_over(vg, inner, strategy)
    e_end = mapping.map_over(value, ends, "unroll" if strategy == "unroll" else "vmap")
    e = jnp.concatenate([e_end[:1], e_in, e_end[1:]])
    return e.astype(jnp.promote_types(e.dtype, jnp.float32)), g


def _band_eval(band: BandObjective, pivots: PyTree, batch: NEBBatch, key):
    """``(value, aux, -F)``: the band's value and aux, and the negated NEB force on all N pivots."""
    e, g = _energies_grads(band.point, band.strategy, pivots, batch.data, key, band.mesh)
    ci = jnp.where(batch.climb, 1 + jnp.argmax(e[1:-1]), -1)
    f = neb_forces(pivots, e, g, band.spring_constant, spacing=band.spacing, climbing_index=ci)
    neg = jax.tree_util.tree_map(
        lambda t: jnp.concatenate([jnp.zeros_like(t[:1]), -t, jnp.zeros_like(t[:1])]), f.total)
    aux = {"loss": jnp.mean(e), "max_loss": jnp.max(e), "max_perp_force": jnp.max(f.perp_norm),
           "max_par_force": jnp.max(f.par_norm), "pivot_losses": e, "count": jnp.ones((), e.dtype)}
    return jnp.sum(e), aux, neg


@jax.custom_vjp
def _band_loss(band, pivots, batch, key):
    value, aux, _ = _band_eval(band, pivots, batch, key)
    return value, aux


def _band_loss_fwd(band, pivots, batch, key):
    value, aux, neg = _band_eval(band, pivots, batch, key)
    return (value, aux), neg


def _band_loss_bwd(neg, cotangents):
    g_value = cotangents[0]
    return None, jax.tree_util.tree_map(lambda n: (g_value * n).astype(n.dtype), neg), None, None


_band_loss.defvjp(_band_loss_fwd, _band_loss_bwd)


@struct.dataclass(eq=False)  # holds arrays: hashed by identity, like a jax.Array
class BandObjective:
    """``objective(pivots, batch, key) -> (loss, aux)`` of a band: the engine's view of NEB.

    ``pivots`` are the N stacked pivots, ``batch`` a :class:`NEBBatch`. The value is the total of the N
    pivot losses on ``batch.data`` (the point objective called with ``key``); its gradient (a
    ``jax.custom_vjp``) is *not* the gradient of that total but the negated NEB force of
    :func:`neb_forces` on the inner pivots (climbing image on the highest inner pivot when ``batch.climb``)
    and zero on the two ends. So a gradient step is the NEB update, every pivot costs one forward and one
    backward pass, and :func:`mclandscape.engine.loop.make_step` runs it with any Optax transform.

    ``aux``: ``loss`` (mean pivot loss), ``max_loss`` (highest pivot loss), ``max_perp_force`` /
    ``max_par_force`` (largest force norms over the inner pivots; the loop's epoch record keeps their
    maxima over the epoch), ``pivot_losses`` (``[N]``) and ``count`` (1: one band per step, so the loop's
    epoch means are means over steps).

    Fields: ``point`` the pivot objective (``(params, batch, key) -> (loss, aux)``), ``spacing`` the
    target segment weights ``[N-1]``, ``spring_constant`` (a scalar array, so another ``k`` compiles
    nothing), the static ``strategy`` (``"vmap"``, ``"map"`` or ``"unroll"``) and the static
    ``mesh`` (``None``, or the ``("points", "data")`` mesh of :func:`make_neb_step`: with ``strategy="vmap"``
    the inner pivots are split over its ``"points"`` axis).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from mclandscape.core.objective import function_objective
        >>> band = BandObjective(point=function_objective(lambda p, b: jnp.sum(p ** 2)),
        ...                      spacing=jnp.ones(2), spring_constant=jnp.asarray(0.0))
        >>> piv, batch = jnp.array([[-1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), NEBBatch(None, jnp.asarray(False))
        >>> (value, aux), grad = jax.value_and_grad(band, has_aux=True)(piv, batch, None)
        >>> float(value), (grad + 0.0).tolist()  # -F: the middle pivot's gradient across the band; ends 0
        (3.0, [[0.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    """

    point: Callable
    spacing: jax.Array
    spring_constant: jax.Array
    strategy: str = struct.field(pytree_node=False, default="vmap")
    mesh: jax.sharding.Mesh | None = struct.field(pytree_node=False, default=None)

    def __call__(self, pivots, batch: NEBBatch, key=None):
        return _band_loss(self, pivots, batch, key)


def make_neb_step(objective: Callable, config: NEBConfig, pivots: PyTree, spacing=None, *,
                  mesh: jax.sharding.Mesh | None = None) -> Step:
    """The NEB update of a band shaped like ``pivots``, as an engine step.

    Args:
      objective: the pivot objective ``(params, batch, key) -> (loss, aux)`` (module docstring).
      config: a :class:`NEBConfig` (spring constant, optimizer, strategy).
      pivots: the stacked pivots ``[N, ...]`` (N >= 3), or a tree of ``jax.ShapeDtypeStruct`` like them:
        only their structure and N are used.
      spacing: target segment weights ``[N-1]`` (default equal).
      mesh: run the step on this ``("points", "data")`` mesh
        (:func:`mclandscape.engine.distributed.training_mesh` of the batch size and the ``N - 2`` inner
        pivots; across processes in a multi-process job): the inner pivots are split over ``"points"`` (the
        strategy is then ``"vmap"``, the split axis), each batch over ``"data"``, the band replicated, one
        update. ``None``: one device.

    Returns:
      ``make_step(BandObjective(...), config.make_optimizer(), trainable=inner pivots, mesh=mesh)``:
      ``step.init(pivots)`` and ``step(state, NEBBatch(data, climb), key) -> (state, metrics)`` (one
      module-level jit: a second band of the same shapes and objective compiles nothing).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from mclandscape.core.objective import function_objective
        >>> piv = jnp.array([0.0, 0.1, 1.0])  # three scalar pivots on a flat loss: only the spring acts
        >>> flat = function_objective(lambda p, b: 0.0 * p)
        >>> step = make_neb_step(flat, NEBConfig(learning_rate=0.5, momentum=0.0), piv)
        >>> state, metrics = step(step.init(piv), NEBBatch(None, jnp.asarray(False)), jax.random.key(0))
        >>> [round(v, 3) for v in state.params.tolist()], round(float(metrics["max_par_force"]), 3)
        ([0.0, 0.5, 1.0], 0.8)
    """
    n = _num_pivots(pivots)
    # the engine's resolver ("auto": the inner pivots differentiated together)
    strategy = mapping.resolve(config.strategy, n - 2, has_conv=cpu.has_conv(pivots, stacked=1), grad=True)[0]
    if not callable(objective) or any(callable(x) for x in jax.tree_util.tree_leaves(objective)):
        # a plain function is a leaf, not a pytree of arrays: say how to wrap it before JAX refuses it
        raise ValueError(f"objective must be an objective (params, batch, key) -> (loss, aux) of the engine "
                         f"(make_objective, or function_objective(fn) for a scalar fn(params, batch)), got "
                         f"{objective!r}")
    if mesh is not None:
        if "points" not in mesh.axis_names or (n - 2) % mesh.shape["points"]:
            raise ValueError(f"the mesh's 'points' axis must divide the {n - 2} inner pivots, got mesh shape "
                             f"{dict(mesh.shape)}")
        if mesh.shape["points"] > 1:
            strategy = "vmap"  # the inner pivots are split over devices along the vmapped axis
    dtype = _band_dtype(pivots)
    band = BandObjective(point=objective, spacing=_normalised_spacing(spacing, n - 1, dtype),
                         spring_constant=jnp.asarray(float(config.spring_constant), dtype), strategy=strategy, mesh=mesh)
    mask = jnp.asarray([False] + [True] * (n - 2) + [False])
    return make_step(band, config.make_optimizer(), trainable=jax.tree_util.tree_map(lambda _: mask, pivots), mesh=mesh)


# ---- the NEB run --------------------------------------------------------------------------------------

def _batch_at(data, step: int):
    return data(step) if callable(data) else data


def _band_mesh(pivots: PyTree, data, step_offset: int, devices: int | None):
    """The ``("points", "data")`` mesh of a band's step (``None``: one device), from its first batch's size."""
    if devices == 1 or (devices is None and len(jax.devices()) == 1):
        return None  # (reads no batch: a batch callable sees the steps in order on one device)
    leaves = jax.tree_util.tree_leaves(_batch_at(data, step_offset))
    lead = int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) else 1
    return training_mesh(lead, _num_pivots(pivots) - 2, devices=devices)


def _relax(point, pivots: PyTree, spacing, config: NEBConfig, data, *, step_offset: int, key: jax.Array,
           progress: bool | None, devices: int | None = None) -> NEBResult:
    """One NEB run on the engine loop: epochs of ``check_every`` steps, the last one shorter when ``steps``
    is not a multiple of it (see the module docstring)."""
    n = _num_pivots(pivots)
    step = make_neb_step(point, config, pivots, spacing, mesh=_band_mesh(pivots, data, step_offset, devices))
    climbing, after, tol, ce = bool(config.climbing), int(config.climb_after), float(config.tol), int(config.check_every)
    steps = int(config.steps)
    on, off = jnp.asarray(True), jnp.asarray(False)
    run_key = jax.random.fold_in(key, step_offset)

    def batches(t):
        return NEBBatch(_batch_at(data, step_offset + int(t)), on if climbing and t >= after else off)

    def record(e1, st, raw):
        return {"epoch": e1, "step": step_offset + min(e1 * ce, steps), "max_loss": raw["max_loss"],
                "mean_loss": raw["loss"], "perp_force": raw["max_perp_force"], "par_force": raw["max_par_force"],
                "force_norm": raw["grad_norm"], "seconds": raw["seconds"]}

    def stop(e1, st, hist):
        # both forces below tol over the whole epoch, never before the climbing image is on throughout
        r = hist[-1]
        if r["perp_force"] < tol and r["par_force"] < tol and (not climbing or (e1 - 1) * ce >= after):
            raise StopRun

    try:
        res = run(step, step.init(pivots), batches, epochs=-(-steps // ce), steps_per_epoch=ce, key=run_key,
                  max_steps=steps or None, config=LoopConfig(progress=progress, desc=f"NEB ({n} pivots)"),
                  callbacks=(stop,), on_epoch=record)
    except NonFiniteError as e:
        raise NonFiniteError(f"NEB diverged in the run from global step {step_offset}: {e} (lower the "
                             "learning rate or the spring constant)") from e
    done = int(res.state.step)
    losses = np.full(n, np.nan)
    if done:  # the pivot losses of the returned band on the last step's batch and key
        losses = map_points(_point_loss, stacked_points(res.state.params), point,
                            _batch_at(data, step_offset + done - 1), jax.random.fold_in(run_key, done - 1))
    last = res.history[-1] if res.history else {"perp_force": float("nan"), "par_force": float("nan")}
    return NEBResult(band=band_connector(res.state.params), losses=np.asarray(losses, np.float64), steps=done,
                     converged=res.stopped is not None, perp_force=last["perp_force"], par_force=last["par_force"],
                     spacing=np.asarray(step.objective.spacing, np.float64), history=res.history)


def neb(objective: Callable, start: PyTree, end: PyTree, *, num_pivots: int = 10, config: NEBConfig | None = None, data=None,
        init: PyTree | Connector | None = None, spacing=None, seed: int = 0, progress: bool | None = None,
        devices: int | None = None) -> NEBResult:
    """Relax a band of ``num_pivots`` pivots between ``start`` and ``end`` under the NEB forces.

    Args:
      objective: the pivot objective ``(params, batch, key) -> (loss, aux)``:
        :func:`~mclandscape.core.objective.make_objective` of a network (called with the step's key:
        dropout) or :func:`~mclandscape.core.objective.function_objective` of a potential.
      start, end: the fixed end points (same structure, finite, distinct).
      num_pivots: N (>= 3) when the band starts on the straight segment.
      config: a :class:`NEBConfig`.
      data: the batch: ``None``, a fixed pytree, or a batch stream ``step -> batch``
        (:func:`mclandscape.engine.data.batch_stream`).
      init: a band connector or stacked pivots whose ends equal ``start`` and ``end`` (default: the straight
        segment).
      spacing: target segment weights ``[N-1]`` (default equal).
      seed: the base key of the step keys (dropout).
      progress: a progress bar per run (``None``: when stderr is a terminal).
      devices: how many of the job's devices the band's step runs on (default all, across processes; ``1``:
        one device): the inner pivots are split over ``gcd(devices, N - 2)`` of them and each batch over the
        rest (:func:`make_neb_step`'s ``mesh``); the band equals one device's to float rounding.

    Returns:
      A :class:`NEBResult`.

    Raises:
      NonFiniteError: (a ``FloatingPointError``) the band diverged; no update after the last finite step.

    Example:
        >>> import jax.numpy as jnp
        >>> from mclandscape.core.objective import function_objective
        >>> bump = lambda p, batch: jnp.exp(-4.0 * (p[0] ** 2 + (p[1] + 0.2) ** 2))  # a hill below the segment
        >>> res = neb(function_objective(bump), jnp.array([-1.0, 0.0]), jnp.array([1.0, 0.0]), num_pivots=5,
        ...           config=NEBConfig(steps=200, learning_rate=0.05))
        >>> bool(res.losses.max() < 0.5 * float(bump(jnp.zeros(2), None))), bool(res.pivots[2, 1] > 0.1)
        (True, True)
    """
    config = config or NEBConfig()
    _check_ends(start, end)
    pivots = straight_band(start, end, num_pivots) if init is None else getattr(init, "control", init)
    check_same_structure(start, pivots, names=("start", "init"), leading_b=1)
    n = band_connector(pivots).num_control  # N >= 3
    for name, ref, i in (("start", start, 0), ("end", end, n - 1)):
        if float(tree_distance(tree_index(pivots, i), ref)) != 0.0:
            raise ValueError(f"init pivot {i} differs from {name}: the band's end pivots are fixed")
    if spacing is not None and np.shape(spacing) != (n - 1,):
        raise ValueError(f"spacing needs {n - 1} weights for {n} pivots, got shape {np.shape(spacing)}")
    return _relax(objective, pivots, spacing, config, data, step_offset=0, key=jax.random.key(seed),
                  progress=progress, devices=devices)
