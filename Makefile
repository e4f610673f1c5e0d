# kolora — `make demo` and `make test` do all set-up on a fresh machine (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kolora-installed
# torch at the version constraints.txt pins (the one CI tests, and the one the Apptainer image installs): the CPU
# wheel on this kind of machine; on a GPU workstation the same spec from your CUDA index (or PyPI's CUDA wheel).
TORCH_SPEC ?= $(or $(shell grep -m1 -E '^torch==' constraints.txt 2>/dev/null),torch)
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast lint bench clean-runs browser
.DEFAULT_GOAL := demo

# The environment: created when missing, reinstalled only when pyproject.toml or constraints.txt change.
# torch comes first through pip (TORCH_SPEC: pip finds the local CPU wheel, uv would not); the rest through uv
# (the version pinned in constraints.txt), which resolves and installs ~150 packages in seconds where pip takes
# minutes. Plain pip is the fallback when uv cannot be had.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install -q '$(TORCH_SPEC)'
	@if $(PY) -m pip install -q -c constraints.txt uv && \
	    $(VENV)/bin/uv pip install -q --python $(PY) -c constraints.txt -e '.[dev]'; then :; else \
	  echo "uv unavailable or failed: installing with pip"; \
	  $(PY) -m pip install -q -c constraints.txt -e '.[dev]'; fi
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kolora run configs/demo.yaml

# Starts the project's own single-machine Slurm, runs every test, stops it (even when tests fail). A cluster
# that does not come up, or a Slurm test that was skipped, fails the run (KOLORA_REQUIRE_SLURM, tests/conftest.py).
# The Slurm tests and the others run as two pytest processes at once (tests/run_split.sh).
test: $(STAMP) browser
	@if ! $(MAKE) --no-print-directory cluster-up; then \
	   echo "make test: the dev Slurm cluster did not come up (see above)"; \
	   $(MAKE) --no-print-directory cluster-down; exit 1; fi; \
	 $(VENV)/bin/lint-imports && tests/run_split.sh $(PY) $(PYTEST_ARGS); rc=$$?; \
	 $(MAKE) --no-print-directory cluster-down; exit $$rc

# Debian's Chromium for the report's screenshot test (tests/test_report.py), installed when missing (root);
# nothing to do when it is there. `apt-get update` only when the package lists do not know it yet.
BROWSER_PACKAGES := chromium fonts-liberation
browser:
	@command -v chromium >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "make: chromium is missing and there is no apt-get: install Chromium"; exit 1; }; \
	  echo "make: installing $(BROWSER_PACKAGES) (the report's screenshot test)"; \
	  apt-cache show $(BROWSER_PACKAGES) >/dev/null 2>&1 || apt-get update -q >/dev/null; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(BROWSER_PACKAGES) >/dev/null \
	    || { echo "make: apt-get install $(BROWSER_PACKAGES) failed (root needed)"; exit 1; }; \
	  command -v chromium >/dev/null || { echo "make: chromium still missing after apt-get install"; exit 1; }; }

# Tests that need neither Slurm nor much time.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slurm and not slow" $(PYTEST_ARGS)

# ruff, and the package layers (import-linter's contract in pyproject.toml: no package imports one above it)
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/lint-imports

# CPU benchmarks (each prints a table, appends to bench/RESULTS.md, ends with a RESULT line); make bench-gpu for GPUs.
bench: $(STAMP)
	@for b in flops demo filter submit interrupt; do echo "== bench/$$b.py"; $(PY) bench/$$b.py || exit 1; done

clean-runs:
	rm -rf runs .cache/tiny-kolors

-include slurm/devcluster/devcluster.mk
-include containers/container.mk
-include bench/bench.mk
