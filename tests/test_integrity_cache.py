"""Feature cache integrity (issue 14): image contents are part of the key, stored tensors carry checksums."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tailclip.config import DataConfig
from tailclip.data.registry import build_task
from tailclip.features import FeatureCache, extract, split_features
from tailclip.features import cache as cache_mod


def write_images(root: Path, seed: int, per_class: int = 5) -> None:
    """Three class folders of solid-ish colour images; `seed` changes every pixel, not the file names."""
    rng = np.random.default_rng(seed)
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, 3)
        for i in range(per_class):
            arr = np.clip(base + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / f"c{c}" / f"{i}.png")


def test_replaced_image_contents_rebuild_the_entry(tiny_backbone, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "imgs"
    write_images(root, seed=0)
    cache = FeatureCache(tmp_path / "cache")
    task = build_task(DataConfig(name="image-folder", root=str(root)))
    old = split_features(tiny_backbone, task, "train", cache=cache)
    old_proj = old.proj.clone()

    write_images(root, seed=1)  # same names, new pixels
    task = build_task(DataConfig(name="image-folder", root=str(root)))
    with caplog.at_level(logging.WARNING, logger="tailclip.features"):
        new = split_features(tiny_backbone, task, "train", cache=cache)
    fresh = split_features(tiny_backbone, task, "train", cache=FeatureCache(tmp_path / "fresh"))
    assert not torch.allclose(new.proj, old_proj)
    assert torch.equal(new.proj, fresh.proj) and torch.equal(new.labels, fresh.labels)
    assert any("stale" in r.getMessage() and "content" in r.getMessage() for r in caplog.records)

    # the per-dataset index holds size, mtime and hash of every file: unchanged files are not read again
    index = json.loads(next((tmp_path / "cache" / "_content").glob("*.json")).read_text())
    assert len(index) == len(task.split("train")) and all(len(v) == 3 for v in index.values())
    calls: list[str] = []
    orig = extract._file_hash
    monkeypatch.setattr(extract, "_file_hash", lambda p: calls.append(p) or orig(p))
    split_features(tiny_backbone, task, "train", cache=cache)
    assert calls == []


def test_a_file_rewritten_keeping_size_and_mtime_needs_the_hash_check(tiny_backbone, tmp_path: Path) -> None:
    """`cp -p` / `rsync -t` keep size and mtime: the default stat check serves the old features (documented),
    data.content_check=hash and verify-data --hash notice the new bytes and correct the index."""
    import os

    from tailclip.features.extract import rehash_dataset

    root = tmp_path / "imgs"
    write_images(root, seed=0)
    cache = FeatureCache(tmp_path / "cache")
    task = build_task(DataConfig(name="image-folder", root=str(root)))
    old = split_features(tiny_backbone, task, "train", cache=cache).proj.clone()
    files = sorted(root.rglob("*.png"))
    stats = {f: f.stat() for f in files}
    write_images(tmp_path / "other", seed=1)
    for f in files:  # new pixels under the old name, the old size and mtime restored (PNG sizes differ: pad)
        data = (tmp_path / "other" / f.relative_to(root)).read_bytes()[: stats[f].st_size]
        f.write_bytes(data.ljust(stats[f].st_size, b"\0"))
        os.utime(f, ns=(stats[f].st_atime_ns, stats[f].st_mtime_ns))
    assert all(f.stat().st_size == stats[f].st_size and f.stat().st_mtime_ns == stats[f].st_mtime_ns for f in files)
    stale = split_features(tiny_backbone, task, "train", cache=cache).proj
    assert torch.equal(stale, old)  # the stat check cannot see it
    assert rehash_dataset(task, cache)["train"] == len(task.split("train"))  # (test files were never indexed)
    assert sum(rehash_dataset(task, cache).values()) == 0  # the index now holds the new hashes


def test_content_check_hash_rehashes_every_file(tiny_backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    root = tmp_path / "imgs"
    write_images(root, seed=0)
    cache = FeatureCache(tmp_path / "cache")
    task = build_task(DataConfig(name="image-folder", root=str(root)))
    split_features(tiny_backbone, task, "train", cache=cache)
    calls: list[str] = []
    orig = extract._file_hash
    monkeypatch.setattr(extract, "_file_hash", lambda p: calls.append(p) or orig(p))
    split_features(tiny_backbone, task, "train", cache=cache, content_check="hash")
    assert len(calls) == len(task.split("train"))


def test_scrambled_tensor_file_is_rebuilt_with_a_warning(tiny_backbone, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "imgs"
    write_images(root, seed=0)
    cache = FeatureCache(tmp_path / "cache")
    task = build_task(DataConfig(name="image-folder", root=str(root)))
    fs = split_features(tiny_backbone, task, "train", cache=cache)
    good = fs.proj.clone()
    manifest = json.loads((fs.path / "manifest.json").read_text())
    path = fs.path / manifest["files"]["proj"]["file"]
    size = path.stat().st_size
    raw = bytearray(path.read_bytes())
    (header_len,) = np.frombuffer(bytes(raw[:8]), dtype="<u8")
    start = 8 + int(header_len)
    raw[start:] = bytes(reversed(raw[start:]))  # same size, same header, scrambled data
    del fs
    path.write_bytes(bytes(raw))
    assert path.stat().st_size == size
    cache_mod._VERIFIED.clear()  # a new process (this one verified the file when it built it)

    with caplog.at_level(logging.WARNING, logger="tailclip.features"):
        again = split_features(tiny_backbone, task, "train", cache=cache)
    assert torch.equal(again.proj, good)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checksum mismatch" in m and "proj" in m and str(again.path) in m for m in warnings), warnings
    # the rebuilt entry is verified once, then read without re-hashing
    cache_mod._VERIFIED.clear()
    split_features(tiny_backbone, task, "train", cache=cache)
    assert len(cache_mod._VERIFIED) == 4  # pre_proj, proj, labels, indices


def test_cache_files_follow_the_umask(tiny_backbone, tmp_path: Path) -> None:
    """Tensor files were created 0600 (mkstemp): a cache shared by a team must be readable by its other users."""
    import os

    from tailclip.io import file_mode

    root = tmp_path / "imgs"
    write_images(root, seed=0)
    task = build_task(DataConfig(name="image-folder", root=str(root)))
    old = os.umask(0o022)
    try:
        fs = split_features(tiny_backbone, task, "train", cache=FeatureCache(tmp_path / "cache"))
        files = list(fs.path.glob("*.safetensors"))
        assert files and {f.stat().st_mode & 0o777 for f in files} == {file_mode()} == {0o644}
    finally:
        os.umask(old)
