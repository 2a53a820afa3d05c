"""Linear probe on frozen, cached CLIP features.

`head: logreg` (default) is CLIP's / CoOp's linear-probe protocol: multinomial logistic regression on
L2-normalised image features, L2 strength chosen on the validation split (coarse grid over C in 1e-6..1e6,
then a log-space binary search around the best, as CoOp's `lpclip`), solved with full-batch L-BFGS in
float32 (no sklearn): a solver, not SGD training. `head: linear | cosine` trains tailclip's heads
(text-initialised) on the cached features with the engine's trainer (`cfg.train`: optimizer, schedule,
selection, resume, metrics.csv) and a CE / LA / balanced-softmax loss: seconds instead of hours, because the
backbone never runs during training.

Equations, the released protocol, the named options and every deliberate difference: docs/methods/linear_probe.md.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.base import Backbone
from ..config import FeatureOptions, check_choice
from ..contract import FeatureSpec, FitContext, FitResult, Inputs, Method, Output, SelectionRecord, register_method
from ..data.base import TaskInfo
from ..errors import ConfigError
from ..heads import build_head, text_init_weights
from ..losses import build_loss, loss_names
from ..posthoc.prior import few_threads_for_small

log = logging.getLogger(__name__)


@dataclass
class LinearProbeConfig(FeatureOptions):
    head: str = "logreg"  # logreg | linear | cosine
    feature: str = "proj"  # proj (joint space, CoOp's probe) | pre_proj (before CLIP's projection)
    normalize: bool = True  # L2-normalise features before the classifier
    C: float | None = None  # fixed inverse L2 strength (skips the validation search)
    c_grid: list[float] = field(default_factory=lambda: [1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e4, 1e6])
    search_steps: int = 8  # log-space binary-search refinements around the best grid value
    max_iter: int = 300  # L-BFGS iterations per fit (sklearn: 100; CoOp passes 1000)
    # Large train splits: search C on a seeded class-stratified subsample of this many rows (None: all rows, the
    # CoOp/CLIP protocol), then fit the chosen C on every row, warm-started from the subsample's solution.
    # C weighs the summed loss (sklearn's objective), so the same C on more rows regularises less, as it should.
    search_rows: int | None = None
    search_max_iter: int | None = None  # L-BFGS iterations per search fit (None: max_iter)
    # L-BFGS stops when the gradient's max-norm of the mean objective is below tol (current sklearn: 1e-4 on the
    # same objective; 1e-5 by default here). At ImageNet-LT size 1e-4 halves the final fit (43 vs 95 evaluations).
    tol: float = 1e-5
    refit_on_train_val: bool = False  # after choosing C, refit on train + val (CLIP's final fit)
    # head = linear | cosine (gradient training on cached features; optimiser settings come from cfg.train)
    loss: str = "ce"  # ce | la | bs (tailclip.losses)
    cosine_scale: float = 25.0
    text_init: bool = True

    def __post_init__(self) -> None:
        check_choice("linear_probe.head", self.head, ("logreg", "linear", "cosine"))
        check_choice("linear_probe.feature", self.feature, ("proj", "pre_proj"))
        check_choice("linear_probe.loss", self.loss, loss_names())
        if self.C is not None and self.C <= 0:
            raise ConfigError(f"linear_probe.C={self.C} must be > 0")
        if self.tol <= 0:
            raise ConfigError(f"linear_probe.tol={self.tol} must be > 0")
        for key in ("search_rows", "search_max_iter"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"linear_probe.{key}={value} must be >= 1 (or null)")


def _prep(x: Tensor, normalize: bool) -> Tensor:
    return F.normalize(x.float(), dim=-1) if normalize else x.float()


def ce_loss_grad(x: Tensor, y: Tensor, w: Tensor, b: Tensor, rows: int = 4096) -> tuple[Tensor, Tensor, Tensor]:
    """Mean cross-entropy of x W^T + b and its gradients, by hand over chunks of `rows` rows: each chunk's logits
    stay in cache and are turned into softmax - one-hot in place, faster than autograd on the whole logits of a
    large split (benchmarks/README.md)."""
    n = x.shape[0]
    grad_w, grad_b = torch.zeros_like(w), torch.zeros_like(b)
    total = torch.zeros(())  # float32: a float64 sum lets weakly regularised fits run to max_iter
    for lo in range(0, n, rows):
        xc, yc = x[lo : lo + rows], y[lo : lo + rows]
        z = torch.addmm(b, xc, w.t())
        lse = torch.logsumexp(z, dim=1)
        total += lse.sum() - z.gather(1, yc[:, None]).sum()
        p = z.sub_(lse[:, None]).exp_()  # softmax
        p[torch.arange(len(yc)), yc] -= 1.0
        grad_w.addmm_(p.t(), xc)
        grad_b += p.sum(dim=0)
    return total / n, grad_w.div_(n), grad_b.div_(n)


def fit_logreg(x: Tensor, y: Tensor, num_classes: int, C: float, max_iter: int = 1000,
               init: tuple[Tensor, Tensor] | None = None, tol: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression with sklearn's objective C * sum CE + ||W||^2 / 2 (bias unpenalised),
    divided by C*N for conditioning; full-batch L-BFGS in float32 until the gradient's max-norm is below `tol`
    (sklearn's lbfgs stops at 1e-4). `init` warm-starts (the C search walks a path of neighbouring C's); a cold
    start is W = 0 with the bias at the log class frequencies, the optimum of W = 0, which saves a long-tailed
    split's strongly regularised fits most of their iterations (same optimum: only the path differs).
    Returns (W (C, D), b (C,))."""
    xd = x.float()
    n, d = xd.shape
    if init is None:
        w = torch.zeros(num_classes, d)
        b = torch.bincount(y, minlength=num_classes).float().clamp(min=0.5).log()  # an absent class: a low bias
    else:
        w, b = init[0].float().clone(), init[1].float().clone()
    lam = 1.0 / (C * n)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        ce, grad_w, grad_b = ce_loss_grad(xd, y, w, b)
        w.grad, b.grad = grad_w.add_(w, alpha=lam), grad_b
        return ce + 0.5 * lam * w.pow(2).sum()

    with few_threads_for_small(xd.numel() + num_classes * n):
        opt.step(closure)
    return w.detach(), b.detach()


