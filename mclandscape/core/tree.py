"""Pytree linear algebra beyond `optax.tree` (which the package uses for add, sub, scale and add_scale directly).

Every method in mclandscape treats a model's parameters as a vector in R^d stored as a pytree. The helpers
here are pure functions, jit-friendly, and work on any pytree of arrays (Flax ``params`` dicts, optax
states, stacked control points with a leading axis).

Stacked trees: a "stacked" tree has one extra leading axis on every leaf (control points of a connector,
pivots of a band, members of an ensemble). :func:`tree_stack` / :func:`tree_unstack` convert, and
:func:`tree_combine` forms weighted sums ``sum_k w[..., k] * tree[k]`` with one contraction per leaf: the
point ``sum_ij B_i(u) B_j(v) theta_ij`` of a Bézier surface (Anonymous, 2024, "Revisiting mode connectivity in
neural networks with Bézier surface", eq. 6) is one such sum.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

PyTree = Any

__all__ = ["PyTree", "TreeMismatchError", "check_same_structure", "check_finite", "tree_dot", "tree_norm",
           "tree_distance", "tree_cosine", "tree_size", "tree_stack", "tree_unstack", "tree_index", "tree_combine", "tree_gram", "tree_row_dot", "tree_row_scale", "tree_ravel",
           "tree_random_normal", "tree_path_names", "tree_digest"]


class TreeMismatchError(ValueError):
    """Two pytrees that should describe the same model do not (structure, shape or dtype).

    A ``ValueError``, so callers that validate input can catch either. The message names the first leaf that
    differs.

    Example:
        >>> issubclass(TreeMismatchError, ValueError)
        True
    """


def _wide(x):
    """``x`` in float32, or in its own dtype when that is wider (the accumulation dtype of products)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _leaf_sum(fn, *trees):
    """The sum over leaves of ``fn(leaf, ...)`` of same-structured trees, accumulated from a float32 zero."""
    return sum(jax.tree_util.tree_leaves(jax.tree_util.tree_map(fn, *trees)), jnp.zeros((), jnp.float32))


