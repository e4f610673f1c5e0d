# Dev Slurm cluster targets; the main Makefile includes this file.
#   make cluster-up       start (or check) the single-machine Slurm; then: source .devcluster/env.sh
#   make cluster-down     stop it, keeping its state (accounting database, job history)
#   make cluster-purge    stop it and delete its state folder
# KOLORA_DEVCLUSTER=<folder> selects another state folder, KOLORA_DEVCLUSTER_GRACE_TIME=<s> the gpu GraceTime.
DEVCLUSTER_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))

.PHONY: cluster-up cluster-down cluster-purge
cluster-up:
	bash $(DEVCLUSTER_DIR)/up.sh

cluster-down:
	bash $(DEVCLUSTER_DIR)/down.sh

cluster-purge:
	bash $(DEVCLUSTER_DIR)/down.sh --purge
