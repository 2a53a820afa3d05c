"""How much each protocol choice moves the numbers on the built-in world: every choice of issue 19 (Candle's
released evaluation, Dassl's schedule details, fp16 weights, LDC's report and training crops, Sage's FIT init and
CF reading) run with both values over seeds 1/2/3, everything else fixed. Prints one Markdown table per method:
the metric's mean ± std (population) per value and the mean paired difference. Not part of the test suite.

    python benchmarks/protocol_effects.py [--only candle,coop,ldc,sage] [--seeds 1,2,3] [--out DIR]

Runs go to --out (default a temporary folder); features are cached as usual ($TAILCLIP_CACHE), so every variant
after the first reuses them. On 2 CPU cores the whole set takes about 25 minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tailclip import api
from tailclip.config import load_config


@dataclass
class Choice:
    """One protocol choice: the overrides of each of its two values on top of the method's base overrides."""

    name: str
    values: dict[str, list[str]]


@dataclass
class Experiment:
    method: str
    metric: str  # results.json key: hm (base-to-new), top1, few
    base: list[str]
    choices: list[Choice]


CANDLE = Experiment("candle", "hm", [
    "method=candle", "data.name=synth-b2n-lt", "data.imbalance_ratio=50", "candle.augment_views=0", "train.epochs=3",
    "train.lr=0.01", "train.warmup_epochs=1", "eval.splits=[val,test_base,test_new]"], [
    Choice("eval.base_scoring", {"base": [], "all": ["eval.base_scoring=all"]}),
    Choice("candle.text_features", {"normalized": ["candle.text_features=normalized"], "raw": []}),
    Choice("candle.beta", {"0.5": [], "1.0": ["candle.beta=1.0"]}),
    Choice("train.select_on", {"val (auto)": [], "none (last epoch)": ["train.select_on=none"]}),
    Choice("train.cosine_span", {"after_warmup": [], "epochs": ["train.cosine_span=epochs"]}),
    Choice("train.drop_last", {"false": [], "true": ["train.drop_last=true"]}),
    Choice("train.precision", {"fp32": [], "fp16_weights": ["train.precision=fp16_weights"]}),
    Choice("candle.transductive", {"false": [], "true (batch 100)": ["candle.transductive=true"]}),
    Choice("all released choices", {"tailclip defaults": ["candle.text_features=normalized"], "released": [
        "eval.base_scoring=all", "candle.beta=1.0", "train.select_on=none", "train.cosine_span=epochs",
        "train.drop_last=true", "train.precision=fp16_weights"]}),
])
COOP = Experiment("coop", "top1", [
    "method=coop", "data.name=synth-fewshot", "data.shots=16", "coop.ctx_init=a photo of a", "coop.views=0",
    "train.epochs=5", "train.batch_size=32", "train.lr=0.002", "train.warmup_epochs=1", "train.select_on=none",
    "eval.splits=[test]"], [
    Choice("epochs at 2 shots (coop_epochs)", {"50 (old rule)": ["data.shots=2", "train.epochs=50"],
                                               "100 (COOP.md)": ["data.shots=2", "train.epochs=100"]}),
    Choice("train.cosine_span", {"after_warmup": [], "epochs": ["train.cosine_span=epochs"]}),
    Choice("train.drop_last", {"false": [], "true": ["train.drop_last=true"]}),
    Choice("train.precision", {"fp32": [], "fp16_weights": ["train.precision=fp16_weights"]}),
])
LDC = Experiment("ldc", "top1", [
    "method=ldc", "data.name=synth-fewshot", "data.shots=16", "ldc.views=4", "eval.splits=[val,test]"], [
    Choice("report", {"alf, epoch on val": [],
                      "beta_search (last epoch)": ["ldc.report=beta_search", "ldc.beta_on=val",
                                                   "train.select_on=none"]}),
    Choice("training crops", {"4 cached views": [], "10 cached views": ["ldc.views=10"],
                              "fresh crop per epoch": ["ldc.inputs=images"]}),
    Choice("train.precision", {"fp32": [], "fp16_weights": ["train.precision=fp16_weights"]}),
])
SAGE_BASE = ["method=sage", "sage.crop_min_scale=0.5", "train.epochs=1", "train.sched_unit=step", "train.lr=0.02",
             "eval.splits=[test]"]
INAT_LAMBDAS = ["sage.lambda1=1e-7", "sage.lambda2=1e-7", "sage.lambda3=1e-7"]
SAGE = Experiment("sage", "top1", SAGE_BASE, [
    Choice("sage.fit_init (Table 8 CIFAR lambdas)", {"0": ["sage.fit_init=0"], "1": []}),
    Choice("sage.fit_init (iNat lambdas, 1e-7)", {"0": ["sage.fit_init=0", *INAT_LAMBDAS], "1": INAT_LAMBDAS}),
    Choice("sage.cf_reading", {"product": [], "additive": ["sage.cf_reading=additive"]}),
])
EXPERIMENTS = {e.method: e for e in (CANDLE, COOP, LDC, SAGE)}


def run_one(out: Path, overrides: list[str], seed: int, cache: dict[str, dict]) -> dict:
    """results.json of one run (cached by its overrides: values shared by two choices run once)."""
    key = json.dumps([*overrides, seed])
    if key not in cache:
        name = f"r{len(cache):03d}"
        cfg = load_config(None, [*overrides, f"data.seed={seed}", f"train.seed={seed}", f"output_dir={out}",
                                 f"run_name={name}", "eval.plots=false"])
        t0 = time.perf_counter()
        results = json.loads((api.run(cfg) / "results.json").read_text())
        results["_seconds"] = time.perf_counter() - t0
        cache[key] = results
    return cache[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(EXPERIMENTS))
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out or tempfile.mkdtemp(prefix="tailclip-protocols-"))
    cache: dict[str, dict] = {}
    for method in args.only.split(","):
        exp = EXPERIMENTS[method]
        print(f"\n### {method} ({exp.metric}, seeds {args.seeds}; base: {' '.join(exp.base)})\n")
        print("| choice | value | mean ± std | Δ vs first (paired mean ± std) |\n|---|---|---:|---:|")
        for choice in exp.choices:
            per_value = {v: np.array([run_one(out, [*exp.base, *ov], s, cache)[exp.metric] for s in seeds])
                         for v, ov in choice.values.items()}
            first = next(iter(per_value.values()))
            for i, (value, scores) in enumerate(per_value.items()):
                diff = scores - first
                delta = "" if i == 0 else f"{diff.mean():+.2f} ± {diff.std():.2f}"
                print(f"| {choice.name if i == 0 else ''} | {value} | {scores.mean():.2f} ± {scores.std():.2f} | "
                      f"{delta} |", flush=True)
    print(f"\nruns: {out} ({len(cache)} runs)")


if __name__ == "__main__":
    main()
