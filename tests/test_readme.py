"""The README's python blocks run as written, in order, like a notebook (one namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import mclandscape as mcl

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks_without_elisions():
    code = blocks()
    assert code, "README.md has no ```python blocks"
    for c in code:
        # an elided argument list (`...`) would be a block that does not run as written
        assert "..." not in c, c


def _same_data(a, b) -> bool:
    return a.x.shape == b.x.shape and np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)


@pytest.mark.slow
def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)  # anything a block writes lands in a scratch directory
    real = mcl.train_many

    def train_many(model, train, test, config, seeds, **kwargs):
        # A call equal to the one conftest.py makes for ``digits_corners`` returns that fixture: training is
        # deterministic (tests/test_train.py), so the session does not train the same four runs twice.
        mlp, fixture_train, fixture_test = (request.getfixturevalue(n) for n in ("digits_mlp", "digits_train",
                                                                                 "digits_test"))
        if (model.spec == mlp.spec and config == request.getfixturevalue("digits_config")
                and list(seeds) == [0, 1, 2, 3] and set(kwargs) <= {"progress"} and test is not None
                and _same_data(train, fixture_train) and _same_data(test, fixture_test)):
            return request.getfixturevalue("digits_corners")
        return real(model, train, test, config, seeds, **kwargs)

    monkeypatch.setattr(mcl, "train_many", train_many)
    namespace: dict = {"__name__": "readme"}
    for i, c in enumerate(blocks()):
        exec(compile(c, f"README.md python block {i + 1}", "exec"), namespace)
