"""The model contract: a frozen bundle of pure functions over variable pytrees.

The library never holds a stateful model object: connectors, bands and searches move parameter pytrees and
call these functions. Any Flax module becomes a :class:`Model` with :func:`from_flax`; a hand-written pure
function works too (``Model(name, init, apply)``).
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

    Models compare and hash by identity: the engine's compiled functions take a model as a static argument,
    so a second call with the same model (and shapes) compiles nothing.
    """

    name: str
    init: Callable[..., PyTree]
    apply: Callable[..., jax.Array]
    apply_with_stats: Callable[..., tuple[jax.Array, PyTree]] | None = None
    spec: dict = dataclasses.field(default_factory=dict)

    @property
    def has_batch_stats(self) -> bool:
        return self.apply_with_stats is not None


def from_flax(module, name: str | None = None, spec: dict | None = None, *, has_batch_stats: bool = False,
              train_kwarg: str = "train") -> Model:
    """Wrap a Flax ``nn.Module`` whose ``__call__(x, train)`` returns logits into a :class:`Model`."""

    def init(key, x):
        pkey, dkey = jax.random.split(key)
        return dict(module.init({"params": pkey, "dropout": dkey}, x, **{train_kwarg: False}))

    def apply(variables, x, train: bool = False, rngs=None):
        if train and has_batch_stats:
            out, _ = module.apply(variables, x, **{train_kwarg: True}, rngs=rngs, mutable=["batch_stats"])
            return out
        return module.apply(variables, x, **{train_kwarg: train}, rngs=rngs)

    def apply_with_stats(variables, x, rngs=None):
        out, upd = module.apply(variables, x, **{train_kwarg: True}, rngs=rngs, mutable=["batch_stats"])
        return out, upd["batch_stats"]

    return Model(
        name=name or type(module).__name__,
        init=init,
        apply=apply,
        apply_with_stats=apply_with_stats if has_batch_stats else None,
        spec=dict(spec or {"arch": name or type(module).__name__}),
    )
