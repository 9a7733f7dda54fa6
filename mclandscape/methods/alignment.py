"""Permutation alignment of networks before connecting them (beyond the papers).

Hidden units can be reordered, together with the weights that read them, without changing the function a
network computes. Two networks trained from different seeds therefore land in different permutation copies
of their basins, and the straight line between them crosses a loss barrier that largely disappears once one
network's units are permuted to match the other's (Entezari, Sedghi, Saukh & Neyshabur 2022; Ainsworth,
Hayase & Srinivasa 2023, "Git Re-Basin"). The Bézier-surface paper (Anonymous, 2024, §4.1, Figure 3) finds linear
surfaces between independent networks poor and trains a nonlinear one instead; this module supplies the
alignment step that the paper's related work points to, so that *aligned* linear paths and surfaces can be
measured and used as the starting point of curve and surface training.

**The spec** (:class:`PermutationSpec`) says which axes of which leaves share a permutation, as data, in the
spirit of Git Re-Basin's permutation specs. Leaves are named by ``/``-joined paths with the collection
first (``"params/Dense_0/kernel"``, ``"batch_stats/stem_bn/mean"``); each maps to one entry per axis:

- ``None``: the axis is not permuted (input features, classes, kernel height and width);
- ``"P"``: the whole axis is permuted by group ``P`` (a layer's hidden units or channels);
- ``("A", "B", "C")``: the axis is the concatenation of groups ``A``, ``B``, ``C`` in that order, each
  permuted within its own block (a DenseNet's concatenated features; a ResNet's zero-padded option-A
  shortcut, whose stream after the padding is ``(pad_lo, previous stream, pad_hi)``);
- ``Axis(("P",), tiled=True)``: the axis is a flattened ``[..., P]`` (NHWC feature maps flattened before a
  dense layer: channels fastest), permuted identically in every spatial position.

A residual stream is one group shared by every layer that writes to or reads from it. BatchNorm statistics
are leaves like any other (``batch_stats/.../mean`` and ``.../var`` follow their channels). Group sizes come
from the leaves (an axis bound to one group alone) or from ``sizes``; axes that disagree raise a
``ValueError`` naming both leaves. Groups listed in ``odd`` may also flip signs (units with an odd activation
such as ``tanh``: ``(w_in, b, w_out) -> (-w_in, -b, -w_out)`` leaves the function unchanged).
:func:`permutation_spec` derives the spec of every zoo architecture (MLP, simple CNN, ConvFC, VGG16 with
and without BatchNorm, ResNet-18/20 with either shortcut, PreResNet-20/164, DenseNet-BC, ViT) from the
model's ``spec``.

**The algorithms** (one generic implementation for every spec):

- :func:`weight_matching` (Ainsworth et al. 2023, §3.2): maximise ``sum_l <W_l^ref, P_l W_l P_{l-1}^T>``
  over the groups' permutations by coordinate descent: for one group at a time, with the others fixed, the
  problem is a linear assignment (``scipy.optimize.linear_sum_assignment``) on the cost
  ``C_ij = sum over the group's axes of <unit i of the reference, unit j of the other>``; sweeps (in an order
  drawn from ``key``) repeat until no group improves. Equivalently it minimises ``|ref - P(other)|_2``;
  with sign flips the cost is ``|C_ij|`` and the sign ``sign(C_ij)``. For a single group (a one-hidden-layer
  MLP) the first sweep is exact.
- :func:`activation_matching` (Entezari et al. 2022; Ainsworth et al. 2023 §3.1): the cross-correlation of
  every layer output carrying a group (read by intercepting the Flax modules' calls) on data, summed over
  the layers that carry the group, solved by one assignment per group; groups no layer output carries alone
  (a ViT's attention heads) are then solved by weight matching with the others fixed.
- :func:`apply_permutation` permutes (and sign-flips) parameters and BatchNorm statistics; :func:`align`
  returns ``other`` permuted to match ``reference``; :func:`distance_modulo_permutation` is the distance
  between two networks once aligned (an upper bound on the distance modulo permutations for deep networks,
  exact for one hidden layer).

**Connecting after aligning.** The connectors need no change: align every corner to one reference, then
build::

    spec = permutation_spec(model)
    corners = [c0] + [align(model, c0, c, spec=spec) for c in (c1, c2, c3)]
    surface = bezier_surface(*corners)          # or bilinear_surface, simplex(corners), bezier_curve(c0, c1)

Aligning every corner to the *same* reference keeps them mutually consistent (the aligned copies all sit in
the reference's permutation frame); ``experiments/alignment.py`` measures what that does to linear paths,
bilinear surfaces and the epochs of surface training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = [
    "Axis",
    "PermutationSpec",
    "Permutation",
    "permutation_spec",
    "spec_sizes",
    "identity_permutation",
    "random_permutation",
    "apply_permutation",
    "weight_matching",
    "activation_matching",
    "align",
    "distance_modulo_permutation",
    "ODD_ACTIVATIONS",
    "METHODS",
]

ODD_ACTIVATIONS = ("tanh", "identity")  # zoo MLP activations f with f(-x) = -f(x)
METHODS = ("weight", "activation")


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
        if not perms or not all(isinstance(p, str) and p for p in perms):
            raise ValueError(f"an Axis needs one or more non-empty group names, got {self.perms!r}")
        if len(set(perms)) != len(perms):
            raise ValueError(f"an Axis lists a group twice: {perms}")
        object.__setattr__(self, "perms", perms)
        object.__setattr__(self, "tiled", bool(self.tiled))


def _as_axis(entry, where: str) -> Axis | None:
    if entry is None or isinstance(entry, Axis):
        return entry
    if isinstance(entry, str):
        return Axis((entry,))
    if isinstance(entry, Sequence) and entry and all(isinstance(e, str) for e in entry):
        return Axis(tuple(entry))
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

    def __post_init__(self):
        if not isinstance(self.axes, Mapping):
            raise ValueError(f"axes must map leaf paths to per-axis entries, got {type(self.axes).__name__}")
        axes = {}
        for path, entries in self.axes.items():
            if not isinstance(path, str) or not path or path.startswith("/") or path.endswith("/"):
                raise ValueError(f"a leaf path must be a non-empty '/'-joined string like 'params/Dense_0/kernel', "
                                 f"got {path!r}")
            if isinstance(entries, str | Axis) or not isinstance(entries, Sequence):
                raise ValueError(f"{path}: give one entry per axis as a tuple (e.g. (None, 'h')), got {entries!r}")
            axes[path] = tuple(_as_axis(e, f"axis {i} of {path}") for i, e in enumerate(entries))
        groups = tuple(dict.fromkeys(g for ax in axes.values() for a in ax if a is not None for g in a.perms))
        sizes = {}
        for g, n in dict(self.sizes).items():
            if g not in groups:
                raise ValueError(f"sizes names group {g!r}, which no axis of the spec uses (groups: {list(groups)})")
            if isinstance(n, bool) or int(n) != n or n < 1:
                raise ValueError(f"the size of group {g!r} must be a positive integer, got {n!r}")
            sizes[g] = int(n)
        odd = frozenset([self.odd] if isinstance(self.odd, str) else self.odd)
        unknown = sorted(odd - set(groups))
        if unknown:
            raise ValueError(f"odd names group(s) {unknown} that no axis of the spec uses (groups: {list(groups)})")
        object.__setattr__(self, "axes", axes)
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "odd", odd)
        object.__setattr__(self, "_groups", groups)

    @property
    def groups(self) -> tuple[str, ...]:
        """The permutation groups, in order of first appearance."""
        return self._groups

    def bindings(self, group: str) -> list[tuple[str, int, Axis]]:
        """``(leaf path, axis, Axis)`` of every axis the group permutes."""
        if group not in self._groups:
            raise ValueError(f"unknown group {group!r}; the spec has {list(self._groups)}")
        return [(p, i, a) for p, ax in self.axes.items() for i, a in enumerate(ax) if a is not None and group in a.perms]

    def __repr__(self) -> str:
        return (f"PermutationSpec({len(self.axes)} leaves, {len(self._groups)} groups"
                f"{', odd ' + str(sorted(self.odd)) if self.odd else ''})")


# ---------------------------------------------------------------------------------------------------------
# trees: params or full variables, leaves by path
# ---------------------------------------------------------------------------------------------------------


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _is_variables(tree) -> bool:
    return isinstance(tree, Mapping) and "params" in tree


@dataclasses.dataclass
class _Flat:
    """A params tree or a variables dict as ``{path: leaf}`` plus what rebuilds it."""

    leaves: dict[str, Any]
    treedef: Any
    is_variables: bool

    @classmethod
    def of(cls, tree, name: str) -> _Flat:
        if tree is None:
            raise ValueError(f"{name} is None: pass a params tree or a variables dict")
        is_vars = _is_variables(tree)
        root = dict(tree) if is_vars else {"params": tree}
        flat, treedef = jax.tree_util.tree_flatten_with_path(root)
        leaves = {"/".join(_key_name(k) for k in path): leaf for path, leaf in flat}
        if len(leaves) != len(flat):
            raise ValueError(f"{name} has leaves whose '/'-joined paths collide")
        return cls(leaves, treedef, is_vars)

    @property
    def collections(self) -> set[str]:
        return {p.split("/", 1)[0] for p in self.leaves}

    def rebuild(self, leaves: Mapping[str, Any]):
        root = self.treedef.unflatten([leaves[p] for p in self.leaves])
        return root if self.is_variables else root["params"]


def _check_cover(spec: PermutationSpec, flat: _Flat, name: str) -> None:
    missing = [p for p in flat.leaves if p not in spec.axes]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"the permutation spec has no entry for {missing[:5]}{more} of {name}: every leaf needs "
                         f"one (None for each axis that is not permuted), else the permutation would change the "
                         f"function")
    cols = flat.collections
    absent = [p for p in spec.axes if p not in flat.leaves and p.split("/", 1)[0] in cols]
    if absent:
        more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
        raise ValueError(f"the permutation spec names {absent[:5]}{more}, which {name} does not have (a spec for "
                         f"another architecture?)")
    for p, leaf in flat.leaves.items():
        nd = np.ndim(leaf)
        if len(spec.axes[p]) != nd:
            raise ValueError(f"the permutation spec gives {len(spec.axes[p])} axis entries for {p}, which has "
                             f"{nd} axes (shape {tuple(np.shape(leaf))})")


def _resolve_sizes(spec: PermutationSpec, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Group sizes from the leaves' shapes, checked against each other and against ``spec.sizes``."""
    sizes = dict(spec.sizes)
    source = {g: "PermutationSpec(sizes=...)" for g in sizes}
    bound = [(p, i, a) for p, ax in spec.axes.items() if p in shapes for i, a in enumerate(ax) if a is not None]
    for p, i, a in bound:
        if len(a.perms) == 1 and not a.tiled:
            g, n = a.perms[0], int(shapes[p][i])
            if g in sizes and sizes[g] != n:
                raise ValueError(f"axis sizes disagree for permutation group {g!r}: axis {i} of {p} has {n} units "
                                 f"but {source[g]} has {sizes[g]}")
            if g not in sizes:
                sizes[g], source[g] = n, f"axis {i} of {p}"
    changed = True
    while changed:  # a concatenation with exactly one unknown block gives that block's size
        changed = False
        for p, i, a in bound:
            unknown = [g for g in a.perms if g not in sizes]
            if len(unknown) == 1 and not a.tiled:
                rest = int(shapes[p][i]) - sum(sizes[g] for g in a.perms if g in sizes)
                if rest < 1:
                    known = {g: sizes[g] for g in a.perms if g in sizes}
                    raise ValueError(f"axis sizes disagree: axis {i} of {p} has {shapes[p][i]} units but its "
                                     f"blocks {known} already fill it, leaving none for group {unknown[0]!r}")
                sizes[unknown[0]], source[unknown[0]] = rest, f"axis {i} of {p} (the rest of its concatenation)"
                changed = True
    for p, i, a in bound:
        unknown = [g for g in a.perms if g not in sizes]
        if unknown:
            raise ValueError(f"cannot infer the size of group(s) {unknown} (axis {i} of {p} concatenates "
                             f"{list(a.perms)}): declare them in PermutationSpec(sizes=...)")
        total, n = sum(sizes[g] for g in a.perms), int(shapes[p][i])
        detail = ", ".join(f"{g}={sizes[g]} from {source[g]}" for g in a.perms)
        if not a.tiled and total != n:
            raise ValueError(f"axis sizes disagree: axis {i} of {p} has {n} units but its permutation groups add "
                             f"up to {total} ({detail})")
        if a.tiled and n % total:
            raise ValueError(f"axis sizes disagree: axis {i} of {p} has {n} entries, not a multiple of the "
                             f"{total} units of its tiled groups ({detail})")
    used = {g for _, _, a in bound for g in a.perms}
    return {g: sizes[g] for g in spec.groups if g in used}


