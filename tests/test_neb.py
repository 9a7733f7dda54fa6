"""Nudged Elastic Band (Draxler et al., 2018, 'Essentially no barriers in neural network energy landscape'),
AutoNEB and the band helpers; the band as an objective on the engine's one step and loop (negated-force
gradient, frozen ends, stopping, step offsets, compiling once)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mclandscape.core.objective import function_objective, make_objective
from mclandscape.core.tree import tree_index, tree_row_dot, tree_row_scale, tree_stack
from mclandscape.engine.batches import batch_stream
from mclandscape.engine.data import Dataset
from mclandscape.engine.evaluate import evaluate
from mclandscape.engine.models.base import from_flax
from mclandscape.engine.points import connector_points
from mclandscape.methods import autoneb as A
from mclandscape.methods import neb as N
from mclandscape.methods import neb_forces as F

# ---- Müller-Brown potential (Müller & Brown 1979) ------------------------------------------------------
_A = jnp.array([-200.0, -100.0, -170.0, 15.0])
_a = jnp.array([-1.0, -1.0, -6.5, 0.7])
_b = jnp.array([0.0, 0.0, 11.0, 0.6])
_c = jnp.array([-10.0, -10.0, -6.5, 0.7])
_x0 = jnp.array([1.0, 0.0, -0.5, -1.0])
_y0 = jnp.array([0.0, 0.5, 1.5, 1.0])

MB_MIN_A = np.array([-0.55822, 1.44173])   # E = -146.700
MB_MIN_B = np.array([0.62350, 0.02804])    # E = -108.167
MB_MIN_C = np.array([-0.05001, 0.46669])   # E = -80.768 (intermediate minimum)
MB_SADDLE_1 = np.array([-0.82200, 0.62431])  # E = -40.665, the highest saddle on the path A -> B
MB_SADDLE_1_E = -40.665


def muller_brown(p, batch=None):
    dx, dy = p[0] - _x0, p[1] - _y0
    return jnp.sum(_A * jnp.exp(_a * dx * dx + _b * dx * dy + _c * dy * dy))


def _relaxed(p0):
    """Polish a literature minimum by gradient descent (float32)."""
    p = jnp.asarray(p0, jnp.float32)
    g = jax.jit(jax.grad(muller_brown))
    for _ in range(300):
        p = p - 2e-4 * g(p)
    return p


START, END = _relaxed(MB_MIN_A), _relaxed(MB_MIN_B)
MB = function_objective(muller_brown)  # the potential as an objective of the engine's protocol


def test_muller_brown_reference_points():
    """The literature saddle is a stationary point with one negative curvature direction."""
    g = np.asarray(jax.grad(muller_brown)(jnp.asarray(MB_SADDLE_1, jnp.float32)))
    h = np.asarray(jax.hessian(muller_brown)(jnp.asarray(MB_SADDLE_1, jnp.float32)))
    assert np.linalg.norm(g) < 0.1
    ev = np.linalg.eigvalsh(h)
    assert ev[0] < 0 < ev[1]
    assert float(muller_brown(jnp.asarray(MB_SADDLE_1))) == pytest.approx(MB_SADDLE_1_E, abs=1e-2)
    assert float(muller_brown(START)) == pytest.approx(-146.700, abs=1e-2)


# ---- tree helpers added for bands ----------------------------------------------------------------------

def test_tree_row_dot_and_scale():
    r = np.random.default_rng(0)
    a = {"w": jnp.asarray(r.normal(size=(4, 3, 2)), jnp.float32), "b": jnp.asarray(r.normal(size=(4,)), jnp.float32)}
    b = {"w": jnp.asarray(r.normal(size=(4, 3, 2)), jnp.float32), "b": jnp.asarray(r.normal(size=(4,)), jnp.float32)}
    want = (np.asarray(a["w"]).reshape(4, -1) * np.asarray(b["w"]).reshape(4, -1)).sum(1) + np.asarray(a["b"] * b["b"])
    np.testing.assert_allclose(tree_row_dot(a, b), want, rtol=1e-5)
    s = jnp.asarray([1.0, -2.0, 0.5, 3.0])
    out = tree_row_scale(a, s)
    np.testing.assert_allclose(out["w"][1], -2.0 * a["w"][1])
    np.testing.assert_allclose(out["b"], s * a["b"])


# ---- forces ---------------------------------------------------------------------------------------------

def _random_band(n=7, seed=0):
    r = np.random.default_rng(seed)
    piv = {"k": jnp.asarray(r.normal(size=(n, 5, 3)), jnp.float32), "b": jnp.asarray(r.normal(size=(n, 4)), jnp.float32)}
    grads = {"k": jnp.asarray(r.normal(size=(n - 2, 5, 3)), jnp.float32),
             "b": jnp.asarray(r.normal(size=(n - 2, 4)), jnp.float32)}
    e = jnp.asarray(r.normal(size=n), jnp.float32)
    return piv, e, grads


@pytest.mark.parametrize("climb", [-1, 3])
def test_loss_force_is_perpendicular_to_tangent(climb):
    """Seed 001: F_L^perp_i = -grad + (grad . tau) tau satisfies F^perp . tau = 0; F = F^perp + F^par."""
    piv, e, g = _random_band()
    f = F.neb_forces(piv, e, g, spring_constant=2.0, climbing_index=climb)
    np.testing.assert_allclose(tree_row_dot(f.tangent, f.tangent), 1.0, rtol=1e-5)
    dots = np.asarray(tree_row_dot(f.perpendicular, f.tangent))
    assert np.all(np.abs(dots) < 1e-5 * np.asarray(f.perp_norm))
    assert np.all(np.asarray(f.perp_norm) > 0.1)
    # the parallel part lies along the tangent, the total is the sum
    par = np.asarray(tree_row_dot(f.parallel, f.tangent))
    np.testing.assert_allclose(np.abs(par), f.par_norm, rtol=1e-5)
    tot = jax.tree_util.tree_map(lambda a, b: a + b, f.perpendicular, f.parallel)
    np.testing.assert_allclose(f.total["k"], tot["k"], rtol=1e-6)
    # spring: k (|d_next| - |d_prev|) on every non-climbing pivot; climbing image: +(grad . tau) tau
    d = F.segment_lengths(piv)
    spring = 2.0 * (d[1:] - d[:-1])
    gt = np.asarray(tree_row_dot(g, f.tangent))
    for i in range(5):
        want = gt[i] if i + 1 == climb else spring[i]
        assert par[i] == pytest.approx(float(want), rel=1e-4, abs=1e-5)


def test_improved_tangent_cases():
    """Henkelman & Jonsson: uphill neighbour's segment when monotone; energy-weighted blend at extrema."""
    piv = jnp.asarray([[0.0, 0.0], [1.0, 0.0], [1.0, 2.0]])  # d_prev = (1, 0), d_next = (0, 2)
    up = F.improved_tangents(piv, jnp.asarray([0.0, 1.0, 3.0]))
    np.testing.assert_allclose(up[0], [0.0, 1.0], atol=1e-6)       # tau+ normalised
    down = F.improved_tangents(piv, jnp.asarray([3.0, 1.0, 0.0]))
    np.testing.assert_allclose(down[0], [1.0, 0.0], atol=1e-6)     # tau- normalised
    # maximum: E_{i+1} - E_i = -1, E_{i-1} - E_i = -3 -> E_{i+1} > E_{i-1}: tau = tau+ * 3 + tau- * 1
    mx = F.improved_tangents(piv, jnp.asarray([2.0, 5.0, 4.0]))
    want = np.array([0.0, 2.0]) * 3 + np.array([1.0, 0.0]) * 1
    np.testing.assert_allclose(mx[0], want / np.linalg.norm(want), atol=1e-6)
    mn = F.improved_tangents(piv, jnp.asarray([4.0, 0.0, 2.0]))  # minimum, E_{i+1} < E_{i-1}
    want = np.array([0.0, 2.0]) * 2 + np.array([1.0, 0.0]) * 4
    np.testing.assert_allclose(mn[0], want / np.linalg.norm(want), atol=1e-6)
    flat = F.improved_tangents(piv, jnp.zeros(3))  # flat: bisector of the unit segments
    np.testing.assert_allclose(flat[0], np.array([1.0, 1.0]) / np.sqrt(2), atol=1e-6)


