"""Contract every registered method passes, generated from the registry: a new method is tested here without
new test code. Methods that need another run as input (`needs_run`) get the LIFT run of this module."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from test_engine import TRAIN_COUNTS, make_image_folder

from tailclip.api import run
from tailclip.config import load_config
from tailclip.engine.runs import RunDir
from tailclip.methods import METHODS

# Methods whose config names another run folder (ensembles and weight interpolation of a fine-tuned run).
NEEDS_RUN = {"gla_ensemble": ("gla", ["gla.mode=ensemble", "gla.finetuned_run={lift}"]),
             "wise_ft": ("wise_ft", ["wise_ft.finetuned_run={lift}", "wise_ft.alpha=0.5"])}
CASES = sorted([name for name in METHODS if name != "wise_ft"]) + sorted(NEEDS_RUN)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_vit_json: Path) -> dict[str, str]:
    root = tmp_path_factory.mktemp("contract")
    data = make_image_folder(root / "data")
    base = [f"model.name=json:{tiny_vit_json}", "data.name=image-folder", f"data.root={data}",
            f"output_dir={root / 'runs'}", "train.epochs=1", "train.batch_size=8", "eval.splits=[val,test]"]
    lift = run(load_config(None, [*base, "method=lift", "run_name=lift"]))
    return {"base": base, "lift": str(lift), "root": str(root)}


def test_every_method_is_documented_and_typed() -> None:
    for name, cls in METHODS.items():
        assert cls.__doc__ and cls.__doc__.strip(), f"{name} has no docstring (tailclip list methods prints it)"
        assert cls.inputs in ("images", "features"), name
        if cls.Config is not None:
            assert dataclasses.is_dataclass(cls.Config), name
            cls.Config()  # defaults must validate


@pytest.mark.parametrize("case", CASES)
def test_method_runs_and_reports(case: str, world: dict) -> None:
    method, extra = NEEDS_RUN.get(case, (case, []))
    overrides = [*world["base"], f"method={method}", f"run_name={case}", *[e.format(**world) for e in extra]]
    path = run(load_config(None, overrides))
    res = RunDir(path).read_results()
    assert res["method"] == method
    for split in ("val", "test"):
        metrics = res["splits"][split]
        assert metrics["num_samples"] == len(TRAIN_COUNTS) * (2 if split == "val" else 3)
        assert 0.0 <= metrics["top1"] <= 100.0 and len(metrics["per_class_top1"]) == len(TRAIN_COUNTS)
        assert (path / f"logits_{split}.safetensors").is_file()
    assert res["trainable_params"] >= 0
    if res["trainable_params"] > 0:  # a trained method keeps only what it trained
        assert (path / "checkpoint.safetensors").is_file() and (path / "checkpoint.json").is_file()
