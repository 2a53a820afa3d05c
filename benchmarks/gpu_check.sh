#!/usr/bin/env bash
# One prepared GPU check: every speed figure the README's performance table needs, in one command, in about 8 minutes
# on one H100, with no downloads (random ViT-B-16@none / RN50@none weights, generated JPEGs, random features).
#
#   bash benchmarks/gpu_check.sh               # on a CUDA machine: the figures, one JSON line per row
#   bash benchmarks/gpu_check.sh --cpu-smoke   # every row for a few steps on the CPU (what the test suite runs)
#
# Rows: tower forward img/s fp32 / bf16 next to open_clip's (vit_forward.py); LIFT, Sage with FIT and LDC training
# img/s, model-only and end-to-end, bf16, batch 256 (train_throughput.py; the compute limit of ViT-B/16 adapter
# training is about 11.0k img/s on an H100); nvJPEG decode + crop img/s (data_throughput.py); extraction img/s
# (extract_throughput.py); GLA, the linear probe and Tip-Adapter's full search at ImageNet-LT size, 115,846 x 512
# train, 20,000 val, 1,000 classes (frozen_methods.py). PYTHON picks the interpreter (default: python3).
set -euo pipefail
PY=${PYTHON:-python3}
if [[ $PY == */* ]]; then  # a relative path stays valid after the cd below (a venv's symlink is kept as it is)
  PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
fi
cd "$(dirname "$0")"
mode=gpu
if [[ "${1:-}" == "--cpu-smoke" ]]; then
  mode=cpu-smoke
elif [[ $# -gt 0 ]]; then
  echo "usage: $0 [--cpu-smoke]" >&2
  exit 2
fi
if [[ $mode == gpu ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: run with --cpu-smoke for the CPU smoke test" >&2
  exit 2
fi

row() {  # row NAME SCRIPT ARGS...: one section, the script's JSON lines, a failure stops the check
  echo "## $1"
  shift
  "$PY" "$@"
}

if [[ $mode == gpu ]]; then
  "$PY" -c "import torch; print('## device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
  row "tower forward, ViT-B/16" vit_forward.py --arch ViT-B-16 --device cuda --batch 256 --runs 10 --warmup 3
  row "tower forward, RN50" vit_forward.py --arch RN50 --device cuda --batch 256 --runs 10 --warmup 3
  row "training img/s (limit for ViT-B/16 adapters: ~11.0k img/s)" train_throughput.py --models ViT-B-16@none \
    --methods lift,sage+fit,ldc --devices cuda --batch-vit 256 --steps 20 --workers 8
  row "JPEG decode + crop" data_throughput.py --images 4096 --workers auto
  row "feature extraction" extract_throughput.py --images 8192 --models ViT-B-16@none,RN50@none --device cuda \
    --batch 512 --taps
  row "frozen methods at ImageNet-LT size" frozen_methods.py --scale 1.0 --device cuda
else
  row "tower forward, ViT-B/16 (smoke)" vit_forward.py --arch ViT-B-16 --batch 1 --runs 1 --warmup 0
  row "training img/s (smoke)" train_throughput.py --models synthetic:tiny-clip --methods lift,sage+fit,ldc \
    --devices cpu --batch-tiny 8 --steps 1
  row "JPEG decode + crop (smoke)" data_throughput.py --images 8 --workers 0
  row "feature extraction (smoke)" extract_throughput.py --images 16 --models synthetic:tiny-clip --device cpu \
    --batch 8 --workers 0 --precision fp32 --taps
  row "frozen methods (smoke)" frozen_methods.py --scale 0.005 --tip-grid 4,2 --probe search_steps=1 max_iter=5
fi
echo "## done ($mode)"
