"""``train_many``: the seeds one after another (``"sequential"``) against all in one compiled step.

For each model (default: an MLP and the simple CNN of the zoo on sklearn digits, 1437 training images, batch 64,
SGD with momentum, 4 seeds) and each device count (forced host devices on CPU, one fresh process per count:
``--xla_force_host_platform_device_count``; ``--real`` uses the machine's own devices, up to the count) it
prints one JSON line with, for ``<how>`` in ``sequential``, ``vmap`` and ``unroll`` (the last only where the
seeds are not split over devices: split, it runs vmapped),

- ``<how>_s_per_epoch``: seconds per epoch of all seeds together, the minimum over ``--repeats`` timed calls
  after a first call with the same configuration (so nothing compiles in them); no test set, so what is timed
  is the training loop alone;
- ``<how>_first_call_s`` and ``<how>_compile_s``: that first call, and the seconds JAX spent in it tracing,
  lowering and compiling (``jax.monitoring``);
- ``ratio_<how>_over_sequential`` (< 1: stacking is faster), ``<how>_extra_compile_s`` and
  ``<how>_saved_ms_per_seed_step`` (what ``train_many(strategy="auto")`` weighs: the stacked step's extra
  compilation against the time saved per seed and step), and the strategy ``"auto"`` picks for the shape
  (for this short run);
- ``<how>_max_rel_diff_epoch1`` / ``<how>_max_rel_diff``: the largest relative difference
  (``max|a - b| / max|b|`` per leaf) from the sequential parameters after the first and the last epoch (per
  seed in ``<how>_max_rel_diff_per_seed``). Every way computes each seed's own update; over many steps of a
  ReLU network a rounding difference can move a seed's trajectory (a 1e-7 relative change of one seed's
  initialisation does the same: with ``--epochs 2`` one simple-CNN seed of four ends about 0.1 apart).

On a 2-core CPU, forced host devices share the same two cores, so more devices show the cost of the split,
not a speed-up. The default run takes a few minutes there.

    python benchmarks/train_many.py [--devices 1,4] [--models mlp,simple_cnn] [--seeds 4] [--epochs 1]
                                    [--repeats 3] [--real]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

STRATEGIES = ("sequential", "vmap", "unroll")


def _rel_diff(a_runs, b_runs) -> list[float]:
    import jax
    import numpy as np

    return [max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / max(float(np.max(np.abs(np.asarray(y)))),
                                                                           1e-30))
                for x, y in zip(jax.tree_util.tree_leaves(a["params"]), jax.tree_util.tree_leaves(b["params"]),
                                strict=True))
            for a, b in zip(a_runs, b_runs, strict=True)]


def _compile_seconds():
    """A dict whose ``"s"`` grows by the seconds JAX spends tracing, lowering and compiling from now on."""
    from jax import monitoring

    total = {"s": 0.0, "on": True}
    names = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
             "/jax/core/compile/backend_compile_duration")

    def listener(name, seconds, **kwargs):
        if total["on"] and name in names:
            total["s"] += seconds

    monitoring.register_event_duration_secs_listener(listener)
    return total


def worker(models: list[str], seeds: int, epochs: int, repeats: int, devices: int | None) -> list[dict]:
    import jax

    import mclandscape as mcl
    from mclandscape.engine.batches import num_batches
    from mclandscape.engine.distributed import training_mesh
    from mclandscape.engine.many import _many_strategy

    train = mcl.load_dataset("digits", "train")
    cfg = mcl.TrainConfig(epochs=epochs, batch_size=64, optimizer="sgd", lr=0.05, momentum=0.9)
    spe = num_batches(len(train), cfg.batch_size, cfg.drop_last)
    mesh = training_mesh(cfg.batch_size, seeds, devices=devices)
    split = mesh is not None and mesh.shape["points"] > 1
    # with the seeds split over devices "unroll" runs vmapped: the same computation as "vmap"
    strategies = STRATEGIES[:2] if split else STRATEGIES
    compiling = _compile_seconds()
    # one throw-away run first, so that what every process compiles once (initialisation, data, evaluation)
    # is not charged to the first strategy
    mcl.train_many(mcl.get_model("mlp", widths=[4], num_classes=10), train.take(64), None, cfg.replace(epochs=1),
                   seeds=(0, 1), strategy="sequential", progress=False, devices=devices)
    out = []
    for name in models:
        model = mcl.get_model(name, num_classes=10)
        rec = {"bench": "train_many", "model": name, "seeds": seeds, "devices": devices or len(jax.devices()),
               "mesh": dict(mesh.shape) if mesh is not None else None, "backend": jax.default_backend(),
               "epochs": epochs, "steps_per_epoch": spe,
               "auto": _many_strategy("auto", model, train, cfg, list(range(seeds)), None)}
        for k in range(seeds):  # the initialisation's compilations (per parameter shape) are every way's
            model.init(jax.random.key(k), train.x[:1])
        runs = {}
        for how in strategies:
            go = lambda how=how, model=model: mcl.train_many(model, train, None, cfg, seeds=range(seeds),  # noqa: E731
                                                            strategy=how, progress=False, devices=devices,
                                                            save_epochs=(1,))
            compiling["s"] = 0.0
            t0 = time.perf_counter()
            go()  # compiles (the same configuration as the timed calls: the same transform, the same step)
            rec[f"{how}_first_call_s"] = round(time.perf_counter() - t0, 3)
            rec[f"{how}_compile_s"] = round(compiling["s"], 3)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                runs[how] = go()
                best = min(best, time.perf_counter() - t0)
            rec[f"{how}_s_per_epoch"] = round(best / epochs, 4)
        for how in strategies[1:]:
            rec[f"ratio_{how}_over_sequential"] = round(rec[f"{how}_s_per_epoch"] / rec["sequential_s_per_epoch"], 3)
            # what "auto" weighs: the compile time the stacked step adds and the time saved per avoided dispatch
            rec[f"{how}_extra_compile_s"] = round(rec[f"{how}_compile_s"] - rec["sequential_compile_s"], 3)
            rec[f"{how}_saved_ms_per_seed_step"] = round(
                1e3 * (rec["sequential_s_per_epoch"] - rec[f"{how}_s_per_epoch"]) / ((seeds - 1) * spe), 3)
            rec[f"{how}_max_rel_diff_epoch1"] = max(_rel_diff([r.snapshots[1] for r in runs[how]],
                                                              [r.snapshots[1] for r in runs["sequential"]]))
            per_seed = _rel_diff([r.variables for r in runs[how]], [r.variables for r in runs["sequential"]])
            rec[f"{how}_max_rel_diff"] = max(per_seed)
            rec[f"{how}_max_rel_diff_per_seed"] = [float(f"{d:.3g}") for d in per_seed]
        out.append(rec)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="1,4")
    ap.add_argument("--models", default="mlp,simple_cnn")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--real", action="store_true", help="use the machine's own devices, not forced CPU ones")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--use-devices", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        for rec in worker(args.models.split(","), args.seeds, args.epochs, args.repeats, args.use_devices):
            print(json.dumps(rec), flush=True)
        return
    for n in (int(c) for c in args.devices.split(",")):
        env = dict(os.environ)
        if not args.real:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--models", args.models, "--seeds",
               str(args.seeds), "--epochs", str(args.epochs), "--repeats", str(args.repeats)]
        if args.real:
            cmd += ["--use-devices", str(n)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise SystemExit(f"worker with {n} devices failed:\n{r.stderr[-3000:]}")
        print(r.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
