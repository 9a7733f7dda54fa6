"""Small convolutional networks: the simple CNN of the Bézier-surface paper (Anonymous, 2024, 'Revisiting mode
connectivity in neural networks with Bézier surface') and the ConvFC of Garipov et al., 2018 ('Loss surfaces, mode
connectivity, and fast ensembling of DNNs')."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from mclandscape.engine.models._common import as_image, conv, dropout, max_pool


def conv_stack(x: jax.Array, channels: Sequence[int], kernel: int, pool: int) -> jax.Array:
    """Convolutions (``kernel``×``kernel``, "same" padding, bias, Flax's default init), each followed by ReLU and
    a ``pool``×``pool`` stride-2 max-pool; the first is ``stem``, the others ``conv1``, ``conv2``, ..."""
    for i, c in enumerate(channels):
        layer = conv(int(c), kernel, name=f"conv{i}" if i else "stem", bias=True,
                     kernel_init=nn.linear.default_kernel_init)
        x = max_pool(nn.relu(layer(x)), pool, 2)
    return x


class SimpleCNN(nn.Module):
    """The simple CNN of the Bézier-surface paper, appendix A.4 (surfaces with 3×3…5×5 control points, Table 4).

    Three 3×3 convolutions with padding 1, each followed by ReLU and 2×2 max-pooling, dropout after the
    convolutional part, a 256-unit hidden dense layer and a linear classifier. The paper fixes the kernel
    size, padding, pooling and hidden width; channel widths default to (32, 64, 128) and dropout to 0.25.
    The first convolution is the submodule ``stem``.
    """

    num_classes: int = 10
    channels: Sequence[int] = (32, 64, 128)
    hidden: int = 256
    dropout: float = 0.25

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = dropout(conv_stack(as_image(x), self.channels, 3, 2), self.dropout, train)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden, name="fc")(x))
        return nn.Dense(self.num_classes, name="head")(x)


class ConvFC(nn.Module):
    """Garipov et al. (2018) ConvFC: the curve-finding paper's small CIFAR network.

    conv 5×5 (pad 2) 3→32, 32→64, 64→128, each ReLU + 3×3 stride-2 max-pool; dense 1152→1000→1000→classes
    with ReLU. 2 422 634 parameters for 32×32×3 input and 10 classes. Pools are skipped on maps smaller than
    3×3 so small inputs work. The first convolution is ``stem``.
    """

    num_classes: int = 10
    channels: Sequence[int] = (32, 64, 128)
    hidden: Sequence[int] = (1000, 1000)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = conv_stack(as_image(x), self.channels, 5, 3)
        x = x.reshape((x.shape[0], -1))
        for i, h in enumerate(self.hidden):
            x = nn.relu(nn.Dense(int(h), name=f"fc{i}")(x))
        return nn.Dense(self.num_classes, name="head")(x)