def _accuracy(w: Tensor, b: Tensor, x: Tensor, y: Tensor) -> float:
    return float((x @ w.t() + b).argmax(dim=1).eq(y).float().mean())


def stratified_rows(y: Tensor, rows: int, seed: int) -> Tensor | None:
    """About `rows` row indices drawn per class in proportion to its count (at least one per present class),
    seeded; None when the split has no more than `rows` rows (nothing to subsample)."""
    if len(y) <= rows:
        return None
    g = torch.Generator().manual_seed(int(seed))
    counts = torch.bincount(y)
    take = (counts.double() * rows / len(y)).round().long().clamp(min=1).minimum(counts)
    by_class = torch.split(torch.argsort(y, stable=True), counts.tolist())
    picked = [m[torch.randperm(len(m), generator=g)[: int(take[c])]] for c, m in enumerate(by_class) if len(m)]
    return torch.cat(picked).sort().values


def search_C(x_tr: Tensor, y_tr: Tensor, x_val: Tensor, y_val: Tensor, num_classes: int, grid: list[float],
             steps: int, max_iter: int, tol: float = 1e-5,
             ) -> tuple[float, list[dict[str, float]], tuple[Tensor, Tensor]]:
    """CoOp/CLIP-style search: best C of a coarse log grid, then `steps` bisections in log10 space between its
    neighbours (keep the better side). Ties go to the stronger regularisation (smaller C). Returns the chosen C,
    the trace and the very (W, b) whose val accuracy chose it: under strong regularisation (tiny C) L-BFGS stops
    where float32 can no longer see the loss change, at a point that depends on the start, so a refit from zeros
    can predict differently (measured: 73.5 % val in the search, 39 % after a cold refit at C = 1e-5)."""
    trace: list[dict[str, float]] = []
    cache: dict[float, float] = {}
    solutions: dict[float, tuple[Tensor, Tensor]] = {}
    start = time.perf_counter()  # each fit logs a line: the search can take minutes on a large split

    def score(c: float) -> float:
        if c not in cache:
            # warm start from the solution of the nearest C already fitted: a few L-BFGS steps instead of many
            near = min(solutions, key=lambda k: abs(math.log10(k) - math.log10(c)), default=None)
            w, b = fit_logreg(x_tr, y_tr, num_classes, c, max_iter, init=solutions.get(near) if near else None,
                              tol=tol)
            solutions[c] = (w, b)
            cache[c] = _accuracy(w, b, x_val, y_val)
            trace.append({"C": c, "val_acc": 100.0 * cache[c]})
            log.info("C search, fit %d: C=%g val top-1 %.2f%% (%.1fs so far)", len(cache), c, 100.0 * cache[c],
                     time.perf_counter() - start)
        return cache[c]

    grid = sorted(grid)
    accs = [score(c) for c in grid]
    best = max(range(len(grid)), key=lambda i: (accs[i], -i))
    c_best, acc_best = grid[best], accs[best]
    lo = math.log10(grid[max(best - 1, 0)])
    hi = math.log10(grid[min(best + 1, len(grid) - 1)])
    for _ in range(steps):
        left, right = 10 ** ((lo + math.log10(c_best)) / 2), 10 ** ((hi + math.log10(c_best)) / 2)
        a_l, a_r = score(left), score(right)
        if max(a_l, a_r) > acc_best:
            if a_l >= a_r:
                hi, c_best, acc_best = math.log10(c_best), left, a_l
            else:
                lo, c_best, acc_best = math.log10(c_best), right, a_r
        else:  # the peak is between the two probes: shrink both sides
            lo, hi = math.log10(left), math.log10(right)
    return c_best, trace, solutions[c_best]