def _path_str(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def tree_path_names(tree: PyTree) -> list[str]:
    """Readable path (``['params']['Dense_0']['kernel']``) of every leaf, in leaf order.

    Args:
      tree: any pytree.

    Returns:
      A list of strings, one per leaf (``"<root>"`` for a bare array).

    Example:
        >>> import numpy as np
        >>> tree_path_names({"b": np.zeros(2), "w": {"k": np.ones(3)}})
        ["['b']", "['w']['k']"]
    """
    return [_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_same_structure(
    a: PyTree,
    b: PyTree,
    *,
    names: tuple[str, str] = ("a", "b"),
    check_dtype: bool = True,
    leading_b: int = 0,
) -> None:
    """Raise :class:`TreeMismatchError` naming the first leaf where ``a`` and ``b`` differ.

    Args:
      a, b: the two pytrees.
      names: how ``a`` and ``b`` are called in the message.
      check_dtype: also compare the leaves' dtypes.
      leading_b: skip that many leading (stacking) axes of ``b``'s leaves before comparing shapes, so a stacked
        control-point tree can be checked against a single model.

    Returns:
      ``None``; raises :class:`TreeMismatchError` on a difference of paths, container types, shapes or dtypes.

    Example:
        >>> import numpy as np
        >>> check_same_structure({"w": np.zeros(2)}, {"w": np.zeros((3, 2))}, leading_b=1)  # passes
        >>> check_same_structure({"w": np.zeros(2)}, {"w": np.zeros(3)}, names=("start", "end"))
        Traceback (most recent call last):
        ...
        mclandscape.core.tree.TreeMismatchError: leaf ['w']: shape (2,) in start but (3,) in end
    """
    na, nb = names
    fa = jax.tree_util.tree_flatten_with_path(a)[0]
    fb = jax.tree_util.tree_flatten_with_path(b)[0]
    pa, pb = [_path_str(p) for p, _ in fa], [_path_str(p) for p, _ in fb]
    if pa != pb:
        for here, there, nh, nt in ((pa, pb, na, nb), (pb, pa, nb, na)):
            only = [p for p in here if p not in set(there)]
            if only:
                raise TreeMismatchError(f"leaf {only[0]} is in {nh} but not in {nt} ({len(only)} such leaves)")
        raise TreeMismatchError(f"{na} and {nb} hold the same leaves in a different order")
    ta, tb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    if ta != tb:
        raise TreeMismatchError(f"{na} and {nb} have different container types: {ta} vs {tb}")
    for (path, xa), (_, xb) in zip(fa, fb, strict=True):
        sa = tuple(np.shape(xa))
        sb = tuple(np.shape(xb))[leading_b:]
        if sa != sb:
            raise TreeMismatchError(f"leaf {_path_str(path)}: shape {sa} in {na} but {sb} in {nb}")
        if check_dtype:
            da, db = jnp.result_type(xa), jnp.result_type(xb)
            if da != db:
                raise TreeMismatchError(f"leaf {_path_str(path)}: dtype {da} in {na} but {db} in {nb}")


def check_finite(tree: PyTree, name: str = "parameters") -> None:
    """Raise ``ValueError`` naming the first leaf that holds NaN or inf (host-side check, not jittable).

    Args:
      tree: a pytree of arrays.
      name: what the tree is called in the message.

    Returns:
      ``None`` when every floating-point leaf is finite.

    Example:
        >>> import numpy as np
        >>> check_finite({"w": np.ones(2)})
        >>> check_finite({"w": np.array([1.0, np.nan])}, "start")
        Traceback (most recent call last):
        ...
        ValueError: start: leaf ['w'] holds 1 non-finite value(s) (NaN or inf)
    """
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.asarray(x)
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise ValueError(f"{name}: leaf {_path_str(path)} holds {bad} non-finite value(s) (NaN or inf)")


def tree_dot(a: PyTree, b: PyTree):
    """Euclidean inner product of two pytrees seen as vectors (accumulated in float32 or wider).

    Args:
      a, b: same-structured pytrees.

    Returns:
      A scalar ``jax.Array``: ``sum over leaves of vdot(a_leaf, b_leaf)``.

    Example:
        >>> import jax.numpy as jnp
        >>> float(tree_dot({"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)},
        ...                {"w": jnp.array([4.0, 5.0]), "b": jnp.array(1.0)}))
        17.0
    """
    return _leaf_sum(lambda x, y: jnp.vdot(_wide(x), _wide(y)), a, b)


def tree_norm(a: PyTree):
    """Euclidean norm ``|a|`` of a pytree seen as one vector.

    Args:
      a: a pytree of arrays.

    Returns:
      A scalar ``jax.Array`` (float32 or wider).

    Example:
        >>> import jax.numpy as jnp
        >>> float(tree_norm({"w": jnp.array([3.0]), "b": jnp.array([4.0])}))
        5.0
    """
    return jnp.sqrt(tree_dot(a, a))


def tree_distance(a: PyTree, b: PyTree):
    """Euclidean distance ``|a - b|`` between two pytrees (e.g. two trained models).

    Args:
      a, b: same-structured pytrees.

    Returns:
      A scalar ``jax.Array``.

    Example:
        >>> import jax.numpy as jnp
        >>> float(tree_distance({"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([4.0, 5.0])}))
        5.0
    """
    return tree_norm(optax.tree.sub(a, b))


def tree_cosine(a: PyTree, b: PyTree, eps: float = 1e-30):
    """Cosine of the angle between two pytrees seen as vectors.

    Args:
      a, b: same-structured pytrees.
      eps: lower bound of the product of norms (a zero tree gives cosine 0, not NaN).

    Returns:
      A scalar ``jax.Array`` in ``[-1, 1]``.

    Example:
        >>> import jax.numpy as jnp
        >>> float(tree_cosine({"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 2.0])}))
        0.0
        >>> round(float(tree_cosine({"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([2.0, 2.0])})), 6)
        1.0
    """
    return tree_dot(a, b) / jnp.maximum(tree_norm(a) * tree_norm(b), eps)


def tree_size(a: PyTree) -> int:
    """Number of scalars in the tree (the dimension d of parameter space).

    Args:
      a: a pytree of arrays.

    Returns:
      An ``int``.

    Example:
        >>> import numpy as np
        >>> tree_size({"kernel": np.zeros((4, 3)), "bias": np.zeros(3)})
        15
    """
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(a)))


