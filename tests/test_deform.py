"""Vertical deformation mappings (Chen et al., 2021): formulas, validation, loss wrapper, Optax transform, the
paper's presets (experiments/vdm_presets.py) and the slips of its printed formulas."""

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.vdm_presets import (
    FIG7_SETTINGS,
    TABLE1_VDMS,
    fig1_negative_region,
    fig4_minimum,
    fig7_printed_vdm,
    parse_vdm,
)
from mclandscape.methods.deform import (
    AP,
    LE,
    Identity,
    Squared,
    check_monotone,
    check_vdm_state,
    custom_vdm,
    scale_by_vdm,
    vdm_loss,
)
from mclandscape.methods.potentials import VDM_FIGURE4_CONSTANT as FIG4_PRINTED_CONSTANT
from mclandscape.methods.potentials import vdm_figure1 as fig1_loss
from mclandscape.methods.potentials import vdm_figure4 as fig4_loss
from mclandscape.methods.potentials import vdm_figure7 as fig7_loss
from mclandscape.methods.simulated import run_simulation

LOSSES = np.array([0.05, 0.3, 1.0, 2.5, 7.0], np.float32)


def _np_formula(vdm, l):
    l = l.astype(np.float64)
    if isinstance(vdm, AP):
        return vdm.a1 * np.arctan(vdm.a2 * l) ** vdm.a3 + vdm.a4 * l
    if isinstance(vdm, LE):
        return vdm.e1 * np.log(np.exp(l) - vdm.e2)
    if isinstance(vdm, Squared):
        return 0.5 * l ** 2
    return l


ALL = [AP(10, 1, 1, 1), AP(18 / math.pi, 1, 2, 1), AP(1.5, 0.7, 1, 0), AP(2, 1, 0.5, 1), LE(1, 0.9),
       LE(1, 0.6), LE(2, 0.3), Squared(), Identity()]


@pytest.mark.parametrize("vdm", ALL, ids=lambda v: v.name)
def test_value_and_derivatives_match_formula_and_autodiff(vdm):
    l = jnp.asarray(LOSSES)
    np.testing.assert_allclose(np.asarray(vdm(l)), _np_formula(vdm, LOSSES), rtol=2e-5, atol=1e-6)
    d_auto = jax.vmap(jax.grad(lambda x: vdm.value(x)))(l)
    np.testing.assert_allclose(np.asarray(vdm.derivative(l)), np.asarray(d_auto), rtol=1e-5, atol=1e-6)
    d2_auto = jax.vmap(jax.grad(jax.grad(lambda x: vdm.value(x))))(l)
    np.testing.assert_allclose(np.asarray(vdm.second_derivative(l)), np.asarray(d2_auto), rtol=1e-4, atol=1e-5)
    check_monotone(vdm)  # every VDM of the paper is non-decreasing on [0, 20]


def test_le_derivative_shape_and_large_losses():
    le = LE(1, 0.9)
    # e1 / (1 - e2) at l = 0, tends to e1 for large losses; no overflow at l = 200 (exp(200) is inf in f32)
    np.testing.assert_allclose(float(le.derivative(0.0)), 10.0, rtol=1e-5)
    assert abs(float(le.derivative(50.0)) - 1.0) < 1e-6
    assert np.isfinite(float(le(200.0))) and abs(float(le(200.0)) - 200.0) < 1e-3


def test_parameter_validation():
    for bad in [(0, 1, 1, 1), (1, -1, 2, 1), (1, 1, 0, 1), (1, 1, 2, -0.1), (float("nan"), 1, 1, 1)]:
        with pytest.raises(ValueError, match="AP"):
            AP(*bad)
    for bad in [(0, 0.9), (1, 0), (-1, 0.5), (1, -0.2)]:
        with pytest.raises(ValueError, match="LE"):
            LE(*bad)
    # slip of the paper: Table 2 uses AP(1.5, 0.7, 1, 0) although section 3.1 demands a4 > 0 -> accepted
    ap = AP(1.5, 0.7, 1, 0)
    assert float(ap.derivative(100.0)) >= 0.0


