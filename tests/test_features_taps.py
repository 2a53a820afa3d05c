"""Feature cache contract: named tensors (taps) per image, storage dtypes, K augmented views, what was
extracted as part of the key (extension instead of partial reads), memory-mapped reads without copies."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import CountingBackbone, color_task

from tailclip.config import FeatureOptions
from tailclip.data.base import ArrayImages, Split
from tailclip.data.transforms import eval_transform
from tailclip.errors import ConfigError, CorruptImageError, UnknownNameError
from tailclip.features import AugSpec, FeatureCache, method_features, method_views, split_features, split_views
from tailclip.features.extract import SeededViewImages


@pytest.fixture(scope="module")
def synthetic_vit():
    from tailclip.backbones import create_backbone

    return create_backbone("synthetic:tiny-clip")


@pytest.fixture(scope="module")
def tiny_rn(tiny_rn_json: Path):
    from tailclip.backbones import create_backbone

    torch.manual_seed(0)
    return create_backbone(f"json:{tiny_rn_json}")


def _direct(backbone, task, split: str, rows: list[int], taps: list[str]):
    tf = eval_transform(backbone.preprocess)
    x = torch.stack([tf(task.splits[split].images.load(i)) for i in rows])
    with torch.no_grad():
        return backbone.encode_image(x, taps=taps)


def test_vit_taps_equal_a_direct_forward(synthetic_vit, tmp_path: Path) -> None:
    task = color_task()
    taps = ["blocks.1", "blocks.3.mlp"]
    fs = split_features(synthetic_vit, task, "val", taps=taps, batch_size=10, cache=FeatureCache(tmp_path))
    tokens = (32 // synthetic_vit.patch_size) ** 2 + 1
    assert fs.names == ["blocks.1", "blocks.3.mlp", "pre_proj", "proj"]
    assert fs.get("blocks.1").shape == (24, tokens, synthetic_vit.width) and fs.get("blocks.1").dtype == torch.float32
    ref = _direct(synthetic_vit, task, "val", [0, 7, 23], taps)
    for name in taps:
        torch.testing.assert_close(fs.get(name)[[0, 7, 23]], ref.taps[name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fs.proj[[0, 7, 23]], ref.proj, rtol=1e-5, atol=1e-5)
    with pytest.raises(UnknownNameError, match=r"'blocks.2'.*holds: blocks.1, blocks.3.mlp, pre_proj, proj"):
        fs.get("blocks.2")


def test_resnet_taps_equal_a_direct_forward(tiny_rn, tmp_path: Path) -> None:
    task = color_task(per_class=2, size=64)
    fs = split_features(tiny_rn, task, "train", taps=["layer2", "layer4"], cache=FeatureCache(tmp_path))
    assert fs.get("layer2").shape == (8, 128, 8, 8) and fs.get("layer4").shape == (8, 512, 2, 2)
    ref = _direct(tiny_rn, task, "train", [1, 6], ["layer2", "layer4"])
    torch.testing.assert_close(fs.get("layer2")[[1, 6]], ref.taps["layer2"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fs.get("layer4")[[1, 6]], ref.taps["layer4"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fs.proj[[1, 6]], ref.proj, rtol=1e-5, atol=1e-5)


def test_half_storage_round_trips(synthetic_vit, tmp_path: Path) -> None:
    task = color_task(per_class=2)
    cache = FeatureCache(tmp_path)
    full = split_features(synthetic_vit, task, "test", taps=["blocks.2"], cache=cache)
    for dtype, want in (("float16", torch.float16), (torch.bfloat16, torch.bfloat16)):
        fs = split_features(synthetic_vit, task, "test", taps=["blocks.2"], dtype=dtype, cache=cache)
        assert fs.get("blocks.2").dtype == want and fs.proj.dtype == torch.float32  # proj/pre_proj stay fp32
        assert torch.equal(fs.get("blocks.2"), full.get("blocks.2").to(want))  # cast, stored, read back exactly
        assert json.loads((fs.path / "manifest.json").read_text())["key"]["tensors"]["blocks.2"] == str(want)[6:]
    with pytest.raises(ConfigError, match="int8"):
        split_features(synthetic_vit, task, "test", taps=["blocks.2"], dtype="int8", cache=cache)


def test_missing_tensors_extend_the_entry(tiny_backbone, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An entry lacking a requested tap is never returned without it: it is re-extracted with the union."""
    caplog.set_level(logging.INFO, logger="tailclip.features")
    task = color_task(per_class=2)
    cache = FeatureCache(tmp_path)
    bb = CountingBackbone(tiny_backbone)
    plain = split_features(bb, task, "train", cache=cache)
    assert bb.calls == 1 and plain.names == ["pre_proj", "proj"]
    with_tap = split_features(bb, task, "train", taps=["blocks.0"], cache=cache)
    assert bb.calls == 2 and "lacks tensor(s) ['blocks.0']" in caplog.text
    assert with_tap.get("blocks.0").shape[0] == 8 and torch.equal(with_tap.proj, plain.proj)
    with_other = split_features(bb, task, "train", taps=["blocks.1.attn"], cache=cache)
    assert bb.calls == 3 and with_other.names == ["blocks.1.attn", "pre_proj", "proj"]  # exactly what was asked
    stored = json.loads((with_other.path / "manifest.json").read_text())["key"]["tensors"]
    assert set(stored) == {"blocks.0", "blocks.1.attn", "pre_proj", "proj"}  # extended, not replaced
    for taps in ((), ["blocks.0"], ["blocks.0", "blocks.1.attn"]):  # every subset is now a hit
        split_features(bb, task, "train", taps=taps, cache=cache)
    assert bb.calls == 3
    # the same tap in another storage dtype is not what is stored: re-extracted
    half = split_features(bb, task, "train", taps=["blocks.0"], dtype="float16", cache=cache)
    assert bb.calls == 4 and half.get("blocks.0").dtype == torch.float16
    # a tap file that went missing makes the entry stale, not a partial read
    next(half.path.glob("blocks.1.attn-*.safetensors")).unlink()
    again = split_features(bb, task, "train", taps=["blocks.1.attn"], cache=cache)
    assert bb.calls == 5 and "stale" in caplog.text
    torch.testing.assert_close(again.get("blocks.1.attn"), with_other.get("blocks.1.attn"))