def tree_stack(trees: Sequence[PyTree], *, names: Sequence[str] | None = None) -> PyTree:
    """Stack K same-structured trees along a new leading axis.

    Args:
      trees: the K trees (at least one).
      names: what each tree is called in a mismatch message (default ``tree[i]``).

    Returns:
      One tree whose leaves have shape ``[K, *leaf.shape]``. Raises :class:`TreeMismatchError` naming the leaf
      where two trees differ.

    Example:
        >>> import jax.numpy as jnp
        >>> tree_stack([{"w": jnp.zeros(2)}, {"w": jnp.ones(2)}])["w"].shape
        (2, 2)
    """
    trees = list(trees)
    if not trees:
        raise ValueError("tree_stack needs at least one tree")
    names = list(names) if names is not None else [f"tree[{i}]" for i in range(len(trees))]
    for i in range(1, len(trees)):
        check_same_structure(trees[0], trees[i], names=(names[0], names[i]))
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def tree_unstack(stacked: PyTree) -> list[PyTree]:
    """Inverse of :func:`tree_stack`: the list of the K members of a stacked tree.

    Args:
      stacked: a tree whose leaves share the leading axis K.

    Returns:
      A list of K trees (empty for a tree without leaves).

    Example:
        >>> import jax.numpy as jnp
        >>> [m["w"].tolist() for m in tree_unstack({"w": jnp.array([[1.0], [2.0]])})]
        [[1.0], [2.0]]
    """
    leaves = jax.tree_util.tree_leaves(stacked)
    return [tree_index(stacked, i) for i in range(leaves[0].shape[0])] if leaves else []


def tree_index(stacked: PyTree, i) -> PyTree:
    """Member ``i`` of a stacked tree (``i`` may be traced).

    Args:
      stacked: a stacked tree (leaves ``[K, ...]``).
      i: an integer index, or an index array.

    Returns:
      The tree ``stacked[i]``.

    Example:
        >>> import jax.numpy as jnp
        >>> tree_index({"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}, 1)["w"].tolist()
        [3.0, 4.0]
    """
    return jax.tree_util.tree_map(lambda x: x[i], stacked)


def tree_combine(weights, stacked: PyTree, *, precision=jax.lax.Precision.HIGHEST) -> PyTree:
    """Weighted combination ``sum_k weights[..., k] * stacked[k]`` of a stacked tree.

    This is the Bernstein-weighted point of a connector (Bézier-surface paper, eq. 6: the coefficient row of a
    point times the stacked control points) and works for any batch of points.

    Args:
      weights: ``[..., K]`` coefficients; leading axes are a batch of points.
      stacked: a stacked tree with leaves ``[K, *s]``.
      precision: the contraction's ``jax.lax.Precision`` (default highest: exact float32 sums).

    Returns:
      A tree with leaves ``[..., *s]`` in the leaves' dtypes.

    Example:
        >>> import jax.numpy as jnp
        >>> stacked = {"w": jnp.array([[0.0, 0.0], [2.0, 4.0]])}
        >>> tree_combine(jnp.array([[0.5, 0.5], [0.0, 1.0]]), stacked)["w"].tolist()
        [[1.0, 2.0], [2.0, 4.0]]
    """
    weights = jnp.asarray(weights)

    def comb(x):
        w = weights.astype(jnp.promote_types(weights.dtype, x.dtype))
        return jnp.tensordot(w, x, axes=[[w.ndim - 1], [0]], precision=precision).astype(x.dtype)

    return jax.tree_util.tree_map(comb, stacked)


