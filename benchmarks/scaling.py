"""Scale-out: one surface-training step and one 11×11 surface grid on 1, 2, 4 and 8 devices.

Each device count runs in a fresh process (forced host devices on CPU:
``--xla_force_host_platform_device_count``; on a GPU machine ``--real`` uses its real devices, up to the count).
Per count it prints one JSON line per case with seconds per step (or per grid), points per second, the ratio
to one device, the peak memory per device of the compiled computation (XLA's memory analysis: arguments,
outputs and temporaries), and the largest difference from the one-device result. The NEB case times one
band step (10 pivots, so 8 inner ones, batch 128) on every ``points × data`` layout of the devices, so the
split ``training_mesh`` chooses (points first) can be compared with the others. A last case compiles (does
not run) the 11×11 grid of a VGG16 3×3-control surface on CIFAR-shaped data and reports its peak memory per
device for each count.

On a 2-core CPU, forced host devices share the same two cores, so expect no speed-up; what this shows
here is equality of results and memory per device that does not grow with the grid.

    python benchmarks/scaling.py [--devices 1,2,4,8] [--model simple_cnn] [--k 8] [--repeats 3] [--real]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def neb_layouts(n: int, inner: int = 8) -> list[tuple[int, int]]:
    """Every ``(points, data)`` split of ``n`` devices whose points axis divides the inner pivots."""
    return [(p, n // p) for p in range(1, n + 1) if n % p == 0 and inner % p == 0]


def surface_train_step(model, surf, batch, k: int, n: int, repeats: int) -> dict:
    """One surface-training step (phase 3: every control point trained, k points per batch) on the first ``n``
    devices: seconds per step (best of ``repeats``), points per second, the ``points x data`` mesh, XLA's
    memory figures, the loss and the first 64 values of every updated control leaf (to compare layouts)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from timing import best_time

    import mclandscape as mcl
    from mclandscape.engine.connector_train import ConnectorObjective
    from mclandscape.engine.distributed import training_mesh
    from mclandscape.engine.step import make_step
    from mclandscape.methods.surface import phase_sampler

    mesh = training_mesh(int(batch[0].shape[0]), k, devices=n)
    obj = ConnectorObjective(point=mcl.make_objective(model, "cross_entropy", train=True),
                             template=surf.replace(control=None), sampler=phase_sampler((3, 3), 3),
                             mask=jnp.asarray(surf.trainable), num_samples=k, strategy="vmap", mesh=mesh)
    step = make_step(obj, optax.sgd(0.01, momentum=0.9), trainable=jax.tree_util.tree_map(lambda _: jnp.asarray(surf.trainable), surf.control),
                     mesh=mesh)
    state = step.init(surf.control)
    key = jax.random.key(0)
    sec = best_time(lambda: step(state, batch, key)[1]["loss"], repeats)
    new, metrics = step(state, batch, key)
    return {"seconds_per_step": sec, "points_per_s": k / sec, "mesh": dict(mesh.shape) if mesh else None,
            "memory": step.memory(state, batch, key), "loss": float(metrics["loss"]),
            "control": [np.asarray(a).ravel()[:64].tolist() for a in jax.tree_util.tree_leaves(new.params)]}


