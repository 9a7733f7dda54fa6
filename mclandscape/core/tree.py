"""Pytree linear algebra: the one place where parameter pytrees are added, scaled, combined and measured.

Every method in mclandscape treats a model's parameters as a vector in R^d stored as a pytree. The helpers
here are pure functions, jit-friendly, and work on any pytree of arrays (Flax ``params`` dicts, optax
states, stacked control points with a leading axis).

Stacked trees: a "stacked" tree has one extra leading axis on every leaf (control points of a connector,
pivots of a band, members of an ensemble). :func:`tree_stack` / :func:`tree_unstack` convert, and
:func:`tree_combine` forms weighted sums ``sum_k w[..., k] * tree[k]`` with one ``einsum`` per leaf.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

PyTree = Any

__all__ = [
    "PyTree",
    "TreeMismatchError",
    "check_same_structure",
    "check_finite",
    "tree_add",
    "tree_sub",
    "tree_scale",
    "tree_axpy",
    "tree_lerp",
    "tree_zeros_like",
    "tree_dot",
    "tree_norm",
    "tree_sq_norm",
    "tree_distance",
    "tree_cosine",
    "tree_size",
    "tree_stack",
    "tree_unstack",
    "tree_index",
    "tree_combine",
    "tree_weighted_sum",
    "tree_gram",
    "tree_row_dot",
    "tree_row_scale",
    "tree_ravel",
    "tree_random_normal",
    "tree_where",
    "tree_cast",
    "tree_path_names",
    "tree_digest",
]


class TreeMismatchError(ValueError):
    """Two pytrees that should describe the same model do not (structure, shape or dtype)."""


def _path_str(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def tree_path_names(tree: PyTree) -> list[str]:
    """Readable path (``['params']['Dense_0']['kernel']``) of every leaf, in leaf order."""
    return [_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_same_structure(
    a: PyTree,
    b: PyTree,
    *,
    names: tuple[str, str] = ("a", "b"),
    check_dtype: bool = True,
    leading_a: int = 0,
    leading_b: int = 0,
) -> None:
    """Raise :class:`TreeMismatchError` naming the first leaf where ``a`` and ``b`` differ.

    ``leading_a`` / ``leading_b`` skip that many leading (stacking) axes of each tree's leaves before
    comparing shapes, so a stacked control-point tree can be checked against a single model.
    """
    na, nb = names
    fa = jax.tree_util.tree_flatten_with_path(a)[0]
    fb = jax.tree_util.tree_flatten_with_path(b)[0]
    pa = [_path_str(p) for p, _ in fa]
    pb = [_path_str(p) for p, _ in fb]
    if pa != pb:
        sa, sb = set(pa), set(pb)
        only_a = [p for p in pa if p not in sb]
        only_b = [p for p in pb if p not in sa]
        if only_a:
            raise TreeMismatchError(f"leaf {only_a[0]} is in {na} but not in {nb} ({len(only_a)} such leaves)")
        if only_b:
            raise TreeMismatchError(f"leaf {only_b[0]} is in {nb} but not in {na} ({len(only_b)} such leaves)")
        raise TreeMismatchError(f"{na} and {nb} hold the same leaves in a different order")
    ta = jax.tree_util.tree_structure(a)
    tb = jax.tree_util.tree_structure(b)
    if ta != tb:
        raise TreeMismatchError(f"{na} and {nb} have different container types: {ta} vs {tb}")
    for (path, xa), (_, xb) in zip(fa, fb, strict=True):
        sa = tuple(np.shape(xa))[leading_a:]
        sb = tuple(np.shape(xb))[leading_b:]
        if sa != sb:
            raise TreeMismatchError(f"leaf {_path_str(path)}: shape {sa} in {na} but {sb} in {nb}")
        if check_dtype:
            da, db = jnp.result_type(xa), jnp.result_type(xb)
            if da != db:
                raise TreeMismatchError(f"leaf {_path_str(path)}: dtype {da} in {na} but {db} in {nb}")


def check_finite(tree: PyTree, name: str = "parameters") -> None:
    """Raise ``ValueError`` naming the first leaf that holds NaN or inf (host-side check, not jittable)."""
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.asarray(x)
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise ValueError(f"{name}: leaf {_path_str(path)} holds {bad} non-finite value(s) (NaN or inf)")


def tree_add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.add, a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.subtract, a, b)


def tree_scale(a: PyTree, s) -> PyTree:
    return jax.tree_util.tree_map(lambda x: x * s, a)


def tree_axpy(alpha, x: PyTree, y: PyTree) -> PyTree:
    """``alpha * x + y``."""
    return jax.tree_util.tree_map(lambda xi, yi: alpha * xi + yi, x, y)


def tree_lerp(a: PyTree, b: PyTree, t) -> PyTree:
    """``(1 - t) a + t b``."""
    return jax.tree_util.tree_map(lambda x, y: x + t * (y - x), a, b)


def tree_zeros_like(a: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.zeros_like, a)


def tree_where(cond, a: PyTree, b: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x, y: jnp.where(cond, x, y), a, b)


def tree_cast(a: PyTree, dtype) -> PyTree:
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, a)


def tree_dot(a: PyTree, b: PyTree):
    """Euclidean inner product of two pytrees seen as vectors (accumulated in float32 or wider)."""
    parts = jax.tree_util.tree_map(lambda x, y: jnp.vdot(x.astype(jnp.promote_types(x.dtype, jnp.float32)),
                                                         y.astype(jnp.promote_types(y.dtype, jnp.float32))),
                                   a, b)
    return sum(jax.tree_util.tree_leaves(parts), jnp.zeros((), jnp.float32))


def tree_sq_norm(a: PyTree):
    return tree_dot(a, a)


def tree_norm(a: PyTree):
    return jnp.sqrt(tree_sq_norm(a))


def tree_distance(a: PyTree, b: PyTree):
    """Euclidean distance ``|a - b|``."""
    return tree_norm(tree_sub(a, b))


def tree_cosine(a: PyTree, b: PyTree, eps: float = 1e-30):
    """Cosine of the angle between two pytrees."""
    return tree_dot(a, b) / jnp.maximum(tree_norm(a) * tree_norm(b), eps)


def tree_size(a: PyTree) -> int:
    """Number of scalars in the tree (the dimension d of parameter space)."""
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(a)))


def tree_stack(trees: Sequence[PyTree], *, names: Sequence[str] | None = None) -> PyTree:
    """Stack K same-structured trees along a new leading axis; mismatches raise a named error."""
    trees = list(trees)
    if not trees:
        raise ValueError("tree_stack needs at least one tree")
    names = list(names) if names is not None else [f"tree[{i}]" for i in range(len(trees))]
    for i in range(1, len(trees)):
        check_same_structure(trees[0], trees[i], names=(names[0], names[i]))
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def tree_unstack(stacked: PyTree) -> list[PyTree]:
    """Inverse of :func:`tree_stack`."""
    leaves, treedef = jax.tree_util.tree_flatten(stacked)
    if not leaves:
        return []
    k = leaves[0].shape[0]
    return [jax.tree_util.tree_unflatten(treedef, [x[i] for x in leaves]) for i in range(k)]


def tree_index(stacked: PyTree, i) -> PyTree:
    """Member ``i`` of a stacked tree (``i`` may be traced)."""
    return jax.tree_util.tree_map(lambda x: x[i], stacked)


def tree_combine(weights, stacked: PyTree, *, precision=jax.lax.Precision.HIGHEST) -> PyTree:
    """Weighted combination ``sum_k weights[..., k] * stacked[k]`` of a stacked tree.

    ``weights`` has shape ``[..., K]``; each leaf ``[K, *s]`` becomes ``[..., *s]``. This is the
    Bernstein-weighted point of a connector (seed 000 eq. 6) and works for any batch of points.
    """
    weights = jnp.asarray(weights)

    def comb(x):
        w = weights.astype(jnp.promote_types(weights.dtype, x.dtype))
        return jnp.tensordot(w, x, axes=[[w.ndim - 1], [0]], precision=precision).astype(x.dtype)

    return jax.tree_util.tree_map(comb, stacked)


def tree_weighted_sum(weights: Sequence[float] | jax.Array, trees: Sequence[PyTree]) -> PyTree:
    """``sum_k weights[k] * trees[k]`` for a list of same-structured trees."""
    trees = list(trees)
    weights = jnp.asarray(weights)
    if weights.shape[-1] != len(trees):
        raise ValueError(f"{weights.shape[-1]} weights for {len(trees)} trees")
    return tree_combine(weights, tree_stack(trees))


def tree_gram(stacked: PyTree):
    """Gram matrix ``G[k, l] = <stacked[k], stacked[l]>`` of a stacked tree (K x K, float32+)."""
    def gram(x):
        x2 = x.reshape(x.shape[0], -1).astype(jnp.promote_types(x.dtype, jnp.float32))
        return jnp.matmul(x2, x2.T, precision=jax.lax.Precision.HIGHEST)

    parts = jax.tree_util.tree_leaves(jax.tree_util.tree_map(gram, stacked))
    return sum(parts[1:], parts[0])


def tree_row_dot(a: PyTree, b: PyTree):
    """Row-wise inner products of two stacked trees: ``out[k] = <a[k], b[k]>``, shape ``[K]`` (float32+).

    The per-member dot product of pivots, tangents or gradients stacked on a leading axis (one reduction per
    leaf, no K x K Gram matrix).
    """
    def rd(x, y):
        dt = jnp.promote_types(jnp.promote_types(x.dtype, y.dtype), jnp.float32)
        return jnp.sum((x.astype(dt) * y.astype(dt)).reshape(x.shape[0], -1), axis=1)

    parts = jax.tree_util.tree_leaves(jax.tree_util.tree_map(rd, a, b))
    return sum(parts[1:], parts[0])


def tree_row_scale(a: PyTree, s) -> PyTree:
    """Scale member ``k`` of a stacked tree by ``s[k]`` (``s`` has shape ``[K]``)."""
    s = jnp.asarray(s)
    return jax.tree_util.tree_map(lambda x: (x * s.reshape((-1,) + (1,) * (x.ndim - 1))).astype(x.dtype), a)


def tree_ravel(tree: PyTree):
    """Flatten a pytree to one vector; returns ``(vector, unravel)`` (``jax.flatten_util.ravel_pytree``)."""
    return ravel_pytree(tree)


def tree_random_normal(key: jax.Array, like: PyTree, dtype=None) -> PyTree:
    """A standard-normal pytree shaped like ``like`` (one independent key per leaf)."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = [jax.random.normal(k, jnp.shape(x), dtype or jnp.result_type(x)) for k, x in zip(keys, leaves, strict=False)]
    return jax.tree_util.tree_unflatten(treedef, out)


def tree_digest(tree: PyTree) -> str:
    """A SHA-256 hex digest of a pytree's structure, leaf shapes, dtypes and values (host-side).

    Two trees get the same digest exactly when they hold the same arrays in the same structure: what a
    checkpoint records of a run's fixed inputs (endpoints, corners, initial parameters, data), so that a
    resume with other inputs is refused.

    Example:
        >>> import numpy as np
        >>> tree_digest({"w": np.zeros(3)}) == tree_digest({"w": np.zeros(3)})
        True
        >>> tree_digest({"w": np.zeros(3)}) == tree_digest({"w": np.ones(3)})
        False
    """
    h = hashlib.sha256()
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    h.update(str(treedef).encode())
    for x in leaves:
        arr = np.ascontiguousarray(np.asarray(x))
        h.update(f"{arr.shape}{arr.dtype}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()
