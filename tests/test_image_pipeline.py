"""The image pipeline of training: one DataLoader with persistent workers for the whole run (each epoch's own
transform still reaches them), data.decode=gpu's decode-and-crop path (run here on the CPU: the same code with
another device), and model.memory_format (channels-last ResNet towers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tailclip.config import load_config
from tailclip.contract import FitContext
from tailclip.engine.image_batches import ImageBatches
from tailclip.engine.trainer import epoch_order, plan_epoch
from tailclip.errors import ConfigError, CorruptImageError
from tailclip.methods.loading import build


def jpeg_folder(root: Path, per_class: int = 6, size: tuple[int, int] = (60, 45)) -> Path:
    """<root>/{train,val,test}/class_<c>/*.jpg, smooth colour fields (JPEG-friendly) of 60x45 px."""
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for c in range(3):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class if split == "train" else 2):
                small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
                Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(folder / f"{i}.jpg", quality=95)
    return root


def batches_of(tiny_vit_json: Path, data: Path, tmp_path: Path, overrides: list[str], epochs: tuple[int, ...],
               crop_device: torch.device | None = None) -> tuple[list[list], ImageBatches]:
    cfg = load_config(None, ["method=lift", f"model.name=json:{tiny_vit_json}", "data.name=image-folder",
                             f"data.root={data}", "train.batch_size=8", "train.epochs=5", *overrides])
    task, method = build(cfg, torch.device("cpu"))
    source = ImageBatches(method, FitContext(cfg, task.guarded(), tmp_path, torch.device("cpu")), cfg.train,
                          crop_device=crop_device)
    out = []
    for epoch in epochs:
        method.on_epoch_start(epoch, cfg.train.epochs)
        plan = plan_epoch(epoch_order(len(source), cfg.train.seed, epoch), 8, 1, 0, 1)
        out.append(list(source.epoch(epoch, plan)))
    return out, source


def test_workers_persist_across_epochs_and_see_each_epochs_transform(tiny_vit_json: Path, tmp_path: Path) -> None:
    data = jpeg_folder(tmp_path / "data")
    # LIFT+'s crop schedule: the transform changes per epoch
    square = ["lift.crop=square_schedule", "lift.crop_min_scale=0.1"]
    main, _ = batches_of(tiny_vit_json, data, tmp_path, [*square, "data.num_workers=0"], (0, 4))
    cfg_workers = [*square, "data.num_workers=2"]
    pids = []
    _, source = batches_of(tiny_vit_json, data, tmp_path, cfg_workers, ())
    for epoch, expected in zip((0, 4), main, strict=True):
        source.method.on_epoch_start(epoch, 5)
        plan = plan_epoch(epoch_order(len(source), 0, epoch), 8, 1, 0, 1)
        got = list(source.epoch(epoch, plan))
        pids.append([w.pid for w in source._loader._iterator._workers])
        for (x, y), (xe, ye) in zip(got, expected, strict=True):
            assert torch.equal(y, ye) and torch.equal(x, xe)  # workers cut the main process's crops, epoch 4's too
    assert pids[0] == pids[1] and len(pids[0]) == 2  # the same worker processes served both epochs
    # epoch 4 of the schedule crops >= 85 % of the image, epoch 0 >= 10 %: a stale transform would show
    assert not torch.equal(main[0][0][0], main[1][0][0])
    source.close()
    assert source._loader is None


def test_gpu_decode_path_cuts_the_pil_paths_crops(tiny_vit_json: Path, tmp_path: Path) -> None:
    data = jpeg_folder(tmp_path / "data")
    (pil,), _ = batches_of(tiny_vit_json, data, tmp_path, ["lift.crop_min_scale=0.3"], (1,))
    (tensor,), source = batches_of(tiny_vit_json, data, tmp_path, ["lift.crop_min_scale=0.3"], (1,),
                                   crop_device=torch.device("cpu"))
    assert len(pil) == len(tensor) == 3
    std = float(torch.tensor(source.method.backbone.preprocess.std).min())
    for (x, y), (xt, yt) in zip(pil, tensor, strict=True):
        assert torch.equal(y, yt) and x.shape == xt.shape == (len(y), 3, 32, 32)
        diff = (x - xt).abs() * std * 255  # in uint8 levels: same boxes and flips, resampler rounding only
        assert diff.mean() < 1.0 and diff.max() < 12.0


def test_gpu_decode_reads_png_bmp_and_names_or_skips_a_broken_file(tiny_vit_json: Path, tmp_path: Path) -> None:
    data = jpeg_folder(tmp_path / "data")
    Image.open(data / "train" / "class_1" / "3.jpg").save(data / "train" / "class_1" / "3b.png")  # not a JPEG
    Image.open(data / "train" / "class_0" / "2.jpg").save(data / "train" / "class_0" / "2b.bmp")  # PIL's only
    bad = data / "train" / "class_2" / "0.jpg"
    bad.write_bytes(b"\xff\xd8 truncated, not a JPEG body")
    cpu = torch.device("cpu")
    with pytest.raises(CorruptImageError, match="0.jpg"):
        batches_of(tiny_vit_json, data, tmp_path, [], (0,), crop_device=cpu)
    (got,), source = batches_of(tiny_vit_json, data, tmp_path, ["data.on_bad_image=skip"], (0,), crop_device=cpu)
    assert sum(len(y) for _, y in got) == 19  # 20 train files, the broken one left out, the PNG and BMP kept
    assert source.skipped == {str(bad)}


def test_gpu_decode_needs_cuda(tiny_vit_json: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.decode=gpu"):
        batches_of(tiny_vit_json, jpeg_folder(tmp_path / "data"), tmp_path, ["data.decode=gpu"], ())
    with pytest.raises(ConfigError, match="data.decode"):
        load_config(None, ["data.decode=nvjpeg"])


def test_resnet_towers_go_channels_last_with_the_same_outputs(tiny_rn_json: Path, tiny_vit_json: Path) -> None:
    from tailclip.backbones import create_backbone

    torch.manual_seed(0)
    auto = create_backbone(f"json:{tiny_rn_json}")
    torch.manual_seed(0)
    plain = create_backbone(f"json:{tiny_rn_json}", memory_format="contiguous")
    convs = [m.weight for m in auto.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert any(not w.is_contiguous() for w in convs)  # 3x3 kernels really changed layout (1x1 ones are both)
    assert all(m.weight.is_contiguous() for m in plain.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(auto.encode_image(x).proj, plain.encode_image(x).proj, rtol=1e-4, atol=1e-5)
    vit = create_backbone(f"json:{tiny_vit_json}")  # auto leaves ViTs contiguous
    assert all(m.weight.is_contiguous() for m in vit.modules() if isinstance(m, torch.nn.Conv2d))
    with pytest.raises(ConfigError, match="model.memory_format"):
        load_config(None, ["model.memory_format=nhwc"])


def test_validation_loader_and_its_workers_serve_every_epoch(tiny_vit_json: Path, tmp_path: Path) -> None:
    from tailclip.engine.evaluate import predict

    data = jpeg_folder(tmp_path / "data")
    cfg = load_config(None, ["method=lift", f"model.name=json:{tiny_vit_json}", "data.name=image-folder",
                             f"data.root={data}", "data.num_workers=1"])
    task, method = build(cfg, torch.device("cpu"))
    ctx = FitContext(cfg, task.guarded(), tmp_path, torch.device("cpu"))
    loaders: dict = {}
    first = predict(method, ctx, "val", tte="none", loaders=loaders)
    loader = loaders[("val", "none")][0]
    pids = [w.pid for w in loader._iterator._workers]
    second = predict(method, ctx, "val", tte="none", loaders=loaders)
    assert loaders[("val", "none")][0] is loader and [w.pid for w in loader._iterator._workers] == pids
    plain = predict(method, ctx, "val", tte="none")  # no cache: a fresh loader, the same logits
    assert torch.equal(first.logits, second.logits) and torch.equal(first.logits, plain.logits)
    assert first.logits.shape == (6, 3)
