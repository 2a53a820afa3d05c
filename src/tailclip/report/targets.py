"""Paper targets: the published number a preset reproduces, with the table it comes from.

A run matches a target when every `match` key equals the run's value: looked up in its config.yaml (dotted
keys; `data.*` falls back to the resolved `task_meta` in results.json, so a config that left
`data.imbalance_ratio` to the dataset's default still matches), then in results.json (e.g.
`gla.finetuned_method`). `protocol` keys are settings of the paper's protocol a run may differ in (five-crop
test-time ensembling, epochs): the number is still shown, and the difference is named next to it.
The numbers are the papers' (docs/methods/<method>.md), each with its source table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# CoOp's 11 few-shot datasets (our registry names): few-shot papers report the mean over them
AVERAGE_DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                    "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
AVERAGE_NAME = "average of 11 datasets"
SHOTS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class PaperTarget:
    preset: str | None  # configs/<preset>.yaml that reproduces the number (None: a row no single run gives)
    values: Mapping[str, float]  # results key -> paper number (percent); the first is the table's column
    source: str
    match: Mapping[str, Any]
    protocol: Mapping[str, Any] = field(default_factory=dict)

    @property
    def metric(self) -> str:
        return next(iter(self.values))


@dataclass
class PaperMatch:
    target: PaperTarget
    diffs: dict[str, tuple[float, float | None]]  # metric -> (paper, run - paper or None when the run lacks it)
    deviations: list[str]  # protocol settings the run differs in, e.g. "eval.tte=none (paper: five_crop)"

    @property
    def value(self) -> float:
        return self.diffs[self.target.metric][0]

    @property
    def diff(self) -> float | None:
        return self.diffs[self.target.metric][1]


VIT_B16 = "ViT-B-16@openai"
RN50 = "RN50@openai"
LIFT = {"method": "lift", "model.name": VIT_B16, "lift.tuner": "adaptformer", "lift.loss": "la", "lift.crop": "rrc"}
LIFT_PROTOCOL = {"eval.tte": "five_crop", "train.epochs": 10}
SAGE_SRC = "Sage (Peng et al.)"
LIFT_SRC = "LIFT row (Shi et al., ICML 2024)"


def _lift(preset: str, dataset: str, values: dict[str, float], table: str, **match: Any) -> PaperTarget:
    protocol = dict(LIFT_PROTOCOL, **({"train.epochs": 20} if dataset == "inat2018" else {}))
    return PaperTarget(f"lift/{preset}", values, f"{SAGE_SRC} {table}, {LIFT_SRC}; ViT-B/16, five-crop TTE",
                       {**LIFT, "data.name": dataset, **match}, protocol)


def _sage(preset: str, dataset: str, values: dict[str, float], table: str, **match: Any) -> PaperTarget:
    return PaperTarget(f"sage/{preset}", values, f"{SAGE_SRC} {table}, Sage row; ViT-B/16",
                       {"method": "sage", "model.name": VIT_B16, "data.name": dataset, **match})


TARGETS: tuple[PaperTarget, ...] = (
    _lift("cifar100_lt_ir100", "cifar100-lt", {"top1": 81.7}, "Table 1", **{"data.imbalance_ratio": 100}),
    _lift("cifar100_lt_ir50", "cifar100-lt", {"top1": 83.1}, "Table 1", **{"data.imbalance_ratio": 50}),
    _lift("cifar100_lt_ir10", "cifar100-lt", {"top1": 84.9}, "Table 1", **{"data.imbalance_ratio": 10}),
    _lift("places_lt", "places-lt", {"top1": 52.2, "many": 51.7, "medium": 53.1, "few": 50.9}, "Table 2"),
    _lift("imagenet_lt", "imagenet-lt", {"top1": 78.3, "many": 81.3, "medium": 77.4, "few": 73.4}, "Table 3"),
    _lift("inat2018", "inat2018", {"top1": 80.4, "many": 74.0, "medium": 80.3, "few": 82.2}, "Table 4 (20 epochs)"),
    _sage("cifar100_lt_ir100", "cifar100-lt", {"top1": 83.3}, "Table 1", **{"data.imbalance_ratio": 100}),
    _sage("cifar100_lt_ir50", "cifar100-lt", {"top1": 84.6}, "Table 1", **{"data.imbalance_ratio": 50}),
    _sage("cifar100_lt_ir10", "cifar100-lt", {"top1": 86.3}, "Table 1", **{"data.imbalance_ratio": 10}),
    _sage("places_lt", "places-lt", {"top1": 52.7, "many": 51.8, "medium": 52.8, "few": 53.8}, "Table 2"),
    _sage("imagenet_lt", "imagenet-lt", {"top1": 78.8, "many": 82.1, "medium": 77.3, "few": 74.8}, "Table 3"),
    _sage("inat2018", "inat2018", {"top1": 80.9, "many": 74.0, "medium": 80.6, "few": 83.1}, "Table 4"),
    # GLA's README: ImageNet, RN50, the GLA ensemble of zero-shot CLIP with prompt tuning (CoOp), seeds 1-3
    *(PaperTarget("gla/imagenet_rn50_ensemble", {"top1": v},
                  "GLA README (BeierZhu/GLA), ImageNet RN50, prompt tuning + GLA, mean of seeds 1-3",
                  {"method": "gla", "gla.mode": "ensemble", "data.name": "imagenet", "model.name": RN50,
                   "data.shots": k, "gla.finetuned_method": "coop"})
      for k, v in zip(SHOTS, (61.87, 62.64, 63.31, 64.48, 65.63), strict=True)),
    # LDC's main table: mean over the 11 few-shot datasets (an `average` row of the report), RN50
    *(PaperTarget(None, {"top1": v}, "LDC (Li et al., CVPR 2025), main results table (mean over 11 datasets), RN50",
                  {"method": "ldc", "data.name": AVERAGE_NAME, "model.name": RN50, "data.shots": k})
      for k, v in zip(SHOTS, (65.71, 67.92, 71.17, 75.79, 79.78), strict=True)),
    # ... and ViT-B/16: the released log's mean of the code's `acc` (beta search; one seed, 2024)
    *(PaperTarget(None, {"top1": v}, "LDC released log (LiShuo1001/LDC, 1_main_experiment_2_few_shot.txt), mean of "
                  "`acc` over 11 datasets, ViT-B/16, seed 2024",
                  {"method": "ldc", "data.name": AVERAGE_NAME, "model.name": VIT_B16, "data.shots": k})
      for k, v in zip(SHOTS, (72.53, 74.48, 77.39, 80.02, 82.87), strict=True)),
)

_MISSING = object()


def _get(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def run_value(key: str, config: Mapping[str, Any], results: Mapping[str, Any], shots: int | None = None) -> Any:
    """The run's value of a dotted key: config.yaml, then (for data.*) the resolved task_meta, then results.json."""
    if key == "data.shots" and shots is not None:
        return shots
    for tree, k in ((config, key), (results.get("task_meta") or {}, key[5:] if key.startswith("data.") else None),
                    (results, key)):
        if k is not None and (v := _get(tree, k)) is not _MISSING and v is not None:
            return v
    return None


def same(a: Any, b: Any) -> bool:
    numeric = (int, float)
    if isinstance(a, numeric) and isinstance(b, numeric) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def match_target(config: Mapping[str, Any], results: Mapping[str, Any], metrics: Mapping[str, float],
                 shots: int | None = None, targets: tuple[PaperTarget, ...] = TARGETS) -> PaperMatch | None:
    """The first target whose `match` keys all equal the run's, with the run's differences to it."""
    for target in targets:
        if all(same(run_value(k, config, results, shots), v) for k, v in target.match.items()):
            diffs = {m: (p, metrics[m] - p if m in metrics else None) for m, p in target.values.items()}
            deviations = [f"{k}={got} (paper: {want})" for k, want in target.protocol.items()
                          if not same(got := run_value(k, config, results, shots), want)]
            return PaperMatch(target, diffs, deviations)
    return None
