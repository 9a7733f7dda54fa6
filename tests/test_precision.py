"""float64 is honoured with ``jax_enable_x64``: NEB (spacing weights, spring constant, inserted pivots, forces,
the relaxed band and its profile), volumes (voxel losses, ε, c = n·ε and the one-dtype comparison of the BFS)
and curvature (HVP, dense Hessian, the Lanczos / power-iteration / Hutchinson vectors) compute in float64.

Every test enables x64 only inside ``jax.enable_x64(True)`` and creates its arrays there, so the other tests
stay float32. Each float64 check is tighter than float32 round-off (~1e-7 relative) could pass, so it fails
if any stage falls back to float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mclandscape.core.objective import function_objective, make_objective
from mclandscape.core.tree import tree_ravel
from mclandscape.engine.models import get_model
from mclandscape.engine.points import connector_points, map_points
from mclandscape.methods import autoneb as AN
from mclandscape.methods import flats as VF
from mclandscape.methods import lattice as VL
from mclandscape.methods import neb as N
from mclandscape.methods import neb_forces as F
from mclandscape.methods import traversal as VT
from mclandscape.methods.curvature import (
    dense_hessian,
    hutchinson_trace,
    hvp,
    lanczos,
    make_hvp,
    power_iteration,
)

# ---- NEB ------------------------------------------------------------------------------------------------

SPACING = [1.0, 1.1, 0.9, 1.3]  # target weights whose normalised values float32 cannot hold


def _normalised(w):
    w = np.asarray(w, np.float64)
    return w * (w.size / w.sum())


def test_neb_spacing_spring_constant_and_forces_in_float64():
    with jax.enable_x64(True):
        w = _normalised(SPACING[:2])
        # a 1-D band whose segment lengths are exactly proportional to the weights: the spring is at rest
        piv = jnp.asarray([[0.0], [w[0] / w.sum()], [1.0]])
        f = F.neb_forces(piv, jnp.zeros(3), jnp.zeros((1, 1)), 1.0, spacing=SPACING[:2])
        assert f.par_norm.dtype == jnp.float64 and f.total.dtype == jnp.float64
        assert float(f.par_norm[0]) < 1e-14  # float32 weights leave ~1e-8

        # one plain SGD step of the engine step: x1 <- x1 + lr k (|d1|/w1 - |d0|/w0) on a flat loss
        k, lr, x1 = 0.1, 1.0, 0.3  # k = 0.1 is not a float32 number
        piv = jnp.asarray([[0.0], [x1], [1.0]])
        step = N.make_neb_step(function_objective(lambda p, b: 0.0 * jnp.sum(p)), N.NEBConfig(spring_constant=k, learning_rate=lr,
                                                                          momentum=0.0), piv, SPACING[:2])
        state, metrics = step(step.init(piv), N.NEBBatch(None, jnp.asarray(False)), jax.random.key(0))
        want = x1 + lr * k * ((1.0 - x1) / w[1] - x1 / w[0])
        assert state.params.dtype == jnp.float64 and metrics["max_par_force"].dtype == jnp.float64
        assert abs(float(state.params[1, 0]) - want) < 1e-15
        assert abs(float(metrics["max_par_force"]) - k * abs((1.0 - x1) / w[1] - x1 / w[0])) < 1e-15


def test_inserted_pivots_in_float64():
    with jax.enable_x64(True):
        a, b = np.array([0.1, -2.3]), np.array([1.7, 0.4])
        piv = jnp.asarray(np.stack([a, 0.5 * (a + b), b]))
        new, w = AN.insert_pivots(piv, [[1.0 / 3.0], []])
        assert new.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(new)[[0, 2, 3]], np.asarray(piv))  # old pivots copied exactly
        np.testing.assert_allclose(np.asarray(new)[1], (2 * a + 0.5 * (a + b)) / 3, rtol=0, atol=1e-15)
        np.testing.assert_allclose(w, _normalised([1 / 3, 2 / 3, 1.0]), rtol=1e-15)


def valley(p, batch=None):
    """A curved valley: zero loss on the parabola y = x², steep across it."""
    return (p[1] - p[0] ** 2) ** 2


def test_neb_relaxes_to_float64_precision():
    """The band settles on the valley floor with the spring at rest for non-uniform weights and a spring
    constant float32 cannot hold, to far below float32 round-off; the profile is float64 too."""
    with jax.enable_x64(True):
        start, end = jnp.asarray([-1.0, 1.0]), jnp.asarray([1.0, 1.0])
        cfg = N.NEBConfig(steps=3000, spring_constant=0.7, learning_rate=0.05, momentum=0.5, tol=1e-11,
                          check_every=50)
        res = N.neb(function_objective(valley), start, end, num_pivots=5, spacing=SPACING, config=cfg)
        assert res.converged and res.pivots.dtype == jnp.float64 and res.perp_force < 1e-11
        p = np.asarray(res.pivots)
        assert np.abs(p[1:-1, 1] - p[1:-1, 0] ** 2).max() < 1e-9  # on the floor
        rel = np.linalg.norm(np.diff(p, axis=0), axis=1) / _normalised(SPACING)
        assert np.ptp(rel) / rel.mean() < 1e-10  # lengths in the target ratios
        np.testing.assert_allclose(res.spacing, _normalised(SPACING), rtol=1e-15)
        assert res.losses.max() < 1e-18
        # the dense profile through the evaluator, against float64 NumPy on the same polygon
        ts = np.array([0.1, 0.3, 0.55, 0.8])
        prof = map_points(valley, connector_points(res.band, ts))
        pos = ts * (len(p) - 1)
        i = np.minimum(pos.astype(int), len(p) - 2)
        pts = p[i] + (pos - i)[:, None] * (p[i + 1] - p[i])
        assert prof.dtype == np.float64
        np.testing.assert_allclose(prof, (pts[:, 1] - pts[:, 0] ** 2) ** 2, rtol=1e-12)
        assert prof.min() > 1e-6  # between pivots the chord leaves the floor: the profile is not trivially 0


# ---- volumes ----------------------------------------------------------------------------------------------

def table_loss(theta, table):
    """The loss of voxel a of a 1-D lattice (θ = a at θ* = 0, s = 1) is ``table[a + len(table) // 2]``."""
    return table[jnp.round(theta[0]).astype(jnp.int32) + table.shape[0] // 2]


@pytest.mark.parametrize("x64,dtype", [(False, np.float32), (True, np.float32), (True, np.float64)],
                         ids=["f32", "x64-f32-loss", "x64-f64-loss"])
def test_voxel_at_the_threshold_is_accepted_on_host_and_device(x64, dtype):
    """A voxel whose loss equals c = n·ε exactly is accepted and the next number above c rejected, and the
    BFS's decisions equal the comparison made on the device (``jnp``) and on the host (NumPy), with c as
    the rounded array or as the Python float the result reports."""
    with jax.enable_x64(x64):
        eps, n = dtype(0.1), 3.0
        c = dtype(n * float(eps))
        above = np.nextafter(c, dtype(np.inf))
        if dtype == np.float32:  # c is rounded: the float64 product n·ε would reject the voxels at c
            assert float(c) > n * float(eps)
        table = np.array([10.0, above, c, eps, c, above, 10.0], dtype)  # voxels a = -3..3
        flat = VF.full_space_flat(jnp.zeros(1, dtype))
        ev = VL.LatticeLoss(flat, 1.0, function_objective(table_loss), jnp.asarray(table))
        res = VT.grid_traversal(ev, n)
        st = res.state
        assert st.dtype == dtype and res.epsilon == float(eps) and res.threshold == float(c)
        coords, losses = st.visited_items()
        np.testing.assert_array_equal(losses, table[coords[:, 0] + 3])  # stored exactly in the loss dtype
        accepted = {int(a) for a in st.accepted_coords()[:, 0]}
        assert accepted == {-1, 0, 1} and res.H == 3
        dev = jnp.asarray(losses)
        for mask in (np.asarray(dev <= jnp.asarray(c)), np.asarray(dev <= res.threshold), losses <= c,
                     losses <= res.threshold):
            assert {int(a) for a in coords[mask, 0]} == accepted
        # the same voxels from the future queue, re-checked against c from the stored losses
        cont = VT.grid_traversal(ev, n, state=VT.grid_traversal(ev, 2.0).state)
        assert np.array_equal(cont.state.accepted_keys(), st.accepted_keys()) and cont.evaluations == 2


def _vector_mse(theta, aux):
    x, y = aux
    w, b = theta[:2], theta[2]
    return jnp.mean((x @ w + b - y) ** 2) + 1e-3


def test_voxel_losses_and_epsilon_in_float64():
    """With float64 minima the lattice points, voxel losses, ε and c are float64 and equal the loss of
    θ* + s·B·a computed in float64 NumPy to round-off far below float32's."""
    with jax.enable_x64(True):
        r = np.random.default_rng(0)
        x, y = r.normal(size=(20, 2)), r.normal(size=20)
        minima = [jnp.asarray(r.normal(size=3)) for _ in range(3)]
        flat = VF.flat_from_minima(minima, basis="raw")
        ev = VL.LatticeLoss(flat, 0.05, function_objective(_vector_mse), (jnp.asarray(x), jnp.asarray(y)))
        coords = np.array([[0, 0], [1, -2], [3, 1]])
        got = ev(coords)
        assert got.dtype == np.float64 and ev(np.zeros((0, 2), np.int64)).dtype == np.float64
        m = np.asarray(minima)
        theta = m[0] + 0.05 * coords @ (m[1:] - m[0])
        want = np.mean((theta[:, :2] @ x.T + theta[:, 2:] - y) ** 2, axis=1) + 1e-3
        np.testing.assert_allclose(got, want, rtol=1e-13)
        res = VT.grid_traversal(ev, 1.0001, config=VT.TraversalConfig(limit=50))
        assert res.state.dtype == np.float64 and res.epsilon == float(got[0])  # ε = f(θ*) held exactly
        assert res.threshold == 1.0001 * res.epsilon and res.H > 1


def test_model_objective_on_a_lattice_in_float64():
    with jax.enable_x64(True):
        model = get_model("mlp", widths=[3], num_classes=2, activation="tanh")
        x = jax.random.normal(jax.random.key(0), (12, 2), jnp.float64)
        y = jax.random.randint(jax.random.key(1), (12,), 0, 2)
        v = jax.jit(model.init)(jax.random.key(2), x)  # one compiled program, not one per eager operation
        p64 = jax.tree_util.tree_map(lambda t: t.astype(jnp.float64), v["params"])
        loss = make_objective(model, train=False)
        flat = VF.full_space_flat(p64)
        got = VL.LatticeLoss(flat, 1e-3, loss, (x, y))(np.array([[0] * flat.dim, [1] + [0] * (flat.dim - 1)]))
        obj = make_objective(model, "cross_entropy", train=False)
        vec, unravel = tree_ravel(p64)
        ref = jax.jit(lambda d: obj(unravel(vec + d), (x, y))[0])
        want = [float(ref(d)) for d in (jnp.zeros(flat.dim), jnp.eye(flat.dim)[0] * 1e-3)]
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-13)


# ---- curvature --------------------------------------------------------------------------------------------

A = np.array([[2.1, 0.3, -0.7, 0.1], [0.3, 1.3, 0.2, 0.0], [-0.7, 0.2, -0.9, 0.4], [0.1, 0.0, 0.4, 0.55]])


def _quad(p, batch=None, key=None):  # an objective of the parameters alone
    return 0.5 * p["w"] @ jnp.asarray(A) @ p["w"] + 0.1 * jnp.sum(p["w"] ** 3), {}


def _hess_at(w):
    return A + np.diag(0.6 * w)


def test_hvp_and_dense_hessian_in_float64():
    with jax.enable_x64(True):
        w = np.array([0.3, -1.1, 0.7, 0.2])
        params, v = {"w": jnp.asarray(w)}, {"w": jnp.asarray([1.0, 0.1, -0.3, 0.7])}
        hv = hvp(_quad, params, v)["w"]
        assert hv.dtype == jnp.float64
        np.testing.assert_allclose(hv, _hess_at(w) @ np.asarray(v["w"]), rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(make_hvp(_quad, params)(v)["w"], hv, rtol=1e-15)
        np.testing.assert_allclose(dense_hessian(_quad, params), _hess_at(w), rtol=1e-14, atol=1e-15)


def test_power_iteration_k2_and_start_vectors_in_float64():
    """power_iteration(k=2) on float64 parameters (through the HVP and through a plain tree matvec, whose
    products once came back as read-only views) converges to float64 accuracy; the Lanczos start vector and
    Hutchinson's Gaussian probes are float64 draws (one Lanczos step is the Rayleigh quotient of the start)."""
    with jax.enable_x64(True):
        w = np.array([0.3, -1.1, 0.7, 0.2])
        H = _hess_at(w)
        ev = np.linalg.eigvalsh(H)
        top2 = ev[np.argsort(-np.abs(ev))][:2]
        params = {"w": jnp.asarray(w)}
        for mv in (make_hvp(_quad, params), lambda t: {"w": jnp.asarray(H) @ t["w"]}):
            res = power_iteration(mv, params, key=jax.random.key(0), k=2, num_iter=5000, tol=1e-15)
            np.testing.assert_allclose(res.values, top2, rtol=1e-10)
            assert all(u["w"].dtype == jnp.float64 for u in res.vectors) and res.residuals.max() < 1e-6
            u = np.stack([np.asarray(u["w"]) for u in res.vectors])
            np.testing.assert_allclose(u @ u.T, np.eye(2), atol=1e-12)
        q = np.asarray(jax.random.normal(jax.random.key(1), (4,), jnp.float64))
        one = lanczos(make_hvp(_quad, params), params, key=jax.random.key(1), num_iter=1)
        assert abs(one.values[0] - q @ H @ q / (q @ q)) < 1e-13
        full = lanczos(make_hvp(_quad, params), params, key=jax.random.key(1), num_iter=4, k=4, return_vectors=True)
        np.testing.assert_allclose(full.values, ev[::-1], rtol=1e-12)
        assert full.vectors[0]["w"].dtype == jnp.float64
        tr = hutchinson_trace(make_hvp(_quad, params), params, key=jax.random.key(2), num_samples=3,
                              distribution="gaussian")
        probes = [np.asarray(jax.random.normal(k, (4,), jnp.float64)) for k in jax.random.split(jax.random.key(2), 3)]
        np.testing.assert_allclose(tr.samples, [p @ H @ p for p in probes], rtol=1e-13)
