"""Training Bézier surfaces: the three-phase outer-to-inner schedule (Algorithms 1-2) and layer-specific training.

The Bézier-surface paper (Anonymous, 2024, "Revisiting mode connectivity in neural networks with Bézier
surface"); equation, algorithm and appendix numbers below are that paper's. The surface geometry (phase
masks and samplers, the exact area element) is in :mod:`mclandscape.methods.surface`.

:func:`train_surface` follows the three-phase "outer-to-inner" schedule of Algorithms 1 and 2, each phase
minimising the mini-batch estimate of a uniform-average loss over ``k`` sampled points (eq. 9-10), all ``k``
points evaluated on the same batch in one vectorised step and one optimizer update per batch, through
:func:`mclandscape.engine.connector_train.train_connector`:

- **Phase 1** (E1 epochs; Alg. 1 lines 2-4, Alg. 2 lines 8-16): the two edge curves ``u = 0`` and ``u = 1``,
  ``phi(0, v) = sum_j B_{j,m}(v) theta_0j`` and ``phi(1, v) = sum_j B_{j,m}(v) theta_nj``. Points
  ``(u, v)`` with ``u`` alternating over {0, 1} (random start) and ``v ~ U[0, 1]`` (Alg. 2 line 14 sums both
  edges at each sampled ``v``; Alg. 1 line 3 writes "sample u" where the edges vary ``v``). Trainable:
  ``theta_0j`` and ``theta_nj`` for ``0 < j < m`` — the only control points these curves depend on, corners
  excluded (§4.2 "Phase 1").
- **Phase 2** (E2 epochs; Alg. 1 lines 5-7, Alg. 2 lines 17-26): the family of u-direction curves
  ``C_j(u) = sum_i B_{i,n}(u) theta_ij`` for every fixed ``j = 0..m`` — the inner sums of eq. 5, Bézier
  curves in ``u`` from ``theta_0j`` to ``theta_nj``. For ``0 < j < m`` they are *not* curves on the surface
  (``phi(u, v) = sum_j B_{j,m}(v) C_j(u)``), so their points are given as pairs ``(u, j)`` (``j`` stored as a
  float) with their own coefficients (:func:`~mclandscape.methods.surface.curve_family_coefficients`).
  ``u ~ U[0, 1]``; ``j`` runs over ``0..m`` stratified (random start, then cyclic), so each batch covers all
  curves once ``k >= m+1`` as in Alg. 2 lines 20-24. Trainable: ``theta_ij`` for ``0 < i < n`` and all ``j``
  — the inner control points of each curve; the curve end points ``theta_0j``, ``theta_nj`` were shaped in
  phase 1 and stay fixed. **A slip in the paper**: Alg. 2 line 25 repeats line 15's "for each learnable
  theta_ij, i in {0, n}"; taken literally phase 2 would move only the phase-1 points, leave every inner curve
  control point (including the inner points ``theta_i0``, ``theta_im`` of the edges v = 0 and v = 1)
  untrained until phase 3, and contradict §4.2's "optimize the control points along the curves". We
  implement the evident intent ``i in {1, ..., n-1}`` (``tests/test_surface.py::test_phase_masks_and_line25_slip``
  shows the slip). Also Alg. 1 line 7 writes ``j in {0, ..., n-1}`` and Alg. 2 line 21 mixes indices
  (``theta_0n B_{n,m}``); the curve family above is what both describe.
- **Phase 3** (E3 epochs; Alg. 1 lines 8-10, Alg. 2 lines 27-34): the whole surface, ``(u, v) ~ U[0, 1]^2``;
  trainable: every non-corner control point.

Every phase evaluates exactly ``k`` points per batch (so steps cost the same in every phase). Control points
a phase does not train stay bit-identical (the trainer's mask), and the corners never move. Each phase has
its own optimizer state and learning-rate schedule, and its own checkpoint directory
(``checkpoint_dir/phase{1,2,3}``): calling :func:`train_surface` again with the same ``checkpoint_dir``
skips finished phases (restoring their result) and resumes the interrupted one after its last saved epoch.
Beyond the paper, ``objective="area"`` trains phase 3 on the exact area-weighted objective of eq. 7-8
(:mod:`mclandscape.methods.surface`). Layer-specific optimisation (A.6, Table 4): :func:`layer_mask`,
:func:`masked_optimizer` and :attr:`SurfaceConfig.layers`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from collections.abc import Callable

import jax
import numpy as np
import optax

from mclandscape.core import _checks
from mclandscape.core.connectors import Connector
from mclandscape.core.tree import PyTree, tree_path_names
from mclandscape.engine.connector_train import (
    ConnectorConfig,
    ConnectorTrainResult,
    check_connector,
    checkpointed_connector,
    dataset_steps,
    train_connector,
)
from mclandscape.engine.data import Dataset
from mclandscape.engine.loop import LoopConfig
from mclandscape.engine.models.base import Model
from mclandscape.engine.optim import Transform, transform, unwrap
from mclandscape.methods.surface import (
    AREA_GRADIENTS,
    PHASES,
    _grid_shape,
    area_proposal,
    area_weights,
    curve_family_coefficients,
    phase_sampler,
    phase_trainable,
)

__all__ = [
    "OBJECTIVES", "AREA_ESTIMATORS", "SCHEDULES", "SurfaceConfig", "layer_mask", "masked_optimizer",
    "SurfaceTrainResult", "train_surface",
]

OBJECTIVES = ("uniform", "area")
AREA_ESTIMATORS = ("importance", "sample")
SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class SurfaceConfig(ConnectorConfig):
    """What :func:`train_surface` computes: a :class:`~mclandscape.engine.connector_train.ConnectorConfig` (the
    batch size, ``k``, weight decay, loss, augmentation and strategy, checked there) with three phases.

    Attributes:
      epochs: ``(E1, E2, E3)``; a phase with 0 epochs, or with no trainable control point for the grid
        (phase 1 when m = 1, phase 2 when n = 1), is skipped and reported in ``skipped``.
      num_samples: ``k``, the points evaluated together per batch (the paper uses 80).
      lr, momentum, schedule: the default optimizer, SGD(``lr``, ``momentum``) with a per-phase ``schedule``
        (``"cosine"`` or ``"constant"``).
      optimizer: an optax transformation (a fresh state per phase), a callable ``(phase, steps_in_phase) ->
        transformation``, or ``None`` for the default.
      weight_decay, weight_decay_on: ``(wd/2) sum |theta_k|^2`` over the trainable control points
        (``"control"``, the default here) or ``(wd/2) |phi(u, v)|^2`` at the sampled points (``"point"``).
      steps_per_epoch: unused (an epoch is one pass over the data).
      objective: ``"uniform"`` (eq. 9) or ``"area"`` (eq. 7-8 in phase 3; phases 1-2 train curves and use
        eq. 9 for both); ``area_estimator`` (``"importance"`` or ``"sample"``), ``area_gradient``,
        ``area_quadrature``, ``proposal_cells``, ``proposal_mix``, ``proposal_refresh`` (epochs between
        proposals): see :mod:`mclandscape.methods.surface`.
      layers: a regex on parameter paths (:func:`layer_mask`); only matching leaves are trained, the others
        keep their bilinear initialisation (appendix A.6, Table 4).

    Example:
        >>> SurfaceConfig(epochs=(1, 0, 2), num_samples=4).epochs
        (1, 0, 2)
        >>> SurfaceConfig(epochs=(1, 1))
        Traceback (most recent call last):
        ...
        ValueError: epochs must be three integers >= 0 (E1, E2, E3), got (1, 1)
    """

    epochs: tuple[int, int, int] = (2, 2, 6)
    num_samples: int = 8
    weight_decay_on: str = "control"
    lr: float = 0.05
    momentum: float = 0.9
    schedule: str = "cosine"
    objective: str = "uniform"
    area_estimator: str = "importance"
    area_gradient: str = "full"
    area_quadrature: int = 24
    proposal_cells: int = 32
    proposal_mix: float = 0.1
    proposal_refresh: int = 1
    layers: str | None = None

    def __post_init__(self):
        if not isinstance(self.epochs, tuple | list) or len(self.epochs) != 3:
            raise ValueError(f"epochs must be three integers >= 0 (E1, E2, E3), got {self.epochs!r}")
        object.__setattr__(self, "epochs", tuple(_checks.integer(e, "epochs", low=0) for e in self.epochs))
        self._check_common(callable_optimizer=True)
        for name in ("area_quadrature", "proposal_cells", "proposal_refresh"):
            _checks.integer(getattr(self, name), name, low=1)
        _checks.real(self.lr, "lr", low=0.0, low_open=True)
        _checks.real(self.momentum, "momentum", low=0.0)
        _checks.real(self.proposal_mix, "proposal_mix", low=0.0, high=1.0, low_open=True,
                     what="so the proposal covers the square")
        for name, choices in (("schedule", SCHEDULES), ("objective", OBJECTIVES),
                              ("area_estimator", AREA_ESTIMATORS), ("area_gradient", AREA_GRADIENTS)):
            _checks.choice(getattr(self, name), name, choices)
        if self.layers is not None:
            _regex(self.layers)


def _regex(pattern) -> re.Pattern:
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as err:
        raise ValueError(f"layers must be a regular expression, got {pattern!r}: {err}") from None


def layer_mask(params: PyTree, pattern: str) -> PyTree:
    """Pytree of Python bools shaped like ``params``: True where the leaf path matches the regex ``pattern``.

    Paths read like ``['conv2']['kernel']`` (:func:`mclandscape.core.tree.tree_path_names`); ``re.search`` is
    used, so ``"conv2|fc|head"`` selects the last convolution and the dense layers of ``simple_cnn``.

    Args:
      params: one parameter pytree.
      pattern: a regular expression.

    Returns:
      A pytree of bools.

    Raises:
      ValueError: an invalid pattern, or one matching no parameter (the message lists the paths).

    Example:
        >>> import jax.numpy as jnp
        >>> layer_mask({"body": {"kernel": jnp.zeros(2)}, "head": {"kernel": jnp.zeros(2)}}, "head")
        {'body': {'kernel': False}, 'head': {'kernel': True}}
    """
    rx = _regex(pattern)
    treedef = jax.tree_util.tree_structure(params)
    paths = tree_path_names(params)
    flags = [bool(rx.search(p)) for p in paths]
    if not any(flags):
        raise ValueError(f"layer pattern {pattern!r} matches no parameter; paths are {paths}")
    return jax.tree_util.tree_unflatten(treedef, flags)


def _masked(optimizer, treedef, flags: tuple) -> optax.GradientTransformation:
    labels = jax.tree_util.tree_unflatten(treedef, ["train" if f else "freeze" for f in flags])
    return optax.multi_transform({"train": unwrap(optimizer), "freeze": optax.set_to_zero()}, labels)


def masked_optimizer(optimizer: optax.GradientTransformation | Transform, mask: PyTree) -> Transform:
    """``optimizer`` on leaves where ``mask`` is True, zero updates elsewhere (frozen leaves stay bit-identical).

    ``optax.masked`` alone would pass the raw gradient through on unmasked leaves; this uses
    ``optax.multi_transform`` with ``optax.set_to_zero`` instead. Named by value
    (:func:`mclandscape.engine.optim.transform`): an equal optimizer and mask give an equal transform.

    Args:
      optimizer: the optax transformation for the trained leaves.
      mask: a pytree of bools (e.g. :func:`layer_mask`).

    Returns:
      A :class:`~mclandscape.engine.optim.Transform`.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> p = {"a": jnp.ones(1), "b": jnp.ones(1)}
        >>> tx = masked_optimizer(optax.sgd(1.0), {"a": True, "b": False})
        >>> u, _ = tx.update({"a": jnp.ones(1), "b": jnp.ones(1)}, tx.init(p), p)
        >>> u["a"].tolist(), u["b"].tolist()
        ([-1.0], [0.0])
    """
    flags, treedef = jax.tree_util.tree_flatten(mask)
    return transform(_masked, optimizer, treedef, tuple(bool(f) for f in flags))


@dataclasses.dataclass(frozen=True)
class SurfaceTrainResult:
    """Outcome of :func:`train_surface`.

    Attributes:
      connector: the trained surface.
      history: per phase, one record per epoch (``{"epoch", "objective", "loss", "grad_norm", "seconds"}``,
        ``epoch`` from 1 within the phase).
      wall_time: per phase, seconds (summed over the epochs, including resumed runs).
      trained: per phase, the control-point indices it trained.
      skipped: per skipped phase, why.
    """

    connector: Connector
    history: dict[int, list[dict]]
    wall_time: dict[int, float]
    trained: dict[int, list[int]]
    skipped: dict[int, str]

    @property
    def phase(self) -> int | None:
        """The phase of the newest history record (``None`` before any epoch)."""
        done = [p for p, h in self.history.items() if h]
        return max(done) if done else None


def _sgd(lr: float, momentum: float, schedule: str, steps: int) -> optax.GradientTransformation:
    lr_s = optax.cosine_decay_schedule(lr, max(steps, 1)) if schedule == "cosine" else lr
    return optax.sgd(lr_s, momentum=momentum or None)


def _phase_optimizer(cfg: SurfaceConfig, phase: int, steps: int, lmask: PyTree | None):
    """The phase's transform, by value (equal settings: an equal transform, so the step compiles once)."""
    if cfg.optimizer is None:
        opt = transform(_sgd, float(cfg.lr), float(cfg.momentum), cfg.schedule, int(steps))
    elif isinstance(cfg.optimizer, optax.GradientTransformation | Transform):
        opt = cfg.optimizer
    else:
        opt = cfg.optimizer(phase, steps)
    return opt if lmask is None else masked_optimizer(opt, lmask)


