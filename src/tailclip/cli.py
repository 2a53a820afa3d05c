"""`tailclip train|eval|predict|extract|list|verify-data|report|table|demo`. Only the CLI configures logging."""
# (the module docstring is for developers; users see HELP)

from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import TailclipError
from .runfiles import GRID_MD, REPORT_DIR, REPORT_MD

HELP = ("tailclip: adapt CLIP-style models to long-tailed and few-shot image recognition. Start with "
        "`tailclip demo`; `tailclip list methods|datasets|models|templates` shows what is available, and every "
        "command's --help its options. Options are key=value overrides after the command (train.lr=0.02).")
app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP)


def summary_line(doc: str | None) -> str:
    """The first paragraph of a docstring as one line (docstrings wrap mid-sentence)."""
    first = (doc or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in first.splitlines())
log = logging.getLogger("tailclip")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML preset (configs/...)")]
MethodOpt = Annotated[str | None, typer.Option(help="method name (tailclip list methods)")]
DatasetOpt = Annotated[str | None, typer.Option(help="dataset name (tailclip list datasets)")]
ModelOpt = Annotated[str | None, typer.Option(help="model name (tailclip list models)")]
RootOpt = Annotated[str | None, typer.Option(help="dataset root folder")]
OutOpt = Annotated[str | None, typer.Option("--output-dir", help="where run folders go")]
NameOpt = Annotated[str | None, typer.Option("--name", help="run folder name")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace an existing run folder of that name")]
Overrides = Annotated[list[str] | None, typer.Argument(help="config overrides key=value, e.g. train.lr=0.02")]


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _overrides(
    method: str | None, dataset: str | None, model: str | None, root: str | None, output_dir: str | None,
    name: str | None, extra: list[str] | None,
) -> list[str]:
    out = []
    for key, value in (("method", method), ("data.name", dataset), ("model.name", model), ("data.root", root),
                       ("output_dir", output_dir), ("run_name", name)):
        if value is not None:
            out.append(f"{key}={value}")
    return out + list(extra or [])


def _ints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TailclipError(f"expected a comma-separated list of integers, got {text!r}") from None


def _print_summary(run_dir: Path) -> None:
    from .engine.runs import RunDir
    from .report import format_table

    res = RunDir(run_dir).read_results()
    label = f"{res['method']} on {res['dataset']}"
    if "hm" in res:  # base-to-new: base (test_base), new (test_new), their harmonic mean
        typer.echo(format_table([(label, res)], ("base", "new", "hm")))
    else:
        split = res.get("main_split", "test")
        typer.echo(format_table([(label if split == "test" else f"{label} [{split}]", res)]))
    typer.echo(f"run folder: {run_dir}")


FILE_SYSTEM_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                      errno.EISDIR, errno.EDQUOT, errno.ENAMETOOLONG}


def _guard(fn):
    """Turn user-facing errors into one clear line and exit code 2, instead of a stack trace."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TailclipError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except OSError as exc:
            if exc.errno not in FILE_SYSTEM_ERRORS:
                raise
            # a full disk, a file too large, a read-only or not-a-folder output or cache path: one line naming it
            where = f"{exc.filename}: " if exc.filename else ""
            typer.echo(f"error: {where}{exc.strerror or exc}", err=True)
            raise typer.Exit(2) from None
        except FloatingPointError as exc:  # NaN / inf logits: refused rather than reported
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@_guard
def train(
    overrides: Overrides = None,
    config: ConfigOpt = None,
    method: MethodOpt = None,
    dataset: DatasetOpt = None,
    model: ModelOpt = None,
    root: RootOpt = None,
    output_dir: OutOpt = None,
    name: NameOpt = None,
    shots: Annotated[str | None, typer.Option(help="few-shot grid, e.g. 1,2,4,8,16")] = None,
    seeds: Annotated[str | None, typer.Option(help="seeds of the grid, e.g. 1,2,3")] = None,
    resume: Annotated[str | None, typer.Option(help="auto, or a run folder to continue")] = None,
    overwrite: OverwriteOpt = False,
    print_params: Annotated[bool, typer.Option("--print-params", help="print trainable parameters and exit")] = False,
) -> None:
    """Train a method (fine-tuning, adapters, post-hoc fitting) and evaluate it."""
    from .api import load_config

    _setup_logging()
    ovr = _overrides(method, dataset, model, root, output_dir, name, overrides)
    if resume is not None:
        ovr.append(f"resume={resume}")
    cfg = load_config(config, ovr)
    if print_params:
        from .api import build, param_report
        from .runtime import resolve_device

        _, m = build(cfg, resolve_device(cfg.device))
        typer.echo(param_report(m))
        return
    if shots is not None or seeds is not None:
        from .grid import run_grid

        out = run_grid(cfg, _ints(shots) or [cfg.data.shots or 16], _ints(seeds) or [cfg.data.seed],
                       overwrite=overwrite)
        typer.echo(Path(out / GRID_MD).read_text() if (out / GRID_MD).exists() else f"grid folder: {out}")
        return
    from .api import run

    _print_summary(run(cfg, overwrite=overwrite))


@app.command("eval")
@_guard
def eval_(
    overrides: Overrides = None,
    config: ConfigOpt = None,
    method: MethodOpt = None,
    dataset: DatasetOpt = None,
    model: ModelOpt = None,
    root: RootOpt = None,
    output_dir: OutOpt = None,
    name: NameOpt = None,
    checkpoint: Annotated[Path | None, typer.Option(help="a run folder written by tailclip train")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Evaluate a training-free method (zero-shot …) or a trained run folder (--checkpoint)."""
    from .api import load_config, run, run_from_checkpoint

    _setup_logging()
    ovr = _overrides(method, dataset, model, root, output_dir, name, overrides)
    if checkpoint is not None:
        _print_summary(run_from_checkpoint(checkpoint, ovr))
        return
    cfg = load_config(config, ovr)
    _print_summary(run(cfg, train=False, overwrite=overwrite))


