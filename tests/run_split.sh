#!/usr/bin/env bash
# make test's pytest run: the Slurm tests and the other tests as two pytest processes at once. The Slurm tests
# mostly wait on the dev cluster's queue, so the other tests' CPU work fills that time (one process: ~45 min on
# 2 cores; split: the Slurm tests' length). The Slurm tests stay one after another in their own process: they
# share the cluster's queue, and the preemption tests count on its partitions being theirs.
# The tests on the cluster's two-node partition (-m multinode: nodes kolora-1/2, which the other Slurm tests never
# use) follow the other tests in their process: they fill the time the Slurm tests take beyond those.
# The other tests' report streams; the Slurm tests' report follows when both are done.
# Usage: tests/run_split.sh PYTHON [pytest arguments for both]
set -uo pipefail
py=$1
shift
work=$(mktemp -d "${TMPDIR:-/tmp}/kolora-tests.XXXXXX")
KOLORA_REQUIRE_SLURM=1 "$py" -m pytest -m "slurm and not multinode" --basetemp="$work/slurm" "$@" >"$work/slurm.log" 2>&1 &
slurm=$!
# Ctrl-C or a CI timeout: the Slurm tests' process goes too (its fixtures cancel their jobs)
trap 'kill -TERM "$slurm" 2>/dev/null; wait "$slurm"; exit 130' INT TERM
echo "make test: the Slurm tests run beside these, their report follows (log: $work/slurm.log)"
"$py" -m pytest -m "not slurm" --basetemp="$work/other" "$@"
other=$?
KOLORA_REQUIRE_SLURM=1 "$py" -m pytest -m multinode --basetemp="$work/multinode" "$@"
multinode=$?
wait "$slurm"
slurm_rc=$?
echo
echo "================================ the Slurm tests (pytest -m slurm) ================================"
cat "$work/slurm.log"
echo "make test: tests without Slurm exit $other, two-node Slurm tests exit $multinode, Slurm tests exit $slurm_rc"
if [ "$other" -eq 0 ] && [ "$multinode" -eq 0 ] && [ "$slurm_rc" -eq 0 ]; then
  rm -rf "$work"
  exit 0
fi
echo "make test: failed; the tests' folders are kept in $work"
exit 1