def tree_gram(stacked: PyTree):
    """Gram matrix ``G[k, l] = <stacked[k], stacked[l]>`` of a stacked tree (K x K, float32+).

    Args:
      stacked: a stacked tree (leaves ``[K, ...]``).

    Returns:
      A ``[K, K]`` ``jax.Array``.

    Example:
        >>> import jax.numpy as jnp
        >>> tree_gram({"w": jnp.array([[1.0, 0.0], [1.0, 2.0]])}).tolist()
        [[1.0, 1.0], [1.0, 5.0]]
    """
    def gram(x):
        x2 = _wide(x.reshape(x.shape[0], -1))
        return jnp.matmul(x2, x2.T, precision=jax.lax.Precision.HIGHEST)

    return _leaf_sum(gram, stacked)


def tree_row_dot(a: PyTree, b: PyTree):
    """Row-wise inner products of two stacked trees: ``out[k] = <a[k], b[k]>``, shape ``[K]`` (float32+).

    The per-member dot product of pivots, tangents or gradients stacked on a leading axis (one reduction per
    leaf, no K x K Gram matrix).

    Args:
      a, b: stacked trees of the same structure (leaves ``[K, ...]``).

    Returns:
      A ``[K]`` ``jax.Array``.

    Example:
        >>> import jax.numpy as jnp
        >>> tree_row_dot({"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}, {"w": jnp.ones((2, 2))}).tolist()
        [3.0, 7.0]
    """
    return _leaf_sum(lambda x, y: jnp.sum((_wide(x) * _wide(y)).reshape(x.shape[0], -1), axis=1), a, b)


def tree_row_scale(a: PyTree, s) -> PyTree:
    """Scale member ``k`` of a stacked tree by ``s[k]``.

    Args:
      a: a stacked tree (leaves ``[K, ...]``).
      s: ``[K]`` factors.

    Returns:
      A tree like ``a`` (same dtypes).

    Example:
        >>> import jax.numpy as jnp
        >>> tree_row_scale({"w": jnp.ones((2, 2))}, jnp.array([2.0, -1.0]))["w"].tolist()
        [[2.0, 2.0], [-1.0, -1.0]]
    """
    s = jnp.asarray(s)
    return jax.tree_util.tree_map(lambda x: (x * s.reshape((-1,) + (1,) * (x.ndim - 1))).astype(x.dtype), a)


def tree_ravel(tree: PyTree):
    """Flatten a pytree to one vector (``jax.flatten_util.ravel_pytree``).

    Args:
      tree: a pytree of arrays.

    Returns:
      ``(vector, unravel)``: the concatenated leaves and the function that maps such a vector back to a tree.

    Example:
        >>> import jax.numpy as jnp
        >>> vec, unravel = tree_ravel({"a": jnp.ones(2), "b": jnp.zeros(1)})
        >>> vec.tolist(), unravel(vec)["a"].shape
        ([1.0, 1.0, 0.0], (2,))
    """
    return ravel_pytree(tree)


def tree_random_normal(key: jax.Array, like: PyTree) -> PyTree:
    """A standard-normal pytree shaped like ``like`` (one independent key per leaf).

    Args:
      key: a PRNG key.
      like: the pytree whose structure, shapes and dtypes the sample takes (``optax.tree.random_like``).

    Returns:
      A pytree like ``like`` of independent N(0, 1) samples.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> d = tree_random_normal(jax.random.key(0), {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)})
        >>> d["w"].shape, bool(jnp.all(d["w"] != 0))
        ((2, 3), True)
    """
    return optax.tree.random_like(key, like, jax.random.normal)


def tree_digest(tree: PyTree) -> str:
    """A SHA-256 hex digest of a pytree's structure, leaf shapes, dtypes and values (host-side).

    Two trees get the same digest exactly when they hold the same arrays in the same structure: what a
    checkpoint records of a run's fixed inputs (endpoints, corners, initial parameters, data), so that a
    resume with other inputs is refused.

    Args:
      tree: a pytree of arrays (device arrays are copied to the host).

    Returns:
      A 64-character hexadecimal string.

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
