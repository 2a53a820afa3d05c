"""`tailclip report` on small synthetic run folders (results.json, metrics.csv, logits written directly, no model):
numbers in the tables equal the runs', grids aggregate right, bad folders are listed, plots and HTML are complete."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from tailclip.cli import app
from tailclip.engine.metrics import classification_metrics
from tailclip.report import report_runs, write_run_plots
from tailclip.report.collect import build_rows, collect
from tailclip.report.plots import _reliability_panels
from tailclip.report.targets import AVERAGE_DATASETS, TARGETS

REPO = Path(__file__).resolve().parents[1]
COUNTS = [300, 150, 60, 40, 10, 5]  # two classes in each of many / medium / few


def write_run(path: Path, *, method: str = "lift", dataset: str = "synth-lt", seed: int = 0, config: dict | None = None,
              task_meta: dict | None = None, counts: list[int] | None = COUNTS, epoch_times: list[float] | None = None,
              extra: dict | None = None, logits: torch.Tensor | None = None, splits: tuple[str, ...] = ("test",),
              trainable: int = 1234) -> dict[str, Any]:
    """A run folder as api.run writes it: results.json from the real metrics code, logits, config.yaml."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    n = len(counts or COUNTS)
    results: dict[str, Any] = {"method": method, "dataset": dataset, "classnames": [f"c{i}" for i in range(n)],
                               "model": {"name": "synthetic:tiny-clip"}, "trainable_params": trainable,
                               "task_meta": task_meta or {}, "splits": {}}
    for split in splits:
        labels = torch.arange(n).repeat_interleave(10)
        planted = torch.randn(len(labels), n, generator=g) * 3 + 4 * torch.nn.functional.one_hot(labels, n)
        z = logits if logits is not None else planted
        results["splits"][split] = classification_metrics(z, labels, None if counts is None else np.asarray(counts))
        save_file({"logits": z.float(), "labels": labels, "indices": torch.arange(len(labels))},
                  str(path / f"logits_{split}.safetensors"))
    main = results["splits"].get("test") or next(iter(results["splits"].values()))
    for key in ("top1", "many", "medium", "few", "ece", "nll"):
        results[key] = main.get(key)
    if {"test_base", "test_new"} <= set(results["splits"]):
        base, new = results["splits"]["test_base"]["top1"], results["splits"]["test_new"]["top1"]
        results.update(base=base, new=new, hm=2 * base * new / (base + new))
    results.update(extra or {})
    (path / "results.json").write_text(json.dumps(results))
    cfg = {"method": method, "model": {"name": "synthetic:tiny-clip"}, "data": {"name": dataset, "seed": 1},
           "eval": {"tte": "none"}}
    for key, value in (config or {}).items():
        cfg.setdefault(key, {}).update(value) if isinstance(value, dict) else cfg.__setitem__(key, value)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    if epoch_times is not None:
        lines = ["epoch,lr,loss,train_acc,val_top1,images_per_s,epoch_time_s"]
        lines += [f"{i},0.01,1.0,50.0,,100.0,{t}" for i, t in enumerate(epoch_times)]
        (path / "metrics.csv").write_text("\n".join(lines) + "\n")
    return results


