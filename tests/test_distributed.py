"""Scale-out, in one test: 2 CPU processes (gloo) of 4 forced host devices each (8 devices across processes,
4 within each) give the results of one device; a killed process fails the job quickly and a restart resumes.

Every multi-device check of the suite belongs in ``distributed_job.py``: one launch of two processes runs them
all (a killed launch before it, since a restart needs one)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from tests.distributed_job import run_jobs

JOB = Path(__file__).with_name("distributed_job.py")
JOBS = "train,many,curve,surface,grid,eval,bfs,neb,tt"
LOCAL_DEVICES = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Launch:
    """Two processes of one job, started now; :meth:`wait` collects them (and when each one ended)."""

    def __init__(self, out: Path, env: dict, *extra: str, n: int = 2):
        port = _free_port()
        self.procs = [subprocess.Popen([sys.executable, str(JOB), str(out), "--coordinator", f"127.0.0.1:{port}",
                                        "--num-processes", str(n), "--process-id", str(i),
                                        "--local-devices", str(LOCAL_DEVICES), *extra],
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                      for i in range(n)]
        self.stdout = [""] * n
        self.ended = [0.0] * n
        self.threads = [threading.Thread(target=self._collect, args=(i,), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def _collect(self, i: int) -> None:
        self.stdout[i] = self.procs[i].communicate()[0]
        self.ended[i] = time.perf_counter()

    def wait(self, timeout: float) -> list[subprocess.CompletedProcess]:
        deadline = time.perf_counter() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.perf_counter()))
        if any(t.is_alive() for t in self.threads):
            for p in self.procs:
                p.kill()
            raise TimeoutError(f"the job did not end within {timeout} s")
        return [subprocess.CompletedProcess(p.args, p.returncode, out, "") for p, out in zip(self.procs, self.stdout, strict=True)]


def _assert_close(a: dict, b: dict, rtol: float = 1e-5) -> None:
    keys = sorted(k for k in b if k not in ("devices", "train_resumed_from"))
    assert sorted(k for k in a if k not in ("devices", "train_resumed_from")) == keys
    for k in keys:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=rtol * max(1.0, float(np.max(np.abs(b[k])))),
                                   err_msg=k)


def test_two_processes_of_four_devices_equal_one_device_and_a_killed_process_resumes(tmp_path, subprocess_env):
    ckpt = tmp_path / "ckpt"
    # the compiler flags of the in-process reference (conftest.py): no LLVM optimisation of the many small programs
    env = {**subprocess_env, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    # 1. process 1 dies after epoch 2 (after its checkpoint): process 0 must fail fast, not hang
    t0 = time.perf_counter()
    killed = _Launch(tmp_path / "killed", env, "--jobs", "train", "--checkpoint-dir", str(ckpt),
                     "--die-after-epoch", "2")
    # the one-device reference, in this process, while the killed job trains and then waits out its heartbeat
    reference = run_jobs(JOBS.split(","))
    assert int(reference["devices"]) == 1
    dead = killed.wait(timeout=300)
    assert dead[1].returncode == 17, dead[1].stdout[-3000:]
    assert dead[0].returncode != 0, "the surviving process did not fail"
    assert "another task died" in dead[0].stdout or "stopped sending heartbeats" in dead[0].stdout, \
        dead[0].stdout[-3000:]
    assert killed.ended[0] - t0 < 240
    # 2. both restart: training resumes from epoch 2; every other job runs across the 2 x 4 devices
    runs = _Launch(tmp_path / "out", env, "--jobs", JOBS, "--checkpoint-dir", str(ckpt)).wait(600)
    for r in runs:
        assert r.returncode == 0, r.stdout[-3000:]
    p0, p1 = (dict(np.load(tmp_path / "out" / f"result_{i}.npz")) for i in (0, 1))
    assert int(p0["devices"]) == 2 * LOCAL_DEVICES and int(p0["train_resumed_from"]) == 2
    for k in p0:  # every process returns the same host values
        np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)
    _assert_close(p0, reference)
