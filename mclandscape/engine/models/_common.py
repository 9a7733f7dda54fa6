"""Small helpers shared by the model zoo (activation lookup, size-adaptive pooling, initialisers)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "gelu": nn.gelu,
    "elu": nn.elu,
    "softplus": nn.softplus,
    "leaky_relu": nn.leaky_relu,
    "silu": nn.silu,
    "identity": lambda x: x,
}

# He/Kaiming normal with fan-out, as in the CIFAR VGG/ResNet reference code (Garipov et al., torchvision).
he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def bias_free_conv(features: int, kernel: int, stride: int = 1, name: str | None = None) -> nn.Conv:
    """Square ``kernel`` convolution with "same" padding, no bias (a BatchNorm follows) and He-normal fan-out
    init, through :func:`small_map_conv`: the convolutions of the zoo's ResNets and DenseNets."""
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=pad, use_bias=False,
                   kernel_init=he_normal_fan_out, conv_general_dilated=small_map_conv, name=name)


def small_map_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                   preferred_element_type=None):
    """``jax.lax.conv_general_dilated``, computed as an im2col matrix product when the feature map is
    smaller than the kernel (the ``conv_general_dilated`` of the zoo's ``nn.Conv`` layers).

    XLA's CPU backend rewrites such convolutions (e.g. VGG16's 3×3 convolutions on 2×2 maps, or a CNN's
    last layers on 8×8 digits) into a form it runs ~75× slower than the equivalent matmul: 1.07 s against
    14 ms for 128 maps of 2×2×512 (issue 9). Same result up to float rounding; any other convolution (and
    any stride, dilation, grouping or layout other than NHWC/HWIO) goes to ``lax.conv_general_dilated``.
    """
    nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    plain = (lhs.ndim != 4 or dimension_numbers not in (None, nhwc) or feature_group_count != 1
             or batch_group_count != 1 or tuple(window_strides) != (1, 1)
             or any(d != 1 for d in (lhs_dilation or (1, 1))) or any(d != 1 for d in (rhs_dilation or (1, 1))))
    kh, kw = rhs.shape[0], rhs.shape[1]
    if plain or (lhs.shape[1] >= kh and lhs.shape[2] >= kw):
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, batch_group_count,
                                            precision=precision, preferred_element_type=preferred_element_type)
    pads = jax.lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (1, 1), padding) if isinstance(padding, str) \
        else [tuple(p) for p in padding]
    xp = jnp.pad(lhs, [(0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)])
    ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    cols = jnp.concatenate([xp[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)], axis=-1)
    return jnp.matmul(cols, rhs.reshape(kh * kw * rhs.shape[2], rhs.shape[3]), precision=precision,
                      preferred_element_type=preferred_element_type)


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def max_pool(x: jax.Array, window: int, stride: int, padding: str = "VALID") -> jax.Array:
    """Max-pool over H, W; skipped when the feature map is already smaller than the window.

    Shapes are static under ``jit``, so this decision is made once at trace time. It is what lets every zoo
    model run on 8×8 digits as well as 32×32 CIFAR or 64×64 Tiny-ImageNet.

    On CPU, ``"VALID"`` pooling of NHWC maps uses :func:`max_pool_strided` (same values; the same gradient,
    routed to the first maximum of each window); elsewhere ``flax.linen.max_pool``.
    """
    if x.shape[-3] < window or x.shape[-2] < window:
        return x
    if padding == "VALID" and x.ndim == 4:
        return jax.lax.platform_dependent(
            x, cpu=lambda v: max_pool_strided(v, window, stride),
            default=lambda v: nn.max_pool(v, (window, window), strides=(stride, stride), padding=padding))
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=padding)


def _window(x, i, j, stride, ho, wo):
    return jax.lax.slice(x, (0, i, j, 0), (x.shape[0], i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1,
                                           x.shape[3]), (1, stride, stride, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool_strided(x: jax.Array, window: int, stride: int) -> jax.Array:
    """``"VALID"`` max-pooling of NHWC ``x`` as the maximum of ``window²`` strided slices.

    Values equal ``flax.linen.max_pool``'s exactly. The gradient goes to the first maximum of each window in
    row-major order (as XLA's select-and-scatter and PyTorch do): the forward pass of a differentiated
    call records that window offset (int8), and the backward pass scatters with strided pads, which XLA
    fuses into one loop. On the 2-core CPU this gradient took ~14 ms against ~120 ms for the reduce-window
    gradient (128×32×32×32 map, 3×3/2 window; issue 9).
    """
    ho = (x.shape[1] - window) // stride + 1
    wo = (x.shape[2] - window) // stride + 1
    out = None
    for i in range(window):
        for j in range(window):
            v = _window(x, i, j, stride, ho, wo)
            out = v if out is None else jnp.maximum(out, v)
    return out


def _max_pool_fwd(x, window, stride):
    if window * window > 127:
        raise ValueError(f"max_pool_strided supports windows of at most 11×11, got {window}×{window}")
    ho = (x.shape[1] - window) // stride + 1
    wo = (x.shape[2] - window) // stride + 1
    out, idx = None, None
    for i in range(window):
        for j in range(window):
            v = _window(x, i, j, stride, ho, wo)
            if out is None:
                out, idx = v, jnp.zeros(v.shape, jnp.int8)
            else:
                idx = jnp.where(v > out, jnp.int8(i * window + j), idx)  # strict: the first maximum wins
                out = jnp.maximum(out, v)
    return out, (idx, x.shape)


def _max_pool_bwd(window, stride, res, g):
    idx, shape = res
    h, w = shape[1], shape[2]
    ho, wo = g.shape[1], g.shape[2]
    zero = jnp.zeros((), g.dtype)
    dx = None
    for i in range(window):
        for j in range(window):
            part = jnp.where(idx == i * window + j, g, zero)
            cfg = [(0, 0, 0), (i, h - (i + stride * (ho - 1) + 1), stride - 1),
                   (j, w - (j + stride * (wo - 1) + 1), stride - 1), (0, 0, 0)]
            v = jax.lax.pad(part, zero, cfg)
            dx = v if dx is None else dx + v
    return (dx,)


max_pool_strided.defvjp(_max_pool_fwd, _max_pool_bwd)

def batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
    """Standard Flax BatchNorm with PyTorch's defaults (momentum 0.1 in torch == 0.9 here, eps 1e-5)."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def as_image(x: jax.Array) -> jax.Array:
    """Accept NHWC images, or NHW (adds a channel axis)."""
    if x.ndim == 3:
        return x[..., None]
    if x.ndim != 4:
        raise ValueError(f"convolutional models expect NHWC images, got an input of shape {x.shape}")
    return x