@app.command()
@_guard
def predict(
    images: Annotated[list[Path], typer.Argument(help="image files")],
    checkpoint: Annotated[Path, typer.Option(help="a run folder written by tailclip train")],
    topk: Annotated[int, typer.Option(help="how many classes to print per image")] = 5,
) -> None:
    """Classify image files with a trained run folder; prints one JSON line per image (an unreadable file gets
    a line with its error, and the exit status is 1)."""
    import json

    from .api import predict_files

    _setup_logging()
    rows = predict_files(checkpoint, images, topk=topk)
    for row in rows:
        typer.echo(json.dumps(row))
    failed = [row["image"] for row in rows if "error" in row]
    if failed:
        typer.echo(f"error: {len(failed)} of {len(rows)} image(s) could not be read: {', '.join(failed)}", err=True)
        raise typer.Exit(1)


@app.command()
@_guard
def extract(
    overrides: Overrides = None,
    config: ConfigOpt = None,
    dataset: DatasetOpt = None,
    model: ModelOpt = None,
    root: RootOpt = None,
    splits: Annotated[str, typer.Option(help="comma-separated splits")] = "train,val,test",
    views: Annotated[int, typer.Option(help="augmented views of the train split (0: none)")] = 0,
) -> None:
    """Compute frozen image features once into the feature cache."""
    from .api import load_config
    from .features import extract_from_config

    _setup_logging()
    cfg = load_config(config, _overrides(None, dataset, model, root, None, None, overrides))
    from .runtime import distributed

    paths = extract_from_config(cfg, [s for s in splits.split(",") if s], views=views)
    if distributed.is_main_process():
        for path in paths:
            typer.echo(str(path))


@app.command("list")
@_guard
def list_(what: Annotated[str, typer.Argument(help="datasets | models | methods | templates")]) -> None:
    """List registered datasets, model name forms, methods or template sets."""
    if what == "datasets":
        from .data import load_all  # noqa: F401
        from .data.registry import DATASETS

        for name, builder in DATASETS.items():
            typer.echo(f"{name:<18} {summary_line(builder.__doc__)}")
    elif what == "models":
        from .backbones import list_models

        for name in list_models():
            typer.echo(name)
    elif what == "methods":
        from .methods import METHODS

        for name, cls in METHODS.items():
            typer.echo(f"{name:<14} {summary_line(cls.__doc__)}")
    elif what == "templates":
        from .data.templates import TEMPLATE_SETS

        for name, templates in sorted(TEMPLATE_SETS.items()):
            typer.echo(f"{name:<24} {len(templates):>3} templates, e.g. {templates[0]!r}")
    else:
        raise TailclipError(f"cannot list {what!r}; choose one of: datasets, models, methods, templates")


@app.command("verify-data")
@_guard
def verify_data(
    dataset: Annotated[str, typer.Argument(help="dataset name")],
    root: RootOpt = None,
    overrides: Overrides = None,
    rehash: Annotated[bool, typer.Option("--hash", help="also hash every file again, so a file rewritten keeping "
                                         "its size and mtime is not served stale cached features")] = False,
) -> None:
    """Check that every file of a dataset exists and decodes; names each missing or unreadable file."""
    from .api import load_config
    from .data.verify import verify_dataset

    _setup_logging()
    cfg = load_config(None, _overrides(None, dataset, None, root, None, None, overrides))
    problems = verify_dataset(cfg.data)
    if rehash and not problems:
        import dataclasses

        from .data.registry import build_task
        from .features import FeatureCache
        from .features.extract import rehash_dataset

        stale = rehash_dataset(build_task(dataclasses.replace(cfg.data, shots=None)), FeatureCache())
        typer.echo(f"{dataset}: {sum(stale.values())} file(s) changed with their size and mtime kept "
                   f"({', '.join(f'{s}: {n}' for s, n in stale.items())}); the feature cache index now has them")
    for line in problems:
        typer.echo(line)
    if problems:
        typer.echo(f"{len(problems)} problem(s) found in {dataset}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{dataset}: all files present and readable")


