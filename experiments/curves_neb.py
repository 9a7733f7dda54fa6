"""Curves and nudged elastic bands between two independently trained models (Garipov et al., 2018; Draxler et al., 2018).

For every model two endpoints are trained from different seeds, then four paths between them are compared:

- ``line``: the straight segment ``(1 - t) w_1 + t w_2``;
- ``bezier``: a quadratic Bézier curve (``--bezier-degree``) trained on the expected loss over t ~ U(0, 1)
  (Garipov et al.: weight decay on w(t), SGD + momentum, their learning-rate schedule);
- ``polychain``: a polygonal chain with ``--num-bends`` bends, trained the same way;
- ``neb``: AutoNEB (Draxler et al. 2018): a band of 5 pivots relaxed under the NEB forces (the band is an
  objective of the stacked pivots trained by the engine's one step and loop, on shuffled mini-batches that
  continue across cycles, the network in train mode with dropout keys from ``--seed``), then cycles that
  insert pivots where the loss between neighbours rises most above the chord; the last cycle uses the
  climbing image.

Every path is evaluated on the same points as the references use (61 evenly spaced t for the line and the
curves; the band's pivots and 9 points between each pair for NEB) with BatchNorm statistics recomputed on the
training set at every point. ``results/curves_neb/results.json`` holds per model the barriers (train loss
minus the chord of the end losses), min/max/mean/integral of every series, path lengths, the AutoNEB cycle
log and timings; the top-level keys ``line_barrier``, ``bezier_barrier``, ``polychain_barrier``,
``neb_barrier``, ``endpoint_acc`` (mean test accuracy of the two endpoints), ``bezier_min_acc`` and
``neb_min_acc`` (minimum test accuracy along the path) repeat the figures of the first model of ``--models``.
``<model>_profiles.png`` draws the loss and error profiles of the four paths in one plot;
``muller_brown.png`` shows NEB / climbing-image NEB on the Müller-Brown potential (``--no-muller-brown`` skips).

Offline default (a few minutes on 2 CPU cores): sklearn digits (8×8), a 64-32-10 MLP and a small CNN
(``simple_cnn`` with channels 8-16-16, hidden 32), both pairs with a visible barrier on the straight line.
With ``--dataset cifar10`` (prepared TFDS files required; a missing dataset fails at once with the loader's
message) the models default to ``vgg16,preresnet20,resnet20`` with Garipov's settings (VGG16: endpoints 200
epochs lr 0.05 wd 5e-4, curves 600 epochs lr 0.015 wd 5e-4; ResNets: endpoints 150 epochs lr 0.1 wd 3e-4,
curves 200 epochs lr 0.03 wd 3e-4; augmentation; batch 128) and checkpoints under ``<out>/ckpt`` (resumed).

    python -m experiments.curves_neb
    python -m experiments.curves_neb --models cnn --curve-epochs 30 --neb-steps 300
    python -m experiments.curves_neb --dataset cifar10 --models vgg16 --endpoint-epochs 200
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.launch import add_distributed_args, output_dir, setup
from mclandscape.core import connectors as K
from mclandscape.core.objective import function_objective, make_objective
from mclandscape.core.tree import tree_distance
from mclandscape.engine.batches import batch_stream
from mclandscape.engine.data import load_dataset
from mclandscape.engine.evaluate import evaluate
from mclandscape.engine.many import train_many
from mclandscape.engine.models import get_model
from mclandscape.engine.points import connector_points
from mclandscape.engine.train import TrainConfig
from mclandscape.methods import autoneb as A
from mclandscape.methods import curves as C
from mclandscape.methods import neb as N
from mclandscape.methods.neb_forces import straight_band
from mclandscape.methods.potentials import MULLER_BROWN_SADDLES, muller_brown
from mclandscape.plots import plot_band_2d, plot_path_profiles, save

# Per dataset and model: architecture, endpoint training, curve training, NEB settings.
PRESETS: dict[str, dict[str, dict]] = {
    "digits": {
        "mlp": {"arch": "mlp", "kwargs": {"widths": [32]},
                "train": {"epochs": 40, "batch_size": 64, "lr": 0.05, "weight_decay": 0.0, "schedule": "cosine"},
                "curve": {"epochs": 20, "lr": 0.05, "weight_decay": 1e-4, "batch_size": 64},
                "neb": {"steps": 150, "lr": 0.05, "spring": 1.0, "cycles": 4, "batch_size": 64}},
        "cnn": {"arch": "simple_cnn", "kwargs": {"channels": [8, 16, 16], "hidden": 32, "dropout": 0.0},
                "train": {"epochs": 20, "batch_size": 64, "lr": 0.05, "weight_decay": 0.0, "schedule": "cosine"},
                "curve": {"epochs": 15, "lr": 0.05, "weight_decay": 1e-4, "batch_size": 64},
                "neb": {"steps": 100, "lr": 0.05, "spring": 1.0, "cycles": 4, "batch_size": 64}},
    },
    "cifar10": {
        "vgg16": {"arch": "vgg16", "kwargs": {},
                  "train": {"epochs": 200, "batch_size": 128, "lr": 0.05, "weight_decay": 5e-4,
                            "schedule": "cosine", "augment": True},
                  "curve": {"epochs": 600, "lr": 0.015, "weight_decay": 5e-4, "batch_size": 128},
                  "neb": {"steps": 1000, "lr": 0.01, "spring": 1.0, "cycles": 4, "batch_size": 128}},
        "preresnet20": {"arch": "preresnet20", "kwargs": {},
                        "train": {"epochs": 150, "batch_size": 128, "lr": 0.1, "weight_decay": 3e-4,
                                  "schedule": "cosine", "augment": True},
                        "curve": {"epochs": 200, "lr": 0.03, "weight_decay": 3e-4, "batch_size": 128},
                        "neb": {"steps": 1000, "lr": 0.01, "spring": 1.0, "cycles": 4, "batch_size": 128}},
        "resnet20": {"arch": "resnet20", "kwargs": {},
                     "train": {"epochs": 150, "batch_size": 128, "lr": 0.1, "weight_decay": 3e-4,
                               "schedule": "cosine", "augment": True},
                     "curve": {"epochs": 200, "lr": 0.03, "weight_decay": 3e-4, "batch_size": 128},
                     "neb": {"steps": 1000, "lr": 0.01, "spring": 1.0, "cycles": 4, "batch_size": 128}},
    },
}
DEFAULT_MODELS = {"digits": "mlp,cnn", "cifar10": "vgg16,preresnet20,resnet20"}

# Garipov et al.'s README, CIFAR-10 (min/max train loss, min/max test error % along the curve).
REFERENCE_CIFAR10 = {
    "VGG16 (endpoints)": {"train_loss": [0.24, 0.24], "test_err": [6.79, 6.94]},
    "VGG16 (Bezier)": {"train_loss": [0.14, 0.24], "test_err": [6.79, 7.75]},
    "VGG16 (Poly)": {"train_loss": [0.16, 0.27], "test_err": [6.79, 8.08]},
    "PreResNet164 (endpoints)": {"train_loss": [0.18, 0.18], "test_err": [4.75, 4.76]},
    "PreResNet164 (Bezier)": {"train_loss": [0.09, 0.18], "test_err": [4.45, 4.97]},
    "PreResNet164 (Poly)": {"train_loss": [0.11, 0.18], "test_err": [4.39, 5.13]},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.curves_neb", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/curves_neb", help="output folder (results.json + PNGs)")
    p.add_argument("--dataset", default="digits", choices=sorted(PRESETS), help="dataset (default digits)")
    p.add_argument("--data-dir", default=None, help="TFDS data directory for CIFAR-10")
    p.add_argument("--models", default=None,
                   help="comma-separated models (digits: mlp,cnn; cifar10: vgg16,preresnet20,resnet20)")
    p.add_argument("--seed", type=int, default=0, help="endpoints use seeds SEED and SEED+1")
    p.add_argument("--endpoint-epochs", type=int, default=None, help="override the endpoint training epochs")
    p.add_argument("--curve-epochs", type=int, default=None, help="override the curve training epochs")
    p.add_argument("--curve-lr", type=float, default=None, help="override the curve learning rate")
    p.add_argument("--weight-decay", type=float, default=None, help="override the curve weight decay (on w(t))")
    p.add_argument("--bezier-degree", type=int, default=2, help="degree of the Bézier curve (default 2)")
    p.add_argument("--num-bends", type=int, default=1, help="bends of the polygonal chain (default 1)")
    p.add_argument("--num-samples", type=int, default=1, help="t values per batch in curve training (Garipov: 1)")
    p.add_argument("--num-points", type=int, default=61, help="evaluation points along the line/curves (61)")
    p.add_argument("--neb-steps", type=int, default=None, help="override the NEB steps per AutoNEB cycle")
    p.add_argument("--neb-cycles", type=int, default=None, help="override the number of AutoNEB cycles")
    p.add_argument("--neb-lr", type=float, default=None, help="override the NEB learning rate (SGD momentum 0.9)")
    p.add_argument("--spring", type=float, default=None, help="override the NEB spring constant k")
    p.add_argument("--initial-pivots", type=int, default=3, help="pivots inserted evenly in the first cycle (3)")
    p.add_argument("--insert-count", type=int, default=2, help="pivots inserted per later cycle (2)")
    p.add_argument("--sub-pivots", type=int, default=9, help="dense points between pivots (Draxler: 9)")
    p.add_argument("--no-climbing", action="store_true", help="no climbing image in the last AutoNEB cycle")
    p.add_argument("--train-eval-size", type=int, default=0,
                   help="evaluate train loss on the first N training examples only (0: all)")
    p.add_argument("--ckpt", default=None, help="checkpoint folder (default: <out>/ckpt for CIFAR, none for digits)")
    p.add_argument("--no-muller-brown", action="store_true", help="skip the Müller-Brown NEB demonstration")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    add_distributed_args(p)
    return p.parse_args(argv)


def _model_settings(args, name: str) -> dict:
    presets = PRESETS[args.dataset]
    if name not in presets:
        raise ValueError(f"unknown model {name!r} for {args.dataset}; choose from {sorted(presets)}")
    s = json.loads(json.dumps(presets[name]))
    if args.endpoint_epochs is not None:
        s["train"]["epochs"] = args.endpoint_epochs
    if args.curve_epochs is not None:
        s["curve"]["epochs"] = args.curve_epochs
    if args.curve_lr is not None:
        s["curve"]["lr"] = args.curve_lr
    if args.weight_decay is not None:
        s["curve"]["weight_decay"] = args.weight_decay
    for key, arg in (("steps", args.neb_steps), ("cycles", args.neb_cycles), ("lr", args.neb_lr),
                     ("spring", args.spring)):
        if arg is not None:
            s["neb"][key] = arg
    return s


def _path_record(ev: C.PathEvaluation) -> dict:
    d = ev.to_dict()
    d["barrier"] = ev.barrier("train_loss")
    d["min_acc"] = float(np.min(ev.test_acc))
    return d


def _run_model(args, name: str, train, test, out: Path, ckpt: Path | None) -> dict:
    s = _model_settings(args, name)
    num_classes = train.num_classes
    model = get_model(s["arch"], num_classes=num_classes, **s["kwargs"])
    rec: dict = {"model": model.spec, "settings": s}
    train_eval = train.take(args.train_eval_size) if args.train_eval_size else train
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    cfg = TrainConfig(optimizer="sgd", momentum=0.9, **s["train"])
    runs = train_many(model, train, test, cfg, seeds=(args.seed, args.seed + 1), progress=args.progress,
                      checkpoint_dir=None if ckpt is None else ckpt / f"{name}_endpoints")
    timings["endpoints"] = time.perf_counter() - t0
    p0, p1 = runs[0].variables["params"], runs[1].variables["params"]
    rec["endpoint_history"] = [r.history[-1] for r in runs]
    rec["distance"] = float(tree_distance(p0, p1))
    ev_kw = dict(num_points=args.num_points, bn_data=train if model.has_batch_stats else None)

    paths: dict[str, C.PathEvaluation] = {}
    t0 = time.perf_counter()
    paths["line"] = C.evaluate_curve(model, C.line_connector(p0, p1), train_eval, test, **ev_kw)
    timings["line_eval"] = time.perf_counter() - t0

    cs = s["curve"]
    for kind, make in (("bezier", lambda: K.bezier_curve(p0, p1, args.bezier_degree)),
                       ("polychain", lambda: K.polychain(p0, p1, args.num_bends))):
        t0 = time.perf_counter()
        ccfg = C.CurveConfig(epochs=cs["epochs"], batch_size=cs["batch_size"], lr=cs["lr"],
                             weight_decay=cs["weight_decay"], num_samples=args.num_samples,
                             augment=bool(s["train"].get("augment", False)))
        res = C.train_curve(model, make(), train, ccfg, seed=args.seed, progress=args.progress,
                            checkpoint_dir=None if ckpt is None else ckpt / f"{name}_{kind}")
        timings[f"{kind}_train"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        paths[kind] = C.evaluate_curve(model, res.connector, train_eval, test, **ev_kw)
        timings[f"{kind}_eval"] = time.perf_counter() - t0
        rec[f"{kind}_history"] = res.history

    ns = s["neb"]
    t0 = time.perf_counter()
    base = N.NEBConfig(steps=ns["steps"], spring_constant=ns["spring"], learning_rate=ns["lr"], momentum=0.9,
                       tol=1e-3, check_every=25)
    cycles = [base] * max(ns["cycles"] - 1, 0)
    cycles.append(N.NEBConfig(**{**base.__dict__, "climbing": not args.no_climbing}))
    def profile(band, ts):  # the dense train losses that place new pivots, BatchNorm recalibrated per point
        return evaluate(model, connector_points(band, ts), train_eval, bn_data=ev_kw["bn_data"]).loss

    band = A.auto_neb(make_objective(model, train=True), p0, p1, cycles=cycles,
                      data=batch_stream(train, ns["batch_size"], seed=args.seed), profile_fn=profile,
                      initial_insert=args.initial_pivots, insert_count=args.insert_count,
                      sub_pivots=args.sub_pivots, seed=args.seed, progress=args.progress)
    timings["neb_train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    paths["neb"] = A.evaluate_band(model, band, train_eval, test, sub_pivots=args.sub_pivots,
                                   bn_data=ev_kw["bn_data"])
    timings["neb_eval"] = time.perf_counter() - t0
    rec["neb_cycles"] = band.cycles
    rec["neb_spacing"] = band.spacing.tolist()

    for key, ev in paths.items():
        rec[key] = _path_record(ev)
        rec[f"{key}_barrier"] = rec[key]["barrier"]
        rec[f"{key}_min_acc"] = rec[key]["min_acc"]
        rec[f"{key}_length"] = ev.length
    accs = [float(paths["line"].test_acc[0]), float(paths["line"].test_acc[-1])]
    rec["endpoint_accs"] = accs
    rec["endpoint_acc"] = float(np.mean(accs))
    rec["timings_s"] = timings
    png = save(plot_path_profiles(paths, title=f"loss and error along four paths between two independently trained "
                                               f"{name} models ({args.dataset})"), out / f"{name}_profiles.png")
    rec["figure"] = Path(png).name
    return rec


def _muller_brown_demo(out: Path) -> dict:
    """NEB and climbing-image NEB on the Müller-Brown potential (known minima and saddle)."""
    mb = muller_brown  # f(p, batch=None) on points [..., 2]
    objective = function_objective(mb)
    g = jax.jit(jax.grad(mb))
    ends = []
    for p in ([-0.558, 1.442], [0.623, 0.028]):
        p = jnp.asarray(p)
        for _ in range(300):
            p = p - 2e-4 * g(p)
        ends.append(p)
    saddle = np.array(MULLER_BROWN_SADDLES["AC"].point)
    t0 = time.perf_counter()
    plain = N.neb(objective, *ends, num_pivots=15,
                  config=N.NEBConfig(steps=3000, spring_constant=200.0, learning_rate=1e-4, tol=1e-2))
    ci = N.neb(objective, *ends, num_pivots=15,
               config=N.NEBConfig(steps=4000, spring_constant=200.0, learning_rate=2e-4, tol=1e-2, climbing=True,
                                  climb_after=300))
    wall = time.perf_counter() - t0
    i = int(np.argmax(ci.losses))
    straight = np.asarray(straight_band(*ends, 15))
    png = save(plot_band_2d(lambda xy: mb(xy), {"straight line": straight, "NEB": np.asarray(plain.pivots),
                                                "CI-NEB": np.asarray(ci.pivots)},
                            vmax=50.0, markers={"saddle": saddle},
                            title="NEB and climbing-image NEB bands on the Müller-Brown potential"),
               out / "muller_brown.png")
    return {"saddle": saddle.tolist(), "saddle_energy": float(mb(jnp.asarray(saddle))),
            "ci_highest_pivot": np.asarray(ci.pivots)[i].tolist(), "ci_highest_energy": float(ci.losses[i]),
            "ci_saddle_distance": float(np.linalg.norm(np.asarray(ci.pivots)[i] - saddle)),
            "plain_max_pivot_energy": float(np.max(plain.losses)), "straight_max_energy": float(mb(straight).max()),
            "plain_steps": plain.steps, "ci_steps": ci.steps, "converged": [plain.converged, ci.converged],
            "wall_s": wall, "figure": Path(png).name}


def run(args: argparse.Namespace) -> dict:
    """Run the experiment; returns the results dict (also written to ``<out>/results.json``)."""
    out = Path(output_dir(args.out, setup(args)))  # joins a multi-process job first; files from process 0 only
    models = [m.strip() for m in (args.models or DEFAULT_MODELS[args.dataset]).split(",") if m.strip()]
    if not models:
        raise ValueError("no models given")
    for m in models:
        _model_settings(args, m)  # validate names before any training
    train = load_dataset(args.dataset, "train", data_dir=args.data_dir)
    test = load_dataset(args.dataset, "test", data_dir=args.data_dir)
    ckpt = Path(args.ckpt) if args.ckpt else (out / "ckpt" if args.dataset != "digits" else None)
    t_start = time.perf_counter()
    results: dict = {"dataset": args.dataset, "models": {}, "primary": models[0],
                     "barrier_definition": "max over the evaluated t of train loss minus the linear interpolation "
                                           "of the end losses", "backend": jax.default_backend()}
    for m in models:
        results["models"][m] = _run_model(args, m, train, test, out, ckpt)
    prim = results["models"][models[0]]
    for key in ("line_barrier", "bezier_barrier", "polychain_barrier", "neb_barrier", "endpoint_acc",
                "line_min_acc", "bezier_min_acc", "polychain_min_acc", "neb_min_acc"):
        results[key] = prim[key]
    if args.dataset == "cifar10":
        results["reference_garipov_cifar10"] = REFERENCE_CIFAR10
    if not args.no_muller_brown:
        results["muller_brown"] = _muller_brown_demo(out)
    results["wall_s"] = time.perf_counter() - t_start
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1)
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    res = run(args)
    print(f"results in {args.out}/results.json ({res['wall_s']:.0f} s)")
    for name, r in res["models"].items():
        print(f"{name}: endpoint acc {r['endpoint_acc']:.4f} | barrier line {r['line_barrier']:.4f} "
              f"bezier {r['bezier_barrier']:.4f} polychain {r['polychain_barrier']:.4f} neb {r['neb_barrier']:.4f} "
              f"| min acc bezier {r['bezier_min_acc']:.4f} neb {r['neb_min_acc']:.4f} line {r['line_min_acc']:.4f}")


if __name__ == "__main__":
    main()