def write_grid(path: Path, top1: dict[tuple[int, int], float], method: str = "linear_probe",
               dataset: str = "synth-fewshot", model: str = "synthetic:tiny-clip", expect_seeds: list[int] | None = None
               ) -> None:
    """A grid folder as grid.run_grid writes it, with chosen top-1 per (shots, seed) cell."""
    path.mkdir(parents=True)
    for (k, s), value in top1.items():
        cell = path / f"k{k}-s{s}"
        write_run(cell, method=method, dataset=dataset, seed=s, counts=None, task_meta={"shots": k},
                  config={"data": {"shots": k, "seed": s}, "model": {"name": model}})
        res = json.loads((cell / "results.json").read_text())
        res["top1"] = value
        (cell / "results.json").write_text(json.dumps(res))
    shots = sorted({k for k, _ in top1})
    seeds = expect_seeds or sorted({s for _, s in top1})
    (path / "grid.json").write_text(json.dumps({"method": method, "shots": shots, "seeds": seeds}))


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def md_rows(text: str) -> list[dict[str, str]]:
    """The Markdown table as dicts (header -> cell)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, [c.strip() for c in ln.strip("|").split("|")], strict=True)) for ln in lines[2:]]


def test_tables_hold_the_runs_numbers(tmp_path: Path) -> None:
    a = write_run(tmp_path / "lift-la", seed=1, epoch_times=[1.25, 1.5, 2.125], trainable=120_000)
    b = write_run(tmp_path / "lift-ce", seed=2, extra={"train_seconds": 42.5})
    files = report_runs([tmp_path / "lift-la", tmp_path / "lift-ce"], tmp_path / "out", plots=False)
    assert set(files) == {"report.md", "report.csv"}
    rows = {r["run"]: r for r in read_csv(files["report.csv"])}
    md = {r["run"]: r for r in md_rows(files["report.md"].read_text())}
    for name, res in (("lift-la", a), ("lift-ce", b)):
        for key in ("top1", "many", "medium", "few", "ece"):
            assert float(rows[name][key]) == res[key]  # full precision
            assert md[name][{"top1": "top-1", "ece": "ECE"}.get(key, key)] == f"{res[key]:.2f}"
        assert float(rows[name]["top5"]) == res["splits"]["test"]["top5"]
        assert md[name]["top-5"] == f"{res['splits']['test']['top5']:.2f}"
        assert int(rows[name]["trainable_params"]) == res["trainable_params"]
    assert md["lift-la"]["trainable params"] == "120,000"
    assert float(rows["lift-la"]["train_seconds"]) == 1.25 + 1.5 + 2.125  # sum of metrics.csv epoch_time_s
    assert float(rows["lift-ce"]["train_seconds"]) == 42.5  # a recorded train_seconds wins
    assert "base" not in md["lift-la"]  # no base-to-new run: no empty base/new/HM columns
    assert "All rows: method lift, dataset synth-lt" in files["report.md"].read_text()


def test_the_protocol_a_run_used_is_a_column(tmp_path: Path) -> None:
    """results.json's protocol.differs (the choices that are not tailclip's defaults) is shown per row, in the CSV
    too; runs written before it was recorded show nothing."""
    released = {"protocol": {"base_scoring": "all", "differs": "base_scoring=all, precision=fp16_weights"}}
    write_run(tmp_path / "released", method="candle", extra=released)
    write_run(tmp_path / "default", method="candle", extra={"protocol": {"base_scoring": "base", "differs": ""}})
    write_run(tmp_path / "old", method="candle")
    files = report_runs([tmp_path / n for n in ("released", "default", "old")], tmp_path / "out", plots=False)
    md = {r["run"]: r for r in md_rows(files["report.md"].read_text())}
    assert md["released"]["protocol"] == "base_scoring=all, precision=fp16_weights"
    assert md["default"]["protocol"] == md["old"]["protocol"] == ""
    rows = {r["run"]: r for r in read_csv(files["report.csv"])}
    assert rows["released"]["protocol"] == "base_scoring=all, precision=fp16_weights"
    only = report_runs([tmp_path / "released"], tmp_path / "out1", plots=False)
    assert "protocol" in only["report.md"].read_text()


def test_failed_and_running_runs_are_listed_with_their_state(tmp_path: Path) -> None:
    write_run(tmp_path / "good")
    states = (("failed", {"status": "failed", "error": "DataError: gone"}), ("killed", {"status": "running"}))
    for name, status in states:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("method: lift\n")
        (tmp_path / name / "status.json").write_text(json.dumps(status))
    files = report_runs([tmp_path / n for n in ("good", "failed", "killed")], tmp_path / "out", plots=False)
    text = files["report.md"].read_text()
    assert "failed: DataError: gone" in text and "unfinished (running, or killed)" in text


def test_every_row_says_which_split_its_top1_is_from(tmp_path: Path) -> None:
    """A base-to-new run without a test split has val top-1 at the top level: the report names the split."""
    write_run(tmp_path / "b2n", method="candle", splits=("val", "test_base", "test_new"), counts=None,
              extra={"main_split": "val"})
    write_run(tmp_path / "lt", method="candle")
    files = report_runs([tmp_path / "b2n", tmp_path / "lt"], tmp_path / "out", plots=False)
    md = {r["run"]: r for r in md_rows(files["report.md"].read_text())}
    assert md["b2n"]["top-1 split"] == "val" and md["lt"]["top-1 split"] == "test"
    assert {r["run"]: r["top1_split"] for r in read_csv(files["report.csv"])} == {"b2n": "val", "lt": "test"}


def test_grid_mean_and_population_std(tmp_path: Path) -> None:
    from tailclip.grid import aggregate

    top1 = {(1, 1): 40.0, (1, 2): 44.0, (1, 3): 45.0, (4, 1): 60.0, (4, 2): 61.5}
    write_grid(tmp_path / "grid", top1, expect_seeds=[1, 2, 3])  # k4-s3 expected by grid.json, never run
    files = report_runs([tmp_path / "grid"], tmp_path / "out", formats="md,csv,latex", plots=False)
    rows = {int(r["shots"]): r for r in read_csv(files["report.csv"])}
    for k in (1, 4):
        vals = np.array([v for (kk, _), v in top1.items() if kk == k])
        assert float(rows[k]["top1"]) == pytest.approx(vals.mean(), abs=1e-12)
        assert float(rows[k]["top1_std"]) == pytest.approx(vals.std(ddof=0), abs=1e-12)
        assert int(rows[k]["seeds"]) == len(vals)
    # the same definition as grid.json's (grid.aggregate)
    cells = [{"shots": k, "seed": s, "results": {"top1": v}} for (k, s), v in top1.items()]
    summary = aggregate(cells, ("top1",))
    assert float(rows[1]["top1_std"]) == pytest.approx(summary["1"]["top1"]["std"])
    md = files["report.md"].read_text()
    assert f"{np.mean([40, 44, 45]):.2f} ± {np.std([40, 44, 45]):.2f}" in md
    assert "k4-s3" in md and "grid cell missing" in md
    tex = files["report.tex"].read_text()
    assert r"$\pm$" in tex and "grid K=1" in tex


def test_unfinished_and_corrupt_runs_are_listed_not_fatal(tmp_path: Path) -> None:
    write_run(tmp_path / "good")
    bad = tmp_path / "crashed"
    bad.mkdir()
    (bad / "config.yaml").write_text("method: lift\n")
    (bad / "log.txt").write_text("12:00 INFO start\n12:01 ERROR CUDA out of memory\n")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text("method: lift\n")
    (broken / "results.json").write_text('{"method": "lift", "top1": 5')
    res = CliRunner().invoke(app, ["report", str(tmp_path / "good"), str(bad), str(broken), str(tmp_path / "nope"),
                                   "--out", str(tmp_path / "out"), "--no-plots"])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Not included" in md
    assert "crashed`: unfinished or failed: no results.json; log.txt ends with: 12:01 ERROR CUDA out of memory" in md
    assert "broken`: results.json is not readable JSON" in md
    assert "nope`: does not exist" in md
    assert [r["run"] for r in read_csv(tmp_path / "out" / "report.csv")] == ["good"]
    assert "CUDA out of memory" in res.output


def test_a_folder_of_runs_stands_for_its_runs(tmp_path: Path) -> None:
    write_run(tmp_path / "runs" / "b")
    write_run(tmp_path / "runs" / "a")
    report_runs([tmp_path / "runs"], tmp_path / "runs" / "report", plots=False)
    items, problems = collect([tmp_path / "runs"])  # the report folder written inside is not a run
    assert [i.label for i in items] == ["a", "b"] and problems == []


def _gla_debiased(path: Path, z: torch.Tensor, t_zs: float, q: torch.Tensor) -> None:
    saved = z / t_zs - q.log()
    write_run(path, method="gla", logits=saved, trainable=0,
              extra={"gla": {"mode": "debiased_zeroshot", "temperature_zs": t_zs, "target_prior": "uniform",
                             "prior": q.tolist()}})
    (path / "prior.json").write_text(json.dumps({"prior": q.tolist()}))


def test_gla_reliability_recovers_the_zero_shot_logits(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(60, 6, generator=g) * 5
    q = torch.softmax(torch.randn(6, generator=g), 0).double()
    _gla_debiased(tmp_path / "gla", z, 2.5, q)
    run = collect([tmp_path / "gla"])[0][0]
    panels, _, split, notes = _reliability_panels(run)
    assert split == "test" and notes == []
    titles = [t for t, _ in panels]
    assert titles[0] == "zero-shot, T=1" and titles[1].startswith("zero-shot / T_zs")
    torch.testing.assert_close(panels[0][1], z, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(panels[1][1], z / 2.5, atol=1e-4, rtol=1e-4)


class _Checker(HTMLParser):
    VOID = frozenset({"meta", "img", "br", "hr", "link", "input"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")


def test_every_plot_is_written_and_the_html_is_self_contained(tmp_path: Path) -> None:
    write_run(tmp_path / "lift-la", seed=1)
    write_run(tmp_path / "lp", seed=2, method="linear_probe", splits=("val", "test"))
    g = torch.Generator().manual_seed(3)
    _gla_debiased(tmp_path / "gla-debiased", torch.randn(60, 6, generator=g) * 4, 1.7,
                  torch.softmax(torch.randn(6, generator=g), 0).double())
    write_run(tmp_path / "gla-ensemble", method="gla", seed=4,
              extra={"gla": {"mode": "ensemble", "finetuned_run": str(tmp_path / "lp"), "temperature_ft": 1.3,
                             "temperature_zs": 1.7, "prior": [1 / 6] * 6}})
    write_run(tmp_path / "b2n", method="candle", splits=("test_base", "test_new"), counts=None)
    write_grid(tmp_path / "grid", {(1, 1): 40.0, (1, 2): 42.0, (2, 1): 50.0, (2, 2): 53.0})
    paths = [tmp_path / n for n in ("lift-la", "lp", "gla-debiased", "gla-ensemble", "b2n", "grid")]
    files = report_runs(paths, tmp_path / "out", formats="md,csv,latex,html")
    expected = {"per_class_accuracy", "many_medium_few", "base_new_hm", "accuracy_vs_shots",
                "lift-la_predicted_vs_true", "gla-debiased_gla_prior", "gla-debiased_reliability",
                "gla-ensemble_reliability", "gla-ensemble_gla_prior", "b2n_predicted_vs_true"}
    for stem in expected:
        for fmt in ("png", "svg"):
            assert f"plots/{stem}.{fmt}" in files, stem
            assert files[f"plots/{stem}.{fmt}"].stat().st_size > 1000
    assert files["plots/lift-la_predicted_vs_true.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = files["report.md"].read_text()
    assert "zero-shot before/after panels are left out" in md  # what an ensemble run cannot show, said
    page = files["report.html"].read_text()
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    pngs = [n for n in files if n.startswith("plots/") and n.endswith(".png")]
    assert len(checker.images) == len(pngs)
    for src in checker.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
    tex = files["report.tex"].read_text()
    assert all(rule in tex for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}"))
    assert r"gla-ensemble" in tex and r"lift-la" in tex


def test_write_run_plots_into_the_run_folder(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    _gla_debiased(tmp_path / "gla", torch.randn(60, 6, generator=g) * 4, 2.0,
                  torch.softmax(torch.randn(6, generator=g), 0).double())
    paths = write_run_plots(tmp_path / "gla")
    names = {p.name for p in paths}
    for stem in ("per_class_accuracy", "many_medium_few", "predicted_vs_true", "gla_prior", "reliability"):
        assert {f"{stem}.png", f"{stem}.svg"} <= names
    assert all(p.parent == tmp_path / "gla" / "plots" and p.stat().st_size > 0 for p in paths)


def test_without_matplotlib_tables_are_written_and_the_report_says_how(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    write_run(tmp_path / "run")
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    files = report_runs([tmp_path / "run"], tmp_path / "out", formats="md,csv,html")
    assert not any(n.startswith("plots/") for n in files)
    assert "pip install 'matplotlib>=3.8'" in files["report.md"].read_text()
    assert "pip install &#x27;matplotlib&gt;=3.8&#x27;" in files["report.html"].read_text()
    assert write_run_plots(tmp_path / "run") == []


def test_paper_target_shown_with_its_difference(tmp_path: Path) -> None:
    lift = {"model": {"name": "ViT-B-16@openai"}, "data": {"imbalance_ratio": None},
            "lift": {"tuner": "adaptformer", "loss": "la", "crop": "rrc"}, "train": {"epochs": 10}}
    res = write_run(tmp_path / "lift", dataset="cifar100-lt", config={**lift, "data": {"name": "cifar100-lt"}},
                    task_meta={"imbalance_ratio": 100.0})  # default beta: resolved in task_meta, not in config
    write_run(tmp_path / "lift-ce", dataset="cifar100-lt", task_meta={"imbalance_ratio": 100.0},
              config={**lift, "data": {"name": "cifar100-lt"}, "lift": {**lift["lift"], "loss": "ce"}})
    files = report_runs([tmp_path / "lift", tmp_path / "lift-ce"], tmp_path / "out", plots=False)
    md = {r["run"]: r for r in md_rows(files["report.md"].read_text())}
    assert md["lift"]["paper"] == "81.70 [1]" and md["lift"]["Δ"] == f"{res['top1'] - 81.7:+.2f}"
    assert md["lift-ce"]["paper"] == ""  # another loss is not the paper's recipe
    text = files["report.md"].read_text()
    assert "Sage (Peng et al.) Table 1" in text and "eval.tte=none (paper: five_crop)" in text
    row = {r["run"]: r for r in read_csv(files["report.csv"])}["lift"]
    assert float(row["paper_value"]) == 81.7 and float(row["paper_diff"]) == pytest.approx(res["top1"] - 81.7)


def test_paper_targets_match_their_own_presets() -> None:
    """Every target whose preset ships in configs/ matches that preset's config (keys only results.json holds,
    and the shot count a grid sets per cell, are not in a preset)."""
    from tailclip.config import config_to_dict, load_config
    from tailclip.report.targets import _MISSING, _get, same

    checked = 0
    for target in TARGETS:
        if target.preset is None or not (REPO / "configs" / f"{target.preset}.yaml").is_file():
            continue
        cfg = config_to_dict(load_config(REPO / "configs" / f"{target.preset}.yaml"))
        for key, want in {**target.match, **target.protocol}.items():
            got = _get(cfg, key)
            if key == "data.shots" or got is _MISSING:
                continue
            assert same(got, want), f"{target.preset}: {key}={got!r}, target expects {want!r}"
            checked += 1
    assert checked >= 30  # the six LIFT presets and the GLA one were all compared


def test_average_over_the_eleven_datasets_matches_the_ldc_row(tmp_path: Path) -> None:
    from tailclip.data import load_all  # noqa: F401  (registers every dataset)
    from tailclip.data.registry import DATASETS

    assert set(AVERAGE_DATASETS) <= set(DATASETS)  # the names grids record as their dataset
    paths = []
    for i, dataset in enumerate(AVERAGE_DATASETS):
        write_grid(tmp_path / dataset, {(16, 1): 70.0 + i, (16, 2): 72.0 + i}, method="ldc", dataset=dataset,
                   model="RN50@openai")
        paths.append(tmp_path / dataset)
    rows = build_rows(collect(paths)[0])
    avg = [r for r in rows if r.kind == "average"]
    assert len(avg) == 1 and avg[0].shots == 16
    seed_means = [70.0 + np.mean(range(11)), 72.0 + np.mean(range(11))]
    assert avg[0].stats["top1"].mean == pytest.approx(np.mean(seed_means))
    assert avg[0].stats["top1"].std == pytest.approx(np.std(seed_means))
    assert avg[0].paper is not None and avg[0].paper.value == 79.78
    assert math.isclose(avg[0].paper.diff or 0, avg[0].stats["top1"].mean - 79.78)


def test_train_summary_prints_base_new_hm_for_base_to_new(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tailclip.cli import _print_summary

    write_run(tmp_path / "b2n", method="candle", dataset="synth-b2n-lt", splits=("val", "test_base", "test_new"),
              counts=None, extra={"main_split": "val"})
    _print_summary(tmp_path / "b2n")
    head, row = capsys.readouterr().out.splitlines()[:2]
    assert head.split() == ["base", "new", "hm"] and row.startswith("candle on synth-b2n-lt")
    write_run(tmp_path / "val-only", extra={"main_split": "val"}, splits=("val",))
    _print_summary(tmp_path / "val-only")
    assert "lift on synth-lt [val]" in capsys.readouterr().out


def test_plots_one_per_task_distinct_colours_and_readable_captions(tmp_path: Path) -> None:
    """Runs of two tasks get a comparison plot each; 9+ runs never share a colour; HTML captions say what a plot
    shows."""
    from tailclip.report.plots import PALETTE, caption

    assert len(set(PALETTE)) == len(PALETTE) >= 9
    write_run(tmp_path / "lt-a", seed=1)
    write_run(tmp_path / "lt-b", seed=2, method="linear_probe")
    write_run(tmp_path / "b2n", method="candle", dataset="synth-b2n-lt", splits=("test_base", "test_new"), counts=None)
    write_run(tmp_path / "other", dataset="cifar100-lt", seed=3)
    files = report_runs([tmp_path / n for n in ("lt-a", "lt-b", "b2n", "other")], tmp_path / "out",
                        formats="md,csv,html")
    names = {Path(n).name for n in files}
    assert {"many_medium_few_synth-lt.png", "many_medium_few_cifar100-lt.png", "per_class_accuracy_synth-lt.png",
            "per_class_accuracy_cifar100-lt.png", "base_new_hm.png"} <= names
    assert "many_medium_few.png" not in names  # never one chart across tasks
    html = files["report.html"].read_text()
    assert "Top-1 on many- (&gt;100), medium- (20-100) and few-shot (&lt;20) classes — synth-lt" in html
    assert caption("lt-a_predicted_vs_true", {"lt-a": "LIFT run"}).startswith("LIFT run: predicted against true")


def test_a_k_shot_run_of_a_long_tailed_task_is_plotted_at_its_own_counts(tmp_path: Path) -> None:
    """--quick's LIFT rows train on at most 8 images per class of synth-lt: their x is min(n_c, 8), not n_c."""
    from tailclip.report.collect import read_run
    from tailclip.report.plots import train_counts

    write_run(tmp_path / "k8", counts=None, task_meta={"shots": 8, "counts": [50, 20, 5]})
    assert train_counts(read_run(tmp_path / "k8")).tolist() == [8, 8, 5]
    write_run(tmp_path / "lt", task_meta={"counts": [50, 20, 5]})
    assert train_counts(read_run(tmp_path / "lt")).tolist() == [float(c) for c in COUNTS]
