"""Forward speed of tailclip's image tower vs open_clip's `encode_image` on random weights (ViT-B-16, RN50 ...).

CPU (default) or CUDA, batch 8, 224 px, fp32 and bf16 autocast; images/s from the median of several interleaved
timed runs after warm-up, and the max abs difference of the projected features.
Prints one JSON line. Timings on a shared machine are noisy: compare the two numbers of one run.

    python benchmarks/vit_forward.py [--arch ViT-B-16] [--batch 8] [--runs 5] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from tailclip.backbones import create_backbone


def _time_pair(fns: dict[str, Callable[[], torch.Tensor]], runs: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved so load drifting on a shared machine
    hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    backbone = create_backbone(f"{args.arch}@none", device=device)
    size = backbone.preprocess.image_size
    images = torch.randn(args.batch, 3, size, size, device=device)
    result: dict[str, object] = {
        "arch": args.arch, "batch": args.batch, "image_size": size, "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
    }

    def sync(out: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    for precision in ("fp32", "bf16"):
        autocast = precision == "bf16"

        def ours(autocast: bool = autocast) -> torch.Tensor:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                return sync(backbone.encode_image(images).proj)

        def theirs(autocast: bool = autocast) -> torch.Tensor:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                return sync(backbone.model.encode_image(images))

        diff = (ours().float() - theirs().float()).abs().max().item()
        t = _time_pair({"open_clip": theirs, "tailclip": ours}, args.runs, args.warmup)
        ips_ours, ips_theirs = args.batch / t["tailclip"], args.batch / t["open_clip"]
        result[precision] = {
            "tailclip_img_s": round(ips_ours, 2),
            "open_clip_img_s": round(ips_theirs, 2),
            "speedup": round(ips_ours / ips_theirs, 3),
            "max_abs_diff": diff,
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
