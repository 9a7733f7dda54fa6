"""Flax NNX modules as pure :class:`~mclandscape.engine.models.base.Model` bundles (:func:`from_nnx`).

An NNX module is a stateful Python object; the library only moves variable pytrees. :func:`from_nnx` takes a
factory ``factory(rngs: nnx.Rngs) -> nnx.Module``, builds the module once abstractly (``nnx.eval_shape``,
no computation) and splits it (``nnx.split``) into a static graph definition and its state:

- ``nnx.Param`` variables become the ``"params"`` collection (what every method trains and interpolates);
- ``nnx.BatchStat`` variables (``nnx.BatchNorm``'s running mean and variance) become ``"batch_stats"``,
  so BatchNorm models get ``apply_with_stats`` and the evaluator recomputes their statistics at every
  point of a curve or surface exactly as for a linen model;
- RNG state (``nnx.RngKey`` / ``nnx.RngCount`` of the streams ``nnx.Dropout`` forks at construction) is
  never a variable: ``apply`` rebuilds it from the ``rngs={"dropout": key}`` it is given, so dropout masks
  are a pure function of that key.

Both collections are plain nested dicts with string keys (an ``nnx.List`` index ``0`` becomes ``"0"``), the
form checkpoints restore. ``apply`` merges the module from the variables inside the call (``nnx.merge``),
sets train or eval mode on the fresh copy (``deterministic`` / ``use_running_average``, as
``Module.train()`` / ``Module.eval()`` do) and calls it: nothing is mutated outside the call, so it works
under ``jit``, ``vmap`` and ``grad`` like a linen model's ``apply``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from mclandscape.core.tree import TreeMismatchError, check_same_structure
from mclandscape.engine.models.base import Model, value_hash

__all__ = ["from_nnx"]

Path = tuple[Any, ...]


def _str_path(path: Path) -> tuple[str, ...]:
    return tuple(str(k) for k in path)


def _build(factory: Callable[[nnx.Rngs], nnx.Module], key) -> nnx.Module:
    # separate streams so factories may draw from rngs.params / rngs.dropout or from the default stream
    k_default, k_params, k_dropout = jax.random.split(key, 3)
    module = factory(nnx.Rngs(k_default, params=k_params, dropout=k_dropout))
    if not isinstance(module, nnx.Module):
        raise TypeError(f"the factory must return an nnx.Module, got {type(module).__name__}")
    return module


class _Layout:
    """Where each NNX variable of a module lives in the library's collections (fixed at wrap time)."""

    def __init__(self, abstract: nnx.Module, name: str):
        self.name = name
        self.graphdef, params, stats, rng, other = nnx.split(abstract, nnx.Param, nnx.BatchStat, nnx.RngState, ...)
        leftovers = list(nnx.to_flat_state(other))
        if leftovers:
            path, var = leftovers[0]
            raise ValueError(f"NNX module {name!r} holds a {type(var).__name__} variable at "
                             f"{'/'.join(_str_path(path))} ({len(leftovers)} such); from_nnx supports nnx.Param, "
                             "nnx.BatchStat and RNG state only")
        self.params = self._paths(params, "params")
        self.stats = self._paths(stats, "batch_stats")
        if not self.params:
            raise ValueError(f"NNX module {name!r} has no nnx.Param variables")
        # (path, is_key, shape) of every RNG variable, in the fixed sorted order of the flat state
        self.rng = [(path, isinstance(var, nnx.RngKey), tuple(var.get_value().shape))
                    for path, var in nnx.to_flat_state(rng)]
        self.abstract = {"params": self._abstract(params)}
        if self.stats:
            self.abstract["batch_stats"] = self._abstract(stats)

    def _paths(self, state, collection: str) -> dict[tuple[str, ...], Path]:
        out: dict[tuple[str, ...], Path] = {}
        for path, _ in nnx.to_flat_state(state):
            key = _str_path(path)
            if key in out:
                raise ValueError(f"NNX module {self.name!r}: two {collection} variables share the path "
                                 f"{'/'.join(key)} once keys are strings")
            out[key] = path
        return out

    @staticmethod
    def _abstract(state) -> dict:
        flat = {_str_path(p): jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype)
                for p, v in nnx.to_flat_state(state)}
        return traverse_util.unflatten_dict(flat)

    def to_tree(self, state, collection: str) -> dict:
        """The library's nested dict (string keys) of an NNX state."""
        flat = {_str_path(p): v.get_value() for p, v in nnx.to_flat_state(state)}
        expected = self.params if collection == "params" else self.stats
        if set(flat) != set(expected):
            raise ValueError(f"the factory of NNX module {self.name!r} built a module whose {collection} differ "
                             "from its first build (it must build the same architecture for every key)")
        return traverse_util.unflatten_dict(flat)

    def to_nnx(self, tree, collection: str) -> dict:
        """An NNX pure dict (original integer keys) of the library's nested dict ``tree``."""
        paths = self.params if collection == "params" else self.stats
        try:
            check_same_structure(self.abstract[collection], _as_dict(tree), check_dtype=False,
                                 names=("the module", "the variables"))
        except TreeMismatchError as e:
            raise TreeMismatchError(f"{collection} do not fit NNX module {self.name!r}: {e}") from None
        flat = traverse_util.flatten_dict(_as_dict(tree))
        return traverse_util.unflatten_dict({paths[k]: v for k, v in flat.items()})

    def rng_state(self, key) -> dict:
        """The RNG variables as a pure dict: every stream's key derived from ``key`` (or a fixed key when
        ``None``: eval mode draws nothing), counts at zero."""
        if key is None:
            key = jax.random.key(0)
        elif not jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
        flat = {}
        for i, (path, is_key, shape) in enumerate(self.rng):
            if is_key:
                k = jax.random.fold_in(key, i)
                flat[path] = jax.random.split(k, shape) if shape else k
            else:
                flat[path] = jnp.zeros(shape, jnp.uint32)
        return traverse_util.unflatten_dict(flat) if flat else {}


