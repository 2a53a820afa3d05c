"""Table files: one command for a paper's comparison or ablation table (`tailclip table FILE.yaml`).

A table file names its rows, each a preset and/or overrides, and the grid every row runs (seeds, and shot counts
for few-shot tables). Every row becomes a grid folder (`grid.py`) inside the table folder, and the table is the
report of those grids (`report/`): mean ± std over seeds per row, in the order of the file.

    title: Sage ablation (Table 5), CIFAR-100-LT beta = 100
    config: cifar100_lt_ir100.yaml      # preset of every row, relative to this file (a row may name its own;
                                        # `--config` on the command line replaces it)
    overrides: [train.epochs=10]        # applied to every row
    seeds: [1, 2, 3]
    shots: [1, 4, 16]                   # optional: few-shot tables
    rows:
      LIFT: [sage.adapter=adaptformer, sage.init=lift]
      +FIT: []                          # the preset as it is
      zero-shot: {config: ../zeroshot.yaml, overrides: [...]}

Overrides apply in the order preset <- table overrides <- row overrides <- command line, so the command line
(`--root`, `train.epochs=1`) reaches every row. Rows that finished with the same configuration are reused, so an
interrupted table continues; a finished row of another configuration is an error unless `--overwrite`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .api import load_config  # (through the api: configs loaded there know every method)
from .config import RunConfig
from .errors import ConfigError
from .grid import run_grid
from .runfiles import REPORT_DIR

log = logging.getLogger(__name__)

KEYS = ("title", "config", "overrides", "seeds", "shots", "rows")
ROW_KEYS = ("config", "overrides")


@dataclass
class TableRow:
    name: str
    config: Path | None
    overrides: list[str] = field(default_factory=list)

    @property
    def folder(self) -> str:
        """The row's grid folder name: the row name with anything but letters, digits, '.', '-' and '_' dropped."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.name).strip("_") or "row"


@dataclass
class TableSpec:
    path: Path
    title: str
    rows: list[TableRow]
    seeds: list[int]
    shots: list[int] | None = None
    overrides: list[str] = field(default_factory=list)


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of key=value strings, got {value!r}")
    return list(value)


def _ints(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value):
        raise ConfigError(f"{where} must be a non-empty list of integers, got {value!r}")
    return list(value)


def _preset(value: Any, base: Path, where: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a path to a preset, got {value!r}")
    path = (base / value).resolve()
    if not path.is_file():
        raise ConfigError(f"{where}: preset {value!r} not found (looked for {path})")
    return path


def load_table(path: str | Path, preset: str | Path | None = None) -> TableSpec:
    """Parse and check a table file; every mistake is a ConfigError naming the file and the key.

    `preset` replaces the file's `config` (rows naming their own preset keep it): one ablation file serves every
    dataset's preset (`tailclip table configs/sage/ablation.yaml --config configs/sage/places_lt.yaml`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"table file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"table file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"table file {path} must hold a mapping with {', '.join(KEYS)}")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; a table file has {', '.join(KEYS)}")
    base = path.parent
    if preset is not None and not Path(preset).is_file():
        raise ConfigError(f"config file not found: {preset}")
    default = Path(preset).resolve() if preset is not None else _preset(raw.get("config"), base, f"{path}: config")
    rows_raw = raw.get("rows")
    if not isinstance(rows_raw, dict) or not rows_raw:
        raise ConfigError(f"{path}: rows must map each row name to its overrides (a list) or to "
                          "{config: ..., overrides: [...]}")
    rows = []
    for name, spec in rows_raw.items():
        where = f"{path}: rows.{name}"
        if isinstance(spec, dict):
            bad = sorted(set(spec) - set(ROW_KEYS))
            if bad:
                raise ConfigError(f"{where}: unknown key(s) {', '.join(bad)}; a row has {', '.join(ROW_KEYS)}")
            config = _preset(spec.get("config"), base, f"{where}.config") or default
            overrides = _strings(spec.get("overrides"), f"{where}.overrides")
        else:
            config, overrides = default, _strings(spec, where)
        rows.append(TableRow(str(name), config, overrides))
    folders = [r.folder for r in rows]
    clash = sorted({f for f in folders if folders.count(f) > 1})
    if clash:
        raise ConfigError(f"{path}: row names that map to the same folder ({', '.join(clash)}); rename them")
    shots = _ints(raw["shots"], f"{path}: shots") if raw.get("shots") is not None else None
    return TableSpec(path, str(raw.get("title") or path.stem), rows, _ints(raw.get("seeds", [1]), f"{path}: seeds"),
                     shots, _strings(raw.get("overrides"), f"{path}: overrides"))


def row_config(spec: TableSpec, row: TableRow, cli: Sequence[str] = ()) -> RunConfig:
    """The row's run configuration: preset <- table overrides <- row overrides <- command line."""
    try:
        return load_config(row.config, [*spec.overrides, *row.overrides, *cli])
    except ConfigError as exc:
        raise ConfigError(f"{spec.path}: row {row.name!r}: {exc}") from None


def run_table(spec: TableSpec, output_dir: str | Path, cli: Sequence[str] = (), name: str | None = None,
              seeds: Sequence[int] | None = None, shots: Sequence[int] | None = None, plots: bool = True,
              run_fn: Callable[..., Path] | None = None, overwrite: bool = False) -> Path:
    """Run every row's grid into `<output_dir>/<name>/<row>`, then write the table's report into its `report/`.

    Every row's configuration is checked before the first run starts, so a typo in the last row fails at once."""
    from .report import report_runs

    configs = [row_config(spec, row, cli) for row in spec.rows]
    table_dir = Path(output_dir) / (name or spec.path.stem)
    seeds = list(seeds or spec.seeds)
    grid_shots: list[int | None] = list(shots or spec.shots or [None])
    for row, cfg in zip(spec.rows, configs, strict=True):
        log.info("table %s: row %s", spec.title, row.name)
        cfg.output_dir = str(table_dir)
        cfg.run_name = row.folder
        run_grid(cfg, grid_shots, seeds, run_fn=run_fn, overwrite=overwrite)
    report_runs([table_dir / row.folder for row in spec.rows], table_dir / REPORT_DIR,
                labels=[row.name for row in spec.rows], plots=plots)
    return table_dir
