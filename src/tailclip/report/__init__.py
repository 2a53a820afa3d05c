"""Reports people read: comparison tables (Markdown, CSV, LaTeX, HTML), plots, and paper targets side by side.

`report_runs(paths, out, formats)` writes a whole report (used by `tailclip report` and `tailclip demo`);
`write_run_plots(run_dir)` draws one finished run's plots into its own folder. Reports read only what runs
write (results.json, config.yaml, metrics.csv, saved logits, prior.json), never logs."""

from .plots import write_run_plots
from .tables import format_table
from .writer import FORMATS, report_runs

__all__ = ["FORMATS", "format_table", "report_runs", "write_run_plots"]