def test_le_domain_error_instead_of_nan():
    le = LE(1, 1.9)  # defined only for loss > ln 1.9 = 0.642
    assert np.isnan(float(le.value(0.3)))  # what an unchecked evaluation would give
    f = vdm_loss(le, lambda p: jnp.sum(p ** 2))
    with pytest.raises(ValueError, match=r"exp\(loss\) must exceed e2"):
        f(jnp.array([0.3, 0.2]))
    assert np.isfinite(float(f(jnp.array([1.0, 0.5]))))
    with pytest.raises(ValueError, match="LE"):  # eager grad: the loss is still concrete
        jax.grad(f)(jnp.array([0.3, 0.2]))
    tx = scale_by_vdm(le)  # the transform masks the step (eagerly as under jit) and check_vdm_state raises
    u, st = tx.update({"w": jnp.ones(2)}, tx.init(None), None, loss=jnp.float32(0.1))
    np.testing.assert_array_equal(np.asarray(u["w"]), [0.0, 0.0])
    assert int(st.num_invalid) == 1 and int(st.invalid_step) == 0
    with pytest.raises(ValueError, match="undefined"):
        check_vdm_state(st, le)
    # a non-integer AP power needs non-negative losses
    with pytest.raises(ValueError, match="non-negative base"):
        vdm_loss(AP(2, 1, 0.5, 1), lambda p: p)(jnp.float32(-0.5))
    # NaN (divergence) is not a domain error, and VDMs defined everywhere check nothing
    assert np.isnan(float(vdm_loss(le, lambda p: p)(jnp.float32(np.nan))))
    with pytest.raises(ValueError, match="check_domain"):
        scale_by_vdm(le, check_domain="raise")
    with pytest.raises(ValueError, match="25861"):  # no host callback inside a training step
        scale_by_vdm(le, check_domain="callback")


