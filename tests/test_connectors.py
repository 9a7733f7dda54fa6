import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mclandscape.core import connectors as C
from mclandscape.core import tree as T
from mclandscape.core.bernstein import bernstein


def _model(seed):
    r = np.random.default_rng(seed)
    return {"conv": {"kernel": jnp.asarray(r.normal(size=(3, 3, 1, 4)), jnp.float32)},
            "dense": {"kernel": jnp.asarray(r.normal(size=(4, 2)), jnp.float32),
                      "bias": jnp.asarray(r.normal(size=(2,)), jnp.float32)}}


CORNERS = [_model(i) for i in range(4)]


def _vec(t):
    return np.asarray(T.tree_ravel(t)[0], np.float64)


def _rows(stacked):
    """Each member of a stacked tree as one float64 vector (the order of ``_vec``), without a slice per member."""
    leaves = jax.tree_util.tree_leaves(stacked)
    return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in leaves], axis=1)


@pytest.mark.parametrize("n,m", [(1, 1), (2, 2), (3, 3), (4, 4), (2, 4), (5, 3)])
def test_surface_corners_exact_and_bilinear_everywhere(n, m):
    s = C.bezier_surface(*CORNERS, n=n, m=m)
    assert s.shape == (n + 1, m + 1)
    assert sum(s.fixed) == 4
    c = np.stack([_vec(m_) for m_ in CORNERS])
    corners = s.points(jnp.asarray([(0, 0), (0, 1), (1, 0), (1, 1)], jnp.float32))
    np.testing.assert_array_equal(_rows(corners), c)  # bit-exact (float32 values, compared exactly)
    rng = np.random.default_rng(0)
    uv = rng.uniform(size=(25, 2))
    u, v = uv[:, :1], uv[:, 1:]
    ref = (1 - u) * (1 - v) * c[0] + (1 - u) * v * c[1] + u * (1 - v) * c[2] + u * v * c[3]
    np.testing.assert_allclose(_rows(s.points(uv)), ref, atol=1e-5)


def _seed_a3_coefficients(u, v):
    """Seed 000 appendix A.3, printed C_00, C_02, C_20, C_22 for n = m = 2."""
    bu, bv = np.asarray(bernstein(jnp.asarray(u), 2)), np.asarray(bernstein(jnp.asarray(v), 2))
    B = lambda i, j: bu[..., i] * bv[..., j]
    c00 = B(0, 0) + 0.5 * B(0, 1) + 0.5 * B(1, 0) + 0.25 * B(1, 1)
    c02 = B(0, 2) + 0.5 * B(0, 1) + 0.25 * B(1, 1) + 0.5 * B(1, 2)
    c20 = B(2, 0) + 0.5 * B(1, 0) + 0.25 * B(1, 1) + 0.5 * B(2, 1)
    c22 = B(2, 2) + 0.5 * B(1, 2) + 0.25 * B(1, 1) + 0.5 * B(2, 1)
    return c00, c02, c20, c22


def test_seed_a3_coefficients_reduce_to_bilinear_and_slips():
    g = np.linspace(0.05, 0.95, 7)
    u, v = [a.ravel() for a in np.meshgrid(g, g, indexing="ij")]
    c00, c02, c20, c22 = _seed_a3_coefficients(u, v)
    np.testing.assert_allclose(c00, (1 - u) * (1 - v), atol=1e-6)
    np.testing.assert_allclose(c02, (1 - u) * v, atol=1e-6)
    np.testing.assert_allclose(c20, u * (1 - v), atol=1e-6)
    np.testing.assert_allclose(c22, u * v, atol=1e-6)
    np.testing.assert_allclose(c00 + c02 + c20 + c22, 1.0, atol=1e-6)
    # The connector's bilinear coefficients agree with the seed's C_ij.
    w = C.bilinear_coefficients(2, 2)  # control weights of (c00, c0m, cn0, cnm)
    coef = np.asarray(C.bezier_surface(*CORNERS, n=2, m=2).coefficients(jnp.asarray(np.stack([u, v], 1), jnp.float32)))
    np.testing.assert_allclose(coef @ w, np.stack([c00, c02, c20, c22], 1), atol=1e-5)
    # Printed symmetry relations: two hold, two do not (seed slip).
    a3 = lambda uu, vv: dict(zip(["00", "02", "20", "22"], _seed_a3_coefficients(uu, vv), strict=True))
    L, R1, R2 = a3(u, v), a3(1 - u, 1 - v), None
    np.testing.assert_allclose(L["00"], R1["22"], atol=1e-6)          # C00(u,v) = C22(1-u,1-v): holds
    np.testing.assert_allclose(L["22"], R1["00"], atol=1e-6)          # C22(u,v) = C00(1-u,1-v): holds
    R2 = a3(u, 1 - v)
    assert not np.allclose(L["02"], R2["20"], atol=1e-3)               # printed C02(u,v) = C20(u,1-v): false
    R3 = a3(1 - u, v)
    assert not np.allclose(L["20"], R3["02"], atol=1e-3)               # printed C20(u,v) = C02(1-u,v): false
    np.testing.assert_allclose(L["02"], R1["20"], atol=1e-6)          # true: C02(u,v) = C20(1-u,1-v)
    np.testing.assert_allclose(L["02"], R2["00"], atol=1e-6)          # true: C02(u,v) = C00(u,1-v)
    # Printed squared ratios are false; the true ratios are not squared.
    ratio = L["00"] / L["22"]
    assert not np.allclose(ratio, ((1 - u) * (1 - v) / (u * v)) ** 2, rtol=1e-3)
    np.testing.assert_allclose(ratio, (1 - u) * (1 - v) / (u * v), rtol=1e-4)
    np.testing.assert_allclose(L["02"] / L["20"], (1 - u) * v / (u * (1 - v)), rtol=1e-4)


