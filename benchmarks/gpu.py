"""The GPU figures in one command: ``python benchmarks/gpu.py`` (or ``make gpu-bench``), one JSON line per case.

Synthetic CIFAR-shaped data (32×32×3, 10 classes, fixed seed; no dataset download), every case on the default
JAX device, in this order:

- ``convfc_curve_eval``: seconds per point of Garipov et al.'s ConvFC on a quadratic Bézier curve, K = 21
  points over ``n`` images, against the same network in PyTorch (weights combined per point, as in Garipov's
  code) on the same device when PyTorch is importable (``torch: "unavailable"`` otherwise), with the largest
  logit difference of the two at t = 0.3 (the same function is compared);
- ``convfc_curve_train_step``: one curve-training step (one t per batch, SGD with momentum, weight decay on
  the sampled point) against one PyTorch step;
- ``vgg16_surface_grid``: the 11×11 grid of a 3×3-control-point Bézier surface of VGG16 (seconds per grid and
  per point);
- ``scaling_train_step``: ``benchmarks/scaling.py``'s surface-training step on 1, 2, 4, ... of the available
  devices (seconds, ratio to one device, largest difference from the one-device update);
- ``bf16_vs_f32``: the ConvFC curve evaluated with ``compute_dtype="bfloat16"`` against float32 (seconds per
  point, largest loss and accuracy differences).

Every line carries the backend, the device kind, the device count, PyTorch's version and device. Timings are
the minimum over ``--repeats``. On a GPU the whole run takes a few minutes (the budget is 8). On CPU (or with
``--small``) it runs the same cases smaller: a few points and images, and a small CNN in place of VGG16 (the
line says which model ran); ``tests/test_benchmarks_gpu.py`` runs it that way.

    python benchmarks/gpu.py [--small] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # timing, convfc_curve, scaling

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from convfc_curve import make_torch_step, torch, torch_eval, torch_forward, torch_layers  # noqa: E402
from scaling import surface_train_step  # noqa: E402
from timing import best_time  # noqa: E402

import mclandscape as mcl  # noqa: E402
from mclandscape.core.bernstein import bernstein  # noqa: E402
from mclandscape.engine.connector_train import ConnectorObjective, uniform_sampler  # noqa: E402
from mclandscape.engine.step import make_step

# (full, small) sizes
SIZES = {
    "points": (21, 3),  # curve points K
    "n": (5000, 16),  # evaluation images
    "batch": (500, 16),  # evaluation batch
    "train_batch": (128, 8),
    "train_steps": (20, 1),  # steps per timed repetition
    "grid": (11, 2),  # surface grid steps per axis
    "surface_n": (1000, 16),
    "scaling_k": (8, 2),  # points per surface-training step
}
SMALL_CNN = {"channels": [8, 16, 16], "hidden": 32, "dropout": 0.0}  # the small mode's stand-in for VGG16


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-shaped images (NHWC float32) and integer labels in [0, 10)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, size=n).astype(np.int32)


def inits(model, count: int, seed: int, x) -> list:
    """``count`` parameter sets of ``model`` drawn with NumPy: He-normal kernels (fan-in), biases N(0, 0.01²).

    The shapes come from ``jax.eval_shape`` (nothing compiled); a Flax ``init``, eager or jitted, compiles its
    random initialisers, which on CPU takes longer than the small mode's measurements."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.asarray(x[:2])))["params"]
    rng = np.random.default_rng(seed)

    def draw(s):
        scale = np.sqrt(2.0 / np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.01
        return jnp.asarray((scale * rng.standard_normal(s.shape)).astype(s.dtype))

    return [jax.tree_util.tree_map(draw, shapes) for _ in range(count)]


def torch_device() -> str | None:
    """PyTorch's device matching JAX's backend (``None`` without PyTorch)."""
    if torch is None:
        return None
    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def _to(layers, device):
    return [(kind, None if w is None else w.to(device), None if b is None else b.to(device)) for kind, w, b in layers]


def curve_cases(base: dict, size: dict, repeats: int) -> None:
    """ConvFC curve evaluation and training step, JAX against PyTorch, then bf16 against f32."""
    x, y = synthetic(size["n"])
    model = mcl.get_model("convfc")
    ctrl = inits(model, 3, 0, x)
    curve = mcl.bezier_curve(ctrl[0], ctrl[2], 2, bends=[ctrl[1]])
    ts = np.linspace(0, 1, size["points"])
    evaluate = lambda **kw: mcl.evaluate(model, mcl.connector_points(curve, ts), (x, y), batch_size=size["batch"], **kw)
    f32 = evaluate()
    jax_s = best_time(lambda: evaluate().loss, repeats)
    rec = {**base, "case": "convfc_curve_eval", "points": len(ts), "n": size["n"], "batch": size["batch"],
           "per_point_s": jax_s / len(ts), "mean_loss": float(np.mean(f32.loss))}
    dev = torch_device()
    if dev is not None:
        layers = [_to(torch_layers("convfc", p), dev) for p in ctrl]
        xt = torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dev)
        xts = list(torch.split(xt, size["batch"]))
        coefs = np.asarray(bernstein(jnp.asarray(ts, jnp.float32), 2))
        with torch.no_grad():
            lt = torch_forward("convfc", layers, np.asarray(bernstein(np.float32(0.3), 2)), xt[:8])[0].cpu().numpy()
        lj = np.asarray(model.apply({"params": curve.point(0.3)}, jnp.asarray(x[:8])))
        torch_s = best_time(lambda: [torch_eval("convfc", layers, c, xts) for c in coefs], repeats)
        rec.update(torch_per_point_s=torch_s / len(ts), speedup_vs_torch=torch_s / jax_s,
                   torch_max_logit_diff=float(np.max(np.abs(lt - lj))))
    print(json.dumps(rec), flush=True)

    # one curve-training step, one t per batch on both sides
    b = size["train_batch"]
    xb, yb = jnp.asarray(x[:b]), jnp.asarray(y[:b])
    wd = 5e-4
    obj = ConnectorObjective(point=mcl.make_objective(model, "cross_entropy", train=True),
                             template=curve.replace(control=None), sampler=uniform_sampler(1),
                             mask=jnp.asarray(curve.trainable), num_samples=1, point_l2=wd,
                             strategy="unroll" if jax.default_backend() == "cpu" else "vmap")
    step = make_step(obj, optax.sgd(0.01, momentum=0.9),
                     trainable=jax.tree_util.tree_map(lambda _: jnp.asarray(curve.trainable), curve.control))
    state = [step.init(curve.control), 0, None]  # optimizer state, steps taken, last loss

    def jax_steps():
        for _ in range(size["train_steps"]):
            state[0], m = step(state[0], (xb, yb), jax.random.key(state[1]))
            state[1], state[2] = state[1] + 1, m["loss"]
        return state[2]

    jax_step = best_time(jax_steps, repeats) / size["train_steps"]
    rec = {**base, "case": "convfc_curve_train_step", "batch": b, "t_samples": 1, "step_s": jax_step,
           "steps_taken": state[1], "last_loss": float(state[2])}
    if dev is not None:
        tstep = make_torch_step("convfc", [_to(torch_layers("convfc", p), dev) for p in ctrl], curve.fixed,
                                xt[:b], torch.tensor(y[:b].astype(np.int64)).to(dev), wd)
        torch_step = best_time(lambda: [tstep() for _ in range(size["train_steps"])], repeats) / size["train_steps"]
        rec.update(torch_step_s=torch_step, speedup_vs_torch=torch_step / jax_step)
    print(json.dumps(rec), flush=True)

    b16 = evaluate(compute_dtype="bfloat16")
    bf16_s = best_time(lambda: evaluate(compute_dtype="bfloat16").loss, repeats)
    print(json.dumps({**base, "case": "bf16_vs_f32", "points": len(ts), "n": size["n"],
                      "f32_per_point_s": jax_s / len(ts), "bf16_per_point_s": bf16_s / len(ts),
                      "speedup_bf16": jax_s / bf16_s,
                      "max_abs_loss_diff": float(np.max(np.abs(f32.loss - b16.loss))),
                      "max_rel_loss_diff": float(np.max(np.abs(f32.loss - b16.loss) / np.abs(f32.loss))),
                      "max_abs_acc_diff": float(np.max(np.abs(f32.accuracy - b16.accuracy)))}), flush=True)


