"""Curvature of a loss at a parameter point: Hessian-vector products, top eigenvalues, trace, full spectrum.

Used to check the flatness claims of Chen, Jin, Du, Li and Liu, 2021 ("Deforming the loss surface to affect
the behaviour of the optimizer", AAAI; the VDM paper): Theorem 1 (a vertical deformation mapping scales the
Hessian spectrum by ``δ'(ℓ)`` at critical points) and Fig. 4 (Hessian eigenvalues at the optimiser's end
points).

**The loss.** Every function here differentiates the engine's objective ``objective(params, batch, key) ->
(loss, aux)`` (:mod:`mclandscape.core.objective`: :func:`~mclandscape.core.objective.make_objective` with
``train=False``, or a scalar function wrapped by :func:`~mclandscape.core.objective.function_objective`),
called with ``key`` (default ``None``: no dropout). ``data`` is a fixed batch (``None`` for an objective of
the parameters alone) or a :func:`~mclandscape.engine.data.batch_stream`, whose epoch is the dataset: the
loss is then the example-weighted mean of its batch losses, ``L = Σ_b (n_b / N)·loss(params, batch_b)``
(``n_b`` the batch's weights summed, with ``pad=True``), so every quantity here (HVP, dense Hessian) is the
exact one of the full-dataset mean loss, whatever the batch sizes.

- :func:`make_hvp` / :func:`hvp`: ``v -> H v`` by forward-over-reverse differentiation (``jax.jvp`` of
  ``jax.grad``; Pearlmutter 1994, "Fast exact multiplication by the Hessian"), one jitted call per batch,
  without forming ``H``;
- :func:`lanczos`: extreme eigenvalues (and vectors) by Lanczos (1950) with full re-orthogonalisation
  (float64 on the host, one HVP per iteration);
- :func:`power_iteration`: top-k eigenvalues by magnitude, power iteration with deflation;
- :func:`hutchinson_trace`: ``tr(H) ≈ mean(vᵀHv)`` over Rademacher or Gaussian probes (Hutchinson 1990);
- :func:`dense_hessian` / :func:`hessian_eigenvalues`: the full ``d×d`` Hessian and its spectrum
  (``eigvalsh``) for small models;
- :func:`top_hessian_eigenvalues`: the top eigenvalues of a :class:`~mclandscape.engine.models.Model`'s
  loss on a dataset (its :func:`make_objective` in inference mode).

**Compilation.** The HVP and the dense Hessian are module-level ``jax.jit`` functions. An objective that is
a pytree (:class:`~mclandscape.core.objective.Objective`: static configuration hashed by value, the model
by identity; fixed collections such as BatchNorm statistics as data) is an ordinary argument, and any other
callable a static one hashed by identity. A second call with the same model and shapes
compiles nothing, even through a new ``make_objective``; batches of one shape share one compilation. Lanczos,
power iteration and Hutchinson run on the host in float64 and compile nothing of their own.

**Precision.** Products and Hessians are computed in the parameters' dtype and accumulated in float64 on the
host. With ``jax_enable_x64`` and float64 parameters everything is float64: the HVP, the dense Hessian, the
random start and probe vectors (drawn in float64) and the returned eigenvectors; with float32 parameters
the draws are float32, as without x64.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from mclandscape.core import _checks
from mclandscape.core.objective import call_objective, make_objective
from mclandscape.core.tree import PyTree, tree_ravel, tree_size
from mclandscape.engine.batches import BatchStream, batch_stream
from mclandscape.engine.data import Dataset
from mclandscape.engine.models.base import Model

__all__ = [
    "Eigs",
    "TraceEstimate",
    "HVP",
    "hvp",
    "make_hvp",
    "lanczos",
    "power_iteration",
    "hutchinson_trace",
    "dense_hessian",
    "hessian_eigenvalues",
    "top_hessian_eigenvalues",
]

@dataclasses.dataclass(frozen=True)
class Eigs:
    """Eigenpairs sorted by decreasing eigenvalue (``power_iteration``: decreasing magnitude).

    Attributes:
      values: ``[k]`` float64 eigenvalues.
      vectors: a list of k unit-norm parameter pytrees in the parameters' dtype, or ``None``.
      residuals: ``[k]`` norms ``|H u − λ u|`` (estimates from the recurrence for :func:`lanczos`).
      num_matvecs: the number of operator products used.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from mclandscape.core.objective import function_objective
        >>> mv = make_hvp(function_objective(lambda p, b: 0.5 * jnp.sum(jnp.array([1.0, 4.0]) * p ** 2)), jnp.zeros(2))
        >>> eigs = lanczos(mv, jnp.zeros(2), key=jax.random.key(0), num_iter=2, k=1)
        >>> round(float(eigs.values[0]), 4), eigs.num_matvecs
        (4.0, 2)
    """

    values: np.ndarray
    vectors: list | None
    residuals: np.ndarray
    num_matvecs: int


@dataclasses.dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson estimate of ``tr(H)``.

    Attributes:
      mean: the estimate ``(1/S) Σ_s v_sᵀ H v_s``.
      stderr: its standard error (NaN for one probe).
      samples: ``[S]`` float64 values ``v_sᵀ H v_s``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from mclandscape.core.objective import function_objective
        >>> mv = make_hvp(function_objective(lambda p, b: 0.5 * jnp.sum(jnp.array([1.0, 4.0]) * p ** 2)), jnp.zeros(2))
        >>> est = hutchinson_trace(mv, jnp.zeros(2), key=jax.random.key(0), num_samples=2)
        >>> est.mean, est.stderr  # Rademacher probes of a diagonal H are exact
        (5.0, 0.0)
    """

    mean: float
    stderr: float
    samples: np.ndarray


