"""Every tuned row computes what LIFT's released code computes (`models/peft_vit.py`, `models/peft_modules.py`).

The reference below is LIFT's per-block forward written out independently of tailclip's hook machinery (plain
tensors, explicit softmax attention): VPT tokens appended after the patch tokens (deep: re-cut and re-appended
before every block), LoRA deltas on q and v from the LN_1 output, the plain Adapter on the MLP output before the
residual add, AdaptFormer on the residual stream after attention. Tuner parameters are moved off their init so
every branch is live. (Checked once against LIFT's own modules on identical fp16-rounded weights: equal to 0.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tailclip.tuners import AdapterOptions, AdaptFormerOptions, LoRAOptions, VPTOptions, build_tuner

OPTIONS = {"adaptformer": AdaptFormerOptions(bottleneck=4), "adapter": AdapterOptions(bottleneck=4),
           "lora": LoRAOptions(rank=4), "vpt_deep": VPTOptions(length=3), "vpt_shallow": VPTOptions(length=3)}


def _bottleneck(a, x: Tensor) -> Tensor:
    y = F.linear(torch.relu(F.linear(F.layer_norm(x, x.shape[-1:], a.ln.weight, a.ln.bias), a.down.weight,
                                     a.down.bias)), a.up.weight, a.up.bias)
    return y if a.scale is None else y * a.scale


def _attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    b, n, d = q.shape
    q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1)
    return (w @ v).transpose(1, 2).reshape(b, n, d)


def lift_reference(visual, images: Tensor, row: str, tuner) -> Tensor:
    """LIFT's tuned CLIP ViT forward (CLS feature after ln_post) for one row of its table."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
    seq_len = x.shape[1]
    for i, blk in enumerate(visual.transformer.resblocks):
        if row == "vpt_deep" or (row == "vpt_shallow" and i == 0):
            x = torch.cat([x[:, :seq_len], tuner.prompts[i].expand(x.shape[0], -1, -1)], dim=1)
        y = blk.ln_1(x)
        q, k, v = F.linear(y, blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1)
        if row == "lora":
            pairs = tuner.lora[i]
            q = q + (y @ pairs["q"].a @ pairs["q"].b) / tuner.rank
            v = v + (y @ pairs["v"].a @ pairs["v"].b) / tuner.rank
        o = _attention(q, k, v, blk.attn.num_heads)
        h = x + F.linear(o, blk.attn.out_proj.weight, blk.attn.out_proj.bias)
        m = blk.mlp.c_proj(blk.mlp.gelu(blk.mlp.c_fc(blk.ln_2(h))))
        if row == "adapter":
            m = m + _bottleneck(tuner.adapters[i], m)
        if row == "adaptformer":
            m = m + _bottleneck(tuner.adapters[i], h)
        x = h + m
    return visual.ln_post(x[:, 0])


@pytest.mark.parametrize("row", [None, *OPTIONS])
def test_tuned_forward_equals_lift_reference(tiny_backbone, row: str | None) -> None:
    torch.manual_seed(3)
    x = torch.randn(3, 3, 32, 32)
    tuner = build_tuner(row, tiny_backbone, OPTIONS[row]) if row else None
    try:
        if tuner is not None:
            with torch.no_grad():
                for p in tuner.parameters():
                    p.add_(0.1 * torch.randn_like(p))
        with torch.no_grad():
            ours = tiny_backbone.encode_image(x).pre_proj
            ref = lift_reference(tiny_backbone.model.visual, x, row or "", tuner)
        torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5)
    finally:
        if tuner is not None:
            tuner.detach()
