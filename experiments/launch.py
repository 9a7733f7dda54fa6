"""Running an experiment as one process or as one of several (``--distributed``).

Every experiment takes the same four options (:func:`add_distributed_args`); with ``--distributed`` (or
when the cluster's environment says so, e.g. SLURM's) it joins a multi-process JAX job through
:func:`mclandscape.engine.distributed.initialize` before any other JAX work. Every process runs the whole
experiment (the collectives need all of them); only process 0 writes ``results.json`` and the figures:
:func:`output_dir` gives the other processes a scratch directory that is removed when they exit.

One machine, two processes::

    python -m experiments.bezier_surface --distributed --coordinator 127.0.0.1:12345 --num-processes 2 \\
        --process-id 0 &
    python -m experiments.bezier_surface --distributed --coordinator 127.0.0.1:12345 --num-processes 2 \\
        --process-id 1

A SLURM GPU cluster (one process per node or per GPU; JAX reads the coordinator and ids from SLURM)::

    srun --nodes 2 --ntasks-per-node 1 python -m experiments.bezier_surface --distributed --dataset cifar10
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile

__all__ = ["add_distributed_args", "setup", "output_dir"]


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """``--distributed``, ``--coordinator``, ``--num-processes``, ``--process-id``, ``--local-devices``."""
    g = parser.add_argument_group("several processes (mclandscape.engine.distributed)")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process JAX job (arguments below, or detected from the cluster, e.g. SLURM)")
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (default: from the cluster)")
    g.add_argument("--num-processes", type=int, default=None, help="processes in the job (default: detected)")
    g.add_argument("--process-id", type=int, default=None, help="this process's index (default: detected)")
    g.add_argument("--local-devices", type=int, default=None,
                   help="CPU host devices per process (testing a multi-device layout on one machine)")


def setup(args: argparse.Namespace) -> bool:
    """Join the job if asked (or if SLURM started several tasks); returns whether this is process 0."""
    import jax

    from mclandscape.engine import distributed

    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if (getattr(args, "distributed", False) or slurm) and not jax.distributed.is_initialized():
        distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               local_devices=args.local_devices)
    return distributed.is_main_process()


def output_dir(out: str, main_process: bool) -> str:
    """``out`` on process 0; elsewhere a scratch directory deleted at exit (every process runs the same
    code, only process 0's files are kept)."""
    if main_process:
        os.makedirs(out, exist_ok=True)
        return out
    scratch = tempfile.mkdtemp(prefix="mcl_rank_")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return scratch