# ---- the objective as a jit argument -----------------------------------------------------------------------

def _as_argument(objective: Callable):
    """An objective as a jit argument: a pytree whose leaves are all arrays (an :class:`Objective`: its
    configuration in the tree definition, hashed by value, its arrays data) as it is; any other callable in a
    ``jax.tree_util.Partial`` (static, hashed by identity)."""
    if not callable(objective):
        raise ValueError(f"the objective must be callable (params, batch, key) -> (loss, aux), got "
                         f"{type(objective).__name__}")
    if all(isinstance(a, jax.Array | np.ndarray) for a in jax.tree_util.tree_leaves(objective)):
        return objective
    return jax.tree_util.Partial(objective)


def _hvp_impl(fn, params, v, batch, key):
    return jax.jvp(jax.grad(lambda p: call_objective(fn, p, batch, key)[0]), (params,), (v,))[1]


def _flat_hvp_impl(fn, params, x, batch, key):
    flat, unravel = ravel_pytree(params)
    return ravel_pytree(_hvp_impl(fn, params, unravel(x.astype(flat.dtype)), batch, key))[0]


def _hessian_impl(fn, params, batch, key):
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda x: call_objective(fn, unravel(x), batch, key)[0])(flat)


_hvp_jit = jax.jit(_hvp_impl)
_flat_hvp_jit = jax.jit(_flat_hvp_impl)
_hessian_jit = jax.jit(_hessian_impl)


# ---- data: a fixed batch or one epoch of a stream -------------------------------------------------------------

def _batches(data) -> tuple[list, list[float]]:
    """The batches of ``data`` and their weights ``n_b / N`` (a fixed batch: itself, weight 1)."""
    if not isinstance(data, BatchStream):
        return [data], [1.0]
    batches = [data(t) for t in range(data.steps_per_epoch)]
    sizes = [float(np.sum(b[2])) if len(b) == 3 else float(np.shape(b[0])[0]) for b in batches]
    return batches, [n / sum(sizes) for n in sizes]


