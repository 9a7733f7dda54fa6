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
from flax.core import unfreeze

from mclandscape.core.tree import TreeMismatchError, check_same_structure
from mclandscape.engine.models.base import Model, _Method, value_hash

__all__ = ["from_nnx"]

Path = tuple[Any, ...]
_VARIABLES = {"params": nnx.Param, "batch_stats": nnx.BatchStat}  # the NNX variable type of each collection


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
        # the original (integer-keyed) path of every variable, by its string path
        self.paths = {c: {_str_path(p): p for p, _ in nnx.to_flat_state(state)}
                      for c, state in (("params", params), ("batch_stats", stats))}
        if not self.paths["params"]:
            raise ValueError(f"NNX module {name!r} has no nnx.Param variables")
        self.collections = ("params", "batch_stats") if self.paths["batch_stats"] else ("params",)
        # (path, is_key, shape) of every RNG variable, in the fixed sorted order of the flat state
        self.rng = [(path, isinstance(var, nnx.RngKey), tuple(var.get_value().shape))
                    for path, var in nnx.to_flat_state(rng)]
        # the abstract module's values are shapes and dtypes: these are the collections' abstract trees
        self.abstract = {"params": self.to_tree(params, "params"), "batch_stats": self.to_tree(stats, "batch_stats")}

    def to_tree(self, state, collection: str) -> dict:
        """The library's nested dict (string keys) of an NNX state."""
        flat = {_str_path(p): v.get_value() for p, v in nnx.to_flat_state(state)}
        if set(flat) != set(self.paths[collection]):
            raise ValueError(f"the factory of NNX module {self.name!r} built a module whose {collection} differ "
                             "from its first build (it must build the same architecture for every key)")
        return traverse_util.unflatten_dict(flat)

    def to_nnx(self, variables, collection: str) -> dict:
        """An NNX pure dict (original integer keys) of the collection ``collection`` of the library's ``variables``."""
        if not isinstance(variables, Mapping):
            raise TypeError(f"variables of {self.name!r} must be a dict of collections, got "
                            f"{type(variables).__name__}")
        if collection not in variables:
            raise ValueError(f"variables of {self.name!r} have no {collection!r} collection (got {sorted(variables)})")
        tree = unfreeze(variables[collection])  # plain nested dicts (of FrozenDicts too)
        try:
            check_same_structure(self.abstract[collection], tree, check_dtype=False, names=("the module", "the variables"))
        except TreeMismatchError as e:
            raise TreeMismatchError(f"{collection} do not fit NNX module {self.name!r}: {e}") from None
        paths = self.paths[collection]
        return traverse_util.unflatten_dict({paths[k]: v for k, v in traverse_util.flatten_dict(tree).items()})

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


def _dropout_key(rngs, model_name: str):
    if rngs is not None and not isinstance(rngs, Mapping):
        raise TypeError(f"rngs of {model_name!r} must be a dict like {{'dropout': key}}, got {type(rngs).__name__}")
    return None if rngs is None else rngs.get("dropout")


def _factory_value(factory):
    """What a factory is equal by: a ``functools.partial`` by its function and arguments, anything else (a
    module class, a function) by itself."""
    if isinstance(factory, functools.partial):
        return (_factory_value(factory.func), factory.args, tuple(sorted(factory.keywords.items())))
    return factory


@dataclasses.dataclass(frozen=True)
class _Nnx:
    """An NNX module's three functions: equal and hashed by the factory's value (``value``: its class, or a
    ``functools.partial``'s function and arguments) and the name; the layout follows from them."""

    factory: Callable[[nnx.Rngs], nnx.Module] = dataclasses.field(compare=False)
    name: str
    layout: _Layout = dataclasses.field(repr=False, compare=False)
    value: Any = None

    def __hash__(self) -> int:
        return hash((type(self), self.name, value_hash(self.value)))

    def init(self, key, x=None):
        module = _build(self.factory, key)
        return {c: self.layout.to_tree(nnx.state(module, _VARIABLES[c]), c) for c in self.layout.collections}

    def apply(self, variables, x, train: bool = False, rngs=None):
        return self._merged(variables, bool(train), _dropout_key(rngs, self.name) if train else None)(x)

    def apply_with_stats(self, variables, x, rngs=None):
        module = self._merged(variables, True, _dropout_key(rngs, self.name))
        out = module(x)
        return out, self.layout.to_tree(nnx.state(module, nnx.BatchStat), "batch_stats")

    def _merged(self, variables, train: bool, key) -> nnx.Module:
        """The module of ``variables`` in train or eval mode, its dropout streams drawn from ``key``."""
        layout = self.layout
        states = [layout.to_nnx(variables, c) for c in layout.collections]
        module = nnx.merge(layout.graphdef, *states, *([layout.rng_state(key)] if layout.rng else []))
        # what Module.train() / Module.eval() set, with dropout also off in train mode when no key is given
        module.set_attributes(deterministic=not (train and key is not None), use_running_average=not train,
                              raise_if_not_found=False)
        return module


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
    owner = _Nnx(factory, name, _Layout(abstract, name), _factory_value(factory))
    with_stats = _Method(owner, "apply_with_stats") if len(owner.layout.collections) > 1 else None
    return Model(name=name, init=_Method(owner, "init"), apply=_Method(owner, "apply"), apply_with_stats=with_stats,
                 spec=dict(spec or {"arch": name}))
