"""Permutation specs of the zoo architectures, derived from the module that ``model.spec`` (its architecture
and arguments) builds: every hidden unit and channel, residual streams shared, BatchNorm statistics with their
channels."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mclandscape.engine.models import MLP, VGG16, ConvFC, DenseNet, ResNet, SimpleCNN, ViT, canonical_name, get_model
from mclandscape.engine.models.densenet import densenet_layers, transition_channels
from mclandscape.engine.models.vgg import VGG16_CFG
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

    def dense(self, name: str, p_in, p_out, bias: bool = True, spatial: int = 0):
        """A Dense layer (``spatial=2``: a Conv, its kernel's height and width not permuted)."""
        self.leaf(f"{name}/kernel", *(None,) * spatial, p_in, p_out)
        if bias:
            self.leaf(f"{name}/bias", p_out)

    def conv(self, name: str, p_in, p_out, bias: bool = True):
        self.dense(name, p_in, p_out, bias, spatial=2)

    def norm(self, name: str, p, stats: bool = True):
        self.leaf(f"{name}/scale", p)
        self.leaf(f"{name}/bias", p)
        if stats:
            self.axes[f"batch_stats/{name}/mean"] = (p,)
            self.axes[f"batch_stats/{name}/var"] = (p,)

    def spec(self) -> PermutationSpec:
        return PermutationSpec(self.axes, self.sizes, frozenset(self.odd))


def _chain(b: _Builder, convs, dense, *, bn: bool = False, bias: bool = True, odd: bool = False):
    """Conv layers ``(name, channels)`` (each followed by BatchNorm ``{name}_bn`` with ``bn``), the feature
    maps flattened channels fastest (a tiled axis), then Dense layers ``(name, units)``, the last one the
    head; with ``odd`` the hidden units may flip sign. MLP, simple CNN, ConvFC and VGG16 are such chains."""
    prev = None
    for name, c in convs:
        g = b.group(name, c)
        b.conv(name, prev, g)
        if bn:
            b.norm(f"{name}_bn", g)
        prev = g
    prev = Axis((prev,), tiled=True) if convs else None
    for k, (name, units) in enumerate(dense):
        out = b.group(name, units) if k + 1 < len(dense) else None
        b.dense(name, prev, out, bias)
        if odd and out:
            b.odd.add(out)
        prev = out


def _convs(channels) -> list[tuple[str, int]]:
    return [("stem" if i == 0 else f"conv{i}", c) for i, c in enumerate(channels)]


def _resnet(b: _Builder, m: ResNet):
    """The zoo's ResNet: one group per residual stream (the stem's, then a new one wherever a block changes the
    shape through a projection shortcut); option-A shortcuts extend the stream by two zero-padding blocks
    instead. A block's convolutions chain from the stream to the new stream, each with its BatchNorm before
    (pre-activation) or after it."""
    option_a = m.shortcut == "A" and not m.preact and not m.bottleneck
    stream, ch = (b.group("stem", m.widths[0]),), int(m.widths[0])
    b.conv("stem", None, stream, False)
    if not m.preact:
        b.norm("stem_bn", stream)
    for s, (n_blocks, w) in enumerate(zip(m.stage_sizes, m.widths, strict=True)):
        for blk in range(int(n_blocks)):
            name, out_ch = f"stage{s}_block{blk}", 4 * int(w) if m.bottleneck else int(w)
            new = stream
            if (s > 0 and blk == 0) or ch != out_ch:
                if option_a:  # the stream zero-padded on both sides: (pad_lo, stream, pad_hi), empty pads left out
                    pads = {"pad_lo": (out_ch - ch) // 2, "pad_hi": out_ch - ch - (out_ch - ch) // 2}
                    lo, hi = ((b.group(f"{name}/{p}", n),) if n else () for p, n in pads.items())
                    new = lo + stream + hi
                else:
                    new = (b.group(f"{name}/stream", out_ch),)
            inner = [b.group(f"{name}/conv{j + 1}", w) for j in range(2 if m.bottleneck else 1)]
            chain = [stream, *inner, new]
            for j in range(len(chain) - 1):
                if m.preact:
                    b.norm(f"{name}/bn{j + 1}", chain[j])
                b.conv(f"{name}/conv{j + 1}", chain[j], chain[j + 1], False)
                if not m.preact:
                    b.norm(f"{name}/bn{j + 1}", chain[j + 1])
            if new != stream and not option_a:
                b.conv(f"{name}/shortcut_conv", stream, new, False)
                if not m.preact:
                    b.norm(f"{name}/shortcut_bn", new)
            stream, ch = new, out_ch
    if m.preact:
        b.norm("final_bn", stream)
    b.dense("head", stream, None)


def _densenet(b: _Builder, m: DenseNet):
    k = int(m.growth_rate)
    segs = (b.group("stem", 2 * k),)
    b.conv("stem", None, segs, False)
    for blk in range(3):
        for i in range(densenet_layers(m.depth)):
            name = f"block{blk}_layer{i}"
            mid, new = b.group(f"{name}/conv1", 4 * k), b.group(f"{name}/conv2", k)
            b.norm(f"{name}/bn1", segs)
            b.conv(f"{name}/conv1", segs, mid, False)
            b.norm(f"{name}/bn2", mid)
            b.conv(f"{name}/conv2", mid, new, False)
            segs = segs + (new,)
        if blk < 2:
            t = f"transition{blk}"
            out = b.group(t, transition_channels(sum(b.sizes[g] for g in segs), m.compression))
            b.norm(f"{t}/bn", segs)
            b.conv(f"{t}/conv", segs, out, False)
            segs = (out,)
    b.norm("final_bn", segs)
    b.dense("head", segs, None)


def _vit(b: _Builder, m: ViT):
    s = b.group("stream", m.dim)
    b.conv("stem", None, s)
    b.leaf("cls_token", None, None, s)
    b.leaf("pos_embedding", None, None, s)
    for i in range(int(m.depth)):
        name = f"block{i}"
        h = b.group(f"{name}/heads", m.heads)
        qk, v = b.group(f"{name}/qk", m.dim // m.heads), b.group(f"{name}/v", m.dim // m.heads)
        b.norm(f"{name}/ln1", s, stats=False)
        for proj, g in (("query", qk), ("key", qk), ("value", v)):
            b.leaf(f"{name}/attn/{proj}/kernel", s, h, g)
            b.leaf(f"{name}/attn/{proj}/bias", h, g)
        b.leaf(f"{name}/attn/out/kernel", h, v, s)
        b.leaf(f"{name}/attn/out/bias", s)
        b.norm(f"{name}/ln2", s, stats=False)
        mlp = b.group(f"{name}/mlp", m.mlp_dim)
        b.dense(f"{name}/mlp1", s, mlp)
        b.dense(f"{name}/mlp2", mlp, s)
    b.norm("ln_final", s, stats=False)
    b.dense("head", s, None)


# the zoo's module classes -> their spec, read off the module's attributes
_SPECS = {
    MLP: lambda b, m: _chain(b, [], [(f"Dense_{i}", w) for i, w in enumerate((*m.widths, None))], bias=m.use_bias,
                             odd=m.activation in ODD_ACTIVATIONS),
    SimpleCNN: lambda b, m: _chain(b, _convs(m.channels), [("fc", m.hidden), ("head", None)]),
    ConvFC: lambda b, m: _chain(b, _convs(m.channels), [*((f"fc{i}", h) for i, h in enumerate(m.hidden)),
                                                          ("head", None)]),
    VGG16: lambda b, m: _chain(b, _convs([v for v in VGG16_CFG if v != "M"]),
                               [("fc0", m.width), ("fc1", m.width), ("head", None)], bn=m.batch_norm),
    ResNet: _resnet,
    DenseNet: _densenet,
    ViT: _vit,
}


def _dense_chain(flat: _Flat) -> list[tuple[str, tuple[int, int]]] | str:
    """``[(module, kernel shape)]`` in the order the layers chain (each one reads the previous one's
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
        layers[module] = kernel
    if len(layers) < 2:
        return "it has no hidden layer"
    outs = [k[1] for k in layers.values()]
    chain, rest = [], dict(layers)
    while rest:
        nxt = [m for m, k in rest.items() if (k[0] == chain[-1][1][1] if chain else k[0] not in outs)]
        if len(nxt) != 1:
            return "no single order of its Dense layers chains them"
        chain.append((nxt[0], rest.pop(nxt[0])))
    return chain


def _derived_spec(model, variables) -> PermutationSpec:
    """The spec of a plain chain of Dense layers (each hidden layer's units one group), checked on the model:
    a random permutation of every group must leave its outputs unchanged (a skip connection or a mixing of
    units between the layers would not)."""
    flat = _Flat.of(variables, "variables")
    chain = _dense_chain(flat)
    if not isinstance(chain, str):
        b, rng = _Builder(), np.random.default_rng(0)
        _chain(b, [], [(module, kernel[1]) for module, kernel in chain])
        # the chain's spec, less the biases that layers without one do not have
        spec = PermutationSpec({p: e for p, e in b.axes.items() if p in flat.leaves}, b.sizes)
        shuffled = apply_permutation(spec, Permutation({g: rng.permutation(n) for g, n in b.sizes.items()}),
                                     variables)
        x = rng.normal(size=(4, chain[0][1][0])).astype(np.float32)
        y0, y1 = (np.asarray(model.apply(v if flat.is_variables else {"params": v}, x), np.float64)
                  for v in (variables, shuffled))
        if np.max(np.abs(y0 - y1)) <= 1e-4 * max(1.0, float(np.max(np.abs(y0)))):
            return spec
        chain = "permuting its hidden units changes its outputs (a skip connection or units mixed between layers?)"
    leaves = "\n".join(f"  {p} {tuple(np.shape(v))}" for p, v in flat.leaves.items())
    raise ValueError(f"model {getattr(model, 'name', model)!r} is not a zoo model and its permutation structure "
                     f"cannot be derived ({chain}); declare a PermutationSpec with one entry per axis of every "
                     f"leaf (None: not permuted; a group name: permuted by that group). Its leaves:\n{leaves}")


def _zoo_module(spec):
    """The Flax module of the zoo architecture a model's spec names with its constructor arguments (as
    ``get_model`` records them), else ``None``: a wrapped user module's spec (``{"arch": class name}``) never
    picks a zoo spec."""
    if not isinstance(spec, Mapping) or "arch" not in spec or not isinstance(spec.get("kwargs"), Mapping):
        return None
    try:
        arch = canonical_name(spec["arch"])
    except ValueError:
        return None
    return get_model(arch, **dict(spec["kwargs"])).apply.owner.module  # the linen module behind the zoo model (models.base._Linen)


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
        ...         return nn.Dense(2)(nn.relu(nn.Dense(6)(x)))
        >>> net = from_flax(Net())  # Dense_0 is built first but called last
        >>> permutation_spec(net, net.init(jax.random.key(0), jnp.zeros((1, 3)))).groups
        ('Dense_1',)
    """
    spec = getattr(model, "spec", model)
    module = _zoo_module(spec)
    if module is not None:
        b = _Builder()
        _SPECS[type(module)](b, module)
        return b.spec()
    if variables is None or not hasattr(model, "apply"):
        raise ValueError(f"model {getattr(model, 'name', spec)!r} is not a zoo model (its spec {spec!r} names no zoo "
                         f"architecture with its arguments): pass its variables, permutation_spec(model, variables), "
                         f"to derive the spec of a chain of Dense layers, or declare a PermutationSpec")
    return _derived_spec(model, variables)
