#!/usr/bin/env bash
# Fail and revive a node of the devcluster's `multi` partition, as a machine that dies and comes back:
#   node.sh fail NODE     SIGKILL every process of NODE (its slurmd, job steps and their processes: all that runs
#                         in its UTS namespace), then mark it DOWN as slurmctld would after missed heartbeats
#                         (at once here, not after SlurmdTimeout) and drain it: its jobs end NODE_FAIL, requeueable ones requeue
#   node.sh revive NODE   start NODE's slurmd again; the node stays drained until `scontrol update nodename=NODE
#                         state=resume` (or up.sh, which resumes every down or drained node)
#   node.sh procs NODE    the PIDs and commands still running on NODE besides its slurmd (empty: nothing left)
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
export PATH=$PATH:/usr/sbin:/sbin
resolve_root
export SLURM_CONF=$CONF

usage() { sed -n '2,9s/^# \{0,1\}//p' "$0"; exit 2; }
(($# == 2)) || usage
action=$1 node=$2
[[ " ${NODES[*]} " == *" $node "* ]] || die "no node '$node' here: the multi partition's nodes are ${NODES[*]}"
[[ -e $ROOT/$MARKER ]] || die "no devcluster at $ROOT (make cluster-up)"
take_lock

case $action in
  fail)
    daemon_pid "slurmd@$node" >/dev/null || die "node $node is not running (its slurmd is not up)"
    mapfile -t pids < <(node_processes "$node")
    kill -KILL "${pids[@]}" 2>/dev/null || true
    reason="devcluster: node failed (node.sh fail)"
    timeout 10 scontrol update nodename="$node" state=down reason="$reason" \
      || die "scontrol update nodename=$node state=down failed"
    # and drained, as an admin leaves a failed machine until it is checked: it does not return by itself when its
    # slurmd comes back (ReturnToService=2 would bring back a node that is only DOWN)
    timeout 10 scontrol update nodename="$node" state=drain reason="$reason" \
      || die "scontrol update nodename=$node state=drain failed"
    echo "node $node failed: killed ${#pids[@]} processes, node DOWN and drained"
    ;;
  revive)
    if ! daemon_pid "slurmd@$node" >/dev/null; then
      node_slurmd_argv "$node"
      setsid "${NODE_ARGV[@]}" </dev/null >>"$ROOT/log/slurmd@$node.stdout" 2>&1 9>&- &  # 9: the lock
      wait_for 30 "slurmd of $node" daemon_pid "slurmd@$node" || die "slurmd of $node did not start; see $ROOT/log"
      remember_node "$node"
    fi
    echo "node $node: slurmd running (resume it: scontrol update nodename=$node state=resume)"
    ;;
  procs)
    slurmd=$(daemon_pid "slurmd@$node" || true)
    for pid in $(node_processes "$node"); do
      [[ $pid == "$slurmd" ]] && continue
      printf '%s %s\n' "$pid" "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)"
    done
    ;;
  *) usage ;;
esac
