"""Tests for mclandscape.methods.volume (N. Schager, "Volumetric investigation into neural network loss
landscapes": flats, voxel lattice, Algorithm 3, H_c(s), log-linear fit)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections import deque
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from mclandscape.core.objective import function_objective, make_objective
from mclandscape.core.tree import TreeMismatchError
from mclandscape.methods import flats as VF
from mclandscape.methods import lattice as VL
from mclandscape.methods import traversal as VT
from mclandscape.methods import volume as V

# ---------------------------------------------------------------------------------------------------------
# Analytic landscapes
# ---------------------------------------------------------------------------------------------------------

EPS = 0.1
MU = np.array([3.0, 0.0])  # centre of the second basin


def two_basin_np(theta: np.ndarray) -> np.ndarray:
    """f(θ) = ε + min(|θ|², 0.5 + |θ − μ|²) in float32: two low basins separated by a ridge."""
    theta = np.asarray(theta, np.float32)
    a = np.sum(theta * theta, axis=-1)
    b = np.float32(0.5) + np.sum((theta - MU.astype(np.float32)) ** 2, axis=-1)
    return (np.float32(EPS) + np.minimum(a, b)).astype(np.float32)


class CountingNumpyLattice:
    """Host-side evaluator f(s·a) that counts how many voxels it evaluated."""

    def __init__(self, fn, step, dim):
        self.fn, self.step, self.dim = fn, np.float32(step), dim
        self.count = 0
        self.calls = 0

    def __call__(self, coords):
        coords = np.asarray(coords)
        self.count += coords.shape[0]
        self.calls += 1
        return self.fn(coords.astype(np.float32) * self.step)


def quadratic(theta, aux):
    """f(θ) = θᵀAθ + ε: a module-level (hashable) loss with the batch ``aux = (A, ε)``."""
    A, eps = aux
    return theta @ A @ theta + eps


BOWL = function_objective(quadratic)


def bowl_batch(A, eps):
    return jnp.asarray(A, jnp.float32), jnp.float32(eps)


def _sq(p):
    """|θ|² of a parameter tree."""
    return sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(p))


def table_loss(theta, table):
    """A 1-D lookup table: the loss of voxel a (θ = a at θ* = 0, s = 1) is ``table[a + len(table) // 2]``."""
    return table[jnp.round(theta[0]).astype(jnp.int32) + table.shape[0] // 2]


def algorithm3_literal(f, m, n, limit=None):
    """A literal transcription of Algorithm 3 (FIFO, no dropout), one voxel at a time.

    Returns the partial result instead of 0 at the limit, and the accepted voxels separately from ``visited``;
    losses and the threshold c = n·ε are compared in the losses' dtype (float32).
    """
    origin = (0,) * m
    eps = np.float32(f(np.zeros((1, m), np.int64))[0])
    c = np.float32(n * float(eps))
    queue = deque([origin])
    visited = {origin}
    accepted = {origin}
    future = []
    evals, iterations = 1, 0
    while queue and (limit is None or iterations < limit):
        cur = queue.popleft()
        for i in range(m):
            for sign in (1, -1):
                nb = list(cur)
                nb[i] += sign
                nb = tuple(nb)
                if nb in visited:
                    continue
                loss = np.float32(f(np.array([nb], np.int64))[0])
                evals += 1
                if loss <= c:
                    queue.append(nb)
                    accepted.add(nb)
                else:
                    future.append(nb)
                visited.add(nb)
        iterations += 1
    return {"accepted": accepted, "visited": visited, "queue": list(queue), "future": future,
            "evals": evals, "iterations": iterations}


def as_tuples(coords):
    return [tuple(int(v) for v in row) for row in np.asarray(coords)]


def ellipsoid_volume(A, t):
    m = A.shape[0]
    unit = math.pi ** (m / 2) / math.gamma(m / 2 + 1)
    return unit * t ** (m / 2) / math.sqrt(np.linalg.det(A))


# ---------------------------------------------------------------------------------------------------------
# Volume of a quadratic bowl (H_c(s)·s^m -> ellipsoid volume)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("A,eps,steps,tol", [
    (np.array([[1.0, 0.3], [0.3, 2.0]]), 0.1, [0.2, 0.1, 0.025], 0.01),
    (np.array([[1.5, 0.2, 0.0], [0.2, 1.0, 0.1], [0.0, 0.1, 0.8]]), 0.05, [0.2, 0.1, 0.05], 0.02),
])
def test_bowl_h_times_sm_approaches_ellipsoid_volume(A, eps, steps, tol):
    m = A.shape[0]
    flat = VF.full_space_flat(jnp.zeros(m, jnp.float32))
    ts = [0.25, 1.0]  # c − ε
    mults = [1 + t / eps for t in ts]
    sweep = V.h_sweep(flat, BOWL, steps, mults, batch=bowl_batch(A, eps), config=VT.TraversalConfig(batch_size=256))
    assert not sweep.truncated.any()
    vol = sweep.volume()
    for j, t in enumerate(ts):
        exact = ellipsoid_volume(A, t)
        err = np.abs(vol[:, j] / exact - 1)
        # the finest step is within the stated tolerance, and much better than the coarsest
        assert err[-1] < tol, (t, err)
        assert err[-1] < err[0] or err[0] < tol
    # H grows with c and shrinks with s; H·s^m stays bounded
    assert np.all(np.diff(sweep.H, axis=1) > 0)
    assert np.all(np.diff(sweep.H, axis=0) > 0)
    # the whole-sweep continuation evaluated each voxel once: evaluations add up to the visited count
    assert np.array_equal(np.cumsum(sweep.evaluations, axis=1), sweep.visited)


