#!/usr/bin/env bash
# The GPU benches in one command, on a machine with CUDA:
#   bash bench/run_gpu.sh            (or: make bench-gpu)
#   bash bench/run_gpu.sh --check    only set up the imports and print the versions
# gpu_suite first (the `gpu`-marked tests: real CUDA training steps, resume, render, the memory planner against
# the allocator; their rows go to bench/RESULTS.md with the device name), then flops (the floors the GPU numbers
# are compared with), gpu_train and gpu_render. Without CUDA the GPU scripts print "skipped: no CUDA" and exit 0.
# A failing test does not stop the benches: every number is wanted from a lent GPU; the exit status says. PY selects the interpreter (default .venv/bin/python, else
# python3). A GPU image that has torch/transformers/peft but not diffusers (or pydantic, which kolora's modules
# import) needs no network: `make bench-wheels` (anywhere with a package index) puts the missing wheels in
# bench/wheels/, and this script installs them from there into a temporary folder put first on PYTHONPATH.
# kolora itself is taken from src/ when it is not installed. KOLORA_BENCH_WHEELS names another wheel folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[[ -x $PY ]] || PY=$(command -v python3)
NEEDED='import torch, transformers, peft, diffusers, pydantic'
if ! "$PY" -c 'import kolora' 2>/dev/null; then
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "$NEEDED" 2>/dev/null; then
  shopt -s nullglob
  WHEELS=${KOLORA_BENCH_WHEELS:-bench/wheels}
  wheels=("$WHEELS"/*.whl)
  if (( ${#wheels[@]} == 0 )); then
    echo "run_gpu.sh: $PY cannot import torch/transformers/peft/diffusers/pydantic and $WHEELS/ has no wheels;" >&2
    echo "  run 'make bench-wheels' where a package index is reachable and bring bench/wheels/ along" >&2
    exit 1
  fi
  site=$(mktemp -d "${TMPDIR:-/tmp}/kolora-bench-site.XXXXXX")
  trap 'rm -rf "$site"' EXIT
  echo "run_gpu.sh: installing ${#wheels[@]} wheels from $WHEELS into $site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}"
  export PYTHONPATH="$site:$PYTHONPATH"
  "$PY" -c "$NEEDED" || { echo "run_gpu.sh: still missing a module after installing bench/wheels" >&2; exit 1; }
fi
"$PY" -c 'import torch, diffusers, transformers, peft, kolora
print("torch", torch.__version__, "CUDA", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "(no CUDA device)")
print("diffusers", diffusers.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "kolora from", kolora.__file__)'
[[ ${1:-} == --check ]] && exit 0
rc=0
for b in gpu_suite flops gpu_train gpu_render; do
  echo "== bench/$b.py"
  "$PY" "bench/$b.py" || rc=1
done
exit $rc
