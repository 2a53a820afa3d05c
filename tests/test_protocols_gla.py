"""GLA's data protocol (T_zs and q fitted on the same labelled data, T_ft on val; recorded in results.json),
the source prior decided by the fine-tuned run's loss property, and reading another run through RunDir."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import color_task, register_color_dataset
from safetensors.torch import save_file

from tailclip.config import dump_config, load_config
from tailclip.engine.fit import fit
from tailclip.engine.runs import RunDir, run_from_template
from tailclip.errors import ConfigError, TailclipError
from tailclip.methods.gla import source_prior_of, task_shots
from tailclip.posthoc import confidence_temperature, estimate_prior


def planted_logits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Over-confident zero-shot logits of 4 classes with a planted label prior, different per split."""
    g = torch.Generator().manual_seed({"train": 1, "val": 2}[split])
    y = torch.arange(4).repeat_interleave(6)
    z = 4.0 * torch.nn.functional.one_hot(y, 4) + 3.0 * torch.randn(len(y), 4, generator=g)
    return 5.0 * z + torch.tensor([0.8, 0.3, -0.2, -0.9]), y


def fitted_gla(tiny_vit_json: Path, tmp_path: Path, *overrides: str):
    """A GLA fitted on the colour task, whose zero-shot logits are replaced by `planted_logits`."""
    from tailclip.api import build
    from tailclip.methods import FitContext

    cfg = load_config(None, [f"model.name=json:{tiny_vit_json}", f"data.name={register_color_dataset()}",
                             "method=gla", "eval.plots=false", *overrides])
    task, method = build(cfg, torch.device("cpu"))
    method._zs = lambda ctx, split: (*planted_logits(split), torch.arange(24), [])
    fit(method, FitContext(cfg, task, tmp_path, torch.device("cpu")))
    return method


def test_gla_fits_tzs_and_q_on_the_same_data(tiny_vit_json: Path, tmp_path: Path) -> None:
    """As the released code (CLIP.pp_estimate): T_zs is calibrated on the very images q is estimated on."""
    temperatures = []
    for choice, splits in (("auto", ["train", "val"]), ("val", ["val"])):
        method = fitted_gla(tiny_vit_json, tmp_path, f"gla.prior_data={choice}")
        parts = [planted_logits(s) for s in splits]
        z, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        t = confidence_temperature(z, y)
        assert 1.5 < t < 100  # a real calibration, not a clamped end of the search range
        assert float(method.temperatures[0]) == pytest.approx(t, rel=1e-6)
        q = estimate_prior(z, y, t)
        torch.testing.assert_close(method.log_prior, q.clamp_min(1e-12).log().float())
        info = method.extra_results()
        assert info["fitted_on"] == {"temperature_zs": "+".join(splits), "prior": "+".join(splits)}
        assert info["prior_samples"] == 24 * len(splits)
        temperatures.append(t)
    assert abs(temperatures[0] - temperatures[1]) > 0.05 * temperatures[1]  # the data choice matters
    with pytest.raises(ConfigError, match="gla.calibration_split"):
        load_config(None, ["method=gla", "gla.calibration_split=test"])  # the test split is never a choice


def test_auto_prior_data_follows_the_released_rule() -> None:
    """K-shot with K < 20: train + val; otherwise val (GLA.FS.public/trainers/gla.py, build_model)."""
    task = color_task(per_class=6)
    assert task_shots(task.info()) == 6
    task.meta["shots"] = 32
    assert task_shots(task.info()) == 32
    lt = color_task(per_class=6)
    lt.splits["train"] = lt.splits["train"].subset([0, 1, 2, 6, 12])
    assert task_shots(lt.info()) is None


def test_source_prior_by_the_models_balances_prior(tmp_path: Path, tiny_backbone) -> None:
    """`Method.balances_prior` follows the loss each method trains with, whatever its option is called (or whether
    it has one: LDC, Candle), and GLA's source_prior=auto reads it from the run's checkpoint.json."""
    from tailclip.data.base import TaskInfo
    from tailclip.methods.loading import build_method

    info = TaskInfo(name="t", classnames=["a", "b", "c"], templates=["a photo of a {}."],
                    class_counts=np.array([5, 3, 1]), split_names=("train", "val", "test"))
    for overrides, expected in ((["method=lift", "lift.loss=la"], True), (["method=lift", "lift.loss=bs"], True),
                                (["method=lift", "lift.loss=ce"], False), (["method=sage"], True),
                                (["method=linear_probe", "linear_probe.head=cosine", "linear_probe.loss=la"], True),
                                (["method=linear_probe", "linear_probe.loss=la"], False),  # logreg fits plain CE
                                (["method=candle"], True), (["method=ldc"], False), (["method=coop"], False),
                                (["method=tip_adapter_f"], False), (["method=zeroshot"], False)):
        method = build_method(load_config(None, overrides), tiny_backbone, info)
        try:
            assert method.balances_prior() is expected, overrides
        finally:
            if hasattr(method, "tuner"):
                method.tuner.detach()
    run = RunDir(tmp_path)
    with pytest.raises(ConfigError, match="lacks"):  # no checkpoint.json
        source_prior_of(run)
    for balanced, expected in ((True, "uniform"), (False, "train")):
        (tmp_path / "checkpoint.json").write_text(json.dumps({"balances_prior": balanced}))
        assert source_prior_of(run) == expected


def fake_run(path: Path, classnames: list[str]) -> Path:
    path.mkdir(parents=True)
    dump_config(load_config(None, ["method=linear_probe", "data.name=colors", "data.shots=4", "data.seed=2"]),
                path / "config.yaml")
    (path / "results.json").write_text(json.dumps({"classnames": classnames, "top1": 50.0}))
    save_file({"logits": torch.eye(3), "labels": torch.arange(3), "indices": torch.tensor([4, 5, 6])},
              str(path / "logits_val.safetensors"))
    return path


def test_run_dir_reads_another_run(tmp_path: Path) -> None:
    task = color_task(num_classes=3)
    fake_run(tmp_path / "runs" / "k4-s2-colors", task.classnames)
    template = str(tmp_path / "runs" / "k{shots}-s{seed}-{dataset}")
    data = load_config(None, ["data.shots=4", "data.seed=2"]).data
    run = run_from_template(template, data, "colors", "gla.finetuned_run")
    assert run.load_config().method == "linear_probe" and run.read_results()["top1"] == 50.0
    saved = run.load_logits("val")
    assert saved is not None and saved.indices.tolist() == [4, 5, 6] and saved.logits.dtype == torch.float32
    assert run.load_logits("test") is None and run.checkpoint_path() is None
    with pytest.raises(TailclipError, match="checkpoint.safetensors"):
        run.load_checkpoint_tensors()
    assert run.check_same_task(task, data).data.shots == 4
    with pytest.raises(TailclipError, match="other classes"):
        run.check_same_task(color_task(num_classes=4), data)
    other = load_config(None, ["data.shots=8", "data.seed=2"]).data
    with pytest.raises(TailclipError, match="not a run folder"):  # k8-s2-colors does not exist
        run_from_template(template, other, "colors", "gla.finetuned_run")
    assert not (tmp_path / "runs" / "k8-s2-colors").exists()  # reading never creates folders
    with pytest.raises(ConfigError, match="gla.finetuned_run"):
        run_from_template(str(tmp_path / "{shot}"), data, "colors", "gla.finetuned_run")
    with pytest.raises(TailclipError, match="no results.json"):
        RunDir(tmp_path / "nowhere").read_results()
