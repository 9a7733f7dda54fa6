"""Bézier-surface mode connectivity (Bézier-surface paper, Anonymous, 2024): phases, area, training, grids."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from mclandscape.core import connectors as C
from mclandscape.core import tree as T
from mclandscape.core.bernstein import bernstein
from mclandscape.engine.data import Dataset, load_dataset
from mclandscape.engine.models import get_model
from mclandscape.engine.models.base import from_flax
from mclandscape.engine.points import uv_grid
from mclandscape.methods import surface as S
from mclandscape.methods import surface_grid as G
from mclandscape.methods.surface_train import SurfaceConfig, train_surface

MLP = get_model("mlp", widths=[16], num_classes=10)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="module")
def corners(digits):
    """Four tiny MLPs trained briefly from different initialisations (full-batch Adam, all four at once)."""
    train, _ = digits
    x, y = jnp.asarray(train.x), jnp.asarray(train.y)
    opt = optax.adam(0.02)

    def fit(key):
        p = MLP.init(key, x[:2])["params"]

        def step(carry, _):
            p, s = carry
            g = jax.grad(lambda q: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
                MLP.apply({"params": q}, x), y)))(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=40)
        return p

    stacked = jax.jit(jax.vmap(fit))(jax.random.split(jax.random.key(3), 4))
    return T.tree_unstack(stacked)


def _changed(a: C.Connector, b: C.Connector) -> np.ndarray:
    """Per control point: True where any leaf differs bit-wise."""
    ch = np.zeros(a.num_control, bool)
    for x, z in zip(jax.tree_util.tree_leaves(a.control), jax.tree_util.tree_leaves(b.control), strict=True):
        x, z = np.asarray(x), np.asarray(z)
        ch |= ~np.all((x == z).reshape(x.shape[0], -1), axis=1)
    return ch


# ---------------------------------------------------------------------------------------------------------
# phases


def test_phase_masks_and_line25_slip():
    for shape in [(3, 3), (4, 5), (5, 4), (2, 3)]:
        n, m = shape[0] - 1, shape[1] - 1
        p1, p2, p3 = (S.phase_trainable(shape, p).reshape(shape) for p in S.PHASES)
        corners = np.zeros(shape, bool)
        corners[[0, 0, n, n], [0, m, 0, m]] = True
        assert not (p1 & p2).any()                          # disjoint
        np.testing.assert_array_equal(p1 | p2, ~corners)    # together: every non-corner point
        np.testing.assert_array_equal(p3, ~corners)
        assert not (p1 | p2 | p3)[corners].any()            # corners never
        assert p1[[0, n], 1:m].all() and not p1[1:n].any()  # phase 1: theta_0j, theta_nj only
        # Alg. 2 line 25 taken literally ("i in {0, n}") would train phase 1's points again in phase 2 and
        # leave the inner points of the u-curves (e.g. theta_i0 on the v = 0 edge) untrained before phase 3.
        literal = np.zeros(shape, bool)
        literal[[0, n], :] = True
        literal &= ~corners
        if n >= 2:
            assert not (p1 | literal)[1:n, :].any() and p2[1:n, :].all()
    with pytest.raises(ValueError, match="phase"):
        S.phase_trainable((3, 3), 4)
    with pytest.raises(ValueError, match="n, m >= 1"):
        S.phase_trainable((1, 3), 1)


def test_phase_samplers_and_curve_family():
    shape = (3, 4)  # n = 2, m = 3
    key = jax.random.key(0)
    p1 = np.asarray(S.phase_sampler(shape, 1)(key, 7))
    assert set(p1[:, 0].tolist()) == {0.0, 1.0} and ((p1[:, 1] >= 0) & (p1[:, 1] <= 1)).all()
    p2 = np.asarray(S.phase_sampler(shape, 2)(key, 8))
    assert sorted(set(p2[:, 1].tolist())) == [0.0, 1.0, 2.0, 3.0]          # every curve j = 0..m
    assert np.bincount(p2[:, 1].astype(int)).tolist() == [2, 2, 2, 2]      # stratified
    p3 = np.asarray(S.phase_sampler(shape, 3)(key, 50))
    assert p3.shape == (50, 2) and p3.min() >= 0 and p3.max() <= 1
    # curve C_j(u) = sum_i B_{i,n}(u) theta_ij against a brute-force combination
    rng = np.random.default_rng(0)
    ctrl = {"w": jnp.asarray(rng.normal(size=(12, 3, 2)), jnp.float32)}
    conn = C.from_control(ctrl, "surface", shape)
    coef = S.curve_family_coefficients(shape)
    for u, j in [(0.3, 0), (0.7, 2), (0.0, 3), (1.0, 1)]:
        got = np.asarray(T.tree_combine(coef(jnp.asarray([[u, j]]))[0], ctrl)["w"])
        b = np.asarray(bernstein(jnp.asarray(u), 2))
        ref = sum(b[i] * np.asarray(ctrl["w"][i * 4 + j]) for i in range(3))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # the outer curves j = 0 and j = m are the surface edges v = 0 and v = 1
    np.testing.assert_allclose(np.asarray(T.tree_combine(coef(jnp.asarray([[0.4, 3.0]]))[0], ctrl)["w"]),
                               np.asarray(conn.point(jnp.asarray([0.4, 1.0]))["w"]), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# the exact area element


def _fd_tangents(conn, pts, h=1e-4):
    """Central differences of phi at all points in one call: (phi_u, phi_v) as [P, d] float64 arrays."""
    pts = np.asarray(pts, np.float64)
    shifts = np.array([[h, 0], [-h, 0], [0, h], [0, -h]])
    allp = (pts[:, None, :] + shifts[None]).reshape(-1, 2)
    flat = jax.jit(lambda c, q: jax.vmap(lambda p: ravel_pytree(p)[0])(c.points(q)))(conn, jnp.asarray(allp))
    f = np.asarray(flat, np.float64).reshape(len(pts), 4, -1)
    return (f[:, 0] - f[:, 1]) / (2 * h), (f[:, 2] - f[:, 3]) / (2 * h)


def test_area_element_against_brute_force():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        # R^3 (explicit cross product) and R^7 (Gram determinant of the two tangents), pytrees of 2 leaves
        for dims in [(2, 1), (4, 3)]:
            corner = [{"a": jnp.asarray(rng.normal(size=dims[0])), "b": jnp.asarray(rng.normal(size=(dims[1],)))}
                      for _ in range(4)]
            conn = C.bezier_surface(*corner, n=2, m=3)
            conn = conn.replace(control=jax.tree_util.tree_map(
                lambda x: x + 0.4 * jnp.asarray(rng.normal(size=x.shape)), conn.control))
            pts = rng.uniform(size=(6, 2))
            # Z against a fine midpoint rule of the brute-force element (one call for both point sets)
            c = (np.arange(40) + 0.5) / 40
            mid = np.stack([a.ravel() for a in np.meshgrid(c, c, indexing="ij")], 1)
            got, at_mid = np.split(np.asarray(S.area_element(conn, np.concatenate([pts, mid]))), [6])
            tus, tvs = _fd_tangents(conn, pts)
            for tu, tv, g in zip(tus, tvs, got, strict=True):
                if tu.size == 3:
                    ref = np.linalg.norm(np.cross(tu, tv))
                else:
                    ref = math.sqrt(np.linalg.det(np.stack([tu, tv]) @ np.stack([tu, tv]).T))
                np.testing.assert_allclose(g, ref, rtol=1e-6)
            z_mid = float(np.mean(at_mid))
            np.testing.assert_allclose(float(S.surface_area(conn, quadrature=24)), z_mid, rtol=2e-3)
    # a planar unit square (bilinear corners, any degree) has area element 1 everywhere; q_uv = 1
    sq = [{"p": jnp.asarray(c, jnp.float32)} for c in ([0, 0, 5], [0, 1, 5], [1, 0, 5], [1, 1, 5])]
    for n, m in [(1, 1), (2, 2), (3, 4)]:
        conn = C.bezier_surface(*sq, n=n, m=m)
        np.testing.assert_allclose(np.asarray(S.area_element(conn, uv_grid(4))), 1.0, rtol=1e-5)
        np.testing.assert_allclose(float(S.surface_area(conn)), 1.0, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(S.area_density(conn, uv_grid(4))), 1.0, rtol=1e-5)  # shapes as above


def test_area_weights_and_proposal_are_unbiased():
    rng = np.random.default_rng(2)
    corner = [{"a": jnp.asarray(rng.normal(size=5), jnp.float32)} for _ in range(4)]
    conn = C.bezier_surface(*corner, n=2, m=2)
    conn = conn.replace(control=jax.tree_util.tree_map(
        lambda x: x + jnp.asarray(rng.normal(size=x.shape), jnp.float32), conn.control))
    f = lambda p: jnp.sin(3 * p[:, 0]) + p[:, 1] ** 2  # a test "loss"
    pts, w = S._gauss_legendre_grid(32)
    exact = float(jnp.sum(w * S.area_element(conn, pts) * f(jnp.asarray(pts))) / S.surface_area(conn, quadrature=32))
    u = jax.random.uniform(jax.random.key(0), (40000, 2))
    imp = float(jnp.mean(jax.jit(S.area_weights())(conn, u) * f(u)))
    sampler, dens = S.area_proposal(conn, cells=16, mix=0.1)
    q = jax.jit(sampler, static_argnums=1)(jax.random.key(1), 40000)
    assert float(q.min()) >= 0 and float(q.max()) <= 1
    wq = jax.jit(S.area_weights(proposal=dens))(conn, q)
    smp = float(jnp.mean(wq * f(q)))
    assert abs(imp - exact) < 0.02 and abs(smp - exact) < 0.02, (imp, smp, exact)
    assert float(jnp.std(wq)) < float(jnp.std(jax.jit(S.area_weights())(conn, u)))  # sampling from ~q: flatter weights
    # "full" differentiates through q_uv, "fixed" does not
    g = {mode: jax.jit(jax.grad(lambda c, mode=mode: jnp.mean(S.area_weights(gradient=mode)(conn.replace(control=c), u[:64])
                                                       * f(u[:64]))))(conn.control)["a"] for mode in ("full", "fixed")}
    assert float(jnp.abs(g["full"]).sum()) > 0 and float(jnp.abs(g["fixed"]).sum()) == 0.0
    with pytest.raises(ValueError, match="gradient"):
        S.area_weights(gradient="half")
    with pytest.raises(ValueError, match="mix"):
        S.area_proposal(conn, mix=0.0)


# ---------------------------------------------------------------------------------------------------------
# training


def test_each_phase_moves_exactly_its_points_and_layers(digits, corners, count_compiles):
    train, _ = digits
    small = Dataset(train.x[:128], train.y[:128], 10, "digits128")
    surf = C.bezier_surface(*corners, n=2, m=3)  # 3 x 4 control points
    for phase in S.PHASES:
        ep = [0, 0, 0]
        ep[phase - 1] = 1
        res = train_surface(MLP, surf, small, SurfaceConfig(epochs=ep, num_samples=3, batch_size=64, lr=0.05))
        np.testing.assert_array_equal(_changed(surf, res.connector), S.phase_trainable(surf.shape, phase))
        assert res.trained[phase] == np.flatnonzero(S.phase_trainable(surf.shape, phase)).tolist()
        assert len(res.history[phase]) == 1 and res.wall_time[phase] > 0
    # layer-specific optimisation: only the head (Dense_1) of the phase-3 points moves
    cfg = SurfaceConfig(epochs=(0, 0, 1), num_samples=2, batch_size=64, layers=r"Dense_1")
    res = train_surface(MLP, surf, small, cfg)
    for name in ("Dense_0", "Dense_1"):
        sub_a, sub_b = (c.replace(control=c.control[name]) for c in (surf, res.connector))
        expect = S.phase_trainable(surf.shape, 3) if name == "Dense_1" else np.zeros(12, bool)
        np.testing.assert_array_equal(_changed(sub_a, sub_b), expect)
    # equal inputs (an equal config, the masked optimizer named by value): nothing compiles, the same surface
    with count_compiles() as seen:
        again = train_surface(MLP, surf, small, SurfaceConfig(epochs=(0, 0, 1), num_samples=2, batch_size=64,
                                                               layers=r"Dense_1"))
    assert seen == [] and not _changed(res.connector, again.connector).any()
    with pytest.raises(ValueError, match="matches no parameter"):
        train_surface(MLP, surf, small, SurfaceConfig(epochs=(0, 0, 1), layers="conv9"))
    with pytest.raises(ValueError, match="epochs"):
        SurfaceConfig(epochs=(1, 1))
    with pytest.raises(ValueError, match="objective"):
        SurfaceConfig(objective="volume")
    bil = train_surface(MLP, C.bilinear_surface(*corners), small, SurfaceConfig(epochs=(1, 1, 0)))
    assert set(bil.skipped) == {1, 2, 3} and "no trainable" in bil.skipped[1]


def test_training_lowers_mean_surface_loss_and_resumes(digits, corners, tmp_path):
    train, test = digits
    surf = C.bezier_surface(*corners, n=2, m=2)
    cfg = SurfaceConfig(epochs=(1, 1, 2), num_samples=4, batch_size=128, lr=0.05)
    before = G.surface_grid(MLP, surf, train, test, steps=5)
    res = train_surface(MLP, surf, train, cfg, checkpoint_dir=tmp_path / "a")
    after = G.surface_grid(MLP, res.connector, train, test, steps=5)
    assert after.train_loss.mean() < 0.8 * before.train_loss.mean(), (before.train_loss.mean(),
                                                                       after.train_loss.mean())
    assert after.test_acc.mean() > before.test_acc.mean()
    np.testing.assert_allclose(after.corner_values("train_loss"), before.corner_values("train_loss"), rtol=1e-6)

    # interrupted in phase 3 after one saved epoch, then resumed: the same surface as the full run
    class Stop(Exception):
        pass

    def stop(epoch, result):
        if result.phase == 3 and epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train_surface(MLP, surf, train, cfg, checkpoint_dir=tmp_path / "b", callback=stop)
    resumed = train_surface(MLP, surf, train, cfg, checkpoint_dir=tmp_path / "b")
    for a, b in zip(jax.tree_util.tree_leaves(res.connector.control),
                    jax.tree_util.tree_leaves(resumed.connector.control), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert [len(resumed.history[p]) for p in S.PHASES] == [1, 1, 2]
    # a finished run called again restores every phase without training
    again = train_surface(MLP, surf, train, cfg, checkpoint_dir=tmp_path / "a")
    assert not _changed(res.connector, again.connector).any()


def test_area_objective_trains_on_samples_from_the_proposal(digits, corners):
    """Two epochs: the proposal is rebuilt between them (the importance estimator: the float64 test below)."""
    train, _ = digits
    small = Dataset(train.x[:64], train.y[:64], 10, "digits64")
    surf = C.bezier_surface(*corners, n=2, m=2)
    res = train_surface(MLP, surf, small, SurfaceConfig(epochs=(0, 0, 2), num_samples=3, batch_size=64,
                                                     objective="area", area_estimator="sample", proposal_cells=8))
    assert len(res.history[3]) == 2 and all(np.isfinite(r["objective"]) for r in res.history[3])
    np.testing.assert_array_equal(_changed(surf, res.connector), S.phase_trainable(surf.shape, 3))


# ---------------------------------------------------------------------------------------------------------
# evaluation and use


class TinyBN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(8, name="dense0")(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        return nn.Dense(10, name="head")(nn.relu(x))


def test_grid_recalibrates_bn_per_point(digits):
    train, test = digits
    tr = Dataset(train.x[:192], train.y[:192], 10, "tr")
    te = Dataset(test.x[:100], test.y[:100], 10, "te")
    bn = from_flax(TinyBN(), "tiny_bn", has_batch_stats=True)
    cs = [bn.init(jax.random.key(i), jnp.asarray(tr.x[:2]))["params"] for i in range(4)]
    surf = C.bezier_surface(*cs, n=2, m=2)
    grid = G.surface_grid(bn, surf, tr, te, steps=3, bn_batch_size=64)
    pts = uv_grid(3)
    params = T.tree_unstack(surf.points(pts))

    def np_stats(p):  # exact average over the 3 full batches of 64 of the batch mean / biased variance
        h = tr.x.reshape(192, -1).astype(np.float64) @ np.asarray(p["dense0"]["kernel"]) + np.asarray(
            p["dense0"]["bias"])
        hb = h.reshape(3, 64, -1)
        return {"bn": {"mean": jnp.asarray(hb.mean(1).mean(0), jnp.float32),
                       "var": jnp.asarray(hb.var(1).mean(0), jnp.float32)}}

    def test_loss(p, st):
        logits = bn.apply({"params": p, "batch_stats": st}, jnp.asarray(te.x))
        return float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, te.y)))

    ref = [test_loss(p, np_stats(p)) for p in params]
    wrong = [test_loss(p, np_stats(params[0])) for p in params]
    np.testing.assert_allclose(grid.test_loss.ravel(), ref, rtol=1e-4)
    assert np.max(np.abs(np.asarray(wrong) - np.asarray(ref))) > 1e-3  # one shared set of statistics is wrong


def test_ensembles_merge_and_extrema_against_numpy(digits, corners, count_compiles):
    train, test = digits
    surf = C.bezier_surface(*corners, n=2, m=2)
    grid = G.surface_grid(MLP, surf, train, test, steps=4, return_probs=True)
    with count_compiles() as seen:  # a second grid with equal inputs compiles nothing
        again = G.surface_grid(MLP, surf, train, test, steps=4, return_probs=True)
    assert seen == [] and np.array_equal(again.test_probs, grid.test_probs)
    assert grid.test_probs.shape == (16, len(test), 10)
    ens = G.surface_ensembles(grid, test.y)
    p = grid.test_probs.astype(np.float64)
    np.testing.assert_allclose(1 - ens["surface"].test_error, np.mean(p.mean(0).argmax(1) == test.y))
    cp = p[[0, 3, 12, 15]]
    np.testing.assert_allclose(1 - ens["corner"].test_error, np.mean(cp.mean(0).argmax(1) == test.y))
    np.testing.assert_allclose(ens["corner"].nll, -np.mean(np.log(cp.mean(0)[np.arange(len(test)), test.y])),
                               rtol=1e-6)
    # member accuracies are the grid's accuracies; corners are the corner models
    np.testing.assert_allclose(1 - np.asarray(ens["surface"].member_test_error), grid.test_acc.ravel(), atol=1e-6)
    for k, c in enumerate(corners):
        acc = np.mean(np.asarray(MLP.apply({"params": c}, jnp.asarray(test.x))).argmax(1) == test.y)
        np.testing.assert_allclose(grid.corner_values("test_acc")[k], acc, atol=1e-6)
    # merging picks the least train loss, not the best test accuracy
    tl = np.full((4, 4), 2.0)
    tl[3, 1], tl[0, 2] = 0.1, 5.0   # least train loss at (u, v) = (1, 1/3), highest at (0, 2/3)
    ta = np.full((4, 4), 0.3)
    ta[3, 1], ta[1, 2] = 0.5, 0.9   # best test accuracy elsewhere, at (1/3, 2/3)
    mb = G.merge_best(G.SurfaceGrid(4, uv_grid(4), tl, ta, tl, ta))
    assert (mb["u"], mb["v"], mb["test_acc"], mb["train_loss"]) == (1.0, 1 / 3, 0.5, 0.1)
    assert (mb["best_test_acc"], mb["best_test_u"], mb["best_test_v"]) == (0.9, 1 / 3, 2 / 3)
    ex = G.extrema(tl)
    assert ex["valley"] == [1.0, round(1 / 3, 6)] and ex["peak"] == [0.0, round(2 / 3, 6)]


def test_subset_approximation_reports_positions(digits, corners):
    train, test = digits
    surf = C.bezier_surface(*corners, n=2, m=2)
    full = G.surface_grid(MLP, surf, train, test, steps=3)
    r = G.subset_approximation(MLP, surf, train, test, full=full, train_batches=2, batch_size=64, test_size=90)
    assert r["train_examples"] == 128 and r["test_examples"] == 90
    for key in ("train_loss", "test_acc"):
        assert set(r[key]["full"]) >= {"valley", "peak"} and len(r[key]["subset"]["valley"]) == 2
        assert r[key]["full"] == G.extrema(getattr(full, key))
    assert r["train_loss"]["correlation"] > 0.5  # a few batches already order the grid like the full data
    with pytest.raises(ValueError, match="test_size"):
        G.subset_approximation(MLP, surf, train, test, full=full, test_size=10 ** 6)


def test_linear_surfaces(digits, corners):
    train, test = digits
    pts = G.triangle_points(11)
    assert pts.shape == (66, 3) and np.allclose(pts.sum(1), 1) and pts.min() >= 0
    tri = G.evaluate_triangle(MLP, corners[:3], test, steps=3)
    for k in range(3):  # the vertices are the three models
        i = int(np.flatnonzero(np.isclose(tri.points[:, k], 1.0))[0])
        acc = np.mean(np.asarray(MLP.apply({"params": corners[k]}, jnp.asarray(test.x))).argmax(1) == test.y)
        np.testing.assert_allclose(tri.accuracy[i], acc, atol=1e-6)
    traj = G.trajectory_surface(corners, n=4, m=4)
    for (u, v), c in zip([(0, 0), (0, 1), (1, 0), (1, 1)], corners, strict=True):
        np.testing.assert_array_equal(np.asarray(traj.point(jnp.asarray([u, v], jnp.float32))["Dense_0"]["kernel"]),
                                      np.asarray(c["Dense_0"]["kernel"]))
    # the trajectory surface is linear: its midpoint is the mean of the four corners
    mid = traj.point(jnp.asarray([0.5, 0.5]))
    np.testing.assert_allclose(np.asarray(mid["Dense_1"]["bias"]),
                               np.mean([np.asarray(c["Dense_1"]["bias"]) for c in corners], 0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exactly 3"):
        G.evaluate_triangle(MLP, corners, test)


def test_plots_write_pngs(tmp_path):
    from mclandscape.plots import save
    from mclandscape.plots import surface as plots

    g = np.random.default_rng(0).uniform(size=(5, 5))
    paths = [save(plots.heatmap_pair(g, g / 2, label="loss"), tmp_path / "hm.png"),
             save(plots.surface_3d([g, g / 2], titles=["a", "b"]), tmp_path / "s3.png"),
             save(plots.triangle_plot(G.triangle_points(5), np.arange(15.0)), tmp_path / "tri.png"),
             save(plots.subset_comparison(g, g + 0.1, label="acc"), tmp_path / "sub.png")]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="square"):
        plots.heatmap_pair(g[:3], g, label="l")


def test_callback_sees_the_surface_and_can_stop_training(digits, corners):
    from mclandscape.engine.loop import StopRun

    train, _ = digits
    surf = C.bezier_surface(*corners, n=2, m=2)
    seen = []

    def cb(epoch, result):
        seen.append((result.phase, epoch))
        record = result.history[result.phase][-1]
        assert record["epoch"] == epoch and "loss" in record  # epochs from 1 within the phase, as in history
        assert result.connector.kind == "surface" and result.connector.shape == (3, 3)
        if result.phase == 2:
            raise StopRun

    res = train_surface(MLP, surf, train.take(256), SurfaceConfig(epochs=(1, 2, 1), num_samples=2, batch_size=64),
                        callback=cb)
    assert seen == [(1, 1), (2, 1)] and len(res.history[2]) == 1 and 3 not in res.history
    assert "stopped by the callback" in res.skipped[3]
    assert "stopped" in res.skipped[3]


def test_train_surface_refuses_bad_input_with_clear_errors(digits, corners):
    train, _ = digits
    small = train.take(64)
    surf = C.bezier_surface(*corners, n=2, m=2)
    with pytest.raises(TypeError, match=r"bezier_surface\(c00, c01, c10, c11"):  # corners instead of a surface
        train_surface(MLP, *corners[:2], small)
    with pytest.raises(ValueError, match="surface"):
        train_surface(MLP, C.bezier_curve(corners[0], corners[1]), small)
    with pytest.raises(TypeError, match="Dataset"):
        train_surface(MLP, surf, (small.x, small.y))
    for bad in (0, -4):  # used to be a ZeroDivisionError and 'larger than the training set'
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            SurfaceConfig(epochs=(0, 0, 1), batch_size=bad)
    with pytest.raises(ValueError, match=r"batch_size 65 is larger than the training set \(64 examples\)"):
        train_surface(MLP, surf, small, SurfaceConfig(epochs=(0, 0, 1), batch_size=65))
    with pytest.raises(ValueError, match="epochs"):
        SurfaceConfig(epochs=(0, 0, 1.5))
    with pytest.raises(ValueError, match=r"shape \[P, 2\]"):  # a 1-D array is not reshaped into pairs
        S.area_element(surf, jnp.asarray([0.1, 0.2, 0.3, 0.4]))


def _bilinear_area_f64(cs, q):
    """The bilinear surface's area by the same Gauss-Legendre rule, in NumPy float64."""
    c00, c01, c10, c11 = (np.asarray(ravel_pytree(c)[0], np.float64) for c in cs)
    x, w = np.polynomial.legendre.leggauss(q)
    x, w = (x + 1) / 2, w / 2
    total = 0.0
    for u, wu in zip(x, w, strict=True):
        for v, wv in zip(x, w, strict=True):
            pu = (1 - v) * (c10 - c00) + v * (c11 - c01)
            pv = (1 - u) * (c01 - c00) + u * (c11 - c10)
            total += wu * wv * np.sqrt(max((pu @ pu) * (pv @ pv) - (pu @ pv) ** 2, 0.0))
    return total


