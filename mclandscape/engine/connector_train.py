"""Training a connector: minimise the expected loss over points of a curve, chain or surface.

The objective is the uniform-average loss over the connector (Garipov et al.'s ``l(theta) = int L(w_theta(t))
dt`` (seed 001); seed 000 eq. 9 for surfaces), estimated per mini-batch by ``k`` points sampled from
``sampler``; its gradient is the unbiased estimate of seed 000 eq. 10. All k points are evaluated on the
same batch together and one optimizer update follows per batch: ``strategy="unroll"`` (the CPU default:
the k points written out one after another), ``"map"`` (``jax.lax.map``) or ``"vmap"`` (the default
elsewhere). On CPU, XLA does not route the convolutions of a *differentiated* loop body to its YNNPACK
kernels: one ConvFC gradient (batch 128) took 6.3 s through ``lax.map`` against 0.38 s unrolled (issue 9),
hence the unrolled default; vmap gives every point its own kernels, which is slow on CPU too. Only ``trainable`` control points move: their gradients enter the optimizer, and the others are
restored bit-for-bit after every update (so weight decay or momentum cannot move them).

Two entry points:

- :func:`fit_connector` works with any ``point_loss(params, batch, key) -> scalar`` (an analytic
  potential, a regression loss, ...) and any ``batches(epoch)`` iterable;
- :func:`train_connector` builds both from a :class:`~mclandscape.engine.models.base.Model` and a dataset
  (BatchNorm layers run in train mode with batch statistics, dropout keys come from the seed).

First layer (``stem=`` of :func:`train_connector`, models with ``model.stem``; issue 9): ``"split"`` runs the
stem convolution with its input channels zero-padded to a multiple of ``stem_channels`` (same values and
gradients); ``"factor"`` runs the stem once per control point on each batch (the K kernels stacked along the
output channels) and lets each of the k sampled points combine those outputs with its coefficients; its
backward pass is written out (:func:`factored_stem`): one kernel-gradient convolution per sampled point,
scaled by the point's coefficients, instead of differentiating the stacked convolution. ``"auto"``
(:func:`auto_train_stem`) takes what measured fastest on the 2-core CPU (``benchmarks/convfc_curve.py``).

Checkpoints (orbax, via :mod:`mclandscape.engine.checkpoint`) are written at epoch ends; a run started again
with the same ``checkpoint_dir`` resumes after the last saved epoch and, since every random draw is
derived from ``(seed, epoch, step)``, ends exactly where an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mclandscape.core.connectors import Connector
from mclandscape.core.losses import cross_entropy
from mclandscape.core.tree import PyTree, tree_combine
from mclandscape.engine.models.base import Model

__all__ = [
    "ConnectorTrainResult",
    "fit_connector",
    "train_connector",
    "uniform_sampler",
    "simplex_sampler",
    "make_connector_loss",
    "make_connector_step",
    "model_point_loss",
    "factored_stem",
    "auto_train_stem",
    "resolve_train_stem",
    "TRAIN_STEM_MODES",
]

TRAIN_STEM_MODES = ("auto", "off", "split", "factor")


@dataclasses.dataclass(frozen=True)
class ConnectorTrainResult:
    """The trained connector, the optimizer state and one history record per epoch."""

    connector: Connector
    opt_state: Any
    history: list[dict]


def uniform_sampler(point_dim: int) -> Callable[[jax.Array, int], jax.Array]:
    """Points uniform on [0, 1] (``point_dim`` 1: ``[k]`` t values) or on [0, 1]^d (``[k, d]``)."""
    if point_dim < 1:
        raise ValueError(f"point_dim must be >= 1, got {point_dim}")

    def sample(key, k):
        return jax.random.uniform(key, (k,) if point_dim == 1 else (k, point_dim))

    return sample


def simplex_sampler(num_vertices: int) -> Callable[[jax.Array, int], jax.Array]:
    """Barycentric points uniform on the simplex (Dirichlet(1, ..., 1))."""

    def sample(key, k):
        return jax.random.dirichlet(key, jnp.ones(num_vertices), (k,))

    return sample


def make_connector_loss(point_loss: Callable, connector: Connector, *, num_samples: int, sampler: Callable,
                        coefficients_fn: Callable | None = None, point_weights: Callable | None = None,
                        l2: float = 0.0, trainable: np.ndarray | None = None, strategy: str | None = None,
                        point_l2: float = 0.0, batch_features: Callable | None = None):
    """``loss(control, batch, key) -> (objective, per_point_losses)``: the mini-batch estimate of eq. 9.

    ``objective = (1/k) sum_i w_i L(phi(p_i); batch) + (l2/2) sum_{k trainable} |theta_k|^2`` where
    ``p_i ~ sampler``, ``w_i = point_weights(connector, p)`` (default 1) and ``phi(p) = sum_k c_k(p)
    theta_k`` with ``c = coefficients_fn(p)`` (default the connector's own coefficients).
    ``point_l2`` adds ``(point_l2/2) |phi(p_i)|^2`` to every sampled point's loss: the weight decay of
    Garipov et al.'s curve training (``l2_regularizer`` on the weights at the sampled t); the reported
    per-point losses exclude it.

    ``batch_features(control, batch)``, if given, runs once per batch before the k points (e.g. the first
    layer of every control point, :func:`model_point_loss` with ``stem="factor"``); ``point_loss`` is then
    called as ``point_loss(params, batch, key, features, coefficients)``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    strategy = strategy or ("unroll" if jax.default_backend() == "cpu" else "vmap")
    if strategy not in ("map", "vmap", "unroll"):
        raise ValueError(f"strategy must be 'map', 'vmap' or 'unroll', got {strategy!r}")
    coef_fn = coefficients_fn or connector.coefficients
    mask = jnp.asarray(connector.trainable if trainable is None else trainable, jnp.float32)

    def loss(control, batch, key):
        ks, kd = jax.random.split(key)
        pts = sampler(ks, num_samples)
        coefs = coef_fn(pts)
        keys = jax.random.split(kd, num_samples)
        feats = batch_features(control, batch) if batch_features is not None else None

        def one(args):
            c, kk = args
            params = tree_combine(c, control)
            if batch_features is not None:
                task = point_loss(params, batch, kk, feats, c)
            else:
                task = point_loss(params, batch, kk)
            reg = (0.5 * point_l2 * sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(params))
                   if point_l2 else jnp.zeros((), task.dtype))
            return task, reg

        if strategy == "unroll":
            outs = [one((coefs[i], keys[i])) for i in range(num_samples)]
            losses, regs = jnp.stack([o[0] for o in outs]), jnp.stack([o[1] for o in outs])
        elif strategy == "map":
            losses, regs = jax.lax.map(one, (coefs, keys))
        else:
            losses, regs = jax.vmap(one)((coefs, keys))
        w = jnp.ones(num_samples) if point_weights is None else point_weights(connector.replace(control=control), pts)
        obj = jnp.mean(w * (losses + regs))
        if l2:
            sq = sum(jnp.sum(mask.reshape((-1,) + (1,) * (x.ndim - 1)) * jnp.square(x))
                     for x in jax.tree_util.tree_leaves(control))
            obj = obj + 0.5 * l2 * sq
        return obj, losses

    return loss


