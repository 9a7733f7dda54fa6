"""``train_many``: the seeds one after another (``"sequential"``) against all in one vmapped step (``"vmap"``).

For each model (default: an MLP and the simple CNN of the zoo on sklearn digits, 1437 training images, batch 64,
SGD with momentum, 4 seeds) and each device count (forced host devices on CPU, one fresh process per count:
``--xla_force_host_platform_device_count``; ``--real`` uses the machine's own devices, up to the count) it
prints one JSON line with

- ``sequential_s_per_epoch`` / ``vmap_s_per_epoch``: seconds per epoch of all seeds together, the minimum over
  ``--repeats`` timed calls after a warm-up call with the same configuration (so nothing compiles in them);
  no test set, so what is timed is the training loop alone;
- ``ratio_vmap_over_sequential`` (< 1: vmap is faster) and the strategy ``"auto"`` picks for the shape;
- ``max_rel_diff_step``: the largest relative difference (``max|a - b| / max|b|`` per leaf) between the two
  ways' parameters after the first epoch, per seed, and ``max_rel_diff``: the same after the last epoch. Both
  ways compute each seed's own update; over many steps of a ReLU network a rounding difference can move a
  seed's trajectory (a 1e-7 relative perturbation of one seed's initialisation does the same), which
  ``max_rel_diff`` shows and ``max_rel_diff_step`` does not.

On a 2-core CPU, forced host devices share the same two cores, so more devices show the cost of the split,
not a speed-up.

    python benchmarks/train_many.py [--devices 1,2,4,8] [--models mlp,simple_cnn] [--seeds 4] [--epochs 2]
                                    [--repeats 2] [--real]
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
                for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params),
                                strict=True))
            for a, b in zip(a_runs, b_runs, strict=True)]


def worker(models: list[str], seeds: int, epochs: int, repeats: int, devices: int | None) -> list[dict]:
    import jax

    import mclandscape as mcl
    from mclandscape.engine.train import _many_strategy

    train = mcl.load_dataset("digits", "train")
    cfg = mcl.TrainConfig(epochs=epochs, batch_size=64, optimizer="sgd", lr=0.05, momentum=0.9)
    out = []
    for name in models:
        model = mcl.get_model(name, num_classes=10)
        rec = {"bench": "train_many", "model": name, "seeds": seeds, "devices": devices or len(jax.devices()),
               "backend": jax.default_backend(), "epochs": epochs,
               "auto": _many_strategy("auto", model, train, cfg, list(range(seeds)), None)}
        runs, first = {}, {}
        for how in STRATEGIES:
            go = lambda c, how=how: mcl.train_many(model, train, None, c, seeds=range(seeds),  # noqa: E731
                                                   strategy=how, progress=False, devices=devices)
            first[how] = go(cfg.replace(epochs=1))
            go(cfg)  # compiles (the same configuration as the timed calls: the same transform, the same step)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                runs[how] = go(cfg)
                best = min(best, time.perf_counter() - t0)
            rec[f"{how}_s_per_epoch"] = round(best / epochs, 4)
        for how in STRATEGIES[1:]:
            rec[f"ratio_{how}_over_sequential"] = round(rec[f"{how}_s_per_epoch"] / rec["sequential_s_per_epoch"], 3)
            rec[f"{how}_max_rel_diff_epoch1"] = max(_rel_diff(first[how], first["sequential"]))
            per_seed = _rel_diff(runs[how], runs["sequential"])
            rec[f"{how}_max_rel_diff"] = max(per_seed)
            rec[f"{how}_max_rel_diff_per_seed"] = [float(f"{d:.3g}") for d in per_seed]
        out.append(rec)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--models", default="mlp,simple_cnn")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
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
