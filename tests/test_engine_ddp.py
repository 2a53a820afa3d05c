"""`torchrun --nproc_per_node=2` (DDP, gloo on CPU) gives the same training and metrics as one process, for an image
method (LIFT) and for a method trained from cached features (the linear probe's cosine head)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port, make_image_folder, read_metrics

METHODS = {"lift": [], "linear_probe": ["linear_probe.head=cosine"]}


def _args(out: Path, name: str, data: Path, model: Path, method: str) -> list[str]:
    # batch 6 over 27 images: the last global batch has 3 images, split 2/1 over the two ranks
    return ["train", "--method", method, "--dataset", "image-folder", "--root", str(data), "--model", f"json:{model}",
            "--output-dir", str(out), "--name", name, "train.epochs=2", "train.batch_size=6", "train.lr=0.05",
            "train.grad_accum=2", "eval.splits=[val,test]", *METHODS[method]]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_process_gloo_matches_single_process(method: str, tmp_path: Path, tiny_vit_json: Path) -> None:
    data = make_image_folder(tmp_path / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TAILCLIP_CACHE": str(tmp_path / "cache")}
    single = subprocess.run([sys.executable, "-m", "tailclip.cli",
                             *_args(tmp_path, "single", data, tiny_vit_json, method)],
                            env=env, capture_output=True, text=True, timeout=300, check=False)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
         "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "tailclip.cli",
         *_args(tmp_path, "ddp", data, tiny_vit_json, method)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es)" in ddp.stderr

    rows_1, rows_2 = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert len(rows_1) == len(rows_2) == 2
    for r1, r2 in zip(rows_1, rows_2):
        assert float(r1["lr"]) == float(r2["lr"])
        assert float(r1["loss"]) == pytest.approx(float(r2["loss"]), rel=1e-4, abs=1e-5)
        assert float(r1["train_acc"]) == pytest.approx(float(r2["train_acc"]), abs=1e-6)
        assert float(r1["val_top1"]) == pytest.approx(float(r2["val_top1"]), abs=1e-6)
    a = json.loads((tmp_path / "single" / "results.json").read_text())
    b = json.loads((tmp_path / "ddp" / "results.json").read_text())
    for split in ("val", "test"):
        assert a["splits"][split]["num_samples"] == b["splits"][split]["num_samples"]  # no duplicated padding
        assert a["splits"][split]["top1"] == pytest.approx(b["splits"][split]["top1"], abs=1e-6)
        assert a["splits"][split]["nll"] == pytest.approx(b["splits"][split]["nll"], rel=1e-3)
