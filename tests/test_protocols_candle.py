"""Candle's released protocol (shijxcs/Candle on Dassl): the imbalanced base-to-new draw, the scoring of base test
images, the attention masks and the transductive evaluation batch, each against a transcription of the released
rule."""

from __future__ import annotations

import math
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tailclip.config import DataConfig, load_config
from tailclip.data import build_task
from tailclip.data.base import Split, Task
from tailclip.data.base2new import b2n_lt_counts, first_seen_order, make_base_to_new, make_cross_dataset

SHARED = Path(os.environ.get("TAILCLIP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def released_b2n_lt_counts(train_labels: list[int], ratio: float, shots: int = 100, subsample: str = "base"
                           ) -> dict[int, int]:
    """Per-class train counts of the released pipeline, transcribed step by step: Dassl's
    generate_fewshot_dataset (labels grouped in first-appearance order, random.sample(items, K) or all of a smaller
    class), OxfordPets.subsample_classes (sorted labels, base = first ceil(n/2)), gen_imbalanced_data (Counter
    most_common ranking, quota int(max(n_max * r ** (i / (C - 1.0)), 1)), keep idx[:quota] after a shuffle)."""
    groups: dict[int, list[int]] = {}
    for y in train_labels:
        groups.setdefault(y, []).append(y)
    capped = [y for items in groups.values() for y in (items[:shots] if len(items) >= shots else items)]
    labels = sorted(set(capped))
    m = math.ceil(len(labels) / 2)
    keep = set(labels[:m]) if subsample == "base" else set(labels)
    train = [y for y in capped if y in keep]
    r = 1.0 / ratio
    counter = Counter(train)
    ranked = counter.most_common(len(counter))
    n_max = ranked[0][1]
    quota = {label: int(max(n_max * r ** (i / (len(counter) - 1.0)), 1)) for i, (label, _) in enumerate(ranked)}
    return {c: len([y for y in train if y == c][: quota[c]]) for c in sorted(counter)}


COOP = {  # split file -> (our dataset, CoOp folder, image folder)
    "split_zhou_Caltech101.json": ("caltech101", "caltech-101", "101_ObjectCategories"),
    "split_zhou_DescribableTextures.json": ("dtd", "dtd", "images"),
    "split_zhou_EuroSAT.json": ("eurosat", "eurosat", "2750"),
    "split_zhou_OxfordFlowers.json": ("oxford_flowers", "oxford_flowers", "jpg"),
    "split_zhou_OxfordPets.json": ("oxford_pets", "oxford_pets", "images"),
    "split_zhou_StanfordCars.json": ("stanford_cars", "stanford_cars", ""),
    "split_zhou_UCF101.json": ("ucf101", "ucf101", "UCF-101-midframes"),
}


@pytest.mark.skipif(not (SHARED / "coop-splits").is_dir(), reason=f"{SHARED} not present")
@pytest.mark.parametrize("split_file", sorted(COOP))
def test_b2n_lt_counts_equal_the_released_rule_on_real_split_lists(tmp_path: Path, split_file: str) -> None:
    name, coop_dir, image_dir = COOP[split_file]
    d = tmp_path / coop_dir
    (d / image_dir).mkdir(parents=True, exist_ok=True)
    shutil.copy(SHARED / "coop-splits" / split_file, d / split_file)
    full = build_task(DataConfig(name=name, root=str(tmp_path)))
    for ratio in (10, 20, 50):
        task = build_task(DataConfig(name=f"{name}-b2n-lt", root=str(tmp_path), imbalance_ratio=ratio, seed=2))
        want = released_b2n_lt_counts(full.split("train").labels.tolist(), ratio)
        got = {c: int(task.class_counts[c]) for c in task.meta["base_classes"]}
        assert got == want, (name, ratio)
        if name == "dtd" and ratio == 10:  # the figures: 562 images, 60 / 6
            assert sum(got.values()) == 562 and max(got.values()) == 60 and min(got.values()) == 6


def _task(labels: np.ndarray, classes: int, name: str = "t") -> Task:
    from tailclip.data.base import ArrayImages

    def split(y: np.ndarray) -> Split:
        return Split(ArrayImages(np.zeros((len(y), 4, 4, 3), np.uint8), name), y)

    test = np.repeat(np.arange(classes), 2)
    return Task(name, [f"c{i}" for i in range(classes)], ["a photo of a {}."],
                {"train": split(labels), "test": split(test)})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_b2n_lt_counts_on_unsorted_uneven_lists(seed: int) -> None:
    """Food101 / SUN397 / FGVC-like lists (not kept in ../shared): uneven class sizes around the cap, labels in a
    shuffled first-appearance order, ties in count."""
    rng = np.random.default_rng(seed)
    classes = 21
    sizes = rng.choice([3, 7, 40, 100, 100, 130, 250], size=classes)
    labels = rng.permutation(np.repeat(np.arange(classes), sizes))
    for ratio in (10, 20, 50, 100):
        want = released_b2n_lt_counts(labels.tolist(), ratio)
        cfg = DataConfig(imbalance_ratio=ratio, seed=seed)
        task = make_base_to_new(_task(labels, classes), cfg, imbalanced=True)
        assert {c: int(task.class_counts[c]) for c in task.meta["base_classes"]} == want
        base = np.arange(math.ceil(classes / 2))
        direct = b2n_lt_counts(np.bincount(labels, minlength=classes)[base], ratio, 100, first_seen_order(labels, base))
        assert dict(enumerate(direct.tolist())) == want


def test_cross_dataset_draw_ranks_imagenet_in_list_order() -> None:
    """Every ImageNet class reaches the 100 cap, so the released ranking is the list order, whatever each class
    holds beyond the cap; r = 0.01 over all source classes."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(101, 140, size=30)
    source = _task(np.repeat(np.arange(30), sizes), 30, "src")
    target = _task(np.repeat(np.arange(5), 3), 5, "tgt")
    task = make_cross_dataset(source, target, DataConfig(imbalance_ratio=100, seed=1), "imagenet")
    want = released_b2n_lt_counts(np.repeat(np.arange(30), sizes).tolist(), 100, subsample="all")
    assert task.class_counts[:30].tolist() == [want[c] for c in range(30)]
    assert task.class_counts[0] == 100 and task.class_counts[29] == 1 and task.class_counts[30:].sum() == 0


def test_base_scoring_all_scores_base_images_among_every_class(tmp_path: Path) -> None:
    """eval.base_scoring=all (Candle's released B2Ntestbase): a base test image predicted as a new class is an
    error; new images stay among the new classes; results.json records the choice."""
    import json

    from safetensors.torch import load_file

    from tailclip import api

    cfg = load_config(None, ["method=zeroshot", "data.name=synth-b2n", "eval.splits=[test_base,test_new]",
                             "eval.base_scoring=all", f"output_dir={tmp_path}", "run_name=all", "eval.plots=false"])
    run = api.run(cfg)
    res = json.loads((run / "results.json").read_text())
    base = res["task_meta"]["base_classes"]
    for split, among in (("test_base", None), ("test_new", res["task_meta"]["new_classes"])):
        saved = load_file(str(run / f"logits_{split}.safetensors"))
        logits, labels = saved["logits"], saved["labels"]
        if among is not None:  # new images: among the new classes, labels renumbered
            logits, labels = logits[:, among], labels - len(base)
        assert res["splits"][split]["top1"] == pytest.approx(100 * float((logits.argmax(1) == labels).float().mean()))
    saved = load_file(str(run / "logits_test_base.safetensors"))
    among_base = 100 * float((saved["logits"][:, base].argmax(1) == saved["labels"]).float().mean())
    assert res["splits"]["test_base"]["top1"] < among_base  # some base images go to new classes
    assert res["protocol"]["base_scoring"] == "all" and "base_scoring=all" in res["protocol"]["differs"]

