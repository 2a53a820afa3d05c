"""The rendered-world cache: identical pixels to direct rendering, keyed by generator version + seed + images,
written atomically, rebuilt when unreadable."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from tailclip.synthetic import generator as G
from tailclip.synthetic import world_cache as W

N = W.CACHE_MIN_IMAGES  # the smallest source that gets a file


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(W.ENV_VAR, str(tmp_path / "world"))
    return tmp_path / "world"


def _source(seed: int = 0, stream: int = 1) -> G.SyntheticImages:
    positions = np.arange(N) * 3 + 7  # not a prefix: positions matter
    return G.SyntheticImages(positions % 100, "downstream", stream, seed, positions=positions)


def test_cached_images_equal_direct_rendering(cache_dir: Path) -> None:
    src = _source()
    direct = G.render_images(0, 1, src.positions.tolist(), src.labels.tolist(), "downstream")
    assert np.array_equal(src.array(), direct)
    files = list(cache_dir.glob("*.npy"))
    assert len(files) == 1 and files[0].name.startswith(f"v{G.GENERATOR_VERSION}-s0-stream1-downstream-n{N}-")
    again = _source()  # a new source reads the file (memory-mapped) instead of rendering
    assert isinstance(again.array(), np.memmap) and np.array_equal(again.array(), direct)
    assert np.array_equal(np.asarray(again.load(5)), direct[5])
    assert np.array_equal(again.load_array([3, 1]), direct[[3, 1]])
    sub = again.subset([4, 2])  # a subset is a source of its own with the same pixels and identifiers
    assert np.array_equal(sub.load_array([0, 1]), direct[[4, 2]]) and sub.ident(1) == again.ident(2)


def test_key_covers_version_seed_and_images(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _source()
    base = W.entry_path(0, 1, "downstream", src.positions, src.labels)
    assert W.entry_path(1, 1, "downstream", src.positions, src.labels) != base
    assert W.entry_path(0, 2, "downstream", src.positions, src.labels) != base
    assert W.entry_path(0, 1, "pretrain", src.positions, src.labels) != base
    assert W.entry_path(0, 1, "downstream", src.positions + 1, src.labels) != base
    assert W.entry_path(0, 1, "downstream", src.positions, (src.labels + 1) % 100) != base
    src.array()
    calls = []
    real = G.render_images
    monkeypatch.setattr(G, "render_images", lambda *a, **k: calls.append(a) or real(*a, **k))
    _source().array()
    assert calls == []  # same key: read, not rendered
    monkeypatch.setattr(G, "GENERATOR_VERSION", G.GENERATOR_VERSION + 1)
    _source().array()
    assert len(calls) == 1  # a new generator version renders (and stores) again
    assert len(list(cache_dir.glob("*.npy"))) == 2


def test_written_atomically_and_rebuilt_when_broken(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _source()
    path = W.entry_path(0, 1, "downstream", src.positions, src.labels)
    seen: list[list[str]] = []
    real_save = np.save

    def save(fh, arr):  # while the entry is written, only a hidden temp file exists in the folder
        seen.append(sorted(p.name for p in cache_dir.iterdir()))
        real_save(fh, arr)

    monkeypatch.setattr(np, "save", save)
    expected = src.array().copy()
    assert len(seen) == 1 and path.name not in seen[0] and all(n.startswith(".") for n in seen[0])
    assert sorted(p.name for p in cache_dir.iterdir()) == [path.name]  # no temp file left behind
    path.write_bytes(path.read_bytes()[:200])  # a truncated entry is rendered again, not read
    assert np.array_equal(_source().array(), expected) and len(seen) == 2
    assert np.array_equal(np.load(path), expected)


def test_small_sources_stay_in_memory_and_pickle_small(cache_dir: Path) -> None:
    small = G.SyntheticImages(np.arange(10), "downstream", stream=3)
    assert np.array_equal(small.array(), G.render_images(0, 3, list(range(10)), list(range(10)), "downstream"))
    assert not cache_dir.exists()
    big = _source()
    big.array()
    assert len(pickle.dumps(big)) < 20_000  # DataLoader workers get the key, not the pixels
