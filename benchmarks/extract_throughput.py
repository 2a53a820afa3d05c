"""Images/s of feature extraction into the cache (`split_features`: decode, eval transform, frozen tower, write):
the step every frozen-encoder method (GLA, linear probe, Tip-Adapter, CoOp, Candle, LDC) runs once per split and
view. Random-weight towers on a generated folder of 500x375 JPEGs; proj/pre_proj only and, with `--taps`, LDC's four
block taps as float16. Prints one JSON line per (model, taps). Not part of the test suite.

    python benchmarks/extract_throughput.py [--images 512] [--models ViT-B-16@none,RN50@none] [--device cuda]
        [--batch 256] [--workers auto] [--taps]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from data_throughput import make_folder  # (benchmarks/ is on sys.path when a script there runs)

from tailclip.backbones import create_backbone
from tailclip.config import DataConfig
from tailclip.data.registry import build_task
from tailclip.features import FeatureCache, split_features
from tailclip.methods.ldc import LDC


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--models", default="ViT-B-16@none,RN50@none")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--precision", default="amp_bf16", help="eval precision of the tower (fp32 | amp | amp_bf16)")
    ap.add_argument("--workers", default="auto")
    ap.add_argument("--taps", action="store_true", help="also time LDC's four taps (float16) next to proj/pre_proj")
    args = ap.parse_args()
    device = torch.device(args.device)
    workers = DataConfig(num_workers=args.workers).num_workers
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        make_folder(root, args.images)
        task = build_task(DataConfig(name="image-folder", root=str(root)))
        for model in args.models.split(","):
            torch.manual_seed(0)
            backbone = create_backbone(model, device=device)
            for taps in ([], LDC.tap_names_for(backbone)) if args.taps else ([],):
                cache = FeatureCache(Path(tmp) / f"cache-{model}-{len(taps)}")
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                fs = split_features(backbone, task, "train", taps=taps, dtype="float16" if taps else None,
                                    device=device, batch_size=args.batch, precision=args.precision,
                                    num_workers=workers, cache=cache)
                seconds = time.perf_counter() - t0
                print(json.dumps({"model": model, "device": torch.cuda.get_device_name(device)
                                  if device.type == "cuda" else "cpu", "images": len(fs), "taps": len(taps),
                                  "precision": args.precision, "workers": workers,
                                  "img_s": round(len(fs) / seconds, 1), "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
