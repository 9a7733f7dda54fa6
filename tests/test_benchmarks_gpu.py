"""``benchmarks/gpu.py`` (the GPU figures in one command) runs on CPU, small, and prints its JSON lines."""

from __future__ import annotations

import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import jax
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
FIELDS = {
    "convfc_curve_eval": {"points", "n", "batch", "per_point_s", "mean_loss"},
    "convfc_curve_train_step": {"batch", "t_samples", "step_s", "steps_taken", "last_loss"},
    "bf16_vs_f32": {"f32_per_point_s", "bf16_per_point_s", "speedup_bf16", "max_abs_loss_diff", "max_rel_loss_diff",
                    "max_abs_acc_diff"},
    "vgg16_surface_grid": {"model", "grid", "points", "control_points", "seconds", "per_point_s", "mean_loss"},
    "scaling_train_step": {"k", "used_devices", "seconds_per_step", "ratio_to_one_device",
                           "max_abs_diff_vs_one_device"},
}
TORCH = {"convfc_curve_eval": {"torch_per_point_s", "speedup_vs_torch", "torch_max_logit_diff"},
         "convfc_curve_train_step": {"torch_step_s", "speedup_vs_torch"}}


def _run_on_cpu(subprocess_env, monkeypatch, capsys) -> str:
    """The script's output, run as ``python benchmarks/gpu.py --repeats 1`` on CPU: in this process when its
    backend is the CPU (no second interpreter to start, and the suite's compiler flags), else in a subprocess."""
    if jax.default_backend() != "cpu":
        r = subprocess.run([sys.executable, str(SCRIPT), "--repeats", "1"], capture_output=True, text=True,
                           env={**subprocess_env, "JAX_PLATFORMS": "cpu"}, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--repeats", "1"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts benchmarks/ first on the path
    runpy.run_path(str(SCRIPT), run_name="__main__")
    return capsys.readouterr().out


@pytest.mark.slow
def test_runs_small_on_cpu_and_prints_every_case(subprocess_env, monkeypatch, capsys):
    out = _run_on_cpu(subprocess_env, monkeypatch, capsys)
    lines = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    assert [ln["case"] for ln in lines] == list(FIELDS), out
    for ln in lines:
        assert ln["bench"] == "gpu" and ln["backend"] == "cpu" and ln["small"] is True and ln["devices"] == 1
        assert FIELDS[ln["case"]] <= set(ln), (ln["case"], FIELDS[ln["case"]] - set(ln))
        for k, v in ln.items():
            if isinstance(v, float):
                assert math.isfinite(v) and v >= 0 or k.endswith("loss"), (ln["case"], k, v)
        if ln["torch"] == "unavailable":
            assert ln["torch_device"] is None and not TORCH.get(ln["case"], set()) & set(ln)
        else:
            assert ln["torch_device"] == "cpu" and TORCH.get(ln["case"], set()) <= set(ln)
    curve, train, bf16, grid, scaling = lines
    assert curve["points"] == 3 and grid["points"] == grid["grid"] ** 2 and grid["control_points"] == 9
    assert train["steps_taken"] >= 2 and math.isfinite(train["last_loss"])  # the warm-up and the timed step
    assert bf16["max_rel_loss_diff"] < 0.05 and bf16["max_abs_acc_diff"] <= 1
    assert scaling["used_devices"] == 1 and scaling["max_abs_diff_vs_one_device"] == 0.0
    if curve["torch"] != "unavailable":  # the same network on both sides
        assert curve["torch_max_logit_diff"] < 1e-3