def _flat_loss(p, batch=None):
    return 0.0 * jnp.sum(p)


_flat = function_objective(_flat_loss)


def test_spring_step_is_the_slides_1d_update():
    """One plain-SGD step on a flat loss: w_k <- w_k - eta k [(w_k - w_{k-1}) - (w_{k+1} - w_k)]."""
    w = np.array([0.0, 0.1, 0.5, 0.6, 1.0], np.float32)
    eta, k = 0.1, 2.0
    cfg = N.NEBConfig(steps=1, spring_constant=k, learning_rate=eta, momentum=0.0, tol=0.0)
    res = N.neb(_flat, jnp.asarray(0.0), jnp.asarray(1.0), init=jnp.asarray(w), config=cfg)
    want = w.copy()
    want[1:-1] = w[1:-1] - eta * k * ((w[1:-1] - w[:-2]) - (w[2:] - w[1:-1]))
    np.testing.assert_allclose(res.pivots, want, atol=1e-6)


def test_spring_equalises_spacing_in_1d():
    """The slides' 1-D illustration: the elastic force moves a point towards its farther neighbour until
    the spacing is equal."""
    w = jnp.asarray([0.0, 0.05, 0.1, 0.7, 0.8, 1.0])
    cfg = N.NEBConfig(steps=3000, spring_constant=1.0, learning_rate=0.2, momentum=0.5, tol=1e-5, check_every=1)
    res = N.neb(_flat, jnp.asarray(0.0), jnp.asarray(1.0), init=w, config=cfg)
    assert res.converged and res.steps < 3000
    np.testing.assert_allclose(np.asarray(res.pivots), np.linspace(0, 1, 6), atol=1e-4)
    assert float(res.pivots[0]) == 0.0 and float(res.pivots[-1]) == 1.0
    assert res.history[0]["par_force"] > 0.1 > res.par_force


