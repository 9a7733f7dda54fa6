"""Curvature of a loss at a parameter point: Hessian-vector products, top eigenvalues, trace, full spectrum.

Used to check the flatness claims of Chen, Jin, Du, Li and Liu, 2021 ("Deforming the loss surface to affect
the behaviour of the optimizer", AAAI; the VDM paper): Theorem 1 (a vertical deformation mapping scales the
Hessian spectrum by ``δ'(ℓ)`` at critical points) and Fig. 4 (Hessian eigenvalues at the optimiser's end
points).

**The loss.** Every function here differentiates the one objective of :mod:`mclandscape.core.objective`:
``objective(params, batch) -> (loss, aux)`` (e.g. :func:`~mclandscape.core.objective.make_objective` with
``train=False``; it is called without a key, so there is no dropout), or a plain scalar function
``loss_fn(params, batch) -> loss``; with ``batches=None`` a function of the parameters alone,
``loss_fn(params)``. The dataset loss over a sequence of batches is the example-weighted mean of the batch
losses, ``L = Σ_b (n_b / N)·loss(params, batch_b)``, so every quantity here (HVP, dense Hessian) is the exact
one of the full-dataset mean loss, whatever the batch sizes.

- :func:`make_hvp` / :func:`hvp`: ``v -> H v`` by forward-over-reverse differentiation (``jax.jvp`` of
  ``jax.grad``; Pearlmutter 1994, "Fast exact multiplication by the Hessian"), one jitted call per batch,
  without forming ``H``;
- :func:`lanczos`: extreme eigenvalues (and vectors) by Lanczos (1950) with full re-orthogonalisation
  (float64 on the host, one HVP per iteration);
- :func:`power_iteration`: top-k eigenvalues by magnitude, power iteration with deflation;
- :func:`hutchinson_trace`: ``tr(H) ≈ mean(vᵀHv)`` over Rademacher or Gaussian probes (Hutchinson 1990);
- :func:`dense_hessian` / :func:`hessian_eigenvalues`: the full ``d×d`` Hessian and its spectrum
  (``eigvalsh``) for small models;
- :func:`top_hessian_eigenvalues` / :func:`dataset_batches`: the top eigenvalues of a
  :class:`~mclandscape.engine.models.Model`'s loss on a dataset (its :func:`make_objective` in inference
  mode) and a Dataset as batches.

**Compilation.** The HVP and the dense Hessian are module-level ``jax.jit`` functions. An objective that is
a pytree (:class:`~mclandscape.core.objective.Objective`: static configuration hashed by value, the model
by identity; fixed collections such as BatchNorm statistics as data) is an ordinary argument, and any other
callable (a plain function) a static one hashed by identity. A second call with the same model and shapes
compiles nothing, even through a new ``make_objective``; batches of one shape share one compilation. Lanczos,
power iteration and Hutchinson run on the host in float64 and compile nothing of their own.

**Precision.** Products and Hessians are computed in the parameters' dtype and accumulated in float64 on the
host. With ``jax_enable_x64`` and float64 parameters everything is float64: the HVP, the dense Hessian, the
random start and probe vectors (drawn in float64) and the returned eigenvectors; with float32 parameters
the draws are float32, as without x64.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from mclandscape.core.objective import Objective, make_objective
from mclandscape.core.tree import PyTree, tree_ravel, tree_size
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
    "dataset_batches",
    "top_hessian_eigenvalues",
]

LossFn = Callable[..., Any]


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
        >>> mv = make_hvp(lambda p: 0.5 * jnp.sum(jnp.array([1.0, 4.0]) * p ** 2), jnp.zeros(2))
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
        >>> mv = make_hvp(lambda p: 0.5 * jnp.sum(jnp.array([1.0, 4.0]) * p ** 2), jnp.zeros(2))
        >>> est = hutchinson_trace(mv, jnp.zeros(2), key=jax.random.key(0), num_samples=2)
        >>> est.mean, est.stderr  # Rademacher probes of a diagonal H are exact
        (5.0, 0.0)
    """

    mean: float
    stderr: float
    samples: np.ndarray


# ---- the loss as a jit argument ---------------------------------------------------------------------------

def _split_fn(fn: LossFn) -> tuple[Any, tuple]:
    """``(static, arrays)`` of a loss: a pytree whose leaves are all arrays (an :class:`Objective`) travels as
    its tree definition (static, hashed by value) and its arrays (data); any other callable is static whole."""
    if not callable(fn):
        raise ValueError(f"the loss must be an objective (params, batch) -> (loss, aux) or a function "
                         f"(params[, batch]) -> scalar, got {type(fn).__name__}")
    leaves, treedef = jax.tree_util.tree_flatten(fn)
    if all(isinstance(a, jax.Array | np.ndarray) for a in leaves):
        return ("tree", treedef), tuple(leaves)
    return ("callable", fn), ()  # tagged: a tree definition is never compared with a function


