"""CPU choices: the one place where the engine adapts itself to XLA's CPU backend.

Nothing here changes a result beyond float rounding; every choice is tested equal to the plain path
(``tests/test_cpu.py``). The evaluator and the training step consult this module; models, objectives and
methods never do.

- **Compiler options.** The engine's jitted functions are compiled with :data:`COMPILER_OPTIONS` (each a
  module-level ``jax.jit(..., compiler_options=COMPILER_OPTIONS)``), which keep convolutions out of XLA's
  YNNPACK library path on CPU (XLA's default minus convolutions), where XLA's own convolutions ran a ConvFC
  forward pass and its gradient faster (``benchmarks/conv_layers.py`` measures both). They are fields of XLA's ``DebugOptions``, which every backend shares
  and accepts (a GPU compiler reads none of its ``xla_cpu_*`` fields), so one compilation serves every backend.
- **How to map over points**: :func:`mclandscape.engine.mapping.resolve`.
- **First-layer factorisation** (:func:`first_conv`, :func:`use_factorisation`): a convolution is linear in
  its kernel and bias, so for any coefficients ``conv(x, sum_k c_k K_k) + sum_k c_k b_k = sum_k c_k
  (conv(x, K_k) + b_k)``. When the first convolution of a model is fed by the input alone, the evaluator
  runs it once per *control point* (one convolution with the K kernels stacked along the output channels)
  and lets every point combine those outputs, instead of running it once per point. It is applied from
  outside the model by intercepting that convolution's call (``flax.linen.intercept_methods``), so it works
  for any Flax linen model, a user's included.
- **Kernels for XLA's CPU backend** used by the zoo's layers: :func:`small_map_conv` (im2col for maps
  smaller than the kernel) and :func:`max_pool_strided` (a max-pool with a cheap gradient).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mclandscape.engine import mapping

__all__ = ["COMPILER_OPTIONS", "has_conv", "FirstConv", "first_conv", "use_factorisation", "stacked_first_conv",
           "combine_features", "replace_first_conv", "small_map_conv", "max_pool_strided"]

COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                    "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


# ---- first-layer factorisation --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FirstConv:
    """The first convolution of a model, as :func:`first_conv` finds it.

    Attributes:
      path: the module path of the convolution in the parameter tree (e.g. ``("Conv_0",)``).
      kernel_shape: its kernel's shape ``(h, w, in, out)``.
      use_bias: whether it has a bias.

    Example:
        >>> FirstConv(path=("Conv_0",), kernel_shape=(5, 5, 3, 32), use_bias=True).params({"Conv_0": {"bias": 0}})
        {'bias': 0}
    """

    path: tuple[str, ...]
    kernel_shape: tuple[int, ...]
    use_bias: bool

    def params(self, tree):
        """The subtree of ``tree`` (e.g. stacked control points) holding this convolution's parameters.

        Args:
          tree: a parameter tree (or a stacked one) of the model.

        Returns:
          The ``{"kernel": ..., "bias": ...}`` subtree at :attr:`path`.
        """
        return functools.reduce(operator.getitem, self.path, tree)


class _FirstCall:
    """Interceptor of the first ``nn.Conv`` call: records its module and input and, given ``fn``, returns
    ``fn(module, x)`` instead of running it."""

    def __init__(self, fn: Callable | None = None):
        self.fn, self.module, self.input = fn, None, None

    def __call__(self, next_fun, args, kwargs, context):
        if self.module is None and isinstance(context.module, nn.Conv) and context.method_name == "__call__" and args:
            self.module, self.input = context.module, args[0]
            if self.fn is not None:
                return self.fn(self.module, self.input)
        return next_fun(*args, **kwargs)


def _depends(jaxpr, invars) -> bool:
    """Whether any output of ``jaxpr`` depends on the given input variables (forward data flow)."""
    tainted = set(id(v) for v in invars)
    for eqn in jaxpr.eqns:
        if any(id(v) in tainted for v in eqn.invars if hasattr(v, "aval") and not hasattr(v, "val")):
            tainted.update(id(v) for v in eqn.outvars)
    return any(id(v) in tainted for v in jaxpr.outvars)


def has_conv(params, stacked: int = 0) -> bool:
    """Whether ``params`` hold a convolution kernel: a ``kernel`` leaf of rank >= 3 (a dense kernel is a matrix).

    The CPU choices that treat convolutions apart (XLA's CPU backend runs vmapped, i.e. grouped, convolutions
    slowly) all ask this one question.

    Args:
      params: a parameter tree (arrays or ``jax.ShapeDtypeStruct`` s).
      stacked: leading stack axes every leaf carries (1 for the stacked pivots of a NEB band).

    Returns:
      ``True`` when some ``kernel`` leaf has rank ``>= 3 + stacked``.

    Example:
        >>> import numpy as np
        >>> has_conv({"Conv_0": {"kernel": np.zeros((3, 3, 1, 4))}}), has_conv({"Dense_0": {"kernel": np.zeros((4, 2))}})
        (True, False)
    """
    return any(np.ndim(a) >= 3 + stacked for path, a in jax.tree_util.tree_flatten_with_path(params)[0]
               if path and str(getattr(path[-1], "key", "")) == "kernel")


def first_conv(apply: Callable, params, x) -> FirstConv | None:
    """The first convolution of ``apply(variables, x)``, if it is a Flax ``nn.Conv`` fed by ``x`` alone.

    Traced abstractly (no computation). A convolution whose input depends on the parameters (e.g. after a
    normalisation layer with learned scale) is not "first" in this sense.

    Args:
      apply: the model's ``apply(variables, x)``.
      params: its variables (``{"params": ...}``) or parameter tree.
      x: an input batch.

    Returns:
      A :class:`FirstConv`, or ``None`` when there is no such convolution (or the model cannot be traced so).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> class Net(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         return nn.Dense(2)(nn.Conv(4, (3, 3))(x).reshape(x.shape[0], -1))
        >>> x = jnp.ones((1, 6, 6, 1))
        >>> variables = jax.eval_shape(Net().init, jax.random.key(0), x)  # shapes suffice
        >>> first_conv(Net().apply, variables, x)
        FirstConv(path=('Conv_0',), kernel_shape=(3, 3, 1, 4), use_bias=True)
    """
    enter, cap = capture_first_conv()

    def conv_input(p):
        with enter:
            apply(p, x)
        return jnp.zeros(()) if cap.module is None else cap.input

    try:
        closed = jax.make_jaxpr(conv_input)(params)
    except Exception:  # noqa: BLE001 - a model we cannot trace this way is simply not factorised
        return None
    if cap.module is None or _depends(closed.jaxpr, closed.jaxpr.invars):
        return None
    path = tuple(cap.module.path)
    try:
        leaf = FirstConv(path, (), False).params(params.get("params", params) if isinstance(params, dict) else params)
        return FirstConv(path=path, kernel_shape=tuple(int(s) for s in np.shape(leaf["kernel"])), use_bias="bias" in leaf)
    except (KeyError, TypeError):
        return None


def use_factorisation(conv: FirstConv | None, num_points: int, num_control: int, *,
                      backend: str | None = None) -> bool:
    """Whether the evaluator should factorise the first convolution over ``num_control`` control points.

    Combining the K outputs costs K multiply-adds per output element, read from memory, against the
    convolution's own kernel height × width × input channels. On the 2-core CPU it paid for ConvFC
    (5×5×3 = 75) on a quadratic curve (K = 3, 21 points), not on a 3×3-control surface (K = 9, 121 points)
    nor for a 3×3 one-channel digits convolution with K = 9 (``benchmarks/convfc_curve.py`` measures these
    paths). Hence: more points than control points and at least 16 K multiply-adds per output. Not on other
    backends (unmeasured there).

    Args:
      conv: the model's :class:`FirstConv` (``None``: no factorisation).
      num_points: points to evaluate.
      num_control: control points K.
      backend: default: JAX's default backend.

    Returns:
      A ``bool``.

    Example:
        >>> conv = FirstConv(path=("Conv_0",), kernel_shape=(5, 5, 3, 32), use_bias=True)
        >>> use_factorisation(conv, 21, 3, backend="cpu"), use_factorisation(conv, 121, 9, backend="cpu")
        (True, False)
    """
    if conv is None or (backend or mapping.backend()) != "cpu":
        return False
    # the convolution's multiply-adds per output element: kernel height × width × input channels
    return num_points > num_control and int(np.prod(conv.kernel_shape[:-1])) >= 16 * num_control


def stacked_first_conv(module: nn.Conv, kernel: jax.Array, bias: jax.Array | None, x: jax.Array) -> jax.Array:
    """The convolution ``module`` with K kernels, run as one convolution with ``K * Cout`` output channels.

    Args:
      module: the ``nn.Conv`` (its configuration: window, strides, padding).
      kernel: ``[K, h, w, Cin, Cout]`` stacked kernels.
      bias: ``[K, Cout]`` stacked biases, or ``None``.
      x: the input batch.

    Returns:
      ``[..., K, Cout]``: every control point's convolution output.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> conv, x = nn.Conv(2, (3, 3)), jnp.linspace(0.0, 1.0, 16).reshape(1, 4, 4, 1)
        >>> kernels, biases = jnp.linspace(-1.0, 1.0, 54).reshape(3, 3, 3, 1, 2), jnp.ones((3, 2))
        >>> out = stacked_first_conv(conv, kernels, biases, x)
        >>> one = conv.apply({"params": {"kernel": kernels[1], "bias": biases[1]}}, x)
        >>> out.shape, bool(jnp.allclose(out[..., 1, :], one, atol=1e-5))
        ((1, 4, 4, 3, 2), True)
    """
    num_k, cout = kernel.shape[0], kernel.shape[-1]
    stacked = jnp.moveaxis(kernel, 0, -2).reshape(kernel.shape[1:-1] + (num_k * cout,))
    wide = module.clone(parent=None, features=num_k * cout)
    biases = {} if bias is None else {"bias": bias.reshape(num_k * cout)}
    h = wide.apply({"params": {"kernel": stacked, **biases}}, x)
    return h.reshape(h.shape[:-1] + (num_k, cout))


def combine_features(coefficients: jax.Array, features: jax.Array) -> jax.Array:
    """``sum_k c_k features[..., k, :]``: one point's first-layer output from the control points' outputs.

    Exact for any coefficients (each control point's output includes its own bias). Accumulated in float32
    (or the features' wider dtype).

    Args:
      coefficients: ``[K]`` coefficients of the point.
      features: ``[..., K, C]`` outputs of :func:`stacked_first_conv`.

    Returns:
      ``[..., C]`` in ``features.dtype``.

    Example:
        >>> import jax.numpy as jnp
        >>> combine_features(jnp.array([0.5, 0.5]), jnp.array([[[0.0, 2.0], [2.0, 4.0]]])).tolist()
        [[1.0, 3.0]]
    """
    acc = jnp.promote_types(features.dtype, jnp.float32)
    c = coefficients.astype(acc)
    out = c[0] * features[..., 0, :].astype(acc)
    for k in range(1, features.shape[-2]):
        out = out + c[k] * features[..., k, :].astype(acc)
    return out.astype(features.dtype)


def replace_first_conv(fn: Callable[[nn.Conv, jax.Array], jax.Array]):
    """A context manager under which the first ``nn.Conv`` call of each Flax ``apply`` returns ``fn(module, x)``.

    Enter it around exactly one ``apply``.

    Args:
      fn: ``fn(module, x) -> output`` replacing that convolution's call.

    Returns:
      The context manager (``flax.linen.intercept_methods``).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> conv, x = nn.Conv(2, (3, 3)), jnp.ones((1, 4, 4, 1))
        >>> variables = conv.init(jax.random.key(0), x)
        >>> with replace_first_conv(lambda module, x: jnp.zeros(x.shape[:-1] + (module.features,))):
        ...     out = conv.apply(variables, x)
        >>> out.shape, float(jnp.abs(out).max())
        ((1, 4, 4, 2), 0.0)
    """
    return nn.intercept_methods(_FirstCall(fn))


def capture_first_conv():
    """``(context manager, capture)``: under the context manager the first ``nn.Conv`` call is recorded in
    ``capture.module`` / ``capture.input`` and runs as usual."""
    cap = _FirstCall()
    return nn.intercept_methods(cap), cap


# ---- kernels for XLA's CPU backend ----------------------------------------------------------------------

def small_map_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                   preferred_element_type=None):
    """``jax.lax.conv_general_dilated``, as an im2col matrix product when the feature map is smaller than the kernel.

    The ``conv_general_dilated`` of the zoo's ``nn.Conv`` layers. XLA's CPU backend rewrites such convolutions
    (e.g. VGG16's 3×3 convolutions on 2×2 maps, or a CNN's last layers on 8×8 digits) into a form it runs
    many times slower than the equivalent matrix product. Same result up to
    float rounding; any other convolution (and any stride, dilation, grouping or layout other than NHWC/HWIO)
    goes to ``lax.conv_general_dilated``.

    Args:
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
        batch_group_count, precision, preferred_element_type: as for ``jax.lax.conv_general_dilated``.

    Returns:
      The convolution's output.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jnp.linspace(-1.0, 1.0, 24).reshape(2, 2, 2, 3)  # 2x2 maps, 3x3 kernel: the im2col path
        >>> k = jnp.linspace(-1.0, 1.0, 108).reshape(3, 3, 3, 4)
        >>> dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
        >>> both = jax.jit(lambda x, k: (small_map_conv(x, k, (1, 1), "SAME", dimension_numbers=dn),
        ...                              jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn)))
        >>> out, ref = both(x, k)
        >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-4))
        ((2, 2, 2, 4), True)
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


