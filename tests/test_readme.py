"""The README's python blocks run as written, in order, like a notebook (one namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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


@pytest.mark.slow
def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a block writes lands in a scratch directory
    namespace: dict = {"__name__": "readme"}
    for i, c in enumerate(blocks()):
        exec(compile(c, f"README.md python block {i + 1}", "exec"), namespace)
