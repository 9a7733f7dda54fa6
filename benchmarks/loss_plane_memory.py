"""Issue 13: the peak memory of a Li et al. (2018) loss plane does not grow with the grid.

:func:`mclandscape.methods.directions.loss_plane` evaluates the grid ``θ + α d1 + β d2`` through the one
evaluator (:func:`mclandscape.engine.points.plane_points`: rows ``[1, α, β]`` over the stack ``[θ, d1, d2]``),
forming each point's parameters inside the mapped computation. The previous implementation built every
point's parameters up front (``grid_params``: a stacked tree of P copies), so a 51×51 plane of VGG16
(15.2 M parameters, 61 MB in float32) would have held 2,601 copies (~158 GB).

Measured on the 2-core CPU (load average 4-9 from other processes), ``--images 2``, VGG16: peak RSS 1,336 /
1,326 / 1,272 MiB for 5×5 / 21×21 / 51×51 (the plane itself: 428 / 463 / 419 MiB; the three stacked trees
are 175 MiB), 0.11 s per point at the margin; the old stacked grid peaked at 2,716 MiB already for 5×5 and
would need 25,647 MiB (21×21) and 151,263 MiB (51×51) for its copies alone.

For each grid size this script starts a fresh Python process (so ``ru_maxrss``, the peak resident set size,
belongs to that grid alone), builds Garipov et al.'s CIFAR VGG16 (``--arch vgg16``, no BatchNorm, so no
statistics to recompute; ``--arch vgg16_bn`` recomputes them per point from ``--bn-images`` training images),
two filter-normalised random directions and ``--images`` synthetic CIFAR-shaped evaluation images, and
evaluates the plane ``--repeat`` times (the first call compiles). It prints one JSON line per grid (sizes
in MiB, ``*_mb``):

- ``peak_rss_mb``: peak RSS of the process; ``setup_rss_mb``: RSS before the plane (model, directions, data,
  runtime); ``plane_rss_mb`` = their difference, what the plane itself added at its peak;
- ``stack_mb``: the three trees the evaluator holds; ``legacy_stack_mb``: the P copies the old stacked grid
  would have held;
- ``seconds_first`` (the first call, with compilation), ``seconds_per_point`` (of the last call; with
  ``--repeat 1`` the first, compilation included), the strategy and chunk the evaluator chose and the
  1-minute load average;

and a last ``summary`` line: the spread of the peaks over the grids and the marginal seconds per point between
the smallest and the largest grid (compilation cancels out).

``--legacy-grids`` also runs the old path (all points stacked, then ``evaluate`` of ``stacked_points``) for grids
small enough to fit in memory, for comparison.

    python benchmarks/loss_plane_memory.py [--arch vgg16] [--grids 5 21 51] [--images 2] [--legacy-grids 5 11]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    """Current resident set size (Linux ``/proc/self/statm``), MB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux


