"""`make demo`: the main job on the offline default (sklearn digits, 2 CPU cores, a few minutes).

1. Train four MLPs on digits with different seeds (the corners of a surface).
2. Build the bilinear four-corner surface (Bézier-surface paper, appendix A.2) and evaluate it on the 11 x 11 (u, v)
   grid: train loss and test accuracy at every point.
3. Print a short table (corner accuracies, surface mean / min / max accuracy) and write
   ``<out>/results.json`` with PNG heat-maps of loss and accuracy over (u, v).
4. Run the trained Bézier-surface experiment (``experiments/bezier_surface.py``) on its offline default
   into ``<out>/bezier_surface`` (three-phase training, merging, ensembles, linear surfaces), and copy its
   headline figures into ``<out>/results.json`` under ``"bezier_surface"``.

    python -m experiments.demo [--out results/demo] [--skip-bezier] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from experiments.launch import add_distributed_args, output_dir, setup
from mclandscape import bilinear_surface, connector_points, evaluate, plots, uv_grid
from mclandscape.engine.data import load_dataset
from mclandscape.engine.many import train_many
from mclandscape.engine.models import get_model
from mclandscape.engine.train import TrainConfig

HEADLINE = ("avg_corner_acc", "avg_surface_acc_before", "avg_surface_acc_after", "merge_acc", "best_surface_acc",
            "corner_ensemble_acc", "surface_ensemble_acc", "avg_surface_loss_before", "avg_surface_loss_after",
            "control_grid", "phase_wall_time_s")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/demo", help="output directory (results.json and PNGs)")
    ap.add_argument("--seed", type=int, default=0, help="first corner seed (corners use seed..seed+3)")
    ap.add_argument("--epochs", type=int, default=20, help="epochs per corner model")
    ap.add_argument("--grid", type=int, default=11, help="grid points per axis (11 = step 0.1)")
    ap.add_argument("--skip-bezier", action="store_true", help="stop after the bilinear surface")
    add_distributed_args(ap)
    return ap


def run(args) -> dict:
    args = argparse.Namespace(**vars(args))
    args.out = output_dir(args.out, setup(args))
    t0 = time.perf_counter()
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    model = get_model("mlp", widths=[64], num_classes=10)
    config = TrainConfig(epochs=args.epochs, batch_size=64, optimizer="adam", lr=1e-3)
    runs = train_many(model, train, test, config, seeds=range(args.seed, args.seed + 4), progress=True)
    corners = [r.params for r in runs]
    t_train = time.perf_counter() - t0

    surf = bilinear_surface(*corners)
    pts = uv_grid(args.grid)
    t1 = time.perf_counter()
    both = evaluate(model, connector_points(surf, pts), {"train": train, "test": test})
    tr, te = both["train"], both["test"]
    t_eval = time.perf_counter() - t1
    g = args.grid
    loss_grid, acc_grid = tr.loss.reshape(g, g), te.accuracy.reshape(g, g)
    corner_acc = [float(acc_grid[0, 0]), float(acc_grid[0, -1]), float(acc_grid[-1, 0]), float(acc_grid[-1, -1])]
    res = {
        "dataset": "digits", "model": model.spec, "train_config": config.to_dict(),
        "corner_test_acc": corner_acc,
        "corner_test_acc_trainer": [float(r.history[-1]["test_acc"]) for r in runs],
        "bilinear_surface": {
            "grid": g, "mean_test_acc": float(acc_grid.mean()), "min_test_acc": float(acc_grid.min()),
            "max_test_acc": float(acc_grid.max()), "mean_train_loss": float(loss_grid.mean()),
            "max_train_loss": float(loss_grid.max()),
            "argmin_train_loss_uv": pts[int(np.argmin(tr.loss))].tolist(),
            "train_loss_grid": loss_grid.tolist(), "test_acc_grid": acc_grid.tolist(),
        },
        "wall_time_s": {"train_corners": round(t_train, 2), "evaluate_grid": round(t_eval, 2)},
        "evaluation_strategy": f"{te.strategy}/{te.chunk_size}",
    }
    plots.save(plots.heatmap(loss_grid, label="train loss", cmap="viridis_r",
                             title="train loss over the bilinear surface of four digits MLPs"),
               os.path.join(args.out, "bilinear_train_loss.png"))
    plots.save(plots.heatmap(acc_grid, label="test accuracy",
                             title="test accuracy over the bilinear surface of four digits MLPs"),
               os.path.join(args.out, "bilinear_test_acc.png"))
    print("\nmclandscape demo: four digits MLPs and their bilinear surface (11 x 11 grid)")
    print(f"  corner test accuracies   : {', '.join(f'{a:.4f}' for a in corner_acc)}")
    b = res["bilinear_surface"]
    print(f"  surface test accuracy    : mean {b['mean_test_acc']:.4f}  min {b['min_test_acc']:.4f}  "
          f"max {b['max_test_acc']:.4f}")
    print(f"  surface train loss       : mean {b['mean_train_loss']:.4f}  max {b['max_train_loss']:.4f}")
    print(f"  times                    : corners {t_train:.1f} s, 2 x 121 points {t_eval:.2f} s")

    if not args.skip_bezier:
        from experiments import bezier_surface

        bs_out = os.path.join(args.out, "bezier_surface")
        bs = bezier_surface.run(bezier_surface.build_parser().parse_args(["--out", bs_out]))
        res["bezier_surface"] = {k: bs[k] for k in HEADLINE if k in bs}
        res["bezier_surface"]["results"] = os.path.join(bs_out, "results.json")
        h = res["bezier_surface"]
        print("\nBézier surface (3-phase training, offline default):")
        for k in HEADLINE[:-2]:
            if k in h:
                print(f"  {k:26s}: {h[k]:.4f}")
    res["wall_time_s"]["total"] = round(time.perf_counter() - t0, 2)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(f"\nwrote {os.path.join(args.out, 'results.json')} and PNGs in {args.out}")
    return res


def main(argv=None) -> dict:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
