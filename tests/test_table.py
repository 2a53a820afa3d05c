"""Table files (`tailclip table`): rows × seeds (× shots) as grids, one report with mean ± std per row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tailclip.config import RunConfig, dump_config
from tailclip.errors import ConfigError
from tailclip.report.collect import build_rows, collect
from tailclip.table import load_table, row_config, run_table

REPO = Path(__file__).resolve().parents[1]


def fake_run(cfg: RunConfig) -> Path:
    """results.json with top-1 = 10 * lr-row-marker + seed (+ shots), and the config the run received."""
    path = Path(cfg.output_dir) / cfg.run_name
    path.mkdir(parents=True)
    top1 = 1000 * cfg.train.lr + cfg.data.seed + (cfg.data.shots or 0)
    (path / "results.json").write_text(json.dumps({"top1": top1, "method": cfg.method, "seed": cfg.train.seed,
                                                   "epochs": cfg.train.epochs}))
    dump_config(cfg, path / "config.yaml")  # as api.run writes it
    return path


def _write(tmp_path: Path, text: str, name: str = "t.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_rows_seeds_and_override_order(tmp_path: Path) -> None:
    (tmp_path / "preset.yaml").write_text("method: zeroshot\ntrain:\n  lr: 0.5\n  epochs: 3\n")
    table = _write(tmp_path, """
title: demo table
config: preset.yaml
overrides: [train.lr=0.01]
seeds: [1, 2, 3]
rows:
  first: []
  +second: [train.lr=0.02]
""")
    spec = load_table(table)
    assert [r.name for r in spec.rows] == ["first", "+second"] and [r.folder for r in spec.rows] == ["first",
                                                                                                    "second"]
    cfg = row_config(spec, spec.rows[1], ["train.epochs=7"])
    assert (cfg.train.lr, cfg.train.epochs) == (0.02, 7)  # row beats table; the command line reaches every row
    out = run_table(spec, tmp_path / "runs", ["train.epochs=7"], plots=False, run_fn=fake_run)
    cells = sorted(p.relative_to(out).as_posix() for p in out.glob("*/s*"))
    assert cells == [f"{r}/s{s}" for r in ("first", "second") for s in (1, 2, 3)]
    res = json.loads((out / "second" / "s2" / "results.json").read_text())
    assert (res["seed"], res["epochs"]) == (2, 7)  # the grid seeds the training too
    rows = build_rows(collect([out / "first", out / "second"], ["first", "+second"])[0])
    assert [r.label for r in rows] == ["first", "+second"]
    assert rows[0].stats["top1"].mean == pytest.approx(12.0) and rows[1].stats["top1"].mean == pytest.approx(22.0)
    assert rows[0].stats["top1"].std == pytest.approx((2 / 3) ** 0.5) and rows[0].seeds == 3
    report = (out / "report" / "report.md").read_text()
    assert report.index("first") < report.index("+second") and "12.00 ± 0.82" in report
    calls: list[str] = []  # finished rows are reused
    run_table(spec, tmp_path / "runs", ["train.epochs=7"], plots=False,
              run_fn=lambda c: calls.append(c.run_name) or fake_run(c))
    assert calls == []


def test_shots_and_a_row_with_its_own_preset(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("method: zeroshot\n")
    (tmp_path / "b.yaml").write_text("method: linear_probe\n")
    spec = load_table(_write(tmp_path, """
config: a.yaml
seeds: [1]
shots: [1, 4]
rows:
  zs: []
  probe: {config: b.yaml, overrides: [linear_probe.C=2.0]}
"""))
    assert row_config(spec, spec.rows[1]).method_config().C == 2.0
    out = run_table(spec, tmp_path / "runs", plots=False, run_fn=fake_run)
    assert sorted(p.name for p in (out / "probe").iterdir() if p.is_dir()) == ["k1-s1", "k4-s1"]
    rows = build_rows(collect([out / "zs", out / "probe"])[0])
    assert [(r.method, r.shots) for r in rows] == [("zeroshot", 1), ("zeroshot", 4), ("linear_probe", 1),
                                                   ("linear_probe", 4)]
    # --config replaces the file's preset, not a row's own
    other = load_table(tmp_path / "t.yaml", tmp_path / "b.yaml")
    assert [r.config for r in other.rows] == [(tmp_path / "b.yaml").resolve()] * 2


@pytest.mark.parametrize(("text", "needle"), [
    ("rows: {}\n", "rows must map"),
    ("rows: {a: []}\nbogus: 1\n", "unknown key(s) bogus"),
    ("rows: {a: [1, 2]}\n", "rows.a must be a list of key=value strings"),
    ("rows: {a: {overrides: [], extra: 1}}\n", "rows.a: unknown key(s) extra"),
    ("config: nowhere.yaml\nrows: {a: []}\n", "preset 'nowhere.yaml' not found"),
    ("rows: {a+: [], a: []}\n", "same folder (a)"),
    ("seeds: []\nrows: {a: []}\n", "seeds must be a non-empty list of integers"),
    ("- a\n", "must hold a mapping"),
])
def test_bad_table_files_name_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match="t.yaml") as err:
        load_table(_write(tmp_path, text))
    assert needle in str(err.value)


def test_a_bad_override_in_a_late_row_fails_before_any_run(tmp_path: Path) -> None:
    spec = load_table(_write(tmp_path, "rows:\n  ok: []\n  bad: [train.no_such_key=1]\n"))
    calls: list[str] = []
    with pytest.raises(ConfigError, match=r"row 'bad'.*no_such_key"):
        run_table(spec, tmp_path / "runs", plots=False, run_fn=lambda c: calls.append(c.run_name) or fake_run(c))
    assert calls == []


@pytest.mark.parametrize("path", sorted(REPO.glob("configs/**/ablation*.yaml")) + sorted(
    REPO.glob("configs/**/*_table.yaml")), ids=lambda p: p.name)
def test_shipped_table_files_load(path: Path) -> None:
    spec = load_table(path)
    assert spec.rows and all(row_config(spec, row) is not None for row in spec.rows)


def test_sage_ablation_switches() -> None:
    """configs/sage/ablation.yaml: LIFT -> +SG -> +Init -> +CF -> +FIT, on every Sage preset."""
    for preset in sorted((REPO / "configs" / "sage").glob("[!a]*.yaml")):
        spec = load_table(REPO / "configs" / "sage" / "ablation.yaml", preset)
        rows = [row_config(spec, r).method_config() for r in spec.rows]
        assert [(r.adapter, r.init, r.loss, r.fit) for r in rows] == [
            ("adaptformer", "lift", "la", False), ("sg", "lift", "la", False), ("sg", "sage60", "la", False),
            ("sg", "sage60", "cf", False), ("sg", "sage60", "cf", True)], preset.name
    spec = load_table(REPO / "configs" / "sage" / "ablation_w_proj.yaml")
    rows = {r.name: row_config(spec, r).method_config() for r in spec.rows}
    assert rows["+SG-Adapter w/o W_proj"].w_proj is False and rows["baseline"].adapter == "adaptformer"
    assert not any(r.fit for r in rows.values()) and all(r.loss == "cf" for r in rows.values())
