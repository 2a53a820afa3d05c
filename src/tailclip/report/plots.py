"""Plots of runs and grids, each as PNG and SVG, from the files a run writes (results.json, saved logits,
prior.json). matplotlib (a dependency) is imported only here, when a plot is
drawn; figures are built with `matplotlib.figure.Figure` (the Agg renderer, no pyplot state), so plotting
never changes the backend of a notebook that calls it.

A plot that cannot be drawn from what a run saved is left out with a note saying what is missing; it never
stops the report or the run."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import TailclipError
from ..runfiles import PLOTS, PRIOR_JSON
from .collect import Problem, Row, Run, read_run

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

FORMATS = ("png", "svg")
MANY, FEW = 100, 20  # data.groups: many > 100, few < 20 training images
BAND_COLORS = {"few": "#fbe3d6", "medium": "#fdf3d0", "many": "#dcebf7"}
RELIABILITY_BINS = 15  # engine.metrics.expected_calibration_error's default
INSTALL_HINT = "pip install 'matplotlib>=3.8' (a tailclip dependency)"


class PlotsUnavailable(TailclipError):
    """matplotlib is not installed."""


def _figure(width: float = 7.0, height: float = 4.0) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotsUnavailable(f"plots need matplotlib, which is not installed: {INSTALL_HINT}") from None
    return Figure(figsize=(width, height), layout="constrained")


def require_matplotlib() -> None:
    """Raise PlotsUnavailable (naming the pip command) when matplotlib cannot be imported."""
    _figure()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def _save(fig: Figure, out_dir: Path, name: str) -> list[Path]:
    import matplotlib

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG text stays text: editable, smaller, faster
        for fmt in FORMATS:
            path = out_dir / f"{name}.{fmt}"
            fig.savefig(path, format=fmt, dpi=110)
            paths.append(path)
    return paths


# 14 distinct colours (Paul Tol's bright and muted sets, colour-blind safe): a report of up to 14 runs never gives
# two of them one colour; beyond that the cycle repeats
PALETTE = ("#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb", "#000000", "#332288",
           "#117733", "#882255", "#ddaa33", "#44aa99", "#999933")


def _colors(n: int) -> list[str]:
    return [PALETTE[i % len(PALETTE)] for i in range(n)]


def by_task(items: Sequence[Any], task: Callable[[Any], str | None]) -> list[tuple[str, list[Any]]]:
    """Items grouped by task (dataset), in order of first appearance: a comparison plot holds runs of one task
    (runs of different tasks have different classes and groups); the suffix names the task when there are
    several ("" when one)."""
    groups: dict[str, list[Any]] = {}
    for item in items:
        groups.setdefault(task(item) or "", []).append(item)
    if len(groups) <= 1:
        return [("", list(items))] if items else []
    return [(f"_{slug(name or 'unknown')}", members) for name, members in groups.items()]


# ---------------------------------------------------------------------------------------------- run data
def _main_split_entry(run: Run) -> dict[str, Any]:
    return (run.results.get("splits") or {}).get(run.main_split or "", {})


def train_counts(run: Run) -> np.ndarray | None:
    """Training images per class: the main split's train_counts (LT runs), else task_meta.counts (base-to-new, or a
    long-tailed task a K-shot run drew from: then at most K per class, what the run trained on)."""
    meta = run.results.get("task_meta") or {}
    counts = _main_split_entry(run).get("train_counts") or meta.get("counts")
    if counts is None:
        return None
    counts = np.asarray(counts, dtype=np.float64)
    shots = meta.get("shots")
    return np.minimum(counts, float(shots)) if isinstance(shots, int | float) else counts


def _saved_logits(run: Run) -> tuple[Any, str] | None:
    """(SavedLogits, split) of the main split, or of the first split whose logits the run saved."""
    from ..engine.runs import RunDir

    splits = [run.main_split, *(run.results.get("splits") or {})]
    rd = RunDir(run.path)
    for split in [s for s in splits if s]:
        saved = rd.load_logits(split)
        if saved is not None:
            return saved, split
    return None


# ---------------------------------------------------------------------------------------------- comparison plots
def _bands(ax: Axes, lo: float, hi: float) -> None:
    """Shade few (< 20), medium (20-100) and many (> 100) training images on a log x axis."""
    for name, a, b in (("few", lo, FEW), ("medium", FEW, MANY), ("many", MANY, hi)):
        if b > a:
            ax.axvspan(a, b, color=BAND_COLORS[name], zorder=0)
            ax.text(math.sqrt(max(a, 1e-9) * b), 1.01, name, transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=8)


def plot_per_class(runs: Sequence[Run], out_dir: Path,
                   name: str = "per_class_accuracy") -> tuple[list[Path], list[str]]:
    """Per-class top-1 against training images per class (log x), one line per run: the mean over classes in
    log-spaced count bins, with every class as a faint dot."""
    left_out, series = [], []
    for run in runs:
        counts, acc = train_counts(run), _main_split_entry(run).get("per_class_top1")
        if counts is None or acc is None or len(acc) != len(counts):
            left_out.append(run.label)
            continue
        idx = np.flatnonzero(np.array([a is not None for a in acc]) & (counts > 0))
        series.append((run.label, counts[idx], np.asarray([acc[i] for i in idx], dtype=np.float64)))
    notes = [("left out of the per-class plot (no per-class accuracy with train counts in results.json; K-shot "
              f"and balanced runs have none): {', '.join(left_out)}")] if left_out else []
    if not series:
        return [], notes
    fig = _figure()
    ax = fig.add_subplot()
    all_counts = np.concatenate([c for _, c, _ in series])
    lo, hi = float(all_counts.min()) / 1.3, float(all_counts.max()) * 1.3
    _bands(ax, lo, hi)
    edges = np.geomspace(lo, hi, 13)
    for (label, counts, acc), color in zip(series, _colors(len(series)), strict=True):
        ax.scatter(counts, acc, s=6, alpha=0.25, color=color, linewidths=0)
        which = np.digitize(counts, edges)
        xs, ys = [], []
        for b in np.unique(which):
            sel = which == b
            xs.append(float(np.exp(np.log(counts[sel]).mean())))
            ys.append(float(acc[sel].mean()))
        ax.plot(xs, ys, marker="o", markersize=3, color=color, label=label)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, 100)
    ax.set_xlabel("training images per class (log)")
    ax.set_ylabel("per-class top-1 (%)")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, out_dir, name), notes


def _grouped_bars(rows: Sequence[Row], keys: Sequence[str], titles: Sequence[str], ylabel: str, out_dir: Path,
                  name: str) -> list[Path]:
    fig = _figure(max(6.0, 1.2 + 0.9 * len(rows) * len(keys) / 3), 4.0)
    ax = fig.add_subplot()
    width = 0.8 / len(rows)
    x = np.arange(len(keys))
    for i, (row, color) in enumerate(zip(rows, _colors(len(rows)), strict=True)):
        means = [row.stats[k].mean if k in row.stats else np.nan for k in keys]
        stds = [row.stats[k].std or 0.0 if k in row.stats else 0.0 for k in keys]
        err = stds if any(row.stats[k].std is not None for k in keys if k in row.stats) else None
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, means, width, yerr=err, capsize=2, color=color,
               label=row.label)
    ax.set_xticks(x, list(titles))
    ax.set_ylim(0, 100)
    ax.set_ylabel(ylabel)
    fig.legend(fontsize=8, loc="outside right upper")  # outside the axes, inside the figure: never cut
    return _save(fig, out_dir, name)


def plot_groups(rows: Sequence[Row], out_dir: Path) -> list[Path]:
    """Many / medium / few top-1 bars of the compared runs (± std for grid rows), one plot per task."""
    rows = [r for r in rows if any(k in r.stats for k in ("many", "medium", "few")) and "hm" not in r.stats]
    paths: list[Path] = []
    for suffix, group in by_task(rows, lambda r: r.dataset):
        paths += _grouped_bars(group, ("many", "medium", "few"), ("many (>100)", "medium (20-100)", "few (<20)"),
                               "top-1 (%)", out_dir, f"many_medium_few{suffix}")
    return paths


def plot_base_new(rows: Sequence[Row], out_dir: Path) -> list[Path]:
    """Base / new / harmonic-mean bars of base-to-new runs, one plot per task."""
    rows = [r for r in rows if "hm" in r.stats]
    paths: list[Path] = []
    for suffix, group in by_task(rows, lambda r: r.dataset):
        paths += _grouped_bars(group, ("base", "new", "hm"), ("base", "new", "HM"), "top-1 (%)", out_dir,
                               f"base_new_hm{suffix}")
    return paths


def plot_shots(rows: Sequence[Row], out_dir: Path, metric: str = "top1") -> list[Path]:
    """Accuracy against shots (log2 x) for each grid, mean line with a ± std band over seeds."""
    curves: dict[tuple[Any, str], list[Row]] = {}
    for row in rows:
        if row.kind in ("grid", "average") and row.shots is not None and metric in row.stats:
            key = (row.path, row.label.rsplit(" K=", 1)[0])
            curves.setdefault(key, []).append(row)
    if not curves:
        return []
    fig = _figure()
    ax = fig.add_subplot()
    for ((_, label), crow), color in zip(curves.items(), _colors(len(curves)), strict=True):
        crow = sorted(crow, key=lambda r: r.shots or 0)
        k = np.array([r.shots for r in crow], dtype=np.float64)
        mean = np.array([r.stats[metric].mean for r in crow])
        std = np.array([r.stats[metric].std or 0.0 for r in crow])
        ax.plot(k, mean, marker="o", color=color, label=label)
        ax.fill_between(k, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    ax.set_xscale("log", base=2)
    shots = sorted({r.shots for rs in curves.values() for r in rs if r.shots})
    ax.set_xticks(shots, [str(s) for s in shots])
    ax.set_xlabel("shots per class")
    ax.set_ylabel(f"{'top-1' if metric == 'top1' else metric} (%), mean ± std over seeds")
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "accuracy_vs_shots")


# ---------------------------------------------------------------------------------------------- per-run plots
def _class_order(run: Run, n: int) -> tuple[np.ndarray, str]:
    counts = train_counts(run)
    if counts is not None and len(counts) == n and len(set(counts.tolist())) > 1:
        return np.argsort(-counts, kind="stable"), "classes by training images (most first)"
    return np.arange(n), "class index"


def plot_predictions(run: Run, out_dir: Path, name: str) -> tuple[list[Path], list[str]]:
    """How often each class is predicted against how often it is the label (saved logits): label bias shows as
    predictions piling on the head classes."""
    got = _saved_logits(run)
    if got is None:
        return [], [f"{run.label}: no saved logits; predicted-class histogram left out"]
    saved, split = got
    n = saved.logits.shape[1]
    pred = np.bincount(saved.logits.argmax(1).numpy(), minlength=n)
    true = np.bincount(saved.labels.numpy(), minlength=n)
    order, xlabel = _class_order(run, n)
    fig = _figure(7.0, 3.5)
    ax = fig.add_subplot()
    x = np.arange(n)
    ax.step(x, true[order], where="mid", color="#4477aa", label="true labels")
    ax.step(x, pred[order], where="mid", color="#ee6677", label="predicted")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{split} images")
    ax.set_title(f"{run.label}: predicted vs true class ({split})", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, name), []


def _prior(run: Run) -> list[float] | None:
    path = run.path / PRIOR_JSON
    if path.is_file():
        try:
            return list(json.loads(path.read_text())["prior"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s is not readable (%s); using results.json's gla.prior", path, exc)
    return (run.results.get("gla") or {}).get("prior")


def plot_prior(run: Run, out_dir: Path, name: str) -> tuple[list[Path], list[str]]:
    """GLA's estimated pretraining label prior q against the class frequencies of the training split."""
    q = _prior(run)
    if q is None:
        return [], [f"{run.label}: GLA run without prior.json or gla.prior; prior plot left out"]
    q = np.asarray(q, dtype=np.float64)
    order, xlabel = _class_order(run, len(q))
    fig = _figure(7.0, 3.5)
    ax = fig.add_subplot()
    x = np.arange(len(q))
    ax.bar(x, q[order], width=1.0, color="#4477aa", label="estimated prior q")
    counts = train_counts(run)
    if counts is not None and len(counts) == len(q) and counts.sum() > 0:
        ax.plot(x, (counts / counts.sum())[order], color="#ee6677", label="training class frequency")
    ax.axhline(1.0 / len(q), color="#333333", linestyle="--", linewidth=1, label="uniform")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("probability")
    ax.set_title(f"{run.label}: GLA label prior", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, name), []


