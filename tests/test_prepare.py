"""`tailclip prepare`: resized copies with the asked short side, other files copied, a record that marks runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tailclip.config import DataConfig
from tailclip.data.prepare import RECORD, prepare_dataset
from tailclip.data.registry import build_task
from tailclip.errors import ConfigError


def _folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    sizes = [(500, 375), (375, 500), (200, 150)]  # landscape, portrait, already small
    for c in ("cat", "dog"):
        for k, (w, h) in enumerate(sizes):
            (root / "train" / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "train" / c / f"{k}.jpg")
    (root / "notes.txt").write_text("split notes\n")


def test_prepare_resizes_short_side_and_records(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _folder(src)
    record = prepare_dataset("image-folder", str(src), str(out), short_side=128)
    assert record["images"] == 6 and record["resized"] == 6 and record["short_side"] == 128
    for c in ("cat", "dog"):
        assert Image.open(out / "train" / c / "0.jpg").size == (171, 128)  # 500x375 -> round(500*128/375) x 128
        assert Image.open(out / "train" / c / "1.jpg").size == (128, 171)
        assert Image.open(out / "train" / c / "2.jpg").size == (171, 128)
    assert (out / "notes.txt").read_text() == "split notes\n"
    assert json.loads((out / RECORD).read_text())["source_root"] == str(src.resolve())
    original = build_task(DataConfig(name="image-folder", root=str(src)))
    copy = build_task(DataConfig(name="image-folder", root=str(out)))
    assert "prepared" not in original.meta and copy.meta["prepared"]["short_side"] == 128
    assert np.array_equal(copy.split("train").labels, original.split("train").labels)
    small = prepare_dataset("image-folder", str(src), str(tmp_path / "big"), short_side=256)
    assert small["resized"] == 4 and small["copied_unchanged"] == 2  # 200x150 is never upscaled
    assert Image.open(tmp_path / "big" / "train" / "cat" / "2.jpg").size == (200, 150)


def test_prepare_refuses_out_inside_root_and_prepared_sources(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _folder(src)
    with pytest.raises(ConfigError, match="outside"):
        prepare_dataset("image-folder", str(src), str(src / "small"))
    prepare_dataset("image-folder", str(src), str(tmp_path / "out"), short_side=128)
    with pytest.raises(ConfigError, match="already a prepared copy"):
        prepare_dataset("image-folder", str(tmp_path / "out"), str(tmp_path / "again"))
