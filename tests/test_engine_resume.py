"""A run killed with SIGKILL mid-epoch and resumed with `--resume auto` ends exactly like an uninterrupted run, for
an image method (LIFT) and for a method trained from cached features (the linear probe's cosine head)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import deterministic_columns, make_image_folder, read_metrics
from safetensors.torch import load_file

METHODS = {"lift": [], "linear_probe": ["linear_probe.head=cosine"]}
# The library run with a step callback that SIGKILLs the process right after optimizer step N (argv[1]); the
# remaining arguments are the overrides `tailclip train` would build from its options.
KILLED_RUN = """
import os, signal, sys
from tailclip.api import load_config, run

def kill(step: int) -> None:
    if step == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)

run(load_config(None, sys.argv[2:]), callbacks=[kill])
"""


def _train(out: Path, name: str, data: Path, model: Path, extra: list[str], kill_after: int | None = None,
           method: str = "lift"):
    overrides = [f"method={method}", "data.name=image-folder", f"model.name=json:{model}", f"data.root={data}",
                 f"output_dir={out}", f"run_name={name}", "train.epochs=2", "train.batch_size=4", "train.lr=0.05",
                 "train.resume_every_steps=2", "train.select_on=val", "eval.splits=[val,test]", *METHODS[method],
                 *extra]
    if kill_after is None:
        cmd = [sys.executable, "-m", "tailclip.cli", "train", *overrides]
    else:
        cmd = [sys.executable, "-c", KILLED_RUN, str(kill_after), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TAILCLIP_CACHE": str(out / "cache")}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sigkill_mid_epoch_then_resume_auto_matches_uninterrupted(method: str, tmp_path: Path,
                                                                  tiny_vit_json: Path) -> None:
    data = make_image_folder(tmp_path / "data")  # 27 train images, batch 4: 7 steps an epoch
    ref = _train(tmp_path, "ref", data, tiny_vit_json, [], method=method)
    assert ref.returncode == 0, ref.stderr[-3000:]

    # resume states are written after global steps 2, 4, 6, (epoch end 7), 8; the kill comes after step 9,
    # i.e. in the middle of epoch 2 and one step after the last resume point, which must be replayed
    killed = _train(tmp_path, "run", data, tiny_vit_json, [], kill_after=9, method=method)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = tmp_path / "run"
    assert not (run / "results.json").exists() and (run / "resume.pt").exists()
    assert len(read_metrics(run)) == 1  # epoch 1 finished before the kill

    resumed = _train(tmp_path, "run", data, tiny_vit_json, ["resume=auto"], method=method)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    assert deterministic_columns(read_metrics(run)) == deterministic_columns(read_metrics(tmp_path / "ref"))
    a = json.loads((run / "results.json").read_text())
    b = json.loads((tmp_path / "ref" / "results.json").read_text())
    for split in ("val", "test"):
        assert a["splits"][split]["top1"] == b["splits"][split]["top1"]
        assert a["splits"][split]["per_class_top1"] == b["splits"][split]["per_class_top1"]
    assert a["training"]["best_epoch"] == b["training"]["best_epoch"] and a["selection"] == b["selection"]
    la = load_file(str(run / "logits_test.safetensors"))
    lb = load_file(str(tmp_path / "ref" / "logits_test.safetensors"))
    assert (la["logits"] == lb["logits"]).all()
    wa, wb = load_file(str(run / "checkpoint.safetensors")), load_file(str(tmp_path / "ref" / "checkpoint.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
