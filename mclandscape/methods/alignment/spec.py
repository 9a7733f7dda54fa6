"""Spec algebra of permutation alignment: which axes share a permutation (:class:`PermutationSpec`), the
permutations themselves (:class:`Permutation`) and applying them to parameters and BatchNorm statistics
(:func:`apply_permutation`). See :mod:`mclandscape.methods.alignment` for the entry forms and the papers."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mclandscape.core._checks import integer

PyTree = Any

# ---------------------------------------------------------------------------------------------------------
# the declarative spec
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Axis:
    """How one axis of a leaf is permuted: the concatenation of the groups ``perms`` (each permuted within
    its block), and with ``tiled`` the axis is that block repeated (a flattened ``[..., block]``, last factor
    fastest, as NHWC feature maps are flattened before a dense layer).

    Example:
        >>> Axis(("stem",), tiled=True)
        Axis(perms=('stem',), tiled=True)
    """

    perms: tuple[str, ...]
    tiled: bool = False

    def __post_init__(self):
        perms = (self.perms,) if isinstance(self.perms, str) else tuple(self.perms)
        if not perms or not all(isinstance(p, str) and p for p in perms) or len(set(perms)) != len(perms):
            raise ValueError(f"an Axis needs one or more distinct, non-empty group names, got {self.perms!r}")
        object.__setattr__(self, "perms", perms)


def _as_axis(entry, where: str) -> Axis | None:
    if entry is None or isinstance(entry, Axis):
        return entry
    if isinstance(entry, str) or (isinstance(entry, Sequence) and all(isinstance(e, str) for e in entry)):
        return Axis(entry)
    raise ValueError(f"{where}: an axis entry must be None, a group name, a tuple of group names or an Axis, "
                     f"got {entry!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class PermutationSpec:
    """Which axes of which leaves share a permutation (see the module docstring for the entry forms).

    Args:
      axes: ``{leaf path: (entry per axis, ...)}`` for *every* leaf of the variables (leaves with no permuted
        axis get ``None`` entries, so a spec that forgets a leaf is caught instead of silently changing the
        function). Paths start with the collection: ``"params/..."``, ``"batch_stats/..."``.
      sizes: group sizes that the leaves cannot give (a group that only ever appears inside a concatenation
        or a tiled axis); others are inferred and checked against these.
      odd: groups whose units may also flip sign (odd activations).

    Example:
        >>> spec = PermutationSpec({"params/Dense_0/kernel": (None, "h"), "params/Dense_0/bias": ("h",),
        ...                         "params/Dense_1/kernel": ("h", None), "params/Dense_1/bias": (None,)})
        >>> spec.groups
        ('h',)
        >>> import numpy as np
        >>> params = {"Dense_0": {"kernel": np.ones((3, 4)), "bias": np.zeros(4)},
        ...           "Dense_1": {"kernel": np.ones((4, 2)), "bias": np.zeros(2)}}
        >>> spec_sizes(spec, params)
        {'h': 4}
    """

    axes: Mapping[str, tuple[Axis | None, ...]]
    sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)
    odd: frozenset[str] = frozenset()
    groups: tuple[str, ...] = dataclasses.field(init=False)  # the groups, in order of first appearance

    def __post_init__(self):
        axes = {}
        for path, entries in dict(self.axes).items():
            if isinstance(entries, str | Axis) or not isinstance(entries, Sequence):
                raise ValueError(f"{path}: give one entry per axis as a tuple (e.g. (None, 'h')), got {entries!r}")
            axes[path] = tuple(_as_axis(e, f"axis {i} of {path}") for i, e in enumerate(entries))
        groups = tuple(dict.fromkeys(g for ax in axes.values() for a in ax if a is not None for g in a.perms))
        odd = frozenset([self.odd] if isinstance(self.odd, str) else self.odd)
        unknown = sorted((set(self.sizes) | odd) - set(groups))
        if unknown:
            raise ValueError(f"sizes or odd names group(s) {unknown} that no axis of the spec uses "
                             f"(groups: {list(groups)})")
        object.__setattr__(self, "axes", axes)
        object.__setattr__(self, "sizes", {g: integer(n, f"sizes[{g!r}]", low=1) for g, n in self.sizes.items()})
        object.__setattr__(self, "odd", odd)
        object.__setattr__(self, "groups", groups)

    def bindings(self, group: str) -> list[tuple[str, int, Axis]]:
        """``(leaf path, axis, Axis)`` of every axis the group permutes."""
        return [(p, i, a) for p, ax in self.axes.items() for i, a in enumerate(ax) if a is not None and group in a.perms]

    def __repr__(self) -> str:
        return (f"PermutationSpec({len(self.axes)} leaves, {len(self.groups)} groups"
                f"{', odd ' + str(sorted(self.odd)) if self.odd else ''})")


# ---------------------------------------------------------------------------------------------------------
# trees: params or full variables, leaves by path
# ---------------------------------------------------------------------------------------------------------


def _is_variables(tree) -> bool:
    return isinstance(tree, Mapping) and "params" in tree


@dataclasses.dataclass
class _Flat:
    """A params tree or a variables dict as ``{path: leaf}`` plus what rebuilds it."""

    leaves: dict[str, Any]
    treedef: Any
    is_variables: bool
    collections: set[str]

    @classmethod
    def of(cls, tree, name: str) -> _Flat:
        if tree is None:
            raise ValueError(f"{name} is None: pass a params tree or a variables dict")
        is_vars = _is_variables(tree)
        flat, treedef = jax.tree_util.tree_flatten_with_path(dict(tree) if is_vars else {"params": tree})
        leaves = {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in flat}
        if len(leaves) != len(flat):
            raise ValueError(f"{name} has leaves whose '/'-joined paths collide")
        return cls(leaves, treedef, is_vars, {p.split("/", 1)[0] for p in leaves})

    def rebuild(self, leaves: Mapping[str, Any]):
        root = self.treedef.unflatten([leaves[p] for p in self.leaves])
        return root if self.is_variables else root["params"]


def _first(paths: list[str]) -> str:
    return f"{paths[:5]}{f' and {len(paths) - 5} more' if len(paths) > 5 else ''}"


def _check_cover(spec: PermutationSpec, flat: _Flat, name: str) -> None:
    missing = [p for p in flat.leaves if p not in spec.axes]
    if missing:
        raise ValueError(f"the permutation spec has no entry for {_first(missing)} of {name}: every leaf needs "
                         f"one (None for each axis that is not permuted), else the permutation would change the "
                         f"function")
    absent = [p for p in spec.axes if p not in flat.leaves and p.split("/", 1)[0] in flat.collections]
    if absent:
        raise ValueError(f"the permutation spec names {_first(absent)}, which {name} does not have (a spec for "
                         f"another architecture?)")
    for p, leaf in flat.leaves.items():
        if len(spec.axes[p]) != np.ndim(leaf):
            raise ValueError(f"the permutation spec gives {len(spec.axes[p])} axis entries for {p}, which has "
                             f"{np.ndim(leaf)} axes (shape {tuple(np.shape(leaf))})")


def _resolve_sizes(spec: PermutationSpec, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Group sizes from the axes bound to one group alone (or ``spec.sizes``), checked against every axis."""
    sizes, source = dict(spec.sizes), {g: "PermutationSpec(sizes=...)" for g in spec.sizes}
    bound = [(p, i, a) for p, ax in spec.axes.items() if p in shapes for i, a in enumerate(ax) if a is not None]
    for p, i, a in bound:
        if len(a.perms) == 1 and not a.tiled and a.perms[0] not in sizes:
            sizes[a.perms[0]], source[a.perms[0]] = int(shapes[p][i]), f"axis {i} of {p}"
    for p, i, a in bound:
        unknown = [g for g in a.perms if g not in sizes]
        if unknown:
            raise ValueError(f"cannot infer the size of group(s) {unknown} (axis {i} of {p} concatenates "
                             f"{list(a.perms)}): declare them in PermutationSpec(sizes=...)")
        total, n = sum(sizes[g] for g in a.perms), int(shapes[p][i])
        if (n % total) if a.tiled else (n != total):
            detail = ", ".join(f"group {g!r} = {sizes[g]} from {source[g]}" for g in a.perms)
            raise ValueError(f"axis sizes disagree: axis {i} of {p} has {n} entries, not "
                             f"{'a multiple of ' if a.tiled else ''}the {total} units of its groups ({detail})")
    used = {g for _, _, a in bound for g in a.perms}
    return {g: sizes[g] for g in spec.groups if g in used}