def test_scale_by_vdm_is_the_same_eagerly_and_under_jit():
    """In and out of the domain, and at a NaN loss, the eager and jitted updates and states are identical."""
    le = LE(1, 1.9)
    tx = optax.chain(scale_by_vdm(le), optax.sgd(0.1, momentum=0.9))
    g = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
    jitted = jax.jit(lambda g, s, l: tx.update(g, s, None, loss=l))
    se = sj = tx.init(g)
    for loss in (2.0, 0.3, 1.5, float("nan"), 0.1):  # 0.3 and 0.1 lie below ln 1.9 = 0.642
        ue, se = tx.update(g, se, None, loss=jnp.float32(loss))
        uj, sj = jitted(g, sj, jnp.float32(loss))
        for a, b in zip(jax.tree_util.tree_leaves((ue, se)), jax.tree_util.tree_leaves((uj, sj)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    vdm_state = se[0]
    assert int(vdm_state.steps) == 5 and int(vdm_state.num_invalid) == 2
    assert int(vdm_state.invalid_step) == 1 and abs(float(vdm_state.invalid_loss) - 0.3) < 1e-6
    with pytest.raises(ValueError, match=r"skipped 2 of 5 step\(s\), the first at step 1"):
        check_vdm_state(se, le)
    off = scale_by_vdm(le, check_domain="off")  # no check: the raw (negative) factor goes through
    u, s = off.update(g, off.init(g), None, loss=jnp.float32(0.3))
    assert float(u["w"][0]) < 0 and int(s.num_invalid) == 0


def test_jitted_training_skips_steps_outside_the_domain_and_reports_them():
    """Inside jit a loss below ln(e2) gives a zero update (no NaN enters the parameters) and
    check_vdm_state raises naming the loss."""
    le = LE(1, 1.9)
    loss_fn = lambda p: jnp.sum(p ** 2) + 0.5  # reaches 0.5 < ln 1.9 near p = 0
    tx = optax.chain(scale_by_vdm(le), optax.sgd(0.05))

    @jax.jit
    def step(p, s):
        l, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p, loss=l)
        return optax.apply_updates(p, u), s

    p, s = jnp.array([1.0, -0.5]), tx.init(jnp.zeros(2))
    for _ in range(40):
        p, s = step(p, s)
    assert np.all(np.isfinite(np.asarray(p)))
    assert float(loss_fn(p)) <= math.log(1.9) + 0.05  # it stopped right after crossing the boundary
    assert int(s[0].num_invalid) > 0 and float(s[0].invalid_loss) <= math.log(1.9)
    frozen = p
    p, s = step(p, s)
    np.testing.assert_array_equal(np.asarray(p), np.asarray(frozen))  # skipped: zero update
    assert int(s[0].steps) == 41 and 0 <= int(s[0].invalid_step) < 41
    with pytest.raises(ValueError, match=r"LE\(1, 1.9\) is undefined at loss .* skipped"):
        check_vdm_state(s, le)
    check_vdm_state(tx.init(jnp.zeros(2)))  # a clean state passes
    # vmapped (batched) states are checked too
    sb = jax.vmap(lambda q: step(q, tx.init(q))[1])(jnp.array([[0.0, 0.0], [2.0, 2.0]]))
    with pytest.raises(ValueError, match="skipped 1 of 2 step.*over 1 of 2 batched states"):
        check_vdm_state(sb)


def test_engine_step_passes_the_loss_to_the_vdm_and_reports_the_domain(ce_problem, sgdm_runs):
    """make_step hands the objective's loss to scale_by_vdm (extra argument loss=): SGDM + VDM equals SGDM on
    the deformed objective step for step, and a run that leaves LE's domain is reported by check_vdm_state."""
    from mclandscape.core.objective import function_objective
    from mclandscape.engine.loop import run
    from mclandscape.engine.step import make_step

    params, loss_fn = ce_problem
    vdm = LE(1, 0.9)
    ours = make_step(function_objective(lambda p, b: loss_fn(p)), optax.chain(scale_by_vdm(vdm), _sgdm()))
    ref = sgdm_runs(vdm)  # SGDM on the deformed loss
    so = ours.init(params)
    for t in range(10):
        so, mo = ours(so, None, jax.random.key(t))
        for a, b in zip(jax.tree_util.tree_leaves(so.params), jax.tree_util.tree_leaves(ref[t]), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert abs(float(so.opt_state[0].scale) - float(vdm.derivative(mo["loss"]))) < 1e-5 * float(so.opt_state[0].scale)
    # LE(1, 1.9) is undefined below ln 1.9; the quadratic reaches 0.5 < 0.642
    le = LE(1, 1.9)
    step = make_step(function_objective(lambda p, b: jnp.sum(p["w"] ** 2) + 0.5), optax.chain(scale_by_vdm(le),
                                                                                             optax.sgd(0.05)))
    res = run(step, step.init({"w": jnp.array([1.0, -0.5])}), lambda t: None, epochs=4, steps_per_epoch=10,
              key=jax.random.key(0))
    assert np.all(np.isfinite(np.asarray(res.params["w"])))
    with pytest.raises(ValueError, match=r"LE\(1, 1.9\) is undefined at loss .* skipped"):
        check_vdm_state(res.state.opt_state, le)


def test_callback_mode_raises_inside_jit_in_a_subprocess():
    """check_domain="callback" raises from inside a jitted computation (run in a separate process because
    JAX keeps an ordered callback's error on its effects token for the rest of the process)."""
    code = (
        "import jax, jax.numpy as jnp\n"
        "from mclandscape.methods.deform import LE, vdm_loss\n"
        "f = jax.jit(jax.grad(vdm_loss(LE(1, 1.9), lambda p: jnp.sum(p ** 2), check_domain='callback')))\n"
        "print(float(f(jnp.array([1.0, 0.5]))[0]))\n"
        "try:\n"
        "    f(jnp.array([0.3, 0.2])).block_until_ready()\n"
        "except Exception as e:\n"
        "    print('RAISED', 'must exceed e2' in str(e))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "RAISED True" in out.stdout, out.stdout + out.stderr[-2000:]


def test_monotonicity_validation_of_custom_vdm():
    with pytest.raises(ValueError, match="not a VDM"):
        custom_vdm(lambda l: -l)
    with pytest.raises(ValueError, match="not a VDM"):
        custom_vdm(lambda l: jnp.sin(l))  # decreasing on (pi/2, 3pi/2)
    with pytest.raises(ValueError, match="differs from autodiff"):
        custom_vdm(lambda l: jnp.log1p(l), derivative=lambda l: 2.0 / (1.0 + l))
    v = custom_vdm(lambda l: jnp.log1p(l), derivative=lambda l: 1.0 / (1.0 + l), name="log1p")
    np.testing.assert_allclose(float(v.derivative(3.0)), 0.25, rtol=1e-6)
    w = custom_vdm(lambda l: l + jnp.sqrt(l), domain_low=0.0, domain_inclusive=False, name="sqrt")
    np.testing.assert_allclose(float(w.derivative(4.0)), 1.25, rtol=1e-5)
    with pytest.raises(ValueError, match="sqrt is undefined"):
        vdm_loss(w, lambda p: p)(jnp.float32(0.0))
    with pytest.raises(ValueError, match="not a VDM"):
        check_monotone(Squared(), np.linspace(-1.0, 1.0, 11))  # 0.5 l^2 decreases for l < 0


@pytest.fixture(scope="module")
def ce_problem():
    """A 4-5-3 tanh network's cross-entropy on 32 random points (plain jnp: nothing to initialise eagerly)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, size=32), jnp.int32)
    params = {"w1": jnp.asarray(rng.normal(size=(4, 5)) / 2, jnp.float32), "b1": jnp.zeros(5, jnp.float32),
              "w2": jnp.asarray(rng.normal(size=(5, 3)) / 2, jnp.float32), "b2": jnp.zeros(3, jnp.float32)}

    def loss_fn(p):
        logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    return params, loss_fn


@pytest.mark.parametrize("vdm", [LE(1, 0.9), AP(18 / math.pi, 1, 2, 1), Squared(), AP(10, 1, 1, 1)],
                         ids=lambda v: v.name)
def test_wrapper_gradient_is_scaled_gradient(vdm, ce_problem):
    params, loss_fn = ce_problem
    l, g = jax.jit(jax.value_and_grad(loss_fn))(params)  # one compiled program each, not op by op
    gd = jax.jit(jax.grad(vdm_loss(vdm, loss_fn)))(params)
    s = float(vdm.derivative(l))
    assert abs(s - 1.0) > 1e-2  # the deformation does something at this loss
    for a, b in zip(jax.tree_util.tree_leaves(gd), jax.tree_util.tree_leaves(g), strict=True):
        np.testing.assert_allclose(np.asarray(a), s * np.asarray(b), rtol=1e-5, atol=1e-7)
    # has_aux passes the auxiliary output through and deforms the loss
    val, aux = vdm_loss(vdm, lambda p: (l, "aux"), has_aux=True)(params)
    assert aux == "aux" and abs(float(val) - float(vdm(l))) < 1e-5


def _run(tx, loss_fn, params, steps, deformed_loss=None):
    """Train ``steps`` steps; with ``deformed_loss`` the gradient is of that loss and no extra arg is sent."""
    state = tx.init(params)
    traj = []

    @jax.jit
    def step(p, s):
        if deformed_loss is None:
            l, g = jax.value_and_grad(loss_fn)(p)
            u, s = tx.update(g, s, p, loss=l)
        else:
            g = jax.grad(deformed_loss)(p)
            u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(steps):
        params, state = step(params, state)
        traj.append(params)
    return traj


def _sgdm():
    return optax.sgd(0.05, momentum=0.9, nesterov=True)


@pytest.fixture(scope="module")
def sgdm_runs(ce_problem):
    """``sgdm_runs(vdm)``: 25 steps of Nesterov SGDM on δ∘ℓ (on ℓ itself without a VDM), each computed once for
    the tests that compare against it."""
    params, loss_fn = ce_problem
    runs = {}

    def get(vdm=None):
        name = "plain" if vdm is None else vdm.name
        if name not in runs:
            loss = loss_fn if vdm is None else vdm_loss(vdm, loss_fn)
            runs[name] = _run(_sgdm(), loss_fn, params, 25, deformed_loss=loss)
        return runs[name]

    return get


@pytest.mark.parametrize("vdm", [LE(1, 0.9), AP(18 / math.pi, 1, 2, 1)], ids=lambda v: v.name)
def test_optax_transform_equals_sgdm_on_deformed_loss_step_for_step(vdm, ce_problem, sgdm_runs):
    params, loss_fn = ce_problem
    ours = _run(optax.chain(scale_by_vdm(vdm), _sgdm()), loss_fn, params, 25)
    ref, plain = sgdm_runs(vdm), sgdm_runs()
    for a, b in zip(ours, ref, strict=True):
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree_util.tree_leaves(ours[-1]), jax.tree_util.tree_leaves(plain[-1]), strict=True))
    assert diff > 1e-3  # and it is not plain SGDM


def test_optax_transform_with_weight_decay_and_adam(ce_problem):
    vdm = LE(1, 0.7)
    params, loss_fn = ce_problem
    # weight decay after the VDM is not scaled: SGD on delta(l) + wd/2 |p|^2, as a PyTorch loop does
    tx = optax.chain(scale_by_vdm(vdm), optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
    ours = _run(tx, loss_fn, params, 10)
    ref_loss = lambda p: vdm_loss(vdm, loss_fn)(p) + 0.5 * 5e-4 * sum(
        jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(p))
    ref = _run(optax.sgd(0.05, momentum=0.9), loss_fn, params, 10, deformed_loss=ref_loss)
    for x, y in zip(jax.tree_util.tree_leaves(ours[-1]), jax.tree_util.tree_leaves(ref[-1]), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    # Adam on delta(l) exactly
    ours = _run(optax.chain(scale_by_vdm(vdm), optax.adam(1e-2)), loss_fn, params, 10)
    ref = _run(optax.adam(1e-2), loss_fn, params, 10, deformed_loss=vdm_loss(vdm, loss_fn))
    for x, y in zip(jax.tree_util.tree_leaves(ours[-1]), jax.tree_util.tree_leaves(ref[-1]), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_scale_by_vdm_state_and_errors():
    tx = scale_by_vdm(LE(1, 0.9))
    g = {"w": jnp.array([1.0, -2.0])}
    u, s = tx.update(g, tx.init(g), None, loss=jnp.float32(0.0))
    np.testing.assert_allclose(np.asarray(u["w"]), [10.0, -20.0], rtol=1e-5)
    assert abs(float(s.scale) - 10.0) < 1e-4 and float(s.loss) == 0.0 and int(s.num_invalid) == 0
    with pytest.raises(ValueError, match="needs the loss value"):
        tx.update(g, tx.init(g), None)
    with pytest.raises(ValueError, match="scalar"):
        tx.update(g, tx.init(g), None, loss=jnp.ones(3))
    tv = scale_by_vdm(LE(1, 0.9), loss_arg="value")
    u, _ = tv.update(g, tv.init(g), None, value=jnp.float32(0.0))
    np.testing.assert_allclose(np.asarray(u["w"]), [10.0, -20.0], rtol=1e-5)
    with pytest.raises(ValueError, match="expected a VDM"):
        scale_by_vdm(lambda l: l)


def test_parse_vdm_and_table1_list():
    assert parse_vdm("LE(1, 0.9)") == LE(1, 0.9)
    ap = parse_vdm("AP(18/pi, 1, 2, 1)")
    assert isinstance(ap, AP) and abs(ap.a1 - 18 / math.pi) < 1e-12
    assert isinstance(parse_vdm("square"), Squared) and isinstance(parse_vdm("identity"), Identity)
    assert len({parse_vdm(s).name for s in TABLE1_VDMS}) == 9
    for bad in ["XX(1)", "LE(1)", "AP(1,2,3)", "LE(1, os.system)", "LE(1,"]:
        with pytest.raises(ValueError):
            parse_vdm(bad)


def test_paper_slip_figure7_printed_vdm_deforms_nothing():
    printed = fig7_printed_vdm()
    l = jnp.asarray(LOSSES)
    np.testing.assert_allclose(np.asarray(printed(l)), LOSSES - 0.9, atol=1e-5)  # ln(exp(l - 0.9)) = l - 0.9
    np.testing.assert_allclose(np.asarray(printed.derivative(l)), 1.0, atol=1e-6)
    init = [[-6.0, 11.0]]
    orig = run_simulation(fig7_loss, None, init, FIG7_SETTINGS)
    pr = run_simulation(fig7_loss, printed, init, FIG7_SETTINGS)
    le = run_simulation(fig7_loss, LE(1, 0.9), init, FIG7_SETTINGS)
    np.testing.assert_allclose(pr["trajectories"], orig["trajectories"], atol=1e-5)  # identical dynamics
    assert np.abs(le["ends"] - orig["ends"]).max() > 0.1  # the intended LE(1, 0.9) changes the path


def test_paper_slips_figure4_constant_and_figure1_negative_loss():
    m = fig4_minimum(grid=801)
    assert m["min_loss_with_printed_constant"] < -1e-3  # printed constant leaves the minimum below 0
    assert abs(m["constant_for_zero_minimum"] - FIG4_PRINTED_CONSTANT) > 1e-3
    assert abs(float(fig4_loss(jnp.asarray(m["point"]), constant=m["constant_for_zero_minimum"]))) < 1e-5
    # sin(x) read as sin(p1): the surface is symmetric in form, f(a, b) - f(b, a) only from the cross terms
    p = jnp.array([0.7, -1.3])
    sym = fig4_loss(p) - fig4_loss(p[::-1])
    cross = 0.01 * (jnp.sin(10 * p[0]) * jnp.sin(6 * p[1]) - jnp.sin(10 * p[1]) * jnp.sin(6 * p[0]))
    assert abs(float(sym - cross)) < 1e-6
    r = fig1_negative_region(num=100001)
    assert r["factor_min"] < 0 and -5.01 < r["negative_interval"][0] < r["negative_interval"][1] < -4.99
    assert float(fig1_loss(jnp.array([r["factor_argmin"], 8.0]))) < 0  # loss dips below zero near p = -5
