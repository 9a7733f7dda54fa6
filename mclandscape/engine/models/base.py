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

PyTree = Any

__all__ = ["Model", "from_flax"]


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """Pure functions of one architecture.

    - ``init(key, x) -> variables`` with ``variables = {'params': ..., ['batch_stats': ...]}``.
    - ``apply(variables, x, train=False, rngs=None) -> logits``. With ``train=True`` dropout is active
      (``rngs={'dropout': key}``) and BatchNorm uses batch statistics; updated statistics are discarded.
    - ``apply_with_stats(variables, x, rngs=None) -> (logits, new_batch_stats)``: train mode returning the
      BatchNorm running statistics after one update; ``None`` for models without BatchNorm.
    - ``spec``: the architecture name and constructor arguments (JSON-serialisable), enough to rebuild
      the model from a checkpoint's metadata.
    - ``detect_batch_stats``: only for models that learn whether they have BatchNorm from their first
      ``init`` (:func:`from_flax` with ``has_batch_stats=None``): returns ``True`` / ``False``, or ``None``
      while ``init`` has not run. Such a model has an ``apply_with_stats`` either way; use
      :attr:`has_batch_stats`.

    Models compare and hash by identity: the engine's compiled functions take a model as a static argument,
    so a second call with the same model (and shapes) compiles nothing.

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
    spec: dict = dataclasses.field(default_factory=dict)
    detect_batch_stats: Callable[[], bool | None] | None = dataclasses.field(default=None, repr=False)

    @property
    def has_batch_stats(self) -> bool:
        """Whether the model keeps BatchNorm running statistics (a ``batch_stats`` collection)."""
        if self.detect_batch_stats is None:
            return self.apply_with_stats is not None
        found = self.detect_batch_stats()
        if found is None:
            raise ValueError(f"model {self.name!r} does not know yet whether it has BatchNorm: call "
                             "model.init(key, x) once (jax.eval_shape(model.init, key, x) is enough), or build it "
                             "with from_flax(..., has_batch_stats=True/False)")
        return bool(found)


class _Detected:
    """Whether a wrapped Flax module keeps BatchNorm statistics, learnt from the variables its ``init``
    returns. Idempotent: the module's collections do not depend on the key or on the input values."""

    def __init__(self):
        self.value: bool | None = None

    def see(self, variables):
        if self.value is None:
            self.value = "batch_stats" in variables
        return variables

    def __call__(self) -> bool | None:
        return self.value


def from_flax(module, name: str | None = None, spec: dict | None = None, *, has_batch_stats: bool | None = None,
              train_kwarg: str = "train") -> Model:
    """Wrap a Flax linen ``nn.Module`` whose ``__call__(x, train)`` returns logits into a :class:`Model`.

    Args:
      module: the linen module (unbound).
      name: the model's name (default: the module's class name).
      spec: the JSON-serialisable spec checkpoints record (default ``{"arch": name}``).
      has_batch_stats: whether the module has BatchNorm (a ``batch_stats`` collection). ``None`` (default):
        learnt from the variables of the first ``model.init`` (which every trainer calls first); until then
        :attr:`Model.has_batch_stats` raises ``ValueError``. Train-mode ``apply`` makes ``batch_stats``
        mutable whenever the variables hold it, so a BatchNorm module never ends in Flax's
        ``ModifyScopeVariableError``.
      train_kwarg: the name of the module's train/eval flag.

    Returns:
      A :class:`Model` (``init`` passes ``{"params", "dropout"}`` keys split from its key).

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
    """
    if has_batch_stats is not None and not isinstance(has_batch_stats, bool):
        raise TypeError(f"has_batch_stats must be True, False or None (detect), got {has_batch_stats!r}")
    if not isinstance(train_kwarg, str):
        raise TypeError(f"train_kwarg must be a string, got {train_kwarg!r}")
    detected = _Detected() if has_batch_stats is None else None

    def init(key, x):
        pkey, dkey = jax.random.split(key)
        variables = dict(module.init({"params": pkey, "dropout": dkey}, x, **{train_kwarg: False}))
        return detected.see(variables) if detected is not None else variables

    def apply(variables, x, train: bool = False, rngs=None):
        # decided at trace time from the variables' collections: statistics updated in train mode are dropped
        if train and "batch_stats" in variables:
            out, _ = module.apply(variables, x, **{train_kwarg: True}, rngs=rngs, mutable=["batch_stats"])
            return out
        return module.apply(variables, x, **{train_kwarg: train}, rngs=rngs)

    def apply_with_stats(variables, x, rngs=None):
        if "batch_stats" not in variables:
            raise ValueError(f"apply_with_stats of {name or type(module).__name__} needs variables with a "
                             f"'batch_stats' collection, got collections {sorted(variables)}")
        out, upd = module.apply(variables, x, **{train_kwarg: True}, rngs=rngs, mutable=["batch_stats"])
        return out, upd["batch_stats"]

    return Model(
        name=name or type(module).__name__,
        init=init,
        apply=apply,
        apply_with_stats=None if has_batch_stats is False else apply_with_stats,
        spec=dict(spec or {"arch": name or type(module).__name__}),
        detect_batch_stats=detected,
    )
