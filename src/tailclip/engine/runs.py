"""One folder per run: config.yaml, log.txt, metrics.csv, results.json, checkpoints, plots."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ..config import RunConfig, dump_config


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + rename so a killed process never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become null instead of invalid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _clean(obj.tolist())
    return obj


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(data), indent=2) + "\n")


def default_run_name(cfg: RunConfig) -> str:
    return f"{cfg.method}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunDir:
    """A run folder; attaching it adds a log.txt handler to the `tailclip` logger for the run's duration."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._handler: logging.Handler | None = None

    @classmethod
    def for_config(cls, cfg: RunConfig) -> RunDir:
        name = cfg.run_name or default_run_name(cfg)
        return cls(Path(cfg.output_dir) / name)

    def __enter__(self) -> RunDir:
        self._handler = logging.FileHandler(self.path / "log.txt")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger = logging.getLogger("tailclip")
        logger.addHandler(self._handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handler is not None:
            logging.getLogger("tailclip").removeHandler(self._handler)
            self._handler.close()
            self._handler = None

    def write_config(self, cfg: RunConfig) -> None:
        dump_config(cfg, self.path / "config.yaml")

    def write_results(self, results: dict[str, Any]) -> None:
        write_json(self.path / "results.json", results)

    def read_results(self) -> dict[str, Any]:
        return json.loads((self.path / "results.json").read_text())