def _reliability_panels(run: Run) -> tuple[list[tuple[str, Any]], Any, str, list[str]]:
    """(title, logits) panels before and after calibration, the labels, the split, and what is missing.

    Debiased zero-shot saves z/T_zs - log q (+ log p_t): adding log q back (and taking p_t out) gives the
    calibrated z/T_zs, times T_zs the raw zero-shot logits. An ensemble saves only the sum, so its zero-shot
    part cannot be recovered; the fine-tuned part comes from the fine-tuned run's own saved logits and T_ft."""
    import torch

    from ..engine.runs import RunDir

    got = _saved_logits(run)
    if got is None:
        return [], None, "", [f"{run.label}: no saved logits; reliability diagram left out"]
    saved, split = got
    gla = run.results.get("gla") or {}
    mode = gla.get("mode") or (run.config.get("gla") or {}).get("mode")
    notes: list[str] = []
    panels: list[tuple[str, Any]] = []
    if mode == "ensemble":
        ft_path, t_ft = gla.get("finetuned_run"), gla.get("temperature_ft")
        ft = RunDir(ft_path).load_logits(split) if ft_path and Path(ft_path).is_dir() else None
        if ft is None:
            notes.append(f"{run.label}: the fine-tuned run's {split} logits ({ft_path}) are not there; "
                         "its before/after panels are left out")
        elif not torch.equal(ft.labels, saved.labels):
            notes.append(f"{run.label}: the fine-tuned run's {split} logits cover other images; left out")
        else:
            panels.append(("fine-tuned, T=1", ft.logits))
            if t_ft:
                panels.append((f"fine-tuned / T_ft (T={t_ft:.2f})", ft.logits / float(t_ft)))
            else:
                notes.append(f"{run.label}: results.json has no gla.temperature_ft; calibrated panel left out")
        notes.append(f"{run.label}: an ensemble run saves only the combined logits, so the zero-shot "
                     "before/after panels are left out (a debiased_zeroshot run shows them)")
        panels.append(("GLA ensemble", saved.logits))
        return panels, saved.labels, split, notes
    t_zs, q = gla.get("temperature_zs"), _prior(run)
    target = gla.get("target_prior", "uniform")
    log_pt: Any = 0.0
    if target == "train":
        counts = train_counts(run)
        if counts is None or len(counts) != saved.logits.shape[1]:
            t_zs = None
            notes.append(f"{run.label}: gla.target_prior=train but no train counts in results.json")
        else:
            log_pt = torch.as_tensor(np.log(np.clip(counts / counts.sum(), 1e-12, None)), dtype=torch.float32)
    if t_zs and q is not None and len(q) == saved.logits.shape[1]:
        log_q = torch.as_tensor(q, dtype=torch.float64).clamp_min(1e-12).log().float()
        calibrated = saved.logits + log_q - log_pt
        panels += [("zero-shot, T=1", calibrated * float(t_zs)),
                   (f"zero-shot / T_zs (T={float(t_zs):.2f})", calibrated)]
    else:
        notes.append(f"{run.label}: results.json lacks gla.temperature_zs or the prior; only the debiased "
                     "predictions are shown")
    panels.append(("GLA debiased (− log q)", saved.logits))
    return panels, saved.labels, split, notes


