"""Read run folders and few-shot grid folders into table rows, and list the ones that cannot be read.

Everything comes from the files a run writes (`results.json`, `config.yaml`, `metrics.csv`), never from logs.
A folder that is unfinished (no results.json) or broken (unreadable JSON) becomes a `Problem` with the reason,
so one bad folder never hides the others. Grids (`grid.py::run_grid`: one `k{shots}-s{seed}` run per cell) are
aggregated from their cells' results.json, mean ± std over seeds per shot count, with the population std
(ddof=0) that grid.json records, so `tailclip report GRID` and `grid.md` agree.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..runfiles import CONFIG, GRID_JSON, METRICS_CSV, REPORT_MD, RESULTS, STATUS
from .targets import AVERAGE_DATASETS, AVERAGE_NAME, PaperMatch, match_target

log = logging.getLogger(__name__)

CELL = re.compile(r"^(?:k(\d+)-)?s(\d+)$")  # grid.py::cell_name (no k: the task's own training set)
STD_DDOF = 0  # population std over seeds, as grid.py (and CoOp's parse_test_res.py) computes it

# (results key, column title); base/new/hm only exist for base-to-new runs, many/medium/few for long-tailed ones
METRICS: tuple[tuple[str, str], ...] = (
    ("top1", "top-1"), ("many", "many"), ("medium", "medium"), ("few", "few"),
    ("base", "base"), ("new", "new"), ("hm", "HM"), ("top5", "top-5"), ("ece", "ECE"),
)
METRIC_KEYS = tuple(k for k, _ in METRICS)


@dataclass
class Problem:
    """A folder that gave no numbers, and why (printed under the table)."""

    path: Path
    reason: str


@dataclass
class Run:
    """A finished run folder: its results.json, its config.yaml (as plain YAML) and its training time."""

    path: Path
    label: str
    results: dict[str, Any]
    config: dict[str, Any]
    train_seconds: float | None = None

    @property
    def main_split(self) -> str | None:
        """The split the top-level numbers come from (api.evaluate records it: test, else the first evaluated
        split)."""
        if isinstance(self.results.get("main_split"), str):
            return self.results["main_split"]
        splits = self.results.get("splits") or {}
        return "test" if "test" in splits else next(iter(splits), None)

    @property
    def model_name(self) -> str | None:
        """The model name as configured (ViT-B-16@openai), else the name the backbone recorded."""
        name = (self.config.get("model") or {}).get("name")
        recorded = self.results.get("model")
        return name or (recorded.get("name") if isinstance(recorded, dict) else recorded)

    def metrics(self) -> dict[str, float]:
        """The table's numbers: top-level results keys, plus top-5 from the main split."""
        out = {k: float(v) for k in METRIC_KEYS if isinstance(v := self.results.get(k), int | float)}
        split = (self.results.get("splits") or {}).get(self.main_split or "", {})
        if "top5" not in out and isinstance(split.get("top5"), int | float):
            out["top5"] = float(split["top5"])
        return out


@dataclass
class Grid:
    """A few-shot grid folder and its finished cells, keyed by (shots, seed)."""

    path: Path
    label: str
    cells: dict[tuple[int | None, int], Run] = field(default_factory=dict)  # shots None: the task's own train set


@dataclass
class Stat:
    mean: float
    std: float | None  # None for a single run
    n: int
    values: dict[int, float] = field(default_factory=dict)  # seed -> value (grids)

    def to_dict(self) -> dict[str, Any]:
        """grid.json's entry: mean, std, n and the values in seed order."""
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": list(self.values.values())}


@dataclass
class Row:
    """One table row: a run, or one shot count of a grid (mean ± std over its seeds)."""

    label: str
    kind: str  # run | grid | average
    path: Path | None
    method: str | None
    dataset: str | None
    model: str | None
    shots: int | None
    stats: dict[str, Stat]
    trainable_params: float | None
    train_seconds: float | None
    seeds: int = 1
    paper: PaperMatch | None = None
    runs: list[Run] = field(default_factory=list)  # the run folders behind the row (for plots)
    protocol: str = ""  # the protocol choices that differ from tailclip's defaults (results.json "protocol")
    split: str = ""  # the split top-1 / top-5 / ECE / many-medium-few come from (base / new / HM: test_base, test_new)


