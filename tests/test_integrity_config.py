"""Config messages (issue 14): the key the user wrote, one clean line, no OmegaConf internals."""

from __future__ import annotations

import pytest

from tailclip.api import load_config
from tailclip.errors import ConfigError


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.epochs=-3"], "train.epochs=-3 must be >= 1"),
    (["train.epochs=4", "train.warmup_epochs=5"], "train.warmup_epochs=5 must be in [0, train.epochs=4]"),
    (["train.lr=abc"], "train.lr=abc: expected a number"),
    (["train.epochs=2.5"], "train.epochs=2.5: expected an integer"),
    (["eval.splits=test"], "eval.splits: expected a list, e.g. eval.splits=[a,b]"),
    (["train.lrr=0.1"], "unknown config key 'train.lrr'; train has: epochs, batch_size, optimizer, lr,"),
    (["method=lift", "lift.bottlenek=4"], "unknown config key 'lift.bottlenek'; lift has: tuner, bottleneck,"),
    (["train=3"],
     "train=3: train is a section of options, not a value; set one of its keys (train.KEY=VALUE): epochs,"),
])
def test_config_errors_name_the_key_in_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    text = str(info.value)
    assert text.startswith(message)
    assert "\n" not in text and "full_key" not in text and "object_type" not in text
