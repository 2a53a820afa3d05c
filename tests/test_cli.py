"""End-to-end CLI runs on the tiny model and a generated image folder: list, eval, report, error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import make_class_folders
from safetensors.torch import load_file
from typer.testing import CliRunner

from tailclip.cli import app

runner = CliRunner()


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return make_class_folders(tmp_path / "imgs")


def test_list_commands() -> None:
    res = runner.invoke(app, ["list", "datasets"])
    assert res.exit_code == 0, res.output
    for name in ("cifar100-lt", "imagenet-lt", "places-lt", "inat2018", "caltech101", "image-folder", "csv"):
        assert name in res.output
    res = runner.invoke(app, ["list", "methods"])
    assert res.exit_code == 0 and "zeroshot" in res.output
    res = runner.invoke(app, ["list", "models"])
    assert res.exit_code == 0 and "ViT-B-16@openai" in res.output
    res = runner.invoke(app, ["list", "templates"])
    assert res.exit_code == 0 and "imagenet80" in res.output
    res = runner.invoke(app, ["list", "nothing"])
    assert res.exit_code == 2 and "datasets, models, methods, templates" in res.output


def test_eval_zeroshot_writes_run_folder(folder: Path, tiny_vit_json: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    res = runner.invoke(
        app,
        ["eval", "--method", "zeroshot", "--dataset", "image-folder", "--root", str(folder),
         "--model", f"json:{tiny_vit_json}", "--output-dir", str(out), "--name", "zs"],
    )
    assert res.exit_code == 0, res.output
    run = out / "zs"
    assert {"config.yaml", "log.txt", "results.json", "logits_test.safetensors"} <= {p.name for p in run.iterdir()}
    results = json.loads((run / "results.json").read_text())
    test = results["splits"]["test"]
    assert test["num_samples"] == 6  # ceil(20 %) of 6 images for each of 3 classes
    assert len(test["per_class_top1"]) == 3
    # top-1 recomputed from the saved logits: the run folder's numbers are the model's, not a placeholder
    saved = load_file(str(run / "logits_test.safetensors"))
    recomputed = 100.0 * float((saved["logits"].argmax(1) == saved["labels"]).float().mean())
    assert results["top1"] == pytest.approx(recomputed)
    assert results["preprocess"]["image_size"] == 32
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["name"] == "image-folder" and cfg["method"] == "zeroshot"
    assert "top1" in res.output and "many" in res.output
    rep = runner.invoke(app, ["report", str(run)])
    assert rep.exit_code == 0 and "zs" in rep.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["eval", "--dataset", "no-such-set"], "unknown dataset 'no-such-set'"),
        (["eval", "--dataset", "image-folder", "--root", "/nonexistent/dir"], "/nonexistent/dir"),
        (["eval", "train.optimizer=rmsprop"], "sgd, adamw"),
        (["eval", "--model", "json:/nonexistent/model.json"], "/nonexistent/model.json"),
    ],
)
def test_cli_errors_are_one_clear_line(args: list[str], needle: str, tmp_path: Path, tiny_vit_json: Path) -> None:
    model = [] if "--model" in args else ["--model", f"json:{tiny_vit_json}"]
    res = runner.invoke(app, [*args, *model, "--output-dir", str(tmp_path)])
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert "Traceback" not in res.output


def test_verify_data_names_bad_files(folder: Path) -> None:
    (folder / "class_0" / "broken.png").write_bytes(b"not a png at all")
    res = runner.invoke(app, ["verify-data", "image-folder", "--root", str(folder)])
    assert res.exit_code == 1
    assert "broken.png" in res.output


def test_file_system_faults_and_bad_yaml_are_one_line(tmp_path) -> None:
    """A read-only output folder, a not-a-folder path, a broken preset, a missing report folder: one line naming
    the file, exit code 2, no traceback."""
    import os

    from typer.testing import CliRunner

    from tailclip.cli import app

    runner = CliRunner()
    broken = tmp_path / "broken.yaml"
    broken.write_text("method: lift\ntrain: [oops\n")
    res = runner.invoke(app, ["train", "-c", str(broken)])
    assert res.exit_code == 2 and "is not valid YAML" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["report", str(tmp_path / "nope_dir")])
    assert res.exit_code == 2 and "no such run or grid folder" in res.output
    assert not (tmp_path / "report").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = runner.invoke(app, ["eval", "--method", "zeroshot", "--output-dir", str(blocker / "runs")])
    assert res.exit_code == 2 and str(blocker) in res.output and len(res.output.strip().splitlines()) == 1
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        res = runner.invoke(app, ["eval", "--method", "zeroshot", "--output-dir", str(ro)])
        assert res.exit_code == 2 and "Permission denied" in res.output


@pytest.mark.parametrize("code", ["ENOSPC", "EFBIG", "EROFS"])
def test_a_full_disk_is_one_line_and_leaves_no_half_file(tmp_path, monkeypatch, code: str) -> None:
    """A full disk, a file over the size limit, a read-only file system (patched writes: sessions run as root)."""
    import errno
    import os

    from typer.testing import CliRunner

    from tailclip import io
    from tailclip.cli import app

    real = io.atomic_write

    def full(path, write):
        if path.name == "results.json":
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), str(path))
        return real(path, write)

    monkeypatch.setattr(io, "atomic_write", full)
    res = CliRunner().invoke(app, ["eval", "--method", "zeroshot", "--output-dir", str(tmp_path), "--name", "r",
                                   "eval.plots=false"])
    assert res.exit_code == 2 and f"results.json: {os.strerror(getattr(errno, code))}" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "results.json").exists()
    assert not list((tmp_path / "r").glob(".results.json*"))


def test_help_speaks_to_users_and_list_lines_are_whole_sentences() -> None:
    from typer.testing import CliRunner

    from tailclip.cli import app

    runner = CliRunner()
    assert "configures logging" not in runner.invoke(app, ["--help"]).output
    from tailclip.data.registry import DATASETS
    from tailclip.methods import METHODS

    ours = {n for reg in (METHODS, DATASETS) for n in reg if reg.get(n).__module__.startswith("tailclip.")}
    for what in ("methods", "datasets"):  # (tests register datasets of their own, without docstrings)
        lines = runner.invoke(app, ["list", what]).output.strip().splitlines()
        cut = [ln for ln in lines if ln.split()[0] in ours and not ln.rstrip().endswith((".", ")"))]
        assert not cut, cut


def test_openmp_threads_spin_briefly_unless_the_user_says_otherwise() -> None:
    """Long-spinning OpenMP threads made a run beside another job 4x slower (benchmarks/contention.py)."""
    import subprocess
    import sys

    code = "import tailclip, os; print(os.environ['GOMP_SPINCOUNT'], os.environ['KMP_BLOCKTIME'])"
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1000", "1"]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "GOMP_SPINCOUNT": "300000"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split()[0] == "300000"
