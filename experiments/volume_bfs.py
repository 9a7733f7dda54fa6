"""Volumetric exploration of low-loss regions: H_c(s) curves and their log-linear fits.

Reproduces §5.1-5.5 of N. Schager, "Volumetric investigation into neural network loss landscapes"
(Bachelor's thesis, Universität Kassel, 2025) with :mod:`mclandscape.methods.volume`; every voxel's loss is
computed by the one evaluator (:func:`mclandscape.engine.points.map_points`).

Settings (``--settings``, comma-separated; all by default):

- ``synthetic`` (§5.1, Figure 5.1): small non-linear networks with d = 2, 3, ... parameters (a chain
  ``x -> tanh(w_1 x) -> ... -> w_d ·`` = ``get_model("mlp", widths=[1]*(d-1), num_classes=1,
  activation="tanh", use_bias=False)``) trained (``train_many``, full-batch Adam, MSE) on
  ``load_dataset("synthetic", task="regression", dim=1)``; the BFS runs in their full parameter space.
- ``iris2d`` / ``iris3d`` (§5.2, Figures 5.2-5.3): a 4-8-3 ReLU MLP on Iris (cross-entropy; the thesis's
  "single output neuron" cannot carry a 3-class cross-entropy, so the output layer has 3 units), minima from
  different seeds, a 2-D flat through 3 minima and a 3-D flat through 4 minima (QR basis).
- ``minima`` (§5.3, Figure 5.4): the same 2-D flat anchored at each of its three minima.
- ``basis`` (§5.4, Figure 5.5): raw vs QR basis at the same anchor, with the angle between the raw basis
  vectors (§6.3). The thesis does not say how it scaled the raw basis, so two raw runs are made: with the QR
  steps unchanged (``basis_raw``: a lattice step moves s·|b_i|, far longer than s, so H is much lower) and
  with steps ``s / mean|b_i|`` (``basis_raw_rescaled``: steps of the same mean length as the QR run, so only
  the skew differs). ``volume`` = H·cell volume puts all three on the same scale.
- ``distance`` (§5.5, Figure 5.6): large thresholds and a coarse step from several minima (2-D flats
  anchored at each minimum, spanned with the next two), log H averaged over the minima.

Every threshold continues from the previous one's future queue. ``results/volume_bfs/results.json`` holds,
per setting, the H_c(s) table, the per-step and pooled fits log H = log A + B·c (A, B, R; §6.1), voxel
counts (visited, evaluations), truncation flags (the step limit was hit; counts are partial) and wall times.

    python -m experiments.volume_bfs                       # offline default, a few minutes on 2 cores
    python -m experiments.volume_bfs --settings iris3d --steps-3d 0.5,0.25,0.1 --limit 2000000
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
from mclandscape.core.losses import accuracy, get_loss
from mclandscape.core.objective import make_objective
from mclandscape.engine.data import load_dataset
from mclandscape.engine.many import train_many
from mclandscape.engine.models import get_model
from mclandscape.engine.train import TrainConfig
from mclandscape.methods import flats as VF
from mclandscape.methods import traversal as VT
from mclandscape.methods import volume as V
from mclandscape.plots import plot_h_mean, plot_h_panels, save

ALL_SETTINGS = ("synthetic", "iris2d", "iris3d", "minima", "basis", "distance")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.volume_bfs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/volume_bfs", help="output folder (results.json + PNGs)")
    p.add_argument("--settings", default=",".join(ALL_SETTINGS),
                   help=f"comma-separated subset of {','.join(ALL_SETTINGS)}")
    p.add_argument("--seed", type=int, default=0, help="base seed (training inits, data, traversal RNG)")
    p.add_argument("--num-minima", type=int, default=5, help="Iris minima trained from different seeds (>= 4)")
    p.add_argument("--train-steps", type=int, default=2000, help="full-batch Adam epochs (= steps) per network")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate")
    p.add_argument("--multipliers", default="1.5,2,3,5,8",
                   help="threshold multipliers n (c = n·eps), strictly increasing, >= 1")
    p.add_argument("--synthetic-dims", default="2,3,4", help="parameter counts d of the synthetic networks")
    p.add_argument("--synthetic-steps", default="0.1,0.05", help="step widths s for the synthetic nets")
    p.add_argument("--synthetic-multipliers", default="1.1,1.2,1.35,1.5,1.75,2",
                   help="threshold multipliers of the synthetic setting")
    p.add_argument("--synthetic-limit", type=int, default=100_000, help="step limit of the synthetic setting")
    p.add_argument("--synthetic-noise", type=float, default=0.1, help="label noise of the synthetic regression")
    p.add_argument("--synthetic-hidden", type=int, default=2,
                   help="hidden units of the synthetic data's random teacher (load_dataset('synthetic'))")
    p.add_argument("--steps-2d", default="0.5,0.25,0.1,0.05", help="step widths s on the Iris 2-D flat")
    p.add_argument("--steps-3d", default="0.5,0.25", help="step widths s on the Iris 3-D flat")
    p.add_argument("--minima-step", type=float, default=0.25, help="step width of the starting-minima setting")
    p.add_argument("--distance-steps", default="1.0", help="coarse step widths of the distance setting")
    p.add_argument("--distance-multipliers", default="2,5,10,20,40,80,160,320", help="large threshold multipliers")
    p.add_argument("--limit", type=int, default=150_000, help="Algorithm 3 step limit per threshold")
    p.add_argument("--distance-limit", type=int, default=40_000, help="step limit of the distance setting")
    p.add_argument("--dropout", type=float, default=0.0, help="Algorithm 3 dropout (skip probability)")
    p.add_argument("--sampling-switch-iter", type=int, default=None,
                   help="iteration after which voxels are dequeued at random and dropout applies")
    p.add_argument("--batch-size", type=int, default=1024, help="frontier voxels expanded per wave")
    p.add_argument("--max-batch", type=int, default=4096, help="voxels per evaluation call")
    add_distributed_args(p)
    args = p.parse_args(argv)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = sorted(set(args.settings) - set(ALL_SETTINGS))
    if bad:
        p.error(f"unknown settings {bad}; choose from {list(ALL_SETTINGS)}")
    if args.num_minima < 4 and any(s in args.settings for s in ("iris3d", "distance")):
        p.error("--num-minima must be >= 4 for the 3-D flat and the distance setting")
    return args


def train_minima(model, data, test, loss_name: str, seeds, *, steps: int, lr: float):
    """Minima from different seeds: ``train_many`` with full-batch Adam for ``steps`` epochs (the datasets are
    tiny). Returns the parameter pytrees and their full-batch training losses."""
    cfg = TrainConfig(epochs=steps, batch_size=len(data), optimizer="adam", lr=lr, schedule="constant",
                      loss=loss_name)
    runs = train_many(model, data, test, cfg, seeds=[int(s) for s in seeds], progress=False)
    per_example = get_loss(loss_name)
    x, y = jnp.asarray(data.x), jnp.asarray(data.y)
    params = [r.variables["params"] for r in runs]
    final = [float(jnp.mean(per_example(model.apply({"params": p}, x), y))) for p in params]
    return params, np.asarray(final)


class Runner:
    def __init__(self, args):
        self.args = args
        self.out = Path(output_dir(args.out, setup(args)))  # joins a multi-process job; files from process 0 only
        self.results: dict = {"config": {k: v for k, v in vars(args).items()}, "settings": {}, "figures": []}
        self.mult = _floats(args.multipliers)
        self._iris = None

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    def sweep(self, name, flat, loss, steps, mult, *, limit=None, key=0):
        """H_c(s) of ``loss = (objective, full batch)`` on ``flat``."""
        t = time.perf_counter()
        config = VT.TraversalConfig(limit=limit or self.args.limit, dropout=self.args.dropout,
                                    sampling_switch_iter=self.args.sampling_switch_iter,
                                    batch_size=self.args.batch_size)
        sw = V.h_sweep(flat, loss[0], steps, mult, batch=loss[1], config=config,
                       max_batch=self.args.max_batch, key=self.args.seed * 1000 + key,
                       progress=lambda m: self.log(f"  [{name}] {m}"))
        d = sw.to_dict()
        d["wall_time_total"] = time.perf_counter() - t
        self.results["settings"][name] = d
        fit = d["fit_pooled"]
        self.log(f"{name}: H[:, -1]={sw.H[:, -1].tolist()} pooled fit={fit} truncated={int(sw.truncated.sum())} "
                 f"({d['wall_time_total']:.1f}s)")
        return sw

    def figure(self, fig_path: str):
        self.results["figures"].append(fig_path)

    # -- Iris minima ---------------------------------------------------------------------------------------
    def iris(self):
        if self._iris is None:
            a = self.args
            train = load_dataset("iris", "train")
            test = load_dataset("iris", "test")
            model = get_model("mlp", widths=[8], num_classes=3)
            t = time.perf_counter()
            seeds = [a.seed * 100 + i for i in range(a.num_minima)]
            params, losses = train_minima(model, train, test, "cross_entropy", seeds, steps=a.train_steps,
                                          lr=a.lr)
            xt, yt = jnp.asarray(test.x), jnp.asarray(test.y)
            accs = [float(accuracy(model.apply({"params": p}, xt), yt)) for p in params]
            self.results["iris_minima"] = {"seeds": seeds, "train_loss": losses.tolist(), "test_acc": accs,
                                           "train_time": time.perf_counter() - t}
            self.log(f"iris minima: train loss {np.round(losses, 4).tolist()} test acc {np.round(accs, 3).tolist()}")
            loss = (make_objective(model, train=False), (train.x, train.y))
            self._iris = (model, train, params, loss)
        return self._iris

    # -- settings ------------------------------------------------------------------------------------------
    def synthetic(self):
        a = self.args
        sweeps = {}
        info = {}
        for d in _ints(a.synthetic_dims):
            if d < 2:
                raise ValueError(f"synthetic networks need d >= 2 parameters, got {d}")
            data = load_dataset("synthetic", "train", seed=a.seed, task="regression", dim=1, n_train=64,
                                n_test=0, noise=a.synthetic_noise, hidden=a.synthetic_hidden)
            model = get_model("mlp", widths=[1] * (d - 1), num_classes=1, activation="tanh", use_bias=False)
            (params,), (eps,) = train_minima(model, data, None, "mse", [a.seed], steps=a.train_steps, lr=a.lr)
            flat = VF.full_space_flat(params)
            if flat.ambient_dim != d:
                raise RuntimeError(f"synthetic network has {flat.ambient_dim} parameters, expected {d}")
            loss = (make_objective(model, "mse", train=False), (data.x, data.y))
            info[f"d{d}"] = {"train_loss": float(eps), "theta_star": np.asarray(flat.anchor).tolist()}
            sweeps[f"d = {d}"] = self.sweep(f"synthetic_d{d}", flat, loss, _floats(a.synthetic_steps),
                                            _floats(a.synthetic_multipliers), limit=a.synthetic_limit, key=d)
        self.results["synthetic_minima"] = info
        path = self.out / "fig5_1_synthetic.png"
        save(plot_h_panels(sweeps, title="accepted voxels H_c(s), synthetic networks, full parameter space"), path)
        self.figure(path.name)

    def iris_flat(self, dim: int):
        a = self.args
        model, train, params, loss = self.iris()
        flat = VF.flat_from_minima(params[:dim + 1], anchor=0, basis="qr")
        steps = _floats(a.steps_2d if dim == 2 else a.steps_3d)
        sw = self.sweep(f"iris_{dim}d_qr", flat, loss, steps, self.mult, key=10 + dim)
        path = self.out / f"fig5_{dim}_iris_{dim}d.png"
        save(plot_h_panels({f"Iris 4-8-3, {dim}-D flat (QR)": sw},
                           title=f"accepted voxels H_c(s) on a {dim}-D flat through {dim + 1} Iris minima"), path)
        self.figure(path.name)

    def minima(self):
        a = self.args
        model, train, params, loss = self.iris()
        sweeps = {}
        for anchor in range(3):
            flat = VF.flat_from_minima(params[:3], anchor=anchor, basis="qr")
            sweeps[f"anchor = minimum {anchor}"] = self.sweep(f"minima_anchor{anchor}", flat, loss,
                                                              [a.minima_step], self.mult, key=20 + anchor)
        path = self.out / "fig5_4_minima.png"
        save(plot_h_panels(sweeps, title="accepted voxels H_c(s) from different starting minima, same 2-D flat"),
             path)
        self.figure(path.name)

    def basis(self):
        a = self.args
        model, train, params, loss = self.iris()
        steps = _floats(a.steps_2d)
        raw = VF.flat_from_minima(params[:3], anchor=0, basis="raw")
        qr = VF.flat_from_minima(params[:3], anchor=0, basis="qr")
        scale = float(np.mean(raw.raw_norms))
        sw_lit = self.sweep("basis_raw", raw, loss, steps, self.mult, key=30)
        sw_raw = self.sweep("basis_raw_rescaled", raw, loss, [s / scale for s in steps], self.mult, key=31)
        sw_qr = self.sweep("basis_qr", qr, loss, steps, self.mult, key=32)
        angle = float(raw.raw_angles_deg[0, 1])
        self.results["settings"]["basis_raw_rescaled"]["raw_step_scale"] = scale
        self.results["basis_angle_deg"] = angle
        self.results["basis_volume_ratio_raw_rescaled_over_qr"] = (sw_raw.volume() / sw_qr.volume()).tolist()
        self.log(f"angle between the raw basis vectors: {angle:.2f} deg (the thesis, §6.3, reports 53.78); "
                 f"mean |b_i| = {scale:.3g}")
        path = self.out / "fig5_5_basis.png"
        save(plot_h_panels({f"raw basis, same s (angle {angle:.1f}°)": sw_lit,
                            f"raw basis, steps s/{scale:.3g}": sw_raw,
                            "orthogonal (QR) basis": sw_qr},
                           title="accepted voxels H_c(s): non-orthogonal vs orthogonal basis of one 2-D flat"), path)
        self.figure(path.name)

    def distance(self):
        a = self.args
        model, train, params, loss = self.iris()
        k = len(params)
        sweeps = []
        for anchor in range(k):
            members = [params[anchor], params[(anchor + 1) % k], params[(anchor + 2) % k]]
            flat = VF.flat_from_minima(members, anchor=0, basis="qr")
            sweeps.append(self.sweep(f"distance_anchor{anchor}", flat, loss, _floats(a.distance_steps),
                                     _floats(a.distance_multipliers), limit=a.distance_limit, key=40 + anchor))
        summary = V.mean_log_h(sweeps)
        fits = []
        for i in range(len(summary["steps"])):
            c = np.asarray(summary["mean_c"])
            fit = V.fit_log_linear(c, np.exp(np.asarray(summary["mean_log_H"][i])))
            fits.append(fit.to_dict())
        summary["fit_of_mean_per_step"] = fits
        self.results["settings"]["distance_mean"] = summary
        path = self.out / "fig5_6_distance.png"
        save(plot_h_mean(summary, title=f"log H_c(s) averaged over {k} starting minima, large c, coarse s "
                                        "(x: truncated)"), path)
        self.figure(path.name)

    def run(self):
        t = time.perf_counter()
        for name in self.args.settings:
            self.log(f"== {name}")
            if name in ("iris2d", "iris3d"):
                self.iris_flat(2 if name == "iris2d" else 3)
            else:
                getattr(self, name)()
        self.results["wall_time_total"] = time.perf_counter() - t
        self.results["devices"] = [str(d) for d in jax.devices()]
        path = self.out / "results.json"
        path.write_text(json.dumps(self.results, indent=1))
        self.log(f"wrote {path} ({self.results['wall_time_total']:.1f}s)")
        return self.results


def main(argv=None):
    return Runner(parse_args(argv)).run()


if __name__ == "__main__":
    main()
