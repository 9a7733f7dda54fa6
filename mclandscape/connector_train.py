"""Training a connector: minimise the expected loss over points of a curve, chain or surface.

The objective is the uniform-average loss over the connector (Garipov et al.'s ``l(theta) = int L(w_theta(t))
dt`` (seed 001); seed 000 eq. 9 for surfaces), estimated per mini-batch by ``k`` points sampled from
``sampler``; its gradient is the unbiased estimate of seed 000 eq. 10. All k points are evaluated on the
same batch together (``jax.lax.map`` on CPU, ``jax.vmap`` elsewhere) and one optimizer update follows per
batch. Only ``trainable`` control points move: their gradients enter the optimizer, and the others are
restored bit-for-bit after every update (so weight decay or momentum cannot move them).

Two entry points:

- :func:`fit_connector` works with any ``point_loss(params, batch, key) -> scalar`` (an analytic
  potential, a regression loss, ...) and any ``batches(epoch)`` iterable;
- :func:`train_connector` builds both from a :class:`~mclandscape.models.base.Model` and a dataset
  (BatchNorm layers run in train mode with batch statistics, dropout keys come from the seed).

Checkpoints (orbax, via :mod:`mclandscape.checkpoint`) are written at epoch ends; a run started again
with the same ``checkpoint_dir`` resumes after the last saved epoch and, since every random draw is
derived from ``(seed, epoch, step)``, ends exactly where an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .connectors import Connector
from .losses import cross_entropy
from .models.base import Model
from .tree import PyTree, tree_combine

__all__ = [
    "ConnectorTrainResult",
    "fit_connector",
    "train_connector",
    "uniform_sampler",
    "simplex_sampler",
    "make_connector_loss",
]


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
                        point_l2: float = 0.0):
    """``loss(control, batch, key) -> (objective, per_point_losses)``: the mini-batch estimate of eq. 9.

    ``objective = (1/k) sum_i w_i L(phi(p_i); batch) + (l2/2) sum_{k trainable} |theta_k|^2`` where
    ``p_i ~ sampler``, ``w_i = point_weights(connector, p)`` (default 1) and ``phi(p) = sum_k c_k(p)
    theta_k`` with ``c = coefficients_fn(p)`` (default the connector's own coefficients).
    ``point_l2`` adds ``(point_l2/2) |phi(p_i)|^2`` to every sampled point's loss: the weight decay of
    Garipov et al.'s curve training (``l2_regularizer`` on the weights at the sampled t); the reported
    per-point losses exclude it.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    strategy = strategy or ("map" if jax.default_backend() == "cpu" else "vmap")
    if strategy not in ("map", "vmap"):
        raise ValueError(f"strategy must be 'map' or 'vmap', got {strategy!r}")
    coef_fn = coefficients_fn or connector.coefficients
    mask = jnp.asarray(connector.trainable if trainable is None else trainable, jnp.float32)

    def loss(control, batch, key):
        ks, kd = jax.random.split(key)
        pts = sampler(ks, num_samples)
        coefs = coef_fn(pts)
        keys = jax.random.split(kd, num_samples)

        def one(args):
            c, kk = args
            params = tree_combine(c, control)
            task = point_loss(params, batch, kk)
            reg = (0.5 * point_l2 * sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(params))
                   if point_l2 else jnp.zeros((), task.dtype))
            return task, reg

        losses, regs = jax.lax.map(one, (coefs, keys)) if strategy == "map" else jax.vmap(one)((coefs, keys))
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


def fit_connector(connector: Connector, point_loss: Callable[[PyTree, Any, jax.Array], jax.Array],
                  batches: Callable[[int], Iterable[Any]], *, epochs: int, optimizer: optax.GradientTransformation,
                  sampler: Callable | None = None, num_samples: int = 1, trainable: np.ndarray | None = None,
                  l2: float = 0.0, point_weights: Callable | None = None, coefficients_fn: Callable | None = None,
                  strategy: str | None = None, seed: int = 0, checkpoint_dir=None, checkpoint_every: int = 1,
                  progress: bool = False, metadata: dict | None = None, start_opt_state=None,
                  epoch_callback: Callable[[int, dict], None] | None = None,
                  point_l2: float = 0.0) -> ConnectorTrainResult:
    """Train the trainable control points of ``connector`` for ``epochs`` passes over ``batches(epoch)``.

    ``point_loss(params, batch, key)`` is the loss of one parameter point on one batch. See the module
    docstring for the objective, the mask and checkpointing.
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
                               trainable=mask_np, strategy=strategy, point_l2=point_l2)
    mask = jnp.asarray(mask_np)

    @jax.jit
    def step(control, opt_state, batch, key):
        (obj, losses), grads = jax.value_and_grad(loss, has_aux=True)(control, batch, key)
        grads = _masked(grads, mask)
        updates, opt_state = optimizer.update(grads, opt_state, control)
        new = optax.apply_updates(control, updates)
        new = jax.tree_util.tree_map(
            lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, control)
        return new, opt_state, obj, jnp.mean(losses)

    control = connector.control
    opt_state = optimizer.init(control) if start_opt_state is None else start_opt_state
    history: list[dict] = []
    start_epoch = 0
    if checkpoint_dir is not None:
        from . import checkpoint as ckpt

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
            from . import checkpoint as ckpt

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
                    epoch_callback: Callable | None = None, point_l2: float = 0.0) -> ConnectorTrainResult:
    """Train a connector between models of ``model`` on the dataset ``train`` (see :func:`fit_connector`).

    Every sampled point runs the model in train mode: dropout active (keys from ``seed``), BatchNorm on
    batch statistics, as Garipov et al. train curves. Batches come from
    :func:`mclandscape.data.iterate_batches` (shuffled per epoch from ``seed``, full batches only).
    """
    from .data import iterate_batches

    extra = {}
    if model.has_batch_stats:
        x0 = jnp.asarray(np.asarray(train.x[:1]))
        shapes = jax.eval_shape(model.init, jax.random.key(0), x0)
        extra = {"batch_stats": jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                       shapes["batch_stats"])}

    def point_loss(params, batch, key):
        x, y = batch
        logits = model.apply({"params": params, **extra}, x, train=True, rngs={"dropout": key})
        return jnp.mean(loss_fn(logits, y))

    def batches(epoch):
        for x, y in iterate_batches(train, batch_size, seed=seed, epoch=epoch, shuffle=True, augment=augment,
                                    drop_last=True):
            yield jnp.asarray(x), jnp.asarray(y)

    return fit_connector(connector, point_loss, batches, epochs=epochs, optimizer=optimizer, sampler=sampler,
                         num_samples=num_samples, trainable=trainable, l2=l2, point_weights=point_weights,
                         coefficients_fn=coefficients_fn, strategy=strategy, seed=seed,
                         checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, progress=progress,
                         metadata={"model": model.spec, **(metadata or {})}, epoch_callback=epoch_callback,
                         point_l2=point_l2)