@pytest.mark.parametrize("degree", [1, 2, 3, 5])
def test_bezier_curve_endpoints_and_linear_init(degree):
    a, b = CORNERS[0], CORNERS[1]
    c = C.bezier_curve(a, b, degree)
    assert c.fixed == (True,) + (False,) * (degree - 1) + (True,)
    ts = np.linspace(0, 1, 9)
    got = _rows(c.points(ts))
    ref = (1 - ts[:, None]) * _vec(a) + ts[:, None] * _vec(b)  # linear init -> straight line
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_polychain_is_piecewise_linear():
    a, b, bend = CORNERS[0], CORNERS[1], CORNERS[2]
    c = C.polychain(a, b, 1, bends=[bend])
    np.testing.assert_allclose(_vec(c.point(0.5)), _vec(bend), atol=1e-6)
    np.testing.assert_allclose(_vec(c.point(0.25)), 0.5 * _vec(a) + 0.5 * _vec(bend), atol=1e-5)
    np.testing.assert_allclose(_vec(c.point(1.0)), _vec(b), atol=1e-6)
    c3 = C.polychain(a, b, 3)
    np.testing.assert_allclose(np.asarray(c3.coefficients(jnp.linspace(0, 1, 11))).sum(1), 1.0, atol=1e-6)


def test_derivatives_match_finite_differences():
    s = C.bezier_surface(*CORNERS, n=3, m=2)
    rng = np.random.default_rng(1)
    ctrl = jax.tree_util.tree_map(lambda x: x + jnp.asarray(rng.normal(size=x.shape), jnp.float32), s.control)
    s = s.replace(control=ctrl)
    uv = np.array([0.3, 0.6])
    du, dv = s.derivatives(jnp.asarray(uv, jnp.float32))
    h = 1e-3
    f = lambda p: _vec(s.point(jnp.asarray(p, jnp.float32)))
    np.testing.assert_allclose(_vec(du), (f(uv + [h, 0]) - f(uv - [h, 0])) / (2 * h), atol=5e-2, rtol=1e-2)
    np.testing.assert_allclose(_vec(dv), (f(uv + [0, h]) - f(uv - [0, h])) / (2 * h), atol=5e-2, rtol=1e-2)
    c = C.bezier_curve(CORNERS[0], CORNERS[1], 3, bends=[CORNERS[2], CORNERS[3]])
    (dt,) = c.derivatives(jnp.float32(0.4))
    g = lambda t: _vec(c.point(jnp.float32(t)))
    np.testing.assert_allclose(_vec(dt), (g(0.4 + h) - g(0.4 - h)) / (2 * h), atol=5e-2, rtol=1e-2)


def test_simplex_barycentric():
    s = C.simplex(CORNERS[:3])
    alpha = np.array([[0.2, 0.3, 0.5]])
    ref = 0.2 * _vec(CORNERS[0]) + 0.3 * _vec(CORNERS[1]) + 0.5 * _vec(CORNERS[2])
    np.testing.assert_allclose(_vec(T.tree_index(s.points(alpha), 0)), ref, atol=1e-5)
    with pytest.raises(ValueError, match="sum to 1"):
        s.validate_points([[0.5, 0.5, 0.5]])


