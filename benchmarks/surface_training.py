"""Cost of one Bézier-surface training step (Bézier-surface paper, eq. 9-10) against the number k of (u, v) samples.

For each model and k in {1, 8, 80} (the paper samples 80 points per batch) it times one full training step
of a 3x3-control surface on a batch of digits — k points formed from the control points, k forward and
backward passes, one SGD update of the trainable control points — three ways:

- ``vectorised``: the engine's step (:func:`mclandscape.engine.loop.make_step`) over the connector objective
  (:class:`mclandscape.engine.connector_train.ConnectorObjective`) with all k points in one jitted step,
  ``strategy="unroll"`` (the k points written out one after another: the trainer's CPU default), ``"map"``
  (``jax.lax.map``) and ``"vmap"`` (the default elsewhere);
- ``one_at_a_time``: one jitted single-point value-and-gradient called k times from Python, gradients summed
  on the host side of the loop, then one update (a loop over samples as in Algorithm 2's pseudo-code).

One JSON line per (model, k, way): seconds per step, (u, v)-samples x examples per second, the speed-up
of the best vectorised way over one-at-a-time, and how the trainer's default compares with the best way.

    python benchmarks/surface_training.py [--models mlp,simple_cnn] [--ks 1,8,80] [--batch-size 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import optax
from timing import best_time

from mclandscape.core.connectors import bezier_surface
from mclandscape.core.objective import make_objective
from mclandscape.engine.connector_train import ConnectorObjective, uniform_sampler
from mclandscape.engine.data import load_dataset
from mclandscape.engine.models import get_model
from mclandscape.engine.step import make_step

MODELS = {
    "mlp": dict(name="mlp", widths=(128, 128), num_classes=10),
    "simple_cnn": dict(name="simple_cnn", num_classes=10),
}


def bench(model_name: str, ks: list[int], batch_size: int, repeats: int) -> list[dict]:
    cfg = dict(MODELS[model_name])
    model = get_model(cfg.pop("name"), **cfg)
    train = load_dataset("digits", "train")
    x = jnp.asarray(train.x[:batch_size])
    y = jnp.asarray(train.y[:batch_size])
    corners = [model.init(jax.random.key(i), x[:2])["params"] for i in range(4)]
    surf = bezier_surface(*corners, n=2, m=2)
    mask = jnp.asarray(surf.trainable)
    opt = optax.sgd(0.01, momentum=0.9)
    point = make_objective(model, "cross_entropy", train=True)
    trainable = jax.tree_util.tree_map(lambda _: mask, surf.control)

    def objective(k, strategy):
        return ConnectorObjective(point=point, template=surf.replace(control=None), sampler=uniform_sampler(2),
                                  mask=mask, num_samples=k, strategy=strategy)

    rows = []
    for k in ks:
        times = {}
        for strategy in ("unroll", "map", "vmap"):
            step = make_step(objective(k, strategy), opt, trainable=trainable)
            state = step.init(surf.control)
            times[f"vectorised_{strategy}"] = best_time(
                lambda step=step, state=state: jax.block_until_ready(step(state, (x, y), jax.random.key(0))[0]),
                repeats)

        one = objective(1, "unroll")
        grad1 = jax.jit(lambda c, key, one=one: jax.grad(lambda cc: one(cc, (x, y), key)[0])(c))
        opt_state = opt.init(surf.control)

        @jax.jit
        def upd(control, state, grads):
            g = jax.tree_util.tree_map(lambda a: a * mask.reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype), grads)
            u, state = opt.update(g, state, control)
            return optax.apply_updates(control, u), state

        def loop_step(k=k, grad1=grad1, upd=upd, opt_state=opt_state):
            keys = jax.random.split(jax.random.key(0), k)
            acc = None
            for i in range(k):
                g = grad1(surf.control, keys[i])
                acc = g if acc is None else jax.tree_util.tree_map(jnp.add, acc, g)
            acc = jax.tree_util.tree_map(lambda a: a / k, acc)
            return jax.block_until_ready(upd(surf.control, opt_state, acc))

        times["one_at_a_time"] = best_time(loop_step, repeats)
        best_vec = min(v for w, v in times.items() if w.startswith("vectorised"))
        default = "vectorised_" + ("unroll" if jax.default_backend() == "cpu" else "vmap")
        for way, sec in times.items():
            rows.append({"benchmark": "surface_training", "model": model_name, "control_grid": [3, 3], "k": k,
                         "batch_size": batch_size, "way": way, "seconds_per_step": round(sec, 6),
                         "samples_x_examples_per_s": round(k * batch_size / sec, 1),
                         "speedup_vectorised_over_one_at_a_time": round(times["one_at_a_time"] / best_vec, 3),
                         "default": default, "default_over_best": round(times[default] / best_vec, 3),
                         "backend": jax.default_backend()})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp", help="comma-separated models among: " + ", ".join(MODELS))
    ap.add_argument("--ks", default="1,8,80", help="comma-separated numbers k of (u, v) samples per step")
    ap.add_argument("--batch-size", type=int, default=128, help="examples per batch")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions per configuration (best is kept)")
    args = ap.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",") if k]
    for name in [m for m in args.models.split(",") if m]:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; choose among {sorted(MODELS)}")
        for row in bench(name, ks, args.batch_size, args.repeats):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