def _validated(spec: PermutationSpec, tree, name: str) -> tuple[_Flat, dict[str, int]]:
    if not isinstance(spec, PermutationSpec):
        raise ValueError(f"spec must be a PermutationSpec (see permutation_spec), got {type(spec).__name__}")
    flat = _Flat.of(tree, name)
    _check_cover(spec, flat, name)
    return flat, _resolve_sizes(spec, {p: np.shape(v) for p, v in flat.leaves.items()})


def spec_sizes(spec: PermutationSpec, variables: PyTree) -> dict[str, int]:
    """The size of every group of ``spec`` in ``variables`` (a params tree or a variables dict), after
    checking that the spec covers every leaf and that all axes agree (``ValueError`` naming the leaves
    otherwise).

    Example:
        >>> import numpy as np
        >>> spec = PermutationSpec({"params/w1": (None, "h"), "params/w2": ("h", None)})
        >>> spec_sizes(spec, {"w1": np.ones((3, 5)), "w2": np.ones((5, 2))})
        {'h': 5}
    """
    return _validated(spec, variables, "the variables")[1]


# ---------------------------------------------------------------------------------------------------------
# permutations
# ---------------------------------------------------------------------------------------------------------


def _eq(a: Mapping | None, b: Mapping | None) -> bool:
    if a is None or b is None:
        return a is b
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