def worker(n: int, model_name: str, k: int, repeats: int, vgg: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from timing import best_time

    import mclandscape as mcl
    from mclandscape.engine import distributed
    from mclandscape.engine.distributed import training_mesh
    from mclandscape.engine.evaluate import evaluation_memory
    from mclandscape.engine.points import connector_points
    from mclandscape.methods import neb as N
    from mclandscape.methods.neb_forces import straight_band

    train = mcl.load_dataset("digits", "train")
    test = mcl.load_dataset("digits", "test")
    model = mcl.get_model(model_name, num_classes=10)
    corners = [model.init(jax.random.key(i), jnp.asarray(train.x[:1]))["params"] for i in range(4)]
    surf = mcl.bezier_surface(*corners, n=2, m=2)
    out = {"devices": len(jax.devices())}

    # one surface-training step (phase 3, k points per batch of 128)
    batch = (jnp.asarray(train.x[:128]), jnp.asarray(train.y[:128]))
    key = jax.random.key(0)
    out["train"] = surface_train_step(model, surf, batch, k, n, repeats)

    # one NEB band step (10 pivots: 8 inner) on every points x data layout of the n devices
    piv = straight_band(corners[0], corners[1], 10)
    cfg = N.NEBConfig(learning_rate=0.01, strategy="vmap")
    nb = N.NEBBatch(batch, jnp.asarray(False))
    chosen = training_mesh(128, 8, devices=n)
    out["neb"] = []
    for p, d in neb_layouts(n):
        m = None if n == 1 else distributed.mesh((p, d), ("points", "data"), devices=n)
        nstep = N.make_neb_step(mcl.make_objective(model, train=True), cfg, piv, mesh=m)
        nstate = nstep.init(piv)
        sec = best_time(lambda nstep=nstep, nstate=nstate: nstep(nstate, nb, key)[1]["loss"], repeats)
        new_piv = nstep(nstate, nb, key)[0].params
        out["neb"].append({"points": p, "data": d, "seconds_per_step": sec,
                           "chosen": chosen is None and n == 1 or chosen is not None and
                           dict(chosen.shape) == {"points": p, "data": d},
                           "memory": nstep.memory(nstate, nb, key),
                           "pivots": [np.asarray(a).ravel()[:64].tolist() for a in jax.tree_util.tree_leaves(new_piv)]})

    # the 11x11 grid (121 points) on the test set
    pts = mcl.uv_grid(11)
    sec = best_time(lambda: mcl.evaluate(model, mcl.connector_points(surf, pts), test, devices=n).loss, repeats)
    res = mcl.evaluate(model, mcl.connector_points(surf, pts), test, devices=n)
    out["grid"] = {"seconds": sec, "points_per_s": len(pts) / sec, "loss": res.loss.tolist(),
                   "memory": evaluation_memory(model, connector_points(surf, pts), test, devices=n)}
    if vgg:  # compile only: the peak memory per device of a VGG16 11x11 surface grid on CIFAR-shaped data
        vgg16 = mcl.get_model("vgg16", num_classes=10)
        x = np.zeros((500, 32, 32, 3), np.float32)
        vc = [jax.eval_shape(vgg16.init, jax.random.key(i), jnp.zeros((1, 32, 32, 3)))["params"] for i in range(4)]
        vc = [jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), c) for c in vc]
        vs = mcl.bezier_surface(*vc, n=2, m=2)
        out["vgg16_grid_memory"] = evaluation_memory(vgg16, connector_points(vs, pts), (x, np.zeros(500, np.int32)),
                                                     devices=n, check=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--model", default="simple_cnn")
    ap.add_argument("--k", type=int, default=8, help="points per surface-training step")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--real", action="store_true", help="use the machine's own devices (GPU), not forced CPU ones")
    ap.add_argument("--no-vgg", action="store_true", help="skip the VGG16 memory case")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        sys.path.insert(0, HERE)
        print(json.dumps(worker(args.worker, args.model, args.k, args.repeats, not args.no_vgg)))
        return
    counts = [int(c) for c in args.devices.split(",")]
    results = {}
    for n in counts:
        env = dict(os.environ)
        if not args.real:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(n), "--model", args.model, "--k", str(args.k),
               "--repeats", str(args.repeats)] + (["--no-vgg"] if args.no_vgg else [])
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise SystemExit(f"worker with {n} devices failed:\n{r.stderr[-3000:]}")
        results[n] = json.loads(r.stdout.strip().splitlines()[-1])
    import numpy as np

    one = results[counts[0]]
    for n in counts:
        r = results[n]
        diff_c = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                     for a, b in zip(r["train"]["control"], one["train"]["control"], strict=True))
        print(json.dumps({"bench": "scaling", "case": "surface_train_step", "model": args.model, "k": args.k,
                          "devices": n, "mesh": r["train"]["mesh"],
                          "seconds_per_step": round(r["train"]["seconds_per_step"], 4),
                          "points_per_s": round(r["train"]["points_per_s"], 2),
                          "ratio_to_first": round(one["train"]["seconds_per_step"] / r["train"]["seconds_per_step"], 3),
                          "peak_bytes_per_device": r["train"]["memory"]["peak_bytes"],
                          "max_abs_diff_vs_first": diff_c}), flush=True)
        diff_g = float(np.max(np.abs(np.asarray(r["grid"]["loss"]) - np.asarray(one["grid"]["loss"]))))
        print(json.dumps({"bench": "scaling", "case": "surface_grid_11x11", "model": args.model, "devices": n,
                          "seconds": round(r["grid"]["seconds"], 4), "points_per_s": round(r["grid"]["points_per_s"], 1),
                          "ratio_to_first": round(one["grid"]["seconds"] / r["grid"]["seconds"], 3),
                          "peak_bytes_per_device": r["grid"]["memory"]["peak_bytes"],
                          "max_abs_diff_vs_first": diff_g}), flush=True)
        for lay in r["neb"]:
            diff_n = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                         for a, b in zip(lay["pivots"], one["neb"][0]["pivots"], strict=True))
            print(json.dumps({"bench": "scaling", "case": "neb_band_step", "model": args.model, "pivots": 10,
                              "devices": n, "points": lay["points"], "data": lay["data"],
                              "chosen_by_training_mesh": lay["chosen"],
                              "seconds_per_step": round(lay["seconds_per_step"], 4),
                              "ratio_to_first": round(one["neb"][0]["seconds_per_step"] / lay["seconds_per_step"], 3),
                              "peak_bytes_per_device": lay["memory"]["peak_bytes"],
                              "max_abs_diff_vs_first": diff_n}), flush=True)
        if "vgg16_grid_memory" in r:
            m = r["vgg16_grid_memory"]
            print(json.dumps({"bench": "scaling", "case": "vgg16_grid_11x11_memory", "devices": n,
                              "peak_bytes_per_device": m["peak_bytes"], "argument_bytes": m["argument_bytes"],
                              "temp_bytes": m["temp_bytes"], "strategy": m["strategy"], "chunk": m["chunk_size"],
                              "stem": m["stem"]}), flush=True)


if __name__ == "__main__":
    main()