def _validated(spec: PermutationSpec, tree, name: str) -> tuple[_Flat, dict[str, int]]:
    if not isinstance(spec, PermutationSpec):
        raise ValueError(f"spec must be a PermutationSpec (see permutation_spec), got {type(spec).__name__}")
    flat = _Flat.of(tree, name)
    _check_cover(spec, flat, name)
    return flat, _resolve_sizes(spec, {p: tuple(np.shape(v)) for p, v in flat.leaves.items()})


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
        idx = {str(g): np.asarray(v, dtype=np.int64).reshape(-1) for g, v in dict(self.indices).items()}
        object.__setattr__(self, "indices", idx)
        if self.signs is not None:
            sg = {str(g): np.where(np.asarray(v).reshape(-1) < 0, -1.0, 1.0) for g, v in dict(self.signs).items()}
            object.__setattr__(self, "signs", sg or None)

    def __getitem__(self, group: str) -> np.ndarray:
        return self.indices[group]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __eq__(self, other) -> bool:
        if isinstance(other, Permutation):
            return _eq(self.indices, other.indices) and _eq(self.signs, other.signs)
        if isinstance(other, Mapping):
            return self.signs is None and _eq(self.indices, other)
        return NotImplemented

    __hash__ = None

    def inverse(self) -> Permutation:
        """The permutation that undoes this one (``apply(inverse, apply(self, v)) == v``)."""
        inv = {g: np.argsort(p) for g, p in self.indices.items()}
        signs = None if self.signs is None else {g: s[inv[g]] for g, s in self.signs.items()}
        return Permutation(inv, signs)

    def is_identity(self) -> bool:
        """Whether no group moves and no sign flips."""
        same = all(np.array_equal(p, np.arange(p.size)) for p in self.indices.values())
        return same and (self.signs is None or all(np.all(s > 0) for s in self.signs.values()))

    def to_json(self) -> dict:
        d = {"indices": {g: p.tolist() for g, p in self.indices.items()}}
        if self.signs is not None:
            d["signs"] = {g: s.astype(int).tolist() for g, s in self.signs.items()}
        return d


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
    sizes = spec_sizes(spec, variables)
    if sign_flips and not spec.odd:
        raise ValueError(_NO_ODD)
    rng = _rng(key)
    idx, signs = {}, {}
    for g, n in sizes.items():
        idx[g] = rng.permutation(n)
        if sign_flips and g in spec.odd:
            signs[g] = rng.choice(np.array([-1.0, 1.0]), n)
    return Permutation(idx, signs if sign_flips else None)