def _merge_fn(static, arrays) -> LossFn:
    kind, what = static
    return what if kind == "callable" else jax.tree_util.tree_unflatten(what, list(arrays))


def _value(fn: LossFn, params: PyTree, batch) -> jax.Array:
    """The scalar loss of ``fn`` at ``params`` (``fn(params)`` when ``batch`` is ``None``); an objective's
    ``(loss, aux)`` gives its loss."""
    out = fn(params) if batch is None else fn(params, batch)
    if isinstance(out, tuple):
        if len(out) != 2:
            raise ValueError(f"an objective returns (loss, aux), got a tuple of {len(out)}")
        out = out[0]
    if jnp.ndim(out) != 0:
        raise ValueError(f"the loss must be a scalar, got shape {jnp.shape(out)}")
    return out


def _hvp_impl(fn_static, fn_arrays, params, v, batch):
    fn = _merge_fn(fn_static, fn_arrays)
    return jax.jvp(jax.grad(lambda p: _value(fn, p, batch)), (params,), (v,))[1]


def _flat_hvp_impl(fn_static, fn_arrays, params, x, batch):
    flat, unravel = ravel_pytree(params)
    hv = _hvp_impl(fn_static, fn_arrays, params, unravel(x.astype(flat.dtype)), batch)
    return ravel_pytree(hv)[0]


def _hessian_impl(fn_static, fn_arrays, params, batch):
    fn = _merge_fn(fn_static, fn_arrays)
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda x: _value(fn, unravel(x), batch))(flat)


_hvp_jit = jax.jit(_hvp_impl, static_argnums=0)
_flat_hvp_jit = jax.jit(_flat_hvp_impl, static_argnums=0)
_hessian_jit = jax.jit(_hessian_impl, static_argnums=0)


# ---- batches ---------------------------------------------------------------------------------------------

def _batch_size(batch) -> int:
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError("a batch holds no arrays")
    return int(np.shape(leaves[0])[0])


def _weights(batches, weights) -> list[float]:
    if weights is not None:
        w = [float(x) for x in weights]
        if len(w) != len(batches):
            raise ValueError(f"{len(w)} weights for {len(batches)} batches")
        if not all(np.isfinite(w)):
            raise ValueError(f"weights must be finite, got {w}")
        return w
    sizes = [_batch_size(b) for b in batches]
    total = float(sum(sizes))
    if total == 0:
        raise ValueError("the batches hold no examples")
    return [s / total for s in sizes]


def _as_batches(fn: LossFn, batches) -> list | None:
    if batches is None:
        if isinstance(fn, Objective):
            raise ValueError("an objective needs batches: pass batches=[(x, y), ...] (batches=None means a "
                             "function of the parameters alone, loss_fn(params))")
        return None
    if isinstance(batches, tuple) and len(batches) in (2, 3) and all(hasattr(b, "shape") for b in batches):
        raise ValueError("batches is a sequence of batches: wrap a single (x, y) batch in a list, [(x, y)]")
    b = list(batches)
    if not b:
        raise ValueError("batches is empty: give at least one batch (or None for loss_fn(params))")
    return b


def hvp(loss_fn: LossFn, params: PyTree, v: PyTree, batch: Any = None) -> PyTree:
    """``H v`` of the loss at ``params`` on one batch, by forward-over-reverse (``jvp`` of ``grad``).

    Args:
      loss_fn: an objective ``(params, batch) -> (loss, aux)`` or a scalar ``loss_fn(params, batch)``
        (``loss_fn(params)`` when ``batch`` is ``None``), see the module docstring.
      params: the point.
      v: a tree shaped like ``params``.
      batch: the batch (``None``: ``loss_fn(params)``).

    Returns:
      ``H v`` as a tree shaped like ``params`` (in its dtype: float64 for float64 parameters).

    Example:
        >>> import jax.numpy as jnp
        >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 2.0, 3.0]) * p ** 2)  # H = diag(1, 2, 3)
        >>> hvp(loss, jnp.zeros(3), jnp.ones(3)).tolist()
        [1.0, 2.0, 3.0]
    """
    static, arrays = _split_fn(loss_fn)
    return _hvp_jit(static, arrays, params, v, batch)