def test_raw_and_qr_flats_measure_the_same_area():
    """A skewed 2-D flat through 0 in R^5 of f = |θ|² + ε: H·cell_volume(s) ≈ π(c − ε) for raw and QR bases."""
    d, eps = 5, 0.1
    th0 = {"w": jnp.zeros(d, jnp.float32)}
    th1 = {"w": jnp.array([1.0, 0.0, 0.0, 0.0, 0.0], jnp.float32)}
    th2 = {"w": jnp.array([0.5, 0.8660254, 0.0, 0.0, 0.0], jnp.float32) * 1.5}  # 60° to b_1, length 1.5
    loss = function_objective(lambda t, _: jnp.sum(t["w"] * t["w"]) + eps)
    t = 1.0
    n = 1 + t / eps
    areas = {}
    for kind in ("raw", "qr"):
        flat = VF.flat_from_minima([th0, th1, th2], basis=kind)
        np.testing.assert_allclose(flat.raw_angles_deg[0, 1], 60.0, atol=1e-4)
        s = 0.02
        res = VT.grid_traversal(VL.LatticeLoss(flat, s, loss), n)
        areas[kind] = res.H * flat.cell_volume(s)
        assert abs(areas[kind] / (math.pi * t) - 1) < 0.01, (kind, areas[kind])
    # the skewed lattice needs fewer voxels for the same area: cell factor sin(60°)·1·1.5
    flat_raw = VF.flat_from_minima([th0, th1, th2], basis="raw")
    np.testing.assert_allclose(flat_raw.cell_factor, 1.5 * math.sin(math.radians(60)), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Two basins: BFS = connected component of the sublevel set (not the whole sublevel set)
# ---------------------------------------------------------------------------------------------------------


def brute_force_components(step, c, half):
    grid = np.arange(-half, half + 1)
    aa, bb = np.meshgrid(grid, grid, indexing="ij")
    coords = np.stack([aa.ravel(), bb.ravel()], 1)
    f = two_basin_np(coords.astype(np.float32) * np.float32(step)).reshape(aa.shape)
    mask = f.astype(np.float64) <= c
    labels, _ = ndimage.label(mask)  # 4-connectivity: the ±e_i neighbourhood of Algorithm 3
    comp = labels == labels[half, half]
    return mask, comp, grid


@pytest.mark.parametrize("t,merged", [(1.5, False), (3.0, True)])
def test_two_basin_bfs_equals_brute_force_component(t, merged):
    s, half = 0.1, 60
    n = (EPS + t) / EPS
    ev = CountingNumpyLattice(two_basin_np, s, 2)
    res = VT.grid_traversal(ev, n, config=VT.TraversalConfig(batch_size=64))
    mask, comp, grid = brute_force_components(s, res.threshold, half)
    acc = res.state.accepted_coords()
    assert np.abs(acc).max() < half  # the bounding grid holds the component
    assert res.H == int(comp.sum()) == acc.shape[0]
    got = set(as_tuples(acc))
    want = {(int(grid[i]), int(grid[j])) for i, j in zip(*np.nonzero(comp), strict=True)}
    assert got == want
    near_second = np.linalg.norm(acc * s - MU, axis=1) < 0.5
    if merged:
        assert mask.sum() == comp.sum() and near_second.any()
    else:
        # the thesis (§4.3.3) defines R_c(s) as the whole sublevel set; the BFS (and H) only reaches the
        # component of the origin — the other basin is excluded
        assert mask.sum() > comp.sum() and not near_second.any()


# ---------------------------------------------------------------------------------------------------------
# Future-queue continuation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 50])
def test_continuation_equals_fresh_run_and_evaluates_only_new_voxels(batch_size):
    s = 0.1
    n1, n2 = (EPS + 1.5) / EPS, (EPS + 3.0) / EPS  # the second threshold merges the two basins
    ev_fresh = CountingNumpyLattice(two_basin_np, s, 2)
    fresh = VT.grid_traversal(ev_fresh, n2, config=VT.TraversalConfig(batch_size=batch_size))

    ev = CountingNumpyLattice(two_basin_np, s, 2)
    first = VT.grid_traversal(ev, n1, config=VT.TraversalConfig(batch_size=batch_size))
    kept = first.state.copy()
    visited_before = first.visited
    count_before = ev.count
    cont = VT.grid_traversal(ev, n2, state=first.state, config=VT.TraversalConfig(batch_size=batch_size))

    assert cont.H == fresh.H > first.H
    assert np.array_equal(cont.state.accepted_keys(), fresh.state.accepted_keys())
    k1, v1 = cont.state.visited_items()
    k2, v2 = fresh.state.visited_items()
    assert np.array_equal(k1, k2) and np.array_equal(v1, v2)
    # the continuation evaluated exactly the voxels that were new
    assert cont.evaluations == ev.count - count_before == fresh.visited - visited_before
    assert first.evaluations + cont.evaluations == ev_fresh.count == fresh.evaluations
    # the snapshot taken before continuing is untouched
    assert kept.visited == visited_before and kept.accepted == first.H
    again = VT.grid_traversal(CountingNumpyLattice(two_basin_np, s, 2), n1, config=VT.TraversalConfig(batch_size=batch_size))
    assert np.array_equal(kept.accepted_keys(), again.state.accepted_keys())
    assert np.array_equal(kept.future.to_array(), again.state.future.to_array())
    # the future queue holds exactly the visited voxels above the threshold, and H is the count below it
    for r in (fresh, cont):
        st = r.state
        fut = np.sort(st.future.to_array())
        keys, vals = st.store.items()
        assert np.array_equal(fut, np.sort(keys[vals.astype(np.float64) > r.threshold]))
        assert r.H == st.accepted_keys().size


def test_continuation_at_the_same_threshold_evaluates_nothing():
    ev = CountingNumpyLattice(two_basin_np, 0.2, 2)
    r1 = VT.grid_traversal(ev, 10.0)
    before = ev.count
    r2 = VT.grid_traversal(ev, 10.0, state=r1.state)
    assert ev.count == before and r2.evaluations == 0 and r2.H == r1.H


@pytest.mark.parametrize("x64", [False, True])
def test_losses_and_threshold_compare_in_one_dtype(x64):
    """c = n·ε and the losses are compared in the losses' dtype: a voxel whose loss is exactly c is accepted,
    fresh or re-checked from the future queue, and the next representable loss above c is rejected."""
    with jax.enable_x64(x64):
        dtype = np.float64 if x64 else np.float32
        eps, n = dtype(0.1), 3.0
        c = dtype(n * float(eps))  # the threshold, rounded once to the loss dtype
        above = np.nextafter(c, dtype(np.inf))
        # comparing float32 losses with the float64 product n·ε, or float64 losses rounded to float32, would
        # reject the voxels whose loss is exactly c
        if x64:
            assert np.float32(c) > c
        else:
            assert float(c) > n * float(eps)
        # voxels a = -3..3 of a 1-D lattice at θ* = 0, s = 1
        table = np.array([10.0, above, c, eps, c, above, 10.0], dtype)
        flat = VF.full_space_flat(jnp.zeros(1, dtype))
        ev = VL.LatticeLoss(flat, 1.0, function_objective(table_loss), jnp.asarray(table))
        assert ev(np.array([[1], [2]])).dtype == dtype
        res = VT.grid_traversal(ev, n)
        st = res.state
        assert st.dtype == dtype and st.store.items()[1].dtype == dtype
        assert res.threshold == float(c) and res.epsilon == float(eps)
        assert as_tuples(st.accepted_coords()) == [(-1,), (0,), (1,)] and res.H == 3
        assert sorted(as_tuples(st.codec.unpack(st.future.to_array()))) == [(-2,), (2,)]
        # below c first: the voxels at c wait in the future queue and are accepted on the re-check
        low = VT.grid_traversal(ev, 2.0)
        assert low.H == 1 and low.future_size == 2
        cont = VT.grid_traversal(ev, n, state=low.state)
        assert cont.H == 3 and cont.evaluations == 2 and cont.threshold == float(c)
        assert np.array_equal(cont.state.accepted_keys(), st.accepted_keys())
        # the sweep reports the thresholds it compared with
        sweep = V.h_sweep(flat, ev.objective, [1.0], [2.0, n], batch=ev.batch)
        assert sweep.loss_dtype == np.dtype(dtype).name and sweep.thresholds[-1] == float(c)
        assert sweep.H.tolist() == [[1, 3]]


# ---------------------------------------------------------------------------------------------------------
# Batched waves = one-at-a-time Algorithm 3 (FIFO, dropout 0)
# ---------------------------------------------------------------------------------------------------------


def aniso3_np(theta):
    theta = np.asarray(theta, np.float32)
    w = np.array([1.0, 2.5, 0.7], np.float32)
    return (np.float32(0.2) + np.sum(w * theta * theta, axis=-1) + np.float32(0.3) * np.sin(3 * theta[..., 0])
            ).astype(np.float32)


@pytest.mark.parametrize("fn,dim,step,n", [(two_basin_np, 2, 0.15, 31.0), (aniso3_np, 3, 0.2, 6.0)])
@pytest.mark.parametrize("limit", [None, 37])
def test_batched_waves_equal_literal_algorithm3(fn, dim, step, n, limit):
    ref = algorithm3_literal(CountingNumpyLattice(fn, step, dim), dim, n, limit=limit)
    for bs in (1, 3, 64, 100000):
        ev = CountingNumpyLattice(fn, step, dim)
        res = VT.grid_traversal(ev, n, config=VT.TraversalConfig(batch_size=bs, limit=limit))
        st = res.state
        assert set(as_tuples(st.accepted_coords())) == ref["accepted"], bs
        assert set(as_tuples(st.visited_items()[0])) == ref["visited"], bs
        assert as_tuples(st.codec.unpack(st.queue.to_array())) == ref["queue"], bs
        assert as_tuples(st.codec.unpack(st.future.to_array())) == ref["future"], bs
        assert res.evaluations == ev.count == ref["evals"], bs
        assert res.iterations == ref["iterations"]
        assert res.truncated == (limit is not None and len(ref["queue"]) > 0)
        if bs > 1:
            assert ev.calls < ref["evals"]  # batched: fewer calls than voxels


def test_step_limit_returns_partial_result_flagged_truncated():
    ev = CountingNumpyLattice(two_basin_np, 0.1, 2)
    res = VT.grid_traversal(ev, 16.0, config=VT.TraversalConfig(limit=5))
    assert res.truncated and res.iterations == 5 and res.queue_size > 0
    assert 1 < res.H < VT.grid_traversal(CountingNumpyLattice(two_basin_np, 0.1, 2), 16.0).H


def test_queue_emptying_exactly_at_the_limit_is_not_truncated():
    """Algorithm 3 returns 0 whenever iterations == limit, even if the traversal just finished.

    With radius² between 1 and 2 voxels only the origin and its 4 neighbours are accepted: 5 iterations.
    """
    step = 0.1
    n = (EPS + 1.5 * step ** 2) / EPS
    full = VT.grid_traversal(CountingNumpyLattice(two_basin_np, step, 2), n)
    assert full.H == 5 and full.iterations == 5
    at_limit = VT.grid_traversal(CountingNumpyLattice(two_basin_np, step, 2), n, config=VT.TraversalConfig(limit=5))
    assert at_limit.iterations == 5 and not at_limit.truncated and at_limit.H == 5
    short = VT.grid_traversal(CountingNumpyLattice(two_basin_np, step, 2), n, config=VT.TraversalConfig(limit=4))
    assert short.truncated and short.H == 5  # all accepted already, one still queued


def test_truncated_run_completes_on_continuation():
    ev = CountingNumpyLattice(two_basin_np, 0.1, 2)
    part = VT.grid_traversal(ev, 16.0, config=VT.TraversalConfig(limit=20))
    assert part.truncated
    done = VT.grid_traversal(ev, 16.0, state=part.state)
    fresh = VT.grid_traversal(CountingNumpyLattice(two_basin_np, 0.1, 2), 16.0)
    assert not done.truncated and done.H == fresh.H
    assert np.array_equal(done.state.accepted_keys(), fresh.state.accepted_keys())


# ---------------------------------------------------------------------------------------------------------
# Dropout and random dequeue
# ---------------------------------------------------------------------------------------------------------


def test_dropout_after_switch_only():
    # switch = 0: iteration 0 (the origin) is FIFO without dropout, every later neighbour is dropped
    ev = CountingNumpyLattice(aniso3_np, 0.2, 3)
    res = VT.grid_traversal(ev, 6.0, config=VT.TraversalConfig(dropout=1.0, sampling_switch_iter=0, batch_size=8))
    assert res.visited == 1 + 2 * 3 and res.dropped > 0 and res.queue_size == 0
    # no dropout before the switch: a late switch gives the plain BFS
    plain = VT.grid_traversal(CountingNumpyLattice(aniso3_np, 0.2, 3), 6.0)
    late = VT.grid_traversal(CountingNumpyLattice(aniso3_np, 0.2, 3), 6.0, config=VT.TraversalConfig(dropout=1.0, sampling_switch_iter=10 ** 9))
    assert late.H == plain.H and late.dropped == 0


def test_random_dequeue_reaches_the_same_component_and_dropout_is_reproducible():
    plain = VT.grid_traversal(CountingNumpyLattice(two_basin_np, 0.1, 2), 31.0)
    for bs in (1, 32):
        rnd = VT.grid_traversal(CountingNumpyLattice(two_basin_np, 0.1, 2), 31.0, key=3, config=VT.TraversalConfig(sampling_switch_iter=10, batch_size=bs))
        assert np.array_equal(rnd.state.accepted_keys(), plain.state.accepted_keys())
    kw = dict(config=VT.TraversalConfig(dropout=0.6, sampling_switch_iter=5, batch_size=16))
    a = VT.grid_traversal(CountingNumpyLattice(two_basin_np, 0.1, 2), 31.0, key=jax.random.key(1), **kw)
    b = VT.grid_traversal(CountingNumpyLattice(two_basin_np, 0.1, 2), 31.0, key=jax.random.key(1), **kw)
    c = VT.grid_traversal(CountingNumpyLattice(two_basin_np, 0.1, 2), 31.0, key=jax.random.key(2), **kw)
    assert np.array_equal(a.state.accepted_keys(), b.state.accepted_keys()) and a.dropped == b.dropped
    assert a.dropped > 0 and a.H <= plain.H
    assert not np.array_equal(a.state.accepted_keys(), c.state.accepted_keys()) or a.dropped != c.dropped
    # every accepted voxel is still inside the component of the plain run
    assert np.isin(a.state.accepted_keys(), plain.state.accepted_keys()).all()


# ---------------------------------------------------------------------------------------------------------
# Flats and the lattice
# ---------------------------------------------------------------------------------------------------------


def _random_minima(k, d, seed=0):
    rng = np.random.default_rng(seed)
    return [{"a": jnp.asarray(rng.normal(size=(d - 3,)), jnp.float32), "b": jnp.asarray(rng.normal(size=(3,)),
                                                                                      jnp.float32)}
            for _ in range(k)]


def test_flat_qr_basis_and_minima_coordinates():
    minima = _random_minima(4, 20)
    for anchor in (0, 2):
        qr = VF.flat_from_minima(minima, anchor=anchor, basis="qr")
        raw = VF.flat_from_minima(minima, anchor=anchor, basis="raw")
        assert qr.dim == raw.dim == 3 and qr.ambient_dim == 20
        Q = np.asarray(qr.basis, np.float64)
        np.testing.assert_allclose(Q.T @ Q, np.eye(3), atol=1e-6)
        # both bases span the same flat and place every minimum where it is: θ_j = θ* + B c_j
        for flat in (qr, raw):
            for j, mj in enumerate(minima):
                want = np.concatenate([np.asarray(mj["a"]), np.asarray(mj["b"])])
                got = np.asarray(flat.anchor, np.float64) + np.asarray(flat.basis, np.float64) @ flat.minima_coords[j]
                np.testing.assert_allclose(got, want, atol=1e-5)
        # q_1 points along b_1; diag(R) > 0
        assert np.all(np.diag(qr.minima_coords[[i for i in range(4) if i != anchor]].T) > 0)
        np.testing.assert_allclose(raw.cell_factor, np.sqrt(np.linalg.det(
            np.asarray(raw.basis, np.float64).T @ np.asarray(raw.basis, np.float64))), rtol=1e-5)
        assert raw.raw_angles_deg.shape == (3, 3) and np.all(raw.raw_angles_deg[~np.eye(3, dtype=bool)] > 0)
    # the anchor itself is the origin, exactly
    flat = VF.flat_from_minima(minima, anchor=1)
    p = flat.params(np.zeros(3, np.int64), 0.37)
    assert np.array_equal(np.asarray(p["a"]), np.asarray(minima[1]["a"]))
    # θ(a) = θ* + s·B·a
    a = np.array([[2, -1, 5]])
    np.testing.assert_allclose(np.asarray(flat.point(a, 0.1))[0],
                               np.asarray(flat.anchor) + 0.1 * np.asarray(flat.basis) @ a[0], rtol=1e-6, atol=1e-6)
    assert flat.describe()["kind"] == "qr"
    json.dumps(flat.describe())


def _theta(params):
    return params


def test_a_batch_of_voxels_is_rows_over_the_anchor_and_basis():
    """Voxels are Points of the one evaluator: rows [1, s·a_1..s·a_m] over the stack [θ*, b_1..b_m]."""
    from mclandscape.engine.points import Points, map_points

    minima = _random_minima(4, 20)
    coords = np.array([[0, 0, 0], [2, -1, 5], [-7, 3, 1]])
    for flat in (VF.flat_from_minima(minima, anchor=2), VF.flat_from_minima(minima, basis="raw"),
                 VF.full_space_flat(minima[0])):
        m, d = flat.dim, flat.ambient_dim
        a = coords if m == 3 else np.random.default_rng(0).integers(-5, 5, size=(3, d))
        a[0] = 0
        pts = flat.lattice_points(a, 0.1)
        assert isinstance(pts, Points) and pts.num_points == 3 and pts.num_stacked == m + 1
        np.testing.assert_array_equal(np.asarray(pts.rows), np.concatenate(
            [np.ones((3, 1), np.float32), a.astype(np.float32) * np.float32(0.1)], axis=1))
        basis = np.eye(d, dtype=np.float32) if flat.basis is None else np.asarray(flat.basis).T
        np.testing.assert_array_equal(np.asarray(flat.stack), np.concatenate([np.asarray(flat.anchor)[None], basis]))
        got = map_points(_theta, pts, chunk_size=2)
        assert np.array_equal(got[0], np.asarray(flat.anchor))  # the origin is θ* exactly
        want = np.asarray(flat.anchor, np.float64) + 0.1 * a @ basis.astype(np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(flat.point(a, 0.1)), got, rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    minima = _random_minima(3, 10)
    with pytest.raises(ValueError, match="at least two minima"):
        VF.flat_from_minima(minima[:1])
    dep = [minima[0], minima[1], jax.tree_util.tree_map(lambda a, b: a + 2 * (b - a), minima[0], minima[1])]
    with pytest.raises(ValueError, match="linearly dependent"):
        VF.flat_from_minima(dep)
    with pytest.raises(ValueError, match="equals the anchor"):
        VF.flat_from_minima([minima[0], minima[0]])
    with pytest.raises(ValueError, match="linearly dependent"):
        VF.flat_from_minima(_random_minima(6, 4))  # 5 directions in R^4
    with pytest.raises(TreeMismatchError):
        VF.flat_from_minima([minima[0], {"a": minima[1]["a"]}])
    with pytest.raises(ValueError, match="basis"):
        VF.flat_from_minima(minima, basis="gram")
    flat = VF.flat_from_minima(minima)
    loss = function_objective(lambda t, _: _sq(t) + 1.0)
    for s in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="step width"):
            VL.LatticeLoss(flat, s, loss)
        with pytest.raises(ValueError, match="step width"):
            V.h_sweep(flat, loss, [s], [2.0])
    with pytest.raises(ValueError, match="function_objective"):  # a plain function is not an objective
        VL.LatticeLoss(flat, 0.1, lambda t, _: _sq(t))
    ev = VL.LatticeLoss(flat, 0.1, loss)
    for n in (0.5, 0, -2, float("inf")):
        with pytest.raises(ValueError, match="multiplier"):
            VT.grid_traversal(ev, n)
    with pytest.raises(ValueError, match="dropout"):
        VT.grid_traversal(ev, 2.0, config=VT.TraversalConfig(dropout=1.5))
    with pytest.raises(ValueError, match="limit"):
        VT.grid_traversal(ev, 2.0, config=VT.TraversalConfig(limit=0))
    with pytest.raises(ValueError, match="strictly increasing"):
        V.h_sweep(flat, loss, [0.1], [3.0, 2.0])
    r = VT.grid_traversal(ev, 2.0, config=VT.TraversalConfig(limit=3))
    with pytest.raises(ValueError, match="must not decrease"):
        VT.grid_traversal(ev, 1.5, state=r.state)
    zero = VL.LatticeLoss(flat, 0.1, function_objective(lambda t, _: 0.0 * _sq(t)))
    with pytest.raises(ValueError, match="positive"):
        VT.grid_traversal(zero, 2.0)
    with pytest.raises(ValueError, match="integers"):
        flat.point(np.array([[0.5, 1.0]]), 0.1)
    with pytest.raises(ValueError, match="too large"):
        VL.LatticeCodec(16)
    with pytest.raises(ValueError, match="packable range"):
        VL.LatticeCodec(3).pack(np.array([[2 ** 20, 0, 0]]))
    with pytest.raises(ValueError, match="chunk"):
        VL.LatticeLoss(flat, 0.1, loss, chunk=0)

    with pytest.raises(ValueError, match="devices"):
        VL.LatticeLoss(flat, 0.1, loss, devices=jax.device_count() + 1)
    with pytest.raises(ValueError, match="max_batch"):
        VL.LatticeLoss(flat, 0.1, loss, max_batch=0)
    with pytest.raises(ValueError, match="loss must be a scalar"):
        VL.LatticeLoss(flat, 0.1, function_objective(_theta_pair))(np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match=r"shape \[K, 2\]"):
        ev(np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="integers"):
        ev(np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"2 losses for 1 voxel\(s\)"):
        VT.grid_traversal(lambda a: np.ones(2, np.float32), 2.0, dim=1)
    with pytest.raises(ValueError, match="cannot hold it exactly"):
        ev(np.array([[2 ** 24 + 1, 0]]))
    assert ev(np.array([[2 ** 24, 0]])).shape == (1,)
    with pytest.raises(ValueError, match="floating dtype"):
        VL.VoxelStore(dtype=np.int32)
    with pytest.raises(ValueError, match="two points"):
        V.fit_log_linear([1.0], [3.0])
    with pytest.raises(ValueError, match="positive"):
        V.fit_log_linear([1.0, 2.0], [3.0, 0.0])


def _theta_pair(theta, aux):
    return theta["b"][:2]


def test_radius_bounds_the_lattice():
    # the flat valley of f = ε + θ_2² along θ_1 is unbounded; radius keeps the traversal finite
    valley = lambda th: (np.float32(0.1) + th[..., 1] ** 2).astype(np.float32)  # noqa: E731
    res = VT.grid_traversal(CountingNumpyLattice(valley, 0.1, 2), 2.0, config=VT.TraversalConfig(radius=10))
    assert not res.truncated and res.out_of_bounds > 0
    assert res.H == 21 * 7  # |a_1| <= 10 and (0.1·a_2)² <= ε = 0.1: a_2 in -3..3


# ---------------------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 2, 3, 7, 15])
def test_codec_roundtrip(m):
    codec = VL.LatticeCodec(m)
    rng = np.random.default_rng(m)
    a = rng.integers(-codec.offset, codec.offset, size=(500, m))
    a[0] = -codec.offset
    a[1] = codec.offset - 1
    keys = codec.pack(a)
    assert keys.dtype == np.int64 and keys.min() >= 0
    assert np.array_equal(codec.unpack(keys), a)
    assert np.unique(keys).size == np.unique(a, axis=0).shape[0]


def test_voxel_store_matches_a_python_dict():
    rng = np.random.default_rng(0)
    store = VL.VoxelStore(capacity=16)
    ref = {}
    for _ in range(30):
        keys = np.unique(rng.integers(0, 5000, size=200))
        keys = keys[~np.isin(keys, np.fromiter(ref, np.int64, len(ref)))]
        vals = rng.normal(size=keys.size).astype(np.float32)
        store.insert(keys, vals)
        ref.update(zip(keys.tolist(), vals.tolist(), strict=True))
        q = rng.integers(0, 5000, size=300)
        assert np.array_equal(store.contains(q), np.array([int(k) in ref for k in q]))
    assert len(store) == len(ref) and store.capacity >= 2 * len(ref)
    k = np.fromiter(ref, np.int64, len(ref))
    np.testing.assert_array_equal(store.get(k), np.float32([ref[int(x)] for x in k]))
    with pytest.raises(ValueError, match="already stored"):
        store.insert(k[:1], np.float32([1.0]))
    with pytest.raises(KeyError):
        store.get(np.array([10 ** 9]))


def test_key_queue_fifo_and_random_pops():
    q = VL.KeyQueue(capacity=4)
    for i in range(10):
        q.push(np.arange(i * 5, i * 5 + 5))
        assert np.array_equal(q.pop_front(2), np.arange(i * 5 - 3 * i, i * 5 - 3 * i + 2))
    assert len(q) == 30
    rest = q.to_array()
    picked = q.pop_random(10, np.random.default_rng(0))
    assert len(q) == 20 and set(picked) | set(q.to_array()) == set(rest)
    assert len(set(picked)) == 10


# ---------------------------------------------------------------------------------------------------------
# Fit
# ---------------------------------------------------------------------------------------------------------


def test_fit_log_linear_recovers_exponential_growth():
    c = np.linspace(0.1, 2.0, 12)
    H = 191.29 * np.exp(1.989 * c)
    fit = V.fit_log_linear(c, H)
    np.testing.assert_allclose([fit.A, fit.B, fit.R], [191.29, 1.989, 1.0], rtol=1e-9)
    np.testing.assert_allclose(fit.predict(c), H, rtol=1e-9)
    noisy = H * np.exp(np.random.default_rng(0).normal(scale=0.3, size=c.size))
    f2 = V.fit_log_linear(c, noisy)
    assert 0.5 < f2.R < 1 and abs(f2.B - 1.989) < 0.6
    flat = V.fit_log_linear([1.0, 2.0], [5, 5])
    assert flat.B == 0 and math.isnan(flat.R) and flat.to_dict()["R"] is None


def test_sweep_fits_pooled_and_json():
    flat = VF.full_space_flat(jnp.zeros(2, jnp.float32))
    sweep = V.h_sweep(flat, BOWL, [0.2, 0.1], [2.0, 4.0, 8.0, 16.0], batch=bowl_batch(np.eye(2), 0.1))
    fits = sweep.fit()
    assert len(fits["per_step"]) == 2 and all(f is not None and f.B > 0 for f in fits["per_step"])
    assert fits["pooled"].num_points == 8
    # finer steps give more voxels: a vertical shift, so A(0.1) > A(0.2)
    assert fits["per_step"][1].A > fits["per_step"][0].A
    d = sweep.to_dict()
    json.dumps(d)
    assert d["H"] == sweep.H.tolist() and d["fit_pooled"]["num_points"] == 8
    summary = V.mean_log_h([sweep, sweep])
    np.testing.assert_allclose(summary["mean_log_H"], np.log(sweep.H))
    np.testing.assert_allclose(summary["std_log_H"], 0.0)


def test_sweep_without_continuation_matches_but_costs_more():
    flat = VF.full_space_flat(jnp.zeros(2, jnp.float32))
    eye = bowl_batch(np.eye(2), 0.1)
    a = V.h_sweep(flat, BOWL, [0.1], [2.0, 6.0, 11.0], batch=eye)
    b = V.h_sweep(flat, BOWL, [0.1], [2.0, 6.0, 11.0], batch=eye, continue_future_queue=False)
    assert np.array_equal(a.H, b.H)
    assert a.evaluations.sum() < b.evaluations.sum()


# ---------------------------------------------------------------------------------------------------------
# Neural-network loss on a flat (Iris 4-8-3 MLP), bucket invariance, plots
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def iris_setup():
    from sklearn.datasets import load_iris

    from mclandscape.engine.models import get_model

    x, y = load_iris(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)

    class DS:
        pass

    data = DS()
    data.x, data.y = x, y.astype(np.int32)
    model = get_model("mlp", widths=[8], num_classes=3)
    # four random inits in one compiled call (the same values as model.init(jax.random.key(i), ...) one by one)
    keys = jnp.stack([jax.random.key(i) for i in range(4)])
    stacked = jax.jit(jax.vmap(model.init, in_axes=(0, None)))(keys, jnp.asarray(x[:2]))
    minima = [jax.tree_util.tree_map(lambda a, i=i: a[i], stacked) for i in range(4)]
    return model, data, minima


def test_model_loss_on_an_iris_flat_is_exact_and_bucket_invariant(iris_setup):
    from mclandscape.core.losses import cross_entropy

    model, data, minima = iris_setup
    params = [v["params"] for v in minima]
    flat = VF.flat_from_minima(params[:3], anchor=1, basis="qr")
    loss, batch = make_objective(model, train=False, variables=minima[1]), (data.x, data.y)
    assert flat.ambient_dim == 4 * 8 + 8 + 8 * 3 + 3
    # the origin is the anchor minimum: its loss is the model's loss
    direct = float(jnp.mean(cross_entropy(model.apply(minima[1], jnp.asarray(data.x)), jnp.asarray(data.y))))
    small = VL.LatticeLoss(flat, 0.05, loss, batch, max_batch=16)
    big = VL.LatticeLoss(flat, 0.05, loss, batch, max_batch=4096)
    np.testing.assert_allclose(small(np.zeros((1, 2), np.int64))[0], direct, rtol=1e-6)
    # a voxel gets bit-identical parameters and losses whatever bucket or position it is evaluated in
    coords = np.random.default_rng(0).integers(-30, 30, size=(300, 2))
    ref = big(coords)
    assert np.array_equal(small(coords), ref)
    for k in (1, 2, 5, 17, 100):
        assert np.array_equal(big(coords[:k]), ref[:k])
    perm = np.random.default_rng(1).permutation(300)
    assert np.array_equal(big(coords[perm]), ref[perm])
    assert big.bucket(5) == 16 and big.bucket(17) == 32 and big.bucket(300) == 512
    # the loss at θ(a) is the model's loss at flat.params(a)
    p = flat.params(coords[7], 0.05)
    want = float(jnp.mean(cross_entropy(model.apply({"params": p}, jnp.asarray(data.x)), jnp.asarray(data.y))))
    np.testing.assert_allclose(big(coords[7:8])[0], want, rtol=1e-5)


def test_iris_voxel_losses_agree_with_the_model_path(iris_setup):
    """The objective on a flat's voxels equals the one evaluator's model path on the same voxels."""
    from mclandscape.core.tree import tree_stack
    from mclandscape.engine.evaluate import evaluate
    from mclandscape.engine.points import Points

    model, data, minima = iris_setup
    params = [v["params"] for v in minima]
    flat = VF.flat_from_minima(params[:3], basis="raw")
    coords = np.random.default_rng(2).integers(-10, 10, size=(20, 2))
    got = VL.LatticeLoss(flat, 0.1, make_objective(model, train=False, variables=minima[0]), (data.x, data.y))(coords)
    stack = tree_stack([flat.unravel(v) for v in flat.stack])
    want = evaluate(model, Points(rows=jnp.asarray(flat.lattice_rows(coords, 0.1)), stack=stack),
                    (data.x, data.y), batch_size=len(data.x), strategy="map", chunk_size=4).loss
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # "mse_onehot" comes from the one loss registry
    sq = VL.LatticeLoss(flat, 0.1, make_objective(model, "mse_onehot", train=False), (data.x, data.y))
    assert sq(coords[:3]).shape == (3,) and np.all(sq(coords[:3]) > 0)


def test_a_second_traversal_or_sweep_compiles_nothing(iris_setup, count_compiles):
    """The evaluator is one module-level jit: new flats, step widths, evaluators and losses with the same
    function and shapes reuse what the first run compiled."""
    A = np.array([[1.0, 0.3], [0.3, 2.0]])

    def sweep():
        flat = VF.full_space_flat(jnp.zeros(2, jnp.float32))
        return V.h_sweep(flat, BOWL, [0.2, 0.1], [2.0, 6.0], batch=bowl_batch(A, 0.1), max_batch=256,
                         config=VT.TraversalConfig(batch_size=64))

    first = sweep()
    with count_compiles() as seen:
        again = sweep()
    assert seen == [] and np.array_equal(again.H, first.H)

    model, data, minima = iris_setup
    params = [v["params"] for v in minima]

    def traverse():
        flat = VF.flat_from_minima(params[:3], basis="qr")
        from mclandscape.engine.models import get_model

        rebuilt = get_model(model.spec)  # as a notebook would: equal by value, compiled once
        loss = make_objective(rebuilt, train=False, variables=minima[0])  # a new objective of the same structure
        return VT.grid_traversal(VL.LatticeLoss(flat, 0.2, loss, (data.x, data.y), max_batch=128), 1.3,
                                 config=VT.TraversalConfig(limit=300))

    a = traverse()
    with count_compiles() as seen:
        b = traverse()
    assert seen == [] and b.H == a.H


def test_sharded_evaluation_matches_single_device(tmp_path: Path, subprocess_env):
    code = textwrap.dedent("""
        import json, numpy as np, jax, jax.numpy as jnp
        from mclandscape.methods import flats as VF
        from mclandscape.methods import lattice as VL
        from mclandscape.methods import traversal as VT
        from mclandscape.methods import volume as V
        assert jax.device_count() == 2
        A = jnp.array([[1.0, 0.3], [0.3, 2.0]], jnp.float32)
        flat = VF.full_space_flat(jnp.zeros(2, jnp.float32))
        from mclandscape.core.objective import function_objective
        loss = function_objective(lambda t, _: t @ A @ t + 0.1)
        res = {}
        for devices in (1, 2):
            ev = VL.LatticeLoss(flat, 0.05, loss, chunk=3, devices=devices)
            assert ev.num_devices == devices and ev.bucket(5) == (9 if devices == 1 else 12)
            r = VT.grid_traversal(ev, 11.0)
            k, v = r.state.visited_items()
            res[str(devices)] = [r.H, k.tolist(), v.tolist()]
        assert VL.LatticeLoss(flat, 0.05, loss, chunk=3).num_devices == 2  # default: all devices
        print(json.dumps(res))
    """)
    # the suite's compiler flags (no LLVM optimisation) and its persistent compilation cache, two host devices
    env = dict(subprocess_env, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["2"] == res["1"] and res["2"][0] > 500


def test_experiment_writes_results_json_for_every_setting(tmp_path: Path, capsys):
    """The experiment in this process (its compilations shared with the tests above), small: every setting's
    tables, fits and figures; raw and QR flats of one anchor share ε, and H never falls as c grows."""
    from experiments.volume_bfs import main

    out = tmp_path / "vb"
    main(["--out", str(out), "--train-steps", "40", "--num-minima", "4", "--multipliers", "1.5,3,6",
          "--synthetic-dims", "2", "--synthetic-steps", "0.2", "--synthetic-multipliers", "1.5,3",
          "--steps-2d", "1.0,0.5", "--steps-3d", "1.0", "--minima-step", "1.0", "--distance-steps", "2.0",
          "--distance-multipliers", "2,5,10", "--limit", "300", "--distance-limit", "100",
          "--synthetic-limit", "300", "--max-batch", "16"])
    assert "wrote" in capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    want = {"synthetic_d2", "iris_2d_qr", "iris_3d_qr", "minima_anchor0", "minima_anchor1", "minima_anchor2",
            "basis_raw", "basis_raw_rescaled", "basis_qr", "distance_anchor0", "distance_anchor3", "distance_mean"}
    settings = saved["settings"]
    assert want <= set(settings)
    for name in want - {"distance_mean"}:
        s = settings[name]
        S, N = len(s["steps"]), len(s["multipliers"])
        assert np.asarray(s["H"]).shape == (S, N) and np.asarray(s["truncated"]).shape == (S, N)
        assert np.all(np.asarray(s["H"]) >= 1) and np.all(np.asarray(s["wall_time"]) >= 0)
        assert np.all(np.diff(np.asarray(s["H"]), axis=1) >= 0)
        assert np.all(np.asarray(s["visited"]) >= np.asarray(s["H"]))
        assert "fit_pooled" in s and "fit_per_step" in s and len(s["fit_per_step"]) == S
        assert s["wall_time_total"] > 0
    assert settings["iris_3d_qr"]["dim"] == 3 and settings["iris_2d_qr"]["dim"] == 2
    assert settings["synthetic_d2"]["flat"]["kind"] == "full"
    assert settings["basis_raw"]["flat"]["kind"] == "raw" and settings["basis_qr"]["flat"]["kind"] == "qr"
    assert settings["basis_raw"]["epsilon"] == settings["basis_qr"]["epsilon"]  # the same anchor minimum
    assert 0 < saved["basis_angle_deg"] < 180
    assert len(saved["iris_minima"]["train_loss"]) == 4
    assert np.asarray(settings["distance_mean"]["mean_log_H"]).shape == (1, 3)
    for fig in saved["figures"]:
        assert (out / fig).stat().st_size > 5000
    assert len(saved["figures"]) == 6
