"""`tailclip demo`: every method on the built-in synthetic world (no downloads), one table at the end.

The world is synthetic (procedural shapes rendered at 32 px and a tiny CLIP pretrained on them with a
skewed label prior): its numbers demonstrate the methods' behaviour, they are not benchmark results."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .api import format_table, run
from .config import load_config
from .engine.runs import RunDir

BASE = ["model.name=synthetic:tiny-clip", "data.name=synth-lt", "data.imbalance_ratio=100"]


@dataclass
class DemoRow:
    label: str
    run_name: str
    overrides: list[str]
    quick: list[str] = field(default_factory=list)  # extra overrides for --quick (smoke runs)


# Rows run in order; a row may refer to an earlier row's folder as {out}/<run_name>.
ROWS: list[DemoRow] = [
    DemoRow("zero-shot CLIP", "zeroshot", ["method=zeroshot"]),
]


def run_demo(output_dir: str = "runs/demo", quick: bool = False) -> str:
    out = Path(output_dir)
    results = []
    for row in ROWS:
        overrides = [o.format(out=out) for o in BASE + row.overrides + (row.quick if quick else [])]
        cfg = load_config(None, overrides + [f"output_dir={out}", f"run_name={row.run_name}"])
        results.append((row.label, RunDir(run(cfg)).read_results()))
    header = "tailclip demo — synthetic world (synth-lt, beta=100; test set balanced, 100 classes)\n"
    return header + format_table(results)
