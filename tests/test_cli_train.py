"""CLI round trip: `tailclip train` (and --print-params), `eval --checkpoint` with TTE, `predict --checkpoint`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_image_folder
from typer.testing import CliRunner

from tailclip.cli import app


def test_train_eval_predict_round_trip(tmp_path: Path, tiny_vit_json: Path) -> None:
    data = make_image_folder(tmp_path / "data", counts=(6, 3, 2), val=1, test=2)
    runner = CliRunner()
    common = ["--method", "lift", "--dataset", "image-folder", "--root", str(data), "--model", f"json:{tiny_vit_json}",
              "--output-dir", str(tmp_path / "runs")]

    res = runner.invoke(app, ["train", *common, "--print-params", "lift.bottleneck=2"])
    assert res.exit_code == 0, res.output
    per_block = (2 * 2 + 3) * 64 + 2 + 1
    assert f"{4 * per_block:,}" in res.output and "trainable total" in res.output  # 4 blocks, d = 64

    res = runner.invoke(app, ["train", *common, "--name", "lift", "train.epochs=1", "train.batch_size=4"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "lift"
    for name in ("config.yaml", "metrics.csv", "results.json", "checkpoint.safetensors", "checkpoint.json"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "checkpoint.json").read_text())
    assert meta["method"] == "lift" and meta["preprocess"]["image_size"] == 32
    assert not any(k.startswith("backbone.") for k in meta["tensors"])  # frozen CLIP never saved

    res = runner.invoke(app, ["eval", "--checkpoint", str(run), "eval.tte=five_crop"])
    assert res.exit_code == 0, res.output
    trained = json.loads((run / "results.json").read_text())
    evals = sorted((run / "evals").iterdir())
    again = json.loads((evals[-1] / "results.json").read_text())
    assert again["splits"]["test"]["num_samples"] == trained["splits"]["test"]["num_samples"] == 6

    image = next((data / "test" / "class_1").iterdir())
    res = runner.invoke(app, ["predict", "--checkpoint", str(run), "--topk", "2", str(image)])
    assert res.exit_code == 0, res.output
    row = json.loads(res.output.strip().splitlines()[-1])
    assert row["image"] == str(image) and len(row["predictions"]) == 2
    # the printed top-2 are the trained model's softmax over every class of this image
    from PIL import Image

    from tailclip.data.transforms import eval_transform
    from tailclip.methods.loading import load_trained

    trained_run = load_trained(run, need_task=False)
    x = eval_transform(trained_run.method.backbone.preprocess)(Image.open(image).convert("RGB"))[None]
    with torch.no_grad():
        probs = trained_run.method.eval()(x).logits.softmax(-1)[0]
    top = probs.topk(2)
    assert [p["index"] for p in row["predictions"]] == top.indices.tolist()
    assert [p["class"] for p in row["predictions"]] == [trained_run.classnames[i] for i in top.indices.tolist()]
    assert [p["prob"] for p in row["predictions"]] == pytest.approx(top.values.tolist(), abs=1e-6)
