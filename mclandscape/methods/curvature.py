"""Curvature of a loss at a parameter point: Hessian-vector products, top eigenvalues, trace, full spectrum.

Used to check seed 003's claims about flatness (Theorem 1: a VDM scales the Hessian spectrum by
``δ'(ℓ)`` at critical points; Fig. 4: eigenvalues of the Hessian at the end points of the optimiser).

The loss is a pure function ``loss_fn(params, batch) -> scalar`` (mean over the batch) evaluated over a
dataset given as a sequence of batches; the dataset loss is the example-weighted mean of the batch losses,
``L = Σ_b (n_b / N)·loss_fn(params, batch_b)``, so every quantity here (HVP, dense Hessian) is the exact one
of the full-dataset mean loss, whatever the batch sizes. ``batches=None`` means ``loss_fn(params)``.

- :func:`make_hvp` / :func:`hvp`: ``v -> H v`` by forward-over-reverse differentiation
  (``jax.jvp`` of ``jax.grad``), one jitted call per batch, without forming ``H``;
- :func:`lanczos`: extreme eigenvalues (and vectors) by Lanczos with full re-orthogonalisation
  (float64 on the host, one HVP per iteration);
- :func:`power_iteration`: top-k eigenvalues by magnitude, power iteration with deflation;
- :func:`hutchinson_trace`: ``tr(H) ≈ mean(vᵀHv)`` over Rademacher or Gaussian probes;
- :func:`dense_hessian` / :func:`hessian_eigenvalues`: the full ``d×d`` Hessian and its spectrum
  (``eigvalsh``) for small models;
- :func:`model_loss_fn` / :func:`dataset_batches`: the cross-entropy of a :class:`~mclandscape.engine.models.Model`
  as a ``loss_fn`` and a Dataset as batches.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mclandscape.core.losses import cross_entropy
from mclandscape.core.tree import PyTree, tree_ravel, tree_size
from mclandscape.engine.models.base import Model
from mclandscape.engine.train import params_loss

__all__ = [
    "Eigs",
    "TraceEstimate",
    "hvp",
    "make_hvp",
    "lanczos",
    "power_iteration",
    "hutchinson_trace",
    "dense_hessian",
    "hessian_eigenvalues",
    "model_loss_fn",
    "dataset_batches",
    "top_hessian_eigenvalues",
]

LossFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Eigs:
    """Eigenpairs sorted by decreasing eigenvalue (``power_iteration``: decreasing magnitude).

    ``values[k]``; ``vectors`` a list of k unit-norm parameter pytrees (or ``None``); ``residuals[k]`` the
    norms ``|H u − λ u|`` (estimates from the Lanczos recurrence for :func:`lanczos`); ``num_matvecs``.
    """

    values: np.ndarray
    vectors: list | None
    residuals: np.ndarray
    num_matvecs: int


@dataclasses.dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson estimate of ``tr(H)``: ``mean`` and its standard error over ``samples``."""

    mean: float
    stderr: float
    samples: np.ndarray


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
        return w
    sizes = [_batch_size(b) for b in batches]
    total = float(sum(sizes))
    return [s / total for s in sizes]


def _as_batches(batches) -> list | None:
    if batches is None:
        return None
    b = list(batches)
    if not b:
        raise ValueError("batches is empty: give at least one batch (or None for loss_fn(params))")
    return b


def hvp(loss_fn: LossFn, params: PyTree, v: PyTree, batch: Any = None) -> PyTree:
    """``H v`` of ``loss_fn(params[, batch])`` by forward-over-reverse (``jvp`` of ``grad``)."""
    f = (lambda p: loss_fn(p)) if batch is None else (lambda p: loss_fn(p, batch))
    return jax.jvp(jax.grad(f), (params,), (v,))[1]


# one jitted HVP for every (loss_fn, shapes): loss functions are static (hashed by identity), so a stable
# loss_fn (e.g. from model_loss_fn's cache) compiles once for all parameter points and batches of one shape
_hvp_jit = jax.jit(hvp, static_argnums=(0,))


def make_hvp(loss_fn: LossFn, params: PyTree, batches: Sequence[Any] | None = None, *,
             weights: Sequence[float] | None = None) -> Callable[[PyTree], PyTree]:
    """``v -> H v`` for the dataset loss ``Σ_b w_b·loss_fn(params, batch_b)`` at fixed ``params``.

    ``w_b = n_b / N`` by default (the Hessian of the mean loss over all examples). Each batch is one call
    of a jitted forward-over-reverse HVP; batches of one size share one compilation, and so do later calls
    with the same ``loss_fn`` object.
    """
    batch_list = _as_batches(batches)
    if batch_list is None:
        return lambda v: _hvp_jit(loss_fn, params, v)
    w = _weights(batch_list, weights)

    def matvec(v):
        out = None
        for wb, b in zip(w, batch_list, strict=True):
            hv = _hvp_jit(loss_fn, params, v, b)
            scaled = jax.tree_util.tree_map(functools.partial(jnp.multiply, wb), hv)
            out = scaled if out is None else jax.tree_util.tree_map(jnp.add, out, scaled)
        return out

    return matvec


