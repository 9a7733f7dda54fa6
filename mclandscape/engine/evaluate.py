"""The point-evaluation engine: loss, accuracy and output probabilities of many parameter points.

Two entry points share one engine:

- :func:`evaluate_params` takes P parameter pytrees stacked on a leading axis (band pivots, ensemble
  members, lattice voxels);
- :func:`evaluate_points` takes a :class:`~mclandscape.core.connectors.Connector` and P points on it; each
  point's parameters are formed inside the mapped computation from one coefficient row
  (``sum_k c_k theta_k``, seed 000 eq. 6), so at most ``chunk_size`` parameter copies per device exist at
  any time, never all P.

Strategies (``strategy=``):

- ``"loop"``: a Python loop over points calling one jitted single-point function;
- ``"map"``: one jitted ``jax.lax.map`` over points with ``batch_size=chunk_size`` (chunk 1 is an XLA
  loop; chunk c vmaps c points at a time);
- ``"vmap"``: ``jax.vmap`` over chunks of ``chunk_size`` points, chunks looped in Python;
- ``"auto"``: on CPU ``"map"`` with chunk 1 for models with convolutions (per-point ``vmap`` gives each
  point its own convolution kernels and was 2-35x slower on this CPU) and chunk 16 for models without
  (a 64-128-128-10 MLP on 360 digits: 0.23 ms/point against 0.28 with chunk 1), see :func:`auto_strategy`;
  ``"map"`` with a chunk bounded by memory (``chunk_bytes``) on GPU/TPU. ``benchmarks/surface_sampling.py``
  and ``benchmarks/convfc_curve.py`` measure the choice.

First layer (``stem=``; models that expose ``model.stem``, a
:class:`~mclandscape.engine.models.base.StemSpec` — every zoo conv model does; other models always take ``"off"``):

- ``"off"``: ``model.apply`` as is;
- ``"split"``: the stem convolution and the body applied separately, with the stem's input channels
  zero-padded to a multiple of ``stem_channels`` (identical results: zero channels meet zero kernel rows).
  With XLA's YNNPACK convolutions (``compiler_options=None`` on CPU) a 5×5 3→32 convolution of 128 CIFAR
  images took ~30 ms with 3 input channels and ~10 ms with 4 (8 was slower than 4); with XLA's own
  convolutions (the default here) ~10 ms either way, see ``benchmarks/convfc_curve.py``;
- ``"factor"`` (connectors only): the stem runs once per *control point* on each data batch, as one
  convolution with the K kernels stacked along the output channels, and each point combines the K
  outputs with its coefficients: ``conv(x, sum_k c_k K_k) + sum_k c_k b_k = sum_k c_k (conv(x, K_k) +
  b_k)`` holds for any coefficients (it is linear in the stem's parameters), so K convolutions replace P.
  The K outputs of a group of data batches are staged once (at most ``stem_bytes``) and shared by all P
  points;
- ``"auto"``: see :func:`auto_stem`.

Compiler options (``compiler_options=``, per compiled function, never global): ``"auto"`` (default) takes
:func:`default_compiler_options`, which on CPU keeps convolutions out of XLA's YNNPACK library path
(``xla_cpu_experimental_ynn_fusion_type`` = dots and reductions only, i.e. XLA's default minus
convolutions): on the 2-core CPU XLA's own (Eigen) convolutions ran a ConvFC forward pass in 44 ms against
77 ms, and its gradient in 152 ms against 204 ms (batch 128, issue 9). ``None`` compiles with XLA's
defaults; a dict is passed to ``jax.jit(..., compiler_options=...)`` as is.

``compute_dtype`` (e.g. ``"bfloat16"``) casts each point's parameters and the inputs before the forward
pass (mixed precision for GPUs); losses, accuracies and BatchNorm statistics are accumulated in float32.

With several devices, points are sharded over a 1-D mesh with ``jax.shard_map`` (data and control points
replicated); results equal the single-device ones.

BatchNorm (models with ``apply_with_stats``): before a point is evaluated its running statistics are
recomputed on ``bn_data`` as the exact average of the per-batch statistics over ``bn_batches`` full
batches, as Garipov et al.'s ``update_bn`` does (with equal batch sizes, the example-weighted average).
This runs inside the same mapped computation, batched over points.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mclandscape.core.connectors import Connector
from mclandscape.core.losses import correct as _correct
from mclandscape.core.losses import cross_entropy
from mclandscape.core.tree import PyTree, check_finite, tree_combine
from mclandscape.engine.models.base import Model

__all__ = [
    "PointMetrics",
    "evaluate_params",
    "evaluate_points",
    "recalibrate_bn",
    "bn_momentum",
    "stage_batches",
    "uv_grid",
    "auto_strategy",
    "auto_stem",
    "stem_control_features",
    "default_compiler_options",
    "resolve_compiler_options",
    "ynn_convolutions",
    "CPU_COMPILER_OPTIONS",
    "combine_stem_features",
    "pad_stem_input",
    "STRATEGIES",
    "STEM_MODES",
]

STRATEGIES = ("auto", "loop", "map", "vmap")
STEM_MODES = ("auto", "off", "split", "factor")


@dataclasses.dataclass(frozen=True)
class PointMetrics:
    """Per-point results: ``loss[P]`` (mean task loss), ``accuracy[P]`` (NaN for non-integer targets) and
    optionally ``probs[P, N, C]`` (softmax outputs per example); the strategy, chunk, first-layer mode and
    padded stem input channels (``None``: not padded) that were used."""

    loss: np.ndarray
    accuracy: np.ndarray
    probs: np.ndarray | None = None
    strategy: str = ""
    chunk_size: int = 1
    stem: str = "off"
    stem_channels: int | None = None


def uv_grid(steps: int = 11) -> np.ndarray:
    """The (u, v) grid ``[steps*steps, 2]`` with spacing ``1/(steps-1)``, u major (default step 0.1)."""
    if steps < 2:
        raise ValueError(f"a grid needs at least 2 steps per axis, got {steps}")
    g = np.linspace(0.0, 1.0, steps)
    uu, vv = np.meshgrid(g, g, indexing="ij")
    return np.stack([uu.ravel(), vv.ravel()], axis=1)


def _xy(data) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(data, "x") and hasattr(data, "y"):
        return np.asarray(data.x), np.asarray(data.y)
    if isinstance(data, tuple | list) and len(data) == 2:
        return np.asarray(data[0]), np.asarray(data[1])
    raise ValueError("data must be a Dataset (with .x and .y) or an (x, y) tuple of arrays")


def stage_batches(x: np.ndarray, y: np.ndarray | None, batch_size: int, *, drop_last: bool = False):
    """Reshape a dataset into ``[num_batches, batch_size, ...]`` device arrays with a validity mask.

    The last partial batch is zero-padded and masked out (or dropped with ``drop_last``). Staged once,
    these arrays are shared by every point.
    """
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("empty dataset")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bs = min(batch_size, n)
    nb = n // bs if drop_last else -(-n // bs)
    if nb == 0:
        raise ValueError(f"no full batch of {bs} examples in {n}")
    total = nb * bs
    keep = min(n, total)
    pad = total - keep

    def prep(a):
        a = np.asarray(a)[:keep]
        if pad:
            a = np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)])
        return jnp.asarray(a.reshape((nb, bs) + a.shape[1:]))

    mask = np.ones(total, np.float32)
    mask[keep:] = 0.0
    return prep(x), (prep(y) if y is not None else None), jnp.asarray(mask.reshape(nb, bs))


def _zeros_stats(model: Model, params: PyTree, x_example) -> PyTree:
    shapes = jax.eval_shape(model.init, jax.random.key(0), x_example)
    if "batch_stats" not in shapes:
        raise ValueError(f"model {model.name} has apply_with_stats but its variables hold no 'batch_stats'")
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["batch_stats"])


_BN_RNG = {"dropout": jax.random.key(0)}


def bn_momentum(model: Model, params: PyTree, x: np.ndarray) -> PyTree:
    """Recover each BatchNorm layer's running-average momentum from two calls on one batch.

    A Flax BatchNorm update is ``r' = m r + (1 - m) b`` with the batch statistic ``b``. Starting from
    ``r = 0`` gives ``(1 - m) b``; from ``r = 1`` gives ``m + (1 - m) b``; their difference is ``m``. This
    makes the exact recalibration work for any Flax model with standard BatchNorm, whatever momentum.
    """
    x = jnp.asarray(x)
    zeros = _zeros_stats(model, params, x[:1])
    ones = jax.tree_util.tree_map(jnp.ones_like, zeros)
    _, s0 = model.apply_with_stats({"params": params, "batch_stats": zeros}, x, rngs=_BN_RNG)
    _, s1 = model.apply_with_stats({"params": params, "batch_stats": ones}, x, rngs=_BN_RNG)

    def mom(a, b):
        m = np.asarray(b - a, np.float64)
        mm = float(np.mean(m))
        if not np.allclose(m, mm, atol=1e-4) or not 0.0 <= mm < 1.0 - 1e-6:
            raise ValueError("BatchNorm running statistics are not a momentum average r' = m r + (1-m) b "
                             f"with one m per layer in [0, 1) (found m in [{m.min():.4g}, {m.max():.4g}])")
        return jnp.asarray(mm, jnp.float32)

    return jax.tree_util.tree_map(mom, s0, s1)


def _bn_stats_fn(model: Model, zeros: PyTree, momentum: PyTree, apply_with_stats: Callable | None = None):
    """Pure function params, bn_x[nb, B, ...] -> exact average batch statistics over the nb batches."""
    apply_with_stats = apply_with_stats or model.apply_with_stats

    def stats(params, bn_x):
        def body(acc, xb):
            _, s0 = apply_with_stats({"params": params, "batch_stats": zeros}, xb, rngs=_BN_RNG)
            b = jax.tree_util.tree_map(lambda s, m: s.astype(jnp.float32) / (1.0 - m), s0, momentum)
            return jax.tree_util.tree_map(jnp.add, acc, b), None

        acc, _ = jax.lax.scan(body, zeros, bn_x)
        return jax.tree_util.tree_map(lambda a: a / bn_x.shape[0], acc)

    return stats


def recalibrate_bn(model: Model, params: PyTree, bn_data, *, batch_size: int = 128,
                   num_batches: int | None = None, compiler_options="auto") -> PyTree:
    """BatchNorm statistics of one parameter point, averaged exactly over ``num_batches`` full batches.

    ``bn_data`` is a Dataset or ``(x, y)`` (or an ``x`` array); batches are taken in order. Garipov's
    ``update_bn`` computes the same cumulative average (of per-batch means and biased variances).
    """
    if not model.has_batch_stats:
        raise ValueError(f"model {model.name} has no BatchNorm statistics to recalibrate")
    x = bn_data if isinstance(bn_data, np.ndarray | jax.Array) else _xy(bn_data)[0]
    bx = _bn_batches(x, batch_size, num_batches)
    mom = bn_momentum(model, params, bx[0])
    zeros = _zeros_stats(model, params, bx[0][:1])
    options = resolve_compiler_options(compiler_options)
    jit = functools.partial(jax.jit, compiler_options=options) if options else jax.jit
    return jit(_bn_stats_fn(model, zeros, mom))(params, bx)


def _bn_batches(x, batch_size: int, num_batches: int | None):
    bx, _, _ = stage_batches(np.asarray(x), None, batch_size, drop_last=True)
    if num_batches is not None:
        if num_batches < 1:
            raise ValueError(f"bn_batches must be >= 1, got {num_batches}")
        if num_batches > bx.shape[0]:
            raise ValueError(f"bn_batches={num_batches} but bn_data has only {bx.shape[0]} full batches "
                             f"of {bx.shape[1]}")
        bx = bx[:num_batches]
    return bx


CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.lru_cache(maxsize=8)
def _options_accepted(items: tuple) -> bool:
    """Whether this jaxlib accepts the compiler options (probed once on a tiny function)."""
    try:
        jax.jit(lambda v: v + 1, compiler_options=dict(items)).lower(jnp.zeros(2)).compile()
        return True
    except Exception:  # an XLA without the option: fall back to its defaults
        return False


def default_compiler_options(backend: str | None = None) -> dict | None:
    """The per-function XLA options the engines use with ``compiler_options="auto"`` (module docstring):
    :data:`CPU_COMPILER_OPTIONS` on CPU when this XLA knows the option, else ``None`` (XLA's defaults)."""
    backend = backend or jax.default_backend()
    if backend == "cpu" and _options_accepted(tuple(sorted(CPU_COMPILER_OPTIONS.items()))):
        return dict(CPU_COMPILER_OPTIONS)
    return None


def resolve_compiler_options(compiler_options) -> dict | None:
    """``"auto"`` -> :func:`default_compiler_options`; ``None`` or a dict are returned as they are."""
    if isinstance(compiler_options, str):
        if compiler_options != "auto":
            raise ValueError(f"compiler_options must be 'auto', None or a dict, got {compiler_options!r}")
        return default_compiler_options()
    if compiler_options is not None and not isinstance(compiler_options, dict):
        raise ValueError(f"compiler_options must be 'auto', None or a dict, got {compiler_options!r}")
    return None if compiler_options is None else dict(compiler_options)


def ynn_convolutions(compiler_options: dict | None, backend: str | None = None) -> bool:
    """Whether XLA's CPU backend sends convolutions to YNNPACK under these options."""
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return False
    v = (compiler_options or {}).get("xla_cpu_experimental_ynn_fusion_type")
    return v is None or "CONVOLUTION" in str(v).upper()


def auto_strategy(num_points: int, param_bytes: int, *, backend: str | None = None,
                  chunk_bytes: int = 1 << 30, has_conv: bool = True) -> tuple[str, int]:
    """The default ``(strategy, chunk_size)`` for a backend (see the module docstring).

    CPU, measured on a quiet moment (digits, 3×3-control surface, 121 points, interleaved repeats): a
    64-128-128-10 MLP ran at 0.231 ms/point with ``map`` chunk 16 against 0.279 with chunk 1 (equal at 16
    points), so models without convolutions take chunk ``min(16, P)``; the simple CNN ran at 4.10 ms/point
    with chunk 1 against 4.61 with chunk 16 (batched points give each point its own kernels), so
    convolutional models keep chunk 1.
    """
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return ("map", 1) if has_conv else ("map", int(max(1, min(16, num_points))))
    chunk = int(max(1, min(num_points, 64, chunk_bytes // max(param_bytes, 1))))
    return "map", chunk


# ---- the first layer ------------------------------------------------------------------------------------

def _stem_cin(model: Model, params_example: PyTree) -> int:
    kernel = params_example[model.stem.name]["kernel"]
    return int(np.shape(kernel)[-2])


def _padded_channels(cin: int, multiple: int | None) -> int:
    if not multiple or multiple <= 1:
        return cin
    return -(-cin // multiple) * multiple


def auto_stem(model: Model, kind: str, num_points: int, num_control: int, cin: int, *,
              backend: str | None = None, ynn: bool = False, stem_macs: int | None = None) -> tuple[str, int | None]:
    """The default ``(stem mode, stem_channels)`` (see the module docstring).

    Measured on the 2-core CPU (``benchmarks/convfc_curve.py``, batch 128, 1000 images): combining the
    control points' stem outputs costs K multiply-adds per output element, read from memory, against
    ``stem_macs`` (kernel height × width × input channels) for the stem itself. ConvFC (5×5×3 = 75) on a
    quadratic curve (K = 3, 21 points) ran at 0.325 s/point with ``"factor"`` against 0.342 without; on the
    3×3-control surface (K = 9, 121 points) at 0.449 against 0.364; a 3×3 1-channel digits stem (9) with
    K = 9 lost too (5.3 against 4.1 ms/point). Hence ``"factor"`` needs more points than control points
    and ``stem_macs >= 16 K``. Padding a 3-channel stem input to 4 channels only pays when convolutions go to
    YNNPACK
    (``ynn=True``: 30 ms -> 10 ms); XLA's own convolutions, the default here, take ~10 ms either way. On
    GPU/TPU the compiler pads convolutions for its matrix units itself (unmeasured: no GPU was available).
    """
    backend = backend or jax.default_backend()
    if model.stem is None:
        return "off", None
    channels = 4 if (backend == "cpu" and ynn and model.stem.pad_channels_ok and cin % 4) else None
    stem_macs = 1 << 30 if stem_macs is None else stem_macs  # unknown: assume a costly stem
    if kind == "connector" and num_points > num_control and stem_macs >= 16 * num_control:
        return "factor", channels
    return ("split", channels) if channels else ("off", None)


def pad_stem_input(kernel: jax.Array, x: jax.Array, channels: int) -> tuple[jax.Array, jax.Array]:
    """Zero-pad the stem kernel's input-channel axis (``-2``) and ``x``'s channel axis (``-1``) to
    ``channels``; the convolution is unchanged (the extra channels meet zero kernel rows)."""
    cin = kernel.shape[-2]
    if x.shape[-1] != cin:
        raise ValueError(f"stem kernel takes {cin} input channels but the input has {x.shape[-1]}")
    if channels < cin:
        raise ValueError(f"cannot pad {cin} stem input channels down to {channels}")
    if channels == cin:
        return kernel, x
    kpad = [(0, 0)] * kernel.ndim
    kpad[-2] = (0, channels - cin)
    xpad = [(0, 0)] * x.ndim
    xpad[-1] = (0, channels - cin)
    return jnp.pad(kernel, kpad), jnp.pad(x, xpad)


def _pad_kernel(kernel, channels):
    cin = kernel.shape[-2]
    if channels is None or channels == cin:
        return kernel
    pad = [(0, 0)] * kernel.ndim
    pad[-2] = (0, channels - cin)
    return jnp.pad(kernel, pad)


def stem_control_features(model: Model, control: PyTree, x: jax.Array, *, channels: int | None = None,
                          dtype=None) -> jax.Array:
    """The stem's output for each of K control points, ``[B, ..., K, Cout]``, in one convolution.

    ``control`` holds the stacked parameters (leaves ``[K, ...]``); ``x`` is already prepared
    (``model.stem.prepare``) and, when ``channels`` is given, zero-padded to that many channels. The K
    kernels are stacked along the output channels, so XLA runs one convolution with ``K * Cout`` outputs.
    """
    stem = model.stem
    sp = control[stem.name]
    k = sp["kernel"]
    if dtype is not None:
        k = k.astype(dtype)
    num_k, cout = k.shape[0], k.shape[-1]
    k = _pad_kernel(k, channels)
    kern = jnp.moveaxis(k, 0, -2).reshape(k.shape[1:-1] + (num_k * cout,))
    b = sp.get("bias") if stem.use_bias else None
    bias = None if b is None else b.astype(kern.dtype).reshape(num_k * cout)
    h = stem.apply(kern, bias, x if dtype is None else x.astype(dtype))
    return h.reshape(h.shape[:-1] + (num_k, cout))


def combine_stem_features(coefficients: jax.Array, features: jax.Array) -> jax.Array:
    """``sum_k c_k features[..., k, :]``: one point's stem output from the control points' outputs.

    Exact for any coefficients (also derivative coefficients that do not sum to 1), since each control
    point's output includes its own bias. Accumulated in float32 and returned in ``features.dtype``.
    """
    num_k = features.shape[-2]
    c = coefficients.astype(jnp.float32)
    out = c[0] * features[..., 0, :].astype(jnp.float32)
    for k in range(1, num_k):
        out = out + c[k] * features[..., k, :].astype(jnp.float32)
    return out.astype(features.dtype)


def _split_applies(model: Model, mode: str, channels: int | None):
    """(apply, apply_with_stats) on staged inputs for the "off" and "split" modes."""
    if mode == "off":
        return model.apply, model.apply_with_stats
    stem = model.stem

    def h_of(params, x):
        sp = params[stem.name]
        k = _pad_kernel(sp["kernel"], channels)
        return stem.apply(k, sp.get("bias") if stem.use_bias else None, x)

    def apply(variables, x, train=False, rngs=None):
        return stem.body_apply(variables, h_of(variables["params"], x), train=train, rngs=rngs)

    def apply_with_stats(variables, x, rngs=None):
        return stem.body_apply_with_stats(variables, h_of(variables["params"], x), rngs=rngs)

    return apply, (apply_with_stats if stem.body_apply_with_stats is not None else None)


def _prepare_input(model: Model, mode: str, channels: int | None, x) -> np.ndarray:
    """Host-side input preparation for the stem paths: ``stem.prepare`` and channel zero-padding."""
    if mode == "off":
        return x
    x = np.asarray(model.stem.prepare(jnp.asarray(x)))
    if channels is not None and channels != x.shape[-1]:
        x = np.concatenate([x, np.zeros(x.shape[:-1] + (channels - x.shape[-1],), x.dtype)], axis=-1)
    return x


def _cast(tree, dtype):
    if dtype is None:
        return tree
    return jax.tree_util.tree_map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


# ---- per-point evaluation ---------------------------------------------------------------------------------

def _batch_sums(loss_fn, with_probs, logits, yb, mb):
    logits = logits.astype(jnp.float32)
    lsum = jnp.sum(loss_fn(logits, yb) * mb)
    if jnp.issubdtype(yb.dtype, jnp.integer):
        csum = jnp.sum(_correct(logits, yb) * mb)
    else:
        csum = jnp.asarray(jnp.nan, jnp.float32)
    out = jax.nn.softmax(logits, axis=-1) if with_probs else None
    return lsum, csum, out


def _has_conv(model: Model, params_example: PyTree, x_shape, x_dtype, stem_mode: str) -> bool:
    """Whether one forward pass of ``model`` contains a convolution (traced abstractly, no compute)."""
    if model.stem is not None:
        return True
    leaves, treedef = jax.tree_util.tree_flatten(params_example)
    sig = tuple((tuple(np.shape(a)), str(np.asarray(a).dtype if not hasattr(a, "dtype") else a.dtype))
                for a in leaves)
    return _has_conv_cached(model, treedef, sig, tuple(x_shape), str(np.dtype(x_dtype)))


@functools.lru_cache(maxsize=64)
def _has_conv_cached(model, treedef, sig, x_shape, x_dtype) -> bool:
    params = jax.tree_util.tree_unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in sig])
    x = jax.ShapeDtypeStruct((1,) + x_shape, x_dtype)
    try:
        jaxpr = jax.make_jaxpr(lambda p, v: model.apply({"params": p}, v))(params, x)
    except Exception:  # e.g. a model that needs batch statistics: assume convolutions (the safe choice)
        return True
    return "conv_general_dilated" in str(jaxpr)


def _per_point_fn(model, loss_fn, with_probs, has_bn, make_params, apply=None, apply_with_stats=None,
                  dtype=None):
    apply = apply or model.apply
    apply_with_stats = apply_with_stats or model.apply_with_stats

    def per_point(desc, shared, xs, ys, ms, bn_x, zeros, mom):
        params = _cast(make_params(desc, shared), dtype)
        variables = {"params": params}
        if has_bn:
            bx = bn_x if dtype is None else bn_x.astype(dtype)
            variables["batch_stats"] = _bn_stats_fn(model, zeros, mom, apply_with_stats)(params, bx)

        def body(carry, batch):
            xb, yb, mb = batch
            if dtype is not None:
                xb = xb.astype(dtype)
            lsum, csum, out = _batch_sums(loss_fn, with_probs, apply(variables, xb, train=False), yb, mb)
            return (carry[0] + lsum, carry[1] + csum), out

        (lsum, csum), probs = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
                                           (xs, ys, ms))
        n = jnp.sum(ms)
        return lsum / n, csum / n, probs

    return per_point


def _make_params_stacked(desc, shared):
    return desc


def _make_params_connector(desc, shared):
    return tree_combine(desc, shared)


def _point_map(strategy, chunk):
    def run(f, xs):
        if strategy == "vmap" and chunk <= 1:
            return jax.vmap(f)(xs)
        return jax.lax.map(f, xs, batch_size=chunk if chunk > 1 else None)
    return run


def _factor_fn(model, loss_fn, with_probs, has_bn, strategy, chunk, channels, dtype):
    """run(coefs[P, K], control, xs[ng, gb, B, ...], ys, ms, bn_x[nbg, gbb, B, ...], bn_m[nbg, gbb], zeros,
    mom) for the stem-factorised path: per group of batches the stem runs once per control point, then
    every point combines those outputs and runs the body on them."""
    stem = model.stem
    pmap = _point_map(strategy, chunk)

    def feats(control, xg):
        flat = xg.reshape((-1,) + xg.shape[2:])
        s = stem_control_features(model, control, flat, channels=channels, dtype=dtype)
        return s.reshape(xg.shape[:2] + s.shape[1:])

    def run(coefs, control, xs, ys, ms, bn_x, bn_m, zeros, mom):
        num_p = coefs.shape[0]
        f32 = jnp.float32

        def params_of(c):
            return _cast(tree_combine(c, control), dtype)

        stats = None
        if has_bn:
            def bn_group(acc, g):
                xg, mg = g
                sg = feats(control, xg)

                def one(c):
                    params = params_of(c)

                    def body(a, batch):
                        sb, valid = batch
                        _, s0 = stem.body_apply_with_stats({"params": params, "batch_stats": zeros},
                                                           combine_stem_features(c, sb), rngs=_BN_RNG)
                        b = jax.tree_util.tree_map(lambda s, m: valid * s.astype(f32) / (1.0 - m), s0, mom)
                        return jax.tree_util.tree_map(jnp.add, a, b), None

                    a, _ = jax.lax.scan(body, zeros, (sg, mg))
                    return a

                return jax.tree_util.tree_map(jnp.add, acc, pmap(one, coefs)), None

            acc0 = jax.tree_util.tree_map(lambda z: jnp.zeros((num_p,) + z.shape, f32), zeros)
            stats, _ = jax.lax.scan(bn_group, acc0, (bn_x, bn_m))
            stats = jax.tree_util.tree_map(lambda a: a / jnp.sum(bn_m), stats)

        def group(carry, g):
            xg, yg, mg = g
            sg = feats(control, xg)

            def one(args):
                c, st = args
                variables = {"params": params_of(c)}
                if has_bn:
                    variables["batch_stats"] = st

                def body(acc, batch):
                    sb, yb, mb = batch
                    logits = stem.body_apply(variables, combine_stem_features(c, sb), train=False)
                    lsum, csum, out = _batch_sums(loss_fn, with_probs, logits, yb, mb)
                    return (acc[0] + lsum, acc[1] + csum), out

                (l, cs), probs = jax.lax.scan(body, (jnp.zeros((), f32), jnp.zeros((), f32)), (sg, yg, mg))
                return l, cs, probs

            l, cs, probs = pmap(one, (coefs, stats))
            return (carry[0] + l, carry[1] + cs), probs

        (lsum, csum), probs = jax.lax.scan(group, (jnp.zeros((num_p,), f32), jnp.zeros((num_p,), f32)),
                                           (xs, ys, ms))
        n = jnp.sum(ms)
        if with_probs:  # [ng, P, gb, B, C] -> [P, ng * gb, B, C]
            probs = jnp.moveaxis(probs, 1, 0)
            probs = probs.reshape((num_p, -1) + probs.shape[3:])
        return lsum / n, csum / n, probs

    return run


def _dtype_key(dtype):
    return None if dtype is None else jnp.dtype(dtype).name


@functools.lru_cache(maxsize=64)
def _compiled(model, loss_fn, with_probs, has_bn, kind, strategy, chunk, ndev, stem_mode="off", channels=None,
              dtype=None, options=None):
    dtype = None if dtype is None else jnp.dtype(dtype)
    jit = functools.partial(jax.jit, compiler_options=dict(options)) if options else jax.jit
    if stem_mode == "factor":
        run = _factor_fn(model, loss_fn, with_probs, has_bn, strategy, chunk, channels, dtype)
        nargs = 9
    else:
        make_params = _make_params_connector if kind == "connector" else _make_params_stacked
        apply, apply_ws = _split_applies(model, stem_mode, channels)
        per_point = _per_point_fn(model, loss_fn, with_probs, has_bn, make_params, apply, apply_ws, dtype)
        nargs = 8

        def run(descs, shared, xs, ys, ms, bn_x, zeros, mom):
            f = lambda d: per_point(d, shared, xs, ys, ms, bn_x, zeros, mom)
            if strategy == "map":
                return jax.lax.map(f, descs, batch_size=chunk if chunk > 1 else None)
            if strategy == "vmap":
                return jax.vmap(f)(descs)
            raise ValueError(strategy)

        if strategy == "loop":
            return jit(lambda d, *a: per_point(d, *a))
    if ndev > 1:
        mesh = Mesh(np.asarray(jax.devices()[:ndev]), ("p",))
        run = jax.shard_map(run, mesh=mesh, in_specs=(P("p"),) + (P(),) * (nargs - 1),
                            out_specs=P("p"), check_vma=False)
    return jit(run)


def _group_size(num_batches: int, batch_bytes: int, budget: int) -> int:
    """The largest divisor of ``num_batches`` whose staged stem outputs fit in ``budget`` bytes (>= 1)."""
    best = 1
    for g in range(1, num_batches + 1):
        if num_batches % g == 0 and g * batch_bytes <= budget:
            best = g
    return best


def _evaluate(model: Model, kind: str, descs: PyTree, shared: PyTree, params_example: PyTree, data, *,
              batch_size: int, strategy: str, chunk_size: int | None, bn_data, bn_batches: int | None,
              bn_batch_size: int, return_probs: bool, loss_fn: Callable, devices: int | None,
              stem: str = "off", stem_channels: int | None = None, compute_dtype=None,
              stem_bytes: int = 1 << 29, compiler_options="auto") -> PointMetrics:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if stem not in STEM_MODES:
        raise ValueError(f"unknown stem mode {stem!r}; expected one of {STEM_MODES}")
    x, y = _xy(data)
    num_points = int(jax.tree_util.tree_leaves(descs)[0].shape[0])
    if num_points == 0:
        raise ValueError("empty set of points: give at least one point")
    dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"compute_dtype must be a floating dtype, got {compute_dtype!r}")

    options = resolve_compiler_options(compiler_options)
    # First-layer mode and stem input channels.
    channels = None
    if stem != "off" or stem_channels is not None:
        if model.stem is None:
            if stem in ("split", "factor") or stem_channels is not None:
                raise ValueError(f"stem={stem!r}/stem_channels need a model with a stem (model.stem); "
                                 f"{model.name} has none")
            stem = "off"
        else:
            cin = _stem_cin(model, params_example)
            if stem == "auto":
                num_control = int(jax.tree_util.tree_leaves(shared)[0].shape[0]) if kind == "connector" else 0
                kshape = np.shape(params_example[model.stem.name]["kernel"])
                stem, channels = auto_stem(model, kind, num_points, num_control, cin,
                                           ynn=ynn_convolutions(options), stem_macs=int(np.prod(kshape[:-1])))
                if stem == "factor" and strategy == "loop":  # the Python loop runs points one by one
                    stem = "split" if channels else "off"
            if stem_channels is not None:
                if stem_channels < 1:
                    raise ValueError(f"stem_channels must be >= 1, got {stem_channels}")
                if not model.stem.pad_channels_ok:
                    raise ValueError(f"the stem of {model.name} does not allow channel padding")
                channels = _padded_channels(cin, stem_channels)
                if stem == "off":
                    stem = "split"
            if channels is not None and channels == cin:
                channels = None
    else:
        stem = "off"
    if stem == "factor" and kind != "connector":
        raise ValueError("stem='factor' needs a connector (evaluate_points): stacked parameters have no "
                         "control points to share the first layer")
    if stem == "factor" and strategy == "loop":
        raise ValueError("stem='factor' evaluates all points in one compiled call, not in a Python loop; use strategy 'map', "
                         "'vmap' or 'auto'")

    xp = _prepare_input(model, stem, channels, x)
    xs, ys, ms = stage_batches(xp, y, batch_size)
    has_bn = model.has_batch_stats
    if has_bn:
        if bn_data is None:
            raise ValueError(f"model {model.name} has BatchNorm: pass bn_data (training data) so each point's "
                             "statistics are recomputed before it is evaluated")
        bx_all = bn_data if isinstance(bn_data, np.ndarray | jax.Array) else _xy(bn_data)[0]
        bn_raw = _bn_batches(bx_all, bn_batch_size, bn_batches)
        zeros = _zeros_stats(model, params_example, bn_raw[0][:1])
        mom = bn_momentum(model, params_example, bn_raw[0])
        bn_x = bn_raw
        if stem != "off":
            flat = _prepare_input(model, stem, channels, np.asarray(bn_raw).reshape((-1,) + bn_raw.shape[2:]))
            bn_x = jnp.asarray(flat.reshape(bn_raw.shape[:2] + flat.shape[1:]))
    else:
        bn_x, zeros, mom = jnp.zeros((0,)), {}, {}
    param_bytes = sum(np.size(a) * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(params_example))
    if strategy == "auto":
        strategy, auto_chunk = auto_strategy(num_points, param_bytes,
                                             has_conv=_has_conv(model, params_example, xp.shape[1:], xp.dtype,
                                                                stem))
        chunk_size = chunk_size or auto_chunk
    chunk = int(chunk_size or (1 if strategy == "map" else min(num_points, 16)))
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ndev = len(jax.devices()) if devices is None else int(devices)
    if not 1 <= ndev <= len(jax.devices()):
        raise ValueError(f"devices={devices} but {len(jax.devices())} are available")
    if strategy == "loop":
        ndev = 1
    fn = _compiled(model, loss_fn, bool(return_probs), has_bn, kind, strategy, chunk, ndev, stem, channels,
                   _dtype_key(dtype), tuple(sorted(options.items())) if options else None)

    if stem == "factor":
        args = _factor_args(model, shared, xs, ys, ms, bn_x, has_bn, channels, dtype, stem_bytes, zeros, mom)
    else:
        args = (shared, xs, ys, ms, bn_x, zeros, mom)
    if strategy == "loop":
        outs = [fn(jax.tree_util.tree_map(lambda a, i=i: a[i], descs), *args) for i in range(num_points)]
        loss = np.asarray([o[0] for o in outs])
        acc = np.asarray([o[1] for o in outs])
        probs = np.stack([np.asarray(o[2]) for o in outs]) if return_probs else None
    else:
        # Pad the point set so every call has a fixed shape: to a multiple of the chunk for the
        # Python-chunked vmap, and of the device count when sharded.
        step = chunk * ndev if (strategy == "vmap" and stem != "factor") else ndev
        total = -(-num_points // step) * step
        padded = jax.tree_util.tree_map(
            lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], total - num_points, axis=0)]) if total > num_points
            else a, descs)
        if ndev > 1:
            mesh = Mesh(np.asarray(jax.devices()[:ndev]), ("p",))
            padded = jax.device_put(padded, NamedSharding(mesh, P("p")))
        if strategy == "vmap" and stem != "factor":
            pieces = [fn(jax.tree_util.tree_map(lambda a, s=s: a[s:s + step], padded), *args)
                      for s in range(0, total, step)]
            res = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *pieces)
        else:
            res = fn(padded, *args)
        loss = np.asarray(res[0])[:num_points]
        acc = np.asarray(res[1])[:num_points]
        probs = np.asarray(res[2])[:num_points] if return_probs else None
    if probs is not None:
        probs = probs.reshape((num_points, -1) + probs.shape[3:])[:, : x.shape[0]]
    return PointMetrics(loss=loss, accuracy=acc, probs=probs, strategy=strategy, chunk_size=chunk, stem=stem,
                        stem_channels=channels)


