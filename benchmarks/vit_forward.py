"""Forward speed of tailclip's ViT tower vs open_clip's `encode_image` on a random-weight ViT-B-16.

CPU, batch 8, 224 px, fp32 and bf16 autocast; images/s is the median of several timed runs after warm-up.
Prints one JSON line. Timings on a shared machine are noisy: compare the two numbers of one run.

    python benchmarks/vit_forward.py [--arch ViT-B-16] [--batch 8] [--runs 7] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable

import torch

from tailclip.backbones import create_backbone


def _time(fn: Callable[[], torch.Tensor], runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    backbone = create_backbone(f"{args.arch}@none")
    size = backbone.preprocess.image_size
    images = torch.randn(args.batch, 3, size, size)
    result: dict[str, object] = {
        "arch": args.arch, "batch": args.batch, "image_size": size, "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    for precision in ("fp32", "bf16"):
        def ctx() -> contextlib.AbstractContextManager:
            if precision == "bf16":
                return torch.autocast("cpu", dtype=torch.bfloat16)
            return contextlib.nullcontext()

        def ours() -> torch.Tensor:
            with torch.no_grad(), ctx():
                return backbone.encode_image(images).proj

        def theirs() -> torch.Tensor:
            with torch.no_grad(), ctx():
                return backbone.model.encode_image(images)

        diff = (ours().float() - theirs().float()).abs().max().item()
        # interleave the two so drifting load on a shared machine hits both alike
        t_ours, t_theirs = [], []
        for _ in range(2):
            t_theirs.append(_time(theirs, args.runs, args.warmup))
            t_ours.append(_time(ours, args.runs, args.warmup))
        ips_ours = args.batch / min(t_ours)
        ips_theirs = args.batch / min(t_theirs)
        result[precision] = {
            "tailclip_img_s": round(ips_ours, 2),
            "open_clip_img_s": round(ips_theirs, 2),
            "speedup": round(ips_ours / ips_theirs, 3),
            "max_abs_diff": diff,
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
