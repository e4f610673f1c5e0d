# The Apptainer image (containers/kolora.def). Included from the Makefile; run from the repository root.
#   make container          build containers/kolora.sif (needs apptainer; --fakeroot when not root)
#   make container-test     run the image's %test (tiny CPU pipeline; add APPTAINER_TEST_ARGS=--nv on a GPU node)
#   make container-lock     regenerate containers/requirements.lock (needs the package index)
#   make container-lock-check   check that the lock resolves as pinned for the image's Python
APPTAINER ?= apptainer
CONTAINER_DEF ?= containers/kolora.def
CONTAINER_SIF ?= containers/kolora.sif
APPTAINER_BUILD_ARGS ?=
APPTAINER_TEST_ARGS ?=
# --fakeroot lets an ordinary user build (needs /etc/subuid entries or Apptainer >= 1.1's root-mapped namespace)
CONTAINER_FAKEROOT := $(if $(filter 0,$(shell id -u)),,--fakeroot)
CONTAINER_GIT_SHA := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)$(if $(shell git status --porcelain --untracked-files=no 2>/dev/null),-dirty,)

.PHONY: container container-test container-lock container-lock-check

# a recipe line: stop with a clear message when apptainer is missing
CONTAINER_REQUIRE_APPTAINER = @command -v $(APPTAINER) >/dev/null 2>&1 || { \
	echo "make: '$(APPTAINER)' is not on PATH. Build the image where Apptainer is installed (on most clusters:"; \
	echo "      'module load apptainer'), or set APPTAINER=singularity. See README.md, Containers (Apptainer)."; \
	exit 1; }

$(CONTAINER_SIF): $(CONTAINER_DEF) containers/requirements.lock pyproject.toml $(shell find src configs -type f -not -path '*/__pycache__/*' 2>/dev/null)
	$(CONTAINER_REQUIRE_APPTAINER)
	$(APPTAINER) build $(CONTAINER_FAKEROOT) --force --build-arg GIT_SHA=$(CONTAINER_GIT_SHA) $(APPTAINER_BUILD_ARGS) $@ $(CONTAINER_DEF)
	@sha256sum $@

container: $(CONTAINER_SIF)

container-test:
	$(CONTAINER_REQUIRE_APPTAINER)
	@test -f $(CONTAINER_SIF) || { echo "make: $(CONTAINER_SIF) does not exist: run 'make container' first"; exit 1; }
	$(APPTAINER) test $(APPTAINER_TEST_ARGS) $(CONTAINER_SIF)

container-lock: $(STAMP)
	$(PY) containers/lock.py

container-lock-check: $(STAMP)
	$(PY) containers/lock.py --check
