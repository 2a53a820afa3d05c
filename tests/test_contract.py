"""The method contract: the engine calls prepare -> trainer (when the method trains) -> finish and returns what was
trained and chosen; extra results sit under the method's name; traps of building methods raise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import color_task
from torch import Tensor, nn

from tailclip.api import evaluate
from tailclip.config import load_config
from tailclip.contract import FitContext, FitResult, Inputs, Method, Output, SelectionRecord
from tailclip.engine.fit import fit
from tailclip.errors import TailclipError
from tailclip.methods.loading import build_method


class Recording(Method):
    """A linear classifier on cached proj features that records the hooks the engine calls (tests only)."""

    name = "recording"
    inputs = "features"

    def __init__(self, backbone, info, train: bool = True) -> None:
        super().__init__(None, backbone, info)
        self.fc = nn.Linear(backbone.embed_dim, info.num_classes)
        self.fc.requires_grad_(train)
        self.calls: list[str] = []

    def forward(self, inputs: Inputs, labels: Tensor | None = None) -> Output:
        logits = self.fc(self.encode(inputs)["proj"].float())
        return Output(logits, nn.functional.cross_entropy(logits, labels) if labels is not None else None)

    def prepare(self, ctx: FitContext) -> None:
        self.calls.append("prepare")

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        self.calls.append(f"epoch {epoch}")

    def finish(self, ctx: FitContext, result: FitResult) -> FitResult:
        self.calls.append("finish")
        chosen = SelectionRecord("val", "a threshold", {"threshold": 0.5})
        return FitResult(result.training, result.selection.followed_by("threshold", chosen)
                         if result.selection else chosen)

    def extra_results(self) -> dict[str, object]:
        return {"calls": list(self.calls)}


def _ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str):
    monkeypatch.setenv("TAILCLIP_CACHE", str(tmp_path / "cache"))
    task = color_task(4, 6)
    cfg = load_config(None, ["method=zeroshot", "train.epochs=2", "train.batch_size=8", "train.select_on=val",
                             "eval.splits=[test]", *overrides])
    return task, cfg, FitContext(cfg, task.guarded(), tmp_path, torch.device("cpu"))


def test_engine_calls_prepare_train_finish_in_order(tmp_path: Path, tiny_backbone,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    task, _cfg, ctx = _ctx(tmp_path, monkeypatch)
    method = Recording(tiny_backbone, task.info())
    result = fit(method, ctx)
    assert method.calls == ["prepare", "epoch 0", "epoch 1", "finish"]
    assert result.training is not None and len(result.training.history) == 2
    record = result.selection.to_dict()
    assert record["on"] == "val" and record["among"] == "epochs" and "val_top1" in record["chosen"]
    assert record["threshold"] == {"on": "val", "among": "a threshold", "chosen": {"threshold": 0.5},
                                   "selected_on_test": False}

    frozen = Recording(tiny_backbone, task.info(), train=False)  # nothing trains: no trainer, no epochs
    result = fit(frozen, ctx)
    assert frozen.calls == ["prepare", "finish"] and result.training is None
    assert result.to_results() == {"selection": {"on": "val", "among": "a threshold", "chosen": {"threshold": 0.5},
                                                 "selected_on_test": False}}


def test_extra_results_sit_under_the_method_name_and_never_overwrite(tmp_path: Path, tiny_backbone,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    task, cfg, _ = _ctx(tmp_path, monkeypatch)
    method = Recording(tiny_backbone, task.info(), train=False)
    full = FitContext(cfg, task, tmp_path, torch.device("cpu"))
    results = evaluate(method, full, fit(method, FitContext(cfg, task.guarded(), tmp_path, torch.device("cpu"))))
    assert results["recording"] == {"calls": ["prepare", "finish"]} and "calls" not in results
    assert results["selection"]["among"] == "a threshold" and "training" not in results

    class Clashing(Recording):
        name = "splits"  # would replace the per-split metrics

    with pytest.raises(TailclipError, match=r"\['splits'\] would overwrite"):
        evaluate(Clashing(tiny_backbone, task.info(), train=False), full)


def test_load_config_knows_every_method_without_importing_the_methods_first() -> None:
    code = ("from tailclip.config import load_config\n"
            "cfg = load_config(None, ['method=lift', 'lift.loss=ce'])\n"
            "print(cfg.method_config().loss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ce", out.stderr[-2000:]


def test_a_second_method_on_a_backbone_with_a_tuner_is_refused(tiny_backbone) -> None:
    info = color_task(4, 2).info()
    first = build_method(load_config(None, ["method=lift"]), tiny_backbone, info)
    try:
        with pytest.raises(TailclipError, match="already carries another method's tuner"):
            build_method(load_config(None, ["method=sage"]), tiny_backbone, info)
        with pytest.raises(TailclipError, match="already carries"):
            build_method(load_config(None, ["method=zeroshot"]), tiny_backbone, info)
    finally:
        first.tuner.detach()
    full = build_method(load_config(None, ["method=lift", "lift.tuner=full"]), tiny_backbone, info)  # no hooks
    try:
        with pytest.raises(TailclipError, match="unfrozen tensors"):
            build_method(load_config(None, ["method=zeroshot"]), tiny_backbone, info)
    finally:
        full.tuner.detach()
    build_method(load_config(None, ["method=sage"]), tiny_backbone, info).tuner.detach()  # detached: free again
