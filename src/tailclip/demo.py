"""`tailclip demo`: every method on the built-in synthetic world (no downloads), one table at the end.

The world is synthetic (procedural shapes rendered at 32 px and a tiny CLIP pretrained on them with a
skewed label prior): its numbers demonstrate the methods' behaviour, they are not benchmark results."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .api import load_config, run
from .report import report_runs
from .runfiles import PLOTS, REPORT_DIR, REPORT_MD, RESULTS, SHOT_INDICES

log = logging.getLogger(__name__)

BUDGET_S = 300  # `tailclip demo`, every row, 2 idle CPU cores, cold caches (README); --quick: QUICK_BUDGET_S
QUICK_BUDGET_S = 90

# eval.plots=false: the demo's report draws the plots of every row at the end, once
BASE = ["model.name=synthetic:tiny-clip", "data.name=synth-lt", "data.imbalance_ratio=100", "eval.plots=false"]


@dataclass
class DemoRow:
    label: str
    run_name: str
    overrides: list[str]
    quick: list[str] = field(default_factory=list)  # extra overrides for --quick (smoke runs)
    seconds: float = 5.0  # relative cost of the row: the ETA's weights, which the pace of the finished rows rescales


# LIFT on 32 px shapes: crops down to 8 % of the area (LIFT's 224 px recipe) cut most of the shape away, so the
# demo keeps crops >= 50 % (measured on synth-lt, 4 epochs lr 0.01: 63.96 top-1 with 0.08 vs 68.97 with 0.5).
# One epoch with the cosine over its steps: LIFT's point is that a light tuner converges in few epochs. Measured on
# synth-lt: 1 epoch 70.5 top-1 (few: LA 72.7 vs CE 47.5), 2 epochs (per-epoch cosine) 70.9; an epoch is a large
# share of the 5-minute budget (benchmarks/README.md), so the demo trains one.
LIFT_SYNTH = ["lift.crop_min_scale=0.5", "train.epochs=1", "train.sched_unit=step", "train.lr=0.02",
              "eval.splits=[val,test]"]
# --quick (a smoke run of every row): LIFT trains on at most 8 images per class and skips the per-epoch val pass;
# the GLA ensemble with it runs on that 8-shot task (its val split must be LIFT's); the probe's fits stop at 50
# L-BFGS iterations (weakly regularised fits otherwise run to 300: a minute of the quick budget).
LIFT_QUICK = ["data.shots=8", "train.val_every=0"]
PROBE_QUICK = ["linear_probe.search_steps=2", "linear_probe.max_iter=50"]

# The probe's C search: 7 grid values + 3 log-space bisections (13 L-BFGS fits instead of 23 with the default 8; the
# 3rd bisection already resolves C to ~0.25 decade) - the search is the most expensive part of the demo.
PROBE_SEARCH = ["linear_probe.search_steps=3"]

# Rows run in order; a row may refer to an earlier row's folder as {out}/<run_name>.
ROWS: list[DemoRow] = [
    DemoRow("zero-shot CLIP", "zeroshot", ["method=zeroshot"], seconds=15),
    # LIFT: AdaptFormer + text-initialised cosine head, logit-adjusted vs plain CE.
    DemoRow("LIFT (AdaptFormer + LA loss)", "lift-la",
            ["method=lift", "lift.loss=la", *LIFT_SYNTH],
            quick=LIFT_QUICK, seconds=50),
    DemoRow("LIFT with plain CE", "lift-ce",
            ["method=lift", "lift.loss=ce", *LIFT_SYNTH],
            quick=LIFT_QUICK, seconds=50),
    # Sage: SG-Adapter + 60-template init + compensated LA + FIT (Table 8's CIFAR beta = 100 settings), trained like
    # the LIFT rows (one epoch, cosine over its steps). FIT runs a second (frozen) forward per step and per test image,
    # so an epoch costs more than LIFT's (benchmarks/README.md).
    DemoRow("Sage (SG-Adapter + CF + FIT)", "sage",
            ["method=sage", "sage.crop_min_scale=0.5", "train.epochs=1", "train.sched_unit=step", "train.lr=0.02",
             "eval.splits=[val,test]"],
            quick=LIFT_QUICK, seconds=70),
    # GLA: debiased zero-shot, a linear probe on cached features, and their GLA ensemble.
    DemoRow("GLA debiased zero-shot", "gla-debiased", ["method=gla"], seconds=25),
    DemoRow("linear probe (frozen features)", "linear-probe",
            ["method=linear_probe", "eval.splits=[val,test]", *PROBE_SEARCH],
            quick=PROBE_QUICK, seconds=60),
    DemoRow("GLA ensemble (zero-shot + linear probe)", "gla-ensemble",
            ["method=gla", "gla.mode=ensemble", "gla.finetuned_run={out}/linear-probe"]),
    DemoRow("GLA ensemble (zero-shot + LIFT-LA)", "gla-ensemble-lift",
            ["method=gla", "gla.mode=ensemble", "gla.finetuned_run={out}/lift-la"], quick=["data.shots=8"]),
    DemoRow("zero-shot CLIP [synth-fewshot 16-shot]", "fs-zeroshot",
            ["method=zeroshot", "data.name=synth-fewshot", "data.shots=16"]),
    DemoRow("GLA debiased zero-shot [synth-fewshot 16-shot]", "fs-gla-debiased",
            ["method=gla", "data.name=synth-fewshot", "data.shots=16"]),
    DemoRow("linear probe [synth-fewshot 16-shot]", "fs-linear-probe",
            ["method=linear_probe", "data.name=synth-fewshot", "data.shots=16", "eval.splits=[val,test]",
             *PROBE_SEARCH],
            quick=PROBE_QUICK),
    # CoOp from the cached eval view (views=0: 32 px shapes lose the shape under CoOp's 8 %-area crops), 5 epochs
    DemoRow("CoOp [synth-fewshot 16-shot]", "fs-coop",
            ["method=coop", "data.name=synth-fewshot", "data.shots=16", "coop.ctx_init=a photo of a", "coop.views=0",
             "train.epochs=5", "train.batch_size=32", "train.lr=0.002", "eval.splits=[val,test]"],
            quick=["train.epochs=1"]),
    # LDC from cached taps of 4 augmented views (the released 50 epochs and lr 1e-4)
    DemoRow("LDC [synth-fewshot 16-shot]", "fs-ldc",
            ["method=ldc", "data.name=synth-fewshot", "data.shots=16", "ldc.views=4", "eval.splits=[val,test]"],
            quick=["train.epochs=5"], seconds=20),
    DemoRow("GLA ensemble [synth-fewshot 16-shot]", "fs-gla-ensemble",
            ["method=gla", "data.name=synth-fewshot", "data.shots=16", "gla.mode=ensemble",
             "gla.finetuned_run={out}/fs-linear-probe"]),
    # Candle on imbalanced base-to-new (r = 0.02), eval view only and few epochs to stay within the demo's budget.
    DemoRow("Candle [synth-b2n-lt IR 50]", "b2n-candle",
            ["method=candle", "data.name=synth-b2n-lt", "data.imbalance_ratio=50", "candle.augment_views=0",
             "train.epochs=3", "train.lr=0.01", "train.warmup_epochs=1", "eval.splits=[val,test_base,test_new]"],
            quick=["train.epochs=1", "train.warmup_epochs=0"], seconds=75),
]


def _images_seen(run_dir: Path, method_inputs: str) -> tuple[int, int]:
    """(images trained on, images scored) of a finished row, from its results.json."""
    results = json.loads((run_dir / RESULTS).read_text())
    scored = sum(int(s.get("num_samples", 0)) for s in results.get("splits", {}).values())
    training = results.get("training") or {}
    counts = next((s["train_counts"] for s in results.get("splits", {}).values() if "train_counts" in s), None)
    if counts is not None:
        n_train = int(sum(counts))
    else:  # K-shot runs (--quick's LIFT rows) record no group counts: their draw says how many images trained
        drawn = run_dir / SHOT_INDICES
        n_train = len(json.loads(drawn.read_text()).get("train", [])) if drawn.is_file() else 0
    trained = int(training.get("epochs_run", 0)) * n_train if method_inputs == "images" else 0
    return trained, scored


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def run_demo(output_dir: str = "runs/demo", quick: bool = False,
             progress: Callable[[str], None] | None = None) -> str:
    """Run every row, reporting one progress line per row (to `progress`, else the log), then the table."""
    from .contract import METHODS

    say = progress or log.info
    out = Path(output_dir)
    paths = []
    start = time.perf_counter()
    expected_total = sum(row.seconds for row in ROWS)
    expected_done = 0.0
    for i, row in enumerate(ROWS, 1):
        overrides = [o.format(out=out) for o in BASE + row.overrides + (row.quick if quick else [])]
        cfg = load_config(None, overrides + [f"output_dir={out}", f"run_name={row.run_name}"])
        t0 = time.perf_counter()
        paths.append(run(cfg))
        took = time.perf_counter() - t0
        trained, scored = _images_seen(paths[-1], METHODS.get(cfg.method).inputs)
        expected_done += row.seconds
        elapsed = time.perf_counter() - start
        eta = (expected_total - expected_done) * elapsed / expected_done  # the remaining rows at today's pace
        detail = f"trained {trained:,} + scored {scored:,}" if trained else f"scored {scored:,}"
        say(f"[{i}/{len(ROWS)}] {row.label}: {took:.1f} s, {(trained + scored) / max(took, 1e-9):,.0f} img/s "
            f"({detail} images); elapsed {_clock(elapsed)}, ETA {_clock(eta)}")
    files = report_runs(paths, out / REPORT_DIR, "md,csv,html", labels=[row.label for row in ROWS])
    header = "tailclip demo — synthetic world (synth-lt, beta=100; test set balanced, 100 classes)\n"
    budget = _clock(QUICK_BUDGET_S if quick else BUDGET_S)
    total = f"\n{len(ROWS)} rows in {_clock(time.perf_counter() - start)} (budget {budget} on 2 idle CPU cores)\n"
    return header + files[REPORT_MD].read_text() + f"\nplots: {out / REPORT_DIR / PLOTS}\n" + total