def _as_dict(tree):
    """Nested plain dicts of a mapping tree (FrozenDicts and other mappings included)."""
    if isinstance(tree, Mapping):
        return {k: _as_dict(v) for k, v in tree.items()}
    return tree


def _collection(variables, name: str, model_name: str):
    if not isinstance(variables, Mapping):
        raise TypeError(f"variables of {model_name!r} must be a dict of collections, got {type(variables).__name__}")
    if name not in variables:
        raise ValueError(f"variables of {model_name!r} have no {name!r} collection (got {sorted(variables)})")
    return variables[name]


def _dropout_key(rngs, model_name: str):
    if rngs is None:
        return None
    if not isinstance(rngs, Mapping):
        raise TypeError(f"rngs of {model_name!r} must be a dict like {{'dropout': key}}, got {type(rngs).__name__}")
    return rngs.get("dropout")


def _factory_value(factory):
    """What a factory is equal by: a ``functools.partial`` by its function and arguments, anything else (a
    module class, a function) by itself."""
    if isinstance(factory, functools.partial):
        return (_factory_value(factory.func), factory.args, tuple(sorted(factory.keywords.items())))
    return factory


@dataclasses.dataclass(frozen=True, eq=False)
class _Nnx:
    """The base of an NNX module's three functions: equal and hashed by the factory's value (its class, or a
    ``functools.partial``'s function and arguments) and the name; the layout follows from them."""

    factory: Callable[[nnx.Rngs], nnx.Module]
    name: str
    layout: _Layout = dataclasses.field(repr=False)

    def __eq__(self, other) -> bool:
        return (type(other) is type(self) and self.name == other.name
                and _factory_value(self.factory) == _factory_value(other.factory))

    def __hash__(self) -> int:
        return hash((type(self), self.name, value_hash(_factory_value(self.factory))))

    def merged(self, variables, key) -> nnx.Module:
        layout = self.layout
        states = [layout.to_nnx(_collection(variables, "params", self.name), "params")]
        if layout.stats:
            states.append(layout.to_nnx(_collection(variables, "batch_stats", self.name), "batch_stats"))
        if layout.rng:
            states.append(layout.rng_state(key))
        return nnx.merge(layout.graphdef, *states)

    @staticmethod
    def set_mode(module, train: bool, key) -> None:
        # what Module.train() / Module.eval() set, with dropout also off in train mode when no key is given
        module.set_attributes(deterministic=not (train and key is not None), use_running_average=not train,
                              raise_if_not_found=False)


@dataclasses.dataclass(frozen=True, eq=False)
class _NnxInit(_Nnx):
    def __call__(self, key, x=None):
        module = _build(self.factory, key)
        _, params, stats, _ = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
        variables = {"params": self.layout.to_tree(params, "params")}
        if self.layout.stats:
            variables["batch_stats"] = self.layout.to_tree(stats, "batch_stats")
        return variables