def test_bad_requests_fail_before_extracting(tiny_backbone, tmp_path: Path) -> None:
    task = color_task(per_class=1)
    bb = CountingBackbone(tiny_backbone)
    with pytest.raises(ConfigError, match=r"unknown tap\(s\) \['blocks.9'\].*offers: blocks.0, blocks.0.attn"):
        split_features(bb, task, "train", taps=["blocks.9"], cache=FeatureCache(tmp_path))
    with pytest.raises(ConfigError, match="eval view"):
        split_features(bb, task, "train", transform=AugSpec(), cache=FeatureCache(tmp_path))
    with pytest.raises(ConfigError, match="AugSpec"):
        split_features(bb, task, "train", view="aug0", transform=lambda im: im, cache=FeatureCache(tmp_path))
    assert bb.calls == 0


def test_k_views_differ_and_are_reproducible(tiny_backbone, tmp_path: Path) -> None:
    task = color_task(per_class=3)
    a, b = (split_views(tiny_backbone, task, "train", 3, taps=["blocks.3"], batch_size=5,
                        cache=FeatureCache(tmp_path / name)) for name in ("a", "b"))
    c = split_views(tiny_backbone, task, "train", 3, batch_size=12, cache=FeatureCache(tmp_path / "c"))
    assert a.k == 3 and len(a) == 12 and torch.equal(a.labels, torch.as_tensor(task.splits["train"].labels))
    for k in range(3):  # same seed -> identical views; another batch size -> the same crops (float noise only)
        assert torch.equal(a[k].proj, b[k].proj) and torch.equal(a[k].get("blocks.3"), b[k].get("blocks.3"))
        torch.testing.assert_close(a[k].proj, c[k].proj, rtol=1e-5, atol=1e-5)
    for i, j in ((0, 1), (0, 2), (1, 2)):  # every image differs between views
        assert (a[i].proj - a[j].proj).abs().amax(dim=1).min() > 1e-4
    other_seed = split_views(tiny_backbone, task, "train", 2, seed=7, cache=FeatureCache(tmp_path / "a"))
    assert not torch.allclose(other_seed[0].proj, a[0].proj)
    # stacked (K, N, D) and per-sample gathering agree with the views
    stacked = a.stack("proj")
    assert stacked.shape == (3, 12, tiny_backbone.embed_dim) and torch.equal(stacked[2], a[2].proj)
    view_ids, rows = torch.tensor([2, 0, 1, 2]), torch.tensor([0, 5, 5, 11])
    assert torch.equal(a.gather("blocks.3", view_ids, rows),
                       torch.stack([a[v].get("blocks.3")[r] for v, r in zip(view_ids.tolist(), rows.tolist())]))


