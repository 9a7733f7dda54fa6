"""Voxel BFS (Algorithm 3 of N. Schager, "Volumetric investigation into neural network loss landscapes"):
throughput of batched vs one-at-a-time evaluation, and memory per voxel.

Prints one JSON line per configuration:

- ``throughput``: voxels evaluated per second on an Iris 4-8-3 MLP 3-D flat (QR basis through four
  minima), for ``one_at_a_time`` (the literal algorithm: every neighbour is its own loss call),
  ``per_voxel`` (one call per dequeued voxel for its 2m neighbours) and ``batched`` (waves of
  ``--batch-size`` frontier voxels, up to ``--max-batch`` voxels per call); each line has the speed-up over
  one-at-a-time. The same flat, step and threshold are used; compilation is excluded (warm-up run first).
  Every mode evaluates through the one evaluator (``map_points``); one-at-a-time uses chunks of one voxel.
- ``memory``: a traversal of a 3-D quadratic bowl sized to reach ``--visited`` visited voxels (10^6 by
  default): peak traced memory (``tracemalloc``; NumPy buffers are traced), the state's own bytes
  (hash table + queues) per visited voxel, the growth of the process's max RSS, and — for comparison — the
  traced size of a Python ``set`` holding the same int64 keys.

    python benchmarks/volume_bfs.py [--visited 1000000] [--step 0.1] [--n 3.0] [--limit-single 1500]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
import tracemalloc

import jax
import jax.numpy as jnp

from mclandscape.core.objective import function_objective, make_objective
from mclandscape.engine.data import load_dataset
from mclandscape.engine.models import get_model
from mclandscape.methods import flats as VF
from mclandscape.methods import lattice as VL
from mclandscape.methods import traversal as VT


def iris_flat(seed: int = 0, epochs: int = 1000):
    """Four Iris minima (``train_many``, full-batch Adam) and the 3-D QR flat through them."""
    from mclandscape.engine.many import train_many
    from mclandscape.engine.train import TrainConfig

    train = load_dataset("iris", "train")
    model = get_model("mlp", widths=[8], num_classes=3)
    cfg = TrainConfig(epochs=epochs, batch_size=len(train), optimizer="adam", lr=0.01)
    runs = train_many(model, train, None, cfg, seeds=[seed * 10 + i for i in range(4)], progress=False)
    minima = [r.variables["params"] for r in runs]
    flat = VF.flat_from_minima(minima, basis="qr")
    return flat, make_objective(model, train=False), (train.x, train.y)


def throughput(args) -> list[dict]:
    flat, objective, batch = iris_flat(args.seed)
    configs = [
        ("one_at_a_time", dict(batch_size=1), 1, args.limit_single),
        ("per_voxel", dict(batch_size=1), args.max_batch, args.limit_single),
        ("batched", dict(batch_size=args.batch_size), args.max_batch, args.limit_batched),
    ]
    rows = []
    for name, kw, max_batch, limit in configs:
        # the literal algorithm evaluates one voxel per call: no chunk padding either
        ev = VL.LatticeLoss(flat, args.step, objective, batch, chunk=1 if max_batch == 1 else 16, max_batch=max_batch)
        config = VT.TraversalConfig(limit=limit, **kw)
        VT.grid_traversal(ev, args.n, config=config)  # warm-up: compiles every bucket this run uses
        t = time.perf_counter()
        res = VT.grid_traversal(ev, args.n, config=config)
        dt = time.perf_counter() - t
        rows.append({"bench": "throughput", "mode": name, "flat": "iris_4-8-3_3d_qr", "step": args.step,
                     "n": args.n, "limit": limit, "batch_size": kw["batch_size"], "max_batch": max_batch,
                     "evaluations": res.evaluations, "accepted": res.H, "truncated": res.truncated,
                     "seconds": dt, "voxels_per_s": res.evaluations / dt})
    base = rows[0]["voxels_per_s"]
    for r in rows:
        r["speedup_vs_one_at_a_time"] = r["voxels_per_s"] / base
    return rows


def _sphere(theta, eps):
    return jnp.sum(theta * theta) + eps


def memory(args) -> dict:
    target = args.visited
    eps, step = 1.0, 0.01
    # visited ≈ accepted ball of radius R voxels plus its boundary shell; pick R for ~target visited voxels
    R = (target / (4 / 3 * math.pi)) ** (1 / 3) * 0.985
    n = 1 + (R * step) ** 2 / eps
    flat = VF.full_space_flat(jnp.zeros(3, jnp.float32))
    ev = VL.LatticeLoss(flat, step, function_objective(_sphere), jnp.float32(eps), max_batch=args.max_batch)
    VT.grid_traversal(ev, 1 + (10 * step) ** 2 / eps)  # compile the buckets outside the measurement
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t = time.perf_counter()
    res = VT.grid_traversal(ev, n, config=VT.TraversalConfig(batch_size=args.batch_size))
    dt = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    state = res.state
    keys, _ = state.store.items()
    tracemalloc.start()
    snap0 = tracemalloc.get_traced_memory()[0]
    pyset = set(keys.tolist())
    py_bytes = tracemalloc.get_traced_memory()[0] - snap0
    tracemalloc.stop()
    del pyset
    return {"bench": "memory", "landscape": "3d_bowl", "visited": res.visited, "accepted": res.H,
            "future_queue": res.future_size, "seconds": dt, "voxels_per_s": res.evaluations / dt,
            "tracemalloc_peak_MiB": peak / 2 ** 20, "peak_bytes_per_visited": peak / res.visited,
            "state_MiB": state.nbytes / 2 ** 20, "state_bytes_per_visited": state.nbytes / res.visited,
            "hash_capacity": state.store.capacity, "maxrss_growth_MiB": (rss1 - rss0) / 1024,
            "python_set_of_keys_MiB": py_bytes / 2 ** 20, "python_set_bytes_per_key": py_bytes / res.visited,
            "projected_state_GiB_at_1e7": state.nbytes / res.visited * 1e7 / 2 ** 30,
            "projected_peak_GiB_at_1e7": peak / res.visited * 1e7 / 2 ** 30}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step", type=float, default=0.1, help="step width s on the Iris 3-D flat")
    p.add_argument("--n", type=float, default=3.0, help="threshold multiplier n (c = n·eps)")
    p.add_argument("--limit-single", type=int, default=1500, help="iterations of the one-at-a-time runs")
    p.add_argument("--limit-batched", type=int, default=100_000, help="iterations of the batched run")
    p.add_argument("--batch-size", type=int, default=1024, help="frontier voxels per wave (batched)")
    p.add_argument("--max-batch", type=int, default=4096, help="voxels per evaluation call")
    p.add_argument("--visited", type=int, default=1_000_000, help="target visited voxels of the memory run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma-separated benches to skip (throughput, memory)")
    args = p.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    dev = str(jax.devices()[0].platform)
    if "throughput" not in skip:
        for row in throughput(args):
            print(json.dumps({**row, "device": dev}), flush=True)
    if "memory" not in skip:
        print(json.dumps({**memory(args), "device": dev}), flush=True)


if __name__ == "__main__":
    main()
