"""Optax transforms named by value, so equal optimizer settings never compile twice.

A jitted step takes its transform as a static argument, and an ``optax.GradientTransformation`` hashes by the
identity of its closures: two ``optax.sgd(0.1)`` are different keys. :func:`transform` names a transform by
the function that builds it and that function's arguments (plain values: numbers, strings, frozen
dataclasses such as :class:`~mclandscape.engine.train.TrainConfig`), so equal settings give equal, equally
hashed transforms and a second run compiles nothing. A transform the caller built (any Optax
``GradientTransformation``) still works everywhere; it is keyed by its identity, so reuse one object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

__all__ = ["Transform", "transform", "unwrap", "per_member"]


@dataclasses.dataclass(frozen=True)
class Transform:
    """``build(*args, **dict(kwargs))``, equal and hashed by ``(build, args, kwargs)`` (made by :func:`transform`).

    Attributes:
      build: a module-level function returning an ``optax.GradientTransformation``.
      args: its positional arguments (hashable values).
      kwargs: its keyword arguments as sorted ``(name, value)`` pairs.
      tx: the built transform (not part of equality).
    """

    build: Callable[..., optax.GradientTransformation]
    args: tuple = ()
    kwargs: tuple = ()
    tx: Any = dataclasses.field(init=False, compare=False, repr=False)

    def __post_init__(self):
        try:
            hash((self.build, self.args, self.kwargs))
        except TypeError as e:
            raise TypeError(f"transform({getattr(self.build, '__name__', self.build)}, ...) needs hashable "
                            f"arguments (numbers, strings, tuples, frozen dataclasses): {e}") from None
        tx = self.build(*self.args, **dict(self.kwargs))
        if not isinstance(tx, optax.GradientTransformation):
            raise TypeError(f"{getattr(self.build, '__name__', self.build)} returned {type(tx).__name__}, "
                            "not an optax.GradientTransformation")
        object.__setattr__(self, "tx", tx)

    def init(self, params):
        return self.tx.init(params)

    def update(self, updates, state, params=None, **extra_args):
        return self.tx.update(updates, state, params, **extra_args)


def transform(build: Callable[..., optax.GradientTransformation], *args, **kwargs) -> Transform:
    """An Optax transform keyed by its builder and arguments.

    Args:
      build: a function returning an ``optax.GradientTransformation`` (e.g. ``optax.sgd``, or a module-level
        function that assembles a chain with its schedule).
      *args, **kwargs: its arguments, hashable values (a schedule is built inside ``build`` from numbers, not
        passed as a function).

    Returns:
      A :class:`Transform`, usable wherever the library takes a transform (``make_step``, every trainer's
      ``tx=``). Raises ``TypeError`` for unhashable arguments or a builder that returns something else.

    Example:
        >>> import optax
        >>> a, b = transform(optax.sgd, 0.1, momentum=0.9), transform(optax.sgd, 0.1, momentum=0.9)
        >>> a == b, hash(a) == hash(b), optax.sgd(0.1) == optax.sgd(0.1)
        (True, True, False)
    """
    return Transform(build, tuple(args), tuple(sorted(kwargs.items())))


def unwrap(tx) -> optax.GradientTransformation:
    """The plain Optax transform behind ``tx`` (a :class:`Transform`'s built one, else ``tx`` itself)."""
    return tx.tx if isinstance(tx, Transform) else tx


def _vmapped(tx) -> optax.GradientTransformation:
    tx = unwrap(tx)
    return optax.GradientTransformation(jax.vmap(tx.init), lambda u, st, p=None: jax.vmap(tx.update)(u, st, p))


def per_member(tx) -> Transform:
    """``tx`` applied to every member of stacked parameters on its own (clipping, norms and counts per member),
    named by ``tx``'s value.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> tx = per_member(transform(optax.clip_by_global_norm, 1.0))
        >>> u, _ = tx.update({"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}, tx.init({"w": jnp.zeros((2, 2))}))
        >>> jnp.linalg.norm(u["w"], axis=1).round(3).tolist()   # each member clipped to norm 1 on its own
        [1.0, 0.5]
    """
    return transform(_vmapped, tx)
