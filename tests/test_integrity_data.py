"""User datasets (issue 14): CSV rows with empty fields name their line; empty classes warn."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tailclip.config import DataConfig
from tailclip.data.registry import build_task
from tailclip.errors import DataError


def image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path)


def test_csv_row_with_an_empty_field_names_its_line(tmp_path: Path) -> None:
    for i in range(3):
        image(tmp_path / f"{i}.png")
    csv = tmp_path / "data.csv"
    # a blank line (skipped by the reader) before the bad row: the reported number is the file's line
    csv.write_text("path,label,split\n0.png,cat,train\n\n1.png,,test\n2.png,dog,test\n")
    with pytest.raises(DataError, match=rf"^{csv}:4: empty 'label' field\(s\) in row '1.png,,test'$"):
        build_task(DataConfig(name="csv", root=str(csv)))
    csv.write_text("path,label,split\n0.png,cat,train\n1.png,dog,test\n2.png,dog,tset\n")
    with pytest.raises(DataError, match=rf"^{csv}:4: split 'tset'"):
        build_task(DataConfig(name="csv", root=str(csv)))


def test_csv_with_a_utf8_bom_is_read(tmp_path: Path) -> None:
    """Spreadsheet exports start with a byte-order mark; the header is still 'path'."""
    for i in range(2):
        image(tmp_path / f"{i}.png")
    csv = tmp_path / "data.csv"
    csv.write_bytes("path,label,split\n0.png,cat,train\n1.png,dog,test\n".encode("utf-8-sig"))
    task = build_task(DataConfig(name="csv", root=str(csv)))
    assert task.classnames == ["cat", "dog"] and len(task.split("train")) == 1


def test_empty_class_folders_and_untested_classes_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for split, cls, n in (("train", "a", 2), ("train", "b", 2), ("test", "a", 1)):
        for i in range(n):
            image(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "train" / "empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="tailclip.data"):
        task = build_task(DataConfig(name="image-folder", root=str(tmp_path)))
    assert task.classnames == ["a", "b", "empty"]
    assert f"{tmp_path}: class(es) with no images: empty" in caplog.text
    assert f"{tmp_path}: class(es) with no test images (not measured): b" in caplog.text
