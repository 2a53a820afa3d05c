"""tailclip: adapt CLIP-style vision-language models to long-tailed and few-shot recognition."""

import os

# OpenMP threads that finish their share of a parallel region spin for a while before they sleep (libgomp: 300,000
# spins unless told otherwise). Beside another multi-threaded job on 2 cores that spinning starves both: `tailclip demo
# --quick` next to a second one took 4.0x its idle time; with 1,000 spins, 1.5x, and the idle time is unchanged
# (fully passive threads, OMP_WAIT_POLICY=PASSIVE, gave 1.4x but 8-10 % slower idle runs). benchmarks/contention.py
# measures it. It applies only when set before torch starts OpenMP, so it sits here; a user's own settings win.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # libgomp (torch's Linux wheels)
os.environ.setdefault("KMP_BLOCKTIME", "1")  # Intel OpenMP, in milliseconds (builds linked against libiomp)

__version__ = "0.1.0"