def _phase_hyper(cfg: SurfaceConfig, phase: int) -> dict:
    """The phase's settings for the resume fingerprint."""
    names = ["objective", "lr", "momentum", "schedule", "layers", "weight_decay_on"]
    if cfg.objective == "area" and phase == 3:
        names += ["area_estimator", "area_gradient", "area_quadrature"]
        if cfg.area_estimator == "sample":
            names += ["proposal_cells", "proposal_mix", "proposal_refresh"]
    return {"phase": phase, "phase_epochs": list(cfg.epochs), "epochs": cfg.epochs[phase - 1],
            "optimizer": "default" if cfg.optimizer is None else "custom", **{n: getattr(cfg, n) for n in names}}


def _seconds(history: list[dict]) -> float:
    return float(sum(r.get("seconds", 0.0) for r in history))


def _phase_callbacks(callback, phase: int, conn: Connector, out: dict) -> list:
    """The loop callback that calls ``callback(epoch, SurfaceTrainResult as of that epoch)``."""
    if callback is None:
        return []

    def cb(epoch, st, hist):
        res = ConnectorTrainResult.at(conn, st, hist)
        callback(epoch, SurfaceTrainResult(
            connector=res.connector, history={**out["history"], phase: res.history},
            wall_time={**out["wall_time"], phase: _seconds(res.history)}, trained=dict(out["trained"]),
            skipped=dict(out["skipped"])))

    return [cb]