# ---- Müller-Brown -----------------------------------------------------------------------------------------

def _dense_polyline_distance(pivots, point, m=50):
    p = np.asarray(pivots)
    a = np.linspace(0, 1, m)[:, None, None]
    pts = (p[:-1][None] * (1 - a) + p[1:][None] * a).reshape(-1, 2)
    return np.min(np.linalg.norm(pts - point, axis=1))


def test_muller_brown_band_passes_the_saddle():
    """Plain NEB from the straight line relaxes onto the minimum-energy path through the saddle."""
    cfg = N.NEBConfig(steps=6000, spring_constant=200.0, learning_rate=1e-4, momentum=0.9, tol=0.05)
    res = N.neb(MB, START, END, num_pivots=17, config=cfg)
    piv = np.asarray(res.pivots)
    assert _dense_polyline_distance(piv, MB_SADDLE_1) < 0.03
    np.testing.assert_array_equal(piv[0], np.asarray(START))
    np.testing.assert_array_equal(piv[-1], np.asarray(END))
    # the band also visits the intermediate minimum C
    assert np.min(np.linalg.norm(piv - MB_MIN_C, axis=1)) < 0.1
    straight = np.asarray(jax.vmap(muller_brown)(F.straight_band(START, END, 17)))
    assert straight.max() > 0 > res.losses.max()  # the straight line crosses a high ridge, the band does not


def test_muller_brown_climbing_image_hits_saddle_energy():
    cfg = N.NEBConfig(steps=4000, spring_constant=200.0, learning_rate=2e-4, momentum=0.9, tol=1e-2,
                      climbing=True, climb_after=300)
    res = N.neb(MB, START, END, num_pivots=15, config=cfg)
    assert res.converged
    i = int(np.argmax(res.losses))
    assert np.linalg.norm(np.asarray(res.pivots)[i] - MB_SADDLE_1) < 5e-3
    assert float(res.losses[i]) == pytest.approx(MB_SADDLE_1_E, abs=0.02)


def test_autoneb_muller_brown_refines_near_the_saddle():
    """AutoNEB: equal first fill, then pivots inserted where the loss rises above the chord; final climbing."""
    base = N.NEBConfig(steps=1500, spring_constant=200.0, learning_rate=1e-4, momentum=0.9, tol=0.05)
    first = N.NEBConfig(**{**base.__dict__, "steps": 300})  # 5 pivots never meet tol: 300 steps show the shape
    cycles = [first, base, base, N.NEBConfig(**{**base.__dict__, "climbing": True, "tol": 1e-2})]
    res = A.auto_neb(MB, START, END, cycles=cycles, initial_insert=3, insert_count=2)
    counts = [c["num_pivots"] for c in res.cycles]
    assert counts[0] == 5 and counts == sorted(counts) and counts[-1] > 5
    assert sum(c["inserted"] for c in res.cycles[1:]) == counts[-1] - 5
    assert res.dense_t.shape == res.dense_loss.shape == ((counts[-1] - 1) * 10 + 1,)
    # the dense maximum approaches the saddle energy from above as the band is refined
    assert res.cycles[0]["dense_max_loss"] > res.cycles[-1]["dense_max_loss"]
    assert res.dense_loss.max() == pytest.approx(MB_SADDLE_1_E, abs=1.0)
    assert _dense_polyline_distance(res.pivots, MB_SADDLE_1) < 0.03
    assert res.spacing.shape == (counts[-1] - 1,) and np.isclose(res.spacing.mean(), 1.0)


