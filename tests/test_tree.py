import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mclandscape.core import tree as T


def _model(seed, scale=1.0):
    r = np.random.default_rng(seed)
    return {"params": {"Dense_0": {"kernel": jnp.asarray(r.normal(size=(4, 3)) * scale, jnp.float32),
                                   "bias": jnp.asarray(r.normal(size=(3,)), jnp.float32)}}}


def test_linear_algebra_against_numpy():
    a, b = _model(0), _model(1)
    va, unravel = T.tree_ravel(a)
    vb, _ = T.tree_ravel(b)
    va, vb = np.asarray(va, np.float64), np.asarray(vb, np.float64)
    assert np.isclose(float(T.tree_dot(a, b)), va @ vb, rtol=1e-5)
    assert np.isclose(float(T.tree_norm(a)), np.linalg.norm(va), rtol=1e-5)
    assert np.isclose(float(T.tree_distance(a, b)), np.linalg.norm(va - vb), rtol=1e-5)
    assert np.isclose(float(T.tree_cosine(a, b)), va @ vb / np.linalg.norm(va) / np.linalg.norm(vb), rtol=1e-5)
    w = T.tree_combine(jnp.asarray([0.25, 0.75]), T.tree_stack([a, b]))
    np.testing.assert_allclose(np.asarray(T.tree_ravel(w)[0]), 0.25 * va + 0.75 * vb, rtol=1e-5)
    assert T.tree_size(a) == va.size
    back = unravel(jnp.asarray(va, jnp.float32))
    np.testing.assert_array_equal(np.asarray(back["params"]["Dense_0"]["kernel"]),
                                  np.asarray(a["params"]["Dense_0"]["kernel"]))
    st_ = T.tree_stack([a, b, a])
    g = np.asarray(T.tree_gram(st_))
    np.testing.assert_allclose(g[0, 1], va @ vb, rtol=1e-5)
    assert len(T.tree_unstack(st_)) == 3


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=3, max_size=3))
def test_property_combine_is_linear(w):
    ms = [_model(i) for i in range(3)]
    c = T.tree_combine(jnp.asarray(w, jnp.float32), T.tree_stack(ms))
    ref = sum(wi * np.asarray(T.tree_ravel(m)[0], np.float64) for wi, m in zip(w, ms, strict=True))
    np.testing.assert_allclose(np.asarray(T.tree_ravel(c)[0]), ref, atol=1e-4)


def test_structure_check_names_the_leaf():
    a = _model(0)
    b = jax.tree_util.tree_map(lambda x: x, a)
    b["params"]["Dense_0"]["kernel"] = jnp.zeros((5, 3))
    with pytest.raises(T.TreeMismatchError, match=r"\['Dense_0'\]\['kernel'\].*shape \(4, 3\).*\(5, 3\)"):
        T.check_same_structure(a, b)
    c = {"params": {"Dense_0": {"kernel": a["params"]["Dense_0"]["kernel"]}}}
    with pytest.raises(T.TreeMismatchError, match=r"\['bias'\] is in a but not in b"):
        T.check_same_structure(a, c)
    d = jax.tree_util.tree_map(lambda x: x.astype(jnp.float16), a)
    with pytest.raises(T.TreeMismatchError, match="dtype"):
        T.check_same_structure(a, d)
    with pytest.raises(T.TreeMismatchError):
        T.tree_stack([a, b])


def test_check_finite_names_leaf():
    a = _model(0)
    a["params"]["Dense_0"]["bias"] = a["params"]["Dense_0"]["bias"].at[1].set(jnp.nan)
    with pytest.raises(ValueError, match=r"\['bias'\].*non-finite"):
        T.check_finite(a)


def test_random_normal_shapes_and_determinism():
    a = _model(0)
    r1 = T.tree_random_normal(jax.random.key(3), a)
    r2 = T.tree_random_normal(jax.random.key(3), a)
    T.check_same_structure(a, r1)
    assert float(T.tree_distance(r1, r2)) == 0.0
