"""Timing shared by the benchmark scripts (run as ``python benchmarks/<name>.py``, so this module is importable
as ``timing``)."""

from __future__ import annotations

import time

import jax


def best_time(fn, repeats: int, inner: int = 1) -> float:
    """Seconds per call of ``fn``: one warm-up call (compilation), then the minimum over ``repeats`` timings of
    ``inner`` consecutive calls (divided by ``inner``), waiting for the last result to be ready."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            out = fn()
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t) / inner)
    return best
