"""The demo's rows: every row's full and --quick overrides load as a valid config; the progress line counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tailclip.api  # noqa: F401  (registers the methods)
from tailclip import demo
from tailclip.config import load_config


@pytest.mark.parametrize("quick", [False, True])
def test_every_row_loads(quick: bool, tmp_path: Path) -> None:
    for row in demo.ROWS:
        overrides = [o.format(out=tmp_path) for o in demo.BASE + row.overrides + (row.quick if quick else [])]
        cfg = load_config(None, overrides + [f"output_dir={tmp_path}", f"run_name={row.run_name}"])
        if cfg.method == "lift":
            assert cfg.train.epochs == 1 and (cfg.data.shots == 8) == quick


@pytest.mark.parametrize("quick", [False, True])
def test_every_ensemble_row_runs_on_its_finetuned_rows_task(quick: bool, tmp_path: Path) -> None:
    """A GLA ensemble aligns its val logits with the fine-tuned run's: both must be the same task (the --quick
    LIFT rows train on 8 shots, so the ensemble with them must too)."""
    def data_of(row: demo.DemoRow):
        overrides = [o.format(out=tmp_path) for o in demo.BASE + row.overrides + (row.quick if quick else [])]
        return load_config(None, overrides + [f"output_dir={tmp_path}", f"run_name={row.run_name}"])

    by_name = {row.run_name: row for row in demo.ROWS}
    ensembles = [row for row in demo.ROWS if any(o.startswith("gla.finetuned_run=") for o in row.overrides)]
    assert len(ensembles) == 3
    for row in ensembles:
        cfg = data_of(row)
        other = data_of(by_name[Path(cfg.gla.finetuned_run).name]).data
        assert (cfg.data.name, cfg.data.shots, cfg.data.seed) == (other.name, other.shots, other.seed), row.label


def test_images_seen_and_clock(tmp_path: Path) -> None:
    results = {"training": {"epochs_run": 2}, "splits": {"val": {"num_samples": 20, "train_counts": [3, 4]},
                                                         "test": {"num_samples": 100, "train_counts": [3, 4]}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert demo._images_seen(tmp_path, "images") == (14, 120)
    assert demo._images_seen(tmp_path, "features") == (0, 120)
    assert demo._clock(59.6) == "1m00s" and demo._clock(5) == "5s"


def test_images_seen_of_a_k_shot_row(tmp_path: Path) -> None:
    """--quick's LIFT rows train on 8 shots: no group counts in results.json, the draw says how many images."""
    results = {"splits": {"test": {"num_samples": 50}}, "training": {"epochs_run": 2}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "shot_indices.json").write_text(json.dumps({"train": list(range(800)), "val": [1, 2]}))
    assert demo._images_seen(tmp_path, "images") == (1600, 50)
