"""Issue 9: curve/surface evaluation and curve training of Garipov's ConvFC (or VGG16) against PyTorch.

Builds the network exactly as Garipov et al.'s ``ConvFC`` (conv 5×5 3→32, 32→64, 64→128, each ReLU + 3/2
max-pool; dense 1152→1000→1000→10; 2 422 634 parameters; 26.17 M MAC per 32×32×3 image) or their CIFAR
``VGG16`` (``--arch vgg16``), synthetic CIFAR-shaped data with a fixed seed, and prints one JSON line per case:

- ``curve_eval``: seconds per point of a quadratic Bézier curve over ``--n`` images (batch ``--batch``) for
  each evaluation path (label ``first layer/strategy+chunk``: ``factor`` computes the first convolution once
  per control point, :mod:`mclandscape.engine.cpu`), the library's default (``stem="auto"``,
  ``strategy="auto"``), its GFLOP/s, and, if PyTorch is importable, the same per-point time of a plain
  PyTorch forward (weights combined, then the network, as Garipov's code does) and the speed ratio
  (goal: >= 1.2 on CPU);
- ``surface_eval`` (ConvFC only): the same for the 11×11 grid of a 3×3-control-point Bézier surface;
- ``train_step``: one curve-training step of the engine (``make_step`` over a ``ConnectorObjective``; batch
  ``--batch``, k sampled t per batch, SGD with momentum, Garipov's weight decay on the sampled point) for
  each way of evaluating the k points and the default, and per (t-sample × example), against one PyTorch
  step with one t (goal: ratio >= 1);
- ``bf16_eval``: loss/accuracy difference of ``compute_dtype="bfloat16"`` evaluation (and its CPU time,
  for information: the bf16 goal is about GPUs);
- ``xla_cpu_paths``: how many library fusions XLA's CPU backend forms (``__ynn_fusion``: YNNPACK, XLA's
  successor of its XNNPACK path; ``__xnn_fusion``; ``__onednn_fusion``) and how many convolutions it runs
  itself (Eigen), in the compiled forward pass with XLA's default options and with the engine's
  (:data:`mclandscape.engine.cpu.COMPILER_OPTIONS`), and in the engine's training gradient.

PyTorch is optional (never a dependency of mclandscape). Each timing is the minimum over ``--repeats``; the
1-minute load average is printed next to each line (other processes on the machine slow both sides,
PyTorch's OpenMP threads usually more).

    python benchmarks/convfc_curve.py [--arch convfc|vgg16] [--points 21] [--n 1000] [--batch 128]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--threads" in sys.argv and sys.argv[sys.argv.index("--threads") + 1] == "1":
    # One thread on both sides (set before JAX starts): compares kernels, and is less sensitive than two
    # threads to other processes on a 2-core machine. Only this benchmark process is affected.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from timing import best_time

from mclandscape import bezier_curve, bezier_surface, connector_points, evaluate
from mclandscape.core.bernstein import bernstein
from mclandscape.core.objective import make_objective
from mclandscape.engine import cpu
from mclandscape.engine.connector_train import ConnectorObjective, uniform_sampler
from mclandscape.engine.models import get_model
from mclandscape.engine.step import make_step

try:  # optional reference
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - depends on the environment
    torch = None

EVAL_PATHS = {  # label -> evaluate keywords
    "off/map1": dict(stem="off", strategy="map", chunk_size=1),
    "off/map16": dict(stem="off", strategy="map", chunk_size=16),
    "off/loop": dict(stem="off", strategy="map", chunk_size=1),  # one call per point (see eval_case)
    "factor/map1": dict(stem="factor", strategy="map", chunk_size=1),
}
TRAIN_PATHS = ("unroll", "map", "vmap")  # how the k sampled points of a training step are evaluated


def load() -> float:
    return float(open("/proc/loadavg").read().split()[0]) if os.path.exists("/proc/loadavg") else float("nan")


def interleaved_min(fns: dict, repeats: int) -> dict:
    """Minimum time of each function, the functions taking turns in every repetition (so that a burst of
    load from other processes hits all of them alike)."""
    for fn in fns.values():
        fn()  # compile / warm up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def forward_macs(model, params, x1) -> int:
    """Multiply-accumulates of one forward pass, counted from the convolutions and dots of its jaxpr."""
    jaxpr = jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x))(params, x1)
    total = 0

    def subjaxprs(value):
        if hasattr(value, "eqns"):
            yield value
        elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
            yield value.jaxpr
        elif isinstance(value, tuple | list):
            for v in value:
                yield from subjaxprs(v)

    def walk(jp):
        nonlocal total
        for eqn in jp.eqns:
            if eqn.primitive.name == "cond":  # platform-dependent branches: count one of them
                walk(next(subjaxprs(eqn.params["branches"][0])))
                continue
            for v in eqn.params.values():
                for sub in subjaxprs(v):
                    walk(sub)
            if eqn.primitive.name == "conv_general_dilated":
                out = eqn.outvars[0].aval.shape
                k = eqn.invars[1].aval.shape  # HWIO
                total += int(np.prod(out)) * int(np.prod(k[:-1]))
            elif eqn.primitive.name == "dot_general":
                (lc, _), _ = eqn.params["dimension_numbers"]
                a = eqn.invars[0].aval.shape
                total += int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([a[i] for i in lc]))

    walk(jaxpr.jaxpr)
    return total


# ---- PyTorch reference (Garipov et al.'s curve networks: weights combined per forward) ----------------------

def torch_layers(arch: str, params) -> list:
    """The control point's layers as PyTorch tensors, in forward order: (kind, weight, bias)."""
    out = []
    if arch == "convfc":
        for name in ("stem", "conv1", "conv2"):
            k = np.asarray(params[name]["kernel"])  # HWIO
            out.append(("conv5", k.transpose(3, 2, 0, 1), np.asarray(params[name]["bias"])))
        k0 = np.asarray(params["fc0"]["kernel"])  # rows in (h, w, c) order; torch flattens (c, h, w)
        k0 = k0.reshape(3, 3, 128, -1).transpose(2, 0, 1, 3).reshape(1152, -1)
        out.append(("fc", k0.T, np.asarray(params["fc0"]["bias"])))
        for name in ("fc1", "head"):
            out.append(("fc", np.asarray(params[name]["kernel"]).T, np.asarray(params[name]["bias"])))
    else:
        from mclandscape.engine.models.vgg import VGG16_CFG

        i = 0
        for v in VGG16_CFG:
            if v == "M":
                out.append(("pool2", None, None))
                continue
            name = "stem" if i == 0 else f"conv{i}"
            out.append(("conv3", np.asarray(params[name]["kernel"]).transpose(3, 2, 0, 1),
                        np.asarray(params[name]["bias"])))
            i += 1
        for name in ("fc0", "fc1", "head"):
            out.append(("fc", np.asarray(params[name]["kernel"]).T, np.asarray(params[name]["bias"])))
    return [(kind, None if w is None else torch.tensor(np.ascontiguousarray(w)),
             None if b is None else torch.tensor(np.ascontiguousarray(b))) for kind, w, b in out]


