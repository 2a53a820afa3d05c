"""Checkpoints (issue 14): `predict` needs only the run folder; damaged checkpoints give one line naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import make_image_folder
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tailclip.cli import app


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_vit_json: Path) -> tuple[Path, Path]:
    """A LIFT run trained for one epoch on an image folder, and a copy of one test image outside the dataset."""
    tmp = tmp_path_factory.mktemp("ckpt")
    data = make_image_folder(tmp / "data", counts=(4, 3, 2), val=1, test=2)
    res = CliRunner().invoke(app, ["train", "--method", "lift", "--dataset", "image-folder", "--root", str(data),
                                   "--model", f"json:{tiny_vit_json}", "--output-dir", str(tmp / "runs"),
                                   "--name", "lift", "train.epochs=1", "train.batch_size=4", "eval.plots=false"])
    assert res.exit_code == 0, res.output
    image = tmp / "image.png"
    shutil.copy(next((data / "test" / "class_1").iterdir()), image)
    return tmp / "runs" / "lift", image


def predict(run: Path, *images: Path):
    return CliRunner().invoke(app, ["predict", "--checkpoint", str(run), "--topk", "3", *map(str, images)])


def test_predict_after_the_dataset_root_moved(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, image = trained
    before = predict(run, image)
    assert before.exit_code == 0, before.output
    data = run.parent.parent / "data"
    moved = tmp_path / "moved"
    shutil.move(data, moved)
    try:
        bad = tmp_path / "broken.png"
        bad.write_bytes(b"not an image")
        after = predict(run, image, bad, image)
    finally:
        shutil.move(moved, data)
    assert after.exit_code == 1
    lines = [json.loads(ln) for ln in after.stdout.strip().splitlines()]
    first = json.loads(before.stdout.strip().splitlines()[-1])
    assert lines[0] == first and lines[2] == first  # same classes and probabilities as with the dataset
    assert lines[1]["image"] == str(bad) and "corrupt or unreadable image" in lines[1]["error"]
    meta = json.loads((run / "checkpoint.json").read_text())
    assert meta["task"]["classnames"] == ["class_0", "class_1", "class_2"] and meta["backbone_fingerprint"]


@pytest.mark.parametrize("damage", ["truncated", "not-safetensors", "wrong-shape", "bad-json", "flipped-bytes"])
def test_damaged_checkpoint_is_one_named_line(trained: tuple[Path, Path], tmp_path: Path, damage: str) -> None:
    run, image = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = copy / "checkpoint.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
        expect = f"checkpoint {weights} is damaged: truncated"
    elif damage == "not-safetensors":
        torch.save({"w": torch.zeros(3)}, weights)
        expect = f"checkpoint {weights} is damaged: not a safetensors file"
    elif damage == "wrong-shape":
        state = load_file(str(weights))
        name = min(state)
        state[name] = torch.zeros(*[d + 1 for d in state[name].shape])
        save_file(state, str(weights))
        expect = f"checkpoint {weights}: its tensors do not fit method 'lift' as configured ({name} is"
    elif damage == "flipped-bytes":  # a few bytes of tensor data scrambled: the file still parses and fits
        data = bytearray(weights.read_bytes())
        for i in range(len(data) - 64, len(data) - 32):
            data[i] ^= 0xFF
        weights.write_bytes(bytes(data))
        expect = f"checkpoint {weights} is damaged: its bytes do not match the checksum"
    else:
        (copy / "checkpoint.json").write_text('{"task": ')
        expect = f"checkpoint description {copy / 'checkpoint.json'} is damaged: not valid JSON"
    res = predict(copy, image)
    assert res.exit_code == 2
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("content", [b"", b"not a zip file at all", b"PK\x03\x04" + b"\x00" * 40])
def test_damaged_resume_state_is_one_named_line(tmp_path: Path, content: bytes) -> None:
    from tailclip.engine.checkpoint import load_resume_state
    from tailclip.errors import TailclipError

    path = tmp_path / "resume.pt"
    path.write_bytes(content)
    with pytest.raises(TailclipError, match=f"^{path}: the resume state is damaged"):
        load_resume_state(path, "fp")
    torch.save({"version": 2, "fingerprint": "fp"}, path)
    good = load_resume_state(path, "fp")
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated mid-file
    with pytest.raises(TailclipError, match="the resume state is damaged"):
        load_resume_state(path, "fp")
    assert good["fingerprint"] == "fp"


def test_predict_with_a_zero_shot_run(trained: tuple[Path, Path], tiny_vit_json: Path, tmp_path: Path) -> None:
    """A zero-shot run has no checkpoint and needs none: predict rebuilds it from its config."""
    run, image = trained
    data = run.parent.parent / "data"
    res = CliRunner().invoke(app, ["eval", "--method", "zeroshot", "--dataset", "image-folder", "--root", str(data),
                                   "--model", f"json:{tiny_vit_json}", "--output-dir", str(tmp_path), "--name", "zs",
                                   "eval.plots=false"])
    assert res.exit_code == 0, res.output
    res = predict(tmp_path / "zs", image)
    assert res.exit_code == 0, res.output
    line = json.loads(res.output.strip().splitlines()[-1])
    assert len(line["predictions"]) == 3 and abs(sum(p["prob"] for p in line["predictions"]) - 1) < 1e-5


def test_nan_logits_are_refused_not_printed(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """A model that gives NaN logits printed `"prob": NaN` (invalid JSON) with exit 0; now one line, exit 2."""
    from tailclip.io import file_checksum

    run, image = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = copy / "checkpoint.safetensors"
    state = load_file(str(weights))
    head = next(k for k in state if k.startswith("head."))
    state[head] = torch.full_like(state[head], float("nan"))
    save_file(state, str(weights))
    meta = json.loads((copy / "checkpoint.json").read_text())
    meta["weights_checksum"] = file_checksum(weights)
    (copy / "checkpoint.json").write_text(json.dumps(meta))
    res = predict(copy, image)
    assert res.exit_code == 2 and "NaN or inf logits" in res.output and '"prob"' not in res.output