def hvp(objective: Callable, params: PyTree, v: PyTree, batch: Any = None, *, key: jax.Array | None = None) -> PyTree:
    """``H v`` of the objective's loss at ``params`` on one batch, by forward-over-reverse (``jvp`` of ``grad``).

    Args:
      objective: ``(params, batch, key) -> (loss, aux)``, see the module docstring.
      params: the point.
      v: a tree shaped like ``params``.
      batch: the batch (``None`` for an objective of the parameters alone).
      key: the objective's key (``None``: no dropout).

    Returns:
      ``H v`` as a tree shaped like ``params`` (in its dtype: float64 for float64 parameters).

    Example:
        >>> import jax.numpy as jnp
        >>> from mclandscape.core.objective import function_objective
        >>> obj = function_objective(lambda p, b: 0.5 * jnp.sum(jnp.array([1.0, 2.0, 3.0]) * p ** 2))
        >>> hvp(obj, jnp.zeros(3), jnp.ones(3)).tolist()  # H = diag(1, 2, 3)
        [1.0, 2.0, 3.0]
    """
    return _hvp_jit(_as_argument(objective), params, v, batch, key)


class HVP:
    """``v -> H v`` of a dataset loss at a fixed point (built by :func:`make_hvp`).

    Calling it maps parameter trees to trees; :meth:`flat` maps flat float64 vectors (``tree_ravel`` order)
    to flat float64 vectors, the form :func:`lanczos`, :func:`power_iteration` and :func:`hutchinson_trace`
    use (no tree round trip per product).

    Args:
      objective: ``(params, batch, key) -> (loss, aux)``.
      params: the point at which the Hessian is taken.
      data: a fixed batch (``None``: the objective of the parameters alone) or a batch stream (one epoch).
      key: the objective's key (``None``: no dropout).

    Attributes:
      dim: the number of parameters ``d``.
      dtype: the parameters' (flattened) dtype, in which the products are computed.

    Example:
        >>> import jax.numpy as jnp
        >>> from mclandscape.core.objective import function_objective
        >>> mv = HVP(function_objective(lambda p, b: 0.5 * jnp.sum(jnp.array([1.0, 2.0]) * p ** 2)), jnp.zeros(2))
        >>> mv(jnp.ones(2)).tolist(), mv.flat([1.0, -1.0]).tolist()
        ([1.0, 2.0], [1.0, -2.0])
    """

    def __init__(self, objective: Callable, params: PyTree, data: Any = None, *, key: jax.Array | None = None):
        self._fn = _as_argument(objective)
        self.params, self.key = params, key
        self._batches, self._weights = _batches(data)
        flat, self._unravel = tree_ravel(params)
        self.dim = int(flat.size)
        self.dtype = np.dtype(flat.dtype)

    def flat(self, x) -> np.ndarray:
        """``H x`` for a flat vector ``x`` ``[d]`` (``tree_ravel`` order).

        Args:
          x: ``[d]`` values (cast to the parameters' dtype for the product).

        Returns:
          ``H x`` as a new (writable) float64 NumPy array, the batches' products summed with their weights.
        """
        x = np.asarray(x)
        if x.shape != (self.dim,):
            raise ValueError(f"expected a flat vector of shape ({self.dim},), got {x.shape}")
        x = jnp.asarray(x.astype(self.dtype))
        return sum(wb * np.asarray(_flat_hvp_jit(self._fn, self.params, x, b, self.key), np.float64)
                   for wb, b in zip(self._weights, self._batches, strict=True))

    def __call__(self, v: PyTree) -> PyTree:
        """``H v`` of a tree ``v`` shaped like the parameters, as a tree in their dtype."""
        flat, _ = tree_ravel(v)
        return self._unravel(jnp.asarray(self.flat(np.asarray(flat)).astype(self.dtype)))


def make_hvp(objective: Callable, params: PyTree, data: Any = None, *, key: jax.Array | None = None) -> HVP:
    """``v -> H v`` of the objective's loss on ``data`` at fixed ``params``.

    Args:
      objective: ``(params, batch, key) -> (loss, aux)`` (e.g. ``make_objective(model, train=False,
        variables=...)``).
      params: the point at which the Hessian is taken.
      data: a fixed batch, ``None`` (an objective of the parameters alone) or a
        :func:`~mclandscape.engine.data.batch_stream` (one epoch, each batch weighted by its examples:
        the Hessian of the mean loss over all of them).
      key: the objective's key (``None``: no dropout).

    Returns:
      An :class:`HVP`: each product is one jitted forward-over-reverse HVP per batch; batches of one shape
      share one compilation, and so do later calls with the same objective configuration.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from mclandscape.core.objective import function_objective
        >>> from mclandscape.engine.batches import batch_stream
        >>> from mclandscape.engine.data import Dataset
        >>> obj = function_objective(lambda w, b: 0.5 * jnp.sum(b[2] * (w * b[0][:, 0]) ** 2) / jnp.sum(b[2]))
        >>> ds = Dataset(np.array([[1.0], [3.0], [2.0]], np.float32), np.zeros(3, np.int32), 1, "toy")
        >>> mv = make_hvp(obj, jnp.ones(()), batch_stream(ds, 2, drop_last=False, pad=True))
        >>> round(float(mv(jnp.ones(()))), 4)  # the mean of x^2 over all three examples: (1 + 9 + 4) / 3
        4.6667
    """
    return HVP(objective, params, data, key=key)