def _masked(tree, mask):
    return jax.tree_util.tree_map(lambda x: x * mask.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype), tree)


def make_connector_step(loss: Callable, optimizer: optax.GradientTransformation, trainable, *,
                        compiler_options="auto") -> Callable:
    """The jitted update ``step(control, opt_state, batch, key) -> (control, opt_state, objective,
    mean_point_loss)`` of :func:`fit_connector` for a ``loss`` from :func:`make_connector_loss`: gradients of
    fixed control points are zeroed and those points restored bit-for-bit after the update.
    ``compiler_options``: ``"auto"``, ``None`` or a dict, as in :mod:`mclandscape.engine.evaluate` (on CPU, XLA's
    own convolutions instead of YNNPACK's: a ConvFC gradient took 152 ms against 204 ms)."""
    from mclandscape.engine.evaluate import resolve_compiler_options

    mask = jnp.asarray(np.asarray(trainable, dtype=bool).reshape(-1))
    options = resolve_compiler_options(compiler_options)
    jit = functools.partial(jax.jit, compiler_options=options) if options else jax.jit

    @jit
    def step(control, opt_state, batch, key):
        (obj, losses), grads = jax.value_and_grad(loss, has_aux=True)(control, batch, key)
        grads = _masked(grads, mask)
        updates, opt_state = optimizer.update(grads, opt_state, control)
        new = optax.apply_updates(control, updates)
        new = jax.tree_util.tree_map(
            lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, control)
        return new, opt_state, obj, jnp.mean(losses)

    return step


