"""Permutation alignment before connecting: aligned linear paths and surfaces (beyond the papers).

The Bézier-surface paper (Anonymous, 2024, §4.1, Figure 3) finds the linear surfaces between independently trained
networks poor and trains a nonlinear surface instead; its related work cites weight-permutation alignment
(Entezari et al. 2022; Ainsworth, Hayase & Srinivasa 2023, "Git Re-Basin") as what makes *linear* mode
connectivity appear between independent networks. This experiment aligns the corners first
(:func:`mclandscape.methods.alignment.align`: every corner permuted to match corner 0, the function each
computes unchanged) and measures, raw against aligned:

1. four corner models trained independently (seeds ``seed .. seed+3``);
2. the straight line from corner 0 to each other corner (``--line-points`` evenly spaced t): the train-loss
   barrier ``max_t [L(t) - ((1-t) L(0) + t L(1))]`` (:func:`mclandscape.methods.curves.loss_barrier`),
   averaged over the three pairs;
3. the four-corner bilinear surface on the ``--grid-steps`` x ``--grid-steps`` grid: mean and minimum test
   accuracy;
4. the 3 x 3 Bézier surface (initialised bilinearly) trained with the paper's three-phase schedule
   (uniform objective, ``--phase-epochs``, ``--num-samples`` points per batch); after every epoch the mean
   test accuracy over the grid; the epochs until it reaches the corners' mean accuracy minus one point
   (0 if the untrained surface already does; null if the budget ends first), and within 5 and 2 points;
5. a width sweep (``--sweep-widths``; MLP hidden widths ``w-w``, or channel multipliers of the simple CNN):
   barrier and bilinear accuracy raw against aligned — Ainsworth et al.'s finding is that alignment helps
   more as width grows; the numbers say where it does not.

``<out>/results.json`` holds, for the first model of ``--archs`` (``headline_model``), the contract keys
``linear_barrier_raw``, ``linear_barrier_aligned``, ``bilinear_mean_acc_raw``, ``bilinear_mean_acc_aligned``,
``bilinear_min_acc_raw``, ``bilinear_min_acc_aligned``, ``bezier_surface_epochs_to_target_raw``,
``bezier_surface_epochs_to_target_aligned`` (accuracies are test-set fractions, barriers in train loss), the
same for every model under ``per_model``, the width sweep under ``width_sweep``, and per-model figures:
``<arch>_bilinear.png`` (raw vs aligned bilinear surface, one colour scale per row), ``<arch>_lines.png``
(line profiles), ``<arch>_surface_training.png`` (mean grid accuracy per epoch), ``width_sweep.png``.

Offline default (digits, MLP 64-64-10 and the simple CNN, 4 seeds, width sweep 4..256): minutes on 2 CPU
cores. CIFAR settings (``--dataset cifar10``; needs the prepared TFDS files, else it stops at once with the
data loader's message): VGG16 and ResNet-20 (option-A shortcuts) corners trained 200 epochs with SGD 0.05,
momentum 0.9, weight decay 5e-4, cosine schedule and augmentation (Ainsworth et al.'s VGG16/ResNet-20
recipe up to the optimizer), surfaces 5,5,16 epochs with k = 80 and lr 0.015 (Bézier-surface paper, Table 4),
and the width sweep over ResNet-20 x1 and x4 (``get_model("resnet20", width=4)``, as Ainsworth et al.); BatchNorm statistics of every evaluated point
from 20 training batches (the grid is evaluated after every surface epoch). Every default can be overridden.

    python -m experiments.alignment                                  # offline default
    python -m experiments.alignment --method activation --archs mlp
    python -m experiments.alignment --dataset cifar10 --out results/alignment_cifar10
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.launch import add_distributed_args, output_dir, setup
from mclandscape import plots
from mclandscape.core.connectors import bezier_surface, bilinear_surface
from mclandscape.engine.data import DatasetNotFoundError, load_dataset
from mclandscape.engine.evaluate import evaluate
from mclandscape.engine.loop import StopRun
from mclandscape.engine.many import train_many
from mclandscape.engine.models import get_model
from mclandscape.engine.points import connector_points, uv_grid
from mclandscape.engine.train import TrainConfig
from mclandscape.methods import alignment as AL
from mclandscape.methods import surface_grid as S
from mclandscape.methods.curves import evaluate_curve, line_connector
from mclandscape.methods.surface_train import SurfaceConfig, train_surface

OFFLINE = ("digits", "iris", "wine", "breast_cancer", "mnist1d")

DEFAULTS = {
    "offline": dict(archs="mlp,simple_cnn", corner_epochs=20, corner_lr=0.05, corner_wd=0.0, augment=False,
                    batch_size=128, phase_epochs="2,2,16", num_samples=16, lr=0.2, sweep_arch="mlp",
                    sweep_widths="4,8,16,32,64,128,256", sweep_epochs=None, bn_batches=None),
    "image": dict(archs="vgg16,resnet20", corner_epochs=200, corner_lr=0.05, corner_wd=5e-4, augment=True,
                  batch_size=128, phase_epochs="5,5,16", num_samples=80, lr=0.015, sweep_arch="resnet20",
                  sweep_widths="1,4", sweep_epochs=None, bn_batches=20),
}

GAPS = (0.05, 0.02, 0.01)  # epochs until the mean grid accuracy is within these of the corners' mean

CONTRACT = ("linear_barrier_raw", "linear_barrier_aligned", "bilinear_mean_acc_raw", "bilinear_mean_acc_aligned",
            "bilinear_min_acc_raw", "bilinear_min_acc_aligned", "bezier_surface_epochs_to_target_raw",
            "bezier_surface_epochs_to_target_aligned")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.alignment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", default="digits", help="digits (default, offline), iris, wine, breast_cancer, mnist1d, or "
      "cifar10, cifar100, tiny_imagenet (prepared TFDS files)")
    a("--data-dir", default=None, help="TFDS data directory for the image datasets (default $TFDS_DATA_DIR)")
    a("--archs", default=None, help="comma-separated zoo models (offline mlp,simple_cnn; image vgg16,resnet20); "
      "the first fills the headline keys")
    a("--widths", default="64,64", help="hidden widths of the mlp (default 64,64: MLP 64-64-10)")
    a("--limit-train", type=int, default=None, help="use only the first N training examples (quick runs)")
    a("--limit-test", type=int, default=None, help="use only the first N test examples (quick runs)")
    a("--seed", type=int, default=0, help="the four corners use seeds seed..seed+3; surface training uses seed")
    a("--corner-epochs", type=int, default=None, help="epochs of corner training (offline 20, image 200)")
    a("--corner-lr", type=float, default=None, help="SGD learning rate of corner training (cosine schedule)")
    a("--corner-wd", type=float, default=None, help="weight decay of corner training (offline 0, image 5e-4)")
    a("--augment", type=int, choices=(0, 1), default=None, help="random crop + flip (image default 1)")
    a("--batch-size", type=int, default=None, help="batch size of corner and surface training (default 128)")
    a("--method", default="weight", choices=AL.METHODS, help="alignment: weight matching (default, no data) or "
      "activation matching on --activation-examples training examples")
    a("--activation-examples", type=int, default=1000, help="training examples for activation matching")
    a("--max-iter", type=int, default=100, help="most sweeps of weight matching")
    a("--line-points", type=int, default=25, help="points on each straight line (barrier resolution)")
    a("--grid-steps", type=int, default=11, help="grid points per axis of the surfaces (11 = step 0.1)")
    a("--phase-epochs", default=None, help="E1,E2,E3 of the three-phase Bézier-surface training (offline 2,2,16; "
      "image 5,5,16); 0,0,0 skips it")
    a("--num-samples", type=int, default=None, help="k: surface points per batch (offline 16, image 80)")
    a("--lr", type=float, default=None, help="SGD learning rate of surface training (momentum 0.9, cosine per "
      "phase; offline 0.2, image 0.015)")
    a("--full-budget", action="store_true", help="train every surface for the whole budget instead of stopping "
      "once the target is reached (the epochs to target are the same; the curve continues)")
    a("--sweep-arch", default=None, choices=("mlp", "simple_cnn", "resnet20"), help="width sweep model: mlp "
      "(hidden widths w-w, offline), simple_cnn or resnet20 (channels x w; image: resnet20 x1, x4)")
    a("--sweep-widths", default=None, help="comma-separated widths (mlp) or multipliers (simple_cnn); 'none' "
      "skips the sweep (offline 4,...,256; image 1,4)")
    a("--sweep-epochs", type=int, default=None, help="corner epochs in the sweep (default --corner-epochs)")
    a("--eval-batch-size", type=int, default=500, help="batch size of evaluation")
    a("--bn-batches", type=int, default=None, help="training batches for the BatchNorm statistics of every "
      "point (models with BatchNorm; offline default all, image 20: the surface grid is evaluated every epoch)")
    a("--progress", action="store_true", help="show progress bars")
    a("--out", default="results/alignment", help="output directory (results.json + PNGs)")
    add_distributed_args(p)
    return p


def _resolve(args) -> argparse.Namespace:
    args = argparse.Namespace(**vars(args))
    d = DEFAULTS["offline" if args.dataset.lower() in OFFLINE else "image"]
    for k, v in d.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.augment = bool(args.augment)
    args.arch_list = [s.strip() for s in str(args.archs).split(",") if s.strip()]
    if not args.arch_list:
        raise ValueError("--archs is empty")
    args.epochs = tuple(int(s) for s in str(args.phase_epochs).split(","))
    if len(args.epochs) != 3 or min(args.epochs) < 0:
        raise ValueError(f"--phase-epochs needs three numbers E1,E2,E3 >= 0, got {args.phase_epochs!r}")
    sw = str(args.sweep_widths).lower()
    args.sweep = [] if sw in ("none", "") else [int(s) for s in sw.split(",")]
    args.sweep_epochs = args.sweep_epochs or args.corner_epochs
    if args.line_points < 2 or args.grid_steps < 2:
        raise ValueError("--line-points and --grid-steps must be >= 2")
    return args


# ---- helpers -------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _model(arch: str, num_classes: int, widths: tuple | None, multiplier: int | None):
    kw = {"num_classes": num_classes}
    if arch == "mlp":
        kw["widths"] = list(widths)
    if arch == "simple_cnn" and multiplier is not None:
        kw["channels"] = [32 * multiplier, 64 * multiplier, 128 * multiplier]
        kw["hidden"] = 256 * multiplier
    if arch == "resnet20" and multiplier is not None:
        kw["width"] = multiplier
    return get_model(arch, **kw)


def build_model(arch: str, num_classes: int, *, widths=None, multiplier: int | None = None):
    """The zoo model of ``arch``; ``widths`` for the mlp, ``multiplier`` scales the simple CNN's or ResNet-20's
    channels.
    The same arguments give the same :class:`~mclandscape.engine.models.Model` (models hash by identity, so the
    width sweep reuses the compiled functions of the headline run)."""
    widths = tuple(int(w) for w in widths) if arch == "mlp" else None
    return _model(arch, int(num_classes), widths, None if multiplier is None else int(multiplier))


_CORNERS: dict = {}


def train_corners(model, train, test, args, epochs: int) -> list:
    """Four corners (seeds seed..seed+3), trained once per model and setting within a run."""
    key = (id(model), len(train), len(test), epochs)
    if key not in _CORNERS:
        _CORNERS[key] = (model, train_many(model, train, test, corner_config(args, epochs),
                                           seeds=[args.seed + i for i in range(4)], progress=args.progress))
    return _CORNERS[key][1]


def _r(a, nd: int = 5):
    return np.round(np.asarray(a, np.float64), nd).tolist()


def _params(v):
    return v["params"]


@functools.partial(jax.jit, static_argnums=0)  # models equal by value share the compiled function
def _logits(model, variables, x):
    return model.apply(variables, x)


def _max_logit_change(model, before, after, x) -> float:
    """Largest change of any logit on ``x`` between two variable sets (0 up to float rounding when the
    alignment kept the function)."""
    xs = jnp.asarray(x)
    return float(jnp.max(jnp.abs(_logits(model, before, xs) - _logits(model, after, xs))))


def align_corners(model, corners: list, data, args) -> tuple[list, dict]:
    """Every corner aligned to corner 0 (which stays), with timings, sweeps and parameter distances."""
    spec = AL.permutation_spec(model)
    out, info = [corners[0]], {"method": args.method, "seconds": [], "iterations": [], "converged": [],
                               "distance_raw": [], "distance_aligned": [], "max_logit_change": 0.0}
    x = np.asarray(data.x[:min(len(data), 512)])
    ref = np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree_util.tree_leaves(_params(corners[0]))])
    dist = lambda v: float(np.linalg.norm(  # noqa: E731
        ref - np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree_util.tree_leaves(_params(v))])))
    for k, c in enumerate(corners[1:], start=1):
        t = time.time()
        al, perm = AL.align(model, corners[0], c, method=args.method, spec=spec, data=data,
                            num_examples=args.activation_examples, max_iter=args.max_iter,
                            key=jax.random.key(args.seed + k), return_permutation=True)
        info["seconds"].append(round(time.time() - t, 3))
        info["iterations"].append(perm.iterations)
        info["converged"].append(perm.converged)
        info["distance_raw"].append(dist(c))
        info["distance_aligned"].append(dist(al))
        info["max_logit_change"] = max(info["max_logit_change"], _max_logit_change(model, c, al, x))
        out.append(al)
    return out, info


def line_barriers(model, corners: list, train, test, args) -> tuple[dict, list]:
    """Straight lines corner 0 -> corner k: train-loss barriers and profiles."""
    bn = train if model.has_batch_stats else None
    evals = [evaluate_curve(model, line_connector(_params(corners[0]), _params(c)), train, test,
                           num_points=args.line_points, bn_data=bn, bn_batches=args.bn_batches,
                           bn_batch_size=args.batch_size, batch_size=args.eval_batch_size) for c in corners[1:]]
    barriers = [e.barrier("train_loss") for e in evals]
    return {"barrier": float(np.mean(barriers)), "barriers": barriers,
            "min_test_acc": [float(e.test_acc.min()) for e in evals],
            "mid_test_acc": [float(e.test_acc[len(e.ts) // 2]) for e in evals],
            "test_loss_barrier": [e.barrier("test_loss") for e in evals]}, evals


def bilinear(model, corners: list, train, test, args) -> S.SurfaceGrid:
    surf = bilinear_surface(*[_params(c) for c in corners])
    return S.surface_grid(model, surf, train, test, steps=args.grid_steps, batch_size=args.eval_batch_size,
                          bn_batches=args.bn_batches, bn_batch_size=args.batch_size)


def train_surface_tracked(model, surface, train, test, *, epochs, num_samples: int, batch_size: int, lr: float,
                          seed: int, target: float | None = None, grid_steps: int = 11, eval_batch_size: int = 500,
                          bn_batches: int | None = None, augment: bool = False, stop_at_target: bool = True,
                          progress: bool = False, strategy: str | None = None):
    """:func:`mclandscape.methods.surface_train.train_surface` (uniform objective, its default optimizer), with the
    mean test accuracy over the ``grid_steps``-grid measured after every epoch through its ``callback``.

    Returns ``(connector, curve, epochs_to_target)``: ``curve`` lists ``{"phase", "epoch", "total_epochs",
    "mean_acc"}`` from the untrained surface (total 0) on; ``epochs_to_target`` is the first total epoch whose
    mean accuracy reaches ``target`` (``None`` if none does; no target: ``None``). With ``stop_at_target``
    training ends there (``StopRun`` from the callback).
    """
    pts = uv_grid(grid_steps)
    bn = train if model.has_batch_stats else None

    def mean_acc(conn) -> float:
        r = evaluate(model, connector_points(conn, pts), test, batch_size=eval_batch_size, bn_data=bn,
                     bn_batches=bn_batches, bn_batch_size=batch_size)
        return float(np.mean(r.accuracy))

    acc0 = mean_acc(surface)
    curve = [{"phase": 0, "epoch": 0, "total_epochs": 0, "mean_acc": acc0}]
    reached = 0 if (target is not None and acc0 >= target) else None
    if reached is not None and stop_at_target:
        return surface, curve, reached

    def track(epoch, result):
        nonlocal reached
        phase = result.phase
        total = curve[-1]["total_epochs"] + 1
        acc = mean_acc(result.connector)
        curve.append({"phase": phase, "epoch": epoch, "total_epochs": total, "mean_acc": acc})
        if target is not None and reached is None and acc >= target:
            reached = total
            if stop_at_target:
                raise StopRun

    cfg = SurfaceConfig(epochs=tuple(int(e) for e in epochs), num_samples=int(num_samples), batch_size=batch_size,
                        lr=float(lr), augment=augment, strategy=strategy)
    res = train_surface(model, surface, train, cfg, seed=seed, progress=progress, callback=track)
    return res.connector, curve, reached


# ---- figures -------------------------------------------------------------------------------------------


def plot_bilinear(raw: S.SurfaceGrid, aligned: S.SurfaceGrid, path: str, title: str) -> str:
    """Raw vs aligned bilinear surfaces: test accuracy (top) and train loss (bottom), one colour scale per row."""
    fig, axes = plots.subplots(2, 2, figsize=(10, 8.4))
    for row, (name, label, cmap) in enumerate((("test_acc", "test accuracy", "viridis"),
                                               ("train_loss", "train loss", "magma"))):
        a, b = getattr(raw, name), getattr(aligned, name)
        stat, fn = ("min", np.min) if name == "test_acc" else ("max", np.max)
        plots.heatmap_pair(a, b, ax=axes[row], label=label, cmap=cmap, shared_scale=True,
                           titles=[f"{which}: {label} (mean {g.mean():.3f}, {stat} {fn(g):.3f})"
                                   for g, which in ((a, "raw"), (b, "aligned"))])
    fig.suptitle(title)
    fig.tight_layout()
    return plots.save(fig, path)


def plot_lines(raw: list, aligned: list, path: str, title: str) -> str:
    """Train loss and test accuracy along the straight lines corner 0 -> k, raw (dashed) vs aligned (solid)."""
    fig, (ax_l, ax_a) = plots.subplots(1, 2, figsize=(11, 4.2))
    colours = ["C0", "C1", "C2", "C3", "C4"]
    for k, (r, a) in enumerate(zip(raw, aligned, strict=True), start=1):
        c = colours[(k - 1) % len(colours)]
        ax_l.plot(r.ts, r.train_loss, "--", color=c, label=f"0-{k} raw")
        ax_l.plot(a.ts, a.train_loss, "-", color=c, label=f"0-{k} aligned")
        ax_a.plot(r.ts, r.test_acc, "--", color=c, label=f"0-{k} raw")
        ax_a.plot(a.ts, a.test_acc, "-", color=c, label=f"0-{k} aligned")
    ax_l.set_ylabel("train loss")
    ax_a.set_ylabel("test accuracy")
    for ax in (ax_l, ax_a):
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return plots.save(fig, path)


def plot_training(raw: list, aligned: list, target: float, path: str, title: str) -> str:
    fig, ax = plots.subplots(figsize=(6.4, 4.2))
    for curve, name, style in ((raw, "raw corners", "--o"), (aligned, "aligned corners", "-o")):
        ax.plot([c["total_epochs"] for c in curve], [c["mean_acc"] for c in curve], style, ms=3, label=name)
    ax.axhline(target, color="k", lw=0.8, label="target (corners' mean - 0.01)")
    ax.set_xlabel("epochs of three-phase surface training")
    ax.set_ylabel("mean test accuracy over the grid")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return plots.save(fig, path)


def plot_sweep(sweep: dict, path: str) -> str:
    w = sweep["widths"]
    fig, (ax_b, ax_s) = plots.subplots(1, 2, figsize=(11, 4.2))
    ax_b.plot(w, sweep["linear_barrier_raw"], "--o", label="raw")
    ax_b.plot(w, sweep["linear_barrier_aligned"], "-o", label="aligned")
    ax_b.set_ylabel("linear train-loss barrier (mean of 3 pairs)")
    ax_s.plot(w, sweep["bilinear_mean_acc_raw"], "--o", label="bilinear mean, raw")
    ax_s.plot(w, sweep["bilinear_mean_acc_aligned"], "-o", label="bilinear mean, aligned")
    ax_s.plot(w, sweep["corner_mean_acc"], ":k", label="corners' mean")
    ax_s.set_ylabel("test accuracy")
    for ax in (ax_b, ax_s):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden width" if sweep["arch"] == "mlp" else "channel multiplier")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"width sweep ({sweep['arch']}, {sweep['dataset']})")
    fig.tight_layout()
    return plots.save(fig, path)


# ---- the experiment ------------------------------------------------------------------------------------


def corner_config(args, epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=args.batch_size, optimizer="sgd", lr=args.corner_lr, momentum=0.9,
                       weight_decay=args.corner_wd, schedule="cosine", augment=args.augment, seed=args.seed)


def run_model(arch: str, train, test, args, log) -> dict:
    model = build_model(arch, train.num_classes, widths=str(args.widths).split(","))
    t0 = time.time()
    runs = train_corners(model, train, test, args, args.corner_epochs)
    raw = [r.variables for r in runs]
    res: dict = {"model_spec": model.spec, "corner_test_acc_training": [float(r.final["test_acc"]) for r in runs],
                 "timing_s": {"corners": round(time.time() - t0, 2)}}
    log(f"{arch}: corners trained, test acc {[round(r.final['test_acc'], 4) for r in runs]}")

    t = time.time()
    aligned, info = align_corners(model, raw, train, args)
    res["alignment"] = info
    res["timing_s"]["align"] = round(time.time() - t, 2)
    log(f"{arch}: aligned in {sum(info['seconds']):.2f}s, sweeps {info['iterations']}, distance "
        f"{np.round(info['distance_raw'], 2).tolist()} -> {np.round(info['distance_aligned'], 2).tolist()}, "
        f"max logit change {info['max_logit_change']:.2e}")

    t = time.time()
    line_raw, ev_raw = line_barriers(model, raw, train, test, args)
    line_al, ev_al = line_barriers(model, aligned, train, test, args)
    res["timing_s"]["lines"] = round(time.time() - t, 2)
    res.update(linear_barrier_raw=line_raw["barrier"], linear_barrier_aligned=line_al["barrier"],
               line={"raw": line_raw, "aligned": line_al,
                     "profiles": {"t": _r(ev_raw[0].ts), "raw_train_loss": [_r(e.train_loss) for e in ev_raw],
                                  "aligned_train_loss": [_r(e.train_loss) for e in ev_al],
                                  "raw_test_acc": [_r(e.test_acc) for e in ev_raw],
                                  "aligned_test_acc": [_r(e.test_acc) for e in ev_al]}})
    log(f"{arch}: linear barrier raw {line_raw['barrier']:.4f} -> aligned {line_al['barrier']:.4f}")

    t = time.time()
    g_raw, g_al = bilinear(model, raw, train, test, args), bilinear(model, aligned, train, test, args)
    res["timing_s"]["bilinear"] = round(time.time() - t, 2)
    corner_acc = g_raw.corner_values("test_acc")
    res.update(corner_test_acc=corner_acc.tolist(), corner_mean_acc=float(corner_acc.mean()),
               bilinear_mean_acc_raw=float(g_raw.test_acc.mean()), bilinear_mean_acc_aligned=float(g_al.test_acc.mean()),
               bilinear_min_acc_raw=float(g_raw.test_acc.min()), bilinear_min_acc_aligned=float(g_al.test_acc.min()),
               bilinear_mean_train_loss_raw=float(g_raw.train_loss.mean()),
               bilinear_mean_train_loss_aligned=float(g_al.train_loss.mean()),
               bilinear_grids={"raw": {"test_acc": _r(g_raw.test_acc), "train_loss": _r(g_raw.train_loss)},
                               "aligned": {"test_acc": _r(g_al.test_acc), "train_loss": _r(g_al.train_loss)}})
    log(f"{arch}: bilinear mean acc raw {g_raw.test_acc.mean():.4f} -> aligned {g_al.test_acc.mean():.4f} (min "
        f"{g_raw.test_acc.min():.4f} -> {g_al.test_acc.min():.4f}; corners {corner_acc.mean():.4f})")
    figures = [plot_bilinear(g_raw, g_al, os.path.join(args.out, f"{arch}_bilinear.png"),
                             f"{arch}: bilinear surface of 4 independent corners, raw vs aligned ({args.method})"),
               plot_lines(ev_raw, ev_al, os.path.join(args.out, f"{arch}_lines.png"),
                          f"{arch}: straight lines from corner 0, raw (dashed) vs aligned (solid)")]

    target = float(corner_acc.mean()) - 0.01
    res["bezier_surface_target"] = target
    if sum(args.epochs) > 0:
        curves = {}
        for which, corners in (("raw", raw), ("aligned", aligned)):
            t = time.time()
            surf = bezier_surface(*[_params(c) for c in corners], n=2, m=2)
            _, curve, reached = train_surface_tracked(
                model, surf, train, test, epochs=args.epochs, num_samples=args.num_samples, batch_size=args.batch_size,
                lr=args.lr, seed=args.seed, target=target, grid_steps=args.grid_steps,
                eval_batch_size=args.eval_batch_size, bn_batches=args.bn_batches, augment=args.augment,
                stop_at_target=not args.full_budget, progress=args.progress)
            curves[which] = curve
            res[f"bezier_surface_epochs_to_target_{which}"] = reached
            res[f"bezier_surface_best_mean_acc_{which}"] = max(c["mean_acc"] for c in curve)
            res[f"bezier_surface_epochs_to_gap_{which}"] = {
                str(gap): next((c["total_epochs"] for c in curve if c["mean_acc"] >= corner_acc.mean() - gap), None)
                for gap in GAPS}
            res[f"bezier_surface_curve_{which}"] = curve
            res["timing_s"][f"surface_{which}"] = round(time.time() - t, 2)
            log(f"{arch}: surface ({which}) epochs to target {target:.4f}: {reached} (best mean acc "
                f"{res[f'bezier_surface_best_mean_acc_{which}']:.4f}, {time.time() - t:.1f}s)")
        figures.append(plot_training(curves["raw"], curves["aligned"], target,
                                     os.path.join(args.out, f"{arch}_surface_training.png"),
                                     f"{arch}: 3x3 Bézier surface, phases {list(args.epochs)}, k={args.num_samples}"))
    else:
        res["bezier_surface_epochs_to_target_raw"] = res["bezier_surface_epochs_to_target_aligned"] = None
    res["figures"] = [os.path.basename(f) for f in figures]
    return res


def width_sweep(train, test, args, log) -> dict:
    out = {"arch": args.sweep_arch, "dataset": train.name, "widths": list(args.sweep), "corner_epochs": args.sweep_epochs,
           "linear_barrier_raw": [], "linear_barrier_aligned": [], "bilinear_mean_acc_raw": [],
           "bilinear_mean_acc_aligned": [], "bilinear_min_acc_raw": [], "bilinear_min_acc_aligned": [],
           "corner_mean_acc": [], "distance_raw": [], "distance_aligned": [], "num_params": [], "seconds": []}
    for w in args.sweep:
        t = time.time()
        if args.sweep_arch == "mlp":
            model = build_model("mlp", train.num_classes, widths=[w, w])
        else:
            model = build_model("simple_cnn", train.num_classes, multiplier=w)
        runs = train_corners(model, train, test, args, args.sweep_epochs)
        raw = [r.variables for r in runs]
        aligned, info = align_corners(model, raw, train, args)
        lr_, _ = line_barriers(model, raw, train, test, args)
        la_, _ = line_barriers(model, aligned, train, test, args)
        g_raw, g_al = bilinear(model, raw, train, test, args), bilinear(model, aligned, train, test, args)
        out["linear_barrier_raw"].append(lr_["barrier"])
        out["linear_barrier_aligned"].append(la_["barrier"])
        out["bilinear_mean_acc_raw"].append(float(g_raw.test_acc.mean()))
        out["bilinear_mean_acc_aligned"].append(float(g_al.test_acc.mean()))
        out["bilinear_min_acc_raw"].append(float(g_raw.test_acc.min()))
        out["bilinear_min_acc_aligned"].append(float(g_al.test_acc.min()))
        out["corner_mean_acc"].append(float(g_raw.corner_values("test_acc").mean()))
        out["distance_raw"].append(float(np.mean(info["distance_raw"])))
        out["distance_aligned"].append(float(np.mean(info["distance_aligned"])))
        out["num_params"].append(int(sum(np.size(a) for a in jax.tree_util.tree_leaves(raw[0]["params"]))))
        out["seconds"].append(round(time.time() - t, 2))
        log(f"sweep {args.sweep_arch} {w}: barrier {lr_['barrier']:.4f} -> {la_['barrier']:.4f}, bilinear mean acc "
            f"{g_raw.test_acc.mean():.4f} -> {g_al.test_acc.mean():.4f} (corners {out['corner_mean_acc'][-1]:.4f})")
    raw_b, al_b = np.asarray(out["linear_barrier_raw"]), np.asarray(out["linear_barrier_aligned"])
    out["barrier_reduction"] = _r(raw_b - al_b)
    out["barrier_ratio_aligned_over_raw"] = _r(al_b / np.maximum(raw_b, 1e-12))
    return out


def run(args) -> dict:
    """Run the experiment for parsed arguments (see :func:`build_parser`); returns the results dict."""
    args = _resolve(args)
    args.out = output_dir(args.out, setup(args))  # joins a multi-process job first; files from process 0 only
    t_start = time.time()
    log = lambda msg: print(f"[alignment {time.time() - t_start:7.1f}s] {msg}", flush=True)  # noqa: E731
    train = load_dataset(args.dataset, "train", data_dir=args.data_dir)
    test = load_dataset(args.dataset, "test", data_dir=args.data_dir)
    if args.limit_train:
        train = train.take(args.limit_train)
    if args.limit_test:
        test = test.take(args.limit_test)
    _CORNERS.clear()
    results: dict = {
        "dataset": train.name, "archs": args.arch_list, "headline_model": args.arch_list[0], "method": args.method,
        "backend": jax.default_backend(), "seeds": [args.seed + i for i in range(4)],
        "corner_epochs": args.corner_epochs, "phase_epochs": list(args.epochs), "num_samples": args.num_samples,
        "surface_lr": args.lr, "grid_steps": args.grid_steps, "line_points": args.line_points,
        "units": "accuracies are test-set fractions in [0, 1]; barriers are train cross-entropy "
                 "(loss_barrier on the straight line, mean of the pairs corner 0 - corner k); "
                 "epochs_to_target: total epochs of three-phase surface training until the mean test accuracy "
                 "over the grid reaches the corners' mean minus 0.01 (0: the untrained bilinear init already "
                 "does; null: not within the budget)",
        "per_model": {},
    }
    for arch in args.arch_list:
        results["per_model"][arch] = run_model(arch, train, test, args, log)
    head = results["per_model"][args.arch_list[0]]
    results.update({k: head[k] for k in CONTRACT})
    if args.sweep:
        results["width_sweep"] = width_sweep(train, test, args, log)
        plot_sweep(results["width_sweep"], os.path.join(args.out, "width_sweep.png"))
    results["wall_time_s"] = round(time.time() - t_start, 1)
    results["figures"] = sorted(f for f in os.listdir(args.out) if f.endswith(".png"))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    log(f"wrote {os.path.join(args.out, 'results.json')}")
    return results


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except DatasetNotFoundError as e:
        sys.exit(f"experiments.alignment: {e}")


if __name__ == "__main__":
    main()
