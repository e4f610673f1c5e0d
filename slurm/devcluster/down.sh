#!/usr/bin/env bash
# Stop the kolora devcluster started by up.sh: cancel its jobs, then stop slurmd, slurmctld, slurmdbd, MariaDB and
# munged by their PID files (TERM, wait, KILL). Idempotent. The state folder (accounting database, job history,
# munge key) is kept for the next up.sh unless --purge is given, which deletes it.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PURGE=false
for arg in "$@"; do
  case $arg in
    --purge) PURGE=true ;;
    -h | --help) sed -n '2,4s/^# \{0,1\}//p' "$0"; echo "usage: $0 [--purge]"; exit 0 ;;
    *) die "unknown argument '$arg' (usage: $0 [--purge])" ;;
  esac
done

export PATH=$PATH:/usr/sbin:/sbin
resolve_root
STARTED_AT=$EPOCHSECONDS
if [[ ! -d $ROOT ]]; then
  echo "devcluster down: nothing at $ROOT"
  exit 0
fi
[[ -e $ROOT/$MARKER ]] || die "$ROOT is not a devcluster folder (no $MARKER); not touching it"
take_lock
export SLURM_CONF=$CONF

# stop_pid PID NAME SECONDS: TERM, wait up to SECONDS for it to end (a zombie counts as ended), then KILL.
stop_pid() {
  local pid=$1 name=$2 deadline=$((EPOCHSECONDS + $3))
  kill -TERM "$pid" 2>/dev/null || return 0
  while proc_alive "$pid" "$name"; do
    if ((EPOCHSECONDS >= deadline)); then
      note "$name (pid $pid) ignored SIGTERM for $3s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      deadline=$((EPOCHSECONDS + 10))
      while proc_alive "$pid" "$name"; do
        ((EPOCHSECONDS < deadline)) || die "$name (pid $pid) survived SIGKILL"
        sleep 0.1
      done
      return 0
    fi
    sleep 0.1
  done
}

# env.sh exists only while the cluster is up: tests and tools that look for it then skip at once.
rm -f "$ROOT/env.sh"

# 1. Jobs: cancel them through Slurm while it still runs, so they end CANCELLED in sacct and leave no processes.
if daemon_pid slurmctld >/dev/null && daemon_pid slurmd >/dev/null; then
  jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u | xargs) || jobs=
  if [[ -n $jobs ]]; then
    note "cancelling jobs: $jobs"
    # shellcheck disable=SC2086  # one argument per job id
    timeout 10 scancel $jobs 2>/dev/null || true
    no_running_jobs() { [[ -z $(timeout 10 squeue -h -t running,completing,configuring -o %A 2>/dev/null) ]]; }
    wait_for 30 "cancelled jobs to end" no_running_jobs || note "jobs still running; their processes are killed below"
  fi
fi

# 2. Daemons, in reverse start order.
stopped=()
for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
  name=${DAEMONS[i]}
  if pid=$(daemon_pid "$name"); then
    timeout_s=15
    [[ $name == mariadbd ]] && timeout_s=60   # a clean InnoDB shutdown can take a while
    stop_pid "$pid" "$name" "$timeout_s"
    stopped+=("$name")
  fi
  rm -f "$(pidfile_of "$name")"
done

# 3. Job steps that outlived slurmd (it was not running, or a job ignored scancel): slurmstepd processes carry
#    KOLORA_DEVCLUSTER_ROOT=$ROOT from slurmd's environment (set by up.sh). Their job processes go with them.
for environ in /proc/[0-9]*/environ; do
  pid=${environ#/proc/}
  pid=${pid%/environ}
  proc_alive "$pid" slurmstepd || continue
  tr '\0' '\n' <"$environ" 2>/dev/null | grep -qxF "KOLORA_DEVCLUSTER_ROOT=$ROOT" || continue
  note "stopping leftover slurmstepd (pid $pid)"
  stop_pid "$pid" slurmstepd 10
  stopped+=("slurmstepd:$pid")
done

# 4. The node names up.sh added to /etc/hosts (written in place: the file may be a bind mount)
if grep -qF "$HOSTS_TAG" /etc/hosts 2>/dev/null; then
  kept=$(grep -vF "$HOSTS_TAG" /etc/hosts)
  printf '%s\n' "$kept" >/etc/hosts || note "could not remove the ${NODES[*]} line from /etc/hosts"
fi

if $PURGE; then
  rm -rf -- "$ROOT"
  echo "devcluster down and purged in $((EPOCHSECONDS - STARTED_AT))s: removed $ROOT"
else
  echo "devcluster down in $((EPOCHSECONDS - STARTED_AT))s: stopped ${stopped[*]:-nothing (was not running)};" \
    "state kept in $ROOT (down.sh --purge wipes it)"
fi