class HVP:
    """``v -> H v`` of a dataset loss at a fixed point (built by :func:`make_hvp`).

    Calling it maps parameter trees to trees; :meth:`flat` maps flat float64 vectors (``tree_ravel`` order)
    to flat float64 vectors, the form :func:`lanczos`, :func:`power_iteration` and :func:`hutchinson_trace`
    use (no tree round trip per product).

    Args:
      loss_fn: an objective or a scalar loss (see :func:`make_hvp`).
      params: the point at which the Hessian is taken.
      batches: a list of batches, or ``None`` for ``loss_fn(params)``.
      weights: one weight per batch (``None`` with ``batches=None``).

    Attributes:
      dim: the number of parameters ``d``.
      dtype: the parameters' (flattened) dtype, in which the products are computed.

    Example:
        >>> import jax.numpy as jnp
        >>> mv = HVP(lambda p: 0.5 * jnp.sum(jnp.array([1.0, 2.0]) * p ** 2), jnp.zeros(2), None, None)
        >>> mv(jnp.ones(2)).tolist(), mv.flat([1.0, -1.0]).tolist()
        ([1.0, 2.0], [1.0, -2.0])
    """

    def __init__(self, loss_fn: LossFn, params: PyTree, batches: list | None, weights: list[float] | None):
        self._static, self._arrays = _split_fn(loss_fn)
        self.params = params
        self._batches = [None] if batches is None else batches
        self._weights = [1.0] if weights is None else weights
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
        out = np.zeros(self.dim, np.float64)
        for wb, b in zip(self._weights, self._batches, strict=True):
            out += wb * np.asarray(_flat_hvp_jit(self._static, self._arrays, self.params, x, b), np.float64)
        return out

    def __call__(self, v: PyTree) -> PyTree:
        """``H v`` of a tree ``v`` shaped like the parameters, as a tree in their dtype."""
        flat, _ = tree_ravel(v)
        return self._unravel(jnp.asarray(self.flat(np.asarray(flat)).astype(self.dtype)))


def make_hvp(loss_fn: LossFn, params: PyTree, batches: Sequence[Any] | None = None, *,
             weights: Sequence[float] | None = None) -> HVP:
    """``v -> H v`` for the dataset loss ``Σ_b w_b·loss(params, batch_b)`` at fixed ``params``.

    Args:
      loss_fn: an objective ``(params, batch) -> (loss, aux)`` (e.g. ``make_objective(model, train=False,
        variables=...)``) or a scalar ``loss_fn(params, batch)``; with ``batches=None``, ``loss_fn(params)``.
      params: the point at which the Hessian is taken.
      batches: a sequence of batches (e.g. :func:`dataset_batches`), or ``None``.
      weights: per-batch weights ``w_b`` (default ``n_b / N``: the Hessian of the mean loss over all examples).

    Returns:
      An :class:`HVP`: each product is one jitted forward-over-reverse HVP per batch; batches of one shape
      share one compilation, and so do later calls with the same objective configuration.

    Example:
        >>> import jax.numpy as jnp
        >>> def loss(w, batch):  # the mean of 0.5 (w x)^2 over a batch of scalars x
        ...     return 0.5 * jnp.mean((w * batch) ** 2)
        >>> mv = make_hvp(loss, jnp.ones(()), [jnp.array([1.0, 3.0]), jnp.array([2.0])])
        >>> round(float(mv(jnp.ones(()))), 4)  # the mean of x^2 over all three examples: (1 + 9 + 4) / 3
        4.6667
    """
    batch_list = _as_batches(loss_fn, batches)
    w = None if batch_list is None else _weights(batch_list, weights)
    if batch_list is None and weights is not None:
        raise ValueError("weights need batches")
    return HVP(loss_fn, params, batch_list, w)


