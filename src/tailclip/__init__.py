"""tailclip: adapt CLIP-style vision-language models to long-tailed and few-shot recognition."""

import os

# OpenMP threads that finish their share of a parallel region sleep instead of spinning (torch's libgomp spins
# otherwise): beside another multi-threaded job on 2 cores, `tailclip demo --quick` took 4.0x its idle time with
# spinning threads and 1.4x with passive ones, at the same idle time (benchmarks/contention.py). It only applies
# when set before torch starts OpenMP, so it sits here, and a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