def _windows(x, window: int, stride: int):
    """The ``window²`` strided slices of ``x`` whose maximum is the pooled output, in row-major window order."""
    ho, wo = (x.shape[1] - window) // stride + 1, (x.shape[2] - window) // stride + 1
    return [jax.lax.slice(x, (0, i, j, 0), (x.shape[0], i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1,
                                            x.shape[3]), (1, stride, stride, 1))
            for i in range(window) for j in range(window)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool_strided(x: jax.Array, window: int, stride: int) -> jax.Array:
    """``"VALID"`` max-pooling of NHWC ``x`` as the maximum of ``window²`` strided slices.

    Values equal ``flax.linen.max_pool``'s exactly. The gradient goes to the first maximum of each window in
    row-major order (as XLA's select-and-scatter and PyTorch do): the forward pass of a differentiated
    call records that window offset (int8), and the backward pass scatters with strided pads, which XLA
    fuses into one loop, on CPU a much cheaper gradient than the reduce-window one.

    Args:
      x: ``[N, H, W, C]`` feature maps.
      window: the square window's side (at most 11 when differentiated).
      stride: the stride in both directions.

    Returns:
      ``[N, (H - window) // stride + 1, (W - window) // stride + 1, C]``.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
        >>> max_pool_strided(x, 2, 2)[0, :, :, 0].tolist()
        [[5.0, 7.0], [13.0, 15.0]]
    """
    return functools.reduce(jnp.maximum, _windows(x, window, stride))


def _max_pool_fwd(x, window, stride):
    if window * window > 127:
        raise ValueError(f"max_pool_strided supports windows of at most 11×11, got {window}×{window}")
    out, *rest = _windows(x, window, stride)
    idx = jnp.zeros(out.shape, jnp.int8)
    for k, v in enumerate(rest, 1):
        idx = jnp.where(v > out, jnp.int8(k), idx)  # strict: the first maximum wins
        out = jnp.maximum(out, v)
    return out, (idx, x.shape)


def _max_pool_bwd(window, stride, res, g):
    idx, (_, h, w, _) = res
    ho, wo, zero = g.shape[1], g.shape[2], jnp.zeros((), g.dtype)

    def scatter(i, j):  # window offset (i, j)'s share of the gradient, back at its input positions
        cfg = [(0, 0, 0), (i, h - (i + stride * (ho - 1) + 1), stride - 1),
               (j, w - (j + stride * (wo - 1) + 1), stride - 1), (0, 0, 0)]
        return jax.lax.pad(jnp.where(idx == i * window + j, g, zero), zero, cfg)

    return (functools.reduce(jnp.add, [scatter(i, j) for i in range(window) for j in range(window)]),)


max_pool_strided.defvjp(_max_pool_fwd, _max_pool_bwd)