_NO_ODD = ("sign_flips=True, but the spec declares no odd group: sign flips are a symmetry only of units with an odd "
           "activation (tanh); declare those groups with PermutationSpec(odd=...) (permutation_spec does for "
           "tanh MLPs)")


def _check_perm(spec: PermutationSpec, perm, sizes: Mapping[str, int]) -> tuple[dict, dict | None]:
    if not isinstance(perm, Mapping):
        raise ValueError(f"perm must be a Permutation or a mapping group -> indices, got {type(perm).__name__}")
    signs = perm.signs if isinstance(perm, Permutation) else None
    missing = [g for g in sizes if g not in perm]
    if missing:
        raise ValueError(f"perm has no entry for group(s) {missing} of the spec (use identity_permutation for a "
                         f"starting point)")
    extra = [g for g in perm if g not in sizes]
    if extra:
        raise ValueError(f"perm names group(s) {extra} that the spec does not have for these variables "
                         f"(groups: {list(sizes)})")
    idx = {}
    for g, n in sizes.items():
        p = np.asarray(perm[g])
        if p.shape != (n,) or not np.issubdtype(p.dtype, np.integer) or not np.array_equal(np.sort(p), np.arange(n)):
            raise ValueError(f"perm[{g!r}] must be a permutation of range({n}), got shape {p.shape} "
                             f"{p.tolist() if p.size <= 12 else ''}")
        idx[g] = p.astype(np.int64)
    if signs is not None:
        bad = [g for g in signs if g not in spec.odd]
        if bad:
            raise ValueError(f"sign flips of group(s) {bad} are not a symmetry: the spec does not declare them odd")
        for g, s in signs.items():
            if g in sizes and np.shape(s) != (sizes[g],):
                raise ValueError(f"signs[{g!r}] must have {sizes[g]} entries, got shape {np.shape(s)}")
        signs = {g: np.asarray(s, np.float64) for g, s in signs.items() if g in sizes} or None
    return idx, signs


