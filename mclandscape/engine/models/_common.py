"""Layers shared by the model zoo: activations, convolutions, size-adaptive pooling, BatchNorm, dropout and the
pre-activation BN-ReLU-conv stack of the pre-activation ResNets and DenseNets."""

from __future__ import annotations

import flax.linen as nn
import jax

from mclandscape.engine import cpu

ACTIVATIONS = {name: getattr(nn, name) for name in ("relu", "tanh", "sigmoid", "gelu", "elu", "softplus",
                                                     "leaky_relu", "silu")} | {"identity": lambda x: x}

# He/Kaiming normal with fan-out, as in the CIFAR VGG/ResNet reference code (Garipov et al., torchvision).
he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel: int, stride: int = 1, *, name: str, bias: bool = False,
         kernel_init=he_normal_fan_out) -> nn.Conv:
    """Square ``kernel`` convolution with "same" padding through :func:`mclandscape.engine.cpu.small_map_conv`;
    by default without bias (a BatchNorm follows) and with He-normal fan-out init, as in the zoo's ResNets,
    DenseNets and VGGs."""
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=pad, use_bias=bias, kernel_init=kernel_init,
                   conv_general_dilated=cpu.small_map_conv, name=name)


def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
    """Max-pool over H, W; skipped when the feature map is already smaller than the window.

    Shapes are static under ``jit``, so this decision is made once at trace time. It is what lets every zoo
    model run on 8×8 digits as well as 32×32 CIFAR or 64×64 Tiny-ImageNet.

    ``"VALID"`` pooling of NHWC maps; on CPU through :func:`mclandscape.engine.cpu.max_pool_strided` (same values;
    the same gradient, routed to the first maximum of each window); elsewhere ``flax.linen.max_pool``.
    """
    if x.shape[-3] < window or x.shape[-2] < window:
        return x
    return jax.lax.platform_dependent(
        x, cpu=lambda v: cpu.max_pool_strided(v, window, stride),
        default=lambda v: nn.max_pool(v, (window, window), strides=(stride, stride), padding="VALID"))


def batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
    """Standard Flax BatchNorm with PyTorch's defaults (momentum 0.1 in torch == 0.9 here, eps 1e-5)."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def dropout(x: jax.Array, rate: float, train: bool) -> jax.Array:
    """``nn.Dropout(rate)`` of ``x`` in train mode; no layer at all when ``rate`` is 0 (called inside a compact
    module, the layer is that module's next ``Dropout_i``)."""
    return nn.Dropout(rate, deterministic=not train)(x) if rate > 0 else x


def preact_convs(x: jax.Array, train: bool, convs) -> jax.Array:
    """BN-ReLU-conv for each ``(features, kernel, stride)`` of ``convs``, the layers named ``bn{i}`` / ``conv{i}``
    from 1 (called inside a compact module): the body of a pre-activation block (He et al. 2016b)."""
    for i, (features, kernel, stride) in enumerate(convs, 1):
        x = conv(features, kernel, stride, name=f"conv{i}")(nn.relu(batch_norm(train, name=f"bn{i}")(x)))
    return x


def as_image(x: jax.Array) -> jax.Array:
    """Accept NHWC images, or NHW (adds a channel axis)."""
    if x.ndim == 3:
        return x[..., None]
    if x.ndim != 4:
        raise ValueError(f"convolutional models expect NHWC images, got an input of shape {x.shape}")
    return x
