"""Where adapter training time goes (LIFT; Sage with and without FIT): images/s of the data path alone (the trainer's
own augmented-batch source), of the model alone (forward + backward + SGD step on fixed tensors) and of both together
(end to end), for the built-in tiny CLIP and a random-weight ViT-B/16, on CPU and, when present, CUDA; in fp32 and,
on CUDA or a CPU with bf16 units, under bf16 autocast. A gap between data-only and end-to-end says the model waits
for data; end-to-end close to model-only says compute is the limit. Prints one JSON line per (model, device,
precision). Not part of the test suite.

    python benchmarks/train_throughput.py [--models synthetic:tiny-clip,ViT-B-16@none] [--steps 5]
        [--methods lift,sage,sage+fit] [--devices cpu,cuda] [--workers 0] [--batch-tiny 128] [--batch-vit 32]

`sage` is the SG-Adapter with the CF loss and no FIT; `sage+fit` adds FIT's frozen forward of the same crop (Sage's
price); `ldc` trains LDC's adapters on a live frozen forward with taps. Every method trains on the same batches.

Data comes from the synthetic `synth-lt` task (rendered once, cached; see `synthetic/world_cache.py`) with LIFT's
RandomResizedCrop + flip to the model's input size; JPEG decoding is measured by benchmarks/data_throughput.py.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from tailclip.config import load_config
from tailclip.contract import FitContext
from tailclip.engine.image_batches import ImageBatches
from tailclip.engine.trainer import build_optimizer, epoch_order, plan_epoch
from tailclip.methods.loading import build
from tailclip.runtime import autocast


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


METHODS = {  # name -> overrides (crops >= 50 % of the area, as the demo's rows)
    "lift": ["method=lift", "lift.crop_min_scale=0.5"],
    "sage": ["method=sage", "sage.crop_min_scale=0.5", "sage.fit=false"],
    "sage+fit": ["method=sage", "sage.crop_min_scale=0.5", "sage.fit=true"],
    # LDC on a live frozen forward of fresh crops (its released training; the cache path is measured by extraction)
    "ldc": ["method=ldc", "ldc.inputs=images"],
}


def measure(method_name: str, model: str, device: torch.device, precision: str, batch: int, steps: int,
            workers: int) -> dict:
    cfg = load_config(None, [*METHODS[method_name], f"model.name={model}", "data.name=synth-lt",
                             f"train.batch_size={batch}", f"train.precision={precision}",
                             f"data.num_workers={workers}"])
    task, method = build(cfg, device)
    train_cfg = method.train_config(cfg.train)
    optimizer = build_optimizer(method, train_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        source = ImageBatches(method, FitContext(cfg, task.guarded(), Path(tmp), device), train_cfg)
        plan = plan_epoch(epoch_order(len(source), train_cfg.seed, 0), batch, 1, 0, 1)[: steps + 1]

        def step(images: torch.Tensor, labels: torch.Tensor) -> None:
            with autocast(device, precision):
                loss = method(images.to(device, non_blocking=True), labels.to(device, non_blocking=True)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def timed(run_step) -> float:  # images/s over `steps` batches after one warm-up batch
            batches = source.epoch(0, plan)
            run_step(next(batches))
            _sync(device)
            t0 = time.perf_counter()
            for batch_ in batches:
                run_step(batch_)
            _sync(device)
            return round(batch * steps / (time.perf_counter() - t0), 1)

        method.train()
        method.backbone.eval()
        fixed = next(source.epoch(0, plan[:1]))
        out = {"data_img_s": timed(lambda b: None)}

        def model_only(_: object) -> None:
            step(*fixed)

        out["model_img_s"] = timed(model_only)
        out["end_to_end_img_s"] = timed(lambda b: step(*b))
    return out


def precisions(device: torch.device) -> tuple[str, ...]:
    """fp32, and bf16 autocast on CUDA or on CPUs with bf16 units (AVX512-BF16 / AMX); without them CPU bf16 is
    emulated and slower than fp32."""
    if device.type == "cuda" or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return ("fp32", "amp_bf16")
    return ("fp32",)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="synthetic:tiny-clip,ViT-B-16@none")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--methods", default="lift", help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--batch-tiny", type=int, default=128)
    ap.add_argument("--batch-vit", type=int, default=32)
    args = ap.parse_args()
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    common = {"torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "machine": platform.machine(),
              "processor": platform.processor(), "cpu_bf16_units": torch.cpu._is_avx512_bf16_supported(),
              "cpu_amx": torch.cpu._is_amx_tile_supported(), "workers": args.workers}
    for dev_name in args.devices.split(","):
        if dev_name == "cuda" and not torch.cuda.is_available():
            continue
        device = torch.device(dev_name)
        extra = {"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}
        for model in args.models.split(","):
            batch = args.batch_tiny if model.startswith("synthetic:") else args.batch_vit
            for precision in precisions(device):
                for method in args.methods.split(","):
                    row = {"method": method, "model": model, "device": dev_name, "precision": precision,
                           "batch": batch, **measure(method, model, device, precision, batch, args.steps,
                                                     args.workers), **extra, **common}
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
