"""The method contract, at the bottom of the package: what a method is and what the engine hands it and gets
back. It imports neither the engine nor any method, so both depend on it and never on each other.

A method is an nn.Module holding the (frozen) backbone plus its own parts. The engine drives it through hooks
with no-op defaults (nothing is discovered with `hasattr`): `engine.fit` calls `prepare(ctx)`, trains when
`trains()` says so, then `finish(ctx, result)`; `engine.evaluate.predict_split` gives a split's logits through the
method's `forward` (or the method's `own_predictions`). Methods never call the trainer.

A method is built from a `TaskInfo` (names, templates, counts, base/new classes: never images) and fitted with a
`FitContext` whose task cannot read its test splits (`Task.guarded`).

How `forward(inputs, labels)` receives a batch (`Inputs`):
- a Tensor is always a batch of images (B, 3, H, W): image methods train on these, and every method, feature
  methods included, classifies images this way (`tailclip predict`, checkpoint reloads, the contract tests);
- a dict of named tensors is a batch of cached features (`inputs = "features"`): the keys are the names the
  method declares in `feature_spec().tensors` ("proj", "pre_proj", taps ...), each (B, ...) for one view or
  (B, K, ...) when the spec asks for every view at once. `Method.encode(inputs)` turns either kind into the
  dict, so a feature method writes its classifier once.

Model selection (`train.select_on`) is one mechanism in the engine: `val` (default where a val split exists),
`none` (the last epoch) or `paper`, the method's declared `paper_protocol`, which selects on the test split and
is recorded as such in results.json. A method declares what may be selected among: `select_among` ("epochs",
"heads") and, for heads, `eval_heads()` (several named logit sets of one model, returned in `Output.heads`). The
trainer returns what it chose as a `SelectionRecord` in a `FitResult`; a method that chooses more after training
(Tip-Adapter's alpha and beta, the probe's C) adds to it in `finish`."""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .backbones.base import Backbone
from .config import EvalConfig, InputsOption, RunConfig, TrainConfig, register_method_config
from .data.base import Task, TaskInfo
from .data.transforms import eval_transform
from .errors import ConfigError, TailclipError
from .features import DEFAULT_AUG, AugSpec, FeatureSet, FeatureViews, method_features
from .losses import Loss
from .registry import Registry

log = logging.getLogger(__name__)

# A batch as forward receives it: images (B, 3, H, W), or named cached features (see the module docstring).
Inputs = Tensor | dict[str, Tensor]

VIEW_CHOICES = ("epoch", "sample", "all")


@dataclass(frozen=True)
class FeatureSpec:
    """What a `inputs = "features"` method trains from: named tensors of the train split's feature cache.

    tensors: names read with `FeatureSet.get(name)` ("proj", "pre_proj", tap names ...).
    views:   0: the eval view only; K: the augmented views aug0 .. aug{K-1}.
    per:     how a batch picks among the K views: "epoch" (view e mod K in epoch e: Tip-Adapter-F), "sample" (a
             seeded random view per sample and epoch), "all" (every view stacked: each tensor is (B, K, ...)).
    Evaluation always reads the eval view. Names other than proj/pre_proj are backbone taps."""

    tensors: tuple[str, ...] = ("proj",)
    views: int = 0
    per: str = "epoch"
    augment: AugSpec = DEFAULT_AUG  # the augmented views' crop/flip (Tip-Adapter: scale 0.5-1; LDC: 0.8-1 bicubic)
    dtype: str | None = None  # storage dtype of taps in the cache (float16 halves their size); proj/pre_proj: fp32

    def __post_init__(self) -> None:
        if not self.tensors:
            raise ValueError("FeatureSpec.tensors must name at least one cached tensor")
        if self.views < 0:
            raise ValueError(f"FeatureSpec.views={self.views} must be >= 0")
        if self.per not in VIEW_CHOICES:
            raise ValueError(f"FeatureSpec.per={self.per!r} is not one of {', '.join(VIEW_CHOICES)}")

    def view_names(self) -> list[str]:
        return [f"aug{k}" for k in range(self.views)] or ["eval"]


