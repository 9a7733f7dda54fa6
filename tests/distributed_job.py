"""One process of the multi-device, multi-process test (tests/test_distributed.py); also runnable alone.

    python tests/distributed_job.py OUT_DIR [--coordinator HOST:PORT --num-processes N --process-id I]
        [--local-devices D] [--jobs train,many,curve,surface,grid,eval,bfs,neb,tt] [--checkpoint-dir DIR]
        [--die-after-epoch E]

Writes OUT_DIR/result_<process>.npz with every job's outputs (host values, equal on every process).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402  (importing starts no JAX backend: the process may still join a job)


class TinyBN(nn.Module):
    """A BatchNorm network small enough to recalibrate 11 points in a test."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(6, name="dense0")(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        return nn.Dense(10, name="head")(nn.relu(x))


TT_STEPS = 20  # search steps of the "tt" job (the exit detector's decisions are discrete: none is asked for)


def run_jobs(jobs, *, checkpoint_dir=None, die_after_epoch=None, train_epochs: int = 3) -> dict:
    """Every job's outputs as host arrays (the same on every process of a job)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import mclandscape as mcl

    jobs = set(jobs)
    out: dict[str, np.ndarray] = {"devices": np.asarray(len(jax.devices()))}
    train = mcl.load_dataset("digits", "train").take(256)
    test = mcl.load_dataset("digits", "test")
    model = mcl.get_model("mlp", widths=[16], num_classes=10)
    cfg = mcl.TrainConfig(epochs=train_epochs, batch_size=64, optimizer="sgd", lr=0.05, momentum=0.9)

    def leaves(prefix, tree):
        for i, a in enumerate(jax.tree_util.tree_leaves(tree)):
            out[f"{prefix}_{i}"] = np.asarray(a)

    def die(epoch, result):
        if die_after_epoch is not None and epoch == die_after_epoch and jax.process_index() == 1:
            os._exit(17)  # a killed process: no clean-up, no goodbye to the others

    if "train" in jobs:
        res = mcl.train_model(model, train, test, cfg, seed=0, checkpoint_dir=checkpoint_dir, progress=False,
                              callback=die)
        leaves("train", res.params)
        out["train_history"] = np.asarray([[h["train_loss"], h["test_acc"]] for h in res.history])
        out["train_resumed_from"] = np.asarray(-1 if res.resumed_from is None else res.resumed_from)
    if "many" in jobs:  # four seeds in one vmapped step, the seeds split over the devices' "points" axis
        runs = mcl.train_many(model, train, test, cfg.replace(epochs=1), seeds=(0, 1, 2, 3), strategy="vmap",
                              progress=False)
        for r in runs:
            leaves(f"many{r.seed}", r.params)
        out["many_history"] = np.asarray([[h["train_loss"], h["test_acc"]] for r in runs for h in r.history])
    corners = [model.init(jax.random.key(i), jnp.asarray(train.x[:1]))["params"] for i in range(4)]
    if "curve" in jobs:
        res = mcl.train_curve(model, mcl.bezier_curve(corners[0], corners[1]), train,
                              mcl.CurveConfig(epochs=1, batch_size=64, num_samples=4, strategy="vmap"), progress=False)
        leaves("curve", res.connector.control)
    if "surface" in jobs:
        surf = mcl.bezier_surface(*corners, n=2, m=2)
        res = mcl.train_surface(model, surf, train.take(256),
                                mcl.SurfaceConfig(epochs=(1, 1, 1), num_samples=4, batch_size=64, strategy="vmap"))
        leaves("surface", res.connector.control)
        trained_surface = res.connector
    if "grid" in jobs:
        m = mcl.evaluate(model, mcl.connector_points(mcl.bilinear_surface(*corners), mcl.uv_grid(5)), test)
        out["grid_loss"], out["grid_acc"] = m.loss, m.accuracy
        if "surface" in jobs:  # parameters fresh from training live on this process's devices
            m = mcl.evaluate(model, mcl.connector_points(trained_surface, mcl.uv_grid(3)), test)
            out["trained_grid_loss"] = m.loss
    if "eval" in jobs:  # map chunks and vmap over 9 points (padded to the devices), BatchNorm per point
        surface = mcl.bezier_surface(*corners, n=2, m=2)
        for strategy in ("map", "vmap"):
            m = mcl.evaluate(model, mcl.connector_points(surface, mcl.uv_grid(3)), test, strategy=strategy,
                             chunk_size=2)
            out[f"eval_{strategy}_loss"], out[f"eval_{strategy}_acc"] = m.loss, m.accuracy
        bn = mcl.from_flax(TinyBN(), "tiny_bn", has_batch_stats=True)
        small = train.take(70)
        ends = [bn.init(jax.random.key(i), jnp.asarray(small.x[:2]))["params"] for i in range(2)]
        m = mcl.evaluate(bn, mcl.connector_points(mcl.bezier_curve(*ends), np.linspace(0, 1, 11)), small,
                         bn_data=small, bn_batch_size=35)
        out["eval_bn_loss"], out["eval_bn_acc"] = m.loss, m.accuracy
    if "neb" in jobs:  # the inner pivots split over the devices' "points" axis, the batch over "data"
        from mclandscape.methods import neb as N

        res = N.neb(mcl.make_objective(model, train=True), corners[0], corners[1], num_pivots=6,
                    data=mcl.batch_stream(train, 64),
                    config=N.NEBConfig(steps=8, check_every=4, learning_rate=0.05, tol=0.0), progress=False)
        leaves("neb", res.pivots)
        out["neb_losses"] = np.asarray(res.losses)
        out["neb_history"] = np.asarray([[h["epoch"], h["mean_loss"], h["perp_force"]] for h in res.history])
    if "tt" in jobs:  # DSP-TT: local solves and search steps with the batch split over the devices
        import optax

        from mclandscape.core.objective import make_objective
        from mclandscape.engine.batches import batch_stream
        from mclandscape.methods import dsp_detector as dd
        from mclandscape.methods import dsp_step as dstep
        from mclandscape.methods import trusttech as tt

        small = train.take(256)
        variables = model.init(jax.random.key(0), jnp.asarray(small.x[:2]))
        objective = make_objective(model, variables=variables)
        batches = batch_stream(small, 64, seed=0)
        omega0, _ = dstep.local_solve(objective, variables["params"], dd.LocalSolver(optax.sgd(0.1, momentum=0.9),
                                                                                   40), batches, jax.random.key(0),
                                   progress=False)
        cfg = dd.DSPConfig(num_directions=1, rho=dd.RhoSchedule(1e-3, 0.1, 0.01),
                           detector=dd.ExitDetector(min_rise=0.2, min_drop=0.1), init_norm=1.0, max_steps=TT_STEPS,
                           record_path=1)
        res = tt.dsp_search(objective, omega0, jax.random.key(1), config=cfg, batch_fn=batches,
                            solver=dd.LocalSolver(optax.sgd(0.05, momentum=0.9), steps=20), progress=False)
        leaves("tt_origin", omega0)
        out["tt_trace"] = np.asarray(res.traces[0]["loss"])
        # the local solve from the search's last point, as an exit point's would run
        last = jax.tree_util.tree_map(lambda a, d: a + d, omega0, res.paths[0][-1][1])
        sol, info = dstep.local_solve(objective, last, dd.LocalSolver(optax.sgd(0.05, momentum=0.9), 20), batches,
                                   jax.random.key(2), progress=False)
        leaves("tt_solution", sol)
        out["tt_solution_loss"] = np.asarray(info["loss"])
    if "bfs" in jobs:
        from mclandscape.methods import flats as VF
        from mclandscape.methods import lattice as VL
        from mclandscape.methods import traversal as VT

        iris = mcl.load_dataset("iris", "train")
        net = mcl.get_model("mlp", widths=[8], num_classes=3)
        minima = [net.init(jax.random.key(i), jnp.asarray(iris.x[:1])) for i in range(3)]
        flat = VF.flat_from_minima([m["params"] for m in minima])
        loss = mcl.make_objective(net, train=False, variables=minima[0])
        res = VT.grid_traversal(VL.LatticeLoss(flat, 0.05, loss, (iris.x, iris.y)), 1.5,
                                config=VT.TraversalConfig(limit=200))
        out["bfs_H"] = np.asarray(res.H)
        out["bfs_visited"] = np.asarray(res.visited)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--coordinator", default=None)
    ap.add_argument("--num-processes", type=int, default=None)
    ap.add_argument("--process-id", type=int, default=None)
    ap.add_argument("--local-devices", type=int, default=None)
    ap.add_argument("--jobs", default="train,many,curve,surface,grid,eval,bfs,neb,tt")
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--die-after-epoch", type=int, default=None)
    ap.add_argument("--train-epochs", type=int, default=3)
    args = ap.parse_args()

    from mclandscape.engine import distributed

    if args.coordinator:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               local_devices=args.local_devices, heartbeat_timeout_seconds=10)
    elif args.local_devices:
        import jax

        jax.config.update("jax_num_cpu_devices", args.local_devices)

    import jax
    import numpy as np

    out = run_jobs(args.jobs.split(","), checkpoint_dir=args.checkpoint_dir, die_after_epoch=args.die_after_epoch,
                   train_epochs=args.train_epochs)
    if jax.process_index() == 0 or args.coordinator:
        os.makedirs(args.out, exist_ok=True)
        np.savez(os.path.join(args.out, f"result_{jax.process_index()}.npz"), **out)
    distributed.sync("done")


if __name__ == "__main__":
    main()