def search_C_for(cfg: LinearProbeConfig, x_tr: Tensor, y_tr: Tensor, x_val: Tensor, y_val: Tensor,
                 num_classes: int, seed: int) -> tuple[float, list[dict[str, float]], tuple[Tensor, Tensor], int]:
    """`search_C` as the config says: on every train row, or on `search_rows` of them (stratified, seeded) with
    `search_max_iter` iterations per fit. Returns (C, trace, searched (W, b), rows searched on)."""
    rows = stratified_rows(y_tr, cfg.search_rows, seed) if cfg.search_rows else None
    x_s, y_s = (x_tr, y_tr) if rows is None else (x_tr[rows], y_tr[rows])
    c, trace, searched = search_C(x_s, y_s, x_val, y_val, num_classes, list(cfg.c_grid), cfg.search_steps,
                                  cfg.search_max_iter or cfg.max_iter, cfg.tol)
    return c, trace, searched, len(y_s)


@register_method("linear_probe")
class LinearProbe(Method):
    """Logistic regression (C chosen on val) or a cosine/linear head, trained on cached frozen features."""

    Config = LinearProbeConfig
    inputs = "features"

    def __init__(self, cfg: LinearProbeConfig, backbone: Backbone, info: TaskInfo) -> None:
        super().__init__(cfg, backbone, info)
        dim = backbone.embed_dim if cfg.feature == "proj" else backbone.pre_proj_width
        if cfg.head == "logreg":
            self.head: nn.Module = nn.Linear(dim, info.num_classes)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            init = (text_init_weights(backbone, info.classnames, info.templates, space=cfg.feature)
                    if cfg.text_init else None)
            self.head = build_head(cfg.head, dim, info.num_classes, init, scale=cfg.cosine_scale)
        self.loss_fn = build_loss(cfg.loss, info.class_counts)
        self._info: dict[str, Any] = {}

    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(tensors=(self.cfg.feature,))

    def classify(self, feats: Tensor) -> Tensor:
        return self.head(_prep(feats, self.cfg.normalize))

    def forward(self, inputs: Inputs, labels: Tensor | None = None) -> Output:
        logits = self.classify(self.encode(inputs)[self.cfg.feature])
        return Output(logits, self.loss_fn(logits, labels) if labels is not None else None)

    def _xy(self, ctx: FitContext, split: str) -> tuple[Tensor, Tensor]:
        fs = self.cached_features(ctx, split)
        return _prep(fs.get(self.cfg.feature), self.cfg.normalize), fs.labels

    def trains(self) -> bool:
        """The linear and cosine heads train with the engine's trainer; logistic regression is fitted in finish."""
        return self.cfg.head != "logreg"

    def balances_prior(self) -> bool:
        return self.cfg.head != "logreg" and super().balances_prior()  # (logreg fits plain multinomial CE)

    def finish(self, ctx: FitContext, result: FitResult) -> FitResult:
        if self.cfg.head == "logreg":
            return FitResult(selection=self._fit_logreg(ctx))
        self._info = {"loss": self.cfg.loss, "epochs": ctx.cfg.train.epochs}
        return result

    def _fit_logreg(self, ctx: FitContext) -> SelectionRecord:
        """C chosen on val (or fixed), then the weights fitted with it; returns the record of the choice."""
        cfg = self.cfg
        x_tr, y_tr = self._xy(ctx, "train")
        select_on = ctx.cfg.train.select_on
        if select_on == "paper":
            raise ConfigError("train.select_on=paper: linear_probe declares no paper protocol; use val or none")
        has_val = "val" in ctx.task.splits
        searched: tuple[Tensor, Tensor] | None = None
        search_on = len(y_tr)
        if cfg.C is not None:
            c, trace, chosen_on = cfg.C, [], "fixed"
        elif has_val and select_on != "none":
            x_val, y_val = self._xy(ctx, "val")
            c, trace, searched, search_on = search_C_for(cfg, x_tr, y_tr, x_val, y_val, self.num_classes,
                                                         ctx.cfg.train.seed)
            chosen_on = "val"
        else:
            c, trace, chosen_on = 0.316, [], "default"
            log.warning("%s: using C=%g without a search (no val split, or train.select_on=none)", ctx.task.name, c)
        refit = cfg.refit_on_train_val and has_val
        if refit:
            x_val, y_val = self._xy(ctx, "val")
            x_tr, y_tr = torch.cat([x_tr, x_val]), torch.cat([y_tr, y_val])
        if searched is not None and search_on == len(y_tr) and not refit:
            w, b = searched  # the model whose val accuracy chose C (same data: a refit would only differ)
        else:  # other rows than the search's: fit them, warm-started from the searched solution where there is one
            w, b = fit_logreg(x_tr, y_tr, self.num_classes, c, cfg.max_iter, init=searched, tol=cfg.tol)
        with torch.no_grad():
            self.head.weight.copy_(w)
            self.head.bias.copy_(b)
        log.info("linear probe: C=%g (chosen on %s), train acc %.2f%%", c, chosen_on,
                 100 * _accuracy(w, b, x_tr, y_tr))
        self._info = {"C": c, "C_chosen_on": chosen_on, "C_search": trace, "C_search_rows": search_on}
        return SelectionRecord("val" if chosen_on == "val" else "none", "C", {"C": c})

    def extra_results(self) -> dict[str, Any]:
        return {"head": self.cfg.head, "feature": self.cfg.feature, **self._info}