@dataclass
class Output:
    """What forward returns. `extras`: scalar tensors (loss terms, gate values, learned scales) the engine logs
    per epoch without knowing them; `heads`: named logit sets the engine can select among (see eval_heads)."""

    logits: Tensor
    loss: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    heads: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Predictions:
    """Logits of a whole split, rows in split order of the images that could be read."""

    logits: Tensor  # (N, C) float32 on CPU
    labels: Tensor  # (N,) int64
    indices: Tensor  # (N,) positions in the split (missing ones were skipped as bad images)
    skipped: list[str] = field(default_factory=list)
    heads: dict[str, Tensor] = field(default_factory=dict)  # name -> (N, C) logits, for methods with eval_heads()


@dataclass
class TrainSummary:
    """What gradient training did: the per-epoch metrics, the chosen epoch, where it resumed from."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_metric: float | None = None  # top-1 (%) of the chosen epoch/head on the selection split
    selected_on: str | None = None  # the split selection used (None: the last epoch was kept)
    resumed_from: str | None = None
    skipped_train_images: list[str] = field(default_factory=list)  # unreadable under data.on_bad_image=skip

    def to_dict(self) -> dict[str, Any]:
        return {"epochs_run": len(self.history), "best_epoch": self.best_epoch, "best_metric": self.best_metric,
                "selected_on": self.selected_on, "resumed_from": self.resumed_from,
                "skipped_train_images": self.skipped_train_images}


@dataclass
class SelectionRecord:
    """What was chosen on which split (results.json "selection"). `on`: the split or "none"; `among`: what was
    chosen among ("epochs and heads", "alpha and beta", "C" ...); `chosen`: the values and their score;
    `protocol`: the released test-set protocol that chose, if any; `then`: choices made after this one (Tip-Adapter-F
    searches alpha and beta after its epoch was chosen)."""

    on: str
    among: str
    chosen: dict[str, Any]
    selected_on_test: bool = False
    protocol: str = ""
    then: dict[str, SelectionRecord] = field(default_factory=dict)

    def followed_by(self, name: str, later: SelectionRecord) -> SelectionRecord:
        """This choice, then `later` (recorded under `name`); on test if either was."""
        return dataclasses.replace(self, selected_on_test=self.selected_on_test or later.selected_on_test,
                                   then={**self.then, name: later})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"on": self.on, "among": self.among, "chosen": dict(self.chosen),
                               "selected_on_test": self.selected_on_test}
        if self.protocol:
            out["protocol"] = self.protocol
        return {**out, **{name: rec.to_dict() for name, rec in self.then.items()}}


@dataclass
class FitResult:
    """What fitting a method produced besides its weights: the trainer's summary (None when nothing trained by
    gradient steps) and the selection record (None when nothing was chosen)."""

    training: TrainSummary | None = None
    selection: SelectionRecord | None = None

    def to_results(self) -> dict[str, Any]:
        """The "training" and "selection" entries of results.json."""
        out: dict[str, Any] = {}
        if self.training is not None:
            out["training"] = self.training.to_dict()
        if self.selection is not None:
            out["selection"] = self.selection.to_dict()
        return out


@dataclass
class FitContext:
    """What the fitting hooks and prediction get besides the method itself. While fitting (`prepare`, training,
    `finish`: `engine.fit`), `task` is the guarded view whose test splits raise when read; prediction gets the full
    task."""

    cfg: RunConfig
    task: Task
    run_dir: Path
    device: torch.device


class Method(nn.Module, ABC):
    """Base class. Subclasses set `name` via @register_method, `Config` (a dataclass or None) and `inputs`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type | None] = None
    inputs: ClassVar[str] = "images"  # "images": runs the backbone per batch; "features": trains from the cache
    select_among: ClassVar[tuple[str, ...]] = ("epochs",)  # what train.select_on may choose: "epochs", "heads"
    paper_protocol: ClassVar[str] = ""  # the released code's test-set selection (train.select_on=paper); "": none
    # True when config + task fully determine the method (nothing fitted or trained): its runs need no checkpoint
    stateless: ClassVar[bool] = False
    # the method's fixed training recipe as defaults of the shared train.* keys (config.METHOD_TRAIN_DEFAULTS)
    train_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: Any, backbone: Backbone, info: TaskInfo) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.info = info
        self.num_classes = info.num_classes
        self.active_head: str | None = None  # the head chosen by selection (None: forward's own default)
        tuned = [n for n, p in backbone.named_parameters() if p.requires_grad]
        hooked = backbone.hooks.registered()
        if hooked or tuned:  # another method's tuner: its hooks or unfrozen weights would change this method
            raise TailclipError(
                f"backbone {backbone.name} already carries another method's tuner (hooks at {hooked[:3] or 'none'}"
                f"{' ...' if len(hooked) > 3 else ''}, {len(tuned)} unfrozen tensors); build each method on its own "
                "backbone, or detach the first method's tuner")
        backbone.requires_grad_(False)
        chosen = cfg.inputs if isinstance(cfg, InputsOption) else None  # `<method>.inputs=images|features`
        if chosen is not None and chosen != "auto":  # auto: the method decides (LDC: by the cache's size)
            if type(self).inputs != "features" or chosen not in ("features", "images"):
                raise ConfigError(f"{self.name}.inputs={chosen!r}: choose features (train from the cache) or images "
                                  "(a live forward of the frozen tower per batch)")
            self.inputs = chosen

    # --- what methods implement -------------------------------------------------------------------
    @abstractmethod
    def forward(self, inputs: Inputs, labels: Tensor | None = None) -> Output:
        """Logits for a batch of images or of cached features (and the training loss when labels are given)."""

    # --- fitting: engine.fit calls prepare, then the trainer when trains(), then finish ------------------
    def prepare(self, ctx: FitContext) -> None:
        """Before gradient training: fit what training starts from or what needs no gradient (Tip-Adapter's cache
        model, Candle's prototypes, GLA's prior). Default: nothing."""

    def trains(self) -> bool:
        """Whether the engine's trainer runs: by default when the method has trainable parameters."""
        return any(True for _ in self.trainable_parameters())

    def finish(self, ctx: FitContext, result: FitResult) -> FitResult:
        """After training (or after prepare when nothing trains): choices made on the trained model (Tip-Adapter's
        alpha/beta, the probe's C, LDC's reported beta). Returns the fit result, its selection extended or
        replaced. Default: the trainer's result."""
        return result

    # --- prediction: engine.evaluate.predict_split ----------------------------------------------------
    def own_predictions(self, ctx: FitContext, split: str) -> Predictions | None:
        """Logits of a split computed by the method itself (GLA ensembles saved logits); None (the default): the
        engine's loop over images (with the configured TTE) or over the split's cached eval-view features."""
        return None

    def eval_config(self, evaluation: EvalConfig) -> EvalConfig:
        """The evaluation settings a split is predicted with: the run's `eval` section (Candle's transductive
        attention fixes its batch)."""
        return evaluation

    # --- optional behaviour: the engine always calls these; the defaults do nothing special ----------
    def feature_spec(self) -> FeatureSpec:
        """The cached tensors and views a features method trains from (unused for image methods)."""
        return FeatureSpec()

    def cached_features(self, ctx: FitContext, split: str, view: str = "eval") -> FeatureSet:
        """The feature-cache entry of `split` (view "eval" or "aug<k>") holding what `feature_spec` names."""
        spec = self.feature_spec()
        taps = tuple(n for n in spec.tensors if n not in ("proj", "pre_proj"))
        augment = None if view == "eval" else spec.augment
        return method_features(self, ctx, split, view=view, taps=taps, dtype=spec.dtype, transform=augment)

    def cached_views(self, ctx: FitContext, split: str = "train") -> FeatureViews:
        """Every view `feature_spec` asks for (the eval view when it asks for none), checked to hold the same
        images in the same order."""
        return FeatureViews([self.cached_features(ctx, split, view=v) for v in self.feature_spec().view_names()])

    def train_config(self, train: TrainConfig) -> TrainConfig:
        """The training recipe: the run's `train` section (a method's fixed recipe is `train_defaults`, the defaults
        of those keys); a method may derive keys from its task (CoOp's epochs by shots)."""
        return train

    def train_transform(self, epoch: int) -> Callable[[Any], Tensor] | None:
        """The image transform of training epoch `epoch`; None: RandomResizedCrop + flip from the backbone's
        preprocessing (LIFT+ overrides this for its crop schedule). A features method trained from images
        (`inputs=images`) gets the augmentation its cached views use, a fresh crop per epoch (or the eval view
        when it caches no augmented views)."""
        if self.inputs == "images" and type(self).inputs == "features":
            spec = self.feature_spec()
            if not spec.views:
                return eval_transform(self.backbone.preprocess)
            return spec.augment.build(self.backbone.preprocess)
        return None

    def eval_transform(self, tte: str) -> Callable[[Any], Tensor] | None:
        """The evaluation transform for test-time ensembling mode `tte`; None: the backbone's preprocessing
        (with the TTE crops)."""
        return None

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups: dicts with "params" and an optional "lr_scale" applied on top of the
        schedule. Default: one group of every trainable parameter."""
        return [{"params": [p for _, p in self.trainable_parameters()]}]

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        """Called before each training epoch (0-based), also for the epoch a resumed run continues."""

    def after_step(self, step: int) -> None:
        """Called after each optimizer step; `step` counts optimizer steps from 1 over the whole run."""

    def eval_heads(self) -> tuple[str, ...]:
        """Names of the logit sets forward also returns in `Output.heads` (LDC's MAF / ICD / ALF); selection may
        pick one of them when "heads" is in `select_among`. Default: none, `logits` is the prediction."""
        return ()

    def extra_results(self) -> dict[str, Any]:
        """Method-specific entries of results.json (chosen hyper-parameters ...), stored under the method's name."""
        return {}

    def balances_prior(self) -> bool:
        """Whether the trained model predicts as if the classes were balanced: True when the loss it trains with
        (a registered `Loss` among its modules) removes the train label prior (LA, balanced softmax, CLA, CF).
        Saved in checkpoint.json, where GLA's `source_prior=auto` reads it."""
        return any(isinstance(m, Loss) and m.balances_prior for m in self.modules())

    def protocol(self) -> dict[str, Any]:
        """The method's named protocol choices in force that differ from tailclip's defaults (a released
        evaluation, a test-set choice ...), recorded in results.json's "protocol" and shown by `tailclip report`.
        Default: none."""
        return {}

    # --- shared helpers --------------------------------------------------------------------------
    def encode(self, inputs: Inputs) -> dict[str, Tensor]:
        """Named features of a batch: cached features pass through; images run the (frozen or tuned) backbone,
        giving "proj", "pre_proj" and any tap the spec names."""
        if isinstance(inputs, dict):
            return inputs
        out = self.backbone.encode_image(inputs, taps=[t for t in self.feature_spec().tensors
                                                       if t not in ("proj", "pre_proj")])
        return {"proj": out.proj, "pre_proj": out.pre_proj, **out.taps}

    def use_head(self, name: str) -> None:
        """Predict with head `name` from now on (chosen by selection, or restored from a checkpoint)."""
        if name not in self.eval_heads():
            raise ConfigError(f"method {self.name!r} has no head {name!r}; its heads: {', '.join(self.eval_heads())}")
        self.active_head = name

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters that train (the backbone is frozen unless a tuner unfroze part of it on purpose)."""
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def num_trainable(self) -> int:
        return sum(p.numel() for _, p in self.trainable_parameters())

    def checkpoint_state(self) -> dict[str, Tensor]:
        """What a checkpoint stores: trainable parameters plus the method's own buffers; never frozen CLIP."""
        trainable = {n for n, _ in self.trainable_parameters()}
        return {
            k: v.detach().cpu().contiguous()
            for k, v in self.state_dict().items()
            if k in trainable or not k.startswith("backbone.")
        }

    def load_checkpoint_state(self, state: dict[str, Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        expected = set(self.checkpoint_state())
        really_missing = sorted(expected & set(missing))
        if really_missing or unexpected:
            raise RuntimeError(f"checkpoint does not fit this method: missing {really_missing}, "
                               f"unexpected {unexpected}")


MethodClass = type[Method]
METHODS: Registry[MethodClass] = Registry("method")


def register_method(name: str) -> Callable[[MethodClass], MethodClass]:
    def deco(cls: MethodClass) -> MethodClass:
        cls.name = name
        register_method_config(name, cls.Config, cls.train_defaults)
        return METHODS.register(name)(cls)

    return deco
