"""Permutation specs of the zoo architectures, derived from ``model.spec`` (its architecture and arguments):
every hidden unit and channel, residual streams shared, BatchNorm statistics with their channels."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mclandscape.methods.alignment.spec import Axis, Permutation, PermutationSpec, _Flat, apply_permutation

PyTree = Any

ODD_ACTIVATIONS = ("tanh", "identity")  # zoo MLP activations f with f(-x) = -f(x)

# ---------------------------------------------------------------------------------------------------------
# specs of the zoo architectures
# ---------------------------------------------------------------------------------------------------------


class _Builder:
    """Collects the per-leaf entries of a spec layer by layer (the zoo's layer types)."""

    def __init__(self):
        self.axes: dict[str, tuple] = {}
        self.sizes: dict[str, int] = {}
        self.odd: set[str] = set()

    def group(self, name: str, size: int) -> str:
        self.sizes[name] = int(size)
        return name

    def leaf(self, path: str, *entries):
        self.axes[f"params/{path}"] = tuple(entries)

    def dense(self, name: str, p_in, p_out, bias: bool = True):
        self.leaf(f"{name}/kernel", p_in, p_out)
        if bias:
            self.leaf(f"{name}/bias", p_out)

    def conv(self, name: str, p_in, p_out, bias: bool = True):
        self.leaf(f"{name}/kernel", None, None, p_in, p_out)
        if bias:
            self.leaf(f"{name}/bias", p_out)

    def norm(self, name: str, p, stats: bool = True):
        self.leaf(f"{name}/scale", p)
        self.leaf(f"{name}/bias", p)
        if stats:
            self.axes[f"batch_stats/{name}/mean"] = (p,)
            self.axes[f"batch_stats/{name}/var"] = (p,)

    def spec(self) -> PermutationSpec:
        return PermutationSpec(self.axes, self.sizes, frozenset(self.odd))


def _mlp(b: _Builder, widths, use_bias, activation, **_):
    prev = None
    for i, w in enumerate(widths):
        g = b.group(f"Dense_{i}", w)
        b.dense(f"Dense_{i}", prev, g, use_bias)
        if activation in ODD_ACTIVATIONS:
            b.odd.add(g)
        prev = g
    b.dense(f"Dense_{len(widths)}", prev, None, use_bias)


def _convnet(b: _Builder, channels, hidden):
    """simple_cnn / convfc: conv layers ``stem``, ``conv1``, ..., then flatten (tiled) and dense layers."""
    prev = None
    for i, c in enumerate(channels):
        name = "stem" if i == 0 else f"conv{i}"
        g = b.group(name, c)
        b.conv(name, prev, g)
        prev = g
    prev = Axis((prev,), tiled=True) if prev is not None else None
    for name, h in hidden:
        g = b.group(name, h)
        b.dense(name, prev, g)
        prev = g
    b.dense("head", prev, None)


def _vgg(b: _Builder, batch_norm, width):
    from mclandscape.engine.models.vgg import VGG16_CFG

    prev, i = None, 0
    for v in VGG16_CFG:
        if v == "M":
            continue
        name = "stem" if i == 0 else f"conv{i}"
        g = b.group(name, v)
        b.conv(name, prev, g)
        if batch_norm:
            b.norm(f"{name}_bn", g)
        prev, i = g, i + 1
    prev = Axis((prev,), tiled=True)
    for j in range(2):
        g = b.group(f"fc{j}", width)
        b.dense(f"fc{j}", prev, g)
        prev = g
    b.dense("head", prev, None)


def _resnet(b: _Builder, stage_sizes, widths, *, preact=False, shortcut="B", bottleneck=False):
    """The zoo's ResNet (:class:`mclandscape.engine.models.resnet.ResNet`): one group per residual stream (the
    stem's, then a new one wherever a block changes the shape through a projection shortcut); option-A
    shortcuts extend the stream by two zero-padding blocks instead."""
    stream = (b.group("stem", widths[0]),)
    ch = int(widths[0])
    b.conv("stem", None, stream, False)
    if not preact:
        b.norm("stem_bn", stream)
    for s, (n_blocks, w) in enumerate(zip(stage_sizes, widths, strict=True)):
        for blk in range(int(n_blocks)):
            stride = 2 if (s > 0 and blk == 0) else 1
            name = f"stage{s}_block{blk}"
            out_ch = 4 * int(w) if bottleneck else int(w)
            new = stream
            if stride != 1 or ch != out_ch:
                if shortcut == "A" and not preact and not bottleneck:
                    extra = out_ch - ch
                    lo = (b.group(f"{name}/pad_lo", extra // 2),) if extra // 2 else ()
                    hi = (b.group(f"{name}/pad_hi", extra - extra // 2),) if extra - extra // 2 else ()
                    new = lo + stream + hi
                else:
                    new = (b.group(f"{name}/stream", out_ch),)
            c1 = b.group(f"{name}/conv1", w)
            if bottleneck:
                c2 = b.group(f"{name}/conv2", w)
                b.norm(f"{name}/bn1", stream)
                b.conv(f"{name}/conv1", stream, c1, False)
                b.norm(f"{name}/bn2", c1)
                b.conv(f"{name}/conv2", c1, c2, False)
                b.norm(f"{name}/bn3", c2)
                b.conv(f"{name}/conv3", c2, new, False)
            elif preact:
                b.norm(f"{name}/bn1", stream)
                b.conv(f"{name}/conv1", stream, c1, False)
                b.norm(f"{name}/bn2", c1)
                b.conv(f"{name}/conv2", c1, new, False)
            else:
                b.conv(f"{name}/conv1", stream, c1, False)
                b.norm(f"{name}/bn1", c1)
                b.conv(f"{name}/conv2", c1, new, False)
                b.norm(f"{name}/bn2", new)
            if new != stream and not (shortcut == "A" and not preact and not bottleneck):
                b.conv(f"{name}/shortcut_conv", stream, new, False)
                if not preact:
                    b.norm(f"{name}/shortcut_bn", new)
            stream, ch = new, out_ch
    if preact:
        b.norm("final_bn", stream)
    b.dense("head", stream, None)


def _densenet(b: _Builder, depth, growth_rate, compression, **_):
    from mclandscape.engine.models.densenet import densenet_layers, transition_channels

    layers = densenet_layers(depth)
    k = int(growth_rate)
    segs = (b.group("stem", 2 * k),)
    b.conv("stem", None, segs, False)
    for blk in range(3):
        for i in range(layers):
            name = f"block{blk}_layer{i}"
            mid, new = b.group(f"{name}/conv1", 4 * k), b.group(f"{name}/conv2", k)
            b.norm(f"{name}/bn1", segs)
            b.conv(f"{name}/conv1", segs, mid, False)
            b.norm(f"{name}/bn2", mid)
            b.conv(f"{name}/conv2", mid, new, False)
            segs = segs + (new,)
        if blk < 2:
            t = f"transition{blk}"
            out = b.group(t, transition_channels(sum(b.sizes[g] for g in segs), compression))
            b.norm(f"{t}/bn", segs)
            b.conv(f"{t}/conv", segs, out, False)
            segs = (out,)
    b.norm("final_bn", segs)
    b.dense("head", segs, None)


def _vit(b: _Builder, dim, depth, heads, mlp_dim, **_):
    s = b.group("stream", dim)
    b.conv("stem", None, s)
    b.leaf("cls_token", None, None, s)
    b.leaf("pos_embedding", None, None, s)
    if dim % heads:
        raise ValueError(f"ViT dim {dim} is not divisible by heads {heads}")
    for i in range(int(depth)):
        name = f"block{i}"
        h = b.group(f"{name}/heads", heads)
        qk, v = b.group(f"{name}/qk", dim // heads), b.group(f"{name}/v", dim // heads)
        m = b.group(f"{name}/mlp", mlp_dim)
        b.norm(f"{name}/ln1", s, stats=False)
        for proj, g in (("query", qk), ("key", qk), ("value", v)):
            b.leaf(f"{name}/attn/{proj}/kernel", s, h, g)
            b.leaf(f"{name}/attn/{proj}/bias", h, g)
        b.leaf(f"{name}/attn/out/kernel", h, v, s)
        b.leaf(f"{name}/attn/out/bias", s)
        b.norm(f"{name}/ln2", s, stats=False)
        b.dense(f"{name}/mlp1", s, m)
        b.dense(f"{name}/mlp2", m, s)
    b.norm("ln_final", s, stats=False)
    b.dense("head", s, None)


def _zoo_spec(arch: str, kw: Mapping) -> PermutationSpec:
    b = _Builder()
    if arch == "mlp":
        _mlp(b, [int(w) for w in kw["widths"]], kw["use_bias"], kw["activation"])
    elif arch == "simple_cnn":
        _convnet(b, [int(c) for c in kw["channels"]], [("fc", int(kw["hidden"]))])
    elif arch == "convfc":
        _convnet(b, [int(c) for c in kw["channels"]], [(f"fc{i}", int(h)) for i, h in enumerate(kw["hidden"])])
    elif arch in ("vgg16", "vgg16_bn"):
        _vgg(b, arch == "vgg16_bn", int(kw["width"]))
    elif arch == "resnet18":
        _resnet(b, (2, 2, 2, 2), (64, 128, 256, 512), shortcut="B")
    elif arch == "resnet20":
        _resnet(b, (3, 3, 3), (16, 32, 64), shortcut=kw["shortcut"])
    elif arch == "preresnet20":
        _resnet(b, (3, 3, 3), (16, 32, 64), preact=True)
    elif arch == "preresnet164":
        from mclandscape.engine.models.resnet import preresnet_bottleneck_blocks

        n = preresnet_bottleneck_blocks(kw["depth"])
        _resnet(b, (n, n, n), (16, 32, 64), preact=True, bottleneck=True)
    elif arch == "densenet100":
        _densenet(b, **kw)
    elif arch == "vit_small":
        _vit(b, **kw)
    else:  # a registry entry without a spec here
        raise ValueError(f"no permutation spec for architecture {arch!r}; declare one with PermutationSpec(...)")
    return b.spec()


def _zoo_arch(spec) -> str | None:
    """The zoo architecture a model's spec names with its constructor arguments (as ``get_model`` records
    them), else ``None``: a wrapped user module's spec (``{"arch": class name}``) never picks a zoo spec."""
    from mclandscape.engine.models import canonical_name

    if not isinstance(spec, Mapping) or "arch" not in spec or not isinstance(spec.get("kwargs"), Mapping):
        return None
    try:
        return canonical_name(spec["arch"])
    except ValueError:
        return None


def _dense_chain(flat: _Flat) -> list[tuple[str, tuple[int, int], bool]] | str:
    """``[(module, kernel shape, has bias)]`` in the order the layers chain (each one reads the previous one's
    outputs; Flax numbers modules as they are built, not as they are called) if the variables are only Dense
    layers and exactly one order chains them, else the reason they are not."""
    if flat.collections != {"params"}:
        return f"it has the collections {sorted(flat.collections)}, not params alone"
    modules: dict[str, dict[str, tuple]] = {}
    for path, leaf in flat.leaves.items():
        module, _, name = path[len("params/"):].rpartition("/")
        modules.setdefault(module, {})[name] = tuple(np.shape(leaf))
    layers = {}
    for module, leaves in modules.items():
        kernel, bias = leaves.get("kernel"), leaves.get("bias")
        if set(leaves) - {"kernel", "bias"} or kernel is None or len(kernel) != 2 or bias not in (None, kernel[1:]):
            return f"{module or 'the root'} is not a Dense layer (a 2-D kernel and an optional bias)"
        layers[module] = (kernel, bias is not None)
    if len(layers) < 2:
        return "it has no hidden layer"
    outs = [k[1] for k, _ in layers.values()]
    chain, rest = [], dict(layers)
    while rest:
        want = chain[-1][1][1] if chain else None
        nxt = [m for m, (k, _) in rest.items() if (k[0] == want if chain else k[0] not in outs)]
        if len(nxt) != 1:
            return "no single order of its Dense layers chains them"
        chain.append((nxt[0], *rest.pop(nxt[0])))
    return chain


def _derived_spec(model, variables) -> PermutationSpec:
    """The spec of a plain chain of Dense layers (each hidden layer's units one group), checked on the model:
    a random permutation of every group must leave its outputs unchanged (a skip connection or a mixing of
    units between the layers would not)."""
    flat = _Flat.of(variables, "variables")
    chain = _dense_chain(flat)
    if not isinstance(chain, str):
        b = _Builder()
        prev = None
        for i, (module, kernel, bias) in enumerate(chain):
            out = b.group(module, kernel[1]) if i + 1 < len(chain) else None
            b.dense(module, prev, out, bias)
            prev = out
        spec = b.spec()
        rng = np.random.default_rng(0)
        shuffled = apply_permutation(spec, Permutation({g: rng.permutation(n) for g, n in b.sizes.items()}),
                                     variables)
        as_vars = (lambda v: v) if flat.is_variables else (lambda v: {"params": v})
        x = rng.normal(size=(4, chain[0][1][0])).astype(np.float32)
        y0, y1 = (np.asarray(model.apply(as_vars(v), x), np.float64) for v in (variables, shuffled))
        if np.max(np.abs(y0 - y1)) <= 1e-4 * max(1.0, float(np.max(np.abs(y0)))):
            return spec
        chain = "permuting its hidden units changes its outputs (a skip connection or units mixed between layers?)"
    leaves = "\n".join(f"  {p} {tuple(np.shape(v))}" for p, v in flat.leaves.items())
    raise ValueError(f"model {getattr(model, 'name', model)!r} is not a zoo model and its permutation structure "
                     f"cannot be derived ({chain}); declare a PermutationSpec with one entry per axis of every "
                     f"leaf (None: not permuted; a group name: permuted by that group), e.g. "
                     f"PermutationSpec({{'params/Dense_0/kernel': (None, 'h'), 'params/Dense_0/bias': ('h',), "
                     f"'params/Dense_1/kernel': ('h', None), 'params/Dense_1/bias': (None,)}}). Its leaves:\n"
                     f"{leaves}")


def permutation_spec(model, variables: PyTree | None = None) -> PermutationSpec:
    """The :class:`PermutationSpec` of a model: for a zoo model derived from ``model.spec`` (its architecture
    and constructor arguments): every hidden unit and channel, residual streams shared, BatchNorm statistics
    with their channels. Supported: ``mlp`` (hidden groups odd for ``tanh`` / ``identity``), ``simple_cnn``,
    ``convfc``, ``vgg16``, ``vgg16_bn``, ``resnet18``, ``resnet20`` (option-A shortcuts: zero-padding blocks
    around the previous stream; option B: projections), ``preresnet20``, ``preresnet164``, ``densenet100``
    (concatenated features as blocks) and ``vit_small`` (the residual stream, the heads, the query/key and
    value head dimensions, the MLP units). For any other model the spec is derived from ``variables`` only
    when they are a chain of Dense layers and permuting its hidden units leaves the model's outputs
    unchanged; otherwise a ``ValueError`` lists the leaves to declare in a :class:`PermutationSpec`.

    Args:
      model: a :class:`~mclandscape.engine.models.Model` (or, for a zoo model, its ``spec`` dict).
      variables: the variables (or params) of a model that is not from the zoo.

    Returns:
      The spec.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import flax.linen as nn
        >>> from mclandscape.engine.models import from_flax, get_model
        >>> spec = permutation_spec(get_model("mlp", widths=[64, 64]))
        >>> spec.groups, spec.axes["params/Dense_1/kernel"]
        (('Dense_0', 'Dense_1'), (Axis(perms=('Dense_0',), tiled=False), Axis(perms=('Dense_1',), tiled=False)))
        >>> class Net(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x, train=False):
        ...         return nn.Dense(2)(nn.relu(nn.Dense(5)(x)))
        >>> net = from_flax(Net())  # Dense_0 is built first but called last
        >>> permutation_spec(net, net.init(jax.random.key(0), jnp.zeros((1, 3)))).groups
        ('Dense_1',)
    """
    from mclandscape.engine.models import get_model

    spec = getattr(model, "spec", model)
    arch = _zoo_arch(spec)
    if arch is not None:
        full = get_model(arch, **dict(spec["kwargs"])).spec  # every argument, defaults filled in
        return _zoo_spec(arch, full["kwargs"])
    if variables is None or not hasattr(model, "apply"):
        raise ValueError(f"model {getattr(model, 'name', spec)!r} is not a zoo model (its spec {spec!r} names no zoo "
                         f"architecture with its arguments): pass its variables, permutation_spec(model, variables), "
                         f"to derive the spec of a chain of Dense layers, or declare a PermutationSpec")
    return _derived_spec(model, variables)