def _flat_matvec(matvec, like):
    flat, unravel = tree_ravel(like)
    dtype = flat.dtype

    def mv(x: np.ndarray) -> np.ndarray:
        y, _ = tree_ravel(matvec(unravel(jnp.asarray(x, dtype))))
        return np.asarray(y, np.float64)

    return mv, unravel, int(flat.size)


def lanczos(matvec: Callable[[PyTree], PyTree], like: PyTree, *, key: jax.Array, num_iter: int = 30,
            k: int = 1, which: str = "largest", return_vectors: bool = False) -> Eigs:
    """Extreme eigenvalues of the symmetric operator ``matvec`` (e.g. from :func:`make_hvp`) by Lanczos.

    ``num_iter`` Lanczos steps (at most the dimension ``d``) with full re-orthogonalisation in float64 on
    the host; the ``k`` Ritz values at the requested end (``which="largest"`` algebraic, ``"smallest"`` or
    ``"magnitude"``) are returned in decreasing order. With ``num_iter >= d`` the result is the exact
    spectrum's end (to round-off). The starting vector is Gaussian from ``key``.
    """
    if which not in ("largest", "smallest", "magnitude"):
        raise ValueError(f"which must be 'largest', 'smallest' or 'magnitude', got {which!r}")
    mv, unravel, d = _flat_matvec(matvec, like)
    if num_iter < 1:
        raise ValueError(f"num_iter must be >= 1, got {num_iter}")
    m = min(num_iter, d)
    if not 1 <= k <= m:
        raise ValueError(f"k={k} must be between 1 and the number of Lanczos steps {m} (num_iter={num_iter}, d={d})")
    q = np.asarray(jax.random.normal(key, (d,), jnp.float32), np.float64)
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
        vectors = [unravel(jnp.asarray(vecs[:, i] / np.linalg.norm(vecs[:, i]), jnp.float32)) for i in range(k)]
    return Eigs(values=values, vectors=vectors, residuals=residuals, num_matvecs=nmv)


def power_iteration(matvec: Callable[[PyTree], PyTree], like: PyTree, *, key: jax.Array, k: int = 1,
                    num_iter: int = 100, tol: float = 1e-6) -> Eigs:
    """Top-``k`` eigenvalues by magnitude: power iteration, deflating the pairs already found.

    Each pair iterates ``u <- (H − Σ_j λ_j u_j u_jᵀ) u / |·|`` until the Rayleigh quotient changes by less
    than ``tol·|λ|`` (or ``num_iter`` steps). Slower than :func:`lanczos` when eigenvalues cluster; kept as
    the simple, memory-light reference.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if num_iter < 1:
        raise ValueError(f"num_iter must be >= 1, got {num_iter}")
    mv, unravel, d = _flat_matvec(matvec, like)
    if k > d:
        raise ValueError(f"k={k} exceeds the dimension {d}")
    vals, vecs, res = [], [], []
    nmv = 0
    keys = jax.random.split(key, k)
    for i in range(k):
        u = np.asarray(jax.random.normal(keys[i], (d,), jnp.float32), np.float64)
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
    return Eigs(values=np.asarray(vals), vectors=[unravel(jnp.asarray(v, jnp.float32)) for v in vecs],
                residuals=np.asarray(res), num_matvecs=nmv)


def hutchinson_trace(matvec: Callable[[PyTree], PyTree], like: PyTree, *, key: jax.Array,
                     num_samples: int = 100, distribution: str = "rademacher") -> TraceEstimate:
    """Hutchinson's estimator ``tr(H) ≈ (1/S) Σ_s v_sᵀ H v_s`` with ``E[v vᵀ] = I``.

    ``distribution`` ``"rademacher"`` (±1 entries, the lower-variance choice) or ``"gaussian"``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    mv, _, d = _flat_matvec(matvec, like)
    samples = np.zeros(num_samples)
    for s, kk in enumerate(jax.random.split(key, num_samples)):
        if distribution == "rademacher":
            v = np.asarray(jax.random.rademacher(kk, (d,), jnp.float32), np.float64)
        else:
            v = np.asarray(jax.random.normal(kk, (d,), jnp.float32), np.float64)
        samples[s] = v @ mv(v)
    stderr = float(samples.std(ddof=1) / np.sqrt(num_samples)) if num_samples > 1 else float("nan")
    return TraceEstimate(mean=float(samples.mean()), stderr=stderr, samples=samples)


