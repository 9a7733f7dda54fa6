"""CIFAR ResNets: ResNet-18 (He et al. 2016, CIFAR form of Liu's reference code), ResNet-20, PreResNet-20 and
PreResNet-164 (He et al. 2016b, pre-activation bottleneck blocks; the ResNet-164 of the DSP-TT paper, Anonymous,
2020, 'Constructing multiple high-quality deep neural networks: a TRUST-TECH based approach', ICLR 2021 submission).

All use BatchNorm (``batch_stats`` collection) and 3×3 stems without max-pooling, the CIFAR convention, and
end with global average pooling, so any input size (8×8 digits, 32×32 CIFAR, 64×64 Tiny-ImageNet) works.
Convolutions have no bias (a BatchNorm follows) and He-normal fan-out init. The stem convolution is the
submodule ``stem``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mclandscape.engine.models._common import as_image, batch_norm
from mclandscape.engine.models._common import bias_free_conv as _conv


class BasicBlock(nn.Module):
    """Post-activation basic block: conv-BN-ReLU-conv-BN (+ shortcut) - ReLU.

    ``shortcut="B"``: a 1×1 strided conv + BN when the shape changes (ResNet-18); ``"A"``: parameter-free
    subsampling with zero-padded channels (He et al.'s CIFAR ResNet-20).
    """

    features: int
    stride: int = 1
    shortcut: str = "B"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = _conv(self.features, 3, self.stride, name="conv1")(x)
        out = nn.relu(batch_norm(train, name="bn1")(out))
        out = _conv(self.features, 3, 1, name="conv2")(out)
        out = batch_norm(train, name="bn2")(out)
        residual = x
        if self.stride != 1 or x.shape[-1] != self.features:
            if self.shortcut == "A":
                residual = x[:, :: self.stride, :: self.stride, :]
                extra = self.features - x.shape[-1]
                residual = jnp.pad(residual, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
            else:
                residual = _conv(self.features, 1, self.stride, name="shortcut_conv")(x)
                residual = batch_norm(train, name="shortcut_bn")(residual)
        return nn.relu(out + residual)


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016b), as in Garipov et al.'s PreResNet:
    BN-ReLU-conv-BN-ReLU-conv + shortcut, the shortcut a 1×1 strided conv of the block input when the
    shape changes."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = nn.relu(batch_norm(train, name="bn1")(x))
        out = _conv(self.features, 3, self.stride, name="conv1")(out)
        out = nn.relu(batch_norm(train, name="bn2")(out))
        out = _conv(self.features, 3, 1, name="conv2")(out)
        residual = x
        if self.stride != 1 or x.shape[-1] != self.features:
            residual = _conv(self.features, 1, self.stride, name="shortcut_conv")(x)
        return out + residual


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck block (He et al. 2016b), as in Garipov et al.'s PreResNet-164:
    BN-ReLU-conv1×1(``features``)-BN-ReLU-conv3×3(``features``, ``stride``)-BN-ReLU-conv1×1(``4·features``)
    + shortcut; the shortcut is a 1×1 strided conv of the block *input* (no BatchNorm) when the stride or the
    channel count (``4·features``) changes, the identity otherwise. Output channels: ``expansion·features``."""

    features: int
    stride: int = 1
    expansion: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out_features = self.expansion * self.features
        out = nn.relu(batch_norm(train, name="bn1")(x))
        out = _conv(self.features, 1, 1, name="conv1")(out)
        out = nn.relu(batch_norm(train, name="bn2")(out))
        out = _conv(self.features, 3, self.stride, name="conv2")(out)
        out = nn.relu(batch_norm(train, name="bn3")(out))
        out = _conv(out_features, 1, 1, name="conv3")(out)
        residual = x
        if self.stride != 1 or x.shape[-1] != out_features:
            residual = _conv(out_features, 1, self.stride, name="shortcut_conv")(x)
        return out + residual


def preresnet_bottleneck_blocks(depth: int) -> int:
    """Blocks per stage of a three-stage pre-activation bottleneck ResNet of ``depth`` layers: ``(depth -
    2) / 9`` (three convolutions per block, plus the stem and the head), e.g. 18 for ResNet-164."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 11 or (depth - 2) % 9:
        raise ValueError(f"bottleneck PreResNet depth must be an integer 9n + 2 >= 11 (e.g. 164), got depth={depth!r}")
    return (depth - 2) // 9


class ResNet(nn.Module):
    """Generic CIFAR ResNet: stem conv 3×3, stages of basic blocks, global average pool, linear head.

    - ``resnet18``: ``stage_sizes=(2, 2, 2, 2)``, ``widths=(64, 128, 256, 512)``, post-activation blocks,
      shortcut B (11 173 962 parameters for 10 classes).
    - ``resnet20``: ``(3, 3, 3)``, ``(16, 32, 64)``, shortcut A (He et al.'s CIFAR net, 0.27 M).
    - ``preresnet20``: ``(3, 3, 3)``, ``(16, 32, 64)``, ``preact=True``: pre-activation blocks and a final
      BN-ReLU before pooling (Garipov et al.'s PreResNet-20).
    - ``preresnet164``: ``(18, 18, 18)``, ``(16, 32, 64)``, ``preact=True, bottleneck=True``: pre-activation
      bottleneck blocks (:class:`PreActBottleneck`, outputs 64/128/256 channels), final BN-ReLU (Garipov et
      al.'s PreResNet-164, 1 703 258 parameters for 10 classes; the paper's 1.7 M).

    With ``bottleneck=True`` the ``widths`` are the bottleneck widths; the blocks output four times as many
    channels. Bottleneck blocks exist in the pre-activation form only.
    """

    num_classes: int = 10
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    preact: bool = False
    shortcut: str = "B"
    bottleneck: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.bottleneck and not self.preact:
            raise ValueError("ResNet(bottleneck=True) needs preact=True: bottleneck blocks are implemented in the "
                             "pre-activation form (PreResNet-164) only")
        x = _conv(int(self.widths[0]), 3, 1, name="stem")(as_image(x))
        if not self.preact:
            x = nn.relu(batch_norm(train, name="stem_bn")(x))
        for s, (n, w) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
            for b in range(int(n)):
                stride = 2 if (s > 0 and b == 0) else 1
                name = f"stage{s}_block{b}"
                if self.bottleneck:
                    x = PreActBottleneck(int(w), stride, name=name)(x, train)
                elif self.preact:
                    x = PreActBlock(int(w), stride, name=name)(x, train)
                else:
                    x = BasicBlock(int(w), stride, self.shortcut, name=name)(x, train)
        if self.preact:
            x = nn.relu(batch_norm(train, name="final_bn")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)
