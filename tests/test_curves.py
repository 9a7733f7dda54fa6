"""Curve mode connectivity (Garipov et al., 2018): training, path metrics, evaluation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mclandscape.core import connectors as K
from mclandscape.core.objective import function_objective
from mclandscape.core.tree import TreeMismatchError, tree_stack
from mclandscape.engine.connector_train import ConnectorObjective
from mclandscape.engine.data import Dataset
from mclandscape.engine.evaluate import evaluate
from mclandscape.engine.models.base import from_flax
from mclandscape.engine.points import connector_points, stacked_points
from mclandscape.methods import curves as C


def double_well(p, batch=None):
    """Two wells at (-1, 0) and (1, 0) on a ring valley; the straight line crosses the bump V(0, 0) = 1."""
    x, y = p[0], p[1]
    r2 = x * x + y * y
    return (r2 - 1.0) ** 2 + 0.1 * y * y


START, END = jnp.asarray([-1.0, 0.0]), jnp.asarray([1.0, 0.0])


def _max_along(conn, f=double_well, n=401):
    pts = conn.points(jnp.linspace(0.0, 1.0, n))
    return float(jnp.max(jax.vmap(f)(pts)))


@pytest.mark.parametrize("make", [
    lambda: K.bezier_curve(START, END, 2, bends=[jnp.asarray([0.0, 0.05])]),
    lambda: K.polychain(START, END, 3, bends=[jnp.asarray([-0.5, 0.05]), jnp.asarray([0.0, 0.05]),
                                              jnp.asarray([0.5, 0.05])]),
], ids=["bezier2", "polychain3"])
def test_trained_curve_goes_around_the_double_well_barrier(make):
    """Minimising the slides' l(theta) = int L(w_theta(t)) dt bends the curve around the central bump.

    The bends start just off the straight line (on the line the y-gradient vanishes by symmetry)."""
    conn = make()
    line = C.line_connector(START, END)
    assert _max_along(line) == pytest.approx(1.0, abs=1e-4)
    cfg = C.CurveConfig(epochs=20, steps_per_epoch=50, optimizer=optax.sgd(0.02, momentum=0.9), num_samples=8,
                        weight_decay=0.0)
    res = C.fit_curve(double_well, conn, cfg, seed=0)
    trained = res.connector
    assert _max_along(trained) < 0.25 * _max_along(line)
    np.testing.assert_array_equal(trained.control[0], START)
    np.testing.assert_array_equal(trained.control[-1], END)
    assert res.history[-1]["loss"] < 0.3 * res.history[0]["loss"]
    # barrier along the trained curve, from 61 points (Garipov's evaluation grid)
    ts = np.linspace(0, 1, 61)
    vals = np.asarray(jax.vmap(double_well)(trained.points(ts)))
    assert C.loss_barrier(ts, vals) < 0.25
    assert C.curve_length(trained) > C.curve_length(line) == pytest.approx(2.0, rel=1e-6)


def test_point_weight_decay_is_garipovs_regulariser():
    """point_l2: objective = L(w(t)) + (wd/2)|w(t)|^2 at the sampled t; 'bends' decays the bends instead."""
    conn = K.bezier_curve(START, END, 2, bends=[jnp.asarray([0.3, 0.7])])
    wd = 0.2
    fixed_t = lambda key, k: jnp.full((k,), 0.25)
    common = dict(point=function_objective(double_well), template=conn.replace(control=None), sampler=fixed_t,
                  mask=jnp.asarray(conn.trainable), num_samples=2, strategy="map")
    w = conn.point(0.25)
    obj, aux = ConnectorObjective(**common, point_l2=wd)(conn.control, None, jax.random.key(0))
    assert float(obj) == pytest.approx(float(double_well(w) + 0.5 * wd * jnp.sum(w * w)), rel=1e-6)
    np.testing.assert_allclose(aux["point_losses"], float(double_well(w)), rtol=1e-6)  # reported losses exclude it
    obj_b, _ = ConnectorObjective(**common, l2=wd)(conn.control, None, jax.random.key(0))
    assert float(obj_b) == pytest.approx(float(double_well(w)) + 0.5 * wd * (0.3 ** 2 + 0.7 ** 2), rel=1e-6)
    assert C.CurveConfig(weight_decay=wd).l2_terms == {"point_l2": wd, "l2": 0.0}
    assert C.CurveConfig(weight_decay=wd, weight_decay_on="control").l2_terms == {"point_l2": 0.0, "l2": wd}
    with pytest.raises(ValueError, match="weight_decay_on"):
        C.CurveConfig(weight_decay_on="all")
    with pytest.raises(ValueError, match="weight_decay"):
        C.CurveConfig(weight_decay=-1.0)


def test_garipov_schedule():
    s = C.garipov_schedule(0.1, epochs=10, steps_per_epoch=3)
    lr = [float(s(e * 3)) for e in range(10)]
    np.testing.assert_allclose(lr[:6], 0.1)                       # a <= 0.5
    assert lr[7] == pytest.approx(0.1 * (1 - 0.2 / 0.4 * 0.99))  # a = 0.7
    assert lr[9] == pytest.approx(0.001)                          # a > 0.9
    assert float(s(3 * 7 + 2)) == lr[7]                           # constant within an epoch
    with pytest.raises(ValueError):
        C.garipov_schedule(0.1, 0, 3)


def test_lengths_distances_and_stats():
    a, b, c = jnp.asarray([0.0, 0.0]), jnp.asarray([3.0, 4.0]), jnp.asarray([6.0, 0.0])
    chain = K.polychain(a, c, 1, bends=[b])
    assert C.curve_length(chain) == pytest.approx(10.0, rel=1e-6)
    assert C.curve_length(chain, num_points=3) == pytest.approx(10.0, rel=1e-6)
    # quadratic Bézier (0,0)-(1,2)-(2,0): length from a fine numerical integral of |w'(t)|
    bez = K.bezier_curve(a, jnp.asarray([2.0, 0.0]), 2, bends=[jnp.asarray([1.0, 2.0])])
    t = np.linspace(0, 1, 200001)
    speed = np.hypot(2.0 * np.ones_like(t), 4.0 * (1 - 2 * t))
    want = np.trapezoid(speed, t)
    assert C.curve_length(bez) == pytest.approx(want, rel=1e-5)
    dl = C.point_distances(bez, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(dl, [0.0, np.hypot(1, 1), np.hypot(1, 1)], rtol=1e-6)
    # big offsets do not spoil the distances (Gram of centred control points)
    far = K.polychain(a + 1e4, c + 1e4, 1, bends=[b + 1e4])
    assert C.curve_length(far) == pytest.approx(10.0, rel=1e-4)
    st = C.path_stats([1.0, 3.0, 3.0], [0.0, 1.0, 3.0])
    assert st["int"] == pytest.approx((2.0 * 1 + 3.0 * 3) / 4) and st["max"] == 3 and st["mean"] == pytest.approx(7 / 3)
    assert C.path_stats([2.0, 2.0], [0.0, 0.0])["int"] == 2.0
    assert C.loss_barrier([0, 0.5, 1], [1.0, 3.0, 2.0]) == pytest.approx(1.5)
    assert C.loss_barrier([0, 0.5, 1], [1.0, 0.0, 1.0]) == 0.0  # below the chord: no barrier
    with pytest.raises(ValueError, match="start at 0"):
        C.loss_barrier([0.1, 1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="same length"):
        C.loss_barrier([0, 1], [1.0])


def test_bad_inputs():
    with pytest.raises(ValueError, match="identical"):
        C.fit_curve(double_well, K.bezier_curve(START, START, 2), C.CurveConfig(epochs=1, optimizer=optax.sgd(0.1)))
    with pytest.raises(ValueError, match="bezier or polychain"):
        C.fit_curve(double_well, K.simplex([START, END, START + 1]), C.CurveConfig(epochs=1, optimizer=optax.sgd(0.1)))
    with pytest.raises(ValueError, match="Bézier degree"):
        K.bezier_curve(START, END, degree=0)
    with pytest.raises(ValueError, match="num_bends"):
        K.polychain(START, END, num_bends=-1)
    with pytest.raises(ValueError, match="curve"):
        C.curve_length(K.simplex([START, END]))


# ---- networks -------------------------------------------------------------------------------------------

class _TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(3)(nn.tanh(nn.Dense(8)(x)))


class _TinyBN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(6)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(3)(nn.relu(x))


def _toy(n, seed):
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, 5)).astype(np.float32)
    y = ((x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int32) + (x[:, 2] > 1).astype(np.int32)).astype(np.int32)
    return Dataset(x=x, y=y, num_classes=3, name="toy")


def test_train_and_evaluate_curve_on_a_network(count_compiles):
    model = from_flax(_TinyMLP(), "tiny")
    train, test = _toy(128, 0), _toy(64, 1)
    p0 = model.init(jax.random.key(0), train.x[:2])["params"]
    p1 = model.init(jax.random.key(1), train.x[:2])["params"]
    with pytest.raises(ValueError, match="identical"):
        C.train_curve(model, K.bezier_curve(p0, p0), train, C.CurveConfig(epochs=1))
    with pytest.raises(ValueError, match="nothing to train"):
        C.train_curve(model, K.bezier_curve(p0, p1, degree=1), train, C.CurveConfig(epochs=1))
    seen = []
    res = C.train_curve(model, K.polychain(p0, p1, num_bends=1), train,
                        C.CurveConfig(epochs=3, batch_size=32, lr=0.05, num_samples=2), callback=lambda epoch, r: seen.append((epoch, len(r.history),
                                                                              r.connector.kind)))
    assert seen == [(1, 1, "polychain"), (2, 2, "polychain"), (3, 3, "polychain")]
    assert [r["epoch"] for r in res.history] == [1, 2, 3]  # epochs from 1, as in train_model and train_surface
    conn = res.connector
    assert len(res.history) == 3 and conn.kind == "polychain"
    for a, b in zip(jax.tree_util.tree_leaves(conn.control), jax.tree_util.tree_leaves(tree_stack([p0, p0, p1])),
                    strict=True):
        np.testing.assert_array_equal(a[0], b[0])
    ev = C.evaluate_curve(model, conn, train, test)
    with count_compiles() as seen:  # equal inputs: nothing compiles, the same curve and series
        again = C.train_curve(model, K.polychain(p0, p1, num_bends=1), train,
                              C.CurveConfig(epochs=3, batch_size=32, lr=0.05, num_samples=2))
        ev2 = C.evaluate_curve(model, conn, train, test)
    assert seen == [] and np.array_equal(ev2.test_loss, ev.test_loss)
    for a, b in zip(jax.tree_util.tree_leaves(again.connector.control), jax.tree_util.tree_leaves(conn.control),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert ev.ts.shape == (61,) and ev.train_loss.shape == (61,) and ev.test_acc.shape == (61,)
    ends = evaluate(model, stacked_points(tree_stack([p0, p1])), test)
    np.testing.assert_allclose(ev.test_loss[[0, -1]], ends.loss, rtol=1e-5)
    assert ev.length == pytest.approx(C.curve_length(conn), rel=1e-6)
    assert ev.dl.sum() == pytest.approx(ev.length, rel=1e-5)  # t = 0.5 (the bend) is on the 61-point grid
    s = ev.summary()
    for key in ("train_loss", "train_err", "test_loss", "test_err"):
        assert set(s[key]) == {"start", "end", "min", "max", "mean", "int"}
    assert s["test_loss_barrier"] == pytest.approx(ev.barrier("test_loss"))
    assert s["test_acc_min"] == pytest.approx(ev.test_acc.min())
    d = ev.to_dict()
    assert len(d["t"]) == 61 and "summary" in d


def test_train_curve_refuses_bad_input_with_clear_errors():
    model = from_flax(_TinyMLP(), "tiny")
    train = _toy(64, 0)
    p0 = model.init(jax.random.key(0), train.x[:2])["params"]
    p1 = model.init(jax.random.key(1), train.x[:2])["params"]
    curve = K.bezier_curve(p0, p1)
    with pytest.raises(TypeError, match=r"bezier_curve\(start, end"):  # the old (model, start, end, train) call
        C.train_curve(model, p0, p1, train)
    with pytest.raises(TypeError, match="Connector"):
        C.train_curve(model, p0, train)
    with pytest.raises(ValueError, match="surface"):
        C.train_curve(model, K.bilinear_surface(p0, p1, p0, p1), train)
    with pytest.raises(TypeError, match="Dataset"):
        C.train_curve(model, curve, (train.x, train.y))
    # end points of different widths: TreeMismatchError naming the leaf, at construction
    wide = {**p1, "Dense_0": {"kernel": jnp.zeros((5, 16)), "bias": jnp.zeros(16)}}  # 16 hidden units, not 8
    with pytest.raises(TreeMismatchError, match="Dense_0"):
        K.bezier_curve(p0, wide)
    with pytest.raises(TreeMismatchError, match="Dense_0"):
        K.polychain(p0, wide)
    for bad in (0, -4):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            C.CurveConfig(epochs=1, batch_size=bad)
    with pytest.raises(ValueError, match="larger than the training set"):
        C.train_curve(model, curve, train, C.CurveConfig(epochs=1, batch_size=65))
    with pytest.raises(ValueError, match="weight_decay_on"):
        C.CurveConfig(epochs=1, batch_size=32, weight_decay_on="bends")


def test_evaluate_curve_recalibrates_batchnorm():
    model = from_flax(_TinyBN(), "tiny_bn", has_batch_stats=True)
    train = _toy(128, 0)
    p0 = model.init(jax.random.key(0), train.x[:2])["params"]
    p1 = model.init(jax.random.key(1), train.x[:2])["params"]
    conn = K.bezier_curve(p0, p1, degree=2)
    ev = C.evaluate_curve(model, conn, train, num_points=5, bn_batch_size=64)
    direct = evaluate(model, connector_points(conn, np.linspace(0, 1, 5)), train, bn_data=train, bn_batch_size=64)
    plain = evaluate(model, connector_points(conn, np.linspace(0, 1, 5)), train, bn_data=train, bn_batch_size=128)
    np.testing.assert_allclose(ev.train_loss, direct.loss, rtol=1e-5)
    assert not np.allclose(ev.train_loss, plain.loss, rtol=1e-6)  # the statistics come from bn_data batches
    assert ev.test_loss is None and "test_loss" not in ev.summary()


def test_plot_path_profiles(tmp_path):
    from mclandscape.plots import plot_path_profiles, save

    ts = np.linspace(0, 1, 5)
    p = {"ts": ts, "dl": np.r_[0, np.ones(4)], "train_loss": ts * (1 - ts), "train_acc": np.full(5, 0.9),
         "test_loss": ts * (1 - ts) + 0.1, "test_acc": np.full(5, 0.8)}
    out = save(plot_path_profiles({"line": p, "curve": {**p, "test_loss": None}}, x="length"), tmp_path / "prof.png")
    assert (tmp_path / "prof.png").stat().st_size > 1000 and out.endswith("prof.png")
    with pytest.raises(ValueError, match="no paths"):
        plot_path_profiles({})


@pytest.mark.slow
def test_experiment_smoke_writes_the_contract_keys(tmp_path):
    """The experiment in this process (no subprocess: the compilations are shared with the other tests)."""
    import json

    from experiments.curves_neb import parse_args, run

    run(parse_args(["--out", str(tmp_path), "--models", "mlp", "--endpoint-epochs", "1", "--curve-epochs", "1",
                    "--neb-steps", "1", "--neb-cycles", "2", "--num-points", "3", "--sub-pivots", "1",
                    "--train-eval-size", "100", "--no-muller-brown"]))
    res = json.loads((tmp_path / "results.json").read_text())
    for key in ("line_barrier", "bezier_barrier", "polychain_barrier", "neb_barrier", "endpoint_acc",
                "bezier_min_acc", "neb_min_acc"):
        assert np.isfinite(res[key])
    assert res["bezier_min_acc"] <= max(res["models"]["mlp"]["endpoint_accs"])
    assert (tmp_path / "mlp_profiles.png").exists()
    counts = [c["num_pivots"] for c in res["models"]["mlp"]["neb_cycles"]]
    assert counts[0] == 5 and 5 <= counts[1] <= 7