def _flat_matvec(matvec, like):
    """``(mv, unravel, d, dtype)``: ``mv`` maps a flat float64 vector to a new float64 array."""
    flat, unravel = tree_ravel(like)
    dtype = np.dtype(flat.dtype)
    if isinstance(matvec, HVP):  # its flat form checks the size of every vector
        return matvec.flat, unravel, int(flat.size), dtype

    def mv(x: np.ndarray) -> np.ndarray:
        y, _ = tree_ravel(matvec(unravel(jnp.asarray(np.asarray(x).astype(dtype)))))
        return np.array(y, np.float64)  # a copy: np.asarray of a float64 device array is a read-only view

    return mv, unravel, int(flat.size), dtype


def _draw_dtype(dtype: np.dtype):
    """The dtype of the random start and probe vectors: float64 for float64 parameters (which exist only with
    ``jax_enable_x64``), else float32, so the vectors carry the parameters' precision."""
    return jnp.float64 if np.dtype(dtype) == np.float64 else jnp.float32


def lanczos(matvec: Callable[[PyTree], PyTree], like: PyTree, *, key: jax.Array, num_iter: int = 30,
            k: int = 1, which: str = "largest", return_vectors: bool = False) -> Eigs:
    """Extreme eigenvalues of the symmetric operator ``matvec`` by Lanczos (1950).

    ``num_iter`` Lanczos steps (at most the dimension ``d``) with full re-orthogonalisation in float64 on
    the host; with ``num_iter >= d`` the result is the exact spectrum's end (to round-off).

    Args:
      matvec: ``v -> H v`` on parameter trees, e.g. an :class:`HVP` from :func:`make_hvp` (whose flat form is
        used directly).
      like: a tree shaped like the parameters.
      key: the Gaussian starting vector.
      num_iter: Lanczos steps.
      k: how many Ritz values to return (``1 <= k <= min(num_iter, d)``).
      which: ``"largest"`` (algebraic), ``"smallest"`` or ``"magnitude"``.
      return_vectors: also return the unit Ritz vectors as trees.

    Returns:
      :class:`Eigs`: the ``k`` Ritz values at the requested end in decreasing order, their residual estimates
      ``|β_m s_m|`` from the recurrence and the number of products. The start vector is a Gaussian draw from
      ``key`` in float64 for float64 parameters (else float32).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from mclandscape.core.objective import function_objective
        >>> loss = function_objective(lambda p, b: 0.5 * jnp.sum(jnp.array([-1.0, 2.0, 3.0]) * p ** 2))
        >>> eigs = lanczos(make_hvp(loss, jnp.zeros(3)), jnp.zeros(3), key=jax.random.key(0), num_iter=3, k=2,
        ...                which="magnitude")
        >>> [round(float(v), 4) for v in eigs.values]
        [3.0, 2.0]
    """
    _checks.choice(which, "which", ("largest", "smallest", "magnitude"))
    mv, unravel, d, dtype = _flat_matvec(matvec, like)
    m = min(_checks.integer(num_iter, "num_iter", low=1), d)
    if not 1 <= k <= m:
        raise ValueError(f"k={k} must be between 1 and the number of Lanczos steps {m} (num_iter={num_iter}, d={d})")
    q = np.array(jax.random.normal(key, (d,), _draw_dtype(dtype)), np.float64)
    q /= np.linalg.norm(q)
    Q = np.zeros((m, d))
    alpha, beta = np.zeros(m), np.zeros(m)
    Q[0] = q
    n_used = m  # also the number of products: one per step taken
    for j in range(m):
        w = mv(Q[j])
        alpha[j] = Q[j] @ w
        w = w - alpha[j] * Q[j] - (beta[j - 1] * Q[j - 1] if j > 0 else 0.0)
        # full re-orthogonalisation, twice for stability
        for _ in range(2):
            w -= Q[: j + 1].T @ (Q[: j + 1] @ w)
        b = float(np.linalg.norm(w))
        beta[j] = b
        if j + 1 == m:
            break
        if b < 1e-10 * max(1.0, abs(alpha[: j + 1]).max()):
            n_used = j + 1  # invariant subspace found: the Ritz values are exact
            break
        Q[j + 1] = w / b
    T = np.diag(alpha[:n_used]) + np.diag(beta[: n_used - 1], 1) + np.diag(beta[: n_used - 1], -1)
    evals, evecs = np.linalg.eigh(T)
    if k > n_used:
        raise ValueError(f"Lanczos found an invariant subspace of dimension {n_used} < k={k}; use another key")
    order = np.argsort({"largest": -evals, "smallest": evals, "magnitude": -np.abs(evals)}[which])[:k]
    order = order[::-1] if which == "smallest" else order  # decreasing, as for the other ends
    values = evals[order]
    residuals = np.abs(beta[n_used - 1] * evecs[n_used - 1, order])
    vectors = None
    if return_vectors:
        vecs = Q[:n_used].T @ evecs[:, order]
        vectors = [unravel(jnp.asarray((vecs[:, i] / np.linalg.norm(vecs[:, i])).astype(dtype))) for i in range(k)]
    return Eigs(values=values, vectors=vectors, residuals=residuals, num_matvecs=n_used)