def test_bad_inputs_raise_clear_errors():
    bad = jax.tree_util.tree_map(lambda x: x, CORNERS[1])
    bad["dense"]["kernel"] = jnp.zeros((5, 2))
    with pytest.raises(T.TreeMismatchError, match="kernel"):
        C.bezier_curve(CORNERS[0], bad, 2)
    with pytest.raises(ValueError, match="degree"):
        C.bezier_curve(CORNERS[0], CORNERS[1], 0)
    with pytest.raises(ValueError, match="degree n"):
        C.bezier_surface(*CORNERS, n=0, m=2)
    nan = jax.tree_util.tree_map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), CORNERS[2])
    with pytest.raises(ValueError, match="non-finite"):
        C.bezier_surface(CORNERS[0], CORNERS[1], nan, CORNERS[3])
    s = C.bezier_surface(*CORNERS)
    with pytest.raises(ValueError, match=r"u must lie in \[0, 1\]"):
        s.validate_points([[1.2, 0.1]])
    with pytest.raises(ValueError, match="empty"):
        s.validate_points(np.zeros((0, 2)))
    with pytest.raises(ValueError, match=r"t must lie"):
        C.bezier_curve(CORNERS[0], CORNERS[1]).validate_points([-0.1])
    with pytest.raises(ValueError, match="at least 2"):
        C.simplex([CORNERS[0]])


def test_bezier_and_bilinear_surfaces_share_one_corner_naming():
    """Both take (c00, c01, c10, c11), named by (u, v); bezier_surface's degrees are keyword-only."""
    named = dict(c00=CORNERS[0], c01=CORNERS[1], c10=CORNERS[2], c11=CORNERS[3])
    b = C.bezier_surface(**named, n=1, m=1)
    lin = C.bilinear_surface(**named)
    for uv, corner in zip([(0, 0), (0, 1), (1, 0), (1, 1)], CORNERS, strict=True):
        for s in (b, lin, C.bezier_surface(**named, n=3, m=2)):
            np.testing.assert_array_equal(_vec(s.point(jnp.asarray(uv, jnp.float32))), _vec(corner))
    with pytest.raises(TypeError, match="positional"):
        C.bezier_surface(CORNERS[0], CORNERS[1], CORNERS[0], CORNERS[1], CORNERS[0])  # a 5th model, not n
    with pytest.raises(TypeError, match="surface degree n must be an integer"):
        C.bezier_surface(*CORNERS, n=CORNERS[0])
    with pytest.raises(TypeError, match="Bézier degree must be an integer"):
        C.bezier_curve(CORNERS[0], CORNERS[1], CORNERS[2])  # bends go in bends=[...]


def test_points_outside_the_unit_interval_need_extrapolate():
    a, b = {"w": jnp.asarray([0.0, 0.0])}, {"w": jnp.asarray([2.0, 0.0])}
    line = C.bezier_curve(a, b, 1)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]; got 1.5"):
        line.point(1.5)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        line.points(jnp.asarray([0.0, -0.5]))
    assert line.point(1.5, extrapolate=True)["w"].tolist() == [3.0, 0.0]
    assert line.validate_points([-0.5, 2.0], extrapolate=True).tolist() == [-0.5, 2.0]
    # a chain continues its end segments linearly (not the hat functions, which fall to 0 outside [0, 1])
    chain = C.polychain(a, b, 1, bends=[{"w": jnp.asarray([1.0, 1.0])}])
    np.testing.assert_allclose(chain.point(1.5, extrapolate=True)["w"], [3.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(chain.point(-0.5, extrapolate=True)["w"], [-1.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(chain.point(0.25)["w"], [0.5, 0.5], atol=1e-6)
    s = C.bezier_surface(*CORNERS, n=2, m=2)
    with pytest.raises(ValueError, match=r"v must lie in \[0, 1\]"):
        s.point(jnp.asarray([0.5, 1.2]))
    assert s.validate_points([[0.5, 1.2]], extrapolate=True).shape == (1, 2)
    simplex = C.simplex(CORNERS[:3])
    with pytest.raises(ValueError, match="sum to 1"):  # extrapolation keeps the weights affine
        simplex.validate_points([[1.5, 0.0, 0.0]], extrapolate=True)
    assert simplex.validate_points([[1.5, -0.5, 0.0]], extrapolate=True).shape == (1, 3)


def test_surface_points_must_be_pairs():
    """A 1-D array for a surface used to be read as one (u, v) point or silently reshaped."""
    s = C.bezier_surface(*CORNERS, n=2, m=2)
    for bad in ([0.2, 0.5], np.linspace(0, 1, 6), np.zeros((3, 3))):
        with pytest.raises(ValueError, match=r"shape \[P, 2\]"):
            s.validate_points(bad)
    with pytest.raises(ValueError, match=r"shape \[P, 2\]"):
        s.coefficients(jnp.linspace(0, 1, 6))
    with pytest.raises(ValueError, match=r"one point of shape \(2,\)"):
        s.point(jnp.asarray([[0.1, 0.2], [0.3, 0.4]]))
    with pytest.raises(ValueError, match="NaN"):
        s.validate_points([[0.1, np.nan]])
    assert s.validate_points([[0.2, 0.5]]).shape == (1, 2)
