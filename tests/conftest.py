"""Shared fixtures: a tiny random-weight open_clip model built from a JSON config (32 px images)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tailclip.methods  # noqa: F401  (registers every method and its options for load_config)

TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}

TINY_RN = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


def _write(tmp_dir: Path, name: str, cfg: dict) -> Path:
    path = tmp_dir / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="session")
def tiny_vit_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the tiny ViT open_clip config; `create_backbone(f"json:{path}")` builds it (random weights)."""
    return _write(tmp_path_factory.mktemp("models"), "tiny-vit", TINY_VIT)


@pytest.fixture(scope="session")
def tiny_rn_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("models"), "tiny-rn", TINY_RN)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_vit_json: Path):
    """A seeded tiny ViT backbone, shared read-only by tests (tests that attach tuners must detach them)."""
    from tailclip.backbones import create_backbone

    torch.manual_seed(0)
    return create_backbone(f"json:{tiny_vit_json}")


@pytest.fixture(autouse=True)
def _no_run_plots(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-run plots (matplotlib, seconds per run) are drawn only in tests marked `run_plots`; the report tests
    draw their own. Everything else about a run is unchanged."""
    if request.node.get_closest_marker("run_plots") is None:
        import tailclip.report

        monkeypatch.setattr(tailclip.report, "write_run_plots", lambda run_dir: [])
