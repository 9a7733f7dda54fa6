"""Per-point cost of evaluating a 3x3-control Bezier surface with each evaluation strategy.

Prints one JSON line per (model, K): seconds per point for ``loop``, ``map`` (chunk 1 and 16) and ``vmap``
(chunk 16), the default's choice (``strategy="auto"``), the ratio default/best, and the achieved GFLOP/s of
the default against a dense float32 matmul measured in the same run (the machine's practical limit).

    python benchmarks/surface_sampling.py [--models mlp,simple_cnn] [--ks 1,16,121,441] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from mclandscape import bezier_surface, connector_points, evaluate
from mclandscape.engine.data import load_dataset
from mclandscape.engine.models import get_model

MODELS = {
    "mlp": dict(name="mlp", widths=(128, 128), num_classes=10),  # 64-128-128-10 on digits
    "simple_cnn": dict(name="simple_cnn", num_classes=10),
}
STRATEGIES = [("loop", None), ("map", 1), ("map", 16), ("vmap", 16)]


def grid(k: int) -> np.ndarray:
    if k == 1:
        return np.array([[0.5, 0.5]])
    s = int(round(np.sqrt(k)))
    if s * s != k:
        raise ValueError(f"K={k} is not a square grid")
    g = np.linspace(0, 1, s)
    return np.stack([a.ravel() for a in np.meshgrid(g, g, indexing="ij")], 1)


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def forward_flops(model, params, x) -> float:
    f = jax.jit(lambda p: model.apply({"params": p}, x))
    cost = f.lower(params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", float("nan")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,simple_cnn", help="comma-separated: " + ",".join(MODELS))
    ap.add_argument("--ks", default="1,16,121,441", help="numbers of (u, v) points (squares, or 1)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repetitions (best is kept)")
    ap.add_argument("--skip-loop-above", type=int, default=121, help="skip the Python loop for larger K")
    args = ap.parse_args()
    test = load_dataset("digits", "test")
    peak = matmul_gflops()
    for mname in args.models.split(","):
        cfg = dict(MODELS[mname])
        model = get_model(cfg.pop("name"), **cfg)
        x0 = jnp.asarray(test.x[:2])
        corners = [model.init(jax.random.key(i), x0)["params"] for i in range(4)]
        surf = bezier_surface(*corners, n=2, m=2)
        flops = forward_flops(model, corners[0], jnp.asarray(test.x))
        for k in (int(s) for s in args.ks.split(",")):
            pts = grid(k)
            per_point = {}
            for strategy, chunk in STRATEGIES + [("auto", None)]:
                if strategy == "loop" and k > args.skip_loop_above:
                    continue
                run = lambda s=strategy, c=chunk, mo=model, su=surf, p=pts: evaluate(
                    mo, connector_points(su, p), test, batch_size=360, strategy=s, chunk_size=c)
                if strategy == "loop":  # the one-at-a-time baseline: a Python loop of one-point calls
                    run = lambda mo=model, su=surf, p=pts: [evaluate(mo, connector_points(su, p[i:i + 1]), test,
                                                                     batch_size=360, strategy="map", chunk_size=1)
                                                            for i in range(len(p))][-1]
                res = run()  # compile
                best = min(_timed(run) for _ in range(args.repeats))
                label = strategy if chunk is None else f"{strategy}/{chunk}"
                if strategy == "auto":
                    label = f"auto->{res.strategy}/{res.chunk_size}"
                per_point[label] = best / k
            auto_key = next(key for key in per_point if key.startswith("auto"))
            explicit = {key: v for key, v in per_point.items() if not key.startswith("auto")}
            best_key = min(explicit, key=explicit.get)
            gflops = flops / per_point[auto_key] / 1e9
            print(json.dumps({
                "bench": "surface_sampling", "backend": jax.default_backend(), "model": mname, "K": k,
                "examples": int(test.x.shape[0]), "per_point_s": {key: round(v, 6) for key, v in per_point.items()},
                "default": auto_key.split("->")[1], "best": best_key,
                "ratio_default_over_best": round(per_point[auto_key] / explicit[best_key], 3),
                "forward_flops_per_point": flops, "default_gflops": round(gflops, 3),
                "matmul_gflops": round(peak, 1), "fraction_of_matmul": round(gflops / peak, 4),
            }), flush=True)


if __name__ == "__main__":
    main()