# ---- insertion ----------------------------------------------------------------------------------------------

def test_insertion_highest_and_equal():
    n, s = 4, 4
    t = F.dense_ts(n, s)
    assert t.shape == (16,) and t[0] == 0 and t[-1] == 1 and np.all(np.diff(t) > 0)
    np.testing.assert_allclose(t[[0, 5, 10, 15]], [0, 1 / 3, 2 / 3, 1])
    loss = np.zeros(16)
    loss[7] = 1.0          # gap 1, alpha = 2/5 : a bump above the chord
    loss[12] = 0.05        # gap 2: small bump, below the threshold after normalisation
    loss[[0, 5, 10, 15]] = [0.0, 0.2, 0.1, 0.0]
    fill = A.insertion_alphas(loss, n, s, count=2, method="highest", threshold=0.1)
    assert fill[1] == [pytest.approx(0.4)] and fill[0] == [] and fill[2] == []
    eq = A.insertion_alphas(None, n, s, count=2, method="equal")
    assert eq == [[pytest.approx(1 / 3), pytest.approx(2 / 3)]] * 3
    with pytest.raises(ValueError, match="method must be one of"):
        A.insertion_alphas(loss, n, s, count=1, method="random")
    with pytest.raises(ValueError, match="16 values|need"):
        A.insertion_alphas(loss[:-1], n, s, count=1)


def test_insert_pivots_copies_and_spacing():
    piv = {"w": jnp.asarray([[0.0, 0.0], [1.0, 0.0], [1.0, 3.0]])}
    new, w = A.insert_pivots(piv, [[0.25], []], spacing=[1.0, 1.0])
    np.testing.assert_array_equal(new["w"][np.array([0, 2, 3])], piv["w"])
    np.testing.assert_allclose(new["w"][1], [0.25, 0.0])
    np.testing.assert_allclose(w, np.array([0.25, 0.75, 1.0]) * 3 / 2)
    with pytest.raises(ValueError, match="increase strictly"):
        A.insert_pivots(piv, [[0.5, 0.5], []])
    with pytest.raises(ValueError, match="each of the 2 gaps"):
        A.insert_pivots(piv, [[0.5]])


def test_spacing_weights_hold_unequal_targets():
    """With target weights (1, 3) on a flat loss the middle pivot settles at 1/4 of the segment."""
    cfg = N.NEBConfig(steps=2000, spring_constant=1.0, learning_rate=0.2, momentum=0.5, tol=1e-6)
    res = N.neb(_flat, jnp.asarray(0.0), jnp.asarray(1.0), init=jnp.asarray([0.0, 0.5, 1.0]),
                spacing=np.array([1.0, 3.0]), config=cfg)
    assert float(res.pivots[1]) == pytest.approx(0.25, abs=1e-4)


# ---- bad inputs ------------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    p = jnp.asarray([1.0, 2.0])
    with pytest.raises(ValueError, match="identical"):
        N.neb(MB, p, p, num_pivots=5)
    with pytest.raises(ValueError, match="N >= 3"):
        N.neb(MB, START, END, num_pivots=2)
    with pytest.raises(ValueError, match="spring_constant"):
        N.NEBConfig(spring_constant=-1.0)
    with pytest.raises(ValueError, match="spring_constant"):
        N.NEBConfig(spring_constant=float("inf"))
    with pytest.raises(ValueError, match="steps"):
        N.NEBConfig(steps=-3)
    with pytest.raises(ValueError, match="strategy"):
        N.NEBConfig(strategy="pmap")
    with pytest.raises(ValueError, match="differs from end"):
        N.neb(MB, START, END, init=jnp.stack([START, START, START]))
    with pytest.raises(ValueError, match="leaf|shape"):
        N.neb(MB, {"a": START}, {"b": END})
    with pytest.raises(ValueError, match="non-finite"):
        N.neb(MB, START, jnp.asarray([np.nan, 0.0]))
    with pytest.raises(ValueError, match="N >= 3"):
        F.band_connector(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="eval_data"):
        A.auto_neb(MB, START, END, cycles=N.NEBConfig(steps=1), num_cycles=2, data=lambda s: None)
    with pytest.raises(FloatingPointError, match="diverged"):
        N.neb(MB, START, END, num_pivots=5, config=N.NEBConfig(steps=200, learning_rate=1.0))


