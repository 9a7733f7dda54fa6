"""The model contract: a frozen bundle of pure functions over variable pytrees.

The library never holds a stateful model object: connectors, bands and searches move parameter pytrees and
call these functions. Any Flax module becomes a :class:`Model` with :func:`from_flax`; a hand-written pure
function works too (``Model(name, init, apply)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = ["Model", "StemSpec", "conv_stem", "flax_stem", "from_flax"]


@dataclasses.dataclass(frozen=True, eq=False)
class StemSpec:
    """A model's first layer, affine in its own parameters and fed by the raw input (issue 9).

    ``h = apply(kernel, bias, prepare(x))`` is ``conv(x, kernel) + bias``; the rest of the network is
    ``body_apply(variables, h, train=False, rngs=None) -> logits`` (and ``body_apply_with_stats(variables,
    h, rngs=None) -> (logits, batch_stats)`` for models with BatchNorm). Because ``h`` is jointly linear
    in ``(kernel, bias)``, for *any* coefficients ``c`` (Bernstein weights, or their derivatives, which do
    not sum to 1) ``sum_k c_k apply(K_k, b_k, x) = apply(sum_k c_k K_k, sum_k c_k b_k, x)``: the engine can
    run the first layer once per control point and combine, instead of once per point.

    - ``name``: the key of the stem's parameters, ``variables['params'][name] = {'kernel': [..., Cin,
      Cout], ['bias': [Cout]]}``; the body ignores these parameters.
    - ``apply(kernel, bias_or_None, x)`` must accept a kernel with any number of output channels (the
      engine stacks the control points' kernels along that axis) and, where ``pad_channels_ok``, extra
      input channels (zeros in ``x`` and in the kernel leave ``h`` unchanged).
    - ``prepare(x)``: the input normalisation the model applies before its first layer (NHW -> NHWC).
    """

    name: str
    apply: Callable[[jax.Array, jax.Array | None, jax.Array], jax.Array]
    body_apply: Callable[..., jax.Array]
    body_apply_with_stats: Callable[..., tuple[jax.Array, PyTree]] | None = None
    prepare: Callable[[jax.Array], jax.Array] = lambda x: x
    use_bias: bool = True
    pad_channels_ok: bool = True


def conv_stem(strides: Sequence[int] = (1, 1), padding: str | Sequence[tuple[int, int]] = "SAME"):
    """``apply(kernel, bias, x)`` of a Flax-style NHWC/HWIO convolution (``bias`` may be ``None``).

    Integer paddings are given as ``((lo, hi), (lo, hi))``; Flax's ``padding=p`` is ``((p, p), (p, p))``.
    Computed in the kernel's dtype at ``Precision.DEFAULT``, as ``flax.linen.Conv`` does.
    """
    strides = tuple(int(s) for s in strides)
    pad = padding if isinstance(padding, str) else tuple((int(a), int(b)) for a, b in padding)

    def apply(kernel, bias, x):
        x = x.astype(jnp.result_type(x.dtype, kernel.dtype))
        h = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), strides, pad,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if bias is not None:
            h = h + bias.astype(h.dtype)
        return h

    return apply


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

    - ``stem``: the linear first layer and the rest of the network as a :class:`StemSpec`, or ``None``
      (then the engines use ``apply`` alone; every model works without it).

    Models compare and hash by identity, so compiled evaluators can be cached per model.
    """

    name: str
    init: Callable[..., PyTree]
    apply: Callable[..., jax.Array]
    apply_with_stats: Callable[..., tuple[jax.Array, PyTree]] | None = None
    spec: dict = dataclasses.field(default_factory=dict)
    stem: StemSpec | None = None

    @property
    def has_batch_stats(self) -> bool:
        return self.apply_with_stats is not None


def from_flax(module, name: str | None = None, spec: dict | None = None, *, has_batch_stats: bool = False,
              train_kwarg: str = "train", stem: StemSpec | None = None) -> Model:
    """Wrap a Flax ``nn.Module`` whose ``__call__(x, train)`` returns logits into a :class:`Model`.

    ``stem`` (optional) describes the module's linear first layer; see :func:`flax_stem` for modules whose
    ``__call__`` takes ``from_stem=True`` to run the body on the stem's output.
    """

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
        stem=stem,
    )


def flax_stem(module, name: str, apply: Callable, *, has_batch_stats: bool = False, use_bias: bool = True,
              prepare: Callable = lambda x: x, train_kwarg: str = "train") -> StemSpec:
    """A :class:`StemSpec` for a Flax module whose ``__call__(h, train, from_stem=True)`` skips its first
    layer ``name`` (and the input preparation) and runs the rest of the network on ``h``."""

    def body_apply(variables, h, train: bool = False, rngs=None):
        if train and has_batch_stats:
            out, _ = module.apply(variables, h, **{train_kwarg: True}, rngs=rngs, mutable=["batch_stats"],
                                  from_stem=True)
            return out
        return module.apply(variables, h, **{train_kwarg: train}, rngs=rngs, from_stem=True)

    def body_apply_with_stats(variables, h, rngs=None):
        out, upd = module.apply(variables, h, **{train_kwarg: True}, rngs=rngs, mutable=["batch_stats"],
                                from_stem=True)
        return out, upd["batch_stats"]

    return StemSpec(name=name, apply=apply, body_apply=body_apply,
                    body_apply_with_stats=body_apply_with_stats if has_batch_stats else None,
                    prepare=prepare, use_bias=use_bias)
