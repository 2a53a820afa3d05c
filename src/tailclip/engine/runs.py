"""One folder per run (its file names: `tailclip.runfiles`): config, status, metrics, results, logits, checkpoint,
plots.

`RunDir` is also the one place that reads another run's outputs (its config, saved logits, results and
checkpoint) and the one place that deletes a run folder (`remove`), so ensembles of a fine-tuned run (GLA, WiSE-FT)
never parse run folders themselves. `run_from_template` fills `{shots}` `{seed}` `{dataset}` in a run-folder option,
so one preset can point at the matching cell of a few-shot grid.

Safety of an existing folder: `for_config` accepts a run name that already holds files only with `resume`
(and then only when the folder's config trains the same run: the check happens before anything is written)
or with `overwrite` (the folder is emptied first); otherwise it refuses with a clear error and changes
nothing. `status.json` says whether a run is running, finished or failed (with the error)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from safetensors.torch import load_file
from torch import Tensor

from ..config import DataConfig, RunConfig, dump_config, load_config
from ..errors import ConfigError, TailclipError
from ..io import write_json
from ..runfiles import CONFIG, RESULTS, RESUME, STATUS, WEIGHTS, logits_file
from ..runtime import distributed
from .checkpoint import read_weights, resume_differences, resume_fingerprint

if TYPE_CHECKING:
    from ..data.base import Task

log = logging.getLogger(__name__)

def default_run_name(cfg: RunConfig) -> str:
    return f"{cfg.method}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass(frozen=True)
class SavedLogits:
    """What a run saved for one split: (N, C) logits, labels, and each row's index in the split."""

    logits: Tensor
    labels: Tensor
    indices: Tensor


