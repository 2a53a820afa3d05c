"""Feature extraction under `torchrun --nproc_per_node=2` (gloo on CPU): each rank extracts a contiguous block of
whole batches, rank 0 assembles the cache entry; every tensor equals a single-process extraction bit for bit, and a
rank that fails midway leaves no entry behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from helpers import free_port, make_image_folder
from PIL import Image
from safetensors.torch import load_file

from tailclip.features.extract import batch_block


def test_batch_blocks_cover_the_batches_of_one_process() -> None:
    for n, bs, world in ((27, 4, 2), (27, 4, 3), (5, 8, 2), (64, 8, 4)):
        blocks = [batch_block(n, bs, r, world) for r in range(world)]
        assert np.concatenate(blocks).tolist() == list(range(n))
        assert all(len(b) == 0 or b[0] % bs == 0 for b in blocks)  # every block starts at a batch boundary


def _extract(tmp_path: Path, cache: Path, data: Path, model: Path, ranks: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TAILCLIP_CACHE": str(cache)}
    args = ["extract", "--dataset", "image-folder", "--root", str(data), "--model", f"json:{model}",
            "--splits", "train,test", "--views", "2", "eval.batch_size=4"]
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--nnodes=1",
                                      "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    cmd = [sys.executable, *launcher, "-m", "tailclip.cli", *args] if launcher else \
        [sys.executable, "-m", "tailclip.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


def _entries(cache: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every complete entry of a cache: relative folder -> its tensors."""
    out = {}
    for manifest in cache.rglob("manifest.json"):
        files = json.loads(manifest.read_text())["files"]
        folder = manifest.parent
        out[str(folder.relative_to(cache))] = {name: load_file(str(folder / f["file"]))[name]
                                               for name, f in files.items()}
    return out


def test_two_ranks_extract_bit_identical_entries(tmp_path: Path, tiny_vit_json: Path) -> None:
    data = make_image_folder(tmp_path / "data")
    single = _extract(tmp_path, tmp_path / "single", data, tiny_vit_json, 1)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _extract(tmp_path, tmp_path / "ddp", data, tiny_vit_json, 2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = _entries(tmp_path / "single"), _entries(tmp_path / "ddp")
    assert len(a) == 4 and set(a) == set(b)  # train, test, and two augmented views of train
    for entry, tensors in a.items():
        assert set(tensors) == set(b[entry])
        for name, t in tensors.items():
            assert torch.equal(t, b[entry][name]), (entry, name)
    assert not list((tmp_path / "ddp").rglob("shard-*"))  # the shards were removed once assembled


def test_a_failing_rank_leaves_no_entry(tmp_path: Path, tiny_vit_json: Path) -> None:
    """A corrupt image in the second rank's block: that rank stops with the error, the job fails, and the cache
    holds no entry of the split (no manifest); shard files are cleaned by the next build."""
    data = make_image_folder(tmp_path / "data")
    train = sorted((data / "train").rglob("*.png"))
    Path(train[-1]).write_bytes(b"not an image")  # sorted last: in rank 1's block
    res = _extract(tmp_path, tmp_path / "cache", data, tiny_vit_json, 2)
    assert res.returncode != 0
    assert not any("train" in str(m) for m in (tmp_path / "cache").rglob("manifest.json"))
    Image.new("RGB", (32, 32)).save(train[-1], format="PNG")
    again = _extract(tmp_path, tmp_path / "cache", data, tiny_vit_json, 1)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not list((tmp_path / "cache").rglob("shard-*"))