def _flat_matvec(matvec, like):
    """``(mv, unravel, d, dtype)``: ``mv`` maps a flat float64 vector to a new float64 array."""
    flat, unravel = tree_ravel(like)
    dtype = np.dtype(flat.dtype)
    if isinstance(matvec, HVP):
        if matvec.dim != flat.size:
            raise ValueError(f"the HVP acts on {matvec.dim} parameters but like has {flat.size}")
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
        >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([-1.0, 2.0, 3.0]) * p ** 2)
        >>> eigs = lanczos(make_hvp(loss, jnp.zeros(3)), jnp.zeros(3), key=jax.random.key(0), num_iter=3, k=2,
        ...                which="magnitude")
        >>> [round(float(v), 4) for v in eigs.values]
        [3.0, 2.0]
    """
    if which not in ("largest", "smallest", "magnitude"):
        raise ValueError(f"which must be 'largest', 'smallest' or 'magnitude', got {which!r}")
    mv, unravel, d, dtype = _flat_matvec(matvec, like)
    if num_iter < 1:
        raise ValueError(f"num_iter must be >= 1, got {num_iter}")
    m = min(num_iter, d)
    if not 1 <= k <= m:
        raise ValueError(f"k={k} must be between 1 and the number of Lanczos steps {m} (num_iter={num_iter}, d={d})")
    q = np.array(jax.random.normal(key, (d,), _draw_dtype(dtype)), np.float64)
    q /= np.linalg.norm(q)
    Q = np.zeros((m, d))
    alpha, beta = np.zeros(m), np.zeros(m)
    Q[0] = q
    n_used = m
    nmv = 0
    for j in range(m):
        w = mv(Q[j])
        nmv += 1
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
    if which == "largest":
        order = np.argsort(-evals)[:k]
    elif which == "smallest":
        order = np.argsort(evals)[:k][::-1]
    else:
        order = np.argsort(-np.abs(evals))[:k]
    values = evals[order]
    residuals = np.abs(beta[n_used - 1] * evecs[n_used - 1, order])
    vectors = None
    if return_vectors:
        vecs = Q[:n_used].T @ evecs[:, order]
        vectors = [unravel(jnp.asarray((vecs[:, i] / np.linalg.norm(vecs[:, i])).astype(dtype))) for i in range(k)]
    return Eigs(values=values, vectors=vectors, residuals=residuals, num_matvecs=nmv)


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
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if num_iter < 1:
        raise ValueError(f"num_iter must be >= 1, got {num_iter}")
    mv, unravel, d, dtype = _flat_matvec(matvec, like)
    if k > d:
        raise ValueError(f"k={k} exceeds the dimension {d}")
    vals, vecs, res = [], [], []
    nmv = 0
    keys = jax.random.split(key, k)
    for i in range(k):
        u = np.array(jax.random.normal(keys[i], (d,), _draw_dtype(dtype)), np.float64)  # writable: deflated below
        for vj in vecs:
            u -= (vj @ u) * vj
        u /= np.linalg.norm(u)
        lam = 0.0
        for _ in range(num_iter):
            w = mv(u)
            nmv += 1
            for lj, vj in zip(vals, vecs, strict=True):
                w -= lj * (vj @ u) * vj
            new_lam = float(u @ w)
            nw = float(np.linalg.norm(w))
            if nw == 0.0:
                lam = 0.0
                break
            u_new = w / nw
            for vj in vecs:
                u_new -= (vj @ u_new) * vj
            u_new /= np.linalg.norm(u_new)
            done = abs(new_lam - lam) <= tol * max(abs(new_lam), 1e-30)
            lam, u = new_lam, u_new
            if done:
                break
        w = mv(u)
        nmv += 1
        for lj, vj in zip(vals, vecs, strict=True):
            w -= lj * (vj @ u) * vj
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
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    mv, _, d, dtype = _flat_matvec(matvec, like)
    samples = np.zeros(num_samples)
    for s, kk in enumerate(jax.random.split(key, num_samples)):
        if distribution == "rademacher":  # ±1: exact in any dtype
            v = np.asarray(jax.random.rademacher(kk, (d,), jnp.float32), np.float64)
        else:
            v = np.asarray(jax.random.normal(kk, (d,), _draw_dtype(dtype)), np.float64)
        samples[s] = v @ mv(v)
    stderr = float(samples.std(ddof=1) / np.sqrt(num_samples)) if num_samples > 1 else float("nan")
    return TraceEstimate(mean=float(samples.mean()), stderr=stderr, samples=samples)


def dense_hessian(loss_fn: LossFn, params: PyTree, batches: Sequence[Any] | None = None, *,
                  weights: Sequence[float] | None = None, max_dim: int = 4096) -> np.ndarray:
    """The full Hessian of the dataset loss (parameters flattened in ``tree_ravel`` order).

    Args:
      loss_fn: an objective or a scalar loss (see :func:`make_hvp`).
      params: the point.
      batches, weights: as for :func:`make_hvp`.
      max_dim: refuse more parameters than this (the matrix takes ``d²`` memory; use :func:`lanczos`).

    Returns:
      The symmetrised ``[d, d]`` Hessian as float64 NumPy (computed in the parameters' dtype).

    Example:
        >>> import jax.numpy as jnp
        >>> dense_hessian(lambda p: p[0] ** 2 * p[1], jnp.array([1.0, 2.0])).tolist()
        [[4.0, 2.0], [2.0, 0.0]]
    """
    d = tree_size(params)
    if d > max_dim:
        raise ValueError(f"dense_hessian: {d} parameters exceed max_dim={max_dim} (a {d}x{d} matrix); "
                         "raise max_dim or use lanczos/power_iteration")
    batch_list = _as_batches(loss_fn, batches)
    static, arrays = _split_fn(loss_fn)
    if batch_list is None:
        H = np.array(_hessian_jit(static, arrays, params, None), np.float64)
    else:
        w = _weights(batch_list, weights)
        H = np.zeros((d, d))
        for wb, b in zip(w, batch_list, strict=True):
            H += wb * np.asarray(_hessian_jit(static, arrays, params, b), np.float64)
    return 0.5 * (H + H.T)


def hessian_eigenvalues(loss_fn: LossFn, params: PyTree, batches: Sequence[Any] | None = None, *,
                        weights: Sequence[float] | None = None, max_dim: int = 4096) -> np.ndarray:
    """The full Hessian spectrum in ascending order: ``numpy.linalg.eigvalsh`` of :func:`dense_hessian`.

    Args:
      loss_fn: an objective or a scalar loss (see :func:`make_hvp`).
      params: the point.
      batches, weights: as for :func:`make_hvp`.
      max_dim: as for :func:`dense_hessian`.

    Returns:
      ``[d]`` float64 eigenvalues, ascending.

    Example:
        >>> import jax.numpy as jnp
        >>> hessian_eigenvalues(lambda p: p[0] ** 2 - 3.0 * p[1] ** 2, jnp.zeros(2)).tolist()
        [-6.0, 2.0]
    """
    return np.linalg.eigvalsh(dense_hessian(loss_fn, params, batches, weights=weights, max_dim=max_dim))


def dataset_batches(data, batch_size: int, *, max_examples: int | None = None) -> list[tuple[jax.Array, jax.Array]]:
    """A Dataset as device batches in order.

    Args:
      data: a Dataset (``.x``, ``.y``) or an ``(x, y)`` tuple.
      batch_size: examples per batch (the last one may be partial).
      max_examples: use only the first ``max_examples`` examples.

    Returns:
      A list of ``(x, y)`` device arrays.

    Example:
        >>> import numpy as np
        >>> batches = dataset_batches((np.zeros((5, 2)), np.arange(5)), 2)
        >>> [b[1].tolist() for b in batches]
        [[0, 1], [2, 3], [4]]
    """
    if hasattr(data, "x") and hasattr(data, "y"):
        x, y = np.asarray(data.x), np.asarray(data.y)
    elif isinstance(data, tuple | list) and len(data) == 2:
        x, y = np.asarray(data[0]), np.asarray(data[1])
    else:
        raise ValueError("data must be a Dataset (with .x and .y) or an (x, y) tuple")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 (or None for all), got {max_examples!r}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"data has {x.shape[0]} inputs but {y.shape[0]} targets")
    n = x.shape[0] if max_examples is None else min(x.shape[0], int(max_examples))
    if n == 0:
        raise ValueError("empty dataset")
    bs = int(batch_size)
    return [(jnp.asarray(x[i:min(i + bs, n)]), jnp.asarray(y[i:min(i + bs, n)])) for i in range(0, n, bs)]


def top_hessian_eigenvalues(model: Model, variables: PyTree, data, *, key: jax.Array, k: int = 1,
                            num_iter: int = 20, batch_size: int = 512, max_examples: int | None = None,
                            loss: str | Callable = "cross_entropy") -> Eigs:
    """Top-``k`` Hessian eigenvalues of a model's mean loss on ``data`` by :func:`lanczos`.

    The loss is ``make_objective(model, loss, train=False, variables=variables)``: inference mode, the
    non-parameter collections of ``variables`` (BatchNorm running statistics) held fixed, so the Hessian is
    taken with respect to ``params`` as the model predicts.

    Args:
      model: the :class:`~mclandscape.engine.models.Model`.
      variables: its variables (``{"params": ..., ["batch_stats": ...]}``).
      data: a Dataset or ``(x, y)``; evaluated in batches of ``batch_size``, the first ``max_examples``.
      key: the Lanczos starting vector.
      k, num_iter: eigenvalues wanted and Lanczos steps.
      batch_size, max_examples: as for :func:`dataset_batches`.
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
    objective = make_objective(model, loss, train=False, variables=variables)
    params = variables["params"]
    mv = make_hvp(objective, params, dataset_batches(data, batch_size, max_examples=max_examples))
    return lanczos(mv, params, key=key, num_iter=num_iter, k=k)