def auto_train_stem(model: Model, num_samples: int, num_control: int, cin: int, *,
                    backend: str | None = None, ynn: bool = False) -> tuple[str, int | None]:
    """The default ``(stem mode, stem_channels)`` for connector training (see the module docstring).

    On the 2-core CPU, with convolutions on YNNPACK (``ynn=True``), a 3-channel first layer padded to 4
    channels made a ConvFC step ~15 % faster; with XLA's own convolutions (the engines' default there) it
    made no difference, so the model runs as is. The per-control-point stem (``"factor"``) did not pay in
    training: its stacked convolution costs about K single ones and each sampled point still needs its own
    kernel gradient; with k = 4 and 8 samples it ran within 1 % of ``"split"``
    (``benchmarks/convfc_curve.py``), so it is never chosen automatically. On GPU the model is used as is
    (XLA pads GPU convolutions itself; unmeasured here: no GPU was available).
    """
    backend = backend or jax.default_backend()
    if model.stem is None or backend != "cpu":
        return "off", None
    channels = 4 if (ynn and model.stem.pad_channels_ok and cin % 4) else None
    return ("split", channels) if channels else ("off", None)


def factored_stem(model: Model, channels: int | None = None) -> Callable:
    """``h = f(stem_control, coefficients, features, x)``: one point's first-layer output from the control
    points' outputs ``features = stem_control_features(...)`` (``[B, ..., K, Cout]``, computed once per
    batch), with a hand-written backward pass.

    ``h = sum_k c_k (conv(x, K_k) + b_k)``, so ``dL/dK_k = c_k * dL/dK`` and ``dL/db_k = c_k * sum dh`` where
    ``dL/dK`` is the kernel gradient of a single ``Cout``-channel convolution: one such convolution per
    sampled point replaces the gradient of the K-times wider stacked one. ``dL/dc_k = <dh, features_k>``.
    ``features`` gets no gradient (it is a function of ``stem_control`` and ``x``, both accounted for here).
    ``x`` is the prepared (and, with ``channels``, zero-padded) input.
    """
    from mclandscape.engine.evaluate import _pad_kernel, combine_stem_features

    stem = model.stem

    @jax.custom_vjp
    def f(stem_control, c, feats, x):
        return combine_stem_features(c, feats)

    def fwd(stem_control, c, feats, x):
        return combine_stem_features(c, feats), (stem_control, c, feats, x)

    def bwd(res, dh):
        stem_control, c, feats, x = res
        kernel = stem_control["kernel"]
        k0 = _pad_kernel(jnp.zeros(kernel.shape[1:], dh.dtype), channels)
        _, vjp = jax.vjp(lambda k: stem.apply(k, None, x.astype(dh.dtype)), k0)
        (dk,) = vjp(dh)
        dk = dk[..., : kernel.shape[-2], :].astype(kernel.dtype)
        cc = c.astype(kernel.dtype)
        grads = {"kernel": cc.reshape((-1,) + (1,) * dk.ndim) * dk[None]}
        if "bias" in stem_control:
            db = jnp.sum(dh.astype(jnp.float32), axis=tuple(range(dh.ndim - 1))).astype(kernel.dtype)
            grads["bias"] = cc[:, None] * db[None]
        for name in stem_control:
            if name not in grads:
                grads[name] = jnp.zeros_like(stem_control[name])
        dc = jnp.einsum("...c,...kc->k", dh.astype(jnp.float32), feats.astype(jnp.float32)).astype(c.dtype)
        return grads, dc, jnp.zeros_like(feats), jnp.zeros_like(x)

    f.defvjp(fwd, bwd)
    return f


