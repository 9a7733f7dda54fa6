"""Matching two networks up to permutation: weight matching (Ainsworth, Hayase & Srinivasa 2023, §3.2),
activation matching (Entezari et al. 2022; Ainsworth et al. 2023, §3.1), :func:`align` and
:func:`distance_modulo_permutation`. See :mod:`mclandscape.methods.alignment`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mclandscape.core._checks import choice, integer
from mclandscape.core.tree import tree_stack
from mclandscape.engine.points import data_xy, map_points, stacked_points
from mclandscape.methods.alignment.spec import (
    Axis,
    Permutation,
    PermutationSpec,
    _Flat,
    _flips,
    _is_variables,
    _permute_leaf,
    _rng,
    _validated,
    apply_permutation,
)
from mclandscape.methods.alignment.zoo import permutation_spec

PyTree = Any
METHODS = ("weight", "activation")

# ---------------------------------------------------------------------------------------------------------
# weight matching (Ainsworth, Hayase & Srinivasa 2023, §3.2)
# ---------------------------------------------------------------------------------------------------------


def _block(x: np.ndarray, axis: int, a: Axis, group: str, sizes) -> np.ndarray:
    """The group's units of ``x`` along ``axis`` as rows ``[n, -1]`` (its block of a concatenation; every
    repetition of a tiled axis)."""
    x = np.moveaxis(x, axis, 0)
    off = sum(sizes[g] for g in a.perms[:a.perms.index(group)])
    n, total = sizes[group], sum(sizes[g] for g in a.perms)
    if a.tiled:
        x = x.reshape((x.shape[0] // total, total) + x.shape[1:])[:, off:off + n]
        return np.moveaxis(x, 1, 0).reshape(n, -1)
    return x[off:off + n].reshape(n, -1)


def _params_leaves(flat: _Flat) -> dict[str, np.ndarray]:
    """The ``params`` leaves on the host, float32 (float64 if given): the assignment costs are products of
    these, summed in float64."""
    return {p: np.asarray(v, np.float64 if np.asarray(v).dtype == np.float64 else np.float32)
            for p, v in flat.leaves.items() if p.startswith("params/")}


def _pair(spec: PermutationSpec, reference, other, names: tuple[str, str]):
    """Both networks' flattened trees and params leaves, checked against the spec and against each other."""
    (ref_flat, sizes), (oth_flat, _) = _validated(spec, reference, names[0]), _validated(spec, other, names[1])
    ref, oth = _params_leaves(ref_flat), _params_leaves(oth_flat)
    for p in ref:
        if ref[p].shape != oth[p].shape:
            raise ValueError(f"{p} has shape {ref[p].shape} in {names[0]} but {oth[p].shape} in {names[1]}")
    return ref, oth, sizes


def _assign(cost: np.ndarray, flip: bool) -> tuple[np.ndarray, float, np.ndarray]:
    """The linear assignment ``i -> idx[i]`` maximising ``sum_i cost[i, idx[i]]`` (``|cost|`` with sign flips),
    that total, and the signs of the assigned costs."""
    from scipy.optimize import linear_sum_assignment

    gain = np.abs(cost) if flip else cost
    rows, idx = linear_sum_assignment(gain, maximize=True)  # a square cost: the rows come back as 0..n-1
    return idx, float(np.sum(gain[rows, idx])), np.where(cost[rows, idx] < 0, -1.0, 1.0)


def _coordinate_descent(spec, ref, oth, sizes, idx, signs, *, free, flip, max_iter, key):
    """Git Re-Basin's coordinate descent over the ``free`` groups (the others stay at ``idx``)."""
    bindings = {g: [(p, i, a) for p, i, a in spec.bindings(g) if p in ref] for g in free}
    order = [g for g in spec.groups if g in free and bindings[g]]
    max_iter = integer(max_iter, "max_iter", low=1)
    if not order:
        return 0, True
    rng = None if key is None else _rng(key)
    ref_blocks = {(p, i, g): _block(ref[p], i, a, g, sizes) for g in order for p, i, a in bindings[g]}
    for sweep in range(1, max_iter + 1):
        seq = order if rng is None else [order[j] for j in rng.permutation(len(order))]
        progress = False
        for g in seq:
            n = sizes[g]
            cost = np.zeros((n, n))
            for p, i, a in bindings[g]:
                b = _permute_leaf(oth[p], spec.axes[p], sizes, idx, signs, skip=i)
                cost += (ref_blocks[p, i, g] @ _block(b, i, a, g, sizes).T).astype(np.float64)
            new_idx, new, new_signs = _assign(cost, g in flip)
            old = float(np.sum((signs[g] if g in flip else 1.0) * cost[np.arange(n), idx[g]]))
            if new > old + 1e-12 * max(1.0, abs(old)):
                idx[g] = new_idx
                if g in flip:
                    signs[g] = new_signs
                progress = True
        if not progress:
            return sweep, True
    return max_iter, False


