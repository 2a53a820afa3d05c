"""Do two folders of runs hold the same numbers? For refactors that must not change any: run `tailclip demo` (or a
table) before and after, then

    python benchmarks/compare_runs.py runs/demo_before runs/demo_after

Every run folder (a sub-folder with results.json) is compared by its metrics (top1, many/medium/few, base/new/HM,
ECE, NLL, each split's top-1) and by the sha256 of the tensors in each saved logits_<split>.safetensors. Prints the
runs that differ and exits 1 if any does (or if a run is only on one side)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

METRICS = ("top1", "many", "medium", "few", "base", "new", "hm", "ece", "nll")


def digest(root: Path) -> dict[str, dict[str, Any]]:
    """{run folder name: its metrics and the hash of each saved logits file}."""
    out: dict[str, dict[str, Any]] = {}
    for results_path in sorted(root.glob("*/results.json")):
        results = json.loads(results_path.read_text())
        entry: dict[str, Any] = {k: results.get(k) for k in METRICS}
        entry["splits"] = {name: split.get("top1") for name, split in results.get("splits", {}).items()}
        for logits_path in sorted(results_path.parent.glob("logits_*.safetensors")):
            tensors = load_file(str(logits_path))
            blob = b"".join(tensors[k].numpy().tobytes() for k in sorted(tensors))
            entry[logits_path.name] = hashlib.sha256(blob).hexdigest()[:16]
        out[results_path.parent.name] = entry
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    args = ap.parse_args()
    a, b = digest(args.before), digest(args.after)
    differ = [name for name in sorted(set(a) | set(b)) if a.get(name) != b.get(name)]
    for name in differ:
        print(f"DIFFERS {name}\n  before: {a.get(name)}\n  after:  {b.get(name)}")
    print(f"{len(set(a) | set(b))} runs compared, {len(differ)} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
