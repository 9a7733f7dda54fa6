"""AutoNEB: cycles of NEB runs with pivots inserted between cycles (Draxler, Veschgini, Salmhofer and
Hamprecht, 2018, "Essentially no barriers in neural network energy landscape", ICML; their ``torch_autoneb``).

Before each cycle pivots are inserted, evenly (``"equal"``: ``count`` new pivots in every gap) or where the loss
between neighbours rises most above the linear interpolation of their losses (``"highest"``: on ``sub_pivots``
points per gap the score ``L(alpha) - ((1 - alpha) L_a + alpha L_b)``, normalised by the range of the pivot
losses; the ``count`` gaps with the largest score above ``threshold`` each get one pivot at their arg-max). As
in Draxler's fill, the band keeps *target spacing* weights ``omega_j`` (relative segment lengths, mean 1): an
inserted pivot splits its gap's weight by ``alpha`` and the spring of
:func:`~mclandscape.methods.neb_forces.neb_forces` holds it there instead of pushing it back to equal spacing.
The dense profile that places new pivots runs through the engine's
:func:`~mclandscape.engine.points.map_points` (or a ``profile_fn`` such as the engine's ``evaluate`` of a
network with recalibrated BatchNorm); the cycles continue one global step count of the batch stream.

Example:
    >>> insertion_alphas(None, 3, 1, count=1, method="equal")
    [[0.5], [0.5]]
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mclandscape.core import _checks
from mclandscape.core.connectors import Connector
from mclandscape.core.tree import PyTree, tree_combine, tree_stack
from mclandscape.engine.points import connector_points, map_points
from mclandscape.methods.curves import PathEvaluation, evaluate_curve
from mclandscape.methods.neb import NEBConfig, NEBResult, _Band, _point_loss, _relax
from mclandscape.methods.neb_forces import _band_dtype, _check_ends, _num_pivots, band_connector, dense_ts

__all__ = ["AutoNEBResult", "insertion_alphas", "insert_pivots", "auto_neb", "evaluate_band"]


@dataclasses.dataclass(frozen=True)
class AutoNEBResult(_Band):
    """Outcome of :func:`auto_neb`: final band, per-cycle records and the final dense profile.

    ``band`` is the final polychain, ``spacing`` its target segment weights, ``cycles`` one record per cycle
    (see :func:`auto_neb`), ``dense_t`` / ``dense_loss`` the final band's profile on :func:`dense_ts`
    (float64). :func:`auto_neb`'s example shows one.
    """

    band: Connector
    spacing: np.ndarray
    cycles: list[dict]
    dense_t: np.ndarray
    dense_loss: np.ndarray


def insertion_alphas(dense_loss, num_pivots: int, sub_pivots: int, *, count: int, method: str = "highest",
                     threshold: float = 0.1) -> list[list[float]]:
    """Where to insert pivots: for every gap a (possibly empty) list of positions ``alpha`` in (0, 1).

    ``"equal"``: ``count`` evenly spaced positions in every gap. ``"highest"``: from the dense losses on
    :func:`dense_ts` (``num_pivots``, ``sub_pivots``), the score ``L(alpha) - ((1 - alpha) L_a + alpha L_b)``
    divided by the range of the pivot losses; the ``count`` gaps with the largest maximal score above
    ``threshold`` each get one pivot at its arg-max (Draxler's AutoNEB "highest" fill).

    Args:
      dense_loss: the losses on :func:`dense_ts` (``None`` for ``"equal"``).
      num_pivots: N.
      sub_pivots: the points per gap in ``dense_loss``.
      count: pivots per gap (``"equal"``) or gaps to fill (``"highest"``).
      method: ``"equal"`` or ``"highest"``.
      threshold: the least normalised score that gets a pivot (``"highest"``).

    Returns:
      ``N-1`` lists of positions, one per gap.

    Example:
        >>> insertion_alphas(None, 3, 1, count=1, method="equal")
        [[0.5], [0.5]]
        >>> insertion_alphas([0.0, 5.0, 0.0, 0.0, 1.0], 3, 1, count=1)  # a bump inside the first gap
        [[0.5], []]
    """
    count = _checks.integer(count, "count", low=0)
    g = num_pivots - 1
    if _checks.choice(method, "method", ("equal", "highest")) == "equal":
        return [[float(a) for a in np.linspace(0.0, 1.0, count + 2)[1:-1]] for _ in range(g)]
    _checks.integer(sub_pivots, "sub_pivots", low=1, what="points inside every gap")
    v = np.asarray(dense_loss, np.float64).reshape(-1)
    expect = g * (sub_pivots + 1) + 1
    if v.size != expect:
        raise ValueError(f"dense_loss has {v.size} values; {num_pivots} pivots with {sub_pivots} sub-pivots "
                         f"need {expect}")
    if not np.all(np.isfinite(v)):
        raise ValueError("dense_loss holds NaN or inf")
    blocks = v[:-1].reshape(g, sub_pivots + 1)
    la = blocks[:, 0]
    lb = np.concatenate([blocks[1:, 0], v[-1:]])
    alphas = np.linspace(0.0, 1.0, sub_pivots + 2)[1:-1]
    inner = blocks[:, 1:]
    scores = inner - ((1 - alphas)[None] * la[:, None] + alphas[None] * lb[:, None])
    piv = np.concatenate([la, v[-1:]])
    scores = scores / (piv.max() - piv.min() + 1e-12)
    best = scores.max(axis=1)
    arg = scores.argmax(axis=1)
    order = np.argsort(-best, kind="stable")[: min(count, g)]
    fill: list[list[float]] = [[] for _ in range(g)]
    for gap in order:
        if best[gap] > threshold:
            fill[gap] = [float(alphas[arg[gap]])]
    return fill


def insert_pivots(pivots: PyTree, fill: Sequence[Sequence[float]], spacing=None) -> tuple[PyTree, np.ndarray]:
    """Insert pivots on the segments: ``fill[g]`` lists increasing positions in (0, 1) inside gap g.

    Args:
      pivots: stacked pivots ``[N, ...]``.
      fill: ``N-1`` lists of positions (:func:`insertion_alphas`).
      spacing: the current target weights ``[N-1]`` (default equal).

    Returns:
      The new stacked pivots (old pivots copied exactly; new ones ``(1 - a) w_g + a w_{g+1}`` with ``a`` in
      the pivots' dtype) and the new target spacing weights (each gap's weight split by the inserted
      positions, as Draxler's ``fill_chain``), normalised to mean 1.

    Example:
        >>> import jax.numpy as jnp
        >>> new, w = insert_pivots(jnp.array([0.0, 1.0, 3.0]), [[0.5], []])
        >>> new.tolist(), w.tolist()
        ([0.0, 0.5, 1.0, 3.0], [0.75, 0.75, 1.5])
    """
    n = int(jax.tree_util.tree_leaves(pivots)[0].shape[0])
    if len(fill) != n - 1:
        raise ValueError(f"fill must list positions for each of the {n - 1} gaps, got {len(fill)}")
    w = np.ones(n - 1) if spacing is None else np.asarray(spacing, np.float64)
    if w.shape != (n - 1,) or np.any(w <= 0):
        raise ValueError(f"spacing must be {n - 1} positive weights, got {w}")
    for g, al in enumerate(fill):
        if any(not 0.0 < a < 1.0 for a in al) or np.any(np.diff(al) <= 0):
            raise ValueError(f"insert positions in gap {g} must increase strictly inside (0, 1), got {list(al)}")
    # row r of the new band is (1 - alpha_r) w_{gap_r} + alpha_r w_{gap_r + 1}; alpha 0 (and 1 for the end) are
    # the existing pivots
    rows = [(g, float(a)) for g, al in enumerate(fill) for a in (0.0, *al)] + [(n - 2, 1.0)]
    gap, alpha = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    new_w = np.concatenate([np.diff([0.0, *map(float, al), 1.0]) * w[g] for g, al in enumerate(fill)])
    new = pivots
    if len(rows) > n:
        m = np.zeros((len(rows), n))
        m[np.arange(len(rows)), gap] = 1.0 - alpha
        m[np.arange(len(rows)), gap + 1] += alpha
        new = tree_combine(jnp.asarray(m, _band_dtype(pivots)), pivots)  # alpha in the pivots' precision
        old = np.flatnonzero((alpha == 0.0) | (alpha == 1.0))  # existing pivots are copied bit for bit
        src = gap[old] + (alpha[old] == 1.0)
        new = jax.tree_util.tree_map(lambda a, p: a.at[old].set(p[src]), new, pivots)
    return new, new_w * (new_w.size / new_w.sum())


def auto_neb(objective: Callable, start: PyTree, end: PyTree, *, cycles: NEBConfig | Sequence[NEBConfig],
             num_cycles: int | None = None, data=None,
             profile_fn: Callable[[Connector, np.ndarray], np.ndarray] | None = None, eval_data=None,
             initial_insert: int = 3, insert_count: int = 2, insert_method: str = "highest",
             sub_pivots: int = 9, insert_threshold: float = 0.1, seed: int = 0,
             progress: bool | None = None, devices: int | None = None) -> AutoNEBResult:
    """AutoNEB (Draxler et al. 2018): NEB cycles with pivot insertion between cycles (module docstring).

    Cycle 1 starts from ``start``, ``end`` and ``initial_insert`` evenly inserted pivots (Draxler's first
    cycle: "equal", 3); every later cycle first inserts ``insert_count`` pivots by ``insert_method``. The
    cycles continue one global step count: cycle ``c`` reads batches ``data(t)`` from where cycle ``c - 1``
    stopped.

    Args:
      objective: the pivot objective ``(params, batch, key) -> (loss, aux)`` (as for
        :func:`~mclandscape.methods.neb.neb`).
      start, end: the fixed end points.
      cycles: one :class:`NEBConfig` per cycle, or one config repeated ``num_cycles`` times.
      data: ``None``, a fixed batch or a batch stream ``step -> batch``.
      profile_fn: ``profile_fn(connector, ts) -> losses`` for the "highest" insertion and the final dense
        profile; default: ``objective`` on ``eval_data`` (or on ``data`` when that is a fixed batch) through
        the engine's ``map_points``. For a network with BatchNorm pass the engine's ``evaluate`` with
        recalibrated statistics, e.g. ``lambda band, ts: evaluate(model, connector_points(band, ts), data,
        bn_data=train).loss``.
      initial_insert, insert_count, insert_method, sub_pivots, insert_threshold: the insertion (module
        docstring, :func:`insertion_alphas`).
      seed, progress, devices: as for :func:`neb`.

    Returns:
      An :class:`AutoNEBResult`; ``cycles`` holds per cycle ``cycle``, ``num_pivots``, ``inserted``, ``steps``,
      ``converged``, ``perp_force``, ``par_force``, ``climbing``, ``max_pivot_loss`` and ``dense_max_loss``.

    Example:
        >>> import jax.numpy as jnp
        >>> from mclandscape.core.objective import function_objective
        >>> flat = function_objective(lambda p, batch: 0.0 * jnp.sum(p))
        >>> res = auto_neb(flat, jnp.array([0.0]), jnp.array([1.0]), cycles=[NEBConfig(steps=10)], sub_pivots=1)
        >>> [c["num_pivots"] for c in res.cycles], res.dense_t.shape  # the ends and 3 evenly inserted pivots
        ([5], (9,))
    """
    cycles = _check_cycles(cycles, num_cycles, initial_insert, sub_pivots, insert_method)
    _check_ends(start, end)
    if profile_fn is None:
        batch = eval_data if eval_data is not None else (None if callable(data) else data)
        if batch is None and callable(data):
            raise ValueError("data is a mini-batch callable: pass eval_data (a fixed batch) or a profile_fn "
                             "for the dense evaluation that places new pivots")
        profile_fn = functools.partial(_objective_profile, objective, batch)
    pivots, spacing = insert_pivots(tree_stack([start, end], names=["start", "end"]),
                                    [list(np.linspace(0, 1, initial_insert + 2)[1:-1])])
    records: list[dict] = []
    step_offset = 0
    key = jax.random.key(seed)
    dense_loss = None
    for c, cfg in enumerate(cycles):
        inserted: list[list[float]] = [[] for _ in range(_num_pivots(pivots) - 1)]
        if c > 0:
            inserted = insertion_alphas(None if insert_method == "equal" else dense_loss, _num_pivots(pivots),
                                        sub_pivots, count=insert_count, method=insert_method,
                                        threshold=insert_threshold)
            if any(inserted):
                pivots, spacing = insert_pivots(pivots, inserted, spacing)
        res = _relax(objective, pivots, spacing, cfg, data, step_offset=step_offset, key=key, progress=progress,
                     devices=devices)
        step_offset += res.steps
        pivots = res.pivots
        dense_t = dense_ts(res.num_pivots, sub_pivots)
        dense_loss = np.asarray(profile_fn(res.band, dense_t), np.float64)
        records.append({"cycle": c + 1, "num_pivots": res.num_pivots, "inserted": sum(len(a) for a in inserted),
                        "steps": res.steps, "converged": res.converged, "perp_force": res.perp_force,
                        "par_force": res.par_force, "climbing": bool(cfg.climbing),
                        "max_pivot_loss": float(np.max(res.losses)), "dense_max_loss": float(dense_loss.max())})
    return AutoNEBResult(band=band_connector(pivots), spacing=np.asarray(spacing), cycles=records,
                         dense_t=dense_t, dense_loss=dense_loss)


def _check_cycles(cycles, num_cycles, initial_insert: int, sub_pivots: int, insert_method: str) -> list:
    """The list of cycle configs of :func:`auto_neb`, after checking its insertion arguments."""
    if isinstance(cycles, NEBConfig):
        cycles = [cycles] * _checks.integer(num_cycles, "num_cycles", low=1, what="with a single NEBConfig")
    cycles = list(cycles)
    if not cycles:
        raise ValueError("auto_neb needs at least one cycle")
    _checks.integer(initial_insert, "initial_insert", low=1, what="a band needs N >= 3 pivots")
    _checks.integer(sub_pivots, "sub_pivots", low=1)
    _checks.choice(insert_method, "insert_method", ("equal", "highest"))
    return cycles


def _objective_profile(objective: Callable, batch, connector: Connector, ts) -> np.ndarray:
    """The pivot objective on ``batch`` at the points ``ts`` of ``connector`` (no key: no dropout), mapped by
    the engine: each point's parameters are formed inside the mapped computation."""
    return np.asarray(map_points(_point_loss, connector_points(connector, ts), objective, batch, None))


def evaluate_band(model, band: Connector | NEBResult | AutoNEBResult, train, test=None, *, sub_pivots: int = 9,
                  **kwargs) -> PathEvaluation:
    """Loss and accuracy on the dense interpolation of a band: its pivots and ``sub_pivots`` points between
    each pair (:func:`~mclandscape.methods.neb_forces.dense_ts`), the curve view
    :func:`~mclandscape.methods.curves.evaluate_curve` of the engine's ``evaluate`` (BatchNorm recalibrated
    per point, ``bn_data`` defaulting to ``train``).

    Args:
      model: the :class:`~mclandscape.engine.models.Model`.
      band: a band connector, :class:`~mclandscape.methods.neb.NEBResult` or :class:`AutoNEBResult`.
      train: the training data (and the default ``bn_data``).
      test: the test data (``None``: no test series).
      sub_pivots: points per gap.
      **kwargs: of :func:`~mclandscape.methods.curves.evaluate_curve` (``batch_size``, ``bn_data``, ...).

    Returns:
      A :class:`~mclandscape.methods.curves.PathEvaluation` (barrier, stats, length).

    Example:
        >>> import jax, numpy as np
        >>> from mclandscape.engine.models import get_model
        >>> from mclandscape.methods.neb_forces import straight_band
        >>> model = get_model("mlp", widths=[2], num_classes=2)
        >>> x, y = np.ones((4, 2), np.float32), np.array([0, 1, 0, 1])
        >>> p0, p1 = (model.init(jax.random.key(s), x)["params"] for s in (0, 1))
        >>> ev = evaluate_band(model, band_connector(straight_band(p0, p1, 3)), (x, y), sub_pivots=1)
        >>> len(ev.ts)
        5
    """
    conn = band if isinstance(band, Connector) else band.band
    if conn.kind != "polychain":
        raise ValueError(f"a band is a polychain connector, got a {conn.kind!r} connector")
    return evaluate_curve(model, conn, train, test, ts=dense_ts(conn.num_control, sub_pivots), **kwargs)
