"""One self-contained HTML page: the table, paper notes, folders left out and every plot inlined as a
base64 PNG data URI, so the file can be mailed or attached without its plots folder."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from html import escape
from pathlib import Path

from .collect import Problem, Row
from .plots import caption, slug
from .tables import build_table

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { padding: 0.3em 0.7em; border-bottom: 1px solid #ddd; }
th { border-bottom: 2px solid #444; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 1em; vertical-align: top; }
figure img { max-width: 720px; }
figcaption { font-size: 0.8em; color: #555; }
"""


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render(rows: Sequence[Row], problems: Sequence[Problem], plots: Sequence[Path], notes: Sequence[str],
           title: str = "tailclip report") -> str:
    """The page; `plots` are PNG files (their SVG twins stay next to them), `notes` say what was left out."""
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{escape(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
           f"<h1>{escape(title)}</h1>"]
    if rows:
        table = build_table(rows)
        if table.shared:
            out.append("<p>All rows: " + escape(", ".join(f"{k} {v}" for k, v in table.shared)) + ".</p>")
        if any(r.kind != "run" for r in rows):
            out.append("<p>Grid rows: mean ± std over seeds (population std, ddof=0).</p>")
        out += ["<table>", "<thead>", "<tr>" + "".join(f"<th>{escape(c.title)}</th>" for c in table.columns)
                + "</tr>", "</thead>", "<tbody>"]
        for row in table.rows:
            cells = "".join(f'<td class="num">{escape(c.cell(row))}</td>' if c.numeric else
                            f"<td>{escape(c.cell(row))}</td>" for c in table.columns)
            out.append(f"<tr>{cells}</tr>")
        out += ["</tbody>", "</table>"]
        if table.notes:
            out += ["<p>Paper targets (difference: this run minus the paper):</p>", "<ol>"]
            out += [f"<li>{escape(n)}</li>" for n in table.notes] + ["</ol>"]
    else:
        out.append("<p>No finished run to report.</p>")
    if problems:
        out += ["<h2>Not included</h2>", "<ul>"]
        out += [f"<li><code>{escape(str(p.path))}</code>: {escape(p.reason)}</li>" for p in problems] + ["</ul>"]
    pngs = [p for p in plots if p.suffix == ".png"]
    if pngs or notes:
        out.append("<h2>Plots</h2>")
    labels = {slug(r.label): r.label for r in rows}
    for png in pngs:
        text = caption(png.stem, labels)
        out.append(f'<figure><img src="{data_uri(png)}" alt="{escape(text)}">'
                   f"<figcaption>{escape(text)}</figcaption></figure>")
    if notes:
        out += ["<ul>"] + [f"<li>{escape(n)}</li>" for n in notes] + ["</ul>"]
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"
