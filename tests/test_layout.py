"""The package's shape: layers never import upwards, and importing does no work (no JAX backend started,
matplotlib's backend left alone; figures drawn and saved register nothing with pyplot)."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mclandscape"
LAYERS = ["core", "engine", "methods", "plots"]  # each may import only from the layers before it


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; the package uses absolute imports")
    return out


def test_every_module_sits_in_a_layer():
    stray = [p.name for p in PKG.glob("*.py") if p.name != "__init__.py"]
    assert stray == [], f"modules outside the layers: {stray}"
    assert sorted(p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == sorted(LAYERS)


@pytest.mark.parametrize("layer", LAYERS)
def test_no_layer_imports_from_a_layer_above_it(layer):
    above = LAYERS[LAYERS.index(layer) + 1:]
    if layer == "plots":
        above = []
    bad = []
    for path in sorted((PKG / layer).rglob("*.py")):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "mclandscape" and len(parts) > 1 and parts[1] in above:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
            if parts[0] == "mclandscape" and len(parts) == 1:
                bad.append(f"{path.relative_to(ROOT)} imports the top-level package")
    assert not bad, "\n".join(bad)


def test_import_starts_no_backend_and_plots_leave_matplotlib_alone(tmp_path):
    # one subprocess for both contracts: importing does no device work, and drawing (then saving) figures
    # registers nothing with pyplot and keeps the caller's matplotlib backend
    code = (
        "import matplotlib\n"
        "matplotlib.use('svg')\n"
        "import mclandscape, mclandscape.plots\n"
        "import mclandscape.methods.volume, mclandscape.methods.trusttech, mclandscape.methods.deform\n"
        "from jax._src import xla_bridge\n"
        "assert not xla_bridge._backends, f'a JAX backend was initialised at import: {list(xla_bridge._backends)}'\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
        "import numpy as np\n"
        "from matplotlib import _pylab_helpers\n"
        "from mclandscape import plots\n"
        "g = np.linspace(0, 1, 9).reshape(3, 3)\n"
        "figs = [plots.heatmap_pair(g, g / 2, label='l'), plots.surface_3d([g, g]),\n"
        "        plots.contour_plot(np.arange(3.0), np.arange(3.0), g)]\n"
        f"[plots.save(f, {str(tmp_path)!r} + f'/f{{i}}.png', dpi=40) for i, f in enumerate(figs)]\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
        "assert _pylab_helpers.Gcf.get_num_fig_managers() == 0\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f0.png", "f1.png", "f2.png"]


def test_top_level_names_are_few_and_all_resolve():
    # one small API: at most 70 names, each defined once in its module (no aliases) and re-exported unchanged
    import mclandscape as mcl

    names = mcl.__all__
    assert len(names) <= 70 and len(set(names)) == len(names)
    assert {"evaluate", "connector_points", "stacked_points", "top_hessian_eigenvalues", "transform"} <= set(names)
    for name in names:
        obj = getattr(mcl, name)
        if name in LAYERS or name == "distributed":
            assert obj.__name__ == f"mclandscape.{name}" or obj.__name__.endswith(f".{name}")
            continue
        home = importlib.import_module(obj.__module__)
        assert getattr(home, name) is obj, f"mcl.{name} is not {obj.__module__}.{name}"
        assert obj.__module__.startswith("mclandscape."), name
    public = {n for n in dir(mcl) if not n.startswith("_")} - set(LAYERS) - {"distributed", "engine", "methods", "core"}
    assert public <= set(names), f"top-level names outside __all__: {sorted(public - set(names))}"
