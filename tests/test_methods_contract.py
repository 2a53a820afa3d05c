"""Contract every registered method passes, generated from the registry: a new method is tested here without
new test code. Methods that need another run as input (`needs_run`) get the LIFT run of this module.

For every method, on the tiny model and a tiny image-folder task: `fit` never reads a test split (the guarded
task raises), the frozen backbone's weights are bit-identical after `fit`, `forward` on images and `predict` on
the split agree, a checkpoint reloads to identical logits, and the run folder's numbers are the saved logits'."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import TRAIN_COUNTS, make_image_folder
from safetensors.torch import load_file

from tailclip import api
from tailclip.api import build, run
from tailclip.config import load_config
from tailclip.data import base as data_base
from tailclip.data.registry import build_task
from tailclip.data.transforms import eval_transform
from tailclip.engine.checkpoint import load_checkpoint, save_checkpoint
from tailclip.engine.evaluate import predict_split
from tailclip.engine.runs import RunDir
from tailclip.methods import METHODS, FitContext

# Methods whose config names another run folder (ensembles and weight interpolation of a fine-tuned run).
NEEDS_RUN = {"gla_ensemble": ("gla", ["gla.mode=ensemble", "gla.finetuned_run={lift}"]),
             "wise_ft": ("wise_ft", ["wise_ft.finetuned_run={lift}", "wise_ft.alpha=0.5"])}
CASES = sorted([name for name in METHODS if name != "wise_ft"]) + sorted(NEEDS_RUN)
# Cases whose forward cannot classify images by design (the reason is the exemption's documentation).
NO_IMAGE_FORWARD = {"gla_ensemble": "predicts from the fine-tuned run's saved logits, not from images"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_vit_json: Path):
    root = tmp_path_factory.mktemp("contract")
    data = make_image_folder(root / "data")
    base = [f"model.name=json:{tiny_vit_json}", "data.name=image-folder", f"data.root={data}",
            f"output_dir={root / 'runs'}", "train.epochs=1", "train.batch_size=8", "eval.splits=[val,test]"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TAILCLIP_CACHE", str(root / "cache"))
        lift = run(load_config(None, [*base, "method=lift", "run_name=lift"]))
        yield {"base": base, "lift": str(lift), "root": str(root)}


def _overrides(case: str, world: dict, run_name: str) -> list[str]:
    method, extra = NEEDS_RUN.get(case, (case, []))
    return [*world["base"], f"method={method}", f"run_name={run_name}", *[e.format(**world) for e in extra]]


def test_every_method_is_documented_and_typed() -> None:
    for name, cls in METHODS.items():
        assert cls.__doc__ and cls.__doc__.strip(), f"{name} has no docstring (tailclip list methods prints it)"
        assert cls.inputs in ("images", "features"), name
        assert set(cls.select_among) <= {"epochs", "heads"}, name
        assert isinstance(cls.paper_protocol, str), name
        if cls.Config is not None:
            assert dataclasses.is_dataclass(cls.Config), name
            cls.Config()  # defaults must validate


def test_the_guard_stops_a_test_read_during_fit(world: dict) -> None:
    cfg = load_config(None, _overrides("zeroshot", world, "guard"))
    task, _ = build(cfg, torch.device("cpu"))
    guarded = task.guarded()
    assert "test" in guarded.splits and len(guarded.split("train")) == sum(TRAIN_COUNTS)
    with pytest.raises(data_base.TestSplitAccessError, match="'test' split was read during fit"):
        guarded.split("test")
    assert len(guarded.unguarded().split("test")) == 3 * len(TRAIN_COUNTS)


@pytest.mark.parametrize("case", CASES)
def test_method_contract(case: str, world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One run through the orchestrator (which fits on the guarded task: a test read raises), then the checks on
    the very method object it fitted."""
    seen: dict = {}

    def spy_build(cfg, device):
        task, method = build(cfg, device)
        seen.update(method=method, frozen={k: v.clone() for k, v in method.backbone.state_dict().items()},
                    trainable={n for n, _ in method.trainable_parameters()})
        return task, method

    monkeypatch.setattr(api, "build", spy_build)
    monkeypatch.setenv("TAILCLIP_CACHE", str(Path(world["root"]) / "cache"))
    cfg = load_config(None, _overrides(case, world, f"run-{case}"))
    path = run(cfg)
    method = seen["method"]

    # the run folder's numbers are the saved logits'
    res = RunDir(path).read_results()
    assert res["method"] == cfg.method
    for split in ("val", "test"):
        metrics = res["splits"][split]
        saved = load_file(str(path / f"logits_{split}.safetensors"))
        assert metrics["num_samples"] == len(saved["labels"]) == len(TRAIN_COUNTS) * (2 if split == "val" else 3)
        top1 = 100.0 * float((saved["logits"].argmax(1) == saved["labels"]).float().mean())
        assert metrics["top1"] == pytest.approx(top1)
        assert len(metrics["per_class_top1"]) == len(TRAIN_COUNTS)
    if res["trainable_params"] > 0:  # a trained method keeps only what it trained, and says what it selected
        meta = json.loads((path / "checkpoint.json").read_text())
        assert meta["trainable_params"] == res["trainable_params"] == method.num_trainable()
        assert not any(k.startswith("backbone.") for k in meta["tensors"])
        assert res["selection"]["on"] == "val" and res["selection"]["selected_on_test"] is False
    else:
        assert not (path / "checkpoint.safetensors").exists()

    # the frozen backbone is bit-identical after fit
    after = method.backbone.state_dict()
    for key, value in seen["frozen"].items():
        if f"backbone.{key}" not in seen["trainable"]:
            assert torch.equal(after[key], value), f"{case}: frozen backbone weight {key} changed during fit"

    # forward on the test images agrees with predict (what the run saved)
    task = build_task(cfg.data)
    saved = load_file(str(path / "logits_test.safetensors"))
    if case not in NO_IMAGE_FORWARD:
        tf = method.eval_transform("none") or eval_transform(method.backbone.preprocess)
        images = torch.stack([tf(task.split("test").images.load(i)) for i in saved["indices"].tolist()])
        method.eval()
        with torch.no_grad():
            direct = method(images).logits.float()
        torch.testing.assert_close(direct, saved["logits"], rtol=1e-4, atol=1e-4, msg=f"{case}: forward != predict")

    # a checkpoint reloads to identical logits
    ctx = FitContext(cfg, task, tmp_path, torch.device("cpu"))
    save_checkpoint(method, ctx)
    torch.manual_seed(123)  # a fresh build must not depend on the RNG to reload
    _, fresh = build(cfg, torch.device("cpu"))
    load_checkpoint(fresh, tmp_path)
    assert torch.equal(predict_split(fresh, ctx, "test").logits, saved["logits"]), f"{case}: the reload differs"


@pytest.mark.parametrize("case", CASES)
def test_cold_and_warm_feature_cache_give_identical_logits(case: str, world: dict, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The same command on an empty feature cache and on the cache it filled: extraction, logging and caching never
    touch a global RNG that training draws from, so the logits are bit-identical."""
    monkeypatch.setenv("TAILCLIP_CACHE", str(tmp_path / "cache"))
    logits = []
    for name in ("cold", "warm"):
        cfg = load_config(None, [*_overrides(case, world, name), f"output_dir={tmp_path / 'runs'}"])
        logits.append(load_file(str(run(cfg) / "logits_test.safetensors"))["logits"])
    assert torch.equal(logits[0], logits[1])
