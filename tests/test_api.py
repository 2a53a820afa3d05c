"""Orchestrator rules: which counts define many/medium/few, and the base-to-new scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tailclip.api import group_counts, harmonic_mean, restrict_to_label_space
from tailclip.config import load_config
from tailclip.data.base import ArrayImages, Split, Task
from tailclip.methods import Predictions


def _task(train_labels: list[int], meta: dict | None = None) -> Task:
    imgs = ArrayImages(np.zeros((len(train_labels), 2, 2, 3), np.uint8), "x")
    test = Split(ArrayImages(np.zeros((4, 2, 2, 3), np.uint8), "t"), [0, 1, 2, 3])
    return Task("t", ["a", "b", "c", "d"], ["{}"], {"train": Split(imgs, train_labels), "test": test}, meta or {})


def test_groups_from_train_counts_but_not_for_k_shot_tasks() -> None:
    labels = [0] * 3 + [1] * 2 + [2] + [3]
    assert group_counts(_task(labels)).tolist() == [3, 2, 1, 1]
    assert group_counts(_task(labels, {"shots": 16})) is None


def test_base_to_new_scores_each_half_in_its_own_label_space() -> None:
    task = _task([0, 1], {"label_spaces": {"test_new": [2, 3]}})
    # The image of class 2 is most similar to base class 0, but among new classes {2, 3} it is right.
    logits = torch.tensor([[9.0, 0.0, 5.0, 1.0], [9.0, 0.0, 1.0, 5.0]])
    preds = Predictions(logits, torch.tensor([2, 3]), torch.tensor([0, 1]))
    sub, labels, counts = restrict_to_label_space(task, "test_new", preds, np.array([1, 1, 0, 0]))
    assert sub.argmax(1).tolist() == labels.tolist() == [0, 1]
    assert counts.tolist() == [0, 0]
    assert harmonic_mean(80.0, 60.0) == pytest.approx(68.5714, abs=1e-4)


def test_k_shot_run_keeps_its_draw(tmp_path, tiny_vit_json) -> None:
    """The drawn K-shot indices are written next to the results, and applying them rebuilds the same splits."""
    import dataclasses
    import json

    from helpers import color_task

    from tailclip.api import SHOT_INDICES, load_config, run
    from tailclip.data.fewshot import apply_shots
    from tailclip.data.registry import DATASETS, build_task, register_dataset

    name = "api-colors"
    if name not in DATASETS:
        register_dataset(name)(lambda cfg: apply_shots(color_task(3, 8, name=name), cfg))
    cfg = load_config(None, [f"model.name=json:{tiny_vit_json}", f"data.name={name}", "data.shots=2", "data.seed=3",
                             f"output_dir={tmp_path}", "run_name=zs", "method=zeroshot"])
    run_dir = run(cfg, train=False)
    stored = json.loads((run_dir / SHOT_INDICES).read_text())
    drawn = build_task(cfg.data)
    assert stored == drawn.meta["shot_indices"]
    full = build_task(dataclasses.replace(cfg.data, shots=None))
    again = apply_shots(full, dataclasses.replace(cfg.data, seed=99), indices=stored)
    assert again.split("train").labels.tolist() == drawn.split("train").labels.tolist()
    assert [again.split("train").images.ident(i) for i in range(6)] == \
        [drawn.split("train").images.ident(i) for i in range(6)]


@pytest.mark.parametrize("method", ["zeroshot", "gla", "linear_probe", "candle"])
def test_select_on_paper_is_refused_before_any_work(tmp_path: Path, method: str) -> None:
    """A method without a paper protocol refuses train.select_on=paper before a folder or a feature is written."""
    from tailclip import api
    from tailclip.errors import ConfigError

    cfg = load_config(None, [f"method={method}", "train.select_on=paper", f"output_dir={tmp_path / 'runs'}",
                             "run_name=r"])
    with pytest.raises(ConfigError, match=f"method '{method}' declares no paper protocol.*ldc, tip_adapter"):
        api.run(cfg)
    assert not (tmp_path / "runs").exists()
