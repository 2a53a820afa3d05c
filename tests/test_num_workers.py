"""data.num_workers=auto resolves to the cores this process may use minus one, capped; bad values are refused."""

from __future__ import annotations

import os

import pytest

from tailclip import config as C
from tailclip.config import load_config
from tailclip.errors import ConfigError


@pytest.mark.parametrize(("cores", "expected"), [(1, 0), (2, 1), (4, 3), (64, C.MAX_AUTO_WORKERS)])
def test_auto_follows_affinity_and_is_capped(monkeypatch: pytest.MonkeyPatch, cores: int, expected: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    cfg = load_config(None, ["data.num_workers=auto"])
    assert cfg.data.num_workers == expected and isinstance(cfg.data.num_workers, int)


def test_numbers_pass_and_bad_values_name_the_key() -> None:
    assert load_config(None, ["data.num_workers=3"]).data.num_workers == 3
    assert load_config(None, []).data.num_workers == 0
    for bad in ("many", "-1"):
        with pytest.raises(ConfigError, match="data.num_workers"):
            load_config(None, [f"data.num_workers={bad}"])
