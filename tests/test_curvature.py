"""Curvature tools (HVP, Lanczos, power iteration, Hutchinson, dense Hessian) on the one objective, compiling
once, in float32 and float64, and Theorem 1 of Chen et al., 2021 ('Deforming the loss surface to affect the
behaviour of the optimizer', AAAI)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mclandscape.core.objective import function_objective, make_objective
from mclandscape.core.tree import tree_ravel
from mclandscape.engine.batches import batch_stream
from mclandscape.engine.data import Dataset
from mclandscape.engine.models import get_model
from mclandscape.methods.curvature import (
    HVP,
    dense_hessian,
    hessian_eigenvalues,
    hutchinson_trace,
    hvp,
    lanczos,
    make_hvp,
    power_iteration,
    top_hessian_eigenvalues,
)
from mclandscape.methods.deform import AP, LE, Squared, deformed_hessian_formula, vdm_loss


@pytest.fixture(scope="module")
def ce_problem():
    """A 4-6-3 tanh MLP (51 parameters) with cross-entropy on 32 random examples, after a few SGD steps.

    ``loss_fn`` is the model's objective in inference mode, ``(params, batch) -> (loss, aux)``."""
    model = get_model("mlp", widths=[6], num_classes=3, activation="tanh")
    x = jax.random.normal(jax.random.key(0), (32, 4))
    y = jax.random.randint(jax.random.key(1), (32,), 0, 3)
    variables = model.init(jax.random.key(2), x)
    loss_fn = make_objective(model, "cross_entropy", train=False, variables=variables)
    params = variables["params"]
    params0 = jax.tree_util.tree_map(lambda a: 3.0 * a, params)  # a steep, non-critical point
    opt = optax.sgd(0.5)

    def step(carry, _):  # 30 SGD steps in one compiled scan (op by op they took seconds)
        p, st = carry
        u, st = opt.update(jax.grad(lambda q: loss_fn(q, (x, y))[0])(p), st)
        return (optax.apply_updates(p, u), st), None

    (params, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), None, length=30))(params)
    H = dense_hessian(loss_fn, params, (x, y))
    return model, loss_fn, params, (x, y), H, params0


def test_dense_hessian_and_hvp(ce_problem):
    _, loss_fn, params, batch, H, _ = ce_problem
    flat, unravel = tree_ravel(params)
    H_ref = np.asarray(jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), batch)[0]))(flat), np.float64)
    np.testing.assert_allclose(H, H_ref, atol=1e-5)
    assert np.allclose(H, H.T)
    v = jax.random.normal(jax.random.key(3), flat.shape)
    hv, _ = tree_ravel(hvp(loss_fn, params, unravel(v), batch))
    np.testing.assert_allclose(np.asarray(hv), H @ np.asarray(v, np.float64), rtol=1e-4, atol=1e-5)
    # a plain scalar loss function gives the same Hessian as the objective
    scalar = lambda p, b: loss_fn(p, b)[0]
    np.testing.assert_allclose(dense_hessian(function_objective(scalar), params, batch), H, atol=1e-6)
    hv2, _ = tree_ravel(hvp(function_objective(scalar), params, unravel(v), batch))
    np.testing.assert_allclose(np.asarray(hv2), np.asarray(hv), rtol=1e-6, atol=1e-7)


def _stream(x, y, batch_size):
    return batch_stream(Dataset(np.asarray(x), np.asarray(y), 3, "toy"), batch_size, drop_last=False, pad=True)