@dataclasses.dataclass(frozen=True, eq=False)
class Permutation(Mapping):
    """One permutation per group: ``indices[g][i]`` is the unit of the original network that becomes unit
    ``i`` (``W_new[..., i, ...] = signs[g][i] * W_old[..., indices[g][i], ...]`` along every axis of the
    group). A read-only mapping ``group -> indices``; ``signs`` (``±1`` per unit, odd groups only) is
    ``None`` without sign flips. ``iterations`` and ``converged`` report the coordinate descent that found
    it, when one did.

    Example:
        >>> import numpy as np
        >>> p = Permutation({"h": np.array([2, 0, 1])})
        >>> p["h"].tolist(), p.inverse()["h"].tolist()
        ([2, 0, 1], [1, 2, 0])
    """

    indices: Mapping[str, np.ndarray]
    signs: Mapping[str, np.ndarray] | None = None
    iterations: int | None = None
    converged: bool | None = None

    def __post_init__(self):
        object.__setattr__(self, "indices", {g: np.asarray(v, np.int64).ravel() for g, v in self.indices.items()})
        if self.signs is not None:  # an empty mapping is no sign flip at all
            signs = {g: np.where(np.ravel(v) < 0, -1.0, 1.0) for g, v in self.signs.items()}
            object.__setattr__(self, "signs", signs or None)

    def __getitem__(self, group: str) -> np.ndarray:
        return self.indices[group]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __eq__(self, other) -> bool:  # defining __eq__ leaves the class unhashable, as a mutable mapping
        if not isinstance(other, Permutation):
            return NotImplemented
        return _eq(self.indices, other.indices) and _eq(self.signs, other.signs)

    def inverse(self) -> Permutation:
        """The permutation that undoes this one (``apply(inverse, apply(self, v)) == v``)."""
        inv = {g: np.argsort(p) for g, p in self.indices.items()}
        signs = None if self.signs is None else {g: s[inv[g]] for g, s in self.signs.items()}
        return Permutation(inv, signs)

    def is_identity(self) -> bool:
        """Whether no group moves and no sign flips."""
        same = all(np.array_equal(p, np.arange(p.size)) for p in self.indices.values())
        return same and (self.signs is None or all(np.all(s > 0) for s in self.signs.values()))


def _rng(key) -> np.random.Generator:
    """NumPy's generator seeded by a JAX PRNG key's data (explicit keys, no XLA computation to compile)."""
    if isinstance(key, int | np.integer) or not hasattr(key, "dtype"):
        raise ValueError(f"key must be a jax PRNG key (jax.random.key(seed)), got {key!r}")
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return np.random.default_rng(np.asarray(data, np.uint64).ravel().tolist())


def _flips(spec: PermutationSpec, sign_flips: bool) -> frozenset[str]:
    """The groups that may flip sign: the spec's odd groups with ``sign_flips``."""
    if sign_flips and not spec.odd:
        raise ValueError("sign_flips=True, but the spec declares no odd group: sign flips are a symmetry only of "
                         "units with an odd activation (tanh); declare those groups with PermutationSpec(odd=...) "
                         "(permutation_spec does for tanh MLPs)")
    return spec.odd if sign_flips else frozenset()


def identity_permutation(spec: PermutationSpec, variables: PyTree) -> Permutation:
    """The permutation that moves nothing, for every group of ``spec`` in ``variables``."""
    return Permutation({g: np.arange(n) for g, n in spec_sizes(spec, variables).items()})


def random_permutation(spec: PermutationSpec, variables: PyTree, key: jax.Array, *,
                       sign_flips: bool = False) -> Permutation:
    """A uniformly random permutation of every group (and, with ``sign_flips``, random signs on the spec's
    odd groups) from the PRNG ``key`` (NumPy's generator seeded by its data): ``apply_permutation`` of it
    gives a functionally identical copy.

    Example:
        >>> import jax, numpy as np
        >>> spec = PermutationSpec({"params/w1": (None, "h"), "params/w2": ("h", None)})
        >>> p = random_permutation(spec, {"w1": np.ones((3, 5)), "w2": np.ones((5, 2))}, jax.random.key(0))
        >>> sorted(p["h"].tolist())
        [0, 1, 2, 3, 4]
    """
    sizes, flip, rng = spec_sizes(spec, variables), _flips(spec, sign_flips), _rng(key)
    idx = {g: rng.permutation(n) for g, n in sizes.items()}
    signs = {g: rng.choice(np.array([-1.0, 1.0]), n) for g, n in sizes.items() if g in flip}
    return Permutation(idx, signs)  # no flipped group: no signs