# ---------------------------------------------------------------------------------------------- reading folders
def _last_log_line(path: Path) -> str | None:
    log_file = path / "log.txt"
    if not log_file.is_file():
        return None
    try:
        lines = [ln.strip() for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    return lines[-1][-200:] if lines else None


def train_seconds(path: Path, results: dict[str, Any]) -> float | None:
    """A `train_seconds` entry when the method records one (in its own entry, results[<method>]), else the sum of
    metrics.csv's epoch_time_s."""
    for holder in (results, results.get("training") or {}, results.get(str(results.get("method"))) or {}):
        if isinstance(holder, dict) and isinstance(holder.get("train_seconds"), int | float):
            return float(holder["train_seconds"])
    csv_path = path / METRICS_CSV
    if not csv_path.is_file():
        return None
    try:
        with csv_path.open(newline="") as fh:
            times = [float(r["epoch_time_s"]) for r in csv.DictReader(fh) if r.get("epoch_time_s")]
    except (OSError, ValueError, KeyError, csv.Error) as exc:
        log.warning("%s: epoch_time_s not readable (%s); train time left out", csv_path, exc)
        return None
    return float(sum(times)) if times else None


def _status(path: Path) -> dict[str, Any]:
    """status.json of a run folder ({} when absent or unreadable: runs written before it existed)."""
    try:
        status = json.loads((path / STATUS).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return status if isinstance(status, dict) else {}


def read_run(path: Path, label: str | None = None) -> Run | Problem:
    """A finished run, or the reason it is not one (never raises for a bad folder)."""
    path = Path(path)
    res_path = path / RESULTS
    if not path.is_dir():
        return Problem(path, "does not exist" if not path.exists() else "not a folder")
    status = _status(path)
    if status.get("status") == "failed":  # (a failed run may have left an older results.json behind)
        return Problem(path, f"failed: {status.get('error') or 'no error recorded'}")
    if not res_path.is_file():
        last = _last_log_line(path)
        what = ("unfinished (running, or killed): no results.json" if status.get("status") == "running"
                else "unfinished or failed: no results.json")
        return Problem(path, what + (f"; log.txt ends with: {last}" if last else ""))
    try:
        results = json.loads(res_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Problem(path, f"results.json is not readable JSON ({exc})")
    if not isinstance(results, dict):
        return Problem(path, f"results.json holds a {type(results).__name__}, not a results object")
    config: dict[str, Any] = {}
    if (path / CONFIG).is_file():
        try:
            loaded = yaml.safe_load((path / CONFIG).read_text())
            config = loaded if isinstance(loaded, dict) else {}
        except (OSError, yaml.YAMLError) as exc:
            log.warning("%s/%s is not readable YAML (%s); paper targets cannot be matched", path, CONFIG, exc)
    return Run(path, label or path.name, results, config, train_seconds(path, results))


def _cell_order(key: tuple[int | None, int]) -> tuple[int, int]:
    return (-1 if key[0] is None else key[0], key[1])


def is_grid(path: Path) -> bool:
    return (path / GRID_JSON).is_file() or (
        not (path / CONFIG).is_file() and any(CELL.match(p.name) and p.is_dir() for p in path.iterdir()))


def read_grid(path: Path, label: str | None = None) -> tuple[Grid, list[Problem]]:
    """The grid's finished cells; unfinished or missing cells (those grid.json expects) become problems."""
    grid = Grid(path, label or path.name)
    problems: list[Problem] = []
    expected: set[tuple[int, int]] = set()
    if (path / GRID_JSON).is_file():
        try:
            meta = json.loads((path / GRID_JSON).read_text())
            expected = {(None if k is None else int(k), int(s)) for k in meta.get("shots", [])
                        for s in meta.get("seeds", [])}
        except (OSError, ValueError, TypeError, json.JSONDecodeError) as exc:
            problems.append(Problem(path / GRID_JSON, f"not readable ({exc}); cells found on disk are used"))
    found = {(None if m[1] is None else int(m[1]), int(m[2])): p
             for p in sorted(path.iterdir()) if p.is_dir() and (m := CELL.match(p.name))}
    for shots, seed in sorted(expected - set(found), key=_cell_order):
        name = f"s{seed}" if shots is None else f"k{shots}-s{seed}"
        problems.append(Problem(path / name, "grid cell missing (not started)"))
    for key, cell_path in sorted(found.items(), key=lambda item: _cell_order(item[0])):
        got = read_run(cell_path)
        if isinstance(got, Problem):
            problems.append(got)
        else:
            grid.cells[key] = got
    if not grid.cells:
        problems.append(Problem(path, "grid folder without any finished cell"))
    return grid, problems


def _is_run_like(path: Path) -> bool:
    return path.is_dir() and ((path / CONFIG).is_file() or (path / RESULTS).is_file() or is_grid(path))


def collect(paths: Sequence[Path | str], labels: Sequence[str] | None = None) -> tuple[list[Run | Grid], list[Problem]]:
    """Runs and grids in the order given. A folder that is neither (e.g. runs/demo) stands for the run and grid
    folders directly inside it, in name order; report folders written by `tailclip report` are skipped."""
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} paths")
    items: list[Run | Grid] = []
    problems: list[Problem] = []

    def add(path: Path, label: str | None) -> None:
        if path.is_dir() and is_grid(path):
            grid, grid_problems = read_grid(path, label)
            problems.extend(grid_problems)
            if grid.cells:
                items.append(grid)
            return
        got = read_run(path, label)
        (problems if isinstance(got, Problem) else items).append(got)

    for i, raw in enumerate(paths):
        path = Path(raw)
        label = labels[i] if labels is not None else None
        if path.is_dir() and not _is_run_like(path):
            children = [p for p in sorted(path.iterdir()) if _is_run_like(p) and not (p / REPORT_MD).is_file()]
            if not children:
                problems.append(Problem(path, "not a run folder, a grid folder or a folder of runs"))
            for child in children:
                add(child, None)
        else:
            add(path, label)
    return items, problems


# ---------------------------------------------------------------------------------------------- rows
def _run_row(run: Run) -> Row:
    res, cfg = run.results, run.config
    shots = (res.get("task_meta") or {}).get("shots", (cfg.get("data") or {}).get("shots"))
    params = res.get("trainable_params")
    row = Row(run.label, "run", run.path, res.get("method"), res.get("dataset"), run.model_name,
              None if shots is None else int(shots),
              {k: Stat(v, None, 1) for k, v in run.metrics().items()},
              float(params) if isinstance(params, int | float) else None, run.train_seconds, runs=[run])
    row.paper = match_target(cfg, res, {k: s.mean for k, s in row.stats.items()})
    row.protocol = protocol_of(res)
    row.split = run.main_split or ""
    return row


def protocol_of(results: dict[str, Any]) -> str:
    """The protocol choices a run changed from tailclip's defaults ("" for runs written before they were
    recorded, or with none changed)."""
    record = results.get("protocol")
    return str(record.get("differs", "")) if isinstance(record, dict) else ""


def _mean_or_none(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def seed_stat(values: Mapping[int, float | None]) -> Stat | None:
    """Mean and population std (ddof=0, as CoOp's parse_test_res.py) of a metric over seeds, seeds without the
    metric left out; None when none has it. The one aggregation over seeds: grids (grid.json, grid.md) and
    `tailclip report` both use it, so they always agree."""
    kept = {seed: float(v) for seed, v in values.items() if v is not None}
    if not kept:
        return None
    arr = np.asarray(list(kept.values()), dtype=np.float64)
    return Stat(float(arr.mean()), float(arr.std(ddof=STD_DDOF)), int(arr.size), kept)


def _grid_rows(grid: Grid) -> list[Row]:
    rows = []
    for shots in sorted({k for k, _ in grid.cells}, key=lambda k: -1 if k is None else k):
        cells = {seed: run for (k, seed), run in sorted(grid.cells.items(), key=lambda i: _cell_order(i[0]))
                 if k == shots}
        first = next(iter(cells.values()))
        stats = {}
        for key in METRIC_KEYS:
            stat = seed_stat({seed: run.metrics().get(key) for seed, run in cells.items()})
            if stat is not None:
                stats[key] = stat
        res = first.results
        row = Row(grid.label if shots is None else f"{grid.label} K={shots}", "grid", grid.path, res.get("method"),
                  res.get("dataset"), first.model_name, shots, stats,
                  _mean_or_none([r.results.get("trainable_params") for r in cells.values()]),
                  _mean_or_none([r.train_seconds for r in cells.values()]), seeds=len(cells), runs=list(cells.values()))
        row.paper = match_target(first.config, res, {k: s.mean for k, s in stats.items()}, shots=shots)
        row.protocol = " | ".join(sorted({protocol_of(r.results) for r in cells.values()}))
        row.split = " | ".join(sorted({r.main_split or "" for r in cells.values()}))
        rows.append(row)
    return rows


def _average_rows(rows: list[Row]) -> list[Row]:
    """Few-shot papers report the mean over CoOp's 11 datasets: one extra row per (method, model, shots) whose
    grids cover all 11, mean ± std over the seeds every dataset ran (per seed: the mean over datasets)."""
    groups: dict[tuple[Any, Any, Any], dict[str, Row]] = {}
    for row in rows:
        if row.kind == "grid" and row.dataset in AVERAGE_DATASETS:
            groups.setdefault((row.method, row.model, row.shots), {})[row.dataset] = row
    out = []
    for (method, model, shots), by_dataset in groups.items():
        if set(by_dataset) != set(AVERAGE_DATASETS):
            continue
        stats = {}
        for key in METRIC_KEYS:
            per = [r.stats[key].values for r in by_dataset.values() if key in r.stats]
            if len(per) != len(by_dataset):
                continue
            seeds = set.intersection(*(set(v) for v in per))
            stat = seed_stat({s: float(np.mean([v[s] for v in per])) for s in sorted(seeds)})
            if stat is not None:
                stats[key] = stat
        if not stats:
            continue
        row = Row(f"{method} {AVERAGE_NAME} K={shots}", "average", None, method, AVERAGE_NAME, model, shots, stats,
                  None, None, seeds=stats.get("top1", next(iter(stats.values()))).n)
        row.paper = match_target({"method": method, "model": {"name": model}, "data": {"name": AVERAGE_NAME}},
                                 {}, {k: s.mean for k, s in stats.items()}, shots=shots)
        out.append(row)
    return out


def build_rows(items: Sequence[Run | Grid]) -> list[Row]:
    rows: list[Row] = []
    for item in items:
        rows.extend(_grid_rows(item) if isinstance(item, Grid) else [_run_row(item)])
    return rows + _average_rows(rows)