def _match(spec, ref, oth, sizes, flip, costs, max_iter, key) -> Permutation:
    """One assignment for each group with a cost in ``costs``, then coordinate descent over the others."""
    idx, signs = {g: np.arange(n) for g, n in sizes.items()}, {g: np.ones(sizes[g]) for g in flip if g in sizes}
    for g, cost in costs.items():
        idx[g], _, s = _assign(cost, g in flip)
        if g in flip:
            signs[g] = s
    it, conv = _coordinate_descent(spec, ref, oth, sizes, idx, signs, free=set(sizes) - set(costs), flip=flip,
                                   max_iter=max_iter, key=key)
    return Permutation(idx, signs or None, iterations=it, converged=conv)


def weight_matching(spec: PermutationSpec, reference_params: PyTree, params: PyTree, *, max_iter: int = 100,
                    key: jax.Array | None = None, sign_flips: bool = False) -> Permutation:
    """The permutation of ``params`` that best matches ``reference_params`` weight by weight (Ainsworth,
    Hayase & Srinivasa 2023, Algorithm 1): coordinate descent over the groups, one linear assignment
    (``scipy.optimize.linear_sum_assignment``) per group with the others fixed, until a sweep improves none
    or ``max_iter`` sweeps. Maximises ``<reference, P(params)>``, i.e. minimises ``|reference - P(params)|``.

    Args:
      spec: the :class:`PermutationSpec` (:func:`permutation_spec` for zoo models).
      reference_params, params: two networks of the architecture (params trees or variables dicts; only
        the ``params`` collection is matched, BatchNorm statistics follow through :func:`apply_permutation`).
      max_iter: the most sweeps over the groups.
      key: a PRNG key for the order of the groups in each sweep (Git Re-Basin draws it at random; here
        NumPy's generator seeded by the key's data, so nothing is compiled); ``None`` uses the spec's order
        every sweep. A fixed key (or ``None``) gives a fixed result.
      sign_flips: also flip the signs of units of the spec's ``odd`` groups (cost ``|C_ij|``).

    Returns:
      A :class:`Permutation`; ``apply_permutation(spec, perm, params)`` is ``params`` aligned to the reference.

    Example:
        >>> import jax, numpy as np
        >>> spec = PermutationSpec({"params/w1": (None, "h"), "params/w2": ("h", None)})
        >>> ref = {"w1": np.array([[1., 2., 3.]]), "w2": np.array([[1.], [2.], [3.]])}
        >>> shuffled = apply_permutation(spec, {"h": np.array([1, 2, 0])}, ref)
        >>> perm = weight_matching(spec, ref, shuffled, key=jax.random.key(0))
        >>> apply_permutation(spec, perm, shuffled)["w1"].tolist()
        [[1.0, 2.0, 3.0]]
    """
    ref, oth, sizes = _pair(spec, reference_params, params, ("reference_params", "params"))
    return _match(spec, ref, oth, sizes, _flips(spec, sign_flips), {}, max_iter, key)


# ---------------------------------------------------------------------------------------------------------
# activation matching (Entezari et al. 2022; Ainsworth et al. 2023, §3.1)
# ---------------------------------------------------------------------------------------------------------


def _carriers(spec: PermutationSpec) -> dict[str, Axis]:
    """Module path -> the groups along its output's last axis: a module whose ``kernel`` (else ``scale``, else
    ``bias``) has a permuted, untiled last axis outputs those units last (Dense, Conv, DenseGeneral,
    BatchNorm, LayerNorm)."""
    out = {}
    for leaf in ("bias", "scale", "kernel"):  # a kernel's last axis wins over a scale's, a scale's over a bias's
        for p, entries in spec.axes.items():
            module, _, name = p.removeprefix("params/").rpartition("/")
            last = entries[-1] if entries else None
            if p.startswith("params/") and name == leaf and last is not None and not last.tiled:
                out[module] = last
    return out


def _as_model_variables(model, tree, name: str) -> dict:
    if _is_variables(tree):
        return dict(tree)
    if getattr(model, "has_batch_stats", False):
        raise ValueError(f"{name}: model {model.name} has BatchNorm, so activation matching needs its full "
                         f"variables (params and batch_stats), not params alone")
    return {"params": tree}