def reliability_bins(probs: Any, labels: Any, bins: int = RELIABILITY_BINS) -> tuple[np.ndarray, np.ndarray,
                                                                                      np.ndarray]:
    """(accuracy, mean confidence, share of samples) per equal-width confidence bin (NaN where empty)."""
    conf, pred = probs.max(dim=1)
    conf, correct = conf.double().numpy(), pred.eq(labels).double().numpy()
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)  # (lo, hi] as the ECE
    acc, mean_conf, share = np.full(bins, np.nan), np.full(bins, np.nan), np.zeros(bins)
    for b in range(bins):
        sel = which == b
        if sel.any():
            acc[b], mean_conf[b], share[b] = correct[sel].mean(), conf[sel].mean(), sel.mean()
    return acc, mean_conf, share


def plot_reliability(run: Run, out_dir: Path, name: str) -> tuple[list[Path], list[str]]:
    """Reliability diagrams of a GLA run before and after its temperature calibration (ECE in each title)."""
    from ..engine.metrics import expected_calibration_error

    panels, labels, split, notes = _reliability_panels(run)
    if not panels:
        return [], notes
    fig = _figure(3.2 * len(panels), 3.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    edges = np.linspace(0, 1, RELIABILITY_BINS + 1)
    for ax, (title, logits) in zip(axes, panels, strict=True):
        probs = logits.float().softmax(dim=1)
        acc, _, _ = reliability_bins(probs, labels)
        ece = 100.0 * expected_calibration_error(probs, labels, RELIABILITY_BINS)
        ax.bar(edges[:-1], np.nan_to_num(acc), width=np.diff(edges), align="edge", color="#4477aa",
               edgecolor="white", label="accuracy")
        ax.plot([0, 1], [0, 1], linestyle="--", color="#333333", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_title(f"{title}\nECE {ece:.2f}", fontsize=8)
    axes[0].set_ylabel(f"accuracy ({split})")
    return _save(fig, out_dir, name), notes


def is_gla(run: Run) -> bool:
    return run.results.get("method") == "gla" or "gla" in run.results


def _safe(fn: Any, what: str, *args: Any) -> tuple[list[Path], list[str]]:
    """Run one plot; a damaged file in one run folder becomes a note instead of stopping the other plots."""
    try:
        got = fn(*args)
    except PlotsUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001  (any damaged input: the report goes on and names it)
        log.warning("%s plot failed: %s", what, exc)
        return [], [f"{what} plot failed ({type(exc).__name__}: {exc})"]
    return got if isinstance(got, tuple) else (got, [])


# what each plot file shows (its name without the task suffix or run prefix), for captions
CAPTIONS = {
    "per_class_accuracy": "Per-class top-1 against training images per class (log scale; bands: few / medium / many)",
    "many_medium_few": "Top-1 on many- (>100), medium- (20-100) and few-shot (<20) classes",
    "base_new_hm": "Base-to-new: base, new and harmonic-mean top-1",
    "accuracy_vs_shots": "Top-1 against shots per class, mean ± std over seeds",
    "predicted_vs_true": "Predicted against true class counts on the test split",
    "gla_prior": "GLA's estimated pretraining label prior against the training class frequency",
    "reliability": "Reliability diagram (accuracy against confidence)",
}


def caption(stem: str, run_labels: dict[str, str] | None = None) -> str:
    """A reader's caption for a plot file's stem: what it shows, and for which task or run."""
    for key, text in CAPTIONS.items():
        if stem == key:
            return text
        if stem.startswith(f"{key}_"):  # a comparison plot of one task
            return f"{text} — {stem[len(key) + 1:]}"
        if stem.endswith(f"_{key}"):  # a run's own plot, prefixed by its slug
            who = stem[: -len(key) - 1]
            return f"{(run_labels or {}).get(who, who)}: {text[0].lower()}{text[1:]}"
    return stem


def plot_run(run: Run, out_dir: Path, prefix: str = "") -> tuple[list[Path], list[str]]:
    """The per-run plots: predicted-class histogram, and for GLA runs the prior and reliability diagrams."""
    todo = [(plot_predictions, "predicted_vs_true")]
    if is_gla(run):
        todo += [(plot_prior, "gla_prior"), (plot_reliability, "reliability")]
    paths: list[Path] = []
    notes: list[str] = []
    for fn, stem in todo:
        got, why = _safe(fn, f"{run.label}: {stem}", run, out_dir, f"{prefix}{stem}")
        paths += got
        notes += why
    return paths, notes


def _all_plots(rows: Sequence[Row], out_dir: Path, prefix_runs: bool) -> tuple[list[Path], list[str]]:
    require_matplotlib()
    runs = [r.runs[0] for r in rows if r.kind == "run"]
    paths: list[Path] = []
    notes: list[str] = []
    for suffix, group in by_task(runs, lambda r: r.results.get("dataset")):  # one per-class plot per task
        got, why = _safe(plot_per_class, "per-class", group, out_dir, f"per_class_accuracy{suffix}")
        paths += got
        notes += why
    for fn, what, arg in ((plot_groups, "many/medium/few", rows), (plot_base_new, "base/new/HM", rows),
                          (plot_shots, "accuracy vs shots", rows)):
        if arg:
            got, why = _safe(fn, what, arg, out_dir)
            paths += got
            notes += why
    for run in runs:
        got, why = plot_run(run, out_dir, prefix=f"{slug(run.label)}_" if prefix_runs else "")
        paths += got
        notes += why
    return paths, notes


def report_plots(rows: Sequence[Row], out_dir: Path) -> tuple[list[Path], list[str]]:
    """Every plot of a report (comparisons across rows, then each single run's own plots) and the notes on
    what was left out. Raises PlotsUnavailable when matplotlib is not installed."""
    return _all_plots(rows, out_dir, prefix_runs=True)


def write_run_plots(run_dir: str | Path) -> list[Path]:
    """The plots of one finished run into RUN_DIR/plots (called at the end of every run). Returns the files
    written; a missing matplotlib or a plot it cannot draw is logged, never raised (the run itself is done)."""
    from .collect import build_rows

    run = read_run(Path(run_dir))
    if isinstance(run, Problem):
        raise TailclipError(f"{run.path}: {run.reason}")
    try:
        paths, notes = _all_plots(build_rows([run]), run.path / PLOTS, prefix_runs=False)
    except PlotsUnavailable as exc:
        log.warning("run plots not written: %s", exc)
        return []
    for note in notes:
        log.info("plots: %s", note)
    return paths