def torch_forward(arch: str, layers_k: list, coefs, x, train: bool = False):
    """Garipov-style curve forward: every layer's weights are ``sum_k c_k W_k`` (recomputed per call)."""
    h = x
    n_fc = 0
    weights = []
    for j, (kind, w0, _) in enumerate(layers_k[0]):
        if w0 is None:
            h = F.max_pool2d(h, 2, 2)
            continue
        w = sum(float(c) * lk[j][1] for c, lk in zip(coefs, layers_k, strict=True))
        b = sum(float(c) * lk[j][2] for c, lk in zip(coefs, layers_k, strict=True))
        weights += [w, b]
        if kind == "conv5":
            h = F.max_pool2d(F.relu(F.conv2d(h, w, b, padding=2)), 3, 2)
        elif kind == "conv3":
            h = F.relu(F.conv2d(h, w, b, padding=1))
        else:
            if h.dim() > 2:
                h = h.flatten(1)
            last = j == len(layers_k[0]) - 1
            if arch == "vgg16" and not last:
                h = F.dropout(h, 0.5, training=train)
            h = F.linear(h, w, b)
            if not last:
                h = F.relu(h)
            n_fc += 1
    return h, weights


def torch_eval(arch, layers_k, coefs, xs) -> float:
    with torch.no_grad():
        tot = 0.0
        for xb in xs:
            tot += float(torch_forward(arch, layers_k, coefs, xb)[0].sum())
    return tot