@dataclasses.dataclass(frozen=True)
class _Capture:
    """``variables -> {module path: output}`` of the modules in ``wanted`` (read by intercepting the Flax
    modules' calls), a hashable per-point function for :func:`~mclandscape.engine.points.map_points`."""

    model: Any
    wanted: frozenset[str]

    def __call__(self, variables, x):
        import flax.linen as nn

        store = {}

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__":
                path = "/".join(str(s) for s in context.module.path)
                if path in self.wanted and isinstance(out, jax.Array):
                    store[path] = out
            return out

        with nn.intercept_methods(interceptor):
            self.model.apply(variables, x)
        return store


def _correlation_costs(model, spec, ref_vars, oth_vars, x, batch_size: int, sizes) -> dict[str, np.ndarray]:
    """Per group that some module's output carries: the Pearson correlations of its units, over examples and
    positions, summed over those modules. Per module the count, sums, sums of squares and cross products of the
    two networks' outputs are accumulated on the host in float64, both networks mapped as one pair of points."""
    carriers = _carriers(spec)
    fn, pair = _Capture(model, frozenset(carriers)), stacked_points(tree_stack([ref_vars, oth_vars]))
    moments: dict[str, list] = {}
    for s in range(0, len(x), batch_size):
        for m, both in map_points(fn, pair, jnp.asarray(x[s:s + batch_size])).items():
            a, b = np.asarray(both, np.float64).reshape(2, -1, both.shape[-1])
            new = (a.shape[0], a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), a.T @ b)
            moments[m] = [u + v for u, v in zip(moments[m], new, strict=True)] if m in moments else list(new)
    if not moments:
        raise ValueError(f"no layer output was captured from model {getattr(model, 'name', model)!r}: activation "
                         f"matching intercepts Flax modules named like the spec's leaves (use method='weight' "
                         f"for other models)")
    cost = {}
    for m, (cnt, sa, sb, saa, sbb, sab) in moments.items():
        if sa.shape[0] != sum(sizes[g] for g in carriers[m].perms):
            raise ValueError(f"the output of {m} has {sa.shape[0]} units on its last axis but the spec binds "
                             f"{list(carriers[m].perms)} there")
        ma, mb = sa / cnt, sb / cnt
        sda = np.sqrt(np.maximum(saa / cnt - ma**2, 0.0))
        sdb = np.sqrt(np.maximum(sbb / cnt - mb**2, 0.0))
        corr = (sab / cnt - np.outer(ma, mb)) / (np.outer(sda, sdb) + 1e-12)
        off = 0
        for g in carriers[m].perms:
            cost[g] = cost.get(g, 0.0) + corr[off:off + sizes[g], off:off + sizes[g]]
            off += sizes[g]
    return cost


def activation_matching(model, spec: PermutationSpec, reference: PyTree, other: PyTree, data, *,
                        batch_size: int = 256, num_examples: int | None = None, sign_flips: bool = False,
                        key: jax.Array | None = None, max_iter: int = 100) -> Permutation:
    """The permutation of ``other`` whose hidden activations best correlate with ``reference``'s on ``data``
    (Entezari et al. 2022; Ainsworth, Hayase & Srinivasa 2023 §3.1).

    Every layer whose output carries a group on its last axis (a ``Dense``/``Conv`` kernel, a norm's
    ``scale`` bound there by the spec) is read while the model runs in evaluation mode, by intercepting the
    Flax modules' calls; for each group the Pearson correlations ``corr(a_i^ref, a_j^other)`` over examples
    and positions are summed over its layers (and blocks of concatenations), and one linear assignment per
    group maximises the total. Groups that no layer output carries (a ViT's attention-head axis) are solved
    afterwards by :func:`weight_matching` with the others fixed.

    Args:
      model: the :class:`~mclandscape.engine.models.Model` (a Flax model: its layers are intercepted).
      spec: its :class:`PermutationSpec`.
      reference, other: variables (or params, for a model without BatchNorm).
      data: a Dataset, an ``(x, y)`` tuple or an input array; the first ``num_examples`` (default all).
      batch_size: examples per forward pass.
      sign_flips: for the spec's odd groups, match ``|corr|`` and flip the sign of negatively correlated units.
      key, max_iter: the weight-matching step for uncarried groups.

    Returns:
      A :class:`Permutation`.
    """
    ref_vars = _as_model_variables(model, reference, "reference")
    oth_vars = _as_model_variables(model, other, "other")
    ref, oth, sizes = _pair(spec, ref_vars, oth_vars, ("reference", "other"))
    flip = _flips(spec, sign_flips)
    x = (np.asarray(data) if isinstance(data, np.ndarray | jax.Array) else data_xy(data)[0])[:num_examples]
    if len(x) == 0:
        raise ValueError("activation matching needs at least one example")
    cost = _correlation_costs(model, spec, ref_vars, oth_vars, x, integer(batch_size, "batch_size", low=1), sizes)
    return _match(spec, ref, oth, sizes, flip, cost, max_iter, key)


