"""Issue 9: where a ConvFC training step spends its time, layer by layer, XLA's CPU kernels against PyTorch's.

``benchmarks/convfc_curve.py`` measures whole curve-training steps; this one takes them apart. For each layer
of Garipov's ConvFC at batch 128 (conv 5×5 3→32 on 32×32, 32→64 on 15×15, 64→128 on 7×7; dense 1152→1000,
1000→1000) it times, in milliseconds (minimum of ``--repeats``):

- JAX: the forward pass, the input gradient and the kernel gradient (the first layer has no input gradient in
  training), each compiled with the engines' CPU options (``xla``: XLA's own convolutions, dots and reductions
  on YNNPACK) and with XLA's defaults (``ynn``: convolutions on YNNPACK too);
- PyTorch (if importable; not a dependency): the forward pass and forward + backward;

and prints one JSON line per layer with ``jax_fwd_bwd_ms`` (best options: forward + the gradients training
needs), ``torch_fwd_bwd_ms``, their ratio ``speedup_vs_torch`` and the achieved GFLOP/s of both forward
passes, then a ``total`` line. ``python benchmarks/conv_layers.py [--batch 128] [--repeats 7]``
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from timing import best_time

from mclandscape.engine import cpu

try:  # optional reference
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - depends on the environment
    torch = None

CONVS = {"conv1": (32, 3, 32, 5, 2), "conv2": (15, 32, 64, 5, 2), "conv3": (7, 64, 128, 5, 2)}
DENSE = {"fc1": (1152, 1000), "fc2": (1000, 1000)}


def timed_ms(fn, repeats: int, inner: int = 3) -> float:
    return round(best_time(fn, repeats, inner) * 1e3, 2)


def conv(x, w, pad):
    return jax.lax.conv_general_dilated(x, w, (1, 1), [(pad, pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def jax_times(f, x, w, g, opts, need_input_grad: bool, repeats: int) -> dict:
    """Forward, kernel-gradient and (optionally) input-gradient milliseconds of ``f(x, w)`` with cotangent
    ``g``, compiled with ``opts``."""
    jit = functools.partial(jax.jit, compiler_options=opts) if opts else jax.jit
    fwd = jit(f)

    def obj(x, w):
        return jnp.vdot(f(x, w), g)

    kgrad = jit(jax.grad(obj, argnums=1))
    row = {"fwd": timed_ms(lambda: fwd(x, w), repeats), "kernel_grad": timed_ms(lambda: kgrad(x, w), repeats)}
    if need_input_grad:
        igrad = jit(jax.grad(obj, argnums=0))
        row["input_grad"] = timed_ms(lambda: igrad(x, w), repeats)
    row["fwd_bwd"] = round(sum(row.values()), 2)
    return row


def torch_times(op, xt, wt, gt, need_input_grad: bool, repeats: int) -> tuple[float, float]:
    """PyTorch forward and forward + backward milliseconds of ``op(xt, wt)``."""
    wrt = [xt, wt] if need_input_grad else [wt]

    def fwd():
        with torch.no_grad():
            return op(xt, wt)

    def fwd_bwd():
        return torch.autograd.grad(op(xt, wt), wrt, gt)[0]

    return timed_ms(fwd, repeats), timed_ms(fwd_bwd, repeats)


def bench_layer(name: str, spec: tuple, args, options: dict, rng, base: dict) -> dict:
    """One layer's JSON record (see the module docstring)."""
    if spec[0] == "conv":
        _, h, ci, co, k, pad = spec
        x = jnp.asarray(rng.normal(size=(args.batch, h, h, ci)).astype(np.float32))
        w = jnp.asarray(rng.normal(size=(k, k, ci, co)).astype(np.float32) * 0.05)
        g = jnp.asarray(rng.normal(size=(args.batch, h, h, co)).astype(np.float32))
        f = functools.partial(conv, pad=pad)
        macs = args.batch * h * h * k * k * ci * co
    else:
        _, ci, co = spec
        x = jnp.asarray(rng.normal(size=(args.batch, ci)).astype(np.float32))
        w = jnp.asarray(rng.normal(size=(ci, co)).astype(np.float32) * 0.03)
        g = jnp.asarray(rng.normal(size=(args.batch, co)).astype(np.float32))
        f = jnp.matmul
        macs = args.batch * ci * co
    need_input_grad = name != "conv1"  # the network's input gets no gradient
    jax_ms = {label: jax_times(f, x, w, g, opts, need_input_grad, args.repeats) for label, opts in options.items()}
    best = min(jax_ms, key=lambda lab: jax_ms[lab]["fwd_bwd"])
    rec = {**base, "layer": name, "mac": macs, "jax_ms": jax_ms, "jax_best_options": best,
           "jax_fwd_bwd_ms": jax_ms[best]["fwd_bwd"],
           "jax_fwd_gflops": round(2 * macs / jax_ms[best]["fwd"] / 1e6, 1)}
    if torch is not None:
        if spec[0] == "conv":
            xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy(), requires_grad=need_input_grad)
            wt = torch.tensor(np.asarray(w).transpose(3, 2, 0, 1).copy(), requires_grad=True)
            gt = torch.tensor(np.asarray(g).transpose(0, 3, 1, 2).copy())
            op = functools.partial(F.conv2d, padding=spec[5])
        else:
            xt = torch.tensor(np.asarray(x), requires_grad=True)
            wt = torch.tensor(np.asarray(w).T.copy(), requires_grad=True)
            gt = torch.tensor(np.asarray(g))
            op = F.linear
        tf, tfb = torch_times(op, xt, wt, gt, need_input_grad, args.repeats)
        rec.update(torch_fwd_ms=tf, torch_fwd_bwd_ms=tfb, torch_fwd_gflops=round(2 * macs / tf / 1e6, 1),
                   speedup_vs_torch=round(tfb / jax_ms[best]["fwd_bwd"], 3))
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    options = {"xla": cpu.COMPILER_OPTIONS, "ynn": None}
    rng = np.random.default_rng(0)
    base = {"bench": "conv_layers", "backend": jax.default_backend(), "batch": args.batch,
            "torch": torch.__version__ if torch is not None else None,
            "torch_threads": torch.get_num_threads() if torch is not None else None}
    totals = {"jax": 0.0, "torch": 0.0}
    layers = {**{k: ("conv",) + v for k, v in CONVS.items()}, **{k: ("dense",) + v for k, v in DENSE.items()}}
    for name, spec in layers.items():
        rec = bench_layer(name, spec, args, options, rng, base)
        totals["jax"] += rec["jax_fwd_bwd_ms"]
        totals["torch"] += rec.get("torch_fwd_bwd_ms", 0.0)
        print(json.dumps(rec), flush=True)
    out = {**base, "layer": "total", "jax_fwd_bwd_ms": round(totals["jax"], 2)}
    if torch is not None:
        out.update(torch_fwd_bwd_ms=round(totals["torch"], 2),
                   speedup_vs_torch=round(totals["torch"] / totals["jax"], 3))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