def child(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mclandscape.core.tree import tree_combine, tree_size
    from mclandscape.engine import mapping
    from mclandscape.engine.evaluate import evaluate
    from mclandscape.engine.models import get_model
    from mclandscape.engine.points import plane_points, stacked_points
    from mclandscape.methods.directions import loss_plane, random_directions

    model = get_model(args.arch, num_classes=10)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.images, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, args.images).astype(np.int32)
    params = model.init(jax.random.key(0), jnp.asarray(x[:1]))["params"]
    d1, d2 = random_directions(jax.random.key(1), params, 2)
    n_params = tree_size(params)
    param_mb = n_params * 4 / 2**20
    g = np.linspace(-1.0, 1.0, args.grid)
    kw = {"batch_size": args.images}
    if model.has_batch_stats:
        kw.update(bn_data=rng.standard_normal((args.bn_images, 32, 32, 3)).astype(np.float32),
                  bn_batch_size=args.bn_images)
    jax.block_until_ready((params, d1, d2))
    setup = _rss_mb()

    if args.legacy:  # the old path: every point's parameters stacked up front, then evaluated
        def plane():
            pts = plane_points(params, d1, d2, g, g)
            stacked = tree_combine(pts.rows, pts.stack)  # [P, ...] leaves: P parameter copies
            return evaluate(model, stacked_points(stacked), (x, y), **kw).loss
    else:
        def plane():
            return loss_plane(model, params, d1, d2, g, g, (x, y), **kw).loss

    t0 = time.perf_counter()
    first = np.asarray(plane())
    t1 = time.perf_counter()
    last, t_last = first, t1 - t0
    for _ in range(args.repeat - 1):
        t = time.perf_counter()
        last = np.asarray(plane())
        t_last = time.perf_counter() - t
    assert np.all(np.isfinite(first)) and np.allclose(first, last)
    p = args.grid ** 2
    strategy, chunk = mapping.resolve("auto", p, param_bytes=int(param_mb * 2**20), has_conv=True)  # what evaluate chose
    return {"case": "loss_plane_legacy" if args.legacy else "loss_plane", "arch": args.arch,
            "params": n_params, "grid": f"{args.grid}x{args.grid}", "points": p, "images": args.images,
            "peak_rss_mb": round(_peak_mb(), 1), "setup_rss_mb": round(setup, 1),
            "plane_rss_mb": round(_peak_mb() - setup, 1), "stack_mb": round(3 * param_mb, 1),
            "legacy_stack_mb": round(p * param_mb, 1), "seconds_first": round(t1 - t0, 2),
            "seconds_per_point": round(t_last / p, 5), "strategy": strategy, "chunk": chunk,
            "load1": round(os.getloadavg()[0], 2), "backend": jax.default_backend()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vgg16", help="vgg16 (no BatchNorm) or vgg16_bn (statistics recomputed)")
    p.add_argument("--grids", type=int, nargs="*", default=[5, 21, 51], help="grid steps per axis")
    p.add_argument("--legacy-grids", type=int, nargs="*", default=[5],
                   help="grids also run the old way (all points stacked; P x 61 MB for VGG16)")
    p.add_argument("--images", type=int, default=2, help="evaluation images (one batch)")
    p.add_argument("--bn-images", type=int, default=8, help="vgg16_bn: training images for the statistics")
    p.add_argument("--repeat", type=int, default=1, help="evaluations per grid (the last is timed)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--legacy", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--grid", type=int, default=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return
    runs = [(g, False) for g in args.grids] + [(g, True) for g in args.legacy_grids]
    done: list[dict] = []
    for grid, legacy in runs:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--arch", args.arch, "--grid", str(grid),
               "--images", str(args.images), "--bn-images", str(args.bn_images), "--repeat", str(args.repeat)]
        cmd += ["--legacy"] if legacy else []
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode != 0 or not lines:
            print(json.dumps({"case": "loss_plane_legacy" if legacy else "loss_plane", "grid": f"{grid}x{grid}",
                              "error": out.stderr.strip().splitlines()[-1:] or [f"exit {out.returncode}"]}),
                  flush=True)
            continue
        print(lines[-1], flush=True)
        if not legacy:
            done.append(json.loads(lines[-1]))
    if len(done) >= 2:
        lo, hi = min(done, key=lambda r: r["points"]), max(done, key=lambda r: r["points"])
        peaks = [r["peak_rss_mb"] for r in done]
        marginal = (hi["seconds_first"] - lo["seconds_first"]) / (hi["points"] - lo["points"])
        print(json.dumps({"case": "summary", "grids": [r["grid"] for r in done], "peak_rss_mb_min": min(peaks),
                          "peak_rss_mb_max": max(peaks), "peak_spread_mb": round(max(peaks) - min(peaks), 1),
                          "legacy_stack_mb_largest": hi["legacy_stack_mb"],
                          "marginal_seconds_per_point": round(marginal, 5)}), flush=True)


if __name__ == "__main__":
    main()