# ---- networks: vectorised pivots, mini-batches, BN ---------------------------------------------------------------

class _TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.tanh(nn.Dense(8)(x))
        return nn.Dense(3)(x)


class _TinyBN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(6)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(3)(nn.relu(x))


def _toy_data(n=96, d=5, seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int32) + (x[:, 2] > 1).astype(np.int32)
    return x, y


def test_strategies_agree_on_minibatch_network_band():
    model = from_flax(_TinyMLP(), "tiny")
    x, y = _toy_data()
    p0 = model.init(jax.random.key(0), x[:2])["params"]
    p1 = model.init(jax.random.key(1), x[:2])["params"]
    loss = make_objective(model, train=False)

    def batches(step):
        i = (step * 32) % 96
        return jnp.asarray(x[i:i + 32]), jnp.asarray(y[i:i + 32])

    out = {}
    for strat in ("map", "vmap", "unroll"):
        cfg = N.NEBConfig(steps=6, spring_constant=0.5, learning_rate=0.05, strategy=strat, check_every=2)
        out[strat] = N.neb(loss, p0, p1, num_pivots=5, data=batches, config=cfg)
    for strat in ("vmap", "unroll"):
        for a, b in zip(jax.tree_util.tree_leaves(out["map"].pivots), jax.tree_util.tree_leaves(out[strat].pivots),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), out["map"].pivots,
                                   F.straight_band(p0, p1, 5))
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-3
    assert len(out["map"].history) == 3 and out["map"].history[-1]["step"] == 6


def test_model_neb_with_batchnorm_on_the_engines_objective_stream_and_evaluator():
    model = from_flax(_TinyBN(), "tiny_bn", has_batch_stats=True)
    x, y = _toy_data()
    ds = Dataset(x=x, y=y, num_classes=3, name="toy")
    p0 = model.init(jax.random.key(0), x[:2])["params"]
    p1 = model.init(jax.random.key(1), x[:2])["params"]
    with pytest.raises(ValueError, match="BatchNorm"):
        make_objective(model, train=False)
    data = batch_stream(ds, 32, seed=0)
    xb, yb = data(4)  # epoch 1, batch 1
    assert xb.shape == (32, 5)
    assert not np.array_equal(np.asarray(data(0)[0]), np.asarray(data(3)[0]))  # reshuffled next epoch
    def profile(band, ts):
        return evaluate(model, connector_points(band, ts), ds, bn_data=ds, bn_batches=2, bn_batch_size=32,
                        batch_size=96).loss

    # the second cycle only inserts and profiles: its relaxation would be the first's compiled again for N = 5
    cfg = N.NEBConfig(steps=4, spring_constant=0.1, learning_rate=0.05)
    cycles = [cfg, N.NEBConfig(steps=0, spring_constant=0.1, learning_rate=0.05)]
    res = A.auto_neb(make_objective(model, train=True), p0, p1, cycles=cycles, data=data, profile_fn=profile,
                     initial_insert=2, insert_count=1, sub_pivots=3, insert_threshold=-1.0)
    assert [c["num_pivots"] for c in res.cycles] == [4, 5]
    direct = evaluate(model, connector_points(res.band, res.dense_t), ds, batch_size=96, bn_data=ds, bn_batches=2,
                      bn_batch_size=32)
    np.testing.assert_allclose(res.dense_loss, direct.loss, rtol=1e-5)
    assert np.all(np.isfinite(res.dense_loss))
    ev = A.evaluate_band(model, res, ds, sub_pivots=3, bn_batches=2, bn_batch_size=32, batch_size=96)
    np.testing.assert_allclose(ev.train_loss, res.dense_loss, rtol=1e-5)
    assert ev.barrier() >= 0.0 and ev.length == pytest.approx(float(jnp.sum(F.segment_lengths(res.pivots))), rel=1e-5)


