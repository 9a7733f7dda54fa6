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

from mclandscape.engine.models._common import as_image, batch_norm, conv, preact_convs


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
        out = nn.relu(batch_norm(train, name="bn1")(conv(self.features, 3, self.stride, name="conv1")(x)))
        out = batch_norm(train, name="bn2")(conv(self.features, 3, 1, name="conv2")(out))
        residual = x
        if self.stride != 1 or x.shape[-1] != self.features:
            if self.shortcut == "A":
                extra = self.features - x.shape[-1]
                residual = jnp.pad(x[:, :: self.stride, :: self.stride, :],
                                   ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
            else:
                residual = conv(self.features, 1, self.stride, name="shortcut_conv")(x)
                residual = batch_norm(train, name="shortcut_bn")(residual)
        return nn.relu(out + residual)


class PreActBlock(nn.Module):
    """Pre-activation block (He et al. 2016b), as in Garipov et al.'s PreResNets: BN-ReLU-conv layers plus a
    shortcut, a 1×1 strided conv of the block *input* (no BatchNorm) when the stride or the channel count
    changes, the identity otherwise.

    Basic (PreResNet-20): two 3×3 convolutions of ``features`` channels, the first with ``stride``.
    ``bottleneck`` (PreResNet-164): conv1×1(``features``), conv3×3(``features``, ``stride``),
    conv1×1(``4·features``); the block outputs ``4·features`` channels.
    """

    features: int
    stride: int = 1
    bottleneck: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        f, s = self.features, self.stride
        convs = [(f, 1, 1), (f, 3, s), (4 * f, 1, 1)] if self.bottleneck else [(f, 3, s), (f, 3, 1)]
        out = preact_convs(x, train, convs)
        if s != 1 or x.shape[-1] != out.shape[-1]:
            x = conv(out.shape[-1], 1, s, name="shortcut_conv")(x)
        return out + x


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
      bottleneck blocks (:class:`PreActBlock`, outputs 64/128/256 channels), final BN-ReLU (Garipov et
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
        x = conv(int(self.widths[0]), 3, 1, name="stem")(as_image(x))
        if not self.preact:
            x = nn.relu(batch_norm(train, name="stem_bn")(x))
        for s, (n, w) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
            for b in range(int(n)):
                stride = 2 if (s > 0 and b == 0) else 1
                name = f"stage{s}_block{b}"
                if self.preact:
                    x = PreActBlock(int(w), stride, self.bottleneck, name=name)(x, train)
                else:
                    x = BasicBlock(int(w), stride, self.shortcut, name=name)(x, train)
        if self.preact:
            x = nn.relu(batch_norm(train, name="final_bn")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)
