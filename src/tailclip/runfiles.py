"""Every file name in a run, grid and report folder, in one module that imports nothing (no torch): the engine
and the orchestrator write these files, `tailclip report` reads them without loading torch."""

from __future__ import annotations

# a run folder
CONFIG = "config.yaml"  # the resolved configuration
STATUS = "status.json"  # running | finished | failed (with the error)
RESULTS = "results.json"  # every metric and record of a finished run
METRICS_CSV = "metrics.csv"  # one row per training epoch
WEIGHTS = "checkpoint.safetensors"  # what the method trained
META = "checkpoint.json"  # what the checkpoint was built from (TaskInfo, backbone fingerprint, ...)
RESUME = "resume.pt"  # the state `--resume auto` continues from
SHOT_INDICES = "shot_indices.json"  # the exact K-shot draw
PRIOR_JSON = "prior.json"  # GLA's estimated label prior
TENSORBOARD = "tensorboard"  # folder (train.tensorboard=true)
PLOTS = "plots"  # folder of the run's (or report's) plots
EVALS = "evals"  # folder of later `tailclip eval --checkpoint` runs

# a grid folder (one run folder per shots x seed cell)
GRID_JSON = "grid.json"
GRID_MD = "grid.md"

# a report folder (`tailclip report`; a table's and the demo's is REPORT_DIR inside their folder)
REPORT_DIR = "report"
REPORT_FILES = {"md": "report.md", "csv": "report.csv", "latex": "report.tex", "html": "report.html"}
REPORT_MD = REPORT_FILES["md"]


def logits_file(split: str) -> str:
    """The saved logits of one evaluated split."""
    return f"logits_{split}.safetensors"
