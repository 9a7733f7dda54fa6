"""Seconds per NEB step: all pivots' gradients in one vectorised call vs one pivot at a time.

For each model (digits 8×8: the 64-32-10 MLP and the small CNN of ``experiments/curves_neb``; add
``--models vgg16,resnet20`` on a GPU with CIFAR-sized random inputs) and band size N, one JSON line per
strategy of :func:`mclandscape.methods.neb.make_neb_step` (the engine step of a
:class:`~mclandscape.methods.neb.BandObjective`, the same call :func:`~mclandscape.methods.neb.neb` makes):

- ``loop``: the one-pivot-at-a-time baseline (:class:`LoopedNEBStep`, here): a Python loop over the pivots
  calling one compiled value-and-grad each (Draxler et al.'s ``torch_autoneb`` evaluates pivots one after
  another), then one compiled step of the same forces (:func:`~mclandscape.methods.neb_forces.neb_forces`)
  and the same Optax update with the ends held fixed;
- ``map``: one compiled step with ``jax.lax.map`` over pivots;
- ``vmap``: one compiled step with ``jax.vmap`` over pivots (``"auto"``);
- ``unroll``: one compiled step with the pivots written out one after another.

Each line holds ``seconds_per_step`` (median of ``--repeats`` timings of ``--steps`` steps, compile excluded;
the step alone, without :func:`mclandscape.engine.loop.run`'s per-step bookkeeping) and ``speedup_vs_loop``.
Run: ``python benchmarks/neb_step.py [--models mlp,cnn] [--pivots 6,12]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mclandscape.core.objective import make_objective
from mclandscape.core.tree import tree_index, tree_stack
from mclandscape.engine.models import get_model
from mclandscape.engine.optim import unwrap
from mclandscape.methods import neb as N
from mclandscape.methods.neb_forces import neb_forces, straight_band

MODELS = {
    "mlp": ("mlp", {"widths": [32]}, (8, 8, 1)),
    "cnn": ("simple_cnn", {"channels": [8, 16, 16], "hidden": 32, "dropout": 0.0}, (8, 8, 1)),
    "cnn_wide": ("simple_cnn", {"dropout": 0.0}, (8, 8, 1)),  # zoo default channels 32-64-128, hidden 256
    "vgg16": ("vgg16", {"dropout": 0.0}, (32, 32, 3)),
    "resnet20": ("resnet20", {}, (32, 32, 3)),
}


@functools.partial(jax.jit, static_argnums=0)
def _pivot_value_and_grad(objective, params, batch, key):
    return jax.value_and_grad(lambda p: objective(p, batch, key)[0])(params)


@functools.partial(jax.jit, static_argnums=0)
def _looped_update(tx, pivots, opt_state, e, g, climb, spring_constant):
    ci = jnp.where(climb, 1 + jnp.argmax(e[1:-1]), -1)
    f = neb_forces(pivots, e, g, spring_constant, climbing_index=ci)
    neg = jax.tree_util.tree_map(lambda t: jnp.concatenate([jnp.zeros_like(t[:1]), -t, jnp.zeros_like(t[:1])]),
                                 f.total)
    updates, opt_state = tx.update(neg, opt_state, pivots)
    new = optax.apply_updates(pivots, updates)
    new = jax.tree_util.tree_map(lambda a, p: a.at[0].set(p[0]).at[-1].set(p[-1]), new, pivots)  # ends fixed
    return new, opt_state


@dataclasses.dataclass(frozen=True, eq=False)
class LoopedNEBStep:
    """The one-pivot-at-a-time reference: ``init(pivots)`` and ``step(state, NEBBatch, key) -> (state, None)``."""

    objective: Callable
    config: N.NEBConfig

    def init(self, pivots):
        return pivots, unwrap(self.config.make_optimizer()).init(pivots)

    def __call__(self, state, batch, key):
        pivots, opt_state = state
        n = jax.tree_util.tree_leaves(pivots)[0].shape[0]
        outs = [_pivot_value_and_grad(self.objective, tree_index(pivots, i), batch.data, key) for i in range(n)]
        e = jnp.stack([o[0] for o in outs])
        g = tree_stack([o[1] for o in outs[1:-1]])
        return _looped_update(self.config.make_optimizer(), pivots, opt_state, e, g, batch.climb,
                              jnp.asarray(self.config.spring_constant, e.dtype)), None


def _time_steps(step, pivots, batch, steps: int, repeats: int) -> float:
    state = step.init(pivots)
    key = jax.random.key(0)
    for _ in range(2):  # compile + warm-up
        state, _ = step(state, batch, key)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, _ = step(state, batch, key)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - t0) / steps)
    return float(np.median(times))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,cnn", help=f"comma-separated, from {sorted(MODELS)}")
    ap.add_argument("--pivots", default="6,12", help="band sizes N (comma-separated)")
    ap.add_argument("--batch-size", type=int, default=64, help="mini-batch size")
    ap.add_argument("--steps", type=int, default=10, help="steps per timing")
    ap.add_argument("--repeats", type=int, default=3, help="timings per configuration (median)")
    ap.add_argument("--strategies", default="loop,map,vmap,unroll", help="strategies to time")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        arch, kw, shape = MODELS[name]
        model = get_model(arch, num_classes=10, **kw)
        x = jnp.asarray(rng.normal(size=(args.batch_size, *shape)).astype(np.float32))
        y = jnp.asarray(rng.integers(0, 10, size=args.batch_size).astype(np.int32))
        batch = N.NEBBatch(data=(x, y), climb=jnp.asarray(False))
        p0 = model.init(jax.random.key(0), x[:1])["params"]
        p1 = model.init(jax.random.key(1), x[:1])["params"]
        objective = make_objective(model, train=True)
        for n in [int(v) for v in args.pivots.split(",") if v.strip()]:
            pivots = straight_band(p0, p1, n)
            timings = {}
            for strat in [s.strip() for s in args.strategies.split(",") if s.strip()]:
                cfg = N.NEBConfig(spring_constant=1.0, learning_rate=0.01, strategy="auto" if strat == "loop" else strat)
                step = LoopedNEBStep(objective, cfg) if strat == "loop" else N.make_neb_step(objective, cfg, pivots)
                timings[strat] = _time_steps(step, pivots, batch, args.steps, args.repeats)
            for strat, sec in timings.items():
                print(json.dumps({"benchmark": "neb_step", "model": name, "num_pivots": n,
                                  "batch_size": args.batch_size, "strategy": strat, "seconds_per_step": sec,
                                  "speedup_vs_loop": (timings["loop"] / sec) if "loop" in timings else None,
                                  "backend": jax.default_backend(), "devices": len(jax.devices())}), flush=True)


if __name__ == "__main__":
    main()
