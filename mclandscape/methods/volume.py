"""H_c(s), the volume heuristic, its sweeps and the log-linear fit (§4.3.4, §6.1).

Implements N. Schager, "Volumetric investigation into neural network loss landscapes" (Bachelor's thesis,
Universität Kassel, 2025): H_c(s) = number of *accepted* voxels (f ≤ c) reached from the origin by
:func:`~mclandscape.methods.traversal.grid_traversal` on the lattice of a
:class:`~mclandscape.methods.flats.Flat`; :func:`h_sweep` computes it for a grid of step widths s and
multipliers n, continuing each larger threshold from the future queue of the previous one;
:func:`fit_log_linear` fits log H = log A + B·c with the correlation coefficient R (§6.1).

Example:
    >>> round(fit_log_linear([0.0, 1.0], [1.0, 2.0]).B, 4)
    0.6931
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mclandscape.core._checks import real
from mclandscape.methods.flats import Flat, _check_step
from mclandscape.methods.lattice import LatticeLoss
from mclandscape.methods.traversal import TraversalConfig, _numpy_rng, _threshold, grid_traversal

__all__ = ["HSweep", "h_sweep", "LogLinearFit", "fit_log_linear", "mean_log_h"]




@dataclasses.dataclass(frozen=True)
class LogLinearFit:
    """log H = log A + B·c fitted by least squares; R is the correlation coefficient of (c, log H) (§6.1).

    R is NaN when log H is constant (the correlation is undefined).

    Example:
        >>> fit = LogLinearFit(A=2.0, B=1.0, R=1.0, num_points=3)
        >>> fit.predict([0.0]).tolist(), fit.to_dict()["A"]
        ([2.0], 2.0)
    """

    A: float
    B: float
    R: float
    num_points: int

    def predict(self, c) -> np.ndarray:
        """H ≈ A·exp(B·c) at thresholds ``c`` (float64 array)."""
        return self.A * np.exp(self.B * np.asarray(c, np.float64))

    def to_dict(self) -> dict:
        return {"A": self.A, "B": self.B, "R": None if math.isnan(self.R) else self.R, "num_points": self.num_points}


def fit_log_linear(c, H) -> LogLinearFit:
    """Fit H_c(s) ≈ A·e^{B·c} (§6.1) to thresholds ``c`` and counts ``H`` (natural log).

    Args:
      c: thresholds ``[N]``.
      H: positive counts ``[N]``.

    Returns:
      The :class:`LogLinearFit`.

    Raises:
      ValueError: fewer than two points, mismatched lengths, non-finite values, H ≤ 0 or equal thresholds.

    Example:
        >>> import numpy as np
        >>> fit = fit_log_linear([1.0, 2.0, 3.0], 5.0 * np.exp(0.7 * np.array([1.0, 2.0, 3.0])))
        >>> round(fit.A, 6), round(fit.B, 6), round(fit.R, 6)
        (5.0, 0.7, 1.0)
    """
    c = np.asarray(c, np.float64).reshape(-1)
    H = np.asarray(H, np.float64).reshape(-1)
    if c.shape != H.shape:
        raise ValueError(f"{c.size} thresholds but {H.size} counts")
    if c.size < 2:
        raise ValueError(f"a log-linear fit needs at least two points, got {c.size}")
    if not np.all(np.isfinite(c)) or not np.all(np.isfinite(H)):
        raise ValueError("thresholds and counts must be finite")
    if np.any(H <= 0):
        raise ValueError("H_c(s) must be positive to take its logarithm")
    if np.ptp(c) == 0:
        raise ValueError("all thresholds are equal; the slope B is undefined")
    y = np.log(H)
    dc, dy = c - c.mean(), y - y.mean()
    B = float(np.dot(dc, dy) / np.dot(dc, dc))
    logA = float(y.mean() - B * c.mean())
    R = float("nan") if np.ptp(y) == 0 else float(np.dot(dc, dy) / math.sqrt(np.dot(dc, dc) * np.dot(dy, dy)))
    return LogLinearFit(A=float(math.exp(logA)), B=float(B), R=R, num_points=int(c.size))


@dataclasses.dataclass(frozen=True)
class HSweep:
    """H_c(s) over step widths ``steps [S]`` and multipliers ``multipliers [N]`` (thresholds c = n·ε).

    Tables are ``[S, N]``: ``H`` (accepted voxels), ``evaluations`` (losses computed by that call),
    ``visited`` (cumulative), ``truncated``, ``wall_time`` (seconds per call). ``loss_dtype`` is the dtype
    the losses and thresholds were compared in.

    Example:
        >>> import jax.numpy as jnp
        >>> from mclandscape.core.objective import function_objective
        >>> from mclandscape.methods.flats import full_space_flat
        >>> bowl = function_objective(lambda theta, batch: 1.0 + jnp.sum(theta ** 2))
        >>> sweep = h_sweep(full_space_flat(jnp.zeros(1)), bowl, [0.5, 1.0], [2.0, 5.0])
        >>> sweep.H.tolist(), sweep.thresholds.tolist(), sweep.volume().tolist()
        ([[5, 9], [3, 5]], [2.0, 5.0], [[2.5, 4.5], [3.0, 5.0]])
    """

    steps: np.ndarray
    multipliers: np.ndarray
    epsilon: float
    H: np.ndarray
    evaluations: np.ndarray
    visited: np.ndarray
    truncated: np.ndarray
    wall_time: np.ndarray
    dim: int
    cell_factor: float
    flat: dict = dataclasses.field(default_factory=dict)
    loss_dtype: str = "float32"

    @property
    def thresholds(self) -> np.ndarray:
        """``[N]`` thresholds c = n·ε exactly as the traversal compared them (rounded to ``loss_dtype``)."""
        return np.asarray([_threshold(n, self.epsilon, self.loss_dtype) for n in self.multipliers], np.float64)

    def volume(self) -> np.ndarray:
        """H·cell_factor·s^m: the voxel estimate of the m-volume of the explored component (§6.4)."""
        return self.H * self.cell_factor * self.steps[:, None] ** self.dim

    def fit(self, *, include_truncated: bool = False) -> dict:
        """Per-step fits and the pooled fit over all steps (§6.1); truncated runs are left out unless asked.

        Returns ``{"per_step": [LogLinearFit | None], "pooled": LogLinearFit | None}`` (None where fewer
        than two usable points with distinct thresholds remain).
        """
        use = self.H > 0 if include_truncated else (self.H > 0) & ~self.truncated
        c = np.broadcast_to(self.thresholds, self.H.shape)

        def fit(cs, hs):
            return fit_log_linear(cs, hs) if cs.size >= 2 and np.ptp(cs) > 0 else None

        return {"per_step": [fit(ci[u], hi[u]) for ci, hi, u in zip(c, self.H, use, strict=True)],
                "pooled": fit(c[use], self.H[use])}

    def to_dict(self) -> dict:
        fits = self.fit()
        arrays = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in arrays.items()}
        out.update(thresholds=self.thresholds.tolist(), volume=self.volume().tolist(),
                   fit_per_step=[None if f is None else f.to_dict() for f in fits["per_step"]],
                   fit_pooled=None if fits["pooled"] is None else fits["pooled"].to_dict())
        return out


def h_sweep(
    flat: Flat,
    objective: Callable,
    steps: Sequence[float],
    multipliers: Sequence[float],
    *,
    batch: Any = None,
    config: TraversalConfig | None = None,
    chunk: int = 16,
    max_batch: int = 4096,
    key: Any = 0,
    continue_future_queue: bool = True,
    progress: Callable[[str], None] | None = None,
    devices: int | None = None,
) -> HSweep:
    """H_c(s) for every step width s and threshold c = n·ε (§4.3.4, Figures 5.1-5.6).

    For each s the multipliers are run in order, each continuing from the state of the previous one (future
    queue re-checked, no voxel evaluated twice). Every step width reuses the same compiled evaluator (the
    step only enters the lattice rows), so a sweep compiles one function per bucket size.

    Args:
      flat: the :class:`~mclandscape.methods.flats.Flat`.
      objective: the loss, an objective ``(params, batch, key) -> (loss, aux)`` of the engine's protocol
        (:class:`~mclandscape.methods.lattice.LatticeLoss`).
      steps: step widths s > 0.
      multipliers: threshold multipliers n, strictly increasing, ≥ 1.
      batch: the objective's full batch (``None`` for a landscape that takes none).
      config: the :class:`~mclandscape.methods.traversal.TraversalConfig` of every call (``limit`` applies
        to each call).
      chunk, max_batch: voxels per vectorised chunk and per evaluator call
        (:class:`~mclandscape.methods.lattice.LatticeLoss`).
      key: seeds the random streams; that of call (i, j) is derived from ``key`` and (i, j).
      continue_future_queue: ``False`` restarts from the origin for every threshold instead.
      progress: called with one line per (s, n).
      devices: how many devices to shard the voxels over (default all).

    Returns:
      The :class:`HSweep`.

    Example:
        >>> import jax.numpy as jnp
        >>> from mclandscape.core.objective import function_objective
        >>> from mclandscape.methods.flats import full_space_flat
        >>> bowl = function_objective(lambda theta, batch: 1.0 + jnp.sum(theta ** 2))
        >>> sweep = h_sweep(full_space_flat(jnp.zeros(2)), bowl, [0.5], [1.3, 2.0, 3.0])
        >>> sweep.H.tolist(), round(sweep.fit()["pooled"].B, 3)  # lattice points with |a|² ≤ 1.2, 4, 8
        ([[5, 13, 25]], 0.927)
    """
    steps = np.asarray([_check_step(s) for s in steps], np.float64)
    mult = np.asarray([real(x, "threshold multiplier n", low=1) for x in multipliers], np.float64)
    if steps.size == 0 or mult.size == 0:
        raise ValueError("need at least one step width and one multiplier")
    if np.any(np.diff(mult) <= 0):
        raise ValueError(f"multipliers must be strictly increasing, got {mult.tolist()}")
    base = _numpy_rng(key).integers(2 ** 63)
    runs = []  # runs[i][j]: the summary of the traversal at step i, multiplier j
    for i, s in enumerate(steps):
        evaluator = LatticeLoss(flat, float(s), objective, batch, chunk=chunk, max_batch=max_batch, devices=devices)
        state, row = None, []
        for j, nn in enumerate(mult):
            res = grid_traversal(evaluator, float(nn), state=state if continue_future_queue else None,
                                 config=config, key=np.random.default_rng([int(base), i, j]))
            state = res.state
            row.append(res.summary())
            if progress is not None:
                progress(f"s={s:g} n={nn:g} c={res.threshold:.4g}: H={res.H} evals={res.evaluations} "
                         f"visited={res.visited} truncated={res.truncated} {res.wall_time:.2f}s")
        runs.append(row)

    kinds = {"H": np.int64, "evaluations": np.int64, "visited": np.int64, "truncated": bool, "wall_time": np.float64}
    tables = {name: np.array([[r[name] for r in row] for row in runs], dtype) for name, dtype in kinds.items()}
    return HSweep(steps=steps, multipliers=mult, epsilon=float(runs[0][0]["epsilon"]), dim=flat.dim,
                  cell_factor=flat.cell_factor, flat=flat.describe(), loss_dtype=state.dtype.name, **tables)


def mean_log_h(sweeps: Sequence[HSweep]) -> dict:
    """Average log H_c(s) over sweeps from different minima on a common (steps, multipliers) grid (§5.5).

    Args:
      sweeps: :class:`HSweep` results on one (steps, multipliers) grid.

    Returns:
      ``{"steps", "multipliers", "mean_c" [N], "mean_log_H" [S, N], "std_log_H" [S, N], "any_truncated"
      [S, N]}`` as lists; the thresholds differ between minima (c = n·ε_i), so the mean c is reported.

    Example:
        >>> import jax.numpy as jnp
        >>> from mclandscape.core.objective import function_objective
        >>> from mclandscape.methods.flats import full_space_flat
        >>> bowl = function_objective(lambda theta, batch: 1.0 + jnp.sum(theta ** 2))
        >>> sweeps = [h_sweep(full_space_flat(jnp.full(1, a)), bowl, [0.5], [2.0]) for a in (0.0, 1.0)]
        >>> out = mean_log_h(sweeps)  # ε = 1 and 2, so c = 2 and 4
        >>> [s.H.tolist() for s in sweeps], out["mean_c"]
        ([[[5]], [[7]]], [3.0])
    """
    sweeps = list(sweeps)
    if not sweeps:
        raise ValueError("mean_log_h needs at least one sweep")
    for k, sw in enumerate(sweeps[1:], 1):
        if not (np.array_equal(sw.steps, sweeps[0].steps) and np.array_equal(sw.multipliers, sweeps[0].multipliers)):
            raise ValueError(f"sweep {k} has a different (steps, multipliers) grid than sweep 0")
    logs = np.stack([np.log(np.maximum(sw.H, 1)) for sw in sweeps])
    return {
        "steps": sweeps[0].steps.tolist(),
        "multipliers": sweeps[0].multipliers.tolist(),
        "mean_c": np.mean([sw.thresholds for sw in sweeps], axis=0).tolist(),
        "mean_log_H": logs.mean(0).tolist(),
        "std_log_H": logs.std(0).tolist(),
        "any_truncated": np.any([sw.truncated for sw in sweeps], axis=0).tolist(),
    }