def power_iteration(matvec: Callable[[PyTree], PyTree], like: PyTree, *, key: jax.Array, k: int = 1,
                    num_iter: int = 100, tol: float = 1e-6) -> Eigs:
    """Top-``k`` eigenvalues by magnitude: power iteration, deflating the pairs already found.

    Each pair iterates ``u <- (H − Σ_j λ_j u_j u_jᵀ) u / |·|`` until the Rayleigh quotient changes by less
    than ``tol·|λ|`` (or ``num_iter`` steps). Slower than :func:`lanczos` when eigenvalues cluster; kept as
    the simple, memory-light reference. Works in float64 on the host whatever the parameters' dtype.

    Args:
      matvec: ``v -> H v`` on parameter trees (an :class:`HVP` or any symmetric tree map).
      like: a tree shaped like the parameters.
      key: the Gaussian starting vectors (float64 draws for float64 parameters).
      k: how many pairs (``1 <= k <= d``).
      num_iter: the most products per pair.
      tol: relative change of the Rayleigh quotient that ends a pair.

    Returns:
      :class:`Eigs` with the vectors (in the parameters' dtype) and the exact residuals ``|H u − λ u|``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> h = jnp.array([1.0, -4.0, 2.0])
        >>> eigs = power_iteration(lambda v: h * v, jnp.zeros(3), key=jax.random.key(0), k=2, num_iter=200,
        ...                        tol=1e-9)
        >>> [round(float(v), 3) for v in eigs.values]  # by magnitude
        [-4.0, 2.0]
    """
    _checks.integer(num_iter, "num_iter", low=1)
    mv, unravel, d, dtype = _flat_matvec(matvec, like)
    if not 1 <= _checks.integer(k, "k") <= d:
        raise ValueError(f"k={k} must be between 1 and the dimension {d}")
    vals, vecs, res = [], [], []
    nmv = 0

    def deflated(u):  # (H - sum_j lambda_j u_j u_j^T) u
        nonlocal nmv
        nmv += 1
        return mv(u) - sum((lj * (vj @ u) * vj for lj, vj in zip(vals, vecs, strict=True)), np.zeros(d))

    def orthonormal(u):  # u orthogonal to the pairs found, normalised
        u = u - sum(((vj @ u) * vj for vj in vecs), np.zeros(d))
        return u / np.linalg.norm(u)

    for kk in jax.random.split(key, k):
        u = orthonormal(np.array(jax.random.normal(kk, (d,), _draw_dtype(dtype)), np.float64))
        lam = 0.0
        for _ in range(num_iter):
            w = deflated(u)
            new_lam, nw = float(u @ w), float(np.linalg.norm(w))
            if nw == 0.0:
                lam = 0.0
                break
            done = abs(new_lam - lam) <= tol * max(abs(new_lam), 1e-30)
            lam, u = new_lam, orthonormal(w / nw)
            if done:
                break
        w = deflated(u)
        lam = float(u @ w)
        res.append(float(np.linalg.norm(w - lam * u)))
        vals.append(lam)
        vecs.append(u)
    return Eigs(values=np.asarray(vals), vectors=[unravel(jnp.asarray(v.astype(dtype))) for v in vecs],
                residuals=np.asarray(res), num_matvecs=nmv)


