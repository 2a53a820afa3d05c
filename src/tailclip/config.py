"""Typed run configuration: dataclasses are the single source of truth, YAML presets and `a.b=c` overrides
are merged onto them with OmegaConf, and every unknown key or bad value is an error naming the key."""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError, UnknownNameError


def check_choice(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """Raise a ConfigError naming `key`, the bad value and the accepted values."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not accepted; choose one of: {', '.join(map(str, allowed))}")


def check_range(key: str, value: float, low: float | None = None, high: float | None = None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{key}={value!r} is out of range [{low}, {high}]")


PRECISIONS = ("fp32", "amp", "amp_bf16")
# fp16_weights: the released CoOp / CoCoOp / Candle / LDC training, whose CLIP and trainable weights are float16 and
# updated in float16 without loss scaling (engine/trainer.py); a named option for reproducing their tables
TRAIN_PRECISIONS = (*PRECISIONS, "fp16_weights")
SELECT_ON = ("auto", "val", "none", "paper")
COSINE_SPANS = ("after_warmup", "epochs")
BASE_SCORING = ("base", "all")
MAX_AUTO_WORKERS = 8  # data.num_workers=auto never starts more loader processes than this


def auto_num_workers() -> int:
    """DataLoader workers for data.num_workers=auto: the cores this process may run on (CPU affinity, so a
    container's or taskset's limit counts) minus one for the training process itself, capped at MAX_AUTO_WORKERS;
    0 (load in the main process) on a single core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover  (macOS / Windows)
        cores = os.cpu_count() or 1
    return max(0, min(cores - 1, MAX_AUTO_WORKERS))


@dataclass
class ModelConfig:
    """Which CLIP to load (see `tailclip list models` for the accepted name forms)."""

    name: str = "synthetic:tiny-clip"
    cache_dir: str | None = None  # where open_clip / Hugging Face look for local weights
    # image tower weights' layout: auto = channels-last for convolutional towers (faster, and what cuDNN's fast
    # kernels want), contiguous for ViTs (no gain); measurements: benchmarks/README.md
    memory_format: str = "auto"

    def __post_init__(self) -> None:
        check_choice("model.memory_format", self.memory_format, ("auto", "channels_last", "contiguous"))


@dataclass
class DataConfig:
    name: str = "synth-lt"
    root: str | None = None  # dataset folder; not needed by the built-in synthetic tasks
    imbalance_ratio: float | None = None  # beta for *-LT generators (None: the dataset's default)
    shots: int | None = None  # K-shot subsampling of the train split (None: full train split)
    seed: int = 1  # seeds K-shot sampling and LT selection
    templates: str | None = None  # template set name (None: the dataset's default)
    num_workers: int | str = 0  # DataLoader worker processes, or "auto" (resolved here: see auto_num_workers)
    on_bad_image: str = "error"  # error: stop naming the file; skip: leave it out and record it in results
    decode: str = "cpu"  # training images: cpu = PIL in the loader workers; gpu = nvJPEG + crops on the GPU (CUDA)
    # how the feature cache knows image files unchanged: stat = size + mtime against its content index (a file
    # rewritten keeping both, cp -p / rsync -t, goes unnoticed); hash = read and hash every file each run
    content_check: str = "stat"

    def __post_init__(self) -> None:
        if self.num_workers == "auto":
            self.num_workers = auto_num_workers()
        elif isinstance(self.num_workers, str) and not self.num_workers.isdigit():
            raise ConfigError(f"data.num_workers={self.num_workers!r} must be a number >= 0 or 'auto'")
        self.num_workers = int(self.num_workers)
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0 or 'auto'")
        check_choice("data.on_bad_image", self.on_bad_image, ("error", "skip"))
        check_choice("data.decode", self.decode, ("cpu", "gpu"))
        check_choice("data.content_check", self.content_check, ("stat", "hash"))
        if self.shots is not None and self.shots < 1:
            raise ConfigError(f"data.shots={self.shots} must be >= 1")
        if self.imbalance_ratio is not None and self.imbalance_ratio < 1:
            raise ConfigError(f"data.imbalance_ratio={self.imbalance_ratio} must be >= 1")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eps: float = 1e-8
    scheduler: str = "cosine"
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    grad_accum: int = 1
    precision: str = "fp32"
    seed: int = 0
    tensorboard: bool = False
    # Model selection (engine/trainer.py): auto = val where the task has a val split, else none; val = best on
    # the val split among what the method declares (epochs, heads); none = the last epoch; paper = the method's
    # named paper protocol, which selects on the TEST split as the released code does (recorded in results.json)
    select_on: str = "auto"
    sched_unit: str = "epoch"  # epoch: LR changes once an epoch (LIFT); step: every optimizer step
    warmup_type: str = "constant"  # constant: hold warmup_lr (CoOp/Candle); linear: ramp warmup_lr -> lr
    min_lr: float = 0.0  # floor of the cosine
    # the cosine's length: after_warmup = the epochs (steps) left after warm-up, so the last one reaches min_lr's
    # neighbourhood; epochs = the whole run, as Dassl's CosineAnnealingLR(T_max=max_epoch) behind a warm-up wrapper
    # (CoOp, CoCoOp, Candle): the cosine starts after warm-up and stops short of its end
    cosine_span: str = "after_warmup"
    # drop the last partial batch of an epoch when the train set holds at least one full batch (Dassl's drop_last
    # for its train loader: CoOp, CoCoOp, Candle); false keeps every image every epoch
    drop_last: bool = False
    clip_grad_norm: float | None = None  # max global grad norm (None: no clipping)
    val_every: int = 1  # evaluate the val split (when the dataset has one) every N epochs; 0: never
    resume_every_steps: int = 0  # also write the resume state every N optimizer steps mid-epoch (0: off)
    resume_every_minutes: float = 10.0  # ... and whenever this much time passed since the last one (0: off)

    def __post_init__(self) -> None:
        check_choice("train.optimizer", self.optimizer, ("sgd", "adamw"))
        check_choice("train.scheduler", self.scheduler, ("cosine", "constant"))
        check_choice("train.sched_unit", self.sched_unit, ("epoch", "step"))
        check_choice("train.warmup_type", self.warmup_type, ("constant", "linear"))
        check_choice("train.cosine_span", self.cosine_span, COSINE_SPANS)
        check_choice("train.precision", self.precision, TRAIN_PRECISIONS)
        check_choice("train.select_on", self.select_on, SELECT_ON)
        for key in ("epochs", "batch_size", "grad_accum"):  # before warmup_epochs, whose bound is epochs
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be >= 1")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ConfigError(f"train.warmup_epochs={self.warmup_epochs} must be in [0, train.epochs={self.epochs}]")
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr} must be > 0")


