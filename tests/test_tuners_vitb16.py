"""LIFT's rows on a random-weight ViT-B/16 at C = 100: trainable parameters exactly as LIFT's released code counts
them (tuner + cosine head), in the method and through `tailclip train --print-params`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tailclip.backbones import create_backbone
from tailclip.cli import app
from tailclip.config import load_config
from tailclip.data.base import TaskInfo
from tailclip.methods import get_method
from tailclip.tuners import TUNERS, SGAdapterOptions, build_tuner

HEAD = 100 * 768  # cosine head on the 768-d pre-projection feature, no bias
# tuner parameters at C = 100 (r = 4 by LIFT's rule, 10 prompts): LIFT's counts for ViT-B/16
TUNER_PARAMS = {
    "adaptformer": 12 * ((2 * 4 + 3) * 768 + 4 + 1),  # 101,436
    "adapter": 12 * ((2 * 4 + 3) * 768 + 4),  # 101,424
    "lora": 12 * 2 * (2 * 4 * 768),  # 147,456
    "vpt_deep": 12 * 10 * 768,  # 92,160
    "vpt_shallow": 10 * 768,  # 7,680
    "full": 85_054_464,  # the transformer blocks only
    "bitfit": 101_376,
    "ln": 36_864,
    "classifier": 0,
    "sg_adapter": 12 * ((5 * 4 + 768 + 4) * 768 + 3 * 4 + 2),  # Sage's Table 9: 7,299,240
}


@pytest.fixture(scope="module")
def vitb16():
    return create_backbone("ViT-B-16@none")


def test_every_registered_tuner_has_its_count() -> None:
    assert set(TUNER_PARAMS) == set(TUNERS)


@pytest.mark.parametrize("name", list(TUNER_PARAMS))
def test_lift_row_parameter_counts(vitb16, name: str) -> None:
    guidance = torch.zeros(100, 768)  # the SG-Adapter reads a classifier weight (LIFT hands over its head's)
    options = SGAdapterOptions(guidance=lambda: guidance) if name == "sg_adapter" else None
    tuner = build_tuner(name, vitb16, options, num_classes=100)
    try:
        unfrozen = sum(p.numel() for p in vitb16.parameters() if p.requires_grad)
        assert tuner.num_own_parameters() + unfrozen == TUNER_PARAMS[name]
    finally:
        tuner.detach()
    info = TaskInfo("c100", [f"c{i}" for i in range(100)], ["{}"], np.full(100, 5), ("train", "test"))
    cfg = load_config(None, ["method=lift", f"lift.tuner={name}", "lift.head_init=random"]).method_config()
    method = get_method("lift")(cfg, vitb16, info)
    try:
        assert method.num_trainable() == TUNER_PARAMS[name] + HEAD
        assert method.extra_results()["head_params"] == HEAD
    finally:
        method.tuner.detach()


def test_print_params_prints_the_row() -> None:
    res = CliRunner().invoke(app, ["train", "--print-params", "method=lift", "model.name=ViT-B-16@none",
                                   "lift.tuner=bitfit", "data.name=synth-lt", "lift.head_init=random"])
    assert res.exit_code == 0, res.output
    assert "101,376" in res.output and "76,800" in res.output and f"{101_376 + HEAD:,}" in res.output