def test_dataset_hvp_over_unequal_batches_equals_full_batch(ce_problem):
    _, loss_fn, params, (x, y), H, _ = ce_problem
    stream = _stream(x, y, 13)  # 13 + 13 + 6 examples (the last batch padded)
    assert [float(np.sum(stream(t)[2])) for t in range(stream.steps_per_epoch)] == [13, 13, 6]
    flat, unravel = tree_ravel(params)
    v = jax.random.normal(jax.random.key(4), flat.shape)
    hv, _ = tree_ravel(make_hvp(loss_fn, params, stream)(unravel(v)))
    np.testing.assert_allclose(np.asarray(hv), H @ np.asarray(v, np.float64), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dense_hessian(loss_fn, params, stream), H, atol=1e-5)
    with pytest.raises(ValueError, match="function_objective"):  # the old scalar protocol
        make_hvp(lambda p, b, k: jnp.sum(p["Dense_0"]["kernel"] ** 2), params, (x, y))(unravel(v))
    with pytest.raises(ValueError, match="objective must be callable"):
        make_hvp(None, params, (x, y))
    mv = make_hvp(loss_fn, params, stream)
    assert isinstance(mv, HVP) and mv.dim == flat.size
    np.testing.assert_allclose(mv.flat(np.asarray(v, np.float64)), np.asarray(hv), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="flat vector"):
        mv.flat(np.zeros(3))


def test_lanczos_equals_dense_spectrum(ce_problem):
    _, loss_fn, params, batch, H, _ = ce_problem
    ev = np.linalg.eigvalsh(H)
    d = H.shape[0]
    mv = make_hvp(loss_fn, params, batch)
    full = lanczos(mv, params, key=jax.random.key(5), num_iter=d, k=5, return_vectors=True)
    np.testing.assert_allclose(full.values, ev[::-1][:5], rtol=1e-4, atol=1e-5)
    for lam, u in zip(full.values, full.vectors, strict=True):  # the Ritz vectors are eigenvectors
        uf = np.asarray(tree_ravel(u)[0], np.float64)
        np.testing.assert_allclose(H @ uf, lam * uf, atol=1e-4)
    few = lanczos(mv, params, key=jax.random.key(6), num_iter=25, k=2)
    np.testing.assert_allclose(few.values, ev[::-1][:2], rtol=1e-3)
    assert few.num_matvecs == 25
    low = lanczos(mv, params, key=jax.random.key(7), num_iter=d, k=1, which="smallest")
    np.testing.assert_allclose(low.values[0], ev[0], atol=1e-5)
    np.testing.assert_allclose(hessian_eigenvalues(loss_fn, params, batch), ev, atol=1e-10)
    with pytest.raises(ValueError, match="k="):
        lanczos(mv, params, key=jax.random.key(0), num_iter=3, k=4)


def test_power_iteration_with_deflation(ce_problem):
    _, loss_fn, params, batch, H, _ = ce_problem
    ev = np.linalg.eigvalsh(H)
    top = ev[np.argsort(-np.abs(ev))][:2]
    res = power_iteration(make_hvp(loss_fn, params, batch), params, key=jax.random.key(8), k=2,
                          num_iter=500, tol=1e-9)
    np.testing.assert_allclose(res.values, top, rtol=2e-3)
    assert len(res.vectors) == 2


def test_hutchinson_trace(ce_problem):
    _, loss_fn, params, batch, H, _ = ce_problem
    mv = make_hvp(loss_fn, params, batch)
    tr = float(np.trace(H))
    for dist in ("rademacher", "gaussian"):
        est = hutchinson_trace(mv, params, key=jax.random.key(9), num_samples=300, distribution=dist)
        assert abs(est.mean - tr) < 4 * est.stderr + 1e-6
        assert est.stderr < 0.25 * abs(tr)  # informative, not just wide
    with pytest.raises(ValueError, match="distribution"):
        hutchinson_trace(mv, params, key=jax.random.key(0), distribution="uniform")


def test_dense_hessian_refuses_large_models(ce_problem):
    _, loss_fn, params, batch, _, _ = ce_problem
    with pytest.raises(ValueError, match="max_dim"):
        dense_hessian(loss_fn, params, batch, max_dim=10)


def test_top_hessian_eigenvalues_of_a_model(ce_problem):
    model, _, params, (x, y), H, _ = ce_problem
    res = top_hessian_eigenvalues(model, {"params": params}, (np.asarray(x), np.asarray(y)),
                                  key=jax.random.key(1), k=1, num_iter=30, batch_size=10)
    np.testing.assert_allclose(res.values[0], np.linalg.eigvalsh(H)[-1], rtol=1e-3)
    with pytest.raises(ValueError, match="params"):
        top_hessian_eigenvalues(model, params, (np.asarray(x), np.asarray(y)), key=jax.random.key(1))
    with pytest.raises(ValueError, match="batch_size"):
        top_hessian_eigenvalues(model, {"params": params}, (np.asarray(x), np.asarray(y)), key=jax.random.key(1),
                                batch_size=0)