def hutchinson_trace(matvec: Callable[[PyTree], PyTree], like: PyTree, *, key: jax.Array,
                     num_samples: int = 100, distribution: str = "rademacher") -> TraceEstimate:
    """Hutchinson's (1990) estimator ``tr(H) ≈ (1/S) Σ_s v_sᵀ H v_s`` with ``E[v vᵀ] = I``.

    Args:
      matvec: ``v -> H v`` on parameter trees (an :class:`HVP` or any symmetric tree map).
      like: a tree shaped like the parameters.
      key: the probes.
      num_samples: probes ``S`` (>= 1; the standard error needs >= 2).
      distribution: ``"rademacher"`` (±1 entries, the lower-variance choice) or ``"gaussian"`` (float64 draws
        for float64 parameters).

    Returns:
      :class:`TraceEstimate`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> h = jnp.array([[2.0, 1.0], [1.0, 3.0]])
        >>> est = hutchinson_trace(lambda v: h @ v, jnp.zeros(2), key=jax.random.key(1), num_samples=4)
        >>> bool(abs(est.mean - 5.0) <= 2.0), est.samples.shape  # each probe gives 5 ± 2
        (True, (4,))
    """
    _checks.integer(num_samples, "num_samples", low=1)
    _checks.choice(distribution, "distribution", ("rademacher", "gaussian"))
    mv, _, d, dtype = _flat_matvec(matvec, like)
    samples = np.zeros(num_samples)
    for s, kk in enumerate(jax.random.split(key, num_samples)):
        # Rademacher ±1 entries are exact in any dtype
        draw = jax.random.rademacher(kk, (d,), jnp.float32) if distribution == "rademacher" else \
            jax.random.normal(kk, (d,), _draw_dtype(dtype))
        v = np.asarray(draw, np.float64)
        samples[s] = v @ mv(v)
    stderr = float(samples.std(ddof=1) / np.sqrt(num_samples)) if num_samples > 1 else float("nan")
    return TraceEstimate(mean=float(samples.mean()), stderr=stderr, samples=samples)


def dense_hessian(objective: Callable, params: PyTree, data: Any = None, *, key: jax.Array | None = None,
                  max_dim: int = 4096) -> np.ndarray:
    """The full Hessian of the objective's loss on ``data`` (parameters flattened in ``tree_ravel`` order).

    Args:
      objective: ``(params, batch, key) -> (loss, aux)`` (see the module docstring).
      params: the point.
      data, key: as for :func:`make_hvp`.
      max_dim: refuse more parameters than this (the matrix takes ``d²`` memory; use :func:`lanczos`).

    Returns:
      The symmetrised ``[d, d]`` Hessian as float64 NumPy (computed in the parameters' dtype).

    Example:
        >>> import jax.numpy as jnp
        >>> from mclandscape.core.objective import function_objective
        >>> dense_hessian(function_objective(lambda p, b: p[0] ** 2 * p[1]), jnp.array([1.0, 2.0])).tolist()
        [[4.0, 2.0], [2.0, 0.0]]
    """
    d = tree_size(params)
    if d > max_dim:
        raise ValueError(f"dense_hessian: {d} parameters exceed max_dim={max_dim} (a {d}x{d} matrix); "
                         "raise max_dim or use lanczos/power_iteration")
    fn = _as_argument(objective)
    H = sum(wb * np.asarray(_hessian_jit(fn, params, b, key), np.float64)
            for wb, b in zip(*_batches(data)[::-1], strict=True))
    return 0.5 * (H + H.T)