def surface_case(base: dict, size: dict, small: bool, repeats: int) -> None:
    """The 3×3-control Bézier surface of VGG16 (small: a small CNN) on the grid."""
    x, y = synthetic(size["surface_n"], seed=1)
    name, kwargs = ("simple_cnn", SMALL_CNN) if small else ("vgg16", {})
    model = mcl.get_model(name, **kwargs)
    corners = inits(model, 4, 10, x)
    surface = mcl.bezier_surface(*corners, n=2, m=2)
    uv = mcl.uv_grid(size["grid"])
    last = []
    points = mcl.connector_points(surface, uv)
    grid = lambda: last.append(mcl.evaluate(model, points, (x, y), batch_size=size["batch"]).loss)
    seconds = best_time(grid, max(1, repeats - 1))
    print(json.dumps({**base, "case": "vgg16_surface_grid", "model": name, "grid": size["grid"],
                      "points": len(uv), "control_points": surface.num_control, "n": size["surface_n"],
                      "seconds": seconds, "per_point_s": seconds / len(uv),
                      "mean_loss": float(np.mean(last[-1]))}), flush=True)


def scaling_case(base: dict, size: dict, small: bool, repeats: int) -> None:
    """``benchmarks/scaling.py``'s surface-training step on 1, 2, 4, ... of this process's devices."""
    x, y = synthetic(size["train_batch"], seed=2)
    model = mcl.get_model("simple_cnn", **(SMALL_CNN if small else {}))
    corners = inits(model, 4, 20, x)
    surface = mcl.bezier_surface(*corners, n=2, m=2)
    batch = (jnp.asarray(x), jnp.asarray(y))
    counts = [2 ** i for i in range(len(jax.devices()).bit_length())]
    one = None
    for n in counts:
        r = surface_train_step(model, surface, batch, size["scaling_k"], n, repeats)
        one = one or r
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(r["control"], one["control"], strict=True))
        print(json.dumps({**base, "case": "scaling_train_step", "model": "simple_cnn", "k": size["scaling_k"],
                          "batch": size["train_batch"], "used_devices": n, "mesh": r["mesh"],
                          "seconds_per_step": r["seconds_per_step"], "points_per_s": r["points_per_s"],
                          "ratio_to_one_device": one["seconds_per_step"] / r["seconds_per_step"],
                          "max_abs_diff_vs_one_device": diff}), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="small sizes (the default on CPU)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions; the minimum is kept")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    small = args.small or jax.default_backend() == "cpu"
    size = {k: v[1 if small else 0] for k, v in SIZES.items()}
    base = {"bench": "gpu", "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "devices": len(jax.devices()), "small": small,
            "torch": torch.__version__ if torch is not None else "unavailable", "torch_device": torch_device()}
    if torch is not None and torch_device() == "cuda":  # TF32 settings decide PyTorch's f32 speed on a GPU
        base.update(torch_tf32_conv=bool(torch.backends.cudnn.allow_tf32),
                    torch_tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32))
    curve_cases(base, size, args.repeats)
    surface_case(base, size, small, args.repeats)
    scaling_case(base, size, small, args.repeats)


if __name__ == "__main__":
    main()