@app.command()
@_guard
def prepare(
    dataset: Annotated[str, typer.Argument(help="dataset name")],
    root: Annotated[str, typer.Option("--root", help="the dataset's folder (original images)")],
    out: Annotated[str, typer.Option("--out", help="where the pre-resized copy goes (use it as data.root)")],
    short_side: Annotated[int, typer.Option("--short-side", help="short side of the copies, px")] = 256,
    quality: Annotated[int, typer.Option("--quality", help="JPEG quality of resized copies")] = 90,
) -> None:
    """Write a copy of a dataset with images pre-resized (short side), so decoding stops limiting training."""
    from .data.prepare import prepare_dataset

    _setup_logging()
    record = prepare_dataset(dataset, root, out, short_side, quality)
    typer.echo(f"{dataset}: {record['images']} images ({record['resized']} resized to short side {short_side}) "
               f"in {out}; train on it with data.root={out}")


@app.command()
@_guard
def report(
    runs: Annotated[list[Path], typer.Argument(help="run folders, grid folders, or folders holding them")],
    out: Annotated[Path | None, typer.Option("--out", help="report folder (default: <the folder given>/report, "
                                             "or <their common parent>/report)")] = None,
    formats: Annotated[str, typer.Option("--format", help="md,csv (always) plus latex and/or html")] = "md,csv",
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="draw the plots (needs matplotlib)")] = True,
) -> None:
    """Compare runs and few-shot grids: one table (Markdown, CSV; LaTeX, HTML on request) and plots.
    Unfinished or unreadable folders are listed under the table, never fatal."""
    import os

    from .report import report_runs

    _setup_logging()
    missing = [str(p) for p in runs if not p.exists()]
    if len(missing) == len(runs):  # nothing to report (some missing among others: listed under the table)
        raise TailclipError(f"no such run or grid folder: {', '.join(missing)}")
    if out is None:
        one = len(runs) == 1 and runs[0].is_dir()
        base = runs[0] if one else Path(os.path.commonpath([p.resolve().parent for p in runs]))
        out = base / REPORT_DIR
    files = report_runs(runs, out, formats, plots=plots)
    typer.echo(files[REPORT_MD].read_text())
    typer.echo("written: " + ", ".join(str(p) for name, p in files.items() if "/" not in name))
    if any(name.startswith("plots/") for name in files):
        typer.echo(f"plots: {out / 'plots'}")


@app.command()
@_guard
def table(
    table_file: Annotated[Path, typer.Argument(help="table file (configs/*/ablation_*.yaml, *_table.yaml)")],
    overrides: Overrides = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="preset replacing the file's `config`")] = None,
    root: RootOpt = None,
    output_dir: Annotated[str, typer.Option("--output-dir", help="where the table folder goes")] = "runs",
    name: Annotated[str | None, typer.Option("--name", help="table folder name (default: the file's name)")] = None,
    shots: Annotated[str | None, typer.Option(help="shot counts instead of the file's, e.g. 1,4,16")] = None,
    seeds: Annotated[str | None, typer.Option(help="seeds instead of the file's, e.g. 1,2,3")] = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="draw the report's plots")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="rerun finished rows whose configuration changed")]
    = False,
) -> None:
    """Run every row of a table file (a paper's comparison or ablation) over its seeds and print the table:
    mean ± std per row. Finished rows of the same configuration are reused, so an interrupted table continues."""
    from .table import load_table, run_table

    _setup_logging()
    spec = load_table(table_file, config)
    cli = _overrides(None, None, None, root, None, None, overrides)
    out = run_table(spec, output_dir, cli, name=name, seeds=_ints(seeds), shots=_ints(shots), plots=plots,
                    overwrite=overwrite)
    typer.echo(f"# {spec.title}\n\n" + (out / REPORT_DIR / REPORT_MD).read_text())
    typer.echo(f"table folder: {out}")


@app.command()
@_guard
def demo(
    output_dir: Annotated[str, typer.Option("--output-dir", help="where the demo's run folders go")] = "runs/demo",
    quick: Annotated[bool, typer.Option("--quick", help="fewer epochs/images, for a smoke run")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the run folders of an earlier demo")] = False,
) -> None:
    """Run every method on the built-in synthetic world and print overall/many/medium/few accuracy."""
    from .demo import ROWS, run_demo
    from .engine.runs import RunDir

    _setup_logging()
    earlier = [Path(output_dir) / row.run_name for row in ROWS if (Path(output_dir) / row.run_name).exists()]
    if earlier and not overwrite:
        raise TailclipError(f"{output_dir} already holds a demo ({len(earlier)} run folders); pass --overwrite to "
                            "replace them, or another --output-dir")
    for path in earlier:  # run folders are reused only when asked (engine.runs): the demo asks for all at once
        RunDir(path).remove("--overwrite")
    typer.echo(run_demo(output_dir, quick=quick, progress=typer.echo))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