def test_band_connector_is_a_polychain_through_the_pivots():
    piv = tree_stack([jnp.asarray([0.0, 0.0]), jnp.asarray([1.0, 1.0]), jnp.asarray([2.0, 0.0])])
    conn = F.band_connector(piv)
    assert conn.kind == "polychain" and conn.fixed == (True, False, True)
    np.testing.assert_allclose(conn.point(0.5), [1.0, 1.0])
    np.testing.assert_allclose(conn.point(0.25), [0.5, 0.5])


# ---- the band on the engine: objective, mask, stopping, step offsets, compiling once -------------------------

def _wavy(p, batch=None):
    return jnp.sum(jnp.sin(p["k"]) * p["k"]) + jnp.sum(p["b"] ** 2) * jnp.cos(jnp.sum(p["k"]))


# jitted: op by op, the first call would compile every primitive of the band and the reference on its own
_band_value_and_grad = jax.jit(lambda band, piv, batch: jax.value_and_grad(band, has_aux=True)(piv, batch, None))


@jax.jit
def _band_reference(piv, spacing, climb):
    """The pivot losses, the inner gradients pivot by pivot and the forces of neb_forces (one compilation)."""
    e = jnp.stack([_wavy(tree_index(piv, i)) for i in range(6)])
    g = tree_stack([jax.grad(_wavy)(tree_index(piv, i)) for i in range(1, 5)])
    return e, F.neb_forces(piv, e, g, 1.5, spacing=spacing, climbing_index=jnp.where(climb, 1 + jnp.argmax(e[1:-1]), -1))


@pytest.mark.parametrize("strategy", ["vmap", "map", "unroll"])
@pytest.mark.parametrize("climb", [False, True])
def test_band_objective_value_is_the_total_loss_and_its_gradient_the_negated_force(strategy, climb):
    piv, _, _ = _random_band(n=6, seed=3)
    band = N.BandObjective(point=function_objective(_wavy), spacing=jnp.asarray([1.0, 2.0, 1.0, 0.5, 0.5]),
                           spring_constant=jnp.asarray(1.5), strategy=strategy)
    (value, aux), grad = _band_value_and_grad(band, piv, N.NEBBatch(None, jnp.asarray(climb)))
    e, f = _band_reference(piv, band.spacing, climb)
    assert float(value) == pytest.approx(float(jnp.sum(e)), rel=1e-5)
    np.testing.assert_allclose(aux["pivot_losses"], e, rtol=1e-5)
    assert float(aux["max_perp_force"]) == pytest.approx(float(jnp.max(f.perp_norm)), rel=1e-4)
    assert float(aux["max_par_force"]) == pytest.approx(float(jnp.max(f.par_norm)), rel=1e-4)
    for name in ("k", "b"):
        np.testing.assert_array_equal(grad[name][0], 0.0)
        np.testing.assert_array_equal(grad[name][-1], 0.0)
        np.testing.assert_allclose(grad[name][1:-1], -f.total[name], rtol=1e-4, atol=1e-5)


def test_ends_stay_fixed_bit_for_bit_under_weight_decay():
    """The step's trainable mask: AdamW's decay and moments never touch the end pivots."""
    cfg = N.NEBConfig(steps=20, spring_constant=200.0, optimizer=optax.adamw(1e-3, weight_decay=0.5), tol=0.0)
    res = N.neb(MB, START, END, num_pivots=6, config=cfg)
    np.testing.assert_array_equal(np.asarray(res.pivots[0]), np.asarray(START))
    np.testing.assert_array_equal(np.asarray(res.pivots[-1]), np.asarray(END))
    assert float(jnp.max(jnp.abs(res.pivots[1:-1] - F.straight_band(START, END, 6)[1:-1]))) > 1e-4
    # the reported losses are those of the returned band
    np.testing.assert_allclose(res.losses, jax.vmap(muller_brown)(res.pivots), rtol=1e-5)


def test_history_has_one_record_per_check_and_a_shorter_last_one():
    cfg = N.NEBConfig(steps=7, spring_constant=1.0, learning_rate=0.1, momentum=0.0, tol=0.0, check_every=3)
    res = N.neb(_flat, jnp.asarray(0.0), jnp.asarray(1.0), init=jnp.asarray([0.0, 0.1, 0.2, 1.0]), config=cfg)
    assert res.steps == 7 and not res.converged
    assert [h["step"] for h in res.history] == [3, 6, 7]
    assert [h["epoch"] for h in res.history] == [1, 2, 3]  # numbered from 1 like every trainer's epochs
    assert set(res.history[0]) >= {"step", "max_loss", "mean_loss", "perp_force", "par_force", "force_norm"}
    assert res.par_force == res.history[-1]["par_force"]
    # perp/par forces of a record are the maxima over its steps: the spring force decays, so the first is largest
    assert res.history[0]["par_force"] > res.history[1]["par_force"] > res.history[2]["par_force"]