# ---------------------------------------------------------------------------------------------------------
# align, distance
# ---------------------------------------------------------------------------------------------------------


def align(model, reference: PyTree, other: PyTree, *, method: str = "weight", data=None,
          spec: PermutationSpec | None = None, key: jax.Array | None = None, max_iter: int = 100,
          sign_flips: bool = False, batch_size: int = 256, num_examples: int | None = None,
          return_permutation: bool = False):
    """``other`` permuted to match ``reference``: parameters and BatchNorm statistics, computing the same
    function as before.

    Args:
      model: the :class:`~mclandscape.engine.models.Model` (its spec comes from :func:`permutation_spec`
        unless ``spec`` is given).
      reference, other: params trees or variables dicts of two networks (``other`` is returned in its form).
      method: ``"weight"`` (:func:`weight_matching`, no data) or ``"activation"``
        (:func:`activation_matching` on ``data``, the first ``num_examples``).
      spec, key, max_iter, sign_flips, batch_size: passed on.
      return_permutation: also return the :class:`Permutation`.

    Returns:
      The aligned ``other`` (and the permutation with ``return_permutation``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from mclandscape.engine.models import get_model
        >>> from mclandscape.methods.alignment import apply_permutation, permutation_spec, random_permutation
        >>> model = get_model("mlp", widths=[6], num_classes=2, activation="tanh")
        >>> a = model.init(jax.random.key(0), jnp.zeros((1, 3)))
        >>> spec = permutation_spec(model)
        >>> b = apply_permutation(spec, random_permutation(spec, a, jax.random.key(1)), a)
        >>> bool(jnp.allclose(align(model, a, b)["params"]["Dense_0"]["kernel"], a["params"]["Dense_0"]["kernel"]))
        True
    """
    spec = permutation_spec(model, reference) if spec is None else spec
    if choice(method, "method", METHODS) == "weight":
        perm = weight_matching(spec, reference, other, max_iter=max_iter, key=key, sign_flips=sign_flips)
    else:
        perm = activation_matching(model, spec, reference, other, data, batch_size=batch_size,
                                   num_examples=num_examples, sign_flips=sign_flips, key=key, max_iter=max_iter)
    out = apply_permutation(spec, perm, other)
    return (out, perm) if return_permutation else out


def distance_modulo_permutation(spec: PermutationSpec, a: PyTree, b: PyTree, *, sign_flips: bool = False,
                                key: jax.Array | None = None, max_iter: int = 100) -> float:
    """Euclidean distance between the parameters of two networks modulo the spec's symmetries:
    ``|a - P(b)|_2`` for the :func:`weight_matching` permutation ``P`` (with ``sign_flips``, also the sign
    flips of the spec's odd groups, e.g. ``tanh`` units). ``0`` for a permuted (and sign-flipped) copy.

    Exact for one permuted group (a one-hidden-layer MLP: one assignment
    solves it); for deeper networks the
    coordinate descent gives an upper bound on the true minimum. Only the ``params`` collection counts.
    ``functools.partial(distance_modulo_permutation, spec, sign_flips=True)`` is a ``(p, q) -> float``
    symmetry distance.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from mclandscape.engine.models import get_model
        >>> from mclandscape.methods.alignment import apply_permutation, permutation_spec, random_permutation
        >>> model = get_model("mlp", widths=[6], num_classes=2, activation="tanh")
        >>> p = model.init(jax.random.key(0), jnp.zeros((1, 3)))["params"]
        >>> spec = permutation_spec(model)
        >>> q = apply_permutation(spec, random_permutation(spec, p, jax.random.key(1), sign_flips=True), p)
        >>> round(distance_modulo_permutation(spec, p, q, sign_flips=True), 6)
        0.0
    """
    perm = weight_matching(spec, a, b, max_iter=max_iter, key=key, sign_flips=sign_flips)
    fa, fb = _Flat.of(a, "a"), _Flat.of(apply_permutation(spec, perm, b), "b")
    sq = sum(float(np.sum((np.asarray(fa.leaves[p], np.float64) - np.asarray(x, np.float64)) ** 2))
             for p, x in fb.leaves.items() if p.startswith("params/"))
    return float(np.sqrt(sq))