def dense_hessian(loss_fn: LossFn, params: PyTree, batches: Sequence[Any] | None = None, *,
                  weights: Sequence[float] | None = None, max_dim: int = 4096) -> np.ndarray:
    """The full Hessian ``[d, d]`` (float64 NumPy) of the dataset loss, parameters flattened in
    ``tree_ravel`` order. Refuses ``d > max_dim`` (``d²`` memory); use :func:`lanczos` there."""
    d = tree_size(params)
    if d > max_dim:
        raise ValueError(f"dense_hessian: {d} parameters exceed max_dim={max_dim} (a {d}x{d} matrix); "
                         "raise max_dim or use lanczos/power_iteration")
    flat, unravel = tree_ravel(params)
    batch_list = _as_batches(batches)
    if batch_list is None:
        h = jax.jit(jax.hessian(lambda x: loss_fn(unravel(x))))(flat)
        H = np.asarray(h, np.float64)
    else:
        w = _weights(batch_list, weights)
        hf = jax.jit(jax.hessian(lambda x, b: loss_fn(unravel(x), b)))
        H = sum(wb * np.asarray(hf(flat, b), np.float64) for wb, b in zip(w, batch_list, strict=True))
    return 0.5 * (H + H.T)


def hessian_eigenvalues(loss_fn: LossFn, params: PyTree, batches: Sequence[Any] | None = None, *,
                        weights: Sequence[float] | None = None, max_dim: int = 4096) -> np.ndarray:
    """The full Hessian spectrum in ascending order (``numpy.linalg.eigvalsh`` of :func:`dense_hessian`)."""
    return np.linalg.eigvalsh(dense_hessian(loss_fn, params, batches, weights=weights, max_dim=max_dim))


@functools.lru_cache(maxsize=32)
def _model_loss_with_state(model: Model, loss: Callable) -> LossFn:
    """``fn(params, (x, y, others))``: one stable function per (model, loss) so HVPs compile once."""

    def fn(params, batch):
        x, y, others = batch
        logits = model.apply({"params": params, **others}, x, train=False)
        return jnp.mean(loss(logits, y))

    return fn


def model_loss_fn(model: Model, variables: PyTree, *, loss: Callable = cross_entropy) -> LossFn:
    """``loss_fn(params, (x, y)) -> mean loss`` of ``model`` in evaluation mode
    (:func:`mclandscape.engine.train.params_loss` with ``train=False``).

    Non-parameter collections of ``variables`` (BatchNorm running statistics) are held fixed: the
    Hessian is taken with respect to ``params`` at the model's stored statistics, as in inference.
    """
    return params_loss(model, variables, loss=loss, train=False)


def dataset_batches(data, batch_size: int, *, max_examples: int | None = None) -> list[tuple[jax.Array, jax.Array]]:
    """A Dataset (``.x``, ``.y``) or ``(x, y)`` as a list of device batches in order (last one partial)."""
    if hasattr(data, "x") and hasattr(data, "y"):
        x, y = np.asarray(data.x), np.asarray(data.y)
    elif isinstance(data, tuple | list) and len(data) == 2:
        x, y = np.asarray(data[0]), np.asarray(data[1])
    else:
        raise ValueError("data must be a Dataset (with .x and .y) or an (x, y) tuple")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = x.shape[0] if max_examples is None else min(x.shape[0], int(max_examples))
    if n == 0:
        raise ValueError("empty dataset")
    return [(jnp.asarray(x[i:i + batch_size]), jnp.asarray(y[i:i + batch_size]))
            for i in range(0, n, batch_size)]


def top_hessian_eigenvalues(model: Model, variables: PyTree, data, *, key: jax.Array, k: int = 1,
                            num_iter: int = 20, batch_size: int = 512, max_examples: int | None = None,
                            loss: Callable = cross_entropy) -> Eigs:
    """Top-``k`` Hessian eigenvalues of a model's mean loss on ``data`` (Lanczos, :func:`lanczos`)."""
    others = {k: v for k, v in dict(variables).items() if k != "params"}
    params = variables["params"]
    batches = [(x, y, others) for x, y in dataset_batches(data, batch_size, max_examples=max_examples)]
    mv = make_hvp(_model_loss_with_state(model, loss), params, batches)
    return lanczos(mv, params, key=key, num_iter=num_iter, k=k)