def test_augmentation_is_per_image_and_overridable(tiny_backbone, tmp_path: Path) -> None:
    from tailclip.data.base import LabeledImages

    task = color_task(per_class=2)
    split = task.splits["train"]
    tf = AugSpec().build(tiny_backbone.preprocess)
    ds = SeededViewImages(LabeledImages(split, tf), seed=0, view=1)
    forward = [ds[i][0] for i in range(len(ds))]
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    backward = [ds[i][0] for i in reversed(range(len(ds)))][::-1]  # access order does not matter
    assert all(torch.equal(x, y) for x, y in zip(forward, backward))
    assert torch.equal(torch.random.get_rng_state(), state), "the caller's RNG must be left untouched"
    # a per-request transform: recorded in the key, its own folder, both entries stay hits
    cache = FeatureCache(tmp_path)
    bb = CountingBackbone(tiny_backbone)
    tip = split_features(bb, task, "train", view="aug0", cache=cache)
    ldc = split_features(bb, task, "train", view="aug0", transform=AugSpec(scale=(0.8, 1.0), interpolation="bicubic"),
                         cache=cache)
    assert tip.path != ldc.path and not torch.allclose(tip.proj, ldc.proj)
    key = json.loads((ldc.path / "manifest.json").read_text())["key"]
    assert key["transform"] == "rrc32(scale=(0.8,1),bicubic)+hflip,seed=0" and key["view"] == "aug0"
    split_features(bb, task, "train", view="aug0", cache=cache)
    assert bb.calls == 2


def _file_mappings() -> dict[str, list[tuple[int, int]]]:
    maps: dict[str, list[tuple[int, int]]] = {}
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            maps.setdefault(parts[5], []).append((lo, hi))
    return maps


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_reads_are_memory_mapped_not_copied(tiny_backbone, tmp_path: Path) -> None:
    """Every tensor of a read entry lies inside a mapping of its own file (a copy would live on the heap)."""
    task = color_task(per_class=2)
    cache = FeatureCache(tmp_path)
    bb = CountingBackbone(tiny_backbone)
    split_features(bb, task, "train", taps=["blocks.1"], dtype="float16", batch_size=3, cache=cache)  # 3 batches
    fs = split_features(bb, task, "train", taps=["blocks.1"], dtype="float16", cache=cache)
    assert bb.calls == 3, "the second call must be a read"
    maps = _file_mappings()
    manifest = json.loads((fs.path / "manifest.json").read_text())
    for name, t in {**fs.tensors, "labels": fs.labels, "indices": fs.indices}.items():
        path = str(fs.path / manifest["files"][name]["file"])
        lo_hi = maps.get(path, [])
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        assert any(lo <= start and end <= hi for lo, hi in lo_hi), f"{name} is not a view of {path}"
    copied = fs.proj.clone()  # the check itself can fail: a copy is not inside the file's mapping
    assert not any(lo <= copied.data_ptr() < hi for spans in maps.values() for lo, hi in spans)


def _method_ctx(backbone, task, cache: Path):
    cfg = SimpleNamespace(method="probe", eval=SimpleNamespace(tte="none", batch_size=4, precision="fp32"),
                          data=SimpleNamespace(num_workers=0, on_bad_image="error", content_check="stat"))
    method = SimpleNamespace(backbone=backbone, cfg=FeatureOptions(feature_cache=str(cache)))
    return method, SimpleNamespace(cfg=cfg, task=task, device=torch.device("cpu"))


def test_method_side_calls(tiny_backbone, tmp_path: Path) -> None:
    task = color_task(per_class=2)
    method, ctx = _method_ctx(tiny_backbone, task, tmp_path / "m")
    fs = method_features(method, ctx, "train", taps=["blocks.2"], dtype="float16")
    assert fs.path.is_relative_to(tmp_path / "m") and fs.get("blocks.2").dtype == torch.float16
    views = method_views(method, ctx, "train", 2, transform=AugSpec(scale=(0.8, 1.0)))
    direct = split_features(tiny_backbone, task, "train", view="aug1", transform=AugSpec(scale=(0.8, 1.0)),
                            cache=FeatureCache(tmp_path / "other"))
    assert torch.equal(views[1].proj, direct.proj)


class _BrokenAt(ArrayImages):
    """Array images of which some cannot be decoded."""

    def __init__(self, array, name: str, broken: set[int]) -> None:
        super().__init__(array, name)
        self.broken = broken

    def load(self, index: int):
        if index in self.broken:
            raise CorruptImageError(self.ident(index), "test")
        return super().load(index)


def test_views_and_skips_do_not_depend_on_workers(tiny_backbone, tmp_path: Path) -> None:
    """Crops are drawn per image, so DataLoader workers give the same view; skipped images are found from the
    rows themselves (workers' own `bad` lists never reach the main process)."""
    task = color_task(per_class=3)
    train = task.splits["train"]
    task.splits["train"] = Split(_BrokenAt(train.images.array, "arr", {3, 5}), train.labels)
    sets = [split_features(tiny_backbone, task, "train", view="aug2", num_workers=w, batch_size=4,
                           on_bad_image="skip", cache=FeatureCache(tmp_path / str(w))) for w in (0, 2)]
    for fs in sets:
        assert fs.skipped == ["arr[3]", "arr[5]"] and fs.indices.tolist() == [0, 1, 2, 4, *range(6, 12)]
    torch.testing.assert_close(sets[0].proj, sets[1].proj, rtol=1e-5, atol=1e-5)
