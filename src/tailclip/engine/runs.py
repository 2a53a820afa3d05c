"""One folder per run: config.yaml, log.txt, metrics.csv, results.json, checkpoints, plots."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Self

from ..config import RunConfig, dump_config
from ..io import write_json
from . import distributed


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
        """The run's folder; under torchrun every process gets rank 0's default name, so all share one folder."""
        name = cfg.run_name or distributed.broadcast_object(default_run_name(cfg))
        return cls(Path(cfg.output_dir) / name)

    def __enter__(self) -> Self:
        if not distributed.is_main_process():  # only rank 0 writes files
            return self
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
        if distributed.is_main_process():
            dump_config(cfg, self.path / "config.yaml")

    def write_results(self, results: dict[str, Any]) -> None:
        if distributed.is_main_process():
            write_json(self.path / "results.json", results)

    def read_results(self) -> dict[str, Any]:
        return json.loads((self.path / "results.json").read_text())
