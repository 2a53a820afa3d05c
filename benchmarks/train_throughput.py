"""Images/s of LIFT-style adapter training (AdaptFormer + cosine head, forward + backward + SGD step) and of
evaluation (forward only) for a random-weight ViT-B/16 at batch 8: CPU fp32 and bf16, and CUDA fp32 / amp
when a GPU is present. Prints one JSON line. Not part of the test suite.

    python benchmarks/train_throughput.py [--iters 3] [--batch 8] [--model ViT-B-16@none] [--devices cpu,cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from tailclip.backbones import create_backbone
from tailclip.engine.evaluate import autocast
from tailclip.heads import CosineClassifier
from tailclip.losses import LogitAdjustedLoss
from tailclip.tuners import build_tuner


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(backbone, head, tuner, loss_fn, device: torch.device, precision: str, batch: int, iters: int) -> dict:
    size = backbone.preprocess.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, head.weight.shape[0], (batch,), device=device)
    params = [p for p in list(tuner.parameters()) + list(head.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and precision == "amp")

    def train_step() -> None:
        with autocast(device, precision):
            loss = loss_fn(head(backbone.encode_image(x).pre_proj), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_step() -> None:
        with autocast(device, precision):
            F.softmax(head(backbone.encode_image(x).pre_proj).float(), dim=-1)

    out = {}
    for name, fn in (("train", train_step), ("eval", eval_step)):
        fn()  # warm-up (kernel selection, allocator)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        out[f"{name}_img_s"] = round(batch * iters / (time.perf_counter() - t0), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-16@none")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--devices", default="cpu,cuda")
    args = ap.parse_args()
    torch.manual_seed(0)
    result: dict = {"model": args.model, "batch": args.batch, "iters": args.iters, "classes": args.classes,
                    "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "machine": platform.machine()}
    for dev_name in args.devices.split(","):
        if dev_name == "cuda" and not torch.cuda.is_available():
            continue
        device = torch.device(dev_name)
        backbone = create_backbone(args.model, device=device)
        backbone.requires_grad_(False)
        tuner = build_tuner("adaptformer", backbone, num_classes=args.classes).to(device)
        head = CosineClassifier(backbone.width, args.classes).to(device)
        loss_fn = LogitAdjustedLoss(torch.arange(args.classes, 0, -1)).to(device)
        result.setdefault("bottleneck", tuner.bottleneck)
        if device.type == "cuda":
            result["gpu"] = torch.cuda.get_device_name(device)
        for precision in (("fp32", "amp_bf16") if device.type == "cpu" else ("fp32", "amp", "amp_bf16")):
            label = {"fp32": "fp32", "amp": "fp16", "amp_bf16": "bf16"}[precision]
            for key, value in measure(backbone, head, tuner, loss_fn, device, precision, args.batch,
                                      args.iters).items():
                result[f"{dev_name}_{label}_{key}"] = value
        tuner.detach()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
