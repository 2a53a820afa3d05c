"""`tailclip demo --quick` beside other jobs: wall time idle, beside one busy single-threaded process, and beside a
second `demo --quick`, with the ratios to idle. Not part of the test suite.

    python benchmarks/contention.py [--env KEY=VALUE ...] [--cases idle,busy,pair]

`--env` sets variables for the measured runs (e.g. GOMP_SPINCOUNT=300000, libgomp's own default, to see the
spin-waiting tailclip shortens to 1,000 spins; OMP_WAIT_POLICY=PASSIVE; OMP_NUM_THREADS=1). Each run gets cold caches
of its own, so runs never share work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUSY = "while True:\n    pass\n"


def demo(tmp: Path, name: str, env: dict[str, str]) -> subprocess.Popen:
    root = tmp / name
    root.mkdir()
    cmd = [sys.executable, "-m", "tailclip.cli", "demo", "--quick", "--output-dir", str(root / "runs")]
    full = {**os.environ, **env, "TAILCLIP_CACHE": str(root / "cache"), "TAILCLIP_WORLD_CACHE": str(root / "world")}
    return subprocess.Popen(cmd, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait(proc: subprocess.Popen, t0: float) -> float:
    _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"demo --quick failed:\n{err[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", nargs="*", default=[], help="KEY=VALUE for the measured runs")
    ap.add_argument("--cases", default="idle,busy,pair")
    args = ap.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        for case in args.cases.split(","):
            t0 = time.perf_counter()
            if case == "idle":
                out[case] = wait(demo(tmp, case, env), t0)
            elif case == "busy":
                busy = subprocess.Popen([sys.executable, "-c", BUSY])
                try:
                    out[case] = wait(demo(tmp, case, env), t0)
                finally:
                    busy.kill()
            elif case == "pair":
                a, b = demo(tmp, "pair-a", env), demo(tmp, "pair-b", env)
                out[case] = max(wait(a, t0), wait(b, t0))
            else:
                raise SystemExit(f"unknown case {case!r}")
            print(json.dumps({"case": case, "seconds": round(out[case], 1), "env": env}), flush=True)
    if "idle" in out:
        print(json.dumps({"ratios_to_idle": {k: round(v / out["idle"], 2) for k, v in out.items()}, "env": env,
                          "cores": len(os.sched_getaffinity(0))}))


if __name__ == "__main__":
    main()
