"""Typed configs: defaults, YAML presets, overrides, and errors that name the key and accepted values."""

from __future__ import annotations

from pathlib import Path

import pytest

from tailclip.config import load_config
from tailclip.errors import ConfigError


def test_defaults_and_overrides() -> None:
    cfg = load_config(None, ["train.lr=0.02", "data.name=cifar100-lt", "data.imbalance_ratio=50"])
    assert cfg.train.lr == 0.02
    assert cfg.data.name == "cifar100-lt" and cfg.data.imbalance_ratio == 50.0
    assert cfg.method == "zeroshot" and cfg.model.name == "synthetic:tiny-clip"


def test_preset_then_override(tmp_path: Path) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  epochs: 3\n  lr: 0.5\neval:\n  tte: five_crop\n")
    cfg = load_config(preset, ["train.lr=0.1"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.eval.tte) == (3, 0.1, "five_crop")


def test_method_section_is_typed() -> None:
    cfg = load_config(None, ["method=zeroshot", "zeroshot.logit_scale=50"])
    assert cfg.method_config().logit_scale == 50.0
    with pytest.raises(ConfigError, match="zeroshot.bogus"):
        load_config(None, ["zeroshot.bogus=1"])


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.bogus=1", "train.bogus"),
        ("train.optimizer=rmsprop", "sgd, adamw"),
        ("train.precision=fp8", "fp32, amp, amp_bf16"),
        ("eval.tte=three_crop", "none, five_crop, ten_crop"),
        ("train.epochs=abc", "train.epochs"),
        ("data.on_bad_image=ignore", "error, skip"),
        ("train.lr", "key=value"),
    ],
)
def test_bad_values_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_method_lists_known() -> None:
    from tailclip.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="zeroshot"):
        load_config(None, ["method=nosuchmethod"])


def test_missing_preset_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