@dataclass
class EvalConfig:
    batch_size: int = 256
    tte: str = "none"  # test-time ensembling: none | five_crop | ten_crop
    precision: str = "fp32"
    splits: list[str] = field(default_factory=lambda: ["test"])
    plots: bool = True  # write RUN_DIR/plots (matplotlib, when installed) once the run is evaluated
    # base-to-new: which classes a base test image (test_base) is scored among. base = the base classes only
    # (CoCoOp's protocol); all = every class, base and new (Candle's released evaluation: a base image predicted as
    # a new class is an error). New test images are always scored among the new classes.
    base_scoring: str = "base"

    def __post_init__(self) -> None:
        check_choice("eval.tte", self.tte, ("none", "five_crop", "ten_crop"))
        check_choice("eval.base_scoring", self.base_scoring, BASE_SCORING)
        check_choice("eval.precision", self.precision, PRECISIONS)
        for split in self.splits:
            check_choice("eval.splits", split, ("train", "val", "test", "test_base", "test_new"))


@dataclass
class RunConfig:
    """Everything a run needs. The method's own options live under a key named after the method."""

    method: str = "zeroshot"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs"
    run_name: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    resume: str | None = None  # None | auto | path to a run folder

    def method_config(self) -> Any:
        """The method's typed options (a dataclass of the method's `Config`)."""
        return getattr(self, self.method.replace("-", "_"), None)


@dataclass
class FeatureOptions:
    """The option every method config that reads the feature cache has (its fields come first)."""

    feature_cache: str | None = None  # feature cache folder (default: $TAILCLIP_CACHE or ~/.cache/tailclip)


@dataclass
class InputsOption(FeatureOptions):
    """A features method that can also train on a live forward of the frozen tower."""

    inputs: str = "features"  # features: the cached views; images: a live frozen forward, a fresh crop per epoch


def feature_cache_of(method_cfg: Any) -> str | None:
    """The feature cache folder a method config names (None: the default folder)."""
    return method_cfg.feature_cache if isinstance(method_cfg, FeatureOptions) else None


# Each method registers its options class here when it is defined (`contract.register_method`, run when the
# tailclip package is imported), so this module never imports `tailclip.methods`: configuration sits below the
# methods in the import graph.
METHOD_CONFIGS: dict[str, type | None] = {}
# A method's fixed training recipe (LDC, Tip-Adapter-F) as defaults of the shared `train.*` keys: presets and
# overrides change them like any default, so a `train.epochs=2` is always obeyed.
METHOD_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {}


def register_method_config(method: str, config_cls: type | None, train_defaults: dict[str, Any] | None = None) -> None:
    METHOD_CONFIGS[method] = config_cls
    METHOD_TRAIN_DEFAULTS[method] = dict(train_defaults or {})


