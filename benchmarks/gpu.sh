#!/usr/bin/env bash
# The GPU fast path on a GPU, in one run: first the CUDA-only tests (real graph capture equals eager
# calls; no host synchronisation inside NPI's and editing's steps), then benchmarks/gpu_fast_path.py on
# an SD-1.5-shaped model with random weights at 512 px, 50 steps, fp16: the UNet call's floor (eager
# against graph replay at batch 1/2/3/8), NPI invert+reconstruct, NPI edits (1 and 4 targets), NTI,
# NPI + BDIA at 10 steps, edit-batch images/min and peak memory, each against its floor, as JSON under
# bench/. Needs torch with CUDA and npinv installed (pip install -e .); about 5 minutes on an H200.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/gpu_fast_path.json}
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1
"$PY" -m pytest -q -p no:cacheprovider tests/test_fast_path.py -k cuda
"$PY" benchmarks/gpu_fast_path.py --device cuda --dtype fp16 --steps 50 --repeats 3 --out "$OUT"