def _train_sampled(model, conn: Connector, data, cfg: SurfaceConfig, pcfg: ConnectorConfig, ckdir, loop: dict,
                   kw: dict):
    """Phase 3 with samples drawn from the area proposal, rebuilt from the current surface every
    ``proposal_refresh`` epochs (segments of one run, so a resumed run rebuilds the same proposals)."""
    with tempfile.TemporaryDirectory(prefix="mcl_surface_") as tmp:
        ckdir = tmp if ckdir is None else ckdir
        start, refresh = conn, cfg.proposal_refresh
        conn, done = (conn, 0) if loop["overwrite"] else checkpointed_connector(conn, pcfg.optimizer, ckdir)
        res = None
        while res is None or (done < pcfg.epochs and res.stopped is None):
            done = min(pcfg.epochs, done + refresh)
            sampler, dens = area_proposal(conn, cells=cfg.proposal_cells, mix=cfg.proposal_mix)
            weights = area_weights(quadrature=cfg.area_quadrature, gradient=cfg.area_gradient, proposal=dens)
            lc = LoopConfig(checkpoint_dir=ckdir, checkpoint_every=refresh,
                            **{**loop, "overwrite": loop["overwrite"] and res is None})
            res = train_connector(model, conn, data, dataclasses.replace(pcfg, epochs=done), sampler=sampler,
                                  point_weights=weights, loop=lc, run_start=start, **kw)
            conn = res.connector
    return res


