# shellcheck shell=bash disable=SC2034  # the variables here are used by the scripts that source this file
# Helpers shared by up.sh and down.sh (sourced, not run).

DEVCLUSTER_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$DEVCLUSTER_DIR/../.." && pwd)
CLUSTER=kolora
MARKER=.kolora-devcluster          # file that marks a folder as ours (down.sh --purge only wipes such a folder)
NODE=$(hostname -s)                # the machine's own node: partitions cpu, gpu, gpu-urgent
# The two-node partition `multi`: each node a slurmd of its own in its own UTS namespace (`unshare --uts`), so
# that it, its job steps and their processes see their node's name as hostname, as on separate machines.
NODES=(kolora-1 kolora-2)
# start order; down.sh stops in reverse. slurmd@NAME: node NAME's slurmd.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd slurmd@kolora-1 slurmd@kolora-2)
HOSTS_TAG="# kolora devcluster nodes"  # the /etc/hosts line up.sh adds (when the names do not resolve) and down.sh removes

die() { echo "devcluster: error: $*" >&2; exit 1; }
note() { echo "devcluster: $*" >&2; }

# The state root: $KOLORA_DEVCLUSTER, else .devcluster/ in the checkout. Absolute, and free of characters that
# slurm.conf or env.sh would need quoting for.
resolve_root() {
  local root=${KOLORA_DEVCLUSTER:-$REPO_ROOT/.devcluster}
  [[ $root == /* ]] || root=$PWD/$root
  root=${root%/}
  [[ -n $root && $root =~ ^[A-Za-z0-9._/+,:@-]+$ ]] \
    || die "state folder '$root' must be a path of letters, digits and ._/+,:@- (set KOLORA_DEVCLUSTER)"
  ROOT=$root
  CONF=$ROOT/etc/slurm.conf
}

pidfile_of() {
  case $1 in
    munged) echo "$ROOT/run/munged.pid" ;;
    mariadbd) echo "$ROOT/run/mysqld.pid" ;;
    slurmdbd) echo "$ROOT/run/slurmdbd.pid" ;;
    slurmctld) echo "$ROOT/run/slurmctld.pid" ;;
    slurmd) echo "$ROOT/run/slurmd-$NODE.pid" ;;   # SlurmdPidFile=.../slurmd-%n.pid
    slurmd@*) echo "$ROOT/run/slurmd-${1#slurmd@}.pid" ;;
    *) die "unknown daemon $1" ;;
  esac
}

# proc_alive PID NAME: PID is a live process called NAME. A zombie counts as stopped (PID 1 here reaps late),
# and a PID that was reused by another program does not count.
proc_alive() {
  local stat rest comm
  { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
  comm=${stat#*\(}; comm=${comm%\)*}
  rest=${stat##*\) }
  [[ ${rest%% *} != [ZX] && $comm == "$2" ]]
}

# daemon_pid NAME: print the PID of the running daemon NAME (from its PID file); fail if it is not running.
daemon_pid() {
  local file pid
  file=$(pidfile_of "$1")
  [[ -r $file ]] || return 1
  read -r pid <"$file" 2>/dev/null || return 1
  [[ $pid =~ ^[0-9]+$ ]] && proc_alive "$pid" "${1%%@*}" || return 1
  echo "$pid"
}

# wait_for SECONDS WHAT CMD...: run CMD until it succeeds or SECONDS have passed (a deadline, not a count:
# a failing Slurm client can itself block for seconds).
wait_for() {
  local limit=$1 what=$2 deadline=$((EPOCHSECONDS + $1))
  shift 2
  until "$@" >/dev/null 2>&1; do
    ((EPOCHSECONDS < deadline)) || { note "gave up after ${limit}s waiting for: $what"; return 1; }
    sleep 0.2
  done
}

# Hold $ROOT/.lock for the rest of the script, so that two up/down runs never interleave.
take_lock() {
  exec 9>>"$ROOT/.lock"
  flock -w 120 9 || die "another up.sh/down.sh holds $ROOT/.lock"
}

slurmd_of() { if [[ $1 == "$NODE" ]]; then echo slurmd; else echo "slurmd@$1"; fi; }  # the daemon of node $1

# node_slurmd_argv NODE: NODE_ARGV = the command that starts NODE's slurmd in a UTS namespace of its own, where
# it, its job steps and their processes see `hostname` = NODE as on a machine of its own
node_slurmd_argv() {
  NODE_ARGV=(unshare --uts sh -c \
    'hostname "$1" && exec env KOLORA_DEVCLUSTER_ROOT="$2" KOLORA_DEVCLUSTER_NODE="$1" slurmd -f "$3" -N "$1"' \
    sh "$1" "$ROOT" "$CONF")
}

# remember_node NODE: keep the UTS namespace of NODE's running slurmd, to find the node's processes after it died
remember_node() {
  local pid
  pid=$(daemon_pid "slurmd@$1") && readlink "/proc/$pid/ns/uts" >"$ROOT/run/uts-$1"
}

# node_processes NODE: PIDs of every process in NODE's UTS namespace (its slurmd, its job steps and their
# processes): what dies with the node.
node_processes() {
  local ns proc
  ns=$(cat "$ROOT/run/uts-$1" 2>/dev/null) && [[ -n $ns ]] || return 0
  for proc in /proc/[0-9]*; do
    [[ $(readlink "$proc/ns/uts" 2>/dev/null) == "$ns" ]] && echo "${proc#/proc/}"
  done
  return 0
}
