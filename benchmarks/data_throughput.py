"""Images/s of the image-decoding paths on a generated folder of 500x375 JPEGs (ImageNet's typical size):
PIL decode + RandomResizedCrop(224) + flip + normalize on the originals and on a `tailclip prepare` copy (short
side 256), in the main process and through persistent DataLoader workers (data.num_workers=auto); and the
data.decode=gpu path (torchvision decode_jpeg of whole batches + RandomResizedCrop on tensors, `decode_batch` and
`TrainCrop.crops`) on the CPU and, when a GPU is present, on CUDA. Prints one JSON line per path, with img/s per
busy core for the CPU rows (the issue's target: >= 400 on pre-resized JPEGs). Not part of the test suite.

    python benchmarks/data_throughput.py [--images 500] [--workers auto]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tailclip.backbones.base import Preprocess
from tailclip.config import DataConfig
from tailclip.data.base import FileImages, LabeledImages, Split, collate_skip_none
from tailclip.data.decode import decode_batch
from tailclip.data.prepare import prepare_dataset
from tailclip.data.transforms import train_transform

PRE = Preprocess(image_size=224, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711),
                 interpolation="bilinear", resize_mode="shortest")


def make_folder(root: Path, n: int) -> None:
    """n smooth-ish random 500x375 JPEGs in two class folders (noise alone would compress unrealistically badly)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC)
        folder = root / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i}.jpg", quality=90)


def loader_rate(root: Path, workers: int, batch: int = 64) -> float:
    """The training path of data.decode=cpu: PIL decode + crop to uint8 in the loader (persistent workers), the
    batch normalised in this process (ImageBatches does the same, on the training device)."""
    paths = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))
    split = Split(FileImages(str(root), paths), np.zeros(len(paths), np.int64))
    crop = train_transform(PRE)
    items = LabeledImages(split, crop.uint8)
    loader = torch.utils.data.DataLoader(items, batch_size=batch, num_workers=workers, collate_fn=collate_skip_none,
                                         persistent_workers=workers > 0)
    list(loader)  # warm-up: page cache, worker start
    t0 = time.perf_counter()
    seen = sum(len(crop.normalize(b[0])) for b in loader)
    return round(seen / (time.perf_counter() - t0), 1)


def decode_crop_rate(root: Path, device: torch.device, batch: int = 64) -> float:
    """data.decode=gpu's path: bytes read up front, then batched decode_jpeg + per-image RRC(224) + flip +
    normalize on `device` (file reading excluded: on a GPU run the workers do it in parallel)."""
    paths = sorted(root.rglob("*.jpg"))
    datas = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    idents = [str(p) for p in paths]
    crop = train_transform(PRE)

    def run(lo: int, hi: int) -> None:
        images, _ = decode_batch(datas[lo:hi], idents[lo:hi], device)
        crop.crops(images, list(range(lo, lo + len(images))))

    run(0, min(8, len(datas)))  # warm-up: nvJPEG handles, kernels
    _sync(device)
    t0 = time.perf_counter()
    for lo in range(0, len(datas), batch):
        run(lo, lo + batch)
    _sync(device)
    return round(len(datas) / (time.perf_counter() - t0), 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--workers", default="auto", help="DataLoader workers for the worker rows (a number or auto)")
    args = ap.parse_args()
    workers = DataConfig(num_workers=args.workers).num_workers  # "auto" resolves as in a run
    common = {"images": args.images, "cpu_threads": torch.get_num_threads(), "cores": len(os.sched_getaffinity(0)),
              "machine": platform.machine(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        original, prepared = Path(tmp) / "orig", Path(tmp) / "prep"
        make_folder(original, args.images)
        prepare_dataset("image-folder", str(original), str(prepared), short_side=256)
        for name, root in (("original_500x375", original), ("prepared_short256", prepared)):
            for w in dict.fromkeys((0, workers)):
                rate = loader_rate(root, w)
                print(json.dumps({"path": f"{name} PIL+RRC224 (data.decode=cpu)", "workers": w, "img_s": rate,
                                  "img_s_per_core": round(rate / max(w, 1), 1), **common}), flush=True)
            rate = decode_crop_rate(root, torch.device("cpu"))
            print(json.dumps({"path": f"{name} decode_jpeg+RRC224 on cpu (data.decode=gpu's code)", "img_s": rate,
                              "img_s_per_core": round(rate / torch.get_num_threads(), 1), **common}), flush=True)
            if torch.cuda.is_available():
                print(json.dumps({"path": f"{name} decode_jpeg+RRC224 on cuda (data.decode=gpu)",
                                  "img_s": decode_crop_rate(root, torch.device("cuda")),
                                  "gpu": torch.cuda.get_device_name(), **common}), flush=True)


if __name__ == "__main__":
    main()