class RunDir:
    """A run folder. Writing: `for_config` creates it, and entering it adds a log.txt handler to the `tailclip`
    logger for the run's duration. Reading another run: `RunDir.existing(path)`, then its load_* methods."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._handler: logging.Handler | None = None

    @classmethod
    def for_config(cls, cfg: RunConfig, overwrite: bool = False) -> RunDir:
        """The run's folder (created), once it is accepted: a folder that already holds files is reused only
        with `cfg.resume` (same run) or `overwrite` (emptied first), so a refused run changes nothing in it.
        Under torchrun every process gets rank 0's default name, so all share it."""
        name = cfg.run_name or distributed.broadcast_object(default_run_name(cfg))
        run = cls(Path(cfg.output_dir) / name)
        refused: TailclipError | None = None
        if distributed.is_main_process():  # rank 0 decides (the others would see the folder it creates)
            try:
                run._accept(cfg, overwrite)
            except TailclipError as exc:
                refused = exc
        refused = distributed.broadcast_object(refused)
        if refused is not None:
            raise refused
        run.path.mkdir(parents=True, exist_ok=True)
        return run

    def _accept(self, cfg: RunConfig, overwrite: bool) -> None:
        """Refuse a used folder without resume/overwrite, or with a resume of another run; empty it for
        overwrite. Nothing in the folder is written before this returns."""
        used = self.path.is_dir() and any(self.path.iterdir())
        if self.path.exists() and not self.path.is_dir():
            raise TailclipError(f"run folder {self.path} exists and is not a folder")
        if used and overwrite:
            if cfg.resume is not None:
                raise ConfigError(f"run {self.path.name!r}: resume={cfg.resume} and --overwrite contradict each "
                                  "other; pass one of them")
            log.warning("--overwrite: replacing run folder %s", self.path)
            self.remove("--overwrite")
        elif used and cfg.resume is None:
            raise TailclipError(f"run folder {self.path} already exists; pass --resume auto to continue that run, "
                                "--overwrite to replace it, or another --name (from Python: resume=auto, "
                                "api.run(cfg, overwrite=True), or run_name=...)")
        elif used:
            self._check_resumable(cfg)
        elif cfg.resume == "auto":
            log.warning("resume=auto: no run named %r in %s; starting a new one", self.path.name, cfg.output_dir)
        self.path.mkdir(parents=True, exist_ok=True)

    def _check_resumable(self, cfg: RunConfig) -> None:
        """Refuse (before anything is written) to continue this folder with a config that trains another run."""
        source = self.path if cfg.resume == "auto" else Path(str(cfg.resume))
        source = source.parent if source.name == RESUME else source
        config = source / CONFIG
        if not config.is_file():
            if cfg.resume == "auto":
                raise TailclipError(f"run folder {self.path} exists but has no {CONFIG} (not a run folder); "
                                    "use another --name, or --overwrite")
            return  # a resume path elsewhere: the trainer names what is missing there
        try:
            theirs = load_config(config)
        except (TailclipError, OSError, ValueError) as exc:
            raise TailclipError(f"{config}: cannot be read to check the resume ({exc})") from None
        if resume_fingerprint(theirs) != resume_fingerprint(cfg):
            diff = "; ".join(resume_differences(theirs, cfg)[:5])
            raise TailclipError(
                f"resume={cfg.resume}: {config} describes a run with a different configuration ({diff}); resume only "
                "continues the same run. Nothing was changed; start a new run with another --name, or replace it "
                "with --overwrite"
            )

    @classmethod
    def existing(cls, path: str | Path, option: str = "run folder") -> RunDir:
        """A finished or running run folder given by the user (`option` names the config key in errors)."""
        run = cls(path)
        if not (run.path / CONFIG).is_file():
            raise TailclipError(f"{option}={run.path} is not a run folder (no {CONFIG})")
        return run

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

    # ------------------------------------------------------------------ writing this run
    def remove(self, reason: str) -> None:
        """Delete the run folder, which must be one (it holds its config): no other folder is ever deleted."""
        if not (self.path / CONFIG).is_file():
            raise TailclipError(f"{reason}: {self.path} is not a run folder (no {CONFIG}); not deleting it")
        shutil.rmtree(self.path)

    def write_config(self, cfg: RunConfig) -> None:
        if distributed.is_main_process():
            dump_config(cfg, self.path / CONFIG)

    def write_results(self, results: dict[str, Any]) -> None:
        if distributed.is_main_process():
            write_json(self.path / RESULTS, results)

    def mark(self, status: str, error: BaseException | None = None) -> None:
        """Record the run's state in status.json: running | finished | failed (with the error's one line)."""
        if not distributed.is_main_process():
            return
        record: dict[str, Any] = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if error is not None:
            record["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:2000]
        write_json(self.path / STATUS, record)

    def status(self) -> str | None:
        """running | finished | failed, or None for a folder written before status.json existed."""
        try:
            return str(json.loads((self.path / STATUS).read_text())["status"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # ------------------------------------------------------------------ reading a run
    def load_config(self) -> RunConfig:
        """The run's typed config (its method's options included)."""
        return load_config(self.path / CONFIG)

    def read_results(self) -> dict[str, Any]:
        path = self.path / RESULTS
        if not path.is_file():
            raise TailclipError(f"{self.path} has no {RESULTS} (not a finished run folder)")
        return json.loads(path.read_text())

    def load_logits(self, split: str) -> SavedLogits | None:
        """The predictions the run saved for `split`, or None when it did not evaluate that split."""
        path = self.path / logits_file(split)
        if not path.is_file():
            return None
        data = load_file(str(path))
        return SavedLogits(data["logits"].float(), data["labels"].long(), data["indices"].long())

    def checkpoint_path(self) -> Path | None:
        """The run's trained weights (only what its method trained), or None when it saved none."""
        path = self.path / WEIGHTS
        return path if path.is_file() else None

    def load_checkpoint_tensors(self) -> dict[str, Tensor]:
        path = self.checkpoint_path()
        if path is None:
            raise TailclipError(f"{self.path} has no {WEIGHTS}: not a trained run (or it was not finished)")
        return read_weights(path)

    def check_same_task(self, task: Task, data: DataConfig) -> RunConfig:
        """The run's config, after checking it was trained on `task`'s classes (an error otherwise) and warning
        about data options that differ from `data` (another seed or shot count is allowed, but worth a line)."""
        cfg = self.load_config()
        if (self.path / RESULTS).is_file():
            names = self.read_results().get("classnames")
            if names is not None and list(names) != list(task.classnames):
                raise TailclipError(f"run {self.path} was trained on other classes than {task.name}")
        for key in ("name", "shots", "seed", "imbalance_ratio"):
            theirs, ours = getattr(cfg.data, key), getattr(data, key)
            if theirs != ours:
                log.warning("run %s has data.%s=%r, this run %r", self.path, key, theirs, ours)
        return cfg


def run_from_template(template: str, data: DataConfig, dataset: str, option: str) -> RunDir:
    """The existing run folder `template` names after filling {shots} {seed} {dataset} from this run's data."""
    try:
        text = template.format(shots=data.shots, seed=data.seed, dataset=dataset)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"{option}={template!r}: only {{shots}}, {{seed}} and {{dataset}} can be filled ({exc})"
        ) from None
    return RunDir.existing(text, option)
