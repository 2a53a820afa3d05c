"""benchmarks/gpu_check.sh --cpu-smoke: the prepared GPU check runs every row for a few steps on the CPU, so the
command a GPU session runs is known to work before the GPU is there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def test_cpu_smoke_prints_every_row(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "TAILCLIP_CACHE": str(tmp_path / "cache")}
    res = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke"], check=False, capture_output=True, text=True, env=env,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    sections = [ln for ln in res.stdout.splitlines() if ln.startswith("## ")]
    assert len(sections) == 6 and sections[-1] == "## done (cpu-smoke)"
    rows = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
    forward = next(r for r in rows if "arch" in r)
    assert forward["fp32"]["tailclip_img_s"] > 0 and forward["fp32"]["max_abs_diff"] < 1e-3
    trained = {r["method"] for r in rows if "end_to_end_img_s" in r and r["end_to_end_img_s"] > 0}
    assert trained == {"lift", "sage+fit", "ldc"}
    assert any("decode" in r.get("path", "") and r["img_s"] > 0 for r in rows)
    assert {r["taps"] for r in rows if "taps" in r and r["img_s"] > 0} == {0, 4}
    steps = {r["step"].split(":")[0] for r in rows if "step" in r}
    assert {"gla", "tip_adapter", "linear_probe"} <= steps


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the GPU mode")
def test_refuses_gpu_mode_without_cuda() -> None:
    res = subprocess.run(["bash", str(SCRIPT)], check=False, capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert res.returncode == 2 and "--cpu-smoke" in res.stderr
