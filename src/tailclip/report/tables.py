"""Tables from report rows: Markdown (what people read), CSV (every number at full precision, a fixed set of
columns for scripts), LaTeX (booktabs, for papers), and the small fixed-width console table of one run.

Markdown and LaTeX leave out the columns no row has (a long-tailed report shows no base/new/HM) and the
identity columns every row shares (named once above the table instead); CSV keeps all of them."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .collect import METRIC_KEYS, METRICS, Problem, Row

SUMMARY_KEYS = ("top1", "many", "medium", "few")


def format_table(rows: list[tuple[str, dict[str, Any]]], keys: tuple[str, ...] = SUMMARY_KEYS) -> str:
    """A small fixed-width table of results (percent), one row per (label, results): the end of a run."""
    width = max([len(label) for label, _ in rows] + [6])
    lines = [f"{'':<{width}}  " + "  ".join(f"{k:>7}" for k in keys)]
    for label, res in rows:
        cells = ["    n/a" if res.get(k) is None else f"{res[k]:7.2f}" for k in keys]
        lines.append(f"{label:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- cell text
def fmt_params(n: float | None) -> str:
    return "" if n is None else f"{round(n):,}"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return ""
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def fmt_stat(row: Row, key: str, pm: str = " ± ") -> str:
    stat = row.stats.get(key)
    if stat is None:
        return ""
    return f"{stat.mean:.2f}" if stat.std is None else f"{stat.mean:.2f}{pm}{stat.std:.2f}"


@dataclass
class Column:
    title: str
    cell: Callable[[Row], str]
    numeric: bool = True


@dataclass
class Table:
    """The columns shown (after dropping empty and shared ones), what every row shares, and the paper notes."""

    columns: list[Column]
    shared: list[tuple[str, str]]  # (name, value) common to every row
    notes: list[str]  # paper-target footnotes, [1] ... in order of first use
    rows: list[Row]


def build_table(rows: Sequence[Row], pm: str = " ± ", delta: str = "Δ") -> Table:
    notes: list[str] = []
    note_of: dict[int, int] = {}
    for row in rows:
        if row.paper is not None:
            key = id(row)
            note_of[key] = len(notes) + 1
            notes.append(_paper_note(row))

    def paper_cell(row: Row) -> str:
        return "" if row.paper is None else f"{row.paper.value:.2f} [{note_of[id(row)]}]"

    def diff_cell(row: Row) -> str:
        return "" if row.paper is None or row.paper.diff is None else f"{row.paper.diff:+.2f}"

    identity = [("method", lambda r: r.method or ""), ("dataset", lambda r: r.dataset or ""),
                ("model", lambda r: r.model or ""), ("K", lambda r: "" if r.shots is None else str(r.shots)),
                ("protocol", lambda r: r.protocol), ("top-1 split", lambda r: r.split)]
    columns = [Column("run", lambda r: r.label, numeric=False)]
    shared: list[tuple[str, str]] = []
    for name, get in identity:
        values = {get(r) for r in rows}
        if len(values) == 1 and len(rows) > 1:
            if (value := values.pop()):
                shared.append((name, value))
        elif any(get(r) for r in rows):
            columns.append(Column(name, get, numeric=name == "K"))
    if any(r.kind != "run" for r in rows):
        columns.append(Column("seeds", lambda r: "" if r.kind == "run" else str(r.seeds)))
    for key, title in METRICS:
        if any(key in r.stats for r in rows):
            columns.append(Column(title, lambda r, k=key: fmt_stat(r, k, pm)))
    if any(r.trainable_params is not None for r in rows):
        columns.append(Column("trainable params", lambda r: fmt_params(r.trainable_params)))
    if any(r.train_seconds is not None for r in rows):
        columns.append(Column("train time", lambda r: fmt_seconds(r.train_seconds)))
    if notes:
        columns += [Column("paper", paper_cell), Column(delta, diff_cell)]
    return Table(columns, shared, notes, list(rows))


def _paper_note(row: Row) -> str:
    assert row.paper is not None
    m = row.paper
    parts = [f"{key} {paper:.2f}" + ("" if d is None else f" ({d:+.2f})") for key, (paper, d) in m.diffs.items()]
    preset = f"preset {m.target.preset}; " if m.target.preset else ""
    text = f"{row.label}: {m.target.source}; {preset}paper {', '.join(parts)}"
    if m.deviations:
        text += "; this run differs from the paper's protocol in " + ", ".join(m.deviations)
    return text


# ---------------------------------------------------------------------------------------------- markdown
def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(rows: Sequence[Row], problems: Sequence[Problem], title: str = "tailclip report",
             extra: Sequence[str] = ()) -> str:
    """The report as Markdown: shared settings, the table, paper notes, folders not included, extra lines."""
    lines = [f"# {title}", ""]
    if rows:
        table = build_table(rows)
        header = ["All rows: " + ", ".join(f"{k} {v}" for k, v in table.shared) + "."] if table.shared else []
        if any(r.kind != "run" for r in rows):
            header.append("Grid rows: mean ± std over seeds (population std, ddof=0).")
        if header:
            lines += [" ".join(header), ""]
        lines.append("| " + " | ".join(_md_escape(c.title) for c in table.columns) + " |")
        lines.append("|" + "|".join("---:" if c.numeric else "---" for c in table.columns) + "|")
        for row in table.rows:
            lines.append("| " + " | ".join(_md_escape(c.cell(row)) for c in table.columns) + " |")
        lines.append("")
        if table.notes:
            lines += ["Paper targets (difference: this run minus the paper):", ""]
            lines += [f"[{i}] {_md_escape(n)}  " for i, n in enumerate(table.notes, 1)] + [""]
    else:
        lines += ["No finished run to report.", ""]
    if problems:
        lines += ["## Not included", ""] + [f"- `{p.path}`: {p.reason}" for p in problems] + [""]
    lines += list(extra)
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------- csv
CSV_COLUMNS = ("run", "kind", "path", "method", "dataset", "model", "shots", "seeds",
               *[c for k in METRIC_KEYS for c in (k, f"{k}_std")],
               "trainable_params", "train_seconds", "paper_metric", "paper_value", "paper_diff", "paper_source",
               "protocol", "top1_split")


def _num(v: float | None) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(v)


def to_csv(rows: Sequence[Row]) -> str:
    """Every row with the same columns, numbers at full precision (repr), empty where a row has none."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        cells: list[str] = [r.label, r.kind, "" if r.path is None else str(r.path), r.method or "", r.dataset or "",
                            r.model or "", _num(r.shots), str(r.seeds)]
        for key in METRIC_KEYS:
            stat = r.stats.get(key)
            cells += [_num(stat.mean if stat else None), _num(stat.std if stat else None)]
        params = None if r.trainable_params is None else (
            int(r.trainable_params) if float(r.trainable_params).is_integer() else r.trainable_params)
        cells += [_num(params), _num(r.train_seconds)]
        m = r.paper
        cells += ["", "", "", ""] if m is None else [m.target.metric, _num(m.value), _num(m.diff), m.target.source]
        writer.writerow([*cells, r.protocol, r.split])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- latex
_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text)


def latex(rows: Sequence[Row], problems: Sequence[Problem], caption: str = "tailclip report") -> str:
    """A booktabs table (\\usepackage{booktabs}); paper notes and left-out folders as % comments."""
    table = build_table(rows, pm=" $\\pm$ ", delta="$\\Delta$")
    spec = "".join("r" if c.numeric else "l" for c in table.columns)
    shared = ("; ".join(f"{k} {v}" for k, v in table.shared))
    lines = ["% tailclip report (needs \\usepackage{booktabs})", r"\begin{table}[t]", r"\centering",
             rf"\caption{{{tex_escape(caption + (': ' + shared if shared else ''))}}}",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(c.title if c.title.startswith("$") else tex_escape(c.title) for c in table.columns)
             + r" \\", r"\midrule"]
    for row in table.rows:
        lines.append(" & ".join(_tex_cell(c, row) for c in table.columns) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    lines += [f"% [{i}] {n}" for i, n in enumerate(table.notes, 1)]
    lines += [f"% not included: {p.path}: {p.reason}" for p in problems]
    return "\n".join(lines) + "\n"


def _tex_cell(col: Column, row: Row) -> str:
    text = col.cell(row)
    return text if "$\\pm$" in text else tex_escape(text)