def _schema_for(method: str) -> type:
    """A dataclass extending RunConfig with one field, named after the method, holding its Config."""
    if method not in METHOD_CONFIGS:
        raise UnknownNameError(f"unknown method {method!r}; known methods: {', '.join(sorted(METHOD_CONFIGS))}")
    cfg_cls = METHOD_CONFIGS[method]
    if cfg_cls is None:
        return RunConfig
    key = method.replace("-", "_")
    return dataclasses.make_dataclass(
        f"RunConfig_{key}", [(key, cfg_cls, field(default_factory=cfg_cls))], bases=(RunConfig,)
    )


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (for example train.lr=0.01)")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_reason(exc)})") from None


def _yaml_reason(exc: yaml.YAMLError) -> str:
    """The first line of a YAML error with its position, for one-line messages."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or str(exc).splitlines()[0]}{where}"


def _nested(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value
    return out


def _section(schema: type, parts: list[str]) -> type | None:
    """The dataclass at `parts` below `schema` (None when the path leaves the dataclasses)."""
    cls: Any = schema
    for part in parts:
        if not dataclasses.is_dataclass(cls):
            return None
        try:
            cls = typing.get_type_hints(cls).get(part)
        except (NameError, TypeError):  # an annotation that cannot be resolved: no section to describe
            return None
    return cls if isinstance(cls, type) and dataclasses.is_dataclass(cls) else None


def _check_sections(schema: type, layer: dict, prefix: str) -> None:
    """A value given where a section of options is expected (`train=3`) is named, with the section's keys."""
    for key, value in layer.items():
        sub = _section(schema, [key]) if dataclasses.is_dataclass(schema) else None
        if sub is None:
            continue
        if isinstance(value, dict):
            _check_sections(sub, value, f"{prefix}{key}.")
        elif value is not None:
            keys = ", ".join(f.name for f in dataclasses.fields(sub))
            raise ConfigError(f"{prefix}{key}={value!r}: {prefix}{key} is a section of options, not a value; "
                              f"set one of its keys ({prefix}{key}.KEY=VALUE): {keys}")


_KINDS = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}


def _omegaconf_message(schema: type, exc: OmegaConfBaseException) -> str:
    """One clean line naming the key the user wrote (OmegaConf's own text carries full_key/object_type lines)."""
    import re

    key = getattr(exc, "full_key", None) or ""
    msg = str(getattr(exc, "msg", None) or exc).splitlines()[0].strip() if str(exc) else ""
    m = re.match(r"Value '(.*)' of type '(\w+)' could not be converted to (\w+)", msg)
    if m and key:
        return f"{key}={m.group(1)}: expected {_KINDS.get(m.group(3), m.group(3))}"
    m = re.match(r"Key '(.*)' not in '(\w+)'", msg)
    if m and key:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        sub = _section(schema, parent.split(".")) if parent else schema
        known = ", ".join(f.name for f in dataclasses.fields(sub)) if sub is not None else ""
        return f"unknown config key {key!r}" + (f"; {parent or 'the top level'} has: {known}" if known else "")
    if "is not a ListConfig" in msg and key:
        return f"{key}: expected a list, e.g. {key}=[a,b]"
    if key:
        return f"invalid value for config key {key!r}: {msg}"
    return f"invalid config: {msg or type(exc).__name__}"


def load_config(
    preset: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None
) -> RunConfig:
    """Merge defaults <- the method's train defaults <- base dict <- YAML preset <- `a.b=c` overrides, validate,
    return the typed config."""
    layers: list[dict] = []
    if base:
        layers.append(base)
    if preset is not None:
        path = Path(preset)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_reason(exc)}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        layers.append(loaded)
    for text in overrides or []:
        key, value = parse_override(text)
        layers.append(_nested(key, value))
    method = RunConfig.method
    for layer in layers:
        method = layer.get("method", method)
    if not isinstance(method, str):
        raise ConfigError(f"method must be a name, got {method!r}")
    schema = _schema_for(method)
    for layer in layers:
        _check_sections(schema, layer, "")
    if METHOD_TRAIN_DEFAULTS.get(method):
        layers.insert(0, {"train": METHOD_TRAIN_DEFAULTS[method]})
    try:
        merged = OmegaConf.structured(schema)
        for layer in layers:
            merged = OmegaConf.merge(merged, OmegaConf.create(layer))
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(schema, exc)) from None
    assert isinstance(obj, RunConfig)
    return obj


def key_differences(theirs: dict[str, Any], mine: dict[str, Any], ignore: set[str] | frozenset[str] = frozenset()
                    ) -> list[str]:
    """"key: theirs -> mine" for every flat key (outside `ignore`) whose values differ; a key only one side has
    counts too. Refusals of a reused grid cell or a resume name what changed with it."""
    missing = object()
    return [f"{k}: {theirs.get(k, '(unset)')!r} -> {mine.get(k, '(unset)')!r}"
            for k in sorted((set(theirs) | set(mine)) - set(ignore)) if theirs.get(k, missing) != mine.get(k, missing)]


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