def _factor_args(model, control, xs, ys, ms, bn_x, has_bn, channels, dtype, stem_bytes, zeros, mom):
    """Regroup the staged batches into ``[groups, batches per group, B, ...]`` for the factorised path."""
    if stem_bytes < 1:
        raise ValueError(f"stem_bytes must be >= 1, got {stem_bytes}")
    out = jax.eval_shape(lambda c, xb: stem_control_features(model, c, xb, channels=channels, dtype=dtype),
                         control, jax.ShapeDtypeStruct(xs.shape[1:], xs.dtype))
    batch_bytes = int(np.prod(out.shape)) * jnp.dtype(out.dtype).itemsize

    def regroup(a, nb):
        g = _group_size(nb, batch_bytes, stem_bytes)
        return a.reshape((nb // g, g) + a.shape[1:])

    nb = xs.shape[0]
    xs, ys, ms = regroup(xs, nb), regroup(ys, nb), regroup(ms, nb)
    if has_bn:
        nbb = bn_x.shape[0]
        bn_x = regroup(bn_x, nbb)
        bn_m = jnp.ones(bn_x.shape[:2], jnp.float32)
    else:
        bn_x, bn_m = jnp.zeros((0, 0)), jnp.zeros((0, 0))
    return (control, xs, ys, ms, bn_x, bn_m, zeros, mom)


def evaluate_params(model: Model, stacked_params: PyTree, data, *, batch_size: int = 500,
                    strategy: str = "auto", chunk_size: int | None = None, bn_data=None,
                    bn_batches: int | None = None, bn_batch_size: int = 128, return_probs: bool = False,
                    loss_fn: Callable = cross_entropy, devices: int | None = None,
                    check: bool = True, stem: str = "auto", stem_channels: int | None = None,
                    compute_dtype=None, compiler_options="auto") -> PointMetrics:
    """Mean loss and accuracy on ``data`` of P parameter sets stacked on a leading axis.

    ``stacked_params`` holds the ``params`` collection only (use :func:`mclandscape.core.tree.tree_stack`);
    BatchNorm statistics are recomputed per point from ``bn_data`` (see the module docstring).
    ``stem`` is ``"auto"``, ``"off"`` or ``"split"`` (``"factor"`` needs a connector); ``stem_channels`` pads
    the stem input channels to a multiple; ``compute_dtype`` casts parameters and inputs (e.g. bfloat16);
    ``compiler_options``: see the module docstring.
    """
    leaves = jax.tree_util.tree_leaves(stacked_params)
    if not leaves:
        raise ValueError("stacked_params holds no arrays")
    p = {int(np.shape(a)[0]) if np.ndim(a) else -1 for a in leaves}
    if len(p) != 1 or -1 in p:
        raise ValueError(f"every leaf of stacked_params needs the same leading (points) axis, got sizes {sorted(p)}")
    if check:
        check_finite(stacked_params, "stacked_params")
    example = jax.tree_util.tree_map(lambda a: a[0], stacked_params)
    return _evaluate(model, "stacked", stacked_params, None, example, data, batch_size=batch_size,
                     strategy=strategy, chunk_size=chunk_size, bn_data=bn_data, bn_batches=bn_batches,
                     bn_batch_size=bn_batch_size, return_probs=return_probs, loss_fn=loss_fn, devices=devices,
                     stem=stem, stem_channels=stem_channels, compute_dtype=compute_dtype,
                     compiler_options=compiler_options)


def evaluate_points(model: Model, connector: Connector, points, data, *, batch_size: int = 500,
                    strategy: str = "auto", chunk_size: int | None = None, bn_data=None,
                    bn_batches: int | None = None, bn_batch_size: int = 128, return_probs: bool = False,
                    loss_fn: Callable = cross_entropy, devices: int | None = None,
                    check: bool = True, stem: str = "auto", stem_channels: int | None = None,
                    compute_dtype=None, stem_bytes: int = 1 << 29, compiler_options="auto") -> PointMetrics:
    """Mean loss and accuracy on ``data`` at P points of a connector (t values, (u, v) pairs or alphas).

    Points are validated (in [0, 1], barycentric sums 1; nothing is clipped). Each point's parameters
    ``phi(p) = sum_k c_k(p) theta_k`` (seed 000 eq. 6) are formed inside the mapped computation.
    ``stem`` (``"auto"``, ``"off"``, ``"split"``, ``"factor"``), ``stem_channels``, ``stem_bytes`` (memory for
    the staged per-control-point stem outputs), ``compute_dtype`` and ``compiler_options``: see the module
    docstring.
    """
    pts = connector.validate_points(points)
    if check:
        check_finite(connector.control, "connector control points")
    coef = connector.coefficients(jnp.asarray(pts, jnp.float32))
    example = jax.tree_util.tree_map(lambda a: a[0], connector.control)
    return _evaluate(model, "connector", coef, connector.control, example, data, batch_size=batch_size,
                     strategy=strategy, chunk_size=chunk_size, bn_data=bn_data, bn_batches=bn_batches,
                     bn_batch_size=bn_batch_size, return_probs=return_probs, loss_fn=loss_fn, devices=devices,
                     stem=stem, stem_channels=stem_channels, compute_dtype=compute_dtype, stem_bytes=stem_bytes,
                     compiler_options=compiler_options)