@pytest.mark.parametrize("climbing, stop_at", [(False, 10), (True, 60)])
def test_stopping_waits_for_a_whole_check_with_the_climbing_image_on(climbing, stop_at):
    """A loose tol is met at the first check, but with the climbing image from step 50 the first check whose
    steps all had it on ends at step 60."""
    cfg = N.NEBConfig(steps=200, spring_constant=1.0, learning_rate=0.1, tol=10.0, check_every=10,
                      climbing=climbing, climb_after=50)
    res = N.neb(_flat, jnp.asarray(0.0), jnp.asarray(1.0), num_pivots=5, config=cfg)
    assert res.converged and res.steps == stop_at and res.history[-1]["step"] == stop_at


def test_minibatch_steps_continue_across_autoneb_cycles():
    asked = []

    def data(t):
        asked.append(int(t))
        return jnp.asarray(0.01 * t)

    def tilted(p, b):
        return jnp.sum((p - b) ** 2 * jnp.asarray([1.0, 3.0]))

    cycles = [N.NEBConfig(steps=4, tol=0.0, check_every=2), N.NEBConfig(steps=3, tol=0.0, check_every=2)]
    res = A.auto_neb(function_objective(tilted), jnp.asarray([0.0, 0.0]), jnp.asarray([1.0, 1.0]), cycles=cycles, data=data,
                     eval_data=jnp.asarray(0.0), initial_insert=1, insert_count=1, insert_method="equal")
    assert [c["steps"] for c in res.cycles] == [4, 3]
    assert sorted(set(asked)) == list(range(7))  # cycle 2 reads batches 4, 5, 6
    assert asked[:4] == [0, 1, 2, 3]


def test_autoneb_default_profile_is_the_objective_at_the_dense_points():
    res = A.auto_neb(MB, START, END, cycles=[N.NEBConfig(steps=2, learning_rate=1e-5)], sub_pivots=3)
    want = jax.vmap(muller_brown)(res.band.points(jnp.asarray(res.dense_t, jnp.float32)))
    np.testing.assert_allclose(res.dense_loss, want, rtol=1e-5, atol=1e-4)


def test_a_loss_outside_the_objective_protocol_is_refused_by_name():
    for bad in (muller_brown, 3.0):  # a plain scalar function, not an objective
        with pytest.raises(ValueError, match=r"objective must be an objective .*function_objective"):
            N.neb(bad, START, END, num_pivots=3, config=N.NEBConfig(steps=1))
    scalar = function_objective(lambda p, b, k: muller_brown(p), takes_key=True)  # fine
    lying = function_objective(lambda p, b: jnp.stack([muller_brown(p)] * 2))  # a loss that is not a scalar
    assert N.neb(scalar, START, END, num_pivots=3, config=N.NEBConfig(steps=1)).steps == 1
    with pytest.raises(ValueError, match="scalar"):
        N.neb(lying, START, END, num_pivots=3, config=N.NEBConfig(steps=1))


def test_a_second_neb_call_compiles_nothing(count_compiles):
    cfg = N.NEBConfig(steps=25, spring_constant=200.0, learning_rate=1e-4, tol=0.0, climbing=True, climb_after=10)
    first = lambda: N.neb(MB, START, END, num_pivots=7, config=cfg)  # noqa: E731
    first()
    other_k = N.NEBConfig(**{**cfg.__dict__, "spring_constant": 50.0, "tol": 1e-3, "check_every": 5})
    auto = lambda: A.auto_neb(MB, START, END, cycles=[cfg, cfg], initial_insert=2,  # noqa: E731
                              insert_count=1, sub_pivots=3)
    auto()
    with count_compiles() as seen:
        first()
        N.neb(MB, START, END, num_pivots=7, config=other_k)  # another k, tol and check: data, not code
        auto()
    assert seen == []