def model_point_loss(model: Model, *, loss_fn: Callable = cross_entropy, stem: str = "off",
                     stem_channels: int | None = None, compute_dtype=None, extra_variables: dict | None = None):
    """``(point_loss, batch_features)`` for training connectors of ``model`` (train mode, dropout keys from
    the loss's key), for :func:`make_connector_loss`. ``stem`` is ``"off"``, ``"split"`` or ``"factor"``
    (``batch_features`` is ``None`` unless ``"factor"``); ``stem_channels`` is the padded number of stem
    input channels (``None``: not padded); ``compute_dtype`` casts parameters and inputs (logits and the
    loss are float32)."""
    from mclandscape.engine.evaluate import _cast, _pad_kernel, stem_control_features

    if stem not in ("off", "split", "factor"):
        raise ValueError(f"stem must be 'off', 'split' or 'factor' here, got {stem!r}")
    if stem != "off" and model.stem is None:
        raise ValueError(f"stem={stem!r} needs a model with a stem (model.stem); {model.name} has none")
    extra = dict(extra_variables or {})
    dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)

    def prep(x):
        x = model.stem.prepare(x)
        if stem_channels is not None and stem_channels != x.shape[-1]:
            pad = [(0, 0)] * (x.ndim - 1) + [(0, stem_channels - x.shape[-1])]
            x = jnp.pad(x, pad)
        return x if dtype is None else x.astype(dtype)

    def task(logits, y):
        return jnp.mean(loss_fn(logits.astype(jnp.float32), y))

    if stem == "off":
        def point_loss(params, batch, key):
            x, y = batch
            x = x if dtype is None else x.astype(dtype)
            logits = model.apply({"params": _cast(params, dtype), **extra}, x, train=True, rngs={"dropout": key})
            return task(logits, y)

        return point_loss, None

    st = model.stem
    if stem == "split":
        def point_loss(params, batch, key):
            x, y = batch
            p = _cast(params, dtype)
            sp = p[st.name]
            h = st.apply(_pad_kernel(sp["kernel"], stem_channels), sp.get("bias") if st.use_bias else None, prep(x))
            logits = st.body_apply({"params": p, **extra}, h, train=True, rngs={"dropout": key})
            return task(logits, y)

        return point_loss, None

    comb = factored_stem(model, stem_channels)

    def batch_features(control, batch):
        # The control's stem enters the loss through factored_stem (its gradient is written out there);
        # the stacked convolution itself is not differentiated.
        x, _ = batch
        xp = prep(x)
        feats = stem_control_features(model, jax.lax.stop_gradient(control), xp, channels=stem_channels,
                                      dtype=dtype)
        return feats, xp, control[st.name]

    def point_loss(params, batch, key, features, c):
        _, y = batch
        feats, xp, stem_control = features
        h = comb(stem_control, c, feats, xp)
        logits = st.body_apply({"params": _cast(params, dtype), **extra}, h, train=True, rngs={"dropout": key})
        return task(logits, y)

    return point_loss, batch_features


