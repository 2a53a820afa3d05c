"""The Backbone contract methods build on: the text tower from token embeddings (prompt learners), hooks.paused()
(zero-shot features of the same batch), ResNet taps + attention pool, and no import cycle through backbones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import tailclip
from tailclip.backbones import create_backbone

PROMPTS = ["a photo of a cat.", "a dog", "a very long prompt about a small red triangle on a blue field."]


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# text tower from token embeddings
# --------------------------------------------------------------------------------------------------
def _check_text_embeddings(b) -> None:
    tokens = b.tokenize(PROMPTS)
    with torch.no_grad():
        ref = b.model.encode_text(tokens)  # open_clip's own forward over the full context
        emb = b.token_embedding(tokens)
        pos = b.eot_positions(tokens)
        ours = b.encode_text_embeddings(emb, pos)
        n = int(pos.max()) + 1
        cut = b.encode_text_embeddings(emb[:, :n], pos)  # fewer positions than the context: same features
    assert emb.shape == (3, tokens.shape[1], b.text_width)
    assert torch.equal(pos, tokens.argmax(dim=-1))
    assert (ours - ref).abs().max().item() <= 1e-5
    assert (cut - ref).abs().max().item() <= 1e-5
    assert (b.encode_text(PROMPTS) - ref).abs().max().item() <= 1e-5


def test_text_embeddings_equal_encode_text_tiny(tiny_backbone) -> None:
    assert tiny_backbone.text_width == 64
    _check_text_embeddings(tiny_backbone)


def test_learned_context_vectors_get_gradients(tiny_backbone) -> None:
    """CoOp's use: learned vectors replace the embeddings of placeholder tokens; only they get gradients."""
    b = tiny_backbone
    tokens = b.tokenize(["X X X X cat.", "X X X X dog."])
    ctx = torch.nn.Parameter(torch.randn(4, b.text_width) * 0.02)
    emb = b.token_embedding(tokens)
    emb = torch.cat([emb[:, :1], ctx.expand(2, -1, -1), emb[:, 5:]], dim=1)
    feats = b.encode_text_embeddings(emb, b.eot_positions(tokens))
    feats.square().sum().backward()
    assert feats.shape == (2, 32)
    assert ctx.grad is not None and ctx.grad.abs().min().item() > 0
    assert all(p.grad is None for p in b.parameters())


