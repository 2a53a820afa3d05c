"""Images skipped under data.on_bad_image=skip are listed in results.json for every split, the train split of
image-trained and of feature-trained methods included; under the default (error) the message names the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_image_folder

from tailclip.api import run
from tailclip.config import load_config


@pytest.fixture
def broken_folder(tmp_path: Path) -> tuple[Path, Path, Path]:
    data = make_image_folder(tmp_path / "data")
    bad_train, bad_test = data / "train" / "class_0" / "1.png", data / "test" / "class_2" / "0.png"
    for path in (bad_train, bad_test):
        path.write_bytes(b"not an image at all")
    return data, bad_train, bad_test


def _cfg(tiny_vit_json: Path, data: Path, tmp_path: Path, method: str, extra: list[str]):
    return load_config(None, [f"model.name=json:{tiny_vit_json}", "data.name=image-folder", f"data.root={data}",
                              f"output_dir={tmp_path / 'runs'}", f"run_name={method}", f"method={method}",
                              "train.epochs=1", "train.batch_size=8", "eval.splits=[val,test]", *extra])


@pytest.mark.parametrize("method", ["lift", "linear_probe"])
def test_skipped_images_are_listed_for_every_split(method: str, broken_folder, tiny_vit_json: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAILCLIP_CACHE", str(tmp_path / "cache"))
    data, bad_train, bad_test = broken_folder
    extra = ["data.on_bad_image=skip"] + (["linear_probe.head=linear"] if method == "linear_probe" else [])
    results = json.loads((run(_cfg(tiny_vit_json, data, tmp_path, method, extra)) / "results.json").read_text())
    assert results["training"]["skipped_train_images"] == [str(bad_train)]
    assert results["splits"]["test"]["skipped_images"] == [str(bad_test)]
    assert results["splits"]["val"]["skipped_images"] == []


def test_the_default_names_the_bad_file(broken_folder, tiny_vit_json: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAILCLIP_CACHE", str(tmp_path / "cache"))
    data, bad_train, _ = broken_folder
    with pytest.raises(Exception, match=str(bad_train.name)) as err:
        run(_cfg(tiny_vit_json, data, tmp_path, "lift", []))
    assert str(bad_train) in str(err.value)
