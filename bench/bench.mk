# Benchmark targets; the main Makefile includes this file (-include bench/bench.mk).
#   make bench-gpu     flops + gpu_train + gpu_render (bench/run_gpu.sh); "skipped: no CUDA" without a GPU
BENCH_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))

.PHONY: bench-gpu
bench-gpu: $(STAMP)
	PY=$(or $(PY),.venv/bin/python) bash $(BENCH_DIR)/run_gpu.sh
