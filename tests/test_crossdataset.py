"""Candle's cross-dataset protocol: a long-tailed source whose classes are all base, a target whose classes are
appended as new and never trained; the registry's imagenet-xd-<target> names and the synthetic synth-xd."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import color_task

from tailclip.api import run
from tailclip.config import load_config
from tailclip.data.base import Task
from tailclip.data.base2new import b2n_lt_counts, make_cross_dataset
from tailclip.data.registry import DATASETS, build_task
from tailclip.errors import DataError

TARGETS = ["caltech101", "dtd", "eurosat", "fgvc_aircraft", "food101", "oxford_flowers", "oxford_pets",
           "stanford_cars", "sun397", "ucf101"]


def test_registry_lists_imagenet_to_every_target() -> None:
    build_task(load_config(None, ["data.name=synth-lt"]).data)  # fills the lazily loaded registry
    assert sorted(n for n in DATASETS if "-xd-" in n) == sorted(f"imagenet-xd-{t}" for t in TARGETS)


def test_make_cross_dataset_on_two_tasks() -> None:
    source = color_task(num_classes=4, per_class=12, name="src")
    target = color_task(num_classes=3, per_class=5, seed=1, name="tgt")
    cfg = load_config(None, ["data.imbalance_ratio=4", "data.seed=2"]).data
    task = make_cross_dataset(source, target, cfg)
    assert task.classnames == source.classnames + target.classnames and task.num_classes == 7
    assert task.name == "src-xd-tgt" and task.meta["base_classes"] == [0, 1, 2, 3]
    assert task.meta["new_classes"] == [4, 5, 6] and task.meta["label_spaces"]["test_new"] == [4, 5, 6]
    train = task.splits["train"]
    assert set(train.labels.tolist()) <= {0, 1, 2, 3}  # no target class is trained
    counts = np.bincount(train.labels, minlength=4)
    assert sorted(counts.tolist(), reverse=True) == b2n_lt_counts(np.full(4, 12), 4.0).clip(max=12).tolist()
    new = task.splits["test_new"]
    assert new.labels.tolist() == (target.splits["test"].labels + 4).tolist()
    assert len(task.splits["test_base"]) == len(source.splits["test"]) and "test" not in task.splits
    with pytest.raises(DataError, match="cross-dataset .target. needs the split.s. test"):
        make_cross_dataset(source, Task("t", target.classnames, ["{}"], {"train": target.splits["train"]}), cfg)


def test_synth_xd_counts_and_no_target_in_training() -> None:
    task = build_task(load_config(None, ["data.name=synth-xd", "data.seed=3"]).data)
    assert task.num_classes == 100 and task.meta["imbalance_ratio"] == 100.0
    train, val, new = task.splits["train"], task.splits["val"], task.splits["test_new"]
    assert train.labels.max() < 50 and val.labels.max() < 50 and new.labels.min() == 50
    counts = np.bincount(train.labels, minlength=50)
    assert counts.max() == 100 and counts.min() == 1 and counts.sum() == len(train) == 1080
    assert len(new) == len(task.splits["test_base"]) == 5000


def test_candle_and_coop_end_to_end_report_source_and_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAILCLIP_CACHE", str(tmp_path / "cache"))
    base = ["model.name=synthetic:tiny-clip", "data.name=synth-xd", "eval.splits=[val,test_base,test_new]",
            f"output_dir={tmp_path}", "train.epochs=1"]
    for extra in (["method=candle", "candle.augment_views=0", "run_name=candle"],
                  ["method=coop", "coop.views=0", "train.batch_size=64", "run_name=coop"]):
        res = json.loads((run(load_config(None, base + extra)) / "results.json").read_text())
        assert res["dataset"] == "synth-xd" and {"base", "new", "hm"} <= set(res)
        assert res["splits"]["test_new"]["num_samples"] == 5000 and res["new"] > 50.0  # 50 classes: chance is 2 %
        assert res["hm"] == pytest.approx(2 * res["base"] * res["new"] / (res["base"] + res["new"]))
