"""User pickles cannot run code, written files follow the umask, and the C search reports each fit."""

from __future__ import annotations

import logging
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from tailclip.data.cifar import _unpickle
from tailclip.errors import DataError
from tailclip.io import atomic_write_text
from tailclip.methods.linear_probe import search_C


class _Evil:
    def __reduce__(self):  # a pickle that would call os.system on load
        return (os.system, ("echo pwned",))


def test_cifar_pickle_with_a_foreign_global_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.write_bytes(pickle.dumps({"data": np.arange(12, dtype=np.uint8).reshape(2, 6), "fine_labels": [1, 2]}))
    loaded = _unpickle(good)
    assert loaded["data"].tolist() == np.arange(12).reshape(2, 6).tolist() and loaded["fine_labels"] == [1, 2]
    bad = tmp_path / "bad"
    bad.write_bytes(pickle.dumps({"data": _Evil()}))
    with pytest.raises(DataError, match=r"bad: UnpicklingError: global posix\.system|bad: UnpicklingError: global os"):
        _unpickle(bad)


def test_atomic_writes_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644  # mkstemp alone would leave 0600


def test_c_search_logs_every_fit(caplog: pytest.LogCaptureFixture) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g), torch.arange(40) % 4
    with caplog.at_level(logging.INFO, logger="tailclip.methods.linear_probe"):
        _, trace, _ = search_C(x, y, x, y, 4, [1e-2, 1.0, 1e2], steps=1, max_iter=20)
    lines = [r.message for r in caplog.records if "C search, fit" in r.message]
    assert len(lines) == len(trace) >= 4  # the 3 grid values and each new bisection probe: one line per fit
