"""Pretrain the tiny CLIP of the built-in world: `python -m tailclip.synthetic.pretrain --out DIR --seed 0`.

Image-caption pairs of the pretraining style are drawn with class frequencies following a Zipf-like prior over
seeded random rankings of the shapes, colours and classes (`attribute_prior`), so the model inherits a label
bias (frequent classes are recognised far better, the effect GLA's debiasing targets). Everything is seeded
and single-threaded with deterministic kernels, so the same seed regenerates the same weights bit for bit on
the same software stack, whatever the number of cores (float kernels may differ across CPU instruction sets or
torch versions; the meta file records the weights' hash to check against).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .captions import TASK_TEMPLATES, make_captions
from .generator import CLASSNAMES, NUM_CLASSES, STREAMS, balanced_test_images, draw_params, render
from .zeroshot import MEAN, STD, evaluate_zero_shot, images_to_tensor

log = logging.getLogger(__name__)

# A small ViT at 32 px (patch 8 -> 16 tokens + CLS, cheap enough for a shared CPU) and a narrow standard
# text tower: the token embedding (49408 x 64) dominates the parameter count; the fp32 file stays under 20 MB.
ARCH: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "head_width": 32, "mlp_ratio": 2.0, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
DEFAULTS: dict[str, Any] = {
    "steps": 2000,
    "batch_size": 128,
    "lr": 2e-3,
    "weight_decay": 0.05,
    "warmup_frac": 0.05,
    "attribute_exponent": 1.0,
    "class_exponent": 0.5,
    "threads": 1,  # one thread: results do not depend on the core count, and it is fastest on a shared CPU
}
NUM_FREQUENT = 30  # report classes 0..29 vs 70..99 of the pretraining frequency ranking


def attribute_prior(seed: int, attribute_exponent: float, class_exponent: float) -> np.ndarray:
    """Per-class pretraining prior (indexed by class), Zipf-like over a seeded random ranking.

    p(shape s, colour c) is proportional to (rank_s + 1)^-a (rank_c + 1)^-a (rank_sc + 1)^-b, with seeded random
    rankings of the shapes, the colours and the 100 classes. The attribute factors make rare classes consist of
    rare *concepts* (as rare words are on the web), so they cannot simply be composed from well-trained parts and
    the model inherits the bias; the class factor breaks ties and adds class-level skew.
    """
    from .generator import class_attributes

    rng = np.random.default_rng([int(seed), 7919])
    shape_rank = np.argsort(rng.permutation(10))
    colour_rank = np.argsort(rng.permutation(10))
    class_rank = np.argsort(rng.permutation(NUM_CLASSES))
    p = np.empty(NUM_CLASSES)
    for c in range(NUM_CLASSES):
        s, col = class_attributes(c)
        p[c] = ((shape_rank[s] + 1.0) * (colour_rank[col] + 1.0)) ** -attribute_exponent
        p[c] *= (class_rank[c] + 1.0) ** -class_exponent
    return p / p.sum()


def class_order(prior: np.ndarray) -> np.ndarray:
    """The pretraining frequency ranking: order[r] is the class with the r-th largest prior (ties by label)."""
    return np.argsort(-prior, kind="stable")


def build_model(arch: dict[str, Any] | None = None) -> torch.nn.Module:
    import open_clip

    return open_clip.model.CLIP(**copy.deepcopy(arch or ARCH))


def get_tokenizer():
    """open_clip's standard BPE tokenizer (bundled with the package, works offline)."""
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")


