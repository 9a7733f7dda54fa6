"""The model contract: a frozen bundle of pure functions over variable pytrees.

The library never holds a stateful model object: connectors, bands and searches move parameter pytrees and
call these functions. Any Flax linen module becomes a :class:`Model` with :func:`from_flax`, any Flax NNX
module with :func:`mclandscape.engine.models.nnx.from_nnx`; a hand-written pure function works too
(``Model(name, init, apply)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mclandscape.core.tree import TreeMismatchError, check_same_structure

PyTree = Any

__all__ = ["Model", "from_flax", "check_variables", "value_hash"]


def value_hash(value) -> int:
    """``hash(value)``, or the hash of its type when the value holds unhashable attributes (a linen module with
    a list field): equal values still hash equally, they only share a bucket with their type."""
    try:
        return hash(value)
    except TypeError:
        return hash(type(value))


@dataclasses.dataclass(frozen=True)
class Model:
    """Pure functions of one architecture.

    - ``init(key, x) -> variables`` with ``variables = {'params': ..., ['batch_stats': ...]}``.
    - ``apply(variables, x, train=False, rngs=None) -> logits``. With ``train=True`` dropout is active
      (``rngs={'dropout': key}``) and BatchNorm uses batch statistics; updated statistics are discarded.
    - ``apply_with_stats(variables, x, rngs=None) -> (logits, new_batch_stats)``: train mode returning the
      BatchNorm running statistics after one update; ``None`` for models without BatchNorm.
    - ``spec``: the architecture name and constructor arguments (JSON-serialisable), enough to rebuild
      the model from a checkpoint's metadata.
    - ``detect_batch_stats``: for :func:`from_flax` models, which may learn whether they have BatchNorm from
      the first variables they meet (``has_batch_stats=None``: those ``init`` returns, or those given to
      ``apply``, ``apply_with_stats`` or :func:`check_variables`): returns ``True`` / ``False``, or ``None``
      until then. Such a model has an ``apply_with_stats`` either way; use
      :attr:`has_batch_stats`. It is not part of the model's value (what it learns follows from ``init``).

    Models compare and hash by value: the name and the three functions (the spec is metadata). The engine's compiled
    functions take a model as a static argument, so a second call with an equal model (rebuilt by
    ``get_model`` with the same arguments, or by :func:`from_flax` of an equal module) compiles nothing.
    :func:`from_flax` and :func:`~mclandscape.engine.models.nnx.from_nnx` give functions that compare by the
    module's value; hand-written functions compare by identity.

    Example:
        >>> import jax.numpy as jnp
        >>> m = Model("double", init=lambda key, x: {"params": {"w": jnp.ones(())}},
        ...           apply=lambda v, x, train=False, rngs=None: 2 * v["params"]["w"] * x)
        >>> m.has_batch_stats, float(m.apply(m.init(None, 1.0), 3.0))
        (False, 6.0)
    """

    name: str
    init: Callable[..., PyTree]
    apply: Callable[..., jax.Array]
    apply_with_stats: Callable[..., tuple[jax.Array, PyTree]] | None = None
    spec: dict = dataclasses.field(default_factory=dict, compare=False)
    detect_batch_stats: Callable[[], bool | None] | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def has_batch_stats(self) -> bool:
        """Whether the model keeps BatchNorm running statistics (a ``batch_stats`` collection)."""
        if self.detect_batch_stats is None:
            return self.apply_with_stats is not None
        found = self.detect_batch_stats()
        if found is None:
            raise ValueError(f"model {self.name!r} does not know yet whether it has BatchNorm: call "
                             "model.init(key, x) once (jax.eval_shape(model.init, key, x) is enough) or "
                             "check_variables(model, variables, x), or build it with "
                             "from_flax(..., has_batch_stats=True/False)")
        return bool(found)


class _Detected:
    """Whether a wrapped Flax module keeps BatchNorm statistics: given, or (``None``) learnt from the first
    variables its ``init`` returns or its ``apply`` / ``apply_with_stats`` / :func:`check_variables` meet (the
    module's collections do not depend on the key or on the input values)."""

    def __init__(self, value: bool | None):
        self.value = value

    def see(self, variables):
        if self.value is None and hasattr(variables, "keys"):
            self.value = "batch_stats" in variables
        return variables

    def __call__(self) -> bool | None:
        return self.value


@dataclasses.dataclass(frozen=True)
class _Method:
    """``getattr(owner, method)`` as a value: equal and hashed by the owner's value and the method's name (bound
    methods compare by identity), so the functions of equal modules share compiled code."""

    owner: Any
    method: str

    def __call__(self, *args, **kwargs):
        return getattr(self.owner, self.method)(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class _Linen:
    """A linen module's three functions: equal and hashed by the module's value and the flag name (linen modules
    are dataclasses that compare by their attributes)."""

    module: Any
    train_kwarg: str
    name: str
    detected: _Detected = dataclasses.field(compare=False)

    def __hash__(self) -> int:
        return hash((type(self), self.train_kwarg, self.name, value_hash(self.module)))

    def init(self, key, x):
        pkey, dkey = jax.random.split(key)
        return self.detected.see(dict(self.module.init({"params": pkey, "dropout": dkey}, x,
                                                       **{self.train_kwarg: False})))

    def apply(self, variables, x, train: bool = False, rngs=None):
        # decided at trace time from the variables' collections: statistics updated in train mode are dropped
        return self._run(variables, x, train, rngs)[0]

    def apply_with_stats(self, variables, x, rngs=None):
        if "batch_stats" not in variables:
            raise ValueError(f"apply_with_stats of {self.name} needs variables with a 'batch_stats' collection, "
                             f"got collections {sorted(variables)}")
        return self._run(variables, x, True, rngs)

    def _run(self, variables, x, train: bool, rngs):
        """The module's outputs and, when ``batch_stats`` are updated (train mode), the new statistics."""
        self.detected.see(variables)
        if train and "batch_stats" in variables:
            out, upd = self.module.apply(variables, x, **{self.train_kwarg: True}, rngs=rngs, mutable=["batch_stats"])
            return out, upd["batch_stats"]
        return self.module.apply(variables, x, **{self.train_kwarg: train}, rngs=rngs), None


def from_flax(module, name: str | None = None, spec: dict | None = None, *, has_batch_stats: bool | None = None,
              train_kwarg: str = "train") -> Model:
    """Wrap a Flax linen ``nn.Module`` whose ``__call__(x, train)`` returns logits into a :class:`Model`.

    Args:
      module: the linen module (unbound).
      name: the model's name (default: the module's class name).
      spec: the JSON-serialisable spec checkpoints record (default ``{"arch": name}``).
      has_batch_stats: whether the module has BatchNorm (a ``batch_stats`` collection). ``None`` (default):
        learnt from the first variables the model meets (those of ``model.init``, which every trainer calls
        first, or variables given to ``apply``, ``apply_with_stats`` or :func:`check_variables`); until then
        :attr:`Model.has_batch_stats` raises ``ValueError``. Train-mode ``apply`` makes ``batch_stats``
        mutable whenever the variables hold it, so a BatchNorm module never ends in Flax's
        ``ModifyScopeVariableError``.
      train_kwarg: the name of the module's train/eval flag.

    Returns:
      A :class:`Model` (``init`` passes ``{"params", "dropout"}`` keys split from its key), equal to any
      other ``from_flax`` of an equal module with the same options.

    Example:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> class Net(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x, train=False):
        ...         x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
        ...         return nn.Dense(2)(nn.relu(x))
        >>> model = from_flax(Net())
        >>> variables = model.init(jax.random.key(0), jnp.ones((3, 5)))
        >>> model.has_batch_stats, sorted(variables)
        (True, ['batch_stats', 'params'])
        >>> logits, stats = model.apply_with_stats(variables, jnp.ones((3, 5)))
        >>> logits.shape, sorted(stats["BatchNorm_0"])
        ((3, 2), ['mean', 'var'])
        >>> from_flax(Net()) == model
        True
    """
    if has_batch_stats is not None and not isinstance(has_batch_stats, bool):
        raise TypeError(f"has_batch_stats must be True, False or None (detect), got {has_batch_stats!r}")
    if not isinstance(train_kwarg, str):
        raise TypeError(f"train_kwarg must be a string, got {train_kwarg!r}")
    name = name or type(module).__name__
    linen = _Linen(module, train_kwarg, name, _Detected(has_batch_stats))
    return Model(name=name, init=_Method(linen, "init"), apply=_Method(linen, "apply"),
                 apply_with_stats=None if has_batch_stats is False else _Method(linen, "apply_with_stats"),
                 spec=dict(spec or {"arch": name}), detect_batch_stats=linen.detected)


def check_variables(model: Model, variables: PyTree, x, *, name: str = "the variables",
                    check_dtype: bool = False) -> None:
    """Check that ``variables`` fit ``model`` on inputs like ``x`` before they meet it.

    The variables' collections (``params``, ``batch_stats``) are compared with those of an abstract ``model.init`` (``jax.eval_shape``: nothing is computed or compiled), so parameters of another
    width, or a batch of labels passed as inputs, raise the library's error naming the leaf instead of Flax's
    ``ScopeParamShapeError`` from deep inside the model.

    Args:
      model: the :class:`Model`.
      variables: a dict of collections with ``"params"``.
      x: an input batch, or its shape and dtype (a ``jax.ShapeDtypeStruct``); only its shape past the first
        axis and its dtype matter.
      name: what the variables are called in the message.
      check_dtype: also compare the leaves' dtypes.

    Returns:
      ``None``; raises :class:`~mclandscape.core.tree.TreeMismatchError` (a ``ValueError``) naming the first
      leaf that differs, and ``ValueError`` when ``variables`` has no ``params``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from mclandscape.engine.models import get_model
        >>> v = get_model("mlp", widths=[4]).init(jax.random.key(0), jnp.ones((1, 5)))
        >>> check_variables(get_model("mlp", widths=[8]), v, jnp.ones((2, 5)))
        Traceback (most recent call last):
        ...
        mclandscape.core.tree.TreeMismatchError: the variables do not fit model 'mlp' on inputs of shape (5,): leaf ['params']['Dense_0']['bias']: shape (8,) in the model but (4,) in the variables
    """
    if not hasattr(variables, "keys") or "params" not in variables:
        raise ValueError(f"{name} must be a dict of collections with 'params' (e.g. model.init(key, x)), got "
                         f"{type(variables).__name__}")
    shape = tuple(np.shape(x))
    abstract = jax.ShapeDtypeStruct((1, *shape[1:]), getattr(x, "dtype", None) or jnp.result_type(x))
    expected = jax.eval_shape(model.init, jax.random.key(0), abstract)
    try:
        check_same_structure(dict(expected), dict(variables), check_dtype=check_dtype, names=("the model", name))
    except TreeMismatchError as e:
        raise TreeMismatchError(f"{name} do not fit model {model.name!r} on inputs of shape {shape[1:]}: {e}") from None
