"""Images/s of the image-decoding paths on a generated folder of 500x375 JPEGs (ImageNet's typical size):
PIL decode + RandomResizedCrop(224) + flip + normalize on the originals and on a `tailclip prepare` copy (short
side 256), in the main process and through DataLoader workers (data.num_workers=auto), and torchvision's
decode_jpeg on CUDA when a GPU is present. Prints one JSON line per path. Not part of the test suite.

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
    paths = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))
    split = Split(FileImages(str(root), paths), np.zeros(len(paths), np.int64))
    items = LabeledImages(split, train_transform(PRE))
    loader = torch.utils.data.DataLoader(items, batch_size=batch, num_workers=workers, collate_fn=collate_skip_none,
                                         persistent_workers=workers > 0)
    list(loader)  # warm-up: page cache, worker start
    t0 = time.perf_counter()
    seen = sum(len(b[1]) for b in loader)
    return round(seen / (time.perf_counter() - t0), 1)


def gpu_decode_rate(root: Path) -> float:
    from torchvision.io import decode_jpeg, read_file

    datas = [read_file(str(p)) for p in sorted(root.rglob("*.jpg"))]
    decode_jpeg(datas[:8], device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(datas), 64):
        decode_jpeg(datas[i : i + 64], device="cuda")
    torch.cuda.synchronize()
    return round(len(datas) / (time.perf_counter() - t0), 1)


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
                print(json.dumps({"path": f"{name} PIL+RRC224", "workers": w, "img_s": loader_rate(root, w),
                                  **common}), flush=True)
            if torch.cuda.is_available():
                print(json.dumps({"path": f"{name} decode_jpeg cuda (decode only)", "img_s": gpu_decode_rate(root),
                                  "gpu": torch.cuda.get_device_name(), **common}), flush=True)


if __name__ == "__main__":
    main()