def hessian_eigenvalues(objective: Callable, params: PyTree, data: Any = None, *, key: jax.Array | None = None,
                        max_dim: int = 4096) -> np.ndarray:
    """The full Hessian spectrum in ascending order: ``numpy.linalg.eigvalsh`` of :func:`dense_hessian`.

    Args:
      objective: ``(params, batch, key) -> (loss, aux)``.
      params: the point.
      data, key: as for :func:`make_hvp`.
      max_dim: as for :func:`dense_hessian`.

    Returns:
      ``[d]`` float64 eigenvalues, ascending.

    Example:
        >>> import jax.numpy as jnp
        >>> from mclandscape.core.objective import function_objective
        >>> obj = function_objective(lambda p, b: p[0] ** 2 - 3.0 * p[1] ** 2)
        >>> hessian_eigenvalues(obj, jnp.zeros(2)).tolist()
        [-6.0, 2.0]
    """
    return np.linalg.eigvalsh(dense_hessian(objective, params, data, key=key, max_dim=max_dim))


def top_hessian_eigenvalues(model: Model, variables: PyTree, data, *, key: jax.Array, k: int = 1,
                            num_iter: int = 20, batch_size: int = 512, max_examples: int | None = None,
                            loss: str | Callable = "cross_entropy") -> Eigs:
    """Top-``k`` Hessian eigenvalues of a model's mean loss on ``data`` by :func:`lanczos`.

    The loss is ``make_objective(model, loss, train=False, variables=variables)``: inference mode, the
    non-parameter collections of ``variables`` (BatchNorm running statistics) held fixed, so the Hessian is
    taken with respect to ``params`` as the model predicts. The data are one epoch of
    ``batch_stream(data, batch_size, drop_last=False, pad=True)``: every example, one compiled batch shape.

    Args:
      model: the :class:`~mclandscape.engine.models.Model`.
      variables: its variables (``{"params": ..., ["batch_stats": ...]}``).
      data: a :class:`~mclandscape.engine.data.Dataset` or ``(x, y)``; the first ``max_examples`` (default all).
      key: the Lanczos starting vector.
      k, num_iter: eigenvalues wanted and Lanczos steps.
      batch_size: examples per batch.
      max_examples: use only the first ``max_examples`` examples.
      loss: a loss name or per-example callable (see :func:`~mclandscape.core.objective.make_objective`).

    Returns:
      :class:`Eigs` (values in decreasing order, no vectors).

    Example:
        >>> import jax, numpy as np
        >>> from mclandscape.engine.models import get_model
        >>> model = get_model("mlp", widths=[2], num_classes=2)
        >>> x, y = np.ones((4, 2), np.float32), np.array([0, 1, 0, 1])
        >>> variables = model.init(jax.random.key(0), x)
        >>> eigs = top_hessian_eigenvalues(model, variables, (x, y), key=jax.random.key(1), k=2, num_iter=4)
        >>> eigs.values.shape, bool(eigs.values[0] >= eigs.values[1])
        ((2,), True)
    """
    if not hasattr(variables, "items") or "params" not in variables:
        raise ValueError("variables must be a dict of collections with 'params'")
    if not isinstance(data, Dataset):
        if not (isinstance(data, tuple | list) and len(data) == 2):
            raise ValueError(f"data must be a Dataset or an (x, y) tuple, got {type(data).__name__}")
        data = Dataset(np.asarray(data[0]), np.asarray(data[1]), 0, "data")
    if max_examples is not None:
        data = data.take(max_examples)
    objective = make_objective(model, loss, train=False, variables=variables)
    params = variables["params"]
    mv = make_hvp(objective, params, batch_stream(data, batch_size, drop_last=False, pad=True))
    return lanczos(mv, params, key=key, num_iter=num_iter, k=k)
