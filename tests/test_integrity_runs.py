"""Run folders (issue 14): nothing in an existing folder is written before the run is accepted; reused names
need --resume or --overwrite; failed runs say so in status.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from helpers import make_image_folder
from typer.testing import CliRunner

from tailclip.cli import app


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_reused_names_refused_resume_and_failed_runs(tmp_path: Path, tiny_vit_json: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    data = make_image_folder(tmp_path / "data", counts=(4, 3, 2), val=1, test=2)
    runner = CliRunner()
    common = ["--dataset", "image-folder", "--root", str(data), "--model", f"json:{tiny_vit_json}",
              "--output-dir", str(tmp_path / "runs"), "--name", "zs"]
    res = runner.invoke(app, ["eval", "--method", "zeroshot", *common])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "zs"
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    before = snapshot(run)

    # same name, no flag: one clear line, nothing written
    res = runner.invoke(app, ["eval", "--method", "zeroshot", *common])
    assert res.exit_code == 2
    assert f"run folder {run} already exists; pass --resume auto" in res.output and "--overwrite" in res.output
    assert snapshot(run) == before

    # resume with a changed config: refused before config.yaml (or anything else) is touched
    res = runner.invoke(app, ["train", "--method", "zeroshot", *common, "--resume", "auto", "train.epochs=3"])
    assert res.exit_code == 2
    assert "different configuration" in res.output and str(run / "config.yaml") in res.output
    assert "train.epochs: 10 -> 3" in res.output  # the differing key is named
    assert snapshot(run) == before

    # the same folder given relative instead of absolute is the same run (resume accepted, not refused)
    import os

    from tailclip.config import load_config
    from tailclip.engine.checkpoint import resume_fingerprint

    rel = os.path.relpath(data)
    same = [load_config(None, ["method=zeroshot", f"data.root={root}", "data.name=image-folder"]) for root in
            (str(data), rel)]
    assert resume_fingerprint(same[0]) == resume_fingerprint(same[1])

    # --overwrite replaces the folder: one log, the new config
    res = runner.invoke(app, ["eval", "--method", "zeroshot", *common, "--overwrite", "eval.splits=[test]"])
    assert res.exit_code == 0, res.output
    assert list(json.loads((run / "results.json").read_text())["splits"]) == ["test"]
    assert (run / "log.txt").read_text().count("run folder ") == 1

    # a refused command on a new name writes nothing
    res = runner.invoke(app, ["eval", "--method", "lift", *common[:-1], "refused"])
    assert res.exit_code == 2 and "trainable parameters" in res.output
    assert not (tmp_path / "runs" / "refused").exists()

    # a run that fails after it was accepted is marked failed with its error
    res = runner.invoke(app, ["eval", "--method", "lift", *common, "--overwrite"])
    assert res.exit_code == 2
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and "trainable parameters" in status["error"]

    # resume=auto on a new name says so plainly
    with caplog.at_level(logging.WARNING, logger="tailclip"):
        res = runner.invoke(app, ["train", "--method", "zeroshot", *common[:-1], "fresh", "--resume", "auto"])
    assert res.exit_code == 0, res.output
    assert f"resume=auto: no run named 'fresh' in {tmp_path / 'runs'}; starting a new one" in caplog.text


def test_demo_refuses_to_reuse_an_earlier_demo_silently(tmp_path: Path) -> None:
    from tailclip.demo import ROWS

    first = tmp_path / ROWS[0].run_name
    first.mkdir()
    (first / "config.yaml").write_text("method: zeroshot\n")
    res = CliRunner().invoke(app, ["demo", "--output-dir", str(tmp_path)])
    assert res.exit_code == 2
    assert f"error: {tmp_path} already holds a demo (1 run folders); pass --overwrite" in res.output
    assert (first / "config.yaml").read_text() == "method: zeroshot\n"