def test_a_second_call_compiles_nothing(ce_problem, count_compiles):
    """HVPs, Lanczos, power iteration, Hutchinson and the dense Hessian compile once: a second call, through a
    new make_objective and new batches of the same shapes, compiles nothing (the old per-method objective path
    compiled its HVP again on every call)."""
    model, _, params, (x, y), _, _ = ce_problem
    data = (np.asarray(x), np.asarray(y))

    def curvature():
        top_hessian_eigenvalues(model, {"params": params}, data, key=jax.random.key(1), k=1, num_iter=8,
                                batch_size=10)  # batches of 10, 10, 10 and 2 (padded)
        obj = make_objective(model, "cross_entropy", train=False, variables={"params": params})
        mv = make_hvp(obj, params, _stream(*data, 16))
        lanczos(mv, params, key=jax.random.key(2), num_iter=6, k=2, return_vectors=True)
        power_iteration(mv, params, key=jax.random.key(3), k=2, num_iter=5)
        hutchinson_trace(mv, params, key=jax.random.key(4), num_samples=3)
        dense_hessian(obj, params, _stream(*data, 16))

    curvature()
    with count_compiles() as seen:
        curvature()
    assert seen == []


def test_power_iteration_and_lanczos_in_float64():
    """With float64 parameters the flat products are float64 device arrays; power iteration with deflation
    (k >= 2) updates them in place, which failed on a read-only view before."""
    with jax.enable_x64(True):
        a = np.diag(np.arange(1.0, 7.0)) + 0.1 * np.ones((6, 6))
        ev = np.linalg.eigvalsh(a)
        quad = function_objective(lambda p, b: 0.5 * p["w"] @ jnp.asarray(a) @ p["w"])
        params = {"w": jnp.zeros(6, jnp.float64)}
        mv = make_hvp(quad, params)
        for matvec in (mv, lambda v: {"w": jnp.asarray(a) @ v["w"]}):  # the HVP and a plain tree matvec
            res = power_iteration(matvec, params, key=jax.random.key(0), k=3, num_iter=2000, tol=1e-14)
            np.testing.assert_allclose(res.values, ev[::-1][:3], rtol=1e-8)
            assert res.vectors[0]["w"].dtype == jnp.float64
        full = lanczos(mv, params, key=jax.random.key(1), num_iter=6, k=6, return_vectors=True)
        np.testing.assert_allclose(full.values, ev[::-1], rtol=1e-10)
        np.testing.assert_allclose(dense_hessian(quad, params), a, atol=1e-12)
        tr = hutchinson_trace(mv, params, key=jax.random.key(2), num_samples=4)
        assert np.isfinite(tr.mean)
        # a model objective with float64 parameters
        model = get_model("mlp", widths=[4], num_classes=3, activation="tanh")
        x = jax.random.normal(jax.random.key(0), (16, 3), jnp.float64)
        y = jax.random.randint(jax.random.key(1), (16,), 0, 3)
        p64 = jax.tree_util.tree_map(lambda t: t.astype(jnp.float64), model.init(jax.random.key(2), x)["params"])
        obj = make_objective(model, "cross_entropy", train=False)
        H = dense_hessian(obj, p64, (x, y))
        top = np.linalg.eigvalsh(H)
        top = top[np.argsort(-np.abs(top))][:2]
        res = power_iteration(make_hvp(obj, p64, (x, y)), p64, key=jax.random.key(3), k=2, num_iter=3000,
                              tol=1e-13)
        np.testing.assert_allclose(res.values, top, rtol=1e-5)


def _scalar(f):
    """A scalar function of the parameters as an objective."""
    return function_objective(lambda p, batch: f(p))