# --------------------------------------------------------------------------------------------------
# hooks.paused()
# --------------------------------------------------------------------------------------------------
class _Adapter(torch.nn.Module):
    """AdaptFormer-like parallel adapter on the MLP branch with non-zero weights (its output is not zero)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.down = torch.nn.Parameter(torch.randn(width, 8, generator=g) * 0.3)
        self.up = torch.nn.Parameter(torch.randn(8, width, generator=g) * 0.3)

    def __call__(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return m + torch.relu(h @ self.down) @ self.up


def test_paused_is_the_zero_shot_forward(tiny_backbone) -> None:
    b = tiny_backbone
    x = _images(2, 32)
    taps = ["blocks.1", "blocks.2.mlp"]
    with torch.no_grad():
        plain = b.encode_image(x, taps=taps)
    removers = [b.hooks.add(f"blocks.{i}.mlp", _Adapter(b.width)) for i in range(b.num_blocks)]
    try:
        with torch.no_grad():
            hooked = b.encode_image(x).proj
            with b.hooks.paused():
                assert not b.hooks  # the forward sees no hooks ...
                zs = b.encode_image(x).proj
                zs_taps = b.encode_image(x, taps=taps)  # ... and taps still work
                with b.hooks.paused():  # re-entrant
                    assert torch.equal(b.encode_image(x).proj, zs)
                assert not b.hooks  # still paused after the inner context
            again = b.encode_image(x).proj
            with pytest.raises(RuntimeError, match="boom"), b.hooks.paused():
                raise RuntimeError("boom")
            after_error = b.encode_image(x).proj
    finally:
        for r in removers:
            r()
    assert (hooked - plain.proj).abs().max().item() > 1e-2
    assert torch.equal(zs, plain.proj)
    for name in taps:
        assert torch.allclose(zs_taps.taps[name], plain.taps[name], atol=1e-6)
    assert torch.allclose(zs_taps.proj, plain.proj, atol=1e-6)
    assert torch.equal(again, hooked) and torch.equal(after_error, hooked)
    assert b.hooks.names() and len(b.hooks.get("blocks.0.mlp")) == 0  # removers ran; names unchanged


def test_paused_does_not_bypass_unfrozen_parameters(tiny_backbone) -> None:
    """Full/BitFit/LN tuners change the weights themselves: paused() cannot and does not undo that."""
    b = tiny_backbone
    x = _images(1, 32)
    bias = b.model.visual.transformer.resblocks[0].mlp.c_fc.bias
    with torch.no_grad():
        before = b.encode_image(x).proj
        bias.add_(0.5)
        try:
            with b.hooks.paused():
                changed = b.encode_image(x).proj
        finally:
            bias.sub_(0.5)
    assert (changed - before).abs().max().item() > 1e-3


# --------------------------------------------------------------------------------------------------
# ResNet towers: taps and the attention pool
# --------------------------------------------------------------------------------------------------
def test_resnet_contract(tiny_rn_json: Path, tiny_backbone) -> None:
    torch.manual_seed(0)
    b = create_backbone(f"json:{tiny_rn_json}")
    assert b.tap_names() == ["layer1", "layer2", "layer3", "layer4"]
    assert (b.arch, b.patch_size, b.width, b.hooks.names()) == ("resnet", None, 512, [])
    x = _images(2, 64)
    with torch.no_grad():
        f = b.encode_image(x, taps=b.tap_names())
        pooled = b.attnpool(f.taps["layer4"])
    w = 16  # stem width of the tiny config; stage i has 4w * 2**(i-1) channels at 1/2**(i+1) resolution
    for i in range(1, 5):
        assert tuple(f.taps[f"layer{i}"].shape) == (2, 4 * w * 2 ** (i - 1), 64 // 2 ** (i + 1), 64 // 2 ** (i + 1))
    assert f.taps["layer4"].shape[1] == b.width
    assert pooled.shape == (2, b.embed_dim)
    assert torch.allclose(pooled, f.proj, atol=1e-6)
    # the pool is frozen and a gradient reaches fused maps through it (LDC's path)
    maps = f.taps["layer4"].clone().requires_grad_(True)
    b.attnpool(maps).sum().backward()
    assert maps.grad is not None and all(p.grad is None for p in b.attnpool.parameters())
    names = [n for n, _ in b.block_named_parameters()]
    assert names and all(n.startswith(("model.visual.layer1.", "model.visual.layer2.", "model.visual.layer3.",
                                       "model.visual.layer4.")) for n in names)
    vision = {n for n, _ in b.vision_named_parameters()}
    assert set(names) < vision and any(n.startswith("model.visual.attnpool.") for n in vision)
    assert tiny_backbone.attnpool is None and len(tiny_backbone.tap_names()) == 3 * tiny_backbone.num_blocks


# --------------------------------------------------------------------------------------------------
# imports
# --------------------------------------------------------------------------------------------------
def _imports(path: Path, package: str) -> set[str]:
    """tailclip modules a source file imports, at any depth (function-level imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tailclip")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("tailclip"):
                found.add(mod)
                found |= {f"{mod}.{a.name}" for a in node.names}  # `from .. import synthetic` imports a module
    return found


def test_backbones_import_no_methods_data_or_config() -> None:
    root = Path(tailclip.__file__).parent

    def source(mod: str) -> Path | None:
        rel = Path(*mod.split(".")[1:])
        for cand in (root / rel / "__init__.py", (root / rel).with_suffix(".py")):
            if cand.is_file():
                return cand
        return None

    seen: set[str] = set()
    todo = ["tailclip.backbones"] + [f"tailclip.backbones.{p.stem}" for p in (root / "backbones").glob("*.py")]
    while todo:
        mod = todo.pop()
        path = source(mod)
        # (the root package's __init__ registers every method when tailclip is imported, as timm's registry does;
        # what is checked here is what the backbone modules themselves import)
        if mod in seen or path is None or mod == "tailclip":
            continue
        seen.add(mod)
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        todo += sorted(_imports(path, package))
        parts = mod.split(".")
        todo += [".".join(parts[:i]) for i in range(2, len(parts))]  # importing a module runs its packages
    bad = sorted(m for m in seen if m.split(".")[1:2] and m.split(".")[1] in ("methods", "data", "config"))
    assert not bad, f"tailclip.backbones reaches {bad}"
    assert "tailclip.backbones.weights" in seen and "tailclip.synthetic" in seen
