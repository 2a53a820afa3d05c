"""`report_runs`: run and grid folders -> report.md + report.csv (always), report.tex and report.html (on request)
and the plots, in one output folder."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError
from ..io import atomic_write_text
from ..runfiles import PLOTS, REPORT_FILES
from . import html, tables
from .collect import build_rows, collect
from .plots import PlotsUnavailable, report_plots

log = logging.getLogger(__name__)

FORMATS = ("md", "csv", "latex", "html")
ALWAYS = ("md", "csv")


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
    """The formats to write: md and csv always, plus any of latex / html asked for ("md,csv,latex,html")."""
    asked = [f.strip().lower() for f in (text.split(",") if isinstance(text, str) else text) if f.strip()]
    unknown = [f for f in asked if f not in FORMATS]
    if unknown:
        raise ConfigError(f"unknown report format(s) {', '.join(map(repr, unknown))}; choose from {', '.join(FORMATS)}")
    return tuple(f for f in FORMATS if f in ALWAYS or f in asked)


def report_runs(paths: Sequence[str | Path], out: str | Path, formats: str | Sequence[str] = ALWAYS,
                labels: Sequence[str] | None = None, plots: bool = True) -> dict[str, Path]:
    """Write the report of `paths` (run folders, grid folders, or folders holding them) into `out`.

    Returns {file name relative to `out`: path} for every file written ("report.md", "plots/…png"). Unfinished
    or unreadable folders are listed in the report, never raised; without matplotlib the tables are written
    and the report says how to get the plots."""
    out = Path(out)
    fmts = parse_formats(formats)
    items, problems = collect(paths, labels)
    rows = build_rows(items)
    plot_files: list[Path] = []
    notes: list[str] = []
    if plots and rows:
        try:
            plot_files, notes = report_plots(rows, out / PLOTS)
        except PlotsUnavailable as exc:
            notes = [f"plots not written: {exc}"]
    extra: list[str] = []
    if plot_files or notes:
        extra += ["## Plots", ""]
        extra += [f"- [{p.name}]({p.relative_to(out).as_posix()})" for p in plot_files if p.suffix == ".png"]
        extra += [f"- {n}" for n in notes] + [""]
        extra += [] if not plot_files else [f"Every plot is also written as SVG next to its PNG ({out / 'plots'})."]
    texts = {
        "md": lambda: tables.markdown(rows, problems, extra=extra),
        "csv": lambda: tables.to_csv(rows),
        "latex": lambda: tables.latex(rows, problems),
        "html": lambda: html.render(rows, problems, plot_files, notes),
    }
    written: dict[str, Path] = {}
    for fmt in fmts:
        path = out / REPORT_FILES[fmt]
        atomic_write_text(path, texts[fmt]())
        written[REPORT_FILES[fmt]] = path
    written.update({p.relative_to(out).as_posix(): p for p in plot_files})
    for problem in problems:
        log.warning("not in the report: %s: %s", problem.path, problem.reason)
    return written
