"""Few-shot grid runner: every (shots, seed) cell runs with data.shots/data.seed set; mean ± std per shot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tailclip.config import RunConfig, dump_config, load_config
from tailclip.grid import run_grid


def fake_run(cfg: RunConfig, overwrite: bool = False) -> Path:
    """Writes a results.json whose top-1 is a known function of (shots, seed), and config.yaml as api.run does."""
    path = Path(cfg.output_dir) / cfg.run_name
    path.mkdir(parents=True, exist_ok=overwrite)
    dump_config(cfg, path / "config.yaml")
    top1 = 50.0 + cfg.data.shots + cfg.data.seed  # seeds 1,2,3 -> mean +2, std sqrt(2/3)
    (path / "results.json").write_text(json.dumps({"top1": top1, "many": None, "ece": 1.0 * cfg.data.seed}))
    return path


def test_mean_and_std_per_cell(tmp_path: Path) -> None:
    cfg = load_config(None, [f"output_dir={tmp_path}", "run_name=g"])
    out = run_grid(cfg, [1, 4], [1, 2, 3], run_fn=fake_run)
    grid = json.loads((out / "grid.json").read_text())
    assert sorted(c["run_dir"].split("/")[-1] for c in grid["cells"]) == sorted(
        f"k{k}-s{s}" for k in (1, 4) for s in (1, 2, 3))
    s1 = grid["summary"]["1"]["top1"]
    assert s1["mean"] == pytest.approx(53.0) and s1["std"] == pytest.approx(np.std([52, 53, 54]))
    assert grid["summary"]["4"]["top1"]["mean"] == pytest.approx(56.0)
    assert "many" not in grid["summary"]["1"]  # no values -> left out, not reported as 0
    md = (out / "grid.md").read_text()
    assert "| 1 | 3 | 53.00 ± 0.82 |" in md and "| 4 | 3 | 56.00 ± 0.82 |" in md
    # finished cells are reused when the grid is run again
    calls: list[str] = []
    run_grid(cfg, [1, 4], [1, 2, 3], run_fn=lambda c: calls.append(c.run_name) or fake_run(c))
    assert calls == []


def test_a_finished_cell_of_another_configuration_is_never_reused(tmp_path: Path) -> None:
    """Seen: a table row re-run with C=1e6 reported the old C=1e-06 cell. Reuse needs the same configuration."""
    from tailclip.errors import TailclipError

    first = load_config(None, [f"output_dir={tmp_path}", "run_name=g", "train.lr=0.01"])
    run_grid(first, [1], [1, 2], run_fn=fake_run)
    changed = load_config(None, [f"output_dir={tmp_path}", "run_name=g", "train.lr=0.02"])
    with pytest.raises(TailclipError, match=r"k1-s1 finished with another configuration \(train.lr: 0.01 -> 0.02\)"):
        run_grid(changed, [1], [1, 2], run_fn=fake_run)
    # bookkeeping keys (workers, device, plots) do not count
    same = load_config(None, [f"output_dir={tmp_path}", "run_name=g", "train.lr=0.01", "data.num_workers=2",
                              "eval.plots=false", "device=cpu"])
    calls: list[str] = []
    run_grid(same, [1], [1, 2], run_fn=lambda c, overwrite=False: calls.append(c.run_name) or fake_run(c, overwrite))
    assert calls == []
    redo: list[tuple[str, bool]] = []
    run_grid(changed, [1], [1, 2], overwrite=True,
             run_fn=lambda c, overwrite=False: redo.append((c.run_name, overwrite)) or fake_run(c, overwrite))
    assert redo == [("k1-s1", True), ("k1-s2", True)]
    assert load_config(tmp_path / "g" / "k1-s1" / "config.yaml").train.lr == 0.02


def test_real_tiny_grid(tiny_vit_json: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import register_color_dataset

    monkeypatch.setenv("TAILCLIP_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, [f"model.name=json:{tiny_vit_json}", f"data.name={register_color_dataset()}",
                             "method=linear_probe", "linear_probe.C=1.0", f"output_dir={tmp_path}", "run_name=g"])
    out = run_grid(cfg, [1, 2], [1, 2])
    grid = json.loads((out / "grid.json").read_text())
    for cell in grid["cells"]:
        res = json.loads((Path(cell["run_dir"]) / "results.json").read_text())
        cfg_cell = (Path(cell["run_dir"]) / "config.yaml").read_text()
        assert f"shots: {cell['shots']}" in cfg_cell and f"seed: {cell['seed']}" in cfg_cell
        assert res["top1"] == cell["results"]["top1"]
    tops = [c["results"]["top1"] for c in grid["cells"] if c["shots"] == 2]
    assert grid["summary"]["2"]["top1"]["mean"] == pytest.approx(np.mean(tops))
