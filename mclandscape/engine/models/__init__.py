"""The model zoo: Flax modules wrapped as pure :class:`Model` bundles.

``get_model(name, **kwargs)`` builds any zoo architecture; ``model.spec`` records the architecture and
*all* constructor arguments (defaults filled in) as JSON-serialisable data::

    spec = {"arch": "vgg16_bn", "kwargs": {"num_classes": 10, "dropout": 0.5, "width": 512}}

and ``get_model(spec)`` (or equivalently ``get_model(spec["arch"], **spec["kwargs"])``) rebuilds the same
model, which is how :func:`mclandscape.engine.checkpoint.load_model` restores a model from a checkpoint alone.

The architectures are those of the Bézier-surface paper (Anonymous, 2024, 'Revisiting mode connectivity in neural
networks with Bézier surface'), of Garipov et al., 2018 ('Loss surfaces, mode connectivity, and fast ensembling of
DNNs') and of the DSP-TT paper (Anonymous, 2020, 'Constructing multiple high-quality deep neural networks: a
TRUST-TECH based approach', ICLR 2021 submission).

| name | architecture | BatchNorm |
|---|---|---|
| ``mlp`` | ``widths`` hidden layers, ``activation``, ``num_classes`` outputs | no |
| ``simple_cnn`` | the Bézier-surface paper's simple CNN (appendix A.4): 3 × (conv3×3 pad 1, ReLU, max-pool 2), dropout, Dense 256, head | no |
| ``convfc`` | Garipov et al. ConvFC: 3 × (conv5×5, ReLU, max-pool 3/2), Dense 1000-1000, head (2.42 M) | no |
| ``vgg16`` / ``vgg16_bn`` | CIFAR VGG16 (Garipov et al.'s classifier) | ``vgg16_bn`` |
| ``resnet18`` | CIFAR ResNet-18 (11.17 M) | yes |
| ``resnet20`` | He et al. CIFAR ResNet-20, option-A shortcuts (0.27 M); ``width`` multiplies the channels | yes |
| ``preresnet20`` | Garipov et al. PreResNet-20 | yes |
| ``preresnet164`` (alias ``resnet164``) | He et al. 2016b pre-activation bottleneck ResNet, as Garipov et al.'s PreResNet-164: ``depth`` 164 = 9·18 + 2, three stages of 18 blocks (1.70 M) | yes |
| ``densenet100`` (aliases ``densenet_bc100``, ``densenet``) | Huang et al. DenseNet-BC, ``depth`` 100, ``growth_rate`` 12, ``compression`` 0.5 (0.77 M) | yes |
| ``vit_small`` (alias ``vit``) | patch-4 ViT, width 192, depth 6, 3 heads | no |

Every model takes ``num_classes`` and works on any input size: NHWC images (8×8×1 digits too — pools are
skipped on maps smaller than their window) and, for ``mlp``, any ``[N, ...]`` input. Conv models name their
first convolution ``stem`` (``variables['params']['stem']``). Models with BatchNorm keep a ``batch_stats``
collection and have ``apply_with_stats``. The modules are plain Flax; the evaluator's first-layer
factorisation (:mod:`mclandscape.engine.cpu`) works on them from outside, as on any Flax linen model.

User models: :func:`from_flax` wraps a Flax linen module, :func:`from_nnx` a Flax NNX module factory; both record
``{"arch": name}`` as their spec, so checkpoints of them are restored with ``load_model(directory, model=model)``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping

from mclandscape.core import _checks
from mclandscape.engine.models._common import ACTIVATIONS
from mclandscape.engine.models.base import Model, from_flax
from mclandscape.engine.models.cnn import ConvFC, SimpleCNN
from mclandscape.engine.models.densenet import DenseNet
from mclandscape.engine.models.mlp import MLP
from mclandscape.engine.models.nnx import from_nnx
from mclandscape.engine.models.resnet import ResNet, preresnet_bottleneck_blocks
from mclandscape.engine.models.vgg import VGG16
from mclandscape.engine.models.vit import ViT

__all__ = ["Model", "from_flax", "from_nnx", "get_model", "list_models", "canonical_name",
           "MLP", "SimpleCNN", "ConvFC", "VGG16", "ResNet", "DenseNet", "ViT"]


def _ints(values, name: str) -> tuple[int, ...]:
    if not isinstance(values, list | tuple):
        raise TypeError(f"{name} must be a list of positive integers, got {values!r}")
    return tuple(_checks.integer(v, f"{name}[{i}]", low=1) for i, v in enumerate(values))


def _mlp(widths, num_classes, activation, use_bias, dropout):
    return MLP(widths=_ints(widths, "widths"), num_classes=num_classes,
               activation=_checks.choice(activation, "activation", ACTIVATIONS), use_bias=bool(use_bias),
               dropout=_checks.probability(dropout, "dropout"))


def _simple_cnn(num_classes, channels, hidden, dropout):
    return SimpleCNN(num_classes=num_classes, channels=_ints(channels, "channels"),
                     hidden=_checks.integer(hidden, "hidden", low=1), dropout=_checks.probability(dropout, "dropout"))


def _vgg(num_classes, dropout, width, batch_norm=False):
    return VGG16(num_classes=num_classes, batch_norm=batch_norm, dropout=_checks.probability(dropout, "dropout"),
                 width=_checks.integer(width, "width", low=1))


def _resnet20(num_classes, shortcut, width):
    # ``width`` multiplies every stage's channels (Ainsworth et al.'s ResNet-20 x1 ... x32 width sweep)
    w = _checks.integer(width, "width", low=1, what="resnet20's channel multiplier")
    return ResNet(num_classes=num_classes, stage_sizes=(3, 3, 3), widths=(16 * w, 32 * w, 64 * w),
                  shortcut=_checks.choice(shortcut, "shortcut", ("A", "B")))


def _preresnet164(num_classes, depth):
    n = preresnet_bottleneck_blocks(depth)
    return ResNet(num_classes=num_classes, stage_sizes=(n, n, n), widths=(16, 32, 64), preact=True, bottleneck=True)


# name -> (builder, default kwargs, has_batch_stats)
_REGISTRY = {
    "mlp": (_mlp, {"widths": [128], "num_classes": 10, "activation": "relu", "use_bias": True,
                   "dropout": 0.0}, False),
    "simple_cnn": (_simple_cnn, {"num_classes": 10, "channels": [32, 64, 128], "hidden": 256,
                                 "dropout": 0.25}, False),
    "convfc": (lambda num_classes, channels, hidden: ConvFC(num_classes, _ints(channels, "channels"),
                                                            _ints(hidden, "hidden")),
               {"num_classes": 10, "channels": [32, 64, 128], "hidden": [1000, 1000]}, False),
    "vgg16": (_vgg, {"num_classes": 10, "dropout": 0.5, "width": 512}, False),
    "vgg16_bn": (functools.partial(_vgg, batch_norm=True), {"num_classes": 10, "dropout": 0.5, "width": 512}, True),
    "resnet18": (lambda num_classes: ResNet(num_classes, (2, 2, 2, 2), (64, 128, 256, 512), shortcut="B"),
                 {"num_classes": 10}, True),
    "resnet20": (_resnet20, {"num_classes": 10, "shortcut": "A", "width": 1}, True),
    "preresnet20": (lambda num_classes: ResNet(num_classes, (3, 3, 3), (16, 32, 64), preact=True),
                    {"num_classes": 10}, True),
    "preresnet164": (_preresnet164, {"num_classes": 10, "depth": 164}, True),
    "densenet100": (DenseNet, {"num_classes": 10, "depth": 100, "growth_rate": 12, "compression": 0.5}, True),
    "vit_small": (ViT, {"num_classes": 10, "patch_size": 4, "dim": 192, "depth": 6, "heads": 3,
                        "mlp_dim": 384, "dropout": 0.0}, False),
}
_ALIASES = {"vit": "vit_small", "vgg16bn": "vgg16_bn", "preresnet": "preresnet20", "cnn": "simple_cnn",
            "resnet164": "preresnet164", "densenet_bc100": "densenet100", "densenet": "densenet100"}


def list_models() -> list[str]:
    """Names accepted by :func:`get_model` (aliases excluded)."""
    return sorted(_REGISTRY)


def canonical_name(name: str) -> str:
    """The registry name of a zoo architecture or alias (``"resnet164"`` -> ``"preresnet164"``); ``ValueError``
    for an unknown name."""
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string or a spec dict, got {name!r}")
    arch = _ALIASES.get(name.lower(), name.lower())
    if arch not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()} (aliases {sorted(_ALIASES)})")
    return arch


def _json(name: str, value):
    """A JSON copy of an argument (tuples -> lists, NumPy scalars -> Python scalars); anything else is an error."""
    def scalar(v):
        if getattr(v, "ndim", None) != 0 or not hasattr(v, "item"):
            raise ValueError(f"model argument {name}={value!r} is not JSON-serialisable")
        return v.item()

    return json.loads(json.dumps(value, default=scalar))


def get_model(name: str | Mapping, **kwargs) -> Model:
    """Build a zoo model by name (``get_model("resnet20", num_classes=100)``) or from a spec dict
    (``get_model(model.spec)``; extra ``kwargs`` override the spec's). Unknown names or arguments raise
    ``ValueError``, as do bad values (``widths=[-5]``, ``activation="relux"``: ``ValueError`` naming the
    argument, a non-number ``TypeError``), at call time. Equal arguments give equal models (they share
    compiled code). See the module docstring for the architectures.

    Example:
        >>> get_model("mlp", widths=[32]) == get_model({"arch": "mlp", "kwargs": {"widths": (32,)}})
        True
    """
    if isinstance(name, Mapping):
        if "arch" not in name:
            raise ValueError(f"model spec {dict(name)!r} has no 'arch' entry")
        kwargs = {**dict(name.get("kwargs", {})), **kwargs}
        name = name["arch"]
    arch = canonical_name(name)
    builder, defaults, has_bn = _REGISTRY[arch]
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ValueError(f"model {arch!r} got unknown argument(s) {unknown}; it takes {sorted(defaults)}")
    args = {**_json("defaults", defaults), **{k: _json(k, v) for k, v in kwargs.items()}}
    _checks.integer(args["num_classes"], "num_classes", low=1)
    return from_flax(builder(**args), name=arch, spec={"arch": arch, "kwargs": args}, has_batch_stats=has_bn)
