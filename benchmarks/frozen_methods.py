"""Frozen-feature methods at ImageNet-LT scale on random features: wall time and peak memory of each step the library
runs (GLA's temperature + prior fit and debiasing, the linear probe's C search and final fit, Tip-Adapter's
alpha/beta search). Prints one JSON line per step. Not part of the test suite.

python benchmarks/frozen_methods.py [--scale 1.0] [--steps gla,probe,tip] [--probe KEY=VALUE ...] [--device cuda]

The probe runs linear_probe's own defaults (CoOp's C grid and 8 bisections, every train row) unless `--probe` overrides
its options, e.g. `--probe search_rows=8192 search_max_iter=40 tol=1e-4` (the subsampled search); its rows time the
search and the final fit separately.

Features: class centres plus noise, tuned so zero-shot top-1 is ~65 % (ImageNet-LT-like). Sizes at scale 1: 115,846 x
512 train features with ImageNet-LT's long-tailed counts (Pareto-like, 1280 down to 5 per class), 20,000 val, 50,000
test, 1,000 classes. `--scale 0.05` runs the same code on 5 % of the rows (a smoke run). Peak memory is the process's
max RSS (ru_maxrss), so steps run in order of growing footprint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import numpy as np
import torch
import torch.nn.functional as F

from tailclip.methods.linear_probe import LinearProbeConfig, fit_logreg, search_C_for
from tailclip.methods.tip_adapter import search_alpha_beta
from tailclip.posthoc.calibration import confidence_temperature
from tailclip.posthoc.gla import debias_zeroshot
from tailclip.posthoc.prior import estimate_prior

FULL = {"train": 115_846, "val": 20_000, "test": 50_000, "classes": 1_000, "dim": 512}


def lt_counts(n: int, classes: int) -> np.ndarray:
    """ImageNet-LT-like counts: 1280 down to 5 along an exponential profile, rescaled to sum to n."""
    raw = 1280.0 * (5 / 1280.0) ** (np.arange(classes) / (classes - 1))
    counts = 1 + np.floor(raw * max(n - classes, 0) / raw.sum()).astype(np.int64)  # at least one per class
    counts[0] += max(n - int(counts.sum()), 0)
    return counts


def features(n: int, labels: torch.Tensor, centers: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    x = centers[labels] + 4.5 * torch.randn(n, centers.shape[1], generator=g) / centers.shape[1] ** 0.5
    return F.normalize(x, dim=-1)


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def timed(name: str, fn, **extra) -> None:
    t0 = time.perf_counter()
    out = fn()
    row = {"step": name, "seconds": round(time.perf_counter() - t0, 2), "peak_rss_gb": round(peak_gb(), 2),
           **extra, **(out or {})}
    print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--steps", default="gla,probe,tip")
    ap.add_argument("--probe", nargs="*", default=[], help="linear_probe options as KEY=VALUE (c_grid as a,b,c)")
    ap.add_argument("--tip-grid", default="200,20", help="released search_step [beta, alpha]")
    ap.add_argument("--device", default="cpu", help="where the features live (cuda: the methods run on the GPU)")
    args = ap.parse_args()
    device = torch.device(args.device)
    size = {k: max(int(v * args.scale), FULL["classes"]) if k in ("train", "val", "test") else v
            for k, v in FULL.items()}
    c, d = size["classes"], size["dim"]
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    text = F.normalize(centers + 1.0 * torch.randn(c, d, generator=g) / d**0.5, dim=-1)
    y_tr = torch.repeat_interleave(torch.arange(c), torch.as_tensor(lt_counts(size["train"], c)))
    y_val = torch.arange(size["val"]) % c
    y_te = torch.arange(size["test"]) % c
    x_tr, x_val, x_te = (features(len(y), y, centers, g).to(device) for y in (y_tr, y_val, y_te))
    y_tr, y_val, y_te, text = y_tr.to(device), y_val.to(device), y_te.to(device), text.to(device)
    common = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
              "torch": torch.__version__, **{f"n_{k}": v for k, v in size.items()}}
    print(json.dumps({"setup": common}), flush=True)
    steps = args.steps.split(",")
    if "gla" in steps:
        zs_val, zs_te = 100.0 * x_val @ text.t(), 100.0 * x_te @ text.t()
        t = {}
        timed("gla: confidence temperature (val)", lambda: t.update(T=confidence_temperature(zs_val, y_val)) or
              {"T": round(t["T"], 4)})
        timed("gla: prior estimate (val)", lambda: t.update(q=estimate_prior(zs_val, y_val, t["T"])) or None)
        timed("gla: debias test", lambda: {"top1": round(100 * float(
            debias_zeroshot(zs_te, t["T"], t["q"]).argmax(1).eq(y_te).float().mean()), 2)})
    if "tip" in steps:
        keys, values = x_tr, F.one_hot(y_tr, c).float()
        n_b, n_a = (int(v) for v in args.tip_grid.split(","))
        timed("tip_adapter: alpha/beta search (val vs every train key)",
              lambda: dict(zip(("alpha", "beta", "val_top1"), search_alpha_beta(
                  x_val, y_val, text, keys, values, 100.0, [7.0, 3.0], [n_b, n_a]), strict=True)),
              grid=[n_b, n_a])
    if "probe" in steps:
        options: dict = {}
        for item in args.probe:
            key, value = item.split("=", 1)
            options[key] = [float(v) for v in value.split(",")] if key == "c_grid" else json.loads(value)
        cfg = LinearProbeConfig(**options)
        found: dict = {}

        def search() -> dict:
            chosen, trace, searched, rows = search_C_for(cfg, x_tr, y_tr, x_val, y_val, c, seed=0)
            found.update(C=chosen, searched=searched, rows=rows)
            return {"C": chosen, "fits": len(trace), "search_rows": rows,
                    "val_top1": round(max(t["val_acc"] for t in trace), 2)}

        timed("linear_probe: C search", search, options=options)
        if found["rows"] < len(y_tr):
            timed("linear_probe: final fit on every train row (warm start)", lambda: {"test_top1": round(100 * float(
                probe_predict(fit_logreg(x_tr, y_tr, c, found["C"], cfg.max_iter, init=found["searched"], tol=cfg.tol),
                              x_te).eq(y_te).float().mean()), 2)})
        else:
            print(json.dumps({"step": "linear_probe: final fit", "note": "the searched solution (same rows)"}))


def probe_predict(wb: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return (x @ wb[0].t() + wb[1]).argmax(1)

if __name__ == "__main__":
    main()
