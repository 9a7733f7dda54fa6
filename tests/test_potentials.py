"""The public test potentials (Müller-Brown and its stationary points, the double well, the VDM paper's 2-D
surfaces) and float64 in the 2-D simulations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mclandscape.core.objective import call_objective, function_objective
from mclandscape.methods import potentials as P
from mclandscape.methods.deform import LE
from mclandscape.methods.simulated import SimSettings, run_simulation


@functools.partial(jax.jit, static_argnums=0)
def _grad_hess_jit(fn, p):  # one compilation per function and shape (a lambda per call would compile each time)
    return jax.grad(fn)(p), jax.hessian(fn)(p)


def _grad_hess(fn, p):
    g, h = _grad_hess_jit(fn, p)
    return np.asarray(g), np.linalg.eigvalsh(np.asarray(h))


def test_muller_brown_minima_and_saddles_are_what_the_tables_say():
    with jax.enable_x64(True):
        for table, negatives in ((P.MULLER_BROWN_MINIMA, 0), (P.MULLER_BROWN_SADDLES, 1)):
            for name, sp in table.items():
                p = jnp.asarray(sp.point, jnp.float64)
                g, ev = _grad_hess(P.muller_brown, p)
                assert np.linalg.norm(g) < 5e-3, name  # stationary (coordinates rounded to 1e-6)
                assert int(np.sum(ev < 0)) == negatives, (name, ev)
                assert float(P.muller_brown(p)) == pytest.approx(sp.energy, abs=1e-3), name
    # the global minimum is A, and the highest saddle of the path A -> C -> B is AC
    energies = {k: v.energy for k, v in P.MULLER_BROWN_MINIMA.items()}
    assert min(energies, key=energies.get) == "A"
    assert P.MULLER_BROWN_SADDLES["AC"].energy > P.MULLER_BROWN_SADDLES["CB"].energy


def test_muller_brown_broadcasts_and_refuses_bad_points():
    mb = jax.jit(P.muller_brown)  # one compiled program per shape (not one per operation)
    pts = jnp.stack([jnp.asarray(v.point) for v in P.MULLER_BROWN_MINIMA.values()])
    np.testing.assert_allclose(np.asarray(mb(pts)), [v.energy for v in P.MULLER_BROWN_MINIMA.values()], atol=2e-3)
    assert mb(jnp.zeros((3, 4, 2))).shape == (3, 4)
    assert mb(jnp.array([0, 0])).dtype == jnp.float32  # integers become the default float type
    # usable as an objective (the f(p, batch) signature)
    loss, _ = call_objective(function_objective(P.muller_brown), jnp.asarray(P.MULLER_BROWN_MINIMA["B"].point),
                             None, None)
    assert float(loss) == pytest.approx(P.MULLER_BROWN_MINIMA["B"].energy, abs=2e-3)
    with pytest.raises(ValueError, match=r"\[\.\.\., 2\]"):
        P.muller_brown(jnp.zeros(3))
    with pytest.raises(ValueError, match="scalar"):
        P.muller_brown(1.0)


def test_double_well_minima_saddle_and_curvatures():
    for dim in (1, 3):
        e0 = np.zeros(dim)
        e0[0] = 1.0
        for sign in (-1.0, 1.0):
            g, ev = _grad_hess(P.double_well, jnp.asarray(sign * e0, jnp.float32))
            assert np.allclose(g, 0.0) and float(P.double_well(jnp.asarray(sign * e0))) == 0.0
            np.testing.assert_allclose(ev, [8.0] * dim, rtol=1e-5)  # isotropic at the default stiffness
        g, ev = _grad_hess(P.double_well, jnp.zeros(dim))
        assert np.allclose(g, 0.0) and float(P.double_well(jnp.zeros(dim))) == 1.0
        np.testing.assert_allclose(ev, sorted([-4.0] + [8.0] * (dim - 1)), rtol=1e-5)
    _, ev = _grad_hess(functools.partial(P.double_well, stiffness=0.5), jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(ev, [0.5, 8.0], rtol=1e-5)
    with pytest.raises(ValueError, match="stiffness"):
        P.double_well(jnp.zeros(2), stiffness=0.0)


def test_vdm_surfaces_have_the_printed_structure():
    rng = np.random.default_rng(0)
    pts = jnp.asarray(rng.uniform(-10, 10, size=(50, 2)), jnp.float32)
    f = P.vdm_figure1_factor
    np.testing.assert_allclose(np.asarray(P.vdm_figure1(pts)), 10 * np.asarray(f(pts[:, 0]) * f(pts[:, 1])),
                               rtol=1e-4, atol=1e-5)
    assert float(P.vdm_figure4(jnp.zeros(2), constant=1.0) - P.vdm_figure4(jnp.zeros(2))) == pytest.approx(
        1.0 - P.VDM_FIGURE4_CONSTANT, rel=1e-5)
    for fn in (P.vdm_figure1, P.vdm_figure4, P.vdm_figure7):
        assert jax.eval_shape(fn, pts.reshape(5, 10, 2)).shape == (5, 10)  # broadcasting: the shape is the point
        with pytest.raises(ValueError, match="points"):
            fn(jnp.zeros((4, 3)))


def test_potentials_and_simulations_follow_float64_under_x64():
    with jax.enable_x64(True):
        p64 = jnp.array([0.3, -0.2], jnp.float64)
        for fn in (P.muller_brown, P.double_well, P.vdm_figure1, P.vdm_figure4, P.vdm_figure7):
            # one compiled program per surface instead of every operation compiled on its own
            v64, v32, g64 = jax.jit(lambda a, b, fn=fn: (fn(a), fn(b), jax.grad(fn)(a)))(p64, p64.astype(jnp.float32))
            assert v64.dtype == jnp.float64 and v32.dtype == jnp.float32 and g64.dtype == jnp.float64, fn.__name__
        inits = np.array([[-0.5, 0.3], [0.4, -0.2]])  # NumPy float64 -> float64 under x64
        for vdm in (None, LE(1, 0.9)):
            out = run_simulation(P.double_well, vdm, inits, SimSettings(lr=0.01, momentum=None, steps=400))
            for k in ("trajectories", "losses", "ends", "final_loss", "eigenvalues"):
                assert out[k].dtype == np.float64, (k, vdm)
            # float64 resolves losses far below float32's resolution at the minima
            assert np.all(out["final_loss"] < 1e-9)


def test_simulation_settings_and_inputs_are_checked():
    with pytest.raises(ValueError, match="lr"):
        SimSettings(lr=0.0, momentum=None, steps=10)
    with pytest.raises(ValueError, match="momentum"):
        SimSettings(lr=0.1, momentum=1.5, steps=10)
    with pytest.raises(ValueError, match="steps"):
        SimSettings(lr=0.1, momentum=None, steps=0)
    with pytest.raises(ValueError, match="inits"):
        run_simulation(P.double_well, None, np.zeros((3, 3)), SimSettings(0.1, None, 2))