def fit_connector(connector: Connector, point_loss: Callable[[PyTree, Any, jax.Array], jax.Array],
                  batches: Callable[[int], Iterable[Any]], *, epochs: int, optimizer: optax.GradientTransformation,
                  sampler: Callable | None = None, num_samples: int = 1, trainable: np.ndarray | None = None,
                  l2: float = 0.0, point_weights: Callable | None = None, coefficients_fn: Callable | None = None,
                  strategy: str | None = None, seed: int = 0, checkpoint_dir=None, checkpoint_every: int = 1,
                  progress: bool = False, metadata: dict | None = None, start_opt_state=None,
                  epoch_callback: Callable[[int, dict], None] | None = None,
                  point_l2: float = 0.0, batch_features: Callable | None = None,
                  compiler_options="auto") -> ConnectorTrainResult:
    """Train the trainable control points of ``connector`` for ``epochs`` passes over ``batches(epoch)``.

    ``point_loss(params, batch, key)`` is the loss of one parameter point on one batch (with
    ``batch_features``, see :func:`make_connector_loss`). See the module docstring for the objective, the
    mask and checkpointing.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    if point_l2 < 0:
        raise ValueError(f"point_l2 must be >= 0, got {point_l2}")
    mask_np = np.asarray(connector.trainable if trainable is None else trainable, dtype=bool).reshape(-1)
    if mask_np.size != connector.num_control:
        raise ValueError(f"trainable mask has {mask_np.size} entries for {connector.num_control} control points")
    if not mask_np.any():
        raise ValueError("no trainable control point: the mask fixes every control point")
    sampler = sampler or uniform_sampler(connector.point_dim)
    loss = make_connector_loss(point_loss, connector, num_samples=num_samples, sampler=sampler,
                               coefficients_fn=coefficients_fn, point_weights=point_weights, l2=l2,
                               trainable=mask_np, strategy=strategy, point_l2=point_l2,
                               batch_features=batch_features)
    step = make_connector_step(loss, optimizer, mask_np, compiler_options=compiler_options)

    control = connector.control
    opt_state = optimizer.init(control) if start_opt_state is None else start_opt_state
    history: list[dict] = []
    start_epoch = 0
    if checkpoint_dir is not None:
        from mclandscape.engine import checkpoint as ckpt

        last = ckpt.latest_step(checkpoint_dir)
        if last is not None:
            state, meta = ckpt.restore_checkpoint(checkpoint_dir, last,
                                                  target={"control": control, "opt_state": opt_state})
            control, opt_state = state["control"], state["opt_state"]
            history = list(meta.get("history", []))
            start_epoch = int(meta["epoch"]) + 1

    base = jax.random.key(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, initial=min(start_epoch, epochs), desc=f"train {connector.kind}", leave=False)
    for epoch in range(start_epoch, epochs):
        ekey = jax.random.fold_in(base, epoch)
        tot, tot_pts, nb = 0.0, 0.0, 0
        for i, batch in enumerate(batches(epoch)):
            control, opt_state, obj, mean_loss = step(control, opt_state, batch, jax.random.fold_in(ekey, i))
            tot += float(obj)
            tot_pts += float(mean_loss)
            nb += 1
        if nb == 0:
            raise ValueError(f"epoch {epoch} produced no batch (dataset smaller than one batch?)")
        rec = {"epoch": epoch, "objective": tot / nb, "loss": tot_pts / nb}
        if not np.isfinite(rec["objective"]):
            raise FloatingPointError(f"connector training diverged at epoch {epoch} (objective {rec['objective']})")
        history.append(rec)
        if epoch_callback is not None:
            epoch_callback(epoch, rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
        if checkpoint_dir is not None and ((epoch + 1) % checkpoint_every == 0 or epoch == epochs - 1):
            from mclandscape.engine import checkpoint as ckpt

            ckpt.save_checkpoint(checkpoint_dir, epoch, {"control": control, "opt_state": opt_state},
                                 {**(metadata or {}), "epoch": epoch, "history": history,
                                  "kind": connector.kind, "shape": list(connector.shape)})
    if bar is not None:
        bar.close()
    return ConnectorTrainResult(connector=connector.replace(control=control), opt_state=opt_state, history=history)


def train_connector(model: Model, connector: Connector, train, *, epochs: int,
                    optimizer: optax.GradientTransformation, batch_size: int = 128,
                    sampler: Callable | None = None, num_samples: int = 1, trainable: np.ndarray | None = None,
                    l2: float = 0.0, point_weights: Callable | None = None,
                    coefficients_fn: Callable | None = None, loss_fn: Callable = cross_entropy, seed: int = 0,
                    augment: bool = False, strategy: str | None = None, checkpoint_dir=None,
                    checkpoint_every: int = 1, progress: bool = True, metadata: dict | None = None,
                    epoch_callback: Callable | None = None, point_l2: float = 0.0, stem: str = "auto",
                    stem_channels: int | None = None, compute_dtype=None,
                    compiler_options="auto") -> ConnectorTrainResult:
    """Train a connector between models of ``model`` on the dataset ``train`` (see :func:`fit_connector`).

    Every sampled point runs the model in train mode: dropout active (keys from ``seed``), BatchNorm on
    batch statistics, as Garipov et al. train curves. Batches come from
    :func:`mclandscape.engine.data.iterate_batches` (shuffled per epoch from ``seed``, full batches only).
    ``stem`` (``"auto"``, ``"off"``, ``"split"``, ``"factor"``) and ``stem_channels`` (pad the stem's input
    channels to a multiple) choose the first-layer path (module docstring); ``compute_dtype`` (e.g.
    ``"bfloat16"``) casts parameters and inputs of the forward pass; ``compiler_options`` as in
    :func:`make_connector_step`.
    """
    from mclandscape.engine.data import iterate_batches

    extra = {}
    if model.has_batch_stats:
        x0 = jnp.asarray(np.asarray(train.x[:1]))
        shapes = jax.eval_shape(model.init, jax.random.key(0), x0)
        extra = {"batch_stats": jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                       shapes["batch_stats"])}
    stem, channels = resolve_train_stem(model, connector, stem, stem_channels, num_samples, compiler_options)
    point_loss, batch_features = model_point_loss(model, loss_fn=loss_fn, stem=stem, stem_channels=channels,
                                                  compute_dtype=compute_dtype, extra_variables=extra)

    def batches(epoch):
        for x, y in iterate_batches(train, batch_size, seed=seed, epoch=epoch, shuffle=True, augment=augment,
                                    drop_last=True):
            yield jnp.asarray(x), jnp.asarray(y)

    return fit_connector(connector, point_loss, batches, epochs=epochs, optimizer=optimizer, sampler=sampler,
                         num_samples=num_samples, trainable=trainable, l2=l2, point_weights=point_weights,
                         coefficients_fn=coefficients_fn, strategy=strategy, seed=seed,
                         checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, progress=progress,
                         metadata={"model": model.spec, **(metadata or {})}, epoch_callback=epoch_callback,
                         point_l2=point_l2, batch_features=batch_features, compiler_options=compiler_options)


def resolve_train_stem(model: Model, connector: Connector, stem: str = "auto", stem_channels: int | None = None,
                       num_samples: int = 1, compiler_options="auto") -> tuple[str, int | None]:
    """``(mode, padded stem input channels or None)`` for training ``connector`` of ``model``: ``"auto"``
    follows :func:`auto_train_stem`; ``stem_channels`` pads to that multiple (and implies ``"split"``)."""
    from mclandscape.engine.evaluate import resolve_compiler_options, ynn_convolutions

    if stem not in TRAIN_STEM_MODES:
        raise ValueError(f"unknown stem mode {stem!r}; expected one of {TRAIN_STEM_MODES}")
    if model.stem is None:
        if stem in ("split", "factor") or stem_channels is not None:
            raise ValueError(f"stem={stem!r}/stem_channels need a model with a stem (model.stem); "
                             f"{model.name} has none")
        return "off", None
    cin = int(np.shape(connector.control[model.stem.name]["kernel"])[-2])
    channels = None
    if stem == "auto":
        stem, channels = auto_train_stem(model, num_samples, connector.num_control, cin,
                                         ynn=ynn_convolutions(resolve_compiler_options(compiler_options)))
    if stem_channels is not None:
        if stem_channels < 1:
            raise ValueError(f"stem_channels must be >= 1, got {stem_channels}")
        if not model.stem.pad_channels_ok:
            raise ValueError(f"the stem of {model.name} does not allow channel padding")
        channels = -(-cin // stem_channels) * stem_channels
        if stem == "off":
            stem = "split"
    if channels == cin:
        channels = None
    return stem, channels
