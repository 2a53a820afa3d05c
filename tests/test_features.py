"""Feature cache: hit / miss / invalidation, augmented views, concurrent extraction by two processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import CountingBackbone, color_task, register_color_dataset

from tailclip.features import CacheKey, FeatureCache, split_features


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TAILCLIP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_hit_miss_and_values(tiny_backbone, cache_dir: Path) -> None:
    from tailclip.data.transforms import eval_transform

    task = color_task()
    bb = CountingBackbone(tiny_backbone)
    first = split_features(bb, task, "train", batch_size=8)
    assert bb.calls == 3 and len(first) == 24
    second = split_features(bb, task, "train", batch_size=8)
    assert bb.calls == 3, "a cache hit must not run the backbone"
    assert torch.equal(first.proj, second.proj)
    assert torch.equal(second.labels, torch.as_tensor(task.splits["train"].labels))
    assert first.path is not None and first.path.is_relative_to(cache_dir)
    # the cached rows are what the backbone gives on the eval transform
    tf = eval_transform(tiny_backbone.preprocess)
    x = torch.stack([tf(task.splits["train"].images.load(i)) for i in (0, 5)])
    with torch.no_grad():
        ref = tiny_backbone.encode_image(x)
    torch.testing.assert_close(second.proj[[0, 5]], ref.proj.float())
    torch.testing.assert_close(second.pre_proj[[0, 5]], ref.pre_proj.float())
    # another split, or the same split with different content, is a miss
    split_features(bb, task, "val", batch_size=8)
    assert bb.calls == 6
    changed = color_task(seed=1)  # same identifiers, but labels differ -> new split fingerprint
    changed.splits["train"].labels[:] = changed.splits["train"].labels[::-1]
    split_features(bb, changed, "train", batch_size=8)
    assert bb.calls == 9


def test_stale_entries_are_rebuilt(tiny_backbone, cache_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    task = color_task()
    bb = CountingBackbone(tiny_backbone)
    fs = split_features(bb, task, "test", batch_size=32)
    manifest_path = fs.path / "manifest.json"
    # 1. manifest recorded under other preprocessing -> mismatch, rebuilt
    manifest = json.loads(manifest_path.read_text())
    manifest["key"]["preprocess"]["image_size"] = 999
    manifest_path.write_text(json.dumps(manifest))
    again = split_features(bb, task, "test", batch_size=32)
    assert bb.calls == 2 and "stale" in caplog.text and "preprocess" in caplog.text
    torch.testing.assert_close(again.proj, fs.proj)
    # 2. a truncated file -> rebuilt, and the old files are gone
    shard = next(fs.path.glob("proj-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    split_features(bb, task, "test", batch_size=32)
    assert bb.calls == 3
    assert len(list(fs.path.glob("*.safetensors"))) == 4 and not shard.exists()
    # 3. other precision: same folder, different key -> rebuilt
    split_features(bb, task, "test", batch_size=32, precision="amp_bf16")
    assert bb.calls == 4
    # 4. an entry of the previous format (no per-tensor files, version 1) -> rebuilt, saying why
    manifest = json.loads(manifest_path.read_text())
    manifest["key"]["version"] = 1
    del manifest["key"]["tensors"], manifest["files"]
    manifest_path.write_text(json.dumps(manifest))
    caplog.clear()
    split_features(bb, task, "test", batch_size=32, precision="amp_bf16")
    assert bb.calls == 5 and "differs in ['version']" in caplog.text


def test_augmented_views_are_reproducible(tiny_backbone, tmp_path: Path) -> None:
    task = color_task(per_class=3)
    a0 = split_features(tiny_backbone, task, "train", view="aug0", cache=FeatureCache(tmp_path / "a"))
    a0_again = split_features(tiny_backbone, task, "train", view="aug0", cache=FeatureCache(tmp_path / "b"))
    a1 = split_features(tiny_backbone, task, "train", view="aug1", cache=FeatureCache(tmp_path / "a"))
    ev = split_features(tiny_backbone, task, "train", view="eval", cache=FeatureCache(tmp_path / "a"))
    torch.testing.assert_close(a0.proj, a0_again.proj)
    assert not torch.allclose(a0.proj, a1.proj) and not torch.allclose(a0.proj, ev.proj)
    assert len({a0.path, a1.path, ev.path}) == 3


def test_batches_stream_into_one_file_per_tensor(tmp_path: Path) -> None:
    """Batches are appended to one file per tensor: every tensor reads back whole, from a single mapping."""
    key = CacheKey("bb", "ds", "train", "fp", "eval")
    cache = FeatureCache(tmp_path)

    def build(k: CacheKey):
        assert k == key
        for start in range(0, 12, 4):
            idx = torch.arange(start, start + 4)
            yield {"proj": idx[:, None].float().repeat(1, 3), "pre_proj": idx[:, None].float().repeat(1, 2),
                   "labels": idx % 3, "indices": idx}

    fs = cache.get_or_build(key, build)
    assert sorted(p.name.split("-")[0] for p in fs.path.glob("*.safetensors")) == ["indices", "labels", "pre_proj",
                                                                                   "proj"]
    assert fs.proj.shape == (12, 3) and fs.pre_proj.shape == (12, 2)
    assert torch.equal(fs.proj[:, 0], torch.arange(12.0)) and torch.equal(fs.indices, torch.arange(12))
    assert torch.equal(fs.labels, torch.arange(12) % 3)


WORKER = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    from tailclip.features import CacheKey, FeatureCache

    root, log = sys.argv[1], Path(sys.argv[2])

    def build(key):
        with log.open("a") as fh:
            fh.write("build\\n")
        for i in range(3):
            time.sleep(0.3)  # slow extraction: the other process arrives while this one holds the lock
            idx = torch.arange(i * 10, i * 10 + 10)
            yield {"proj": torch.sin(idx[:, None] * torch.arange(1, 9)), "pre_proj": torch.cos(idx[:, None] * 1.0),
                   "labels": idx % 4, "indices": idx}

    fs = FeatureCache(root).get_or_build(CacheKey("bb", "ds", "train", "fp", "eval"), build)
    print(len(fs), float(fs.proj.sum()))
    """
)


def test_two_processes_extract_once(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    log = tmp_path / "builds.log"
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(log)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert log.read_text().count("build") == 1, "the second process must reuse the first one's extraction"
    assert outs[0][0] == outs[1][0] and outs[0][0].startswith("30 ")
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers


def test_extract_command(tiny_vit_json: Path, tmp_path: Path) -> None:
    from tailclip.config import load_config
    from tailclip.features import extract_from_config

    register_color_dataset()
    cfg = load_config(None, [f"model.name=json:{tiny_vit_json}", "data.name=test-colors", "method=linear_probe",
                             f"linear_probe.feature_cache={tmp_path / 'c'}"])
    paths = extract_from_config(cfg, ["train", "test", "nope"], views=2)
    assert len(paths) == 4 and all((p / "manifest.json").is_file() for p in paths)
    assert sorted(p.name.split("-")[0] for p in paths) == ["aug0", "aug1", "eval", "eval"]
