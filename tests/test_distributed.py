"""Scale-out: the same results from 2 CPU processes (gloo, 2 host devices each), from 8 forced host devices
in one process and from one device; a killed process fails the job quickly and a restart resumes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

JOB = Path(__file__).with_name("distributed_job.py")
ROOT = JOB.parents[1]
JOBS = "train,many,curve,surface,grid,bfs,neb,tt"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int | None = None, cache: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    if cache is not None:  # the restarted processes reuse what the first ones compiled
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    env.pop("XLA_FLAGS", None)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _processes(out: Path, n: int, *extra: str, cache: Path | None = None,
               timeout: float = 600) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(JOB), str(out), "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", str(n), "--process-id", str(i), "--local-devices", "2", *extra],
                              env=_env(cache=cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(n)]
    done = []
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, ""))
    return done


def _single(out: Path, devices: int | None, *extra: str) -> None:
    r = subprocess.run([sys.executable, str(JOB), str(out), *extra], env=_env(devices), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _assert_close(a: dict, b: dict, rtol: float = 1e-5) -> None:
    keys = sorted(k for k in b if k not in ("devices", "train_resumed_from"))
    assert sorted(k for k in a if k not in ("devices", "train_resumed_from")) == keys
    for k in keys:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=rtol * max(1.0, float(np.max(np.abs(b[k])))),
                                   err_msg=k)


@pytest.fixture(scope="module")
def reference():
    from tests.distributed_job import run_jobs  # one device, in this process

    return run_jobs(JOBS.split(","))


def test_two_processes_equal_one_and_a_killed_process_resumes(tmp_path, reference):
    ckpt = tmp_path / "ckpt"
    # 1. process 1 dies after epoch 2 (after its checkpoint): process 0 must fail fast, not hang
    t0 = time.perf_counter()
    killed = _processes(tmp_path / "killed", 2, "--jobs", "train", "--checkpoint-dir", str(ckpt),
                        "--die-after-epoch", "2", cache=tmp_path / "xla", timeout=300)
    assert killed[1].returncode == 17, killed[1].stdout[-3000:]
    assert killed[0].returncode != 0, "the surviving process did not fail"
    assert "another task died" in killed[0].stdout or "stopped sending heartbeats" in killed[0].stdout, \
        killed[0].stdout[-3000:]
    assert time.perf_counter() - t0 < 240
    # 2. both restart: training resumes from epoch 2; every other job runs across the two processes
    runs = _processes(tmp_path / "out", 2, "--jobs", JOBS, "--checkpoint-dir", str(ckpt), cache=tmp_path / "xla")
    for r in runs:
        assert r.returncode == 0, r.stdout[-3000:]
    p0, p1 = (dict(np.load(tmp_path / "out" / f"result_{i}.npz")) for i in (0, 1))
    assert int(p0["devices"]) == 4 and int(p0["train_resumed_from"]) == 2
    for k in p0:  # every process returns the same host values
        np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)
    _assert_close(p0, reference)


def test_eight_host_devices_in_one_process_equal_one_device(tmp_path, reference):
    _single(tmp_path, 8, "--jobs", JOBS)
    eight = dict(np.load(tmp_path / "result_0.npz"))
    assert int(eight["devices"]) == 8
    _assert_close(eight, reference)