def _axis_index(a: Axis, n: int, sizes, idx) -> np.ndarray:
    parts, off = [], 0
    for g in a.perms:
        parts.append(off + idx[g])
        off += sizes[g]
    out = np.concatenate(parts)
    if a.tiled:
        out = (np.arange(n // off)[:, None] * off + out[None, :]).reshape(-1)
    return out


def _axis_signs(a: Axis, n: int, sizes, signs) -> np.ndarray | None:
    if not signs or not any(g in signs for g in a.perms):
        return None
    s = np.concatenate([signs[g] if g in signs else np.ones(sizes[g]) for g in a.perms])
    return np.tile(s, n // s.size) if a.tiled else s


def _permute_leaf(x, entries, sizes, idx, signs, *, skip: int | None = None):
    """``x`` permuted along every bound axis but ``skip`` (on the host: one gather per axis, no compilation);
    a jax array comes back as a jax array of the same dtype."""
    if all(a is None for i, a in enumerate(entries) if i != skip):
        return x
    is_jax = isinstance(x, jax.Array)
    y = np.asarray(x)
    for i, a in enumerate(entries):
        if a is None or i == skip:
            continue
        n = y.shape[i]
        y = np.take(y, _axis_index(a, n, sizes, idx), axis=i)
        s = _axis_signs(a, n, sizes, signs)
        if s is not None:
            shape = [1] * y.ndim
            shape[i] = n
            y = y * s.reshape(shape).astype(y.dtype)
    return jnp.asarray(y) if is_jax else y


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
    out = {p: _permute_leaf(x, spec.axes[p], sizes, idx, signs) for p, x in flat.leaves.items()}
    return flat.rebuild(out)


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
    def host(v):
        v = np.asarray(v)
        return v if v.dtype == np.float64 else v.astype(np.float32)

    return {p: host(v) for p, v in flat.leaves.items() if p.startswith("params/")}


def _rng(key) -> np.random.Generator:
    """NumPy's generator seeded by a JAX PRNG key's data (explicit keys, no XLA computation to compile)."""
    if isinstance(key, int | np.integer) or not hasattr(key, "dtype"):
        raise ValueError(f"key must be a jax PRNG key (jax.random.key(seed)), got {key!r}")
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return np.random.default_rng(np.asarray(data, np.uint64).ravel().tolist())


def _solve(cost: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost, maximize=True)
    out = np.empty(cost.shape[0], np.int64)
    out[rows] = cols
    return out


def _coordinate_descent(spec, ref, oth, sizes, idx, signs, *, free, flip, max_iter, key):
    """Git Re-Basin's coordinate descent over the ``free`` groups (the others stay at ``idx``)."""
    bindings = {g: [(p, i, a) for p, i, a in spec.bindings(g) if p in ref] for g in free}
    order = [g for g in spec.groups if g in free and bindings[g]]
    if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not order:
        return 0, True
    rng = None if key is None else _rng(key)
    ref_blocks = {(p, i, g): _block(ref[p], i, a, g, sizes) for g in order for p, i, a in bindings[g]}
    sweeps, converged = 0, False
    while sweeps < int(max_iter):
        sweeps += 1
        seq = order if rng is None else [order[j] for j in rng.permutation(len(order))]
        progress = False
        for g in seq:
            n = sizes[g]
            cost = np.zeros((n, n))
            for p, i, a in bindings[g]:
                b = _permute_leaf(oth[p], spec.axes[p], sizes, idx, signs, skip=i)
                cost += (ref_blocks[p, i, g] @ _block(b, i, a, g, sizes).T).astype(np.float64)
            rows = np.arange(n)
            gain = np.abs(cost) if g in flip else cost
            new_idx = _solve(gain)
            old = float(np.sum((signs[g] if g in flip else 1.0) * cost[rows, idx[g]]))
            new = float(np.sum(gain[rows, new_idx]))
            if new > old + 1e-12 * max(1.0, abs(old)):
                idx[g] = new_idx
                if g in flip:
                    signs[g] = np.where(cost[rows, new_idx] < 0, -1.0, 1.0)
                progress = True
        if not progress:
            converged = True
            break
    return sweeps, converged


def weight_matching(spec: PermutationSpec, reference_params: PyTree, params: PyTree, *, max_iter: int = 100,
                    key: jax.Array | None = None, sign_flips: bool = False,
                    init: Permutation | Mapping[str, Any] | None = None) -> Permutation:
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
      init: the starting permutation (default the identity).

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
    ref_flat, sizes = _validated(spec, reference_params, "reference_params")
    oth_flat, sizes_b = _validated(spec, params, "params")
    if sizes != sizes_b:
        diff = {g: (sizes[g], sizes_b.get(g)) for g in sizes if sizes[g] != sizes_b.get(g)}
        raise ValueError(f"the two networks differ in group sizes (reference, params): {diff}")
    ref, oth = _params_leaves(ref_flat), _params_leaves(oth_flat)
    for p in ref:
        if ref[p].shape != oth[p].shape:
            raise ValueError(f"{p} has shape {ref[p].shape} in reference_params but {oth[p].shape} in params")
    if sign_flips and not spec.odd:
        raise ValueError(_NO_ODD)
    flip = set(spec.odd) if sign_flips else set()
    if init is None:
        idx, signs = {g: np.arange(n) for g, n in sizes.items()}, None
    else:
        idx, signs = _check_perm(spec, init, sizes)
    signs = dict(signs or {})
    for g in flip:
        if g in sizes:
            signs.setdefault(g, np.ones(sizes[g]))
    it, conv = _coordinate_descent(spec, ref, oth, sizes, idx, signs, free=set(sizes), flip=flip,
                                   max_iter=max_iter, key=key)
    return Permutation(idx, signs or None, iterations=it, converged=conv)


# ---------------------------------------------------------------------------------------------------------
# activation matching (Entezari et al. 2022; Ainsworth et al. 2023, §3.1)
# ---------------------------------------------------------------------------------------------------------


def _carriers(spec: PermutationSpec) -> dict[str, Axis]:
    """Module path -> the groups along its output's last axis: a module whose ``kernel`` (else ``scale``, else
    ``bias``) has a permuted, untiled last axis outputs those units last (Dense, Conv, DenseGeneral,
    BatchNorm, LayerNorm)."""
    out: dict[str, tuple[int, Axis]] = {}
    rank = {"kernel": 0, "scale": 1, "bias": 2}
    for p, entries in spec.axes.items():
        col, _, rest = p.partition("/")
        module, _, leaf = rest.rpartition("/")
        if col != "params" or leaf not in rank or not entries or entries[-1] is None or entries[-1].tiled:
            continue
        if module not in out or rank[leaf] < out[module][0]:
            out[module] = (rank[leaf], entries[-1])
    return {m: a for m, (_, a) in out.items()}


def _as_model_variables(model, tree, name: str) -> dict:
    if _is_variables(tree):
        return dict(tree)
    if getattr(model, "has_batch_stats", False):
        raise ValueError(f"{name}: model {model.name} has BatchNorm, so activation matching needs its full "
                         f"variables (params and batch_stats), not params alone")
    return {"params": tree}


def _inputs(data) -> np.ndarray:
    if hasattr(data, "x"):
        return np.asarray(data.x)
    if isinstance(data, tuple | list) and len(data) == 2:
        return np.asarray(data[0])
    if isinstance(data, np.ndarray | jax.Array):
        return np.asarray(data)
    raise ValueError("data must be a Dataset, an (x, y) tuple or an array of inputs")


def _capture_fn(model, wanted: frozenset[str]) -> Callable:
    import flax.linen as nn

    def fn(variables, x):
        store = {}

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__":
                path = "/".join(str(s) for s in context.module.path)
                if path in wanted and isinstance(out, jax.Array):
                    store[path] = out
            return out

        with nn.intercept_methods(interceptor):
            model.apply(variables, x)
        return store

    return jax.jit(fn)


def activation_matching(model, spec: PermutationSpec, reference: PyTree, other: PyTree, data, *,
                        batch_size: int = 256, num_examples: int | None = None, sign_flips: bool = False,
                        fill: str = "weight", key: jax.Array | None = None, max_iter: int = 100) -> Permutation:
    """The permutation of ``other`` whose hidden activations best correlate with ``reference``'s on ``data``
    (Entezari et al. 2022; Ainsworth, Hayase & Srinivasa 2023 §3.1).

    Every layer whose output carries a group on its last axis (a ``Dense``/``Conv`` kernel, a norm's
    ``scale`` bound there by the spec) is read while the model runs in evaluation mode, by intercepting the
    Flax modules' calls; for each group the Pearson correlations ``corr(a_i^ref, a_j^other)`` over examples
    and positions are summed over its layers (and blocks of concatenations), and one linear assignment per
    group maximises the total. Groups that no layer output carries (a ViT's attention-head axis) are solved
    afterwards by :func:`weight_matching` with the others fixed (``fill="weight"``) or left alone
    (``fill="identity"``).

    Args:
      model: the :class:`~mclandscape.engine.models.Model` (a Flax model: its layers are intercepted).
      spec: its :class:`PermutationSpec`.
      reference, other: variables (or params, for a model without BatchNorm).
      data: a Dataset, an ``(x, y)`` tuple or an input array; the first ``num_examples`` (default all).
      batch_size: examples per forward pass.
      sign_flips: for the spec's odd groups, match ``|corr|`` and flip the sign of negatively correlated units.
      fill, key, max_iter: the weight-matching step for uncarried groups.

    Returns:
      A :class:`Permutation`.
    """
    if fill not in ("weight", "identity"):
        raise ValueError(f"fill must be 'weight' or 'identity', got {fill!r}")
    ref_vars = _as_model_variables(model, reference, "reference")
    oth_vars = _as_model_variables(model, other, "other")
    ref_flat, sizes = _validated(spec, ref_vars, "reference")
    oth_flat, sizes_b = _validated(spec, oth_vars, "other")
    if sizes != sizes_b:
        raise ValueError(f"the two networks differ in group sizes: {sizes} vs {sizes_b}")
    if sign_flips and not spec.odd:
        raise ValueError(_NO_ODD)
    x = _inputs(data)
    if num_examples is not None:
        x = x[:int(num_examples)]
    if len(x) == 0:
        raise ValueError("activation matching needs at least one example")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    carriers = _carriers(spec)
    fn = _capture_fn(model, frozenset(carriers))
    moments: dict[str, list] = {}
    for s in range(0, len(x), int(batch_size)):
        xb = jnp.asarray(x[s:s + int(batch_size)])
        ra, rb = fn(ref_vars, xb), fn(oth_vars, xb)
        for m in ra.keys() & rb.keys():
            a = np.asarray(ra[m], np.float64)
            a = a.reshape(-1, a.shape[-1])
            b = np.asarray(rb[m], np.float64).reshape(-1, a.shape[-1])
            acc = moments.setdefault(m, [0, 0.0, 0.0, 0.0, 0.0, 0.0])
            acc[0] += a.shape[0]
            acc[1] = acc[1] + a.sum(0)
            acc[2] = acc[2] + b.sum(0)
            acc[3] = acc[3] + (a * a).sum(0)
            acc[4] = acc[4] + (b * b).sum(0)
            acc[5] = acc[5] + a.T @ b
    if not moments:
        raise ValueError(f"no layer output was captured from model {getattr(model, 'name', model)!r}: activation "
                         f"matching intercepts Flax modules named like the spec's leaves (use method='weight' "
                         f"for other models)")
    cost = {g: np.zeros((n, n)) for g, n in sizes.items()}
    carried = set()
    for m, (cnt, sa, sb, saa, sbb, sab) in moments.items():
        ax = carriers[m]
        if sa.shape[0] != sum(sizes[g] for g in ax.perms):
            raise ValueError(f"the output of {m} has {sa.shape[0]} units on its last axis but the spec binds "
                             f"{list(ax.perms)} there")
        ma, mb = sa / cnt, sb / cnt
        sda = np.sqrt(np.maximum(saa / cnt - ma**2, 0.0))
        sdb = np.sqrt(np.maximum(sbb / cnt - mb**2, 0.0))
        corr = (sab / cnt - np.outer(ma, mb)) / (np.outer(sda, sdb) + 1e-12)
        off = 0
        for g in ax.perms:
            n = sizes[g]
            cost[g] += corr[off:off + n, off:off + n]
            carried.add(g)
            off += n
    flip = set(spec.odd) if sign_flips else set()
    idx = {g: np.arange(n) for g, n in sizes.items()}
    signs = {g: np.ones(sizes[g]) for g in flip if g in sizes}
    for g in carried:
        gain = np.abs(cost[g]) if g in flip else cost[g]
        idx[g] = _solve(gain)
        if g in flip:
            signs[g] = np.where(cost[g][np.arange(sizes[g]), idx[g]] < 0, -1.0, 1.0)
    rest = set(sizes) - carried
    it, conv = 0, True
    if rest and fill == "weight":
        it, conv = _coordinate_descent(spec, _params_leaves(ref_flat), _params_leaves(oth_flat), sizes, idx, signs,
                                       free=rest, flip=flip, max_iter=max_iter, key=key)
    return Permutation(idx, signs or None, iterations=it, converged=conv)


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
        >>> model = get_model("mlp", widths=[8], num_classes=3)
        >>> a = model.init(jax.random.key(0), jnp.zeros((1, 4)))
        >>> spec = permutation_spec(model)
        >>> b = apply_permutation(spec, random_permutation(spec, a, jax.random.key(1)), a)
        >>> bool(jnp.allclose(align(model, a, b)["params"]["Dense_0"]["kernel"], a["params"]["Dense_0"]["kernel"]))
        True
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    spec = permutation_spec(model) if spec is None else spec
    if method == "weight":
        perm = weight_matching(spec, reference, other, max_iter=max_iter, key=key, sign_flips=sign_flips)
    else:
        if data is None:
            raise ValueError("method='activation' needs data (inputs on which to correlate the activations)")
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


# ---------------------------------------------------------------------------------------------------------
# specs of the zoo architectures
# ---------------------------------------------------------------------------------------------------------


class _Builder:
    """Collects the per-leaf entries of a spec layer by layer (the zoo's layer types)."""

    def __init__(self):
        self.axes: dict[str, tuple] = {}
        self.sizes: dict[str, int] = {}
        self.odd: set[str] = set()

    def group(self, name: str, size: int) -> str:
        self.sizes[name] = int(size)
        return name

    def leaf(self, path: str, *entries):
        self.axes[f"params/{path}"] = tuple(entries)

    def dense(self, name: str, p_in, p_out, bias: bool = True):
        self.leaf(f"{name}/kernel", p_in, p_out)
        if bias:
            self.leaf(f"{name}/bias", p_out)

    def conv(self, name: str, p_in, p_out, bias: bool = True):
        self.leaf(f"{name}/kernel", None, None, p_in, p_out)
        if bias:
            self.leaf(f"{name}/bias", p_out)

    def norm(self, name: str, p, stats: bool = True):
        self.leaf(f"{name}/scale", p)
        self.leaf(f"{name}/bias", p)
        if stats:
            self.axes[f"batch_stats/{name}/mean"] = (p,)
            self.axes[f"batch_stats/{name}/var"] = (p,)

    def spec(self) -> PermutationSpec:
        return PermutationSpec(self.axes, self.sizes, frozenset(self.odd))


def _mlp(b: _Builder, widths, use_bias, activation, **_):
    prev = None
    for i, w in enumerate(widths):
        g = b.group(f"Dense_{i}", w)
        b.dense(f"Dense_{i}", prev, g, use_bias)
        if activation in ODD_ACTIVATIONS:
            b.odd.add(g)
        prev = g
    b.dense(f"Dense_{len(widths)}", prev, None, use_bias)


def _convnet(b: _Builder, channels, hidden):
    """simple_cnn / convfc: conv layers ``stem``, ``conv1``, ..., then flatten (tiled) and dense layers."""
    prev = None
    for i, c in enumerate(channels):
        name = "stem" if i == 0 else f"conv{i}"
        g = b.group(name, c)
        b.conv(name, prev, g)
        prev = g
    prev = Axis((prev,), tiled=True) if prev is not None else None
    for name, h in hidden:
        g = b.group(name, h)
        b.dense(name, prev, g)
        prev = g
    b.dense("head", prev, None)


def _vgg(b: _Builder, batch_norm, width):
    from mclandscape.engine.models.vgg import VGG16_CFG

    prev, i = None, 0
    for v in VGG16_CFG:
        if v == "M":
            continue
        name = "stem" if i == 0 else f"conv{i}"
        g = b.group(name, v)
        b.conv(name, prev, g)
        if batch_norm:
            b.norm(f"{name}_bn", g)
        prev, i = g, i + 1
    prev = Axis((prev,), tiled=True)
    for j in range(2):
        g = b.group(f"fc{j}", width)
        b.dense(f"fc{j}", prev, g)
        prev = g
    b.dense("head", prev, None)


def _resnet(b: _Builder, stage_sizes, widths, *, preact=False, shortcut="B", bottleneck=False):
    """The zoo's ResNet (:class:`mclandscape.engine.models.resnet.ResNet`): one group per residual stream (the
    stem's, then a new one wherever a block changes the shape through a projection shortcut); option-A
    shortcuts extend the stream by two zero-padding blocks instead."""
    stream = (b.group("stem", widths[0]),)
    ch = int(widths[0])
    b.conv("stem", None, stream, False)
    if not preact:
        b.norm("stem_bn", stream)
    for s, (n_blocks, w) in enumerate(zip(stage_sizes, widths, strict=True)):
        for blk in range(int(n_blocks)):
            stride = 2 if (s > 0 and blk == 0) else 1
            name = f"stage{s}_block{blk}"
            out_ch = 4 * int(w) if bottleneck else int(w)
            new = stream
            if stride != 1 or ch != out_ch:
                if shortcut == "A" and not preact and not bottleneck:
                    extra = out_ch - ch
                    lo = (b.group(f"{name}/pad_lo", extra // 2),) if extra // 2 else ()
                    hi = (b.group(f"{name}/pad_hi", extra - extra // 2),) if extra - extra // 2 else ()
                    new = lo + stream + hi
                else:
                    new = (b.group(f"{name}/stream", out_ch),)
            c1 = b.group(f"{name}/conv1", w)
            if bottleneck:
                c2 = b.group(f"{name}/conv2", w)
                b.norm(f"{name}/bn1", stream)
                b.conv(f"{name}/conv1", stream, c1, False)
                b.norm(f"{name}/bn2", c1)
                b.conv(f"{name}/conv2", c1, c2, False)
                b.norm(f"{name}/bn3", c2)
                b.conv(f"{name}/conv3", c2, new, False)
            elif preact:
                b.norm(f"{name}/bn1", stream)
                b.conv(f"{name}/conv1", stream, c1, False)
                b.norm(f"{name}/bn2", c1)
                b.conv(f"{name}/conv2", c1, new, False)
            else:
                b.conv(f"{name}/conv1", stream, c1, False)
                b.norm(f"{name}/bn1", c1)
                b.conv(f"{name}/conv2", c1, new, False)
                b.norm(f"{name}/bn2", new)
            if new != stream and not (shortcut == "A" and not preact and not bottleneck):
                b.conv(f"{name}/shortcut_conv", stream, new, False)
                if not preact:
                    b.norm(f"{name}/shortcut_bn", new)
            stream, ch = new, out_ch
    if preact:
        b.norm("final_bn", stream)
    b.dense("head", stream, None)


def _densenet(b: _Builder, depth, growth_rate, compression, **_):
    from mclandscape.engine.models.densenet import densenet_layers, transition_channels

    layers = densenet_layers(depth)
    k = int(growth_rate)
    segs = (b.group("stem", 2 * k),)
    b.conv("stem", None, segs, False)
    for blk in range(3):
        for i in range(layers):
            name = f"block{blk}_layer{i}"
            mid, new = b.group(f"{name}/conv1", 4 * k), b.group(f"{name}/conv2", k)
            b.norm(f"{name}/bn1", segs)
            b.conv(f"{name}/conv1", segs, mid, False)
            b.norm(f"{name}/bn2", mid)
            b.conv(f"{name}/conv2", mid, new, False)
            segs = segs + (new,)
        if blk < 2:
            t = f"transition{blk}"
            out = b.group(t, transition_channels(sum(b.sizes[g] for g in segs), compression))
            b.norm(f"{t}/bn", segs)
            b.conv(f"{t}/conv", segs, out, False)
            segs = (out,)
    b.norm("final_bn", segs)
    b.dense("head", segs, None)


def _vit(b: _Builder, dim, depth, heads, mlp_dim, **_):
    s = b.group("stream", dim)
    b.conv("stem", None, s)
    b.leaf("cls_token", None, None, s)
    b.leaf("pos_embedding", None, None, s)
    if dim % heads:
        raise ValueError(f"ViT dim {dim} is not divisible by heads {heads}")
    for i in range(int(depth)):
        name = f"block{i}"
        h = b.group(f"{name}/heads", heads)
        qk, v = b.group(f"{name}/qk", dim // heads), b.group(f"{name}/v", dim // heads)
        m = b.group(f"{name}/mlp", mlp_dim)
        b.norm(f"{name}/ln1", s, stats=False)
        for proj, g in (("query", qk), ("key", qk), ("value", v)):
            b.leaf(f"{name}/attn/{proj}/kernel", s, h, g)
            b.leaf(f"{name}/attn/{proj}/bias", h, g)
        b.leaf(f"{name}/attn/out/kernel", h, v, s)
        b.leaf(f"{name}/attn/out/bias", s)
        b.norm(f"{name}/ln2", s, stats=False)
        b.dense(f"{name}/mlp1", s, m)
        b.dense(f"{name}/mlp2", m, s)
    b.norm("ln_final", s, stats=False)
    b.dense("head", s, None)


def _zoo_spec(arch: str, kw: Mapping) -> PermutationSpec:
    b = _Builder()
    if arch == "mlp":
        _mlp(b, [int(w) for w in kw["widths"]], kw["use_bias"], kw["activation"])
    elif arch == "simple_cnn":
        _convnet(b, [int(c) for c in kw["channels"]], [("fc", int(kw["hidden"]))])
    elif arch == "convfc":
        _convnet(b, [int(c) for c in kw["channels"]], [(f"fc{i}", int(h)) for i, h in enumerate(kw["hidden"])])
    elif arch in ("vgg16", "vgg16_bn"):
        _vgg(b, arch == "vgg16_bn", int(kw["width"]))
    elif arch == "resnet18":
        _resnet(b, (2, 2, 2, 2), (64, 128, 256, 512), shortcut="B")
    elif arch == "resnet20":
        _resnet(b, (3, 3, 3), (16, 32, 64), shortcut=kw["shortcut"])
    elif arch == "preresnet20":
        _resnet(b, (3, 3, 3), (16, 32, 64), preact=True)
    elif arch == "preresnet164":
        from mclandscape.engine.models.resnet import preresnet_bottleneck_blocks

        n = preresnet_bottleneck_blocks(kw["depth"])
        _resnet(b, (n, n, n), (16, 32, 64), preact=True, bottleneck=True)
    elif arch == "densenet100":
        _densenet(b, **kw)
    elif arch == "vit_small":
        _vit(b, **kw)
    else:  # a registry entry without a spec here
        raise ValueError(f"no permutation spec for architecture {arch!r}; declare one with PermutationSpec(...)")
    return b.spec()


def permutation_spec(model) -> PermutationSpec:
    """The :class:`PermutationSpec` of a zoo model, derived from ``model.spec`` (its architecture and
    constructor arguments): every hidden unit and channel, residual streams shared, BatchNorm statistics
    with their channels. Supported: ``mlp`` (hidden groups odd for ``tanh`` / ``identity``), ``simple_cnn``,
    ``convfc``, ``vgg16``, ``vgg16_bn``, ``resnet18``, ``resnet20`` (option-A shortcuts: zero-padding blocks
    around the previous stream; option B: projections), ``preresnet20``, ``preresnet164``, ``densenet100``
    (concatenated features as blocks) and ``vit_small`` (the residual stream, the heads, the query/key and
    value head dimensions, the MLP units).

    Args:
      model: a :class:`~mclandscape.engine.models.Model` from the zoo, or its ``spec`` dict.

    Returns:
      The spec; for other models declare one with :class:`PermutationSpec`.

    Example:
        >>> from mclandscape.engine.models import get_model
        >>> spec = permutation_spec(get_model("mlp", widths=[64, 64]))
        >>> spec.groups, spec.axes["params/Dense_1/kernel"]
        (('Dense_0', 'Dense_1'), (Axis(perms=('Dense_0',), tiled=False), Axis(perms=('Dense_1',), tiled=False)))
    """
    from mclandscape.engine.models import canonical_name, get_model

    spec = getattr(model, "spec", model)
    if not isinstance(spec, Mapping) or "arch" not in spec:
        raise ValueError(f"permutation_spec needs a zoo Model (or its spec dict), got {type(model).__name__}; "
                         f"declare a PermutationSpec for other models")
    try:
        arch = canonical_name(spec["arch"])
    except ValueError as e:
        raise ValueError(f"no permutation spec for model {spec['arch']!r} (not a zoo architecture); declare one "
                         f"with PermutationSpec(...)") from e
    full = get_model(arch, **dict(spec.get("kwargs", {}))).spec  # every argument, defaults filled in
    return _zoo_spec(arch, full["kwargs"])