def state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def encode_text_short(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's `encode_text` on tokens cut to the longest caption in the batch.

    Exact for the standard text tower (causal mask, EOT-token pooling): positions after the EOT token never
    influence it, so dropping the padding changes nothing but the cost (captions are ~15 of 77 tokens).
    """
    length = int((tokens != 0).sum(1).max())
    x = model.token_embedding(tokens[:, :length]) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), tokens[:, :length].argmax(dim=-1)]  # EOT has the largest token id
    return x @ model.text_projection


def _batch(seed: int, step: int, batch_size: int, prior: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Batch `step` of the corpus: labels from the prior, images/captions rendered from their counters."""
    labels = np.random.default_rng([int(seed), 104729, int(step)]).choice(NUM_CLASSES, size=batch_size, p=prior)
    indices = (np.arange(batch_size, dtype=np.int64) + int(step) * batch_size).tolist()
    p = draw_params(seed, STREAMS["pretrain"], indices, labels.tolist(), "pretrain")
    return render(p), make_captions(p)


def train(seed: int = 0, steps: int = DEFAULTS["steps"], batch_size: int = DEFAULTS["batch_size"],
          lr: float = DEFAULTS["lr"], weight_decay: float = DEFAULTS["weight_decay"],
          warmup_frac: float = DEFAULTS["warmup_frac"],
          attribute_exponent: float = DEFAULTS["attribute_exponent"],
          class_exponent: float = DEFAULTS["class_exponent"],
          threads: int = DEFAULTS["threads"], arch: dict[str, Any] | None = None,
          log_every: int = 50, eval_every: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train from scratch; returns the model (eval mode) and a record of the run (prior, order, loss...)."""
    torch.set_num_threads(int(threads))
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    arch = copy.deepcopy(arch or ARCH)
    model = build_model(arch)
    model.train()
    tokenizer = get_tokenizer()
    token_cache: dict[str, torch.Tensor] = {}

    def tokenize(texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in token_cache]
        if missing:
            for t, tok in zip(missing, tokenizer(missing)):
                token_cache[t] = tok
        return torch.stack([token_cache[t] for t in texts])

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, int(warmup_frac * steps))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    prior = attribute_prior(seed, attribute_exponent, class_exponent)
    order = class_order(prior)
    t0 = time.time()
    losses: list[float] = []
    for step in range(steps):
        images, captions = _batch(seed, step, batch_size, prior)
        x = images_to_tensor(images)
        tokens = tokenize(captions)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(encode_text_short(model, tokens), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        target = torch.arange(len(x))
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step == steps - 1:
            log.info("step %d/%d loss %.4f (avg %.4f) lr %.2e scale %.1f %.1fs", step + 1, steps, losses[-1],
                     float(np.mean(losses[-log_every:])), lr_at(step), model.logit_scale.exp().item(),
                     time.time() - t0)
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            zs = measure(model, order, sample=0, limit=1000)  # eval mode, no RNG use: training is unaffected
            model.train()
            pre = _pretrain_style_top1(model)
            model.train()
            log.info("step %d zero-shot (first 1000 test images) top-1 %.3f | frequent-30 %.3f | rare-30 %.3f | "
                     "pretraining style %.3f", step + 1, zs["test_top1"], zs["frequent30_mean_class_acc"],
                     zs["rare30_mean_class_acc"], pre)
    model.eval()
    record = {
        "seed": int(seed), "steps": int(steps), "batch_size": int(batch_size), "lr": lr,
        "weight_decay": weight_decay, "warmup_steps": warmup, "attribute_exponent": attribute_exponent,
        "class_exponent": class_exponent,
        "threads": int(threads), "torch_version": torch.__version__,
        "class_order": order.tolist(), "prior": prior.tolist(),
        "final_loss": float(np.mean(losses[-max(1, min(50, steps)):])), "train_seconds": round(time.time() - t0, 1),
    }
    return model, record


def _pretrain_style_top1(model: torch.nn.Module, n: int = 1000) -> float:
    """Zero-shot top-1 on held-out pretraining-style images (the domain-gap-free reference)."""
    labels = np.arange(n) % NUM_CLASSES
    images = render(draw_params(0, STREAMS["test"], list(range(n)), labels.tolist(), "pretrain"))
    return float(evaluate_zero_shot(model, get_tokenizer(), images, labels, CLASSNAMES, TASK_TEMPLATES)["top1"])


def measure(model: torch.nn.Module, order: np.ndarray, sample: int = 500, limit: int | None = None) -> dict[str, Any]:
    """Zero-shot metrics on the balanced synth-lt test set (downstream style), and on its first `sample` images."""
    tokenizer = get_tokenizer()
    images, labels = balanced_test_images(limit)
    res = evaluate_zero_shot(model, tokenizer, images, labels, CLASSNAMES, TASK_TEMPLATES)
    per_class = np.asarray(res["per_class"])
    freq, rare = order[:NUM_FREQUENT], order[-NUM_FREQUENT:]
    small = evaluate_zero_shot(model, tokenizer, images[:sample], labels[:sample], CLASSNAMES, TASK_TEMPLATES)
    return {
        "templates": TASK_TEMPLATES,
        "test_top1": res["top1"],
        "test_n": res["n"],
        "frequent30_mean_class_acc": float(per_class[freq].mean()),
        "rare30_mean_class_acc": float(per_class[rare].mean()),
        "per_class_acc": [round(float(a), 4) for a in per_class],
        "predictions_per_class": np.asarray(res["pred_counts"]).tolist(),
        "sample_n": small["n"],
        "sample_correct": small["correct"],
        "sample_top1": small["top1"],
    }


def save(model: torch.nn.Module, arch: dict[str, Any], record: dict[str, Any], out: Path,
         name: str = "tiny-clip") -> dict[str, Any]:
    """Write <name>.json (open_clip model config), <name>.safetensors (fp32) and <name>.meta.json."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    # A bare open_clip model config: open_clip's default preprocessing (OpenAI mean/std) is what training used.
    (out / f"{name}.json").write_text(json.dumps(arch, indent=2) + "\n")
    weights = out / f"{name}.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(weights),
              metadata={"format": "pt", "source": "tailclip.synthetic.pretrain (synthetic world)"})
    record = dict(record)
    record["preprocess"] = {"image_size": arch["vision_cfg"]["image_size"], "mean": list(MEAN), "std": list(STD)}
    record["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    record["weights_bytes"] = weights.stat().st_size
    record["num_params"] = int(sum(p.numel() for p in model.parameters()))
    record["classnames"] = CLASSNAMES
    record["description"] = ("SYNTHETIC tiny CLIP pretrained on procedurally generated shape images with a Zipf "
                             "label prior; for demos and tests only, not a real foundation model.")
    (out / f"{name}.meta.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for tiny-clip.{json,safetensors,meta.json}")
    ap.add_argument("--seed", type=int, default=0)
    for key, val in DEFAULTS.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=type(val), default=val)
    ap.add_argument("--arch", type=Path, default=None, help="open_clip model config JSON (default: built-in ARCH)")
    ap.add_argument("--no-eval", action="store_true", help="skip the zero-shot measurement")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="log zero-shot accuracy every N steps (0: off; weights are unchanged)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    arch = json.loads(args.arch.read_text()) if args.arch else ARCH
    arch = {k: v for k, v in arch.items() if k != "preprocess_cfg"}
    t0 = time.time()
    model, record = train(seed=args.seed, arch=arch, eval_every=args.eval_every,
                          **{k: getattr(args, k) for k in DEFAULTS})
    record["state_sha256"] = state_hash(model)
    if not args.no_eval:
        record["zero_shot"] = measure(model, np.asarray(record["class_order"]))
        zs = record["zero_shot"]
        log.info("zero-shot top-1 %.4f | frequent-30 %.4f | rare-30 %.4f | first-%d %d correct",
                 zs["test_top1"], zs["frequent30_mean_class_acc"], zs["rare30_mean_class_acc"], zs["sample_n"],
                 zs["sample_correct"])
    record["total_seconds"] = round(time.time() - t0, 1)
    rec = save(model, arch, record, args.out)
    log.info("wrote %s (%d bytes, sha256 %s) in %.0fs", args.out, rec["weights_bytes"], rec["weights_sha256"],
             record["total_seconds"])


if __name__ == "__main__":
    main()
