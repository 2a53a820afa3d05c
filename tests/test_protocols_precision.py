"""train.precision=fp16_weights: the released CoOp / CoCoOp / Candle / LDC training with float16 weights updated in
float16 (no loss scaling), a named option next to tailclip's fp32 / AMP default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tailclip import api
from tailclip.config import load_config
from tailclip.engine.trainer import weights_to


def test_weights_to_keeps_norm_layers_in_fp32_and_loses_small_updates() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.BatchNorm1d(4))
    model.extra = nn.Parameter(torch.ones(3))  # a bare parameter (CoOp's context, Candle's projections)
    weights_to(model, torch.float16)  # type: ignore[arg-type]
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes == {"extra": torch.float16, "0.weight": torch.float16, "0.bias": torch.float16,
                      "1.weight": torch.float32, "1.bias": torch.float32, "2.weight": torch.float32,
                      "2.bias": torch.float32}
    # an update below half a float16 step at 1.0 (2^-11) is lost in float16, kept in float32
    opt = torch.optim.SGD([model.extra], lr=1e-4)
    model.extra.grad = torch.ones(3, dtype=torch.float16)
    opt.step()
    assert torch.equal(model.extra.detach(), torch.ones(3, dtype=torch.float16))
    weights_to(model, torch.float32)  # type: ignore[arg-type]
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("method", ["coop", "candle", "ldc"])
def test_fp16_weights_trains_and_ends_in_fp32(tmp_path: Path, method: str) -> None:
    """Training in fp16 weights ends with fp32 parameters whose values are float16 numbers, different from the
    fp32 run's; results.json records the precision under "protocol"."""
    common = ["data.name=synth-fewshot", "data.shots=2", "train.epochs=2", f"output_dir={tmp_path}",
              "eval.plots=false", "eval.splits=[val]", f"method={method}"]
    extra = {"coop": ["coop.views=0", "train.lr=0.002"], "candle": ["candle.augment_views=0"],
             "ldc": ["ldc.views=1", "train.epochs=2"]}[method]
    states = {}
    for precision in ("fp32", "fp16_weights"):
        cfg = load_config(None, [*common, *extra, f"train.precision={precision}", f"run_name={precision}"])
        run = api.run(cfg)
        from safetensors.torch import load_file

        states[precision] = load_file(run / "checkpoint.safetensors")
        res = json.loads((run / "results.json").read_text())
        assert res["protocol"]["precision"] == precision
        assert ("precision=fp16_weights" in res["protocol"]["differs"]) == (precision == "fp16_weights")
    for name, t in states["fp16_weights"].items():
        assert t.dtype == states["fp32"][name].dtype
    trained = [n for n, t in states["fp16_weights"].items() if not torch.equal(t, states["fp32"][n])]
    assert trained, "fp16 weights trained exactly as fp32"
    matrices = [n for n in trained if states["fp16_weights"][n].ndim >= 2]  # weights, context, projections
    assert matrices
    for name in matrices:  # (1-D tensors include the norm layers, which stay float32)
        t = states["fp16_weights"][name]
        assert torch.equal(t, t.half().float()), name
