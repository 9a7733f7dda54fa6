"""DenseNet-BC for CIFAR (Huang et al. 2017): the DenseNet-100 (k = 12) of the DSP-TT paper (Anonymous, 2020,
'Constructing multiple high-quality deep neural networks: a TRUST-TECH based approach', ICLR 2021 submission).

Layout of Huang et al.'s CIFAR code (``densenet.lua`` / the PyTorch ports) with bottleneck layers and
compression (the "BC" variant):

- stem: 3×3 convolution (pad 1, no bias) to ``2·growth_rate`` channels, the submodule ``stem``;
- three dense blocks of ``(depth - 4) / 6`` bottleneck layers each, a layer being
  BN-ReLU-conv1×1(``4·growth_rate``)-BN-ReLU-conv3×3(``growth_rate``), its output concatenated to its input;
- between blocks, transitions BN-ReLU-conv1×1(``floor(compression·C)``)-avg-pool 2×2/2;
- final BN-ReLU, global average pool, linear head.

Convolutions have no bias and He-normal fan-out init (Huang et al.: ``normal(0, sqrt(2 / (k·k·C_out)))``).
With the defaults (depth 100, k = 12, compression 0.5) the model has 769 162 parameters for 10 classes (the
paper's "0.8 M"). Like every zoo model it runs on any input size: the transition pools are skipped on maps
smaller than 2×2, so 8×8×1 digits (8 → 4 → 2) work as well as 32×32×3 CIFAR.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mclandscape.core import _checks
from mclandscape.engine.models._common import as_image, batch_norm, conv, preact_convs

__all__ = ["DenseNet", "avg_pool", "densenet_layers", "transition_channels"]


def densenet_layers(depth: int) -> int:
    """Bottleneck layers per dense block of a three-block DenseNet-BC of ``depth`` layers: ``(depth - 4) /
    6`` (two convolutions per layer; the stem, two transitions and the head make the other 4)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"DenseNet-BC depth must be an integer 6n + 4 >= 10 (e.g. 100: three blocks of 16 "
                         f"bottleneck layers), got depth={depth!r}")
    return (depth - 4) // 6


def transition_channels(channels: int, compression: float) -> int:
    """Output channels of a transition layer: ``floor(compression · channels)`` (Huang et al.)."""
    return int(math.floor(compression * channels))


def avg_pool(x: jax.Array, window: int = 2) -> jax.Array:
    """Non-overlapping ``window``×``window`` average pooling (stride ``window``, ``"VALID"``) of NHWC ``x``;
    skipped when the map is smaller than the window, like :func:`mclandscape.engine.models._common.max_pool`.

    Computed as a reshape and mean (trailing rows/columns that do not fill a window are dropped, as
    ``"VALID"`` pooling does): the same values as ``flax.linen.avg_pool``, a plain reduction on every backend.
    """
    n, h, w, c = x.shape
    if h < window or w < window:
        return x
    ho, wo = h // window, w // window
    x = x[:, :ho * window, :wo * window, :]
    return jnp.mean(x.reshape(n, ho, window, wo, window, c), axis=(2, 4))


class DenseLayer(nn.Module):
    """Bottleneck layer BN-ReLU-conv1×1(``4·growth_rate``)-BN-ReLU-conv3×3(``growth_rate``); returns the
    input with the ``growth_rate`` new channels concatenated."""

    growth_rate: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = preact_convs(x, train, [(4 * self.growth_rate, 1, 1), (self.growth_rate, 3, 1)])
        return jnp.concatenate([x, out], axis=-1)


class Transition(nn.Module):
    """BN-ReLU-conv1×1(``features``)-avg-pool 2×2/2 between dense blocks."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return avg_pool(conv(self.features, 1, name="conv")(nn.relu(batch_norm(train, name="bn")(x))), 2)


class DenseNet(nn.Module):
    """DenseNet-BC (see the module docstring); ``densenet100`` in the zoo."""

    num_classes: int = 10
    depth: int = 100
    growth_rate: int = 12
    compression: float = 0.5

    def __post_init__(self):
        # checked when the module is built (get_model's call), not first when it is traced
        densenet_layers(self.depth)
        _checks.integer(self.growth_rate, "growth_rate", low=1, what="DenseNet")
        _checks.real(self.compression, "compression", low=0.0, high=1.0, low_open=True, what="DenseNet")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        layers = densenet_layers(self.depth)
        x = conv(2 * self.growth_rate, 3, name="stem")(as_image(x))
        for blk in range(3):
            for i in range(layers):
                x = DenseLayer(self.growth_rate, name=f"block{blk}_layer{i}")(x, train)
            if blk < 2:
                x = Transition(transition_channels(x.shape[-1], self.compression), name=f"transition{blk}")(x, train)
        x = nn.relu(batch_norm(train, name="final_bn")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)
