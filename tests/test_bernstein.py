import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mclandscape.core.bernstein import bernstein, bernstein_derivative, check_unit_interval


@pytest.mark.parametrize("n", range(1, 7))
def test_partition_of_unity_and_endpoints(n):
    t = jnp.linspace(0.0, 1.0, 101)
    b = np.asarray(bernstein(t, n))
    assert b.shape == (101, n + 1)
    np.testing.assert_allclose(b.sum(-1), 1.0, atol=1e-6)
    assert np.all(b >= 0)
    np.testing.assert_array_equal(b[0], np.eye(n + 1)[0])   # B(0) picks the first control point
    np.testing.assert_array_equal(b[-1], np.eye(n + 1)[-1])  # B(1) picks the last


@pytest.mark.parametrize("n", range(1, 7))
def test_derivative_matches_finite_differences_and_autodiff(n):
    t = np.linspace(0.05, 0.95, 19)
    h = 1e-3
    fd = (np.asarray(bernstein(jnp.asarray(t + h, jnp.float32), n)) -
          np.asarray(bernstein(jnp.asarray(t - h, jnp.float32), n))) / (2 * h)
    d = np.asarray(bernstein_derivative(jnp.asarray(t, jnp.float32), n))
    np.testing.assert_allclose(d, fd, atol=2e-2 * n)
    jac = jax.jit(jax.vmap(jax.jacfwd(lambda s: bernstein(s, n))))(jnp.asarray(t, jnp.float32))  # one program
    np.testing.assert_allclose(d, np.asarray(jac), atol=1e-4 * n * n)


@pytest.mark.parametrize("n", range(1, 7))
def test_gradient_finite_at_interval_ends(n):
    ends = jnp.asarray([0.0, 1.0], jnp.float32)
    g = jax.jit(jax.vmap(jax.jacrev(lambda s: bernstein(s, n))))(ends)  # the gradient at t = 0 and at t = 1
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(np.asarray(g), np.asarray(bernstein_derivative(ends, n)), atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.floats(0.0, 1.0), st.integers(0, 8))
def test_property_unity(t, n):
    assert abs(float(np.sum(bernstein(jnp.float32(t), n))) - 1.0) < 1e-5


def test_bad_inputs():
    with pytest.raises(ValueError, match="degree"):
        bernstein(0.5, -1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_unit_interval([0.2, 1.5], "t")
    with pytest.raises(ValueError, match="empty"):
        check_unit_interval([], "t")
    with pytest.raises(ValueError, match="NaN"):
        check_unit_interval([np.nan], "u")