# --- Chen et al. 2021, Theorem 1 -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def critical_point():
    """A 1-3-1 tanh MLP fitted by MSE + 0.01 |w|^2 to 16 points, driven to a minimum (|grad| ~ 1e-7) by
    Adam then Newton steps; the loss there is ~0.26 and the Hessian positive definite."""
    model = get_model("mlp", widths=[3], num_classes=1, activation="tanh")
    x = jnp.linspace(-2.0, 2.0, 16)[:, None]
    y = jnp.sin(3.0 * x) + 0.3 * x
    params = model.init(jax.random.key(0), x)["params"]
    flat0, unravel = tree_ravel(params)

    def loss(f):
        return jnp.mean((model.apply({"params": unravel(f)}, x) - y) ** 2) + 1e-2 * jnp.sum(f ** 2)

    opt = optax.adam(0.02)

    @jax.jit
    def run(f):
        def body(c, _):
            f, s = c
            g = jax.grad(loss)(f)
            u, s = opt.update(g, s)
            return (optax.apply_updates(f, u), s), None

        return jax.lax.scan(body, (f, opt.init(f)), None, length=3000)[0][0]

    f = run(flat0)
    grad, hess = jax.jit(jax.grad(loss)), jax.jit(jax.hessian(loss))
    for _ in range(3):  # Newton polishing to the critical point
        f = f - jnp.linalg.solve(hess(f), grad(f))
    assert np.linalg.eigvalsh(np.asarray(hess(f))).min() > 0
    return loss, f


@pytest.mark.parametrize("vdm", [LE(1, 0.9), AP(18 / math.pi, 1, 2, 1), Squared()], ids=lambda v: v.name)
def test_theorem1_spectrum_scales_at_critical_point(critical_point, vdm):
    loss, f = critical_point
    g = np.asarray(jax.grad(loss)(f))
    assert np.linalg.norm(g) < 1e-5, "not a critical point"
    l = float(loss(f))
    assert l > 1e-3  # a non-trivial loss, so delta'(l) differs from the identity's
    ev = np.linalg.eigvalsh(dense_hessian(_scalar(loss), f))
    ev_def = np.linalg.eigvalsh(dense_hessian(_scalar(vdm_loss(vdm, loss)), f))
    scale = float(vdm.derivative(l))
    assert abs(scale - 1.0) > 0.05
    np.testing.assert_allclose(ev_def, scale * ev, rtol=1e-3, atol=1e-4 * np.abs(ev).max() * scale)


@pytest.mark.parametrize("vdm", [LE(1, 0.9), AP(18 / math.pi, 1, 2, 1), Squared()], ids=lambda v: v.name)
def test_theorem1_exact_formula_away_from_critical_points(ce_problem, vdm):
    """Away from a critical point the Hessian of delta(l) is delta' H + delta'' grad grad^T; the paper's
    proof drops the second term, which is visible here."""
    _, loss_fn, _, batch, _, params0 = ce_problem
    flat, unravel = tree_ravel(params0)
    lf = lambda f: loss_fn(unravel(f), batch)[0]
    l, g = float(lf(flat)), np.asarray(jax.grad(lf)(flat), np.float64)
    H = dense_hessian(_scalar(lf), flat)
    assert np.linalg.norm(g) > 0.1
    H_def = dense_hessian(_scalar(vdm_loss(vdm, lf)), flat)
    exact = np.asarray(deformed_hessian_formula(vdm, l, jnp.asarray(g, jnp.float32), jnp.asarray(H, jnp.float32)))
    np.testing.assert_allclose(H_def, exact, atol=1e-4 * np.abs(H_def).max())
    seed_claim = float(vdm.derivative(l)) * H
    gap = np.linalg.norm(H_def - seed_claim) / np.linalg.norm(H_def)
    assert gap > 1e-2, f"the dropped term delta'' grad grad^T should matter here (gap {gap:.2e})"
    assert abs(np.linalg.norm(H_def - seed_claim) - abs(float(vdm.second_derivative(l))) * g @ g) < \
        1e-3 * np.linalg.norm(H_def)
    # and the spectrum is not delta' times the original one there
    ev_gap = np.abs(np.linalg.eigvalsh(H_def) - float(vdm.derivative(l)) * np.linalg.eigvalsh(H)).max()
    assert ev_gap > 1e-3 * np.abs(np.linalg.eigvalsh(H_def)).max()