@dataclasses.dataclass(frozen=True, eq=False)
class _NnxApply(_Nnx):
    def __call__(self, variables, x, train: bool = False, rngs=None):
        key = _dropout_key(rngs, self.name) if train else None
        module = self.merged(variables, key)
        self.set_mode(module, bool(train), key)
        return module(x)


@dataclasses.dataclass(frozen=True, eq=False)
class _NnxApplyWithStats(_Nnx):
    def __call__(self, variables, x, rngs=None):
        key = _dropout_key(rngs, self.name)
        module = self.merged(variables, key)
        self.set_mode(module, True, key)
        out = module(x)
        return out, self.layout.to_tree(nnx.state(module, nnx.BatchStat), "batch_stats")


def from_nnx(factory: Callable[[nnx.Rngs], nnx.Module], name: str | None = None,
             spec: dict | None = None) -> Model:
    """Wrap a Flax NNX module, given by its factory, into a :class:`Model`.

    ``init(key, x)`` builds ``factory(nnx.Rngs(...))`` with streams ``default``, ``params`` and ``dropout``
    split from ``key`` and returns ``{"params": ..., ["batch_stats": ...]}`` (``x`` is unused: an NNX
    module's shapes are fixed by its constructor). ``apply(variables, x, train=False, rngs=None)`` calls the
    module on ``x`` in eval mode, or in train mode (BatchNorm on batch statistics; dropout drawn from
    ``rngs["dropout"]``, off when no key is given). ``apply_with_stats`` (BatchNorm modules only) is train
    mode returning the updated running statistics. Dropout layers must be built with ``rngs=`` (as
    ``nnx.Dropout(rate, rngs=rngs)``) and the module is called as ``module(x)``.

    Args:
      factory: ``factory(rngs: nnx.Rngs) -> nnx.Module`` (e.g. the module class itself when its constructor
        takes ``rngs``, or ``functools.partial(Class, width=8)``); it must build the same architecture for
        every key. Models of the same class, or of partials with equal function and arguments, are equal
        (they share compiled code); a lambda is equal only to itself.
      name: the model's name (default: the module's class name).
      spec: the JSON-serialisable spec checkpoints record (default ``{"arch": name}``).

    Returns:
      A :class:`Model` whose ``params`` are the module's ``nnx.Param`` variables and whose ``batch_stats``
      are its ``nnx.BatchStat`` variables.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> class Net(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.fc = nnx.Linear(5, 4, rngs=rngs)
        ...         self.bn = nnx.BatchNorm(4, rngs=rngs)
        ...         self.drop = nnx.Dropout(0.5, rngs=rngs)
        ...         self.head = nnx.Linear(4, 2, rngs=rngs)
        ...     def __call__(self, x):
        ...         return self.head(self.drop(nnx.relu(self.bn(self.fc(x)))))
        >>> model = from_nnx(Net)
        >>> variables = model.init(jax.random.key(0), jnp.ones((3, 5)))
        >>> model.has_batch_stats, sorted(variables), sorted(variables["params"])
        (True, ['batch_stats', 'params'], ['bn', 'fc', 'head'])
        >>> logits, stats = model.apply_with_stats(variables, jnp.ones((3, 5)), rngs={"dropout": jax.random.key(1)})
        >>> logits.shape, sorted(stats["bn"])
        ((3, 2), ['mean', 'var'])
        >>> from_nnx(Net) == model
        True
    """
    if isinstance(factory, nnx.Module):
        raise TypeError("from_nnx takes a factory, not a built module: pass e.g. "
                        f"lambda rngs: {type(factory).__name__}(..., rngs=rngs)")
    if not callable(factory):
        raise TypeError(f"factory must be callable as factory(rngs) -> nnx.Module, got {type(factory).__name__}")
    abstract = nnx.eval_shape(lambda: _build(factory, jax.random.key(0)))
    name = name or type(abstract).__name__
    layout = _Layout(abstract, name)
    fns = [cls(factory, name, layout) for cls in (_NnxInit, _NnxApply, _NnxApplyWithStats)]
    return Model(name=name, init=fns[0], apply=fns[1], apply_with_stats=fns[2] if layout.stats else None,
                 spec=dict(spec or {"arch": name}))
