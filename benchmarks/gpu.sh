#!/usr/bin/env bash
# Time NPI and NTI reconstruction (and an NPI edit) at 512 px, 50 steps, fp16, on a GPU, with random
# SD-1.5-shaped weights. Needs torch with CUDA and npinv installed (pip install -e .).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/sd15_gpu.json}
python benchmarks/sd15_timing.py --device cuda --dtype fp16 --size 512 --steps 50 --repeats 3 --out "$OUT"
