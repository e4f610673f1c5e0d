# Benchmark targets; the main Makefile includes this file (-include bench/bench.mk).
#   make bench-gpu     flops + gpu_train + gpu_render (bench/run_gpu.sh); "skipped: no CUDA" without a GPU
#   make bench-wheels  download what a bare GPU image lacks (bench/gpu-wheels.txt, versions from
#                      constraints.txt) into bench/wheels/, for run_gpu.sh to install offline.
#                      GPU_PYTHON=3.12 is the GPU machine's Python version (default: 3.12)
BENCH_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
GPU_PYTHON ?= 3.12

.PHONY: bench-gpu bench-wheels
bench-gpu: $(STAMP)
	PY=$(or $(PY),.venv/bin/python) bash $(BENCH_DIR)/run_gpu.sh

bench-wheels: $(STAMP)
	.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -c constraints.txt -r $(BENCH_DIR)/gpu-wheels.txt -d $(BENCH_DIR)/wheels
	@ls $(BENCH_DIR)/wheels