def test_float64_surface_area_training_and_grid_stay_float64():
    """Under jax_enable_x64 a float64 surface keeps float64 quadrature nodes, samples, losses and metrics."""
    small, few = load_dataset("iris", "train"), load_dataset("iris", "test")
    tiny = get_model("mlp", widths=[4], num_classes=3)
    with jax.enable_x64(True):
        cs = [jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64),
                                     tiny.init(jax.random.key(s), small.x[:1])["params"]) for s in range(4)]
        surf = C.bezier_surface(*cs, n=2, m=2)
        z = S.surface_area(surf, quadrature=8)
        assert z.dtype == jnp.float64
        # float32 nodes and weights (the old rule) are off by ~1e-8 relative; float64 agrees to rounding
        assert float(z) == pytest.approx(_bilinear_area_f64(cs, 8), rel=1e-11)
        pts = jnp.asarray([[0.25, 0.5], [0.9, 0.1]])
        assert S.area_element(surf, pts).dtype == jnp.float64
        assert S.area_weights(quadrature=8)(surf, pts).dtype == jnp.float64
        assert S.phase_sampler(surf.shape, 1)(jax.random.key(0), 4).dtype == jnp.float64
        res = train_surface(tiny, surf, small, SurfaceConfig(epochs=(0, 0, 1), num_samples=2, batch_size=120,
                                                          objective="area", area_quadrature=2), progress=False)
        assert {a.dtype for a in jax.tree_util.tree_leaves(res.connector.control)} == {np.dtype("float64")}
        assert np.isfinite(res.history[3][0]["loss"]) and np.isfinite(res.history[3][0]["objective"])
        np.testing.assert_array_equal(_changed(surf, res.connector), S.phase_trainable(surf.shape, 3))
        grid = G.surface_grid(tiny, res.connector, small, few, steps=2)
        assert grid.train_loss.dtype == np.float64 and grid.test_acc.dtype == np.float64