def train_surface(model: Model, surface: Connector, data: Dataset, config: SurfaceConfig | None = None, *,
                  seed: int = 0, checkpoint_dir: str | os.PathLike | None = None, keep: int = 1,
                  overwrite: bool = False, progress: bool | None = None,
                  callback: Callable[[int, SurfaceTrainResult], None] | None = None,
                  devices: int | None = None) -> SurfaceTrainResult:
    """Train a Bézier surface with the three-phase outer-to-inner schedule (Bézier-surface paper, Alg. 1-2, eq. 9-10).

    Same calling convention as :func:`mclandscape.methods.curves.train_curve`: ``(model, connector, data,
    config, *, ...)``.

    Args:
      model: the :class:`~mclandscape.engine.models.Model` (trained in train mode).
      surface: the surface, e.g. ``mcl.bezier_surface(c00, c01, c10, c11, n=2, m=2)`` (corners fixed,
        other control points bilinear), or a surface trained before.
      data: the training :class:`~mclandscape.engine.data.Dataset`.
      config: the :class:`SurfaceConfig` (default ``SurfaceConfig()``).
      seed: batch order, point samples and dropout (each phase derives its own).
      checkpoint_dir, keep, overwrite: per-phase checkpoints (``phase1``, ``phase2``, ``phase3``) at every epoch
        end (the last ``keep`` stay); a second call with the same directory and the same run (surface, data,
        model, config and seed) skips finished phases and resumes, a different run is refused;
        ``overwrite=True`` starts afresh.
      progress: a progress bar per phase (``None``: when stderr is a terminal).
      callback: ``callback(epoch, result)`` after every epoch: ``epoch`` from 1 within the phase (as in
        ``history``), ``result`` a :class:`SurfaceTrainResult` as of that epoch (``result.phase`` is the
        phase). Raising :class:`~mclandscape.engine.loop.StopRun` ends training there; the later phases are
        reported in ``skipped``.
      devices: how many devices each step runs on (see :func:`mclandscape.engine.connector_train.train_connector`).

    Returns:
      A :class:`SurfaceTrainResult`.

    Raises:
      TypeError: ``surface`` is not a Connector (e.g. four corners were passed), ``data`` is not a Dataset or
        ``config`` not a SurfaceConfig.
      ValueError: a batch size larger than the data, or a ``layers`` pattern that matches no parameter.

    Example:
        >>> import jax
        >>> import mclandscape as mcl
        >>> train = mcl.load_dataset("iris", "train")
        >>> model = mcl.get_model("mlp", widths=[4], num_classes=3)
        >>> corners = [model.init(jax.random.key(s), train.x[:1])["params"] for s in range(4)]
        >>> res = train_surface(model, mcl.bezier_surface(*corners, n=2, m=2), train,
        ...                     SurfaceConfig(epochs=(1, 0, 1), num_samples=2, batch_size=60), progress=False)
        >>> sorted(res.history), res.skipped, [r["epoch"] for r in res.history[3]]
        ([1, 3], {2: '0 epochs'}, [1])
    """
    surface = check_connector(surface, ("surface",), "train_surface",
                              build="mcl.bezier_surface(c00, c01, c10, c11, n=2, m=2)")
    cfg = SurfaceConfig() if config is None else config
    if not isinstance(cfg, SurfaceConfig):
        raise TypeError(f"train_surface: config must be a SurfaceConfig, got {type(cfg).__name__}")
    steps_per_epoch = dataset_steps(data, cfg.batch_size, "train_surface")
    shape = _grid_shape(surface.shape)
    lmask = layer_mask(jax.tree_util.tree_map(lambda a: a[0], surface.control), cfg.layers) if cfg.layers else None
    out: dict[str, dict] = {"history": {}, "wall_time": {}, "trained": {}, "skipped": {}}
    conn = surface
    for phase in PHASES:
        mask = phase_trainable(shape, phase) & surface.trainable
        epochs = cfg.epochs[phase - 1]
        if epochs == 0 or not mask.any():
            out["skipped"][phase] = "0 epochs" if epochs == 0 else \
                f"no trainable control point in phase {phase} for a {shape[0]}x{shape[1]} grid"
            continue
        out["trained"][phase] = [int(i) for i in np.flatnonzero(mask)]
        pcfg = cfg.connector_config(epochs=epochs,
                                    optimizer=_phase_optimizer(cfg, phase, steps_per_epoch * epochs, lmask))
        kw = dict(trainable=mask, seed=seed + 7919 * phase, devices=devices, hyper=_phase_hyper(cfg, phase),
                  callbacks=_phase_callbacks(callback, phase, conn, out),
                  metadata={"phase": phase, "objective": cfg.objective})
        ckdir = None if checkpoint_dir is None else os.path.join(os.fspath(checkpoint_dir), f"phase{phase}")
        loop = dict(keep=keep, overwrite=overwrite, progress=progress, desc=f"surface phase {phase}")
        area = cfg.objective == "area" and phase == 3
        if area and cfg.area_estimator == "sample":
            res = _train_sampled(model, conn, data, cfg, pcfg, ckdir, loop, kw)
        else:
            weights = area_weights(quadrature=cfg.area_quadrature, gradient=cfg.area_gradient) if area else None
            res = train_connector(model, conn, data, pcfg, sampler=phase_sampler(shape, phase),
                                  coefficients=curve_family_coefficients(shape) if phase == 2 else None,
                                  point_weights=weights, loop=LoopConfig(checkpoint_dir=ckdir, **loop), **kw)
        conn = res.connector
        out["history"][phase] = list(res.history)
        out["wall_time"][phase] = _seconds(res.history)
        if res.stopped is not None:
            for later in PHASES[phase:]:
                out["skipped"][later] = f"stopped by the callback after phase {phase}, epoch {res.stopped}"
            break
    return SurfaceTrainResult(connector=conn, **out)
