"""Bézier-surface mode connectivity end to end (Anonymous, 2024, "Revisiting mode connectivity in neural networks with Bézier surface": Tables 1-4, Figures 1, 3-6, 8, 9).

Steps (each writes its part of ``<out>/results.json``; figures are PNGs in ``<out>``):

1. Four corner models trained independently (seeds ``seed .. seed+3``, :func:`mclandscape.engine.many.train_many`);
   seed ``seed``'s run also keeps snapshots at ``--trajectory-epochs`` (A.2/A.3 trajectory corners).
2. §4.1 / Figure 3: the linear triangle ``alpha1 theta1 + alpha2 theta2 + alpha3 theta3`` of three corners
   (step ``1/(triangle_steps-1)``), test accuracy and loss; ``triangle.png``.
3. The n x m Bézier surface through the four corners (``--control-points``, default 3x3), initialised
   bilinearly: before training it *is* the four-corner bilinear surface (A.2), evaluated on the 11 x 11 grid
   (train loss, test accuracy, BatchNorm statistics recomputed per point from the training data).
4. Training with the three-phase schedule (Algorithms 1-2; ``--phase-epochs E1,E2,E3``, ``--num-samples``
   k per batch) for each objective in ``--objectives``: ``uniform`` (eq. 9, the paper) and ``area`` (eq. 7-8
   made exact: importance weights by default). After training: the grid again, model merging (the grid
   point of least train loss and its test accuracy; Table 1), the best test accuracy on the grid, output
   ensembles of all grid models vs the four corners (Table 3), and the area-weighted mean loss
   ``sum q_uv L / sum q_uv`` next to the uniform mean, so both objectives are judged by both measures.
5. Appendix B on the first objective's trained surface: train loss from ``--subset-train-batches`` batches
   and test accuracy from ``--subset-test-size`` test examples, valley/peak positions vs the full data.
6. A.6 / Table 4: the same training with only the layers matching ``--layers`` trained (default "auto":
   the last conv + dense layers of simple_cnn / VGG16, the last block + head of ResNet18 / ViT, every dense
   layer but the first of an MLP); accuracy and wall time against all layers.
7. A.2/A.3 / Figures 6, 8: the linear surface whose corners are four snapshots of one trajectory.

Results (fractions in [0, 1], losses are mean cross-entropy): ``avg_corner_acc``, ``avg_surface_acc_before``,
``avg_surface_acc_after``, ``merge_acc`` (chosen by train loss), ``best_surface_acc``, ``corner_ensemble_acc``,
``surface_ensemble_acc``, ``avg_surface_loss_before``, ``avg_surface_loss_after`` (mean *train* loss over
the grid; test losses are under ``*_test_loss_*``), ``control_grid``, ``phase_wall_time_s`` — all for the
first objective — and per-objective, layer-specific, linear-surface and appendix-B sections, plus the
paper's numbers (``paper``) for comparison.

Offline default: sklearn digits with a 64-64-10 MLP, a few minutes on 2 CPU cores. ``--dataset cifar10
--arch vgg16`` (also cifar100, tiny_imagenet; resnet18, vit, simple_cnn) switches to the paper settings
(corners trained 220 epochs with SGD + cosine + augmentation, trajectory snapshots 160/180/200/220, k = 80,
26 surface epochs as in Table 4); without the prepared TFDS files it stops at once with the data loader's
message. Every default can be overridden.

    python -m experiments.bezier_surface                 # offline default
    python -m experiments.bezier_surface --control-points 5x5 --objectives uniform
    python -m experiments.bezier_surface --dataset cifar10 --arch vgg16 --out results/bs_vgg16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

from experiments.launch import add_distributed_args, output_dir, setup
from mclandscape import plots
from mclandscape.core.connectors import bezier_surface
from mclandscape.engine.data import DatasetNotFoundError, load_dataset
from mclandscape.engine.many import train_many
from mclandscape.engine.models import get_model
from mclandscape.engine.train import TrainConfig
from mclandscape.methods import surface as S
from mclandscape.methods import surface_grid as G
from mclandscape.methods.surface_train import AREA_ESTIMATORS, OBJECTIVES, SurfaceConfig, train_surface

# The paper's figures (fractions), for the README table next to ours.
PAPER = {
    "table1": {  # model merging acc, avg surface acc, avg corner acc
        "cifar10_resnet18": [0.909, 0.893, 0.901], "cifar10_vgg16": [0.907, 0.898, 0.896],
        "cifar10_vit": [0.702, 0.654, 0.700], "cifar100_vgg16": [0.708, 0.693, 0.707],
        "tiny_imagenet_vgg16": [0.511, 0.474, 0.507]},
    "table2_simple_cnn_cifar10": {  # control points: avg corner acc, highest acc, avg surface acc
        "3x3": [0.802, 0.820, 0.797], "4x4": [0.802, 0.824, 0.800], "5x5": [0.802, 0.829, 0.803]},
    "table3_cifar10": {"vgg16": {"four_corner_ensemble": 0.904, "surface_ensemble": 0.920},
                       "resnet18": {"four_corner_ensemble": 0.901, "surface_ensemble": 0.927}},
    "table4_simple_cnn_cifar10": {"all_layers": {"avg_corner": 0.802, "highest": 0.820, "avg_surface": 0.797,
                                                 "minutes_26_epochs": 47},
                                  "last_conv_mlp": {"avg_corner": 0.802, "highest": 0.803, "avg_surface": 0.703,
                                                    "minutes_26_epochs": 15}},
}

OFFLINE = ("digits", "iris", "wine", "breast_cancer", "mnist1d")

# Defaults per setting: offline (small, minutes on CPU) or the paper's image settings.
DEFAULTS = {
    "offline": dict(arch="mlp", widths="64,64", corner_epochs=20, corner_lr=0.05, corner_wd=0.0, augment=False,
                    trajectory_epochs="14,16,18,20", phase_epochs="5,5,60", num_samples=80, lr=0.2,
                    batch_size=128, bn_batches=None),
    "image": dict(arch="vgg16", widths="64,64", corner_epochs=220, corner_lr=0.05, corner_wd=5e-4, augment=True,
                  trajectory_epochs="160,180,200,220", phase_epochs="5,5,16", num_samples=80, lr=0.015,
                  batch_size=128, bn_batches=None),
}

LAYER_PATTERNS = {
    "mlp": r"\['Dense_([1-9]\d*)'\]",
    "simple_cnn": r"\['(conv2|fc|head)'\]",
    "vgg16": r"\['(conv12|fc0|fc1|head)'\]",
    "vgg16_bn": r"\['(conv12|bn12|fc0|fc1|head)'\]",
    "resnet18": r"\['(stage3_block1|head)'\]",
    "vit_small": r"\['(block5|ln_final|head)'\]",
    "vit": r"\['(block5|ln_final|head)'\]",
    "convfc": r"\['(conv2|fc0|fc1|head)'\]",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.bezier_surface", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", default="digits", help="digits (default, offline), iris, wine, breast_cancer, mnist1d, or the "
      "paper's cifar10, cifar100, tiny_imagenet (needs prepared TFDS files)")
    a("--data-dir", default=None, help="TFDS data directory for CIFAR / Tiny-ImageNet (default $TFDS_DATA_DIR)")
    a("--arch", default=None, help="model: mlp (offline default), simple_cnn, vgg16 (image default), vgg16_bn, "
      "resnet18, vit, convfc")
    a("--widths", default=None, help="hidden widths of the mlp, comma-separated (default 64,64)")
    a("--limit-train", type=int, default=None, help="use only the first N training examples (quick runs)")
    a("--limit-test", type=int, default=None, help="use only the first N test examples (quick runs)")
    a("--seed", type=int, default=0, help="corners use seeds seed..seed+3; surface training uses seed")
    a("--corner-epochs", type=int, default=None, help="epochs of corner training (offline 20, image 220)")
    a("--corner-lr", type=float, default=None, help="SGD learning rate of corner training (cosine schedule)")
    a("--corner-wd", type=float, default=None, help="weight decay of corner training (offline 0, image 5e-4)")
    a("--augment", type=int, choices=(0, 1), default=None,
      help="1: random crop + flip for corner and surface training (image default), 0: none (offline)")
    a("--batch-size", type=int, default=None, help="batch size of corner and surface training (default 128)")
    a("--control-points", default="3x3", help="control grid (n+1)x(m+1), e.g. 3x3 (n = m = 2, the paper's "
      "default), 4x4, 5x5 (Table 2)")
    a("--phase-epochs", default=None, help="E1,E2,E3: epochs of phases 1, 2, 3 (offline 5,5,60; image 5,5,16 "
      "= the 26 epochs of Table 4)")
    a("--num-samples", type=int, default=None, help="k: (u, v) samples per batch, evaluated together (paper 80)")
    a("--lr", type=float, default=None, help="SGD learning rate of surface training (momentum 0.9, cosine per "
      "phase; offline 0.2, image 0.015)")
    a("--l2", type=float, default=0.0, help="L2 penalty on the trainable control points during surface training")
    a("--objectives", default="uniform,area", help="comma-separated surface objectives to train and compare: "
      "uniform (eq. 9) and/or area (eq. 7-8, exact); the first one fills the headline keys")
    a("--area-estimator", default="importance", choices=AREA_ESTIMATORS,
      help="area objective: importance weights on uniform samples, or sampling from an approximation of q_uv")
    a("--area-gradient", default="full", choices=S.AREA_GRADIENTS,
      help="area objective: differentiate through q_uv (full, exact eq. 7 gradient) or not (fixed)")
    a("--layers", default="auto", help="regex on parameter paths for the layer-specific run (A.6, Table 4); "
      "'auto' picks the last conv/block + dense layers of --arch, 'none' skips the run")
    a("--grid-steps", type=int, default=11, help="grid points per axis for loss/accuracy surfaces (11 = step 0.1)")
    a("--eval-batch-size", type=int, default=500, help="batch size of grid evaluation")
    a("--bn-batches", type=int, default=None, help="training batches used to recompute BatchNorm statistics "
      "at each grid point (default: all full batches)")
    a("--subset-train-batches", type=int, default=4, help="appendix B.1: batches of train data for the "
      "approximate train-loss surface")
    a("--subset-test-size", type=int, default=None, help="appendix B.2: test examples for the approximate "
      "accuracy surface (default a quarter of the test set)")
    a("--triangle-steps", type=int, default=11, help="points per edge of the §4.1 triangle (11 = step 0.1)")
    a("--trajectory-epochs", default=None, help="four corner-training epochs of seed `seed` used as the "
      "corners of the A.2/A.3 trajectory surface (offline 14,16,18,20; image 160,180,200,220); 'none' skips")
    a("--checkpoint-dir", default=None, help="directory for corner and surface checkpoints; a rerun resumes")
    a("--progress", action="store_true", help="show progress bars")
    a("--out", default="results/bezier_surface", help="output directory (results.json + PNGs)")
    add_distributed_args(p)
    return p


def _resolve(args) -> argparse.Namespace:
    args = argparse.Namespace(**vars(args))
    d = DEFAULTS["offline" if args.dataset.lower() in OFFLINE else "image"]
    for k, v in d.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.augment = bool(args.augment)
    try:
        n1, m1 = (int(s) for s in args.control_points.lower().split("x"))
    except ValueError as e:
        raise ValueError(f"--control-points must look like 3x3, got {args.control_points!r}") from e
    args.grid = (n1, m1)
    args.epochs = tuple(int(s) for s in args.phase_epochs.split(","))
    if len(args.epochs) != 3:
        raise ValueError(f"--phase-epochs needs three numbers E1,E2,E3, got {args.phase_epochs!r}")
    args.objective_list = [o for o in args.objectives.split(",") if o]
    for o in args.objective_list:
        if o not in OBJECTIVES:
            raise ValueError(f"unknown objective {o!r}; choose among {OBJECTIVES}")
    if not args.objective_list:
        raise ValueError("--objectives is empty")
    traj = str(args.trajectory_epochs)
    args.trajectory = None if traj.lower() == "none" else [int(s) for s in traj.split(",")]
    if args.trajectory is not None and (len(args.trajectory) != 4 or max(args.trajectory) > args.corner_epochs
                                        or min(args.trajectory) < 0):
        raise ValueError(f"--trajectory-epochs needs 4 epochs in [0, {args.corner_epochs}], got {traj!r}")
    if args.layers == "auto":
        args.layer_pattern = LAYER_PATTERNS.get(args.arch)
        if args.layer_pattern is None:
            raise ValueError(f"no automatic layer pattern for --arch {args.arch}; pass --layers REGEX or none")
    elif args.layers.lower() == "none":
        args.layer_pattern = None
    else:
        args.layer_pattern = args.layers
    return args


def _summary(grid: G.SurfaceGrid) -> dict:
    return {"avg_surface_acc": float(grid.test_acc.mean()), "min_surface_acc": float(grid.test_acc.min()),
            "max_surface_acc": float(grid.test_acc.max()), "avg_surface_loss": float(grid.train_loss.mean()),
            "max_surface_loss": float(grid.train_loss.max()), "avg_surface_test_loss": float(grid.test_loss.mean()),
            "avg_surface_train_acc": float(grid.train_acc.mean())}


def _grid_json(grid: G.SurfaceGrid) -> dict:
    r = lambda a: np.round(np.asarray(a, np.float64), 5).tolist()
    return {"u": r(grid.axis), "train_loss": r(grid.train_loss), "test_acc": r(grid.test_acc),
            "test_loss": r(grid.test_loss)}


def _area_mean(conn, grid: G.SurfaceGrid) -> float:
    """Area-weighted mean train loss over the grid, sum q L / sum q (the eq. 7 objective, discretised)."""
    a = np.asarray(S.area_element(conn, grid.points.astype(np.float32)), np.float64)
    return float(np.sum(a * grid.train_loss.ravel()) / np.sum(a))


def run(args) -> dict:
    """Run the experiment for parsed arguments (see :func:`build_parser`); returns the results dict."""
    args = _resolve(args)
    main_process = setup(args)  # before any JAX work
    t_start = time.time()
    train = load_dataset(args.dataset, "train", data_dir=args.data_dir)
    test = load_dataset(args.dataset, "test", data_dir=args.data_dir)
    if args.limit_train:
        train = train.take(args.limit_train)
    if args.limit_test:
        test = test.take(args.limit_test)
    out = output_dir(args.out, main_process)
    kw = {"num_classes": train.num_classes}
    if args.arch == "mlp":
        kw["widths"] = [int(w) for w in str(args.widths).split(",") if w]
    model = get_model(args.arch, **kw)
    ck = (lambda name: os.path.join(args.checkpoint_dir, name)) if args.checkpoint_dir else (lambda name: None)
    timing: dict = {}
    log = lambda msg: print(f"[bezier_surface {time.time() - t_start:7.1f}s] {msg}", flush=True)

    # 1. corners ---------------------------------------------------------------------------------------
    t = time.time()
    cfg = TrainConfig(epochs=args.corner_epochs, batch_size=args.batch_size, optimizer="sgd", lr=args.corner_lr,
                      momentum=0.9, weight_decay=args.corner_wd, schedule="cosine", augment=args.augment,
                      seed=args.seed)
    runs = train_many(model, train, test, cfg, seeds=[args.seed + i for i in range(4)],
                      checkpoint_dir=ck("corners"), save_epochs=args.trajectory or (), progress=args.progress)
    corners = [r.params for r in runs]
    timing["corners_s"] = time.time() - t
    log(f"corners trained: test acc {[round(r.final['test_acc'], 4) for r in runs]}")

    eval_kw = dict(steps=args.grid_steps, batch_size=args.eval_batch_size, bn_batches=args.bn_batches,
                   bn_batch_size=args.batch_size)
    results: dict = {"seed_paper": "000 (Bezier-surface mode connectivity)", "dataset": train.name,
                     "arch": args.arch, "model_spec": model.spec, "backend": jax.default_backend(),
                     "control_grid": list(args.grid), "phase_epochs": list(args.epochs),
                     "num_samples": args.num_samples, "grid_steps": args.grid_steps, "units": "accuracies are "
                     "fractions in [0, 1]; losses mean cross-entropy; surface loss = mean train loss on the grid",
                     "corner_test_acc_training": [float(r.final["test_acc"]) for r in runs]}

    # 2. triangle (§4.1, Figure 3) ---------------------------------------------------------------------
    t = time.time()
    tri = G.evaluate_triangle(model, corners[:3], test, steps=args.triangle_steps,
                              bn_data=train if model.has_batch_stats else None, batch_size=args.eval_batch_size,
                              bn_batches=args.bn_batches, bn_batch_size=args.batch_size)
    plots.save(plots.triangle_plot(tri.points, tri.accuracy, label="test accuracy",
                                   title="test accuracy on the linear surface of three independently trained "
                                         "models"), os.path.join(out, "triangle.png"))
    timing["triangle_s"] = time.time() - t
    vertices = [int(np.flatnonzero(np.isclose(tri.points[:, k], 1.0))[0]) for k in range(3)]
    results["linear_triangle"] = {"avg_acc": float(tri.accuracy.mean()), "min_acc": float(tri.accuracy.min()),
                                  "max_acc": float(tri.accuracy.max()), "vertex_acc": tri.accuracy[vertices].tolist(),
                                  "centre_acc": float(tri.accuracy[np.argmin(np.abs(tri.points - 1 / 3).sum(1))]),
                                  "points": len(tri.points)}
    log(f"triangle: mean acc {tri.accuracy.mean():.4f} (vertices {np.round(tri.accuracy[vertices], 4).tolist()})")

    # 3. surface before training = the bilinear four-corner surface (A.2) --------------------------------
    n1, m1 = args.grid
    surf = bezier_surface(*corners, n=n1 - 1, m=m1 - 1)
    t = time.time()
    before = G.surface_grid(model, surf, train, test, return_probs=True, **eval_kw)
    timing["grid_before_s"] = time.time() - t
    corner_acc = before.corner_values("test_acc")
    ens_before = G.surface_ensembles(before, test.y)
    results["avg_corner_acc"] = float(corner_acc.mean())
    results["corner_acc"] = corner_acc.tolist()
    results["corner_train_loss"] = before.corner_values("train_loss").tolist()
    results["before"] = {**_summary(before), "grid": _grid_json(before),
                         "area_weighted_loss": _area_mean(surf, before),
                         "surface_ensemble_acc": 1 - ens_before["surface"].test_error,
                         "merge": G.merge_best(before)}
    results["linear_bilinear"] = {"note": "the untrained Bezier surface is the bilinear four-corner surface "
                                  "(degree elevation), so this is the 'before' grid", **_summary(before)}
    log(f"before: avg surface acc {before.test_acc.mean():.4f}, avg train loss {before.train_loss.mean():.4f}")

    # 4. training, per objective -----------------------------------------------------------------------
    per: dict = {}
    trained = {}
    cfg = SurfaceConfig(epochs=tuple(args.epochs), num_samples=args.num_samples, batch_size=args.batch_size,
                        lr=args.lr, weight_decay=args.l2, weight_decay_on="control",
                        area_estimator=args.area_estimator, area_gradient=args.area_gradient, augment=args.augment)
    for obj in args.objective_list:
        t = time.time()
        res = train_surface(model, surf, train, dataclasses.replace(cfg, objective=obj), seed=args.seed,
                            checkpoint_dir=ck(f"surface_{obj}"), progress=args.progress)
        train_s = time.time() - t
        t = time.time()
        after = G.surface_grid(model, res.connector, train, test, return_probs=True, **eval_kw)
        ens = G.surface_ensembles(after, test.y)
        merge = G.merge_best(after)
        per[obj] = {**_summary(after), "area_weighted_loss": _area_mean(res.connector, after),
                    "merge_acc": merge["test_acc"], "merge": merge, "best_surface_acc": merge["best_test_acc"],
                    "corner_ensemble_acc": 1 - ens["corner"].test_error,
                    "surface_ensemble_acc": 1 - ens["surface"].test_error,
                    "corner_ensemble": ens["corner"].to_json() | {"member_test_error": None, "member_nll": None},
                    "surface_ensemble": ens["surface"].to_json() | {"member_test_error": None, "member_nll": None},
                    "phase_wall_time_s": {f"phase{p}": round(s, 3) for p, s in res.wall_time.items()},
                    "train_wall_time_s": round(train_s, 3), "eval_wall_time_s": round(time.time() - t, 3),
                    "skipped_phases": {f"phase{p}": why for p, why in res.skipped.items()},
                    "history": {f"phase{p}": h for p, h in res.history.items()},
                    "grid": _grid_json(after)}
        trained[obj] = (res, after)
        log(f"{obj}: avg surface acc {after.test_acc.mean():.4f}, avg train loss {after.train_loss.mean():.4f}, "
            f"merge acc {merge['test_acc']:.4f}, surface ensemble {per[obj]['surface_ensemble_acc']:.4f}")
    results["objectives"] = per
    first = args.objective_list[0]
    res0, after0 = trained[first]
    p0 = per[first]
    results.update({
        "objective": first,
        "avg_surface_acc_before": results["before"]["avg_surface_acc"],
        "avg_surface_acc_after": p0["avg_surface_acc"],
        "merge_acc": p0["merge_acc"], "best_surface_acc": p0["best_surface_acc"],
        "corner_ensemble_acc": p0["corner_ensemble_acc"], "surface_ensemble_acc": p0["surface_ensemble_acc"],
        "avg_surface_loss_before": results["before"]["avg_surface_loss"],
        "avg_surface_loss_after": p0["avg_surface_loss"],
        "avg_surface_test_loss_before": results["before"]["avg_surface_test_loss"],
        "avg_surface_test_loss_after": p0["avg_surface_test_loss"],
        "phase_wall_time_s": p0["phase_wall_time_s"],
    })

    # 5. appendix B ------------------------------------------------------------------------------------
    t = time.time()
    sub = G.subset_approximation(model, res0.connector, train, test, full=after0,
                                 train_batches=args.subset_train_batches, batch_size=args.batch_size,
                                 test_size=args.subset_test_size, seed=args.seed, bn_batches=args.bn_batches,
                                 bn_batch_size=args.batch_size)
    plots.save(plots.subset_comparison(after0.train_loss, np.asarray(sub["subset_grid"]["train_loss"]),
                                       label="train loss",
                                       title=f"train loss over the trained surface: {sub['train_examples']} "
                                             "training examples vs all"),
               os.path.join(out, "subset_train_loss.png"))
    plots.save(plots.subset_comparison(after0.test_acc, np.asarray(sub["subset_grid"]["test_acc"]),
                                       label="test accuracy",
                                       title=f"test accuracy over the trained surface: {sub['test_examples']} "
                                             "test examples vs all"),
               os.path.join(out, "subset_test_acc.png"))
    sub.pop("subset_grid")
    results["subset_approximation"] = sub
    timing["subset_s"] = time.time() - t

    # 6. layer-specific optimisation (A.6, Table 4) ----------------------------------------------------
    if args.layer_pattern:
        t = time.time()
        res_l = train_surface(model, surf, train, dataclasses.replace(cfg, objective=first, layers=args.layer_pattern),
                              seed=args.seed, checkpoint_dir=ck(f"surface_{first}_layers"), progress=args.progress)
        train_l = time.time() - t
        grid_l = G.surface_grid(model, res_l.connector, train, test, **eval_kw)
        m = G.merge_best(grid_l)
        results["layer_specific"] = {
            "pattern": args.layer_pattern,
            "all_layers": {"avg_corner_acc": results["avg_corner_acc"], "highest_acc": p0["best_surface_acc"],
                           "avg_surface_acc": p0["avg_surface_acc"], "train_wall_time_s": p0["train_wall_time_s"]},
            "selected_layers": {"avg_corner_acc": results["avg_corner_acc"], "highest_acc": m["best_test_acc"],
                                "avg_surface_acc": float(grid_l.test_acc.mean()),
                                "avg_surface_loss": float(grid_l.train_loss.mean()), "merge_acc": m["test_acc"],
                                "train_wall_time_s": round(train_l, 3),
                                "phase_wall_time_s": {f"phase{p}": round(s, 3) for p, s in res_l.wall_time.items()}},
        }
        log(f"layers {args.layer_pattern}: avg surface acc {grid_l.test_acc.mean():.4f} in {train_l:.1f}s "
            f"(all layers {p0['avg_surface_acc']:.4f} in {p0['train_wall_time_s']:.1f}s)")

    # 7. trajectory corners (A.2/A.3) ------------------------------------------------------------------
    if args.trajectory is not None:
        t = time.time()
        snaps = [runs[0].snapshots[e]["params"] for e in args.trajectory]
        traj = G.trajectory_surface(snaps, n=n1 - 1, m=m1 - 1)
        grid_t = G.surface_grid(model, traj, train, test, **eval_kw)
        results["linear_trajectory"] = {"epochs": args.trajectory, **_summary(grid_t),
                                        "corner_acc": grid_t.corner_values("test_acc").tolist(),
                                        "merge": G.merge_best(grid_t), "grid": _grid_json(grid_t)}
        # two different metrics side by side (each on its own scale), not a before/after pair
        fig, axes = plots.subplots(1, 2, figsize=(10, 4.3))
        plots.heatmap(grid_t.train_loss, ax=axes[0], label="train loss", title="train loss")
        plots.heatmap(grid_t.test_acc, ax=axes[1], label="test accuracy", title="test accuracy")
        fig.suptitle(f"linear surface whose corners are epochs {args.trajectory} of one training run")
        plots.save(fig, os.path.join(out, "trajectory_surface.png"))
        timing["trajectory_s"] = time.time() - t
        log(f"trajectory surface: avg acc {grid_t.test_acc.mean():.4f}")

    # figures --------------------------------------------------------------------------------------------
    plots.save(plots.heatmap_pair(before.train_loss, after0.train_loss, label="train loss",
                                  title=f"train loss over the surface (u, v), before and after training "
                                        f"({first} objective)"), os.path.join(out, "loss_before_after.png"))
    plots.save(plots.heatmap_pair(before.test_acc, after0.test_acc, label="test accuracy",
                                  title=f"test accuracy over the surface (u, v), before and after training "
                                        f"({first} objective)"), os.path.join(out, "acc_before_after.png"))
    plots.save(plots.surface_3d([before.train_loss, after0.train_loss], titles=["before training", "after training"],
                                zlabel="train loss", title=f"train loss over the surface (u, v) ({first} objective)"),
               os.path.join(out, "surface_3d.png"))
    for obj, (_, g) in trained.items():
        if obj != first:
            plots.save(plots.heatmap_pair(before.test_acc, g.test_acc, label="test accuracy",
                                          title=f"test accuracy over the surface (u, v), before and after training "
                                                f"({obj} objective)"), os.path.join(out, f"acc_before_after_{obj}.png"))
    results["timing_s"] = {k: round(v, 2) for k, v in timing.items()}
    results["wall_time_s"] = round(time.time() - t_start, 1)
    results["paper"] = PAPER
    results["figures"] = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    log(f"wrote {os.path.join(out, 'results.json')}")
    return results


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except DatasetNotFoundError as e:
        sys.exit(f"experiments.bezier_surface: {e}")


if __name__ == "__main__":
    main()