def make_torch_step(arch, layers_k, fixed, x, y, wd):
    trainable = [lk for lk, f in zip(layers_k, fixed, strict=True) if not f]
    params = [t for lk in trainable for (_, w, b) in lk if w is not None for t in (w, b)]
    for t in params:
        t.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    n = len(layers_k) - 1

    def step():
        t = rng.uniform()
        coefs = np.asarray(bernstein(np.float32(t), n))
        out, weights = torch_forward(arch, layers_k, coefs, x, train=True)
        loss = F.cross_entropy(out, y) + 0.5 * wd * sum((w * w).sum() for w in weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


# ---- XLA CPU library paths ---------------------------------------------------------------------------------

def xla_paths(compiled_text: str) -> dict:
    lines = compiled_text.splitlines()
    plain = sum(1 for ln in lines if " convolution(" in ln and "ROOT" not in ln)
    return {"ynn_fusions": compiled_text.count('"__ynn_fusion"'),
            "xnn_fusions": compiled_text.count('"__xnn_fusion"'),
            "onednn_fusions": compiled_text.count('"__onednn_fusion"'),
            "xla_own_convolutions": plain}


# ---- cases ---------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="convfc", choices=["convfc", "vgg16"])
    ap.add_argument("--points", type=int, default=None, help="curve points (default 21 convfc, 5 vgg16)")
    ap.add_argument("--n", type=int, default=None, help="evaluation images (default 1000 convfc, 500 vgg16)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions; the minimum is kept")
    ap.add_argument("--eval-paths", default=None,
                    help="comma-separated labels from " + ",".join(EVAL_PATHS) + " (auto is always run)")
    ap.add_argument("--surface-steps", type=int, default=None, help="surface grid steps per axis (0: skip)")
    ap.add_argument("--surface-paths", default="off/map1,factor/map1")
    ap.add_argument("--train-samples", default="1,4", help="k values (t samples per batch)")
    ap.add_argument("--train-paths", default="unroll", help="comma-separated from " + ",".join(TRAIN_PATHS))
    ap.add_argument("--train-steps", type=int, default=3, help="steps per timed repetition")
    ap.add_argument("--torch-points", type=int, default=3, help="points timed in PyTorch (per-point cost)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="1: one thread for XLA and PyTorch (kernel comparison); default: both libraries' own")
    ap.add_argument("--skip", default="", help="comma-separated cases to skip: curve,surface,train,bf16,xla")
    args = ap.parse_args()
    vgg = args.arch == "vgg16"
    n_points = args.points or (5 if vgg else 21)
    n_img = args.n or (500 if vgg else 1000)
    surface_steps = (0 if vgg else 11) if args.surface_steps is None else args.surface_steps
    eval_paths = (args.eval_paths.split(",") if args.eval_paths else
                  (["off/map1", "factor/map1"] if vgg else ["off/map1", "off/map16", "off/loop", "factor/map1"]))
    skip = set(filter(None, args.skip.split(",")))
    use_torch = torch is not None and not args.no_torch
    if use_torch and args.threads:
        torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n_img, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, size=n_img).astype(np.int32)
    model = get_model(args.arch) if not vgg else get_model("vgg16")
    ctrl = [model.init(jax.random.key(i), jnp.asarray(x[:2]))["params"] for i in range(3)]
    curve = bezier_curve(ctrl[0], ctrl[2], 2, bends=[ctrl[1]])
    macs = forward_macs(model, ctrl[0], jnp.asarray(x[:1]))
    n_params = sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(ctrl[0]))
    base = {"bench": "convfc_curve", "arch": args.arch, "backend": jax.default_backend(),
            "devices": len(jax.devices()), "params": n_params, "mac_per_image": macs,
            "torch": (torch.__version__ if use_torch else None),
            "torch_threads": (torch.get_num_threads() if use_torch else None),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
    gflop_point = 2 * macs * n_img / 1e9
    ts = np.linspace(0, 1, n_points)

    if use_torch:
        torch.manual_seed(0)
        layers_k = [torch_layers(args.arch, p) for p in ctrl]
        xt = torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        xts = list(torch.split(xt, args.batch))
        # The reference computes the same function: compare logits at t = 0.3.
        c03 = np.asarray(bernstein(np.float32(0.3), 2))
        with torch.no_grad():
            lt = torch_forward(args.arch, layers_k, c03, xt[:8])[0].numpy()
        lj = np.asarray(model.apply({"params": curve.point(0.3)}, jnp.asarray(x[:8])))
        base["torch_max_logit_diff"] = float(np.max(np.abs(lt - lj)))

    def eval_case(case, connector, pts, labels, torch_ctrl, torch_coefs, repeats):
        fns = {}
        for label in labels + ["auto"]:
            kw = EVAL_PATHS.get(label, {})
            fn = lambda kw=kw: evaluate(model, connector_points(connector, pts), (x, y), batch_size=args.batch, **kw)
            if label.endswith("/loop"):  # the one-at-a-time baseline: a Python loop of one-point calls
                fn = lambda kw=kw: [evaluate(model, connector_points(connector, pts[i:i + 1]), (x, y),
                                             batch_size=args.batch, **kw) for i in range(len(pts))][-1]
            res = fn()
            if label == "auto":
                label = f"auto->{res.stem}/{res.strategy}{res.chunk_size}"
            fns[label] = fn
        if use_torch:
            for i, c in enumerate(torch_coefs):
                fns[f"torch{i}"] = lambda c=c: torch_eval(args.arch, torch_ctrl, c, xts)
        load0 = load()
        best = interleaved_min(fns, repeats)
        per_point = {k: v / len(pts) for k, v in best.items() if not k.startswith("torch")}
        auto_key = next(k for k in per_point if k.startswith("auto"))
        rec = {**base, "case": case, "points": len(pts), "control_points": connector.num_control, "n": n_img,
               "batch": args.batch, "per_point_s": {k: round(v, 4) for k, v in per_point.items()},
               "default": auto_key[len("auto->"):], "default_per_point_s": round(per_point[auto_key], 4),
               "default_gflops": round(gflop_point / per_point[auto_key], 1),
               "best": min(per_point, key=per_point.get), "load_1min": [load0, load()]}
        if use_torch:
            tp = min(v for k, v in best.items() if k.startswith("torch"))
            rec.update(torch_per_point_s=round(tp, 4), torch_gflops=round(gflop_point / tp, 1),
                       speedup_vs_torch=round(tp / per_point[auto_key], 3), goal=1.2,
                       goal_met=bool(tp / per_point[auto_key] >= 1.2))
        print(json.dumps(rec), flush=True)

    # ---- curve evaluation ----
    if "curve" not in skip:
        cs = np.asarray(bernstein(jnp.asarray(np.linspace(0.1, 0.9, args.torch_points), jnp.float32), 2))
        eval_case("curve_eval", curve, ts, eval_paths, layers_k if use_torch else None, cs, args.repeats)

    # ---- surface evaluation ----
    if surface_steps and "surface" not in skip:
        corners = [model.init(jax.random.key(10 + i), jnp.asarray(x[:2]))["params"] for i in range(4)]
        surf = bezier_surface(*corners, n=2, m=2)
        g = np.linspace(0, 1, surface_steps)
        uv = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
        sl = cs = None
        if use_torch:
            sl = [torch_layers(args.arch, jax.tree_util.tree_map(lambda c, k=k: c[k], surf.control))
                  for k in range(9)]
            cs = np.asarray(surf.coefficients(jnp.asarray([[0.3, 0.6], [0.5, 0.5], [0.8, 0.2]][:args.torch_points],
                                                          jnp.float32)))
        eval_case("surface_eval", surf, uv, [p for p in args.surface_paths.split(",") if p], sl, cs,
                  max(1, args.repeats - 1))

    # ---- training step ----
    if "train" not in skip:
        xb, yb = jnp.asarray(x[: args.batch]), jnp.asarray(y[: args.batch])
        opt = optax.sgd(0.01, momentum=0.9)
        wd = 5e-4
        tstep = None
        if use_torch:
            tstep = make_torch_step(args.arch, [torch_layers(args.arch, p) for p in ctrl], curve.fixed,
                                    xt[: args.batch], torch.tensor(y[: args.batch].astype(np.int64)), wd)
        point = make_objective(model, "cross_entropy", train=True)
        default = "unroll" if jax.default_backend() == "cpu" else "vmap"
        for k in (int(v) for v in args.train_samples.split(",")):
            fns = {}
            for label in [p for p in args.train_paths.split(",") if p] + ["auto"]:
                strategy = default if label == "auto" else label
                obj = ConnectorObjective(point=point, template=curve.replace(control=None),
                                         sampler=uniform_sampler(1), mask=jnp.asarray(curve.trainable),
                                         num_samples=k, point_l2=wd, strategy=strategy)
                step = make_step(obj, opt, trainable=jax.tree_util.tree_map(lambda _: jnp.asarray(curve.trainable),
                                                                             curve.control))
                state = [step.init(curve.control), 0]

                def run(step=step, state=state):
                    for _ in range(args.train_steps):
                        st, m = step(state[0], (xb, yb), jax.random.key(state[1]))
                        state[0], state[1] = st, state[1] + 1
                    jax.block_until_ready(m["loss"])

                fns[label if label != "auto" else f"auto->{strategy}"] = run
            if tstep is not None:
                fns["torch"] = lambda: [tstep() for _ in range(args.train_steps)]
            load0 = load()
            best = {kk: v / args.train_steps for kk, v in interleaved_min(fns, args.repeats).items()}
            per_step = {kk: v for kk, v in best.items() if kk != "torch"}
            auto_key = next(kk for kk in per_step if kk.startswith("auto"))
            per_ex = {kk: v / (k * args.batch) for kk, v in per_step.items()}
            rec = {**base, "case": "train_step", "t_samples": k, "batch": args.batch,
                   "per_step_s": {kk: round(v, 4) for kk, v in per_step.items()},
                   "per_sample_example_us": {kk: round(v * 1e6, 2) for kk, v in per_ex.items()},
                   "default": auto_key[len("auto->"):], "load_1min": [load0, load()]}
            if tstep is not None:
                tpe = best["torch"] / args.batch
                rec.update(torch_step_s=round(best["torch"], 4), torch_per_sample_example_us=round(tpe * 1e6, 2),
                           speedup_vs_torch=round(tpe / per_ex[auto_key], 3), goal=1.0,
                           goal_met=bool(tpe / per_ex[auto_key] >= 1.0))
            print(json.dumps(rec), flush=True)

    # ---- bf16 accuracy (and CPU time, for information) ----
    if "bf16" not in skip:
        ts5 = np.linspace(0, 1, 5)
        f32 = evaluate(model, connector_points(curve, ts5), (x, y), batch_size=args.batch)
        b16 = evaluate(model, connector_points(curve, ts5), (x, y), batch_size=args.batch, compute_dtype="bfloat16")
        t32 = best_time(lambda: evaluate(model, connector_points(curve, ts5), (x, y), batch_size=args.batch), 1) / 5
        t16 = best_time(lambda: evaluate(model, connector_points(curve, ts5), (x, y), batch_size=args.batch,
                                                compute_dtype="bfloat16"), 1) / 5
        print(json.dumps({**base, "case": "bf16_eval", "points": 5, "n": n_img,
                          "max_abs_loss_diff": float(np.max(np.abs(f32.loss - b16.loss))),
                          "max_rel_loss_diff": float(np.max(np.abs(f32.loss - b16.loss) / np.abs(f32.loss))),
                          "max_abs_acc_diff": float(np.max(np.abs(f32.accuracy - b16.accuracy))),
                          "f32_per_point_s": round(t32, 4), "bf16_per_point_s": round(t16, 4),
                          "note": "bf16 speed is a GPU goal; CPU time shown for information",
                          "load_1min": load()}), flush=True)

    # ---- which XLA CPU library paths are taken ----
    if "xla" not in skip:
        xb, yb = jnp.asarray(x[: args.batch]), jnp.asarray(y[: args.batch])
        opts = cpu.COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
        fwd_ynn = jax.jit(lambda p, v: model.apply({"params": p}, v)).lower(ctrl[0], xb).compile().as_text()
        fwd = jax.jit(lambda p, v: model.apply({"params": p}, v), compiler_options=opts).lower(
            ctrl[0], xb).compile().as_text() if opts else fwd_ynn
        obj = ConnectorObjective(point=make_objective(model, "cross_entropy", train=True),
                                 template=curve.replace(control=None), sampler=uniform_sampler(1),
                                 mask=jnp.asarray(curve.trainable), num_samples=1,
                                 strategy="unroll" if jax.default_backend() == "cpu" else "vmap")
        grad_txt = jax.jit(jax.grad(lambda c: obj(c, (xb, yb), jax.random.key(0))[0]),
                           **({"compiler_options": opts} if opts else {})).lower(curve.control).compile().as_text()
        print(json.dumps({**base, "case": "xla_cpu_paths",
                          "engine_compiler_options": opts, "forward_xla_defaults": xla_paths(fwd_ynn),
                          "forward": xla_paths(fwd), "train_grad_default": xla_paths(grad_txt)}), flush=True)


if __name__ == "__main__":
    main()