def test_a_second_network_neb_and_band_evaluation_compile_nothing(count_compiles):
    model = from_flax(_TinyMLP(), "tiny", has_batch_stats=False)
    x, y = _toy_data()
    p0, p1 = (model.init(jax.random.key(s), x[:2])["params"] for s in (0, 1))
    ds = Dataset(x=x, y=y, num_classes=3, name="toy")

    def both():
        model = from_flax(_TinyMLP(), "tiny", has_batch_stats=False)  # rebuilt: equal by value, compiled once
        res = N.neb(make_objective(model, train=True), p0, p1, num_pivots=4, data=batch_stream(ds, 32),
                    config=N.NEBConfig(steps=4, learning_rate=0.05, check_every=2, tol=0.0))
        return A.evaluate_band(model, res, ds, sub_pivots=1, batch_size=96)

    both()
    with count_compiles() as seen:
        both()
    assert seen == []


class _TinyDropout(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dropout(0.5, deterministic=not train)(nn.tanh(nn.Dense(8)(x)))
        return nn.Dense(3)(x)


def test_dropout_keys_come_from_the_seed():
    """In train mode every step draws dropout from fold_in(key(seed), ...): a seed reproduces its band."""
    model = from_flax(_TinyDropout(), "tiny_dropout")
    x, y = _toy_data()
    p0, p1 = (model.init(jax.random.key(s), x[:2])["params"] for s in (0, 1))
    cfg = N.NEBConfig(steps=3, spring_constant=0.5, learning_rate=0.05, tol=0.0)
    run = lambda seed: N.neb(make_objective(model, train=True), p0, p1, num_pivots=4, data=(jnp.asarray(x), jnp.asarray(y)),  # noqa: E731
                             config=cfg, seed=seed).pivots
    a, b, c = run(0), run(0), run(1)
    for la, lb in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(la, lb)
    assert any(not np.array_equal(la, lc) for la, lc in zip(jax.tree_util.tree_leaves(a),
                                                            jax.tree_util.tree_leaves(c), strict=True))
    deterministic = make_objective(model, train=False)  # inference mode: no dropout, the seed is irrelevant
    d0 = N.neb(deterministic, p0, p1, num_pivots=4, data=(jnp.asarray(x), jnp.asarray(y)), config=cfg, seed=0)
    d1 = N.neb(deterministic, p0, p1, num_pivots=4, data=(jnp.asarray(x), jnp.asarray(y)), config=cfg, seed=1)
    np.testing.assert_array_equal(d0.losses, d1.losses)


def test_progress_defaults_like_every_trainer_and_reaches_the_loop(monkeypatch):
    import inspect

    from mclandscape.engine.loop import run as loop_run
    from mclandscape.engine.train import train_model

    want = inspect.signature(train_model).parameters["progress"].default
    assert want is None
    for fn in (N.neb, A.auto_neb):
        assert inspect.signature(fn).parameters["progress"].default is want
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["config"].progress)
        return loop_run(*args, **kwargs)

    monkeypatch.setattr(N, "run", spy)
    cfg = N.NEBConfig(steps=4, check_every=2, tol=0.0)
    N.neb(_flat, jnp.asarray(0.0), jnp.asarray(1.0), num_pivots=3, config=cfg)
    N.neb(_flat, jnp.asarray(0.0), jnp.asarray(1.0), num_pivots=3, config=cfg, progress=True)
    assert seen == [None, True]


def test_band_step_on_a_mesh_checks_its_layout_and_equals_one_device():
    from mclandscape.engine import distributed

    piv = F.straight_band(jnp.asarray(MB_MIN_A, jnp.float32), jnp.asarray(MB_MIN_B, jnp.float32), 6)
    mesh = distributed.mesh((1, 1), ("points", "data"))
    with pytest.raises(ValueError, match="'points' axis"):
        N.make_neb_step(MB, N.NEBConfig(), piv, mesh=distributed.mesh(axes=("data",)))
    cfg = N.NEBConfig(steps=20, learning_rate=1e-4, check_every=5, tol=0.0, strategy="vmap")
    on_mesh = N.make_neb_step(MB, cfg, piv, mesh=mesh)
    plain = N.make_neb_step(MB, cfg, piv)
    batch = N.NEBBatch(None, jnp.asarray(False))
    a, _ = on_mesh(on_mesh.init(piv), batch, jax.random.key(0))
    b, _ = plain(plain.init(piv), batch, jax.random.key(0))
    np.testing.assert_allclose(a.params, b.params, rtol=1e-6)
    with pytest.raises(ValueError, match="devices"):
        N.neb(MB, piv[0], piv[-1], num_pivots=4, config=cfg, devices=len(jax.devices()) + 1)