def _check_perm(spec: PermutationSpec, perm, sizes: Mapping[str, int]) -> tuple[dict, dict | None]:
    if not isinstance(perm, Mapping):
        raise ValueError(f"perm must be a Permutation or a mapping group -> indices, got {type(perm).__name__}")
    if set(perm) != set(sizes):
        raise ValueError(f"perm must cover exactly the spec's groups (identity_permutation gives a starting point): "
                         f"no entry for group(s) {[g for g in sizes if g not in perm]}, unknown group(s) "
                         f"{[g for g in perm if g not in sizes]}")
    for g, n in sizes.items():
        p = np.asarray(perm[g])
        if p.shape != (n,) or not np.issubdtype(p.dtype, np.integer) or not np.array_equal(np.sort(p), np.arange(n)):
            raise ValueError(f"perm[{g!r}] must be a permutation of range({n}), got shape {p.shape} "
                             f"{p.tolist() if p.size <= 12 else ''}")
    signs = perm.signs if isinstance(perm, Permutation) else None
    for g, s in (signs or {}).items():
        if g not in spec.odd or np.shape(s) != (sizes.get(g),):
            raise ValueError(f"signs[{g!r}] is not a symmetry: signs flip only the spec's odd groups "
                             f"{sorted(spec.odd)}, one per unit ({sizes.get(g)}), got shape {np.shape(s)}")
    return {g: np.asarray(perm[g], np.int64) for g in sizes}, signs


def _axis_gather(a: Axis, n: int, sizes, idx, signs) -> tuple[np.ndarray, np.ndarray | None]:
    """The gather indices along an axis of ``n`` entries bound to ``a``, and its signs (``None``: no flips)."""
    starts = np.cumsum([0] + [sizes[g] for g in a.perms])
    index = np.concatenate([s + idx[g] for s, g in zip(starts[:-1], a.perms, strict=True)])
    flips = None
    if signs and any(g in signs for g in a.perms):
        flips = np.tile(np.concatenate([signs.get(g, np.ones(sizes[g])) for g in a.perms]), n // starts[-1])
    if a.tiled:
        index = (np.arange(n // starts[-1])[:, None] * starts[-1] + index[None, :]).reshape(-1)
    return index, flips


def _permute_leaf(x, entries, sizes, idx, signs, *, skip: int | None = None):
    """``x`` permuted along every bound axis but ``skip`` (on the host: one gather per axis, no compilation);
    a jax array comes back as a jax array of the same dtype."""
    y = np.asarray(x)
    for i, a in enumerate(entries):
        if a is None or i == skip:
            continue
        index, s = _axis_gather(a, y.shape[i], sizes, idx, signs)
        y = np.take(y, index, axis=i)
        if s is not None:
            y = y * s.reshape((-1,) + (1,) * (y.ndim - i - 1)).astype(y.dtype)
    return jnp.asarray(y) if isinstance(x, jax.Array) else y


def apply_permutation(spec: PermutationSpec, perm: Permutation | Mapping[str, Any], variables: PyTree) -> PyTree:
    """``variables`` (a params tree or a full variables dict) with every group's units permuted (and
    sign-flipped, for a :class:`Permutation` with ``signs``) along every axis the spec binds to it:
    parameters and BatchNorm statistics alike. Leaves keep their type (jax or NumPy arrays) and dtype; the
    function the network computes does not change.

    Args:
      spec: the :class:`PermutationSpec` of the architecture.
      perm: a :class:`Permutation` or a mapping ``group -> indices`` covering every group.
      variables: params or variables of one network.

    Returns:
      The permuted tree, of the same structure.

    Example:
        >>> import numpy as np
        >>> spec = PermutationSpec({"params/w1": (None, "h"), "params/w2": ("h", None)})
        >>> v = {"w1": np.array([[1., 2., 3.]]), "w2": np.array([[10.], [20.], [30.]])}
        >>> out = apply_permutation(spec, {"h": np.array([2, 0, 1])}, v)
        >>> out["w1"].tolist(), out["w2"].ravel().tolist()
        ([[3.0, 1.0, 2.0]], [30.0, 10.0, 20.0])
    """
    flat, sizes = _validated(spec, variables, "the variables")
    idx, signs = _check_perm(spec, perm, sizes)
    return flat.rebuild({p: _permute_leaf(x, spec.axes[p], sizes, idx, signs) for p, x in flat.leaves.items()})
