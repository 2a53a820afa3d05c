"""tailclip: adapt CLIP-style vision-language models to long-tailed and few-shot recognition."""

import os

# OpenMP threads that finish their share of a parallel region spin for a while before they sleep (libgomp: 300,000
# spins unless told otherwise). Beside another multi-threaded job on few cores that spinning starves both; 1,000 spins
# keep the idle speed and most of the shared one (benchmarks/contention.py; numbers in benchmarks/README.md). It
# applies only when set before torch starts OpenMP, so it sits here; a user's own settings win.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # libgomp (torch's Linux wheels)
os.environ.setdefault("KMP_BLOCKTIME", "1")  # Intel OpenMP, in milliseconds (builds linked against libiomp)

__version__ = "0.1.0"

# Importing the package registers every method and its options (as timm's registry does), so a library user's
# `tailclip.config.load_config(...)` knows them without importing tailclip.methods first.
from . import methods  # noqa: F401
