"""Grid runner: one run per (shots, seed), then mean ± std over seeds for each shot count.

`tailclip train --shots 1,2,4,8,16 --seeds 1,2,3 ...` lands here; `--seeds 1,2,3` alone (shots None: the task's own
training set, e.g. a long-tailed one) runs one cell per seed. The grid folder holds one run folder per
cell (`k{shots}-s{seed}`, or `s{seed}` without shots, each a normal run folder with its own results.json and drawn
indices), plus
`grid.json` (every cell's numbers and the per-shot aggregates) and `grid.md` (the table). The std is the
population std over seeds (numpy's default, as CoOp's `parse_test_res.py` reports it). A cell whose
results.json already exists is reused only when its config.yaml equals the requested configuration (bookkeeping
keys aside: `cell_differences`), so an interrupted grid continues where it stopped while an edited row or override
is never reported with the old cell's numbers (a one-line error names the keys; `overwrite` reruns the cell).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from .config import RunConfig, config_to_dict, key_differences
from .errors import TailclipError
from .io import atomic_write_text, write_json
from .report.collect import seed_stat
from .runfiles import CONFIG, GRID_JSON, GRID_MD, RESULTS

log = logging.getLogger(__name__)

METRICS = ("top1", "many", "medium", "few", "ece", "nll")
# config keys that never change a cell's numbers: where it is written, how it is resumed or logged, the device
BOOKKEEPING = {"output_dir", "run_name", "resume", "device", "data.num_workers", "eval.plots", "train.tensorboard",
               "train.resume_every_steps", "train.resume_every_minutes"}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return {k.rstrip("."): v for k, v in out.items()}


def cell_differences(cell_dir: Path, cfg: RunConfig) -> list[str]:
    """"key: stored -> requested" for every result-relevant key in which a finished cell's config.yaml differs
    from `cfg` (a key only one side has counts too)."""
    path = cell_dir / CONFIG
    try:
        stored = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise TailclipError(f"{path}: cannot be read to check the finished cell ({exc}); rerun it with "
                            "--overwrite") from None
    mine = json.loads(json.dumps(config_to_dict(cfg), default=str))
    return key_differences(_flat(stored), _flat(mine), BOOKKEEPING)


def cell_name(shots: int | None, seed: int) -> str:
    return f"s{seed}" if shots is None else f"k{shots}-s{seed}"


def shots_label(shots: int | None) -> str:
    """How a shot count reads in tables and grid.json keys ("all": the task's own training set)."""
    return "all" if shots is None else str(shots)


def aggregate(cells: list[dict[str, Any]], metrics: Sequence[str] = METRICS) -> dict[str, dict[str, Any]]:
    """{shots: {metric: {mean, std, n, values}}} over the seeds of each shot count (`report.collect.seed_stat`)."""
    out: dict[str, dict[str, Any]] = {}
    for shots in sorted({c["shots"] for c in cells}, key=lambda k: -1 if k is None else k):
        rows = [c for c in cells if c["shots"] == shots]
        stats = {m: seed_stat({r["seed"]: r["results"].get(m) for r in rows}) for m in metrics}
        out[shots_label(shots)] = {m: s.to_dict() for m, s in stats.items() if s is not None}
    return out


def format_grid(summary: dict[str, dict[str, Any]], title: str, metrics: Sequence[str] = ("top1", "many", "medium",
                                                                                          "few")) -> str:
    """Markdown table: one row per shot count, `mean ± std` per metric (percent, NLL in nats)."""
    used = [m for m in metrics if any(m in row for row in summary.values())]
    lines = [f"# {title}", "", "| shots | seeds | " + " | ".join(used) + " |",
             "|---:|---:|" + "---:|" * len(used)]
    for shots, row in summary.items():
        n = max((s["n"] for s in row.values()), default=0)
        cells = [f"{row[m]['mean']:.2f} ± {row[m]['std']:.2f}" if m in row else "n/a" for m in used]
        lines.append(f"| {shots} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_grid(cfg: RunConfig, shots: Sequence[int | None], seeds: Sequence[int],
             run_fn: Callable[..., Path] | None = None, overwrite: bool = False) -> Path:
    """Run every (shots, seed) cell with data.shots, data.seed and train.seed set (shots None: left as configured);
    returns the grid folder. A finished cell of another configuration is an error, or rerun with `overwrite`."""
    if run_fn is None:
        from .api import run as run_fn
    shots = [None if k is None else int(k) for k in shots]
    seeds = [int(s) for s in seeds]
    if None in shots and len(shots) > 1:
        raise ValueError("a grid runs either the task's own training set (shots None) or shot counts, not both")
    if not shots or not seeds:
        raise ValueError("a grid needs at least one shot count and one seed")
    name = cfg.run_name or f"grid-{cfg.method}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    grid_dir = Path(cfg.output_dir) / name
    grid_dir.mkdir(parents=True, exist_ok=True)
    cells: list[dict[str, Any]] = []
    for k in shots:
        for seed in seeds:
            cell_cfg = copy.deepcopy(cfg)
            if k is not None:
                cell_cfg.data.shots = k
            cell_cfg.data.seed = seed
            cell_cfg.train.seed = seed  # one seed for the draw and the training, as CoOp's --seed
            cell_cfg.output_dir = str(grid_dir)
            cell_cfg.run_name = cell_name(k, seed)
            path = grid_dir / cell_cfg.run_name
            redo = False
            if (path / RESULTS).is_file():
                diff = cell_differences(path, cell_cfg)
                if diff and not overwrite:
                    raise TailclipError(f"{path} finished with another configuration ({'; '.join(diff)}); pass "
                                        "--overwrite to rerun it, or another --name")
                redo = bool(diff)
                if not redo:
                    log.info("grid cell %s already done with this configuration; reusing it", path.name)
            if redo:
                log.info("grid cell %s: configuration changed; rerunning it (--overwrite)", path.name)
                path = Path(run_fn(cell_cfg, overwrite=True))
            elif not (path / RESULTS).is_file():
                log.info("grid cell shots=%s seed=%d", shots_label(k), seed)
                if path.is_dir() and cell_cfg.resume is None:  # an interrupted cell continues (same config)
                    cell_cfg.resume = "auto"
                path = Path(run_fn(cell_cfg))
            results = json.loads((path / RESULTS).read_text())
            cells.append({"shots": k, "seed": seed, "run_dir": str(path),
                          "results": {m: results.get(m) for m in METRICS}})
    summary = aggregate(cells)
    title = f"{cfg.method} on {cfg.data.name} ({cfg.model.name}): mean ± std over seeds {', '.join(map(str, seeds))}"
    write_json(grid_dir / GRID_JSON, {"method": cfg.method, "dataset": cfg.data.name, "model": cfg.model.name,
                                        "shots": shots, "seeds": seeds, "std": "population (ddof=0)",
                                        "summary": summary, "cells": cells})
    atomic_write_text(grid_dir / GRID_MD, format_grid(summary, title))
    return grid_dir
