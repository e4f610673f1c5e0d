#!/usr/bin/env bash
# The GPU benches in one command, on a machine with CUDA and the project's environment:
#   bash bench/run_gpu.sh            (or: make bench-gpu)
# flops first (the floors the GPU numbers are compared with), then gpu_train and gpu_render. Without CUDA the
# GPU scripts print "skipped: no CUDA" and exit 0. PY selects the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[[ -x $PY ]] || PY=$(command -v python3)
"$PY" -c 'import torch, transformers, peft, diffusers' || {
  echo "run_gpu.sh: $PY lacks torch/transformers/peft/diffusers (make venv)" >&2; exit 1; }
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "(no CUDA device)")'
for b in flops gpu_train gpu_render; do
  echo "== bench/$b.py"
  "$PY" "bench/$b.py"
done
