"""VGG16 for CIFAR-sized inputs, with and without BatchNorm (Garipov et al.'s curve-finding variant).

The default architecture of the Bézier-surface paper (Anonymous, 2024, 'Revisiting mode connectivity in neural
networks with Bézier surface'); the classifier is that of Garipov et al., 2018 ('Loss surfaces, mode connectivity,
and fast ensembling of DNNs').
"""

from __future__ import annotations

import flax.linen as nn
import jax

from mclandscape.engine.models._common import as_image, batch_norm, conv, dropout, max_pool

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    """VGG16 (13 conv 3×3 + 3 dense): the Bézier-surface paper's default architecture (CIFAR-10/100, Tiny-ImageNet).

    Convolutions as in Simonyan & Zisserman with 2×2 max-pools; the classifier follows the CIFAR variant
    used for mode connectivity (Garipov et al.): dropout, Dense(512), ReLU, dropout, Dense(512), ReLU,
    Dense(classes). ``batch_norm=True`` inserts BatchNorm after every convolution (``vgg16_bn``).
    Conv weights use He-normal (fan-out) init and zero bias. Pools are skipped on 1×1 maps so 8×8 inputs
    work; the classifier's input width follows from the input size (512 for 32×32).
    The first convolution is ``stem``.
    """

    num_classes: int = 10
    batch_norm: bool = False
    dropout: float = 0.5
    width: int = 512

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = as_image(x)
        i = 0
        for v in VGG16_CFG:
            if v == "M":
                x = max_pool(x, 2, 2)
                continue
            name = "stem" if i == 0 else f"conv{i}"
            x = conv(int(v), 3, name=name, bias=True)(x)
            if self.batch_norm:
                x = batch_norm(train, name=f"{name}_bn")(x)
            x = nn.relu(x)
            i += 1
        x = x.reshape((x.shape[0], -1))
        for j in range(2):
            x = nn.relu(nn.Dense(self.width, name=f"fc{j}")(dropout(x, self.dropout, train)))
        return nn.Dense(self.num_classes, name="head")(x)
