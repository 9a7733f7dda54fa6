"""Shared, session-scoped fixtures (cheap to reuse, expensive to rebuild).

Data
- ``digits_train`` / ``digits_test``: scikit-learn digits, 8×8×1 images, 1437 / 360 examples, 10 classes.
- ``iris_train`` / ``iris_test``: standardised iris features, 120 / 30 examples, 3 classes.
- ``digits_small``: ``(train, test)``, the first 256 / 128 digits examples: for tests whose property does not
  need the whole set (a step, a compilation count, a shape).

Models and training (MLP 64-64-10 on digits: 4 810 parameters, about 97 % test accuracy)
- ``digits_mlp``: the :class:`~mclandscape.engine.models.Model` (``get_model("mlp", widths=[64], num_classes=10)``).
- ``digits_config``: its :class:`~mclandscape.engine.train.TrainConfig` (Adam 1e-3, batch 64, 20 epochs).
- ``digits_corners``: four independently trained endpoints (seeds 0, 1, 2, 3) as a list of
  :class:`~mclandscape.engine.train.TrainResult`; ``[r.variables for r in digits_corners]`` are the corners of a
  surface (Bézier-surface paper, §4.2).
- ``trained_mlp``: ``digits_corners[0]``.
- ``tiny_mlp``: a small trained MLP (8×8 digits -> 16 -> 10, 1 210 parameters; Adam 1e-2, 5 epochs on
  ``digits_small``, seed 0), as a :class:`~mclandscape.engine.train.TrainResult`; its ``model`` is
  ``get_model("mlp", widths=[16], num_classes=10)`` (about 80 % test accuracy). For tests that need a trained
  network, not a good one.
- ``digits_trajectory``: one run (seed 10) with snapshots kept at epochs 14, 16, 18, 20 — the
  trajectory corners of the Bézier-surface paper's appendix A.2 (``result.snapshots[epoch]``).

Compilation and subprocesses
- ``count_compiles``: ``with count_compiles() as seen: ...`` lists the XLA compilations inside the block.
- ``subprocess_env``: the environment for a Python subprocess of a test: this checkout first on
  ``PYTHONPATH``, no inherited ``XLA_FLAGS``, and JAX's persistent compilation cache in one directory of the
  session, so that a program compiled by one subprocess (a killed run) is loaded, not compiled, by the next
  (its restart).

Do not mutate fixture values (they are shared by every test of the session).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

# The suite compiles hundreds of small programs and runs each a few times, so LLVM's optimisation of every
# one costs more than it saves (the suite runs in about 0.7 of the time without it). Every comparison in the
# suite is between values computed under the same flags; a caller's own XLA_FLAGS are kept.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests build equal programs through different Python functions (each test its own step, objective or jitted
# reference), which jit's in-memory cache keys apart; JAX's persistent cache keys them by the compiled program, so
# the session compiles each program once (about a sixth less CPU time measured on test_surface + test_evaluate).
# The directory lives for one session: a run starts cold, as a fresh clone does. ``count_compiles`` still sees a
# cache hit ("Finished XLA compilation" wraps the lookup), so "compiles nothing" stays as strict.
_XLA_CACHE = tempfile.mkdtemp(prefix="mcl-xla-cache-")
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)

from mclandscape.engine.data import load_dataset  # noqa: E402
from mclandscape.engine.many import train_many  # noqa: E402
from mclandscape.engine.models import get_model  # noqa: E402
from mclandscape.engine.train import TrainConfig, train_model  # noqa: E402


@contextlib.contextmanager
def _count_compiles():
    seen: list[str] = []

    class _Handler(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith("Finished XLA compilation"):
                seen.append(msg)

    handler, logger = _Handler(), logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            yield seen
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def count_compiles():
    """``with count_compiles() as seen:`` collects the names of the XLA compilations inside the block
    (``jax.log_compiles``), e.g. to assert that a second call with equal inputs compiles nothing."""
    return _count_compiles


@pytest.fixture(scope="session")
def subprocess_env() -> dict:
    """``subprocess.run(..., env=subprocess_env)``: this checkout's package, JAX's persistent compilation cache
    shared by the session's subprocesses (every compilation is cached: no minimum time or size)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PYTHONUNBUFFERED": "1",
           "JAX_COMPILATION_CACHE_DIR": _XLA_CACHE,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    env.pop("XLA_FLAGS", None)
    return env


@pytest.fixture(scope="session")
def digits_train():
    return load_dataset("digits", "train")


@pytest.fixture(scope="session")
def digits_test():
    return load_dataset("digits", "test")


@pytest.fixture(scope="session")
def iris_train():
    return load_dataset("iris", "train")


@pytest.fixture(scope="session")
def iris_test():
    return load_dataset("iris", "test")


@pytest.fixture(scope="session")
def digits_mlp():
    return get_model("mlp", widths=[64], num_classes=10)


@pytest.fixture(scope="session")
def digits_config():
    return TrainConfig(epochs=20, batch_size=64, optimizer="adam", lr=1e-3)


@pytest.fixture(scope="session")
def digits_corners(digits_mlp, digits_train, digits_test, digits_config):
    return train_many(digits_mlp, digits_train, digits_test, digits_config, seeds=(0, 1, 2, 3), progress=False)


@pytest.fixture(scope="session")
def trained_mlp(digits_corners):
    return digits_corners[0]


@pytest.fixture(scope="session")
def digits_trajectory(digits_mlp, digits_train, digits_test, digits_config):
    return train_model(digits_mlp, digits_train, digits_test, digits_config, seed=10,
                       save_epochs=(14, 16, 18, 20), progress=False)


@pytest.fixture(scope="session")
def digits_small(digits_train, digits_test):
    return digits_train.take(256), digits_test.take(128)


@pytest.fixture(scope="session")
def tiny_mlp(digits_small):
    train, test = digits_small
    return train_model(get_model("mlp", widths=[16], num_classes=10), train, test,
                       TrainConfig(epochs=5, batch_size=64, optimizer="adam", lr=1e-2), seed=0, progress=False)
