#!/usr/bin/env bash
# shellcheck disable=SC2034  # LAST_GPU, FIRST_JOB_ID, ... are read by render() through ${!name}
# Start the kolora devcluster: a real Slurm on this machine (munged, MariaDB, slurmdbd, slurmctld, slurmd) with
# partitions cpu, gpu (2 fake GPUs, preemptible) and gpu-urgent on the machine's own node, and `multi`: two more
# nodes, kolora-1 and kolora-2 (1 fake GPU each), each a slurmd in its own UTS namespace. All state lives in one folder:
# $KOLORA_DEVCLUSTER, else .devcluster/ in the checkout. Idempotent: starts only what is not running, and is a
# fast no-op when everything is up. Afterwards `source <state>/env.sh` to use the cluster.
#
# Environment knobs:
#   KOLORA_DEVCLUSTER             state folder (default: <checkout>/.devcluster)
#   KOLORA_DEVCLUSTER_GRACE_TIME  GraceTime of the gpu partition in seconds (default 30); applied to a running
#                                 cluster with `scontrol reconfigure`
#   KOLORA_DEVCLUSTER_PORT_BASE   first of six loopback ports: slurmctld, slurmd, slurmdbd, MariaDB, the slurmd of
#                                 kolora-1 and of kolora-2 (default 6817)
set -euo pipefail
shopt -u patsub_replacement 2>/dev/null || true   # bash 5.2: keep '&' literal in ${var//pattern/replacement}

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

STARTED_AT=$EPOCHSECONDS
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
CPUS=4           # more than this box has: the cpu stage, gpu stage and array tasks must run side by side
GPUS=2
GRACE_TIME=${KOLORA_DEVCLUSTER_GRACE_TIME:-30}
PORT_BASE=${KOLORA_DEVCLUSTER_PORT_BASE:-6817}
[[ $GRACE_TIME =~ ^[0-9]+$ ]] || die "KOLORA_DEVCLUSTER_GRACE_TIME must be whole seconds, got '$GRACE_TIME'"
if ! [[ $PORT_BASE =~ ^[0-9]+$ ]] || ((PORT_BASE < 1024 || PORT_BASE > 65530)); then
  die "KOLORA_DEVCLUSTER_PORT_BASE must be a port in 1024..65530, got '$PORT_BASE'"
fi
CTLD_PORT=$PORT_BASE
SLURMD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2))
DB_PORT=$((PORT_BASE + 3))
PORT_A=$((PORT_BASE + 4))
PORT_B=$((PORT_BASE + 5))
NODE_CPUS=$((CPUS / 2))
LAST_GPU=$((GPUS - 1))
MEMORY_MB=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 }' /proc/meminfo 2>/dev/null || true)
[[ $MEMORY_MB =~ ^[0-9]+$ ]] && ((MEMORY_MB > 0)) || MEMORY_MB=8000

export PATH=$PATH:/usr/sbin:/sbin   # the daemons live in sbin, which a non-login root shell may lack
[[ $(id -u) == 0 ]] || die "run as root (slurmd must start jobs as their users; the daemons run as root here)"
resolve_root
export SLURM_CONF=$CONF

# ---------------------------------------------------------------------------------------------------- packages
missing_commands() {
  local cmd
  for cmd in munged munge unmunge mariadbd mariadb-install-db mariadb mariadb-admin slurmdbd slurmctld slurmd sinfo \
    sacct sacctmgr scontrol; do
    command -v "$cmd" >/dev/null || echo "$cmd"
  done
}
ensure_packages() {
  [[ -z $(missing_commands) ]] && return 0
  command -v apt-get >/dev/null || die "missing $(missing_commands | xargs) and no apt-get: install Slurm, munge and MariaDB"
  note "installing ${PACKAGES[*]} (missing: $(missing_commands | xargs))"
  # `apt-get update` only when the package lists do not know the packages yet
  apt-cache show "${PACKAGES[@]}" >/dev/null 2>&1 || apt-get update -q >/dev/null
  # The packages' own service start is left to policy-rc.d; we start the daemons ourselves below.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null \
    || die "apt-get install ${PACKAGES[*]} failed"
  [[ -z $(missing_commands) ]] || die "still missing after install: $(missing_commands | xargs)"
}
# ---------------------------------------------------------------------------------------------------- config
# render TEMPLATE OUTPUT [MODE]: replace @NAME@ by $NAME; write only when the text changes (CHANGED=true then)
render() {
  local template=$1 out=$2 mode=${3:-644} text name
  CHANGED=false
  text=$(<"$DEVCLUSTER_DIR/$template")
  for name in ROOT NODE CLUSTER CTLD_PORT SLURMD_PORT DBD_PORT DB_PORT DB_PASS FIRST_JOB_ID CPUS GPUS LAST_GPU \
    MEMORY_MB GRACE_TIME PORT_A PORT_B NODE_CPUS; do
    text=${text//@$name@/"${!name}"}
  done
  [[ $text =~ @[A-Z_]+@ ]] && die "$template: no value for ${BASH_REMATCH[0]}"
  if [[ -f $out ]] && [[ $(<"$out") == "$text" ]]; then return 0; fi
  (umask 077 && printf '%s\n' "$text" >"$out.tmp")
  chmod "$mode" "$out.tmp"
  mv -f "$out.tmp" "$out"
  CHANGED=true
}

port_free() {  # nothing listens on 127.0.0.1:$1
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}
log_tail() { if [[ -f $1 ]]; then tail -n 15 "$1" | sed 's/^/    /' >&2; fi; }

# start_daemon NAME LOG CMD...: run CMD (which daemonizes, or is put in the background) detached from this
# shell, then wait until the PID file names a live NAME.
start_daemon() {
  local name=$1 log=$2
  shift 2
  # 9>&-: the daemon must not inherit (and so keep holding) the lock on $ROOT/.lock
  setsid "$@" </dev/null >>"$ROOT/log/$name.stdout" 2>&1 9>&- &
  if ! wait_for 30 "$name to write $(pidfile_of "$name")" daemon_pid "$name"; then
    log_tail "$log"
    die "$name did not start; log: $log"
  fi
}

node_state() {  # node $1's state as sinfo reports it, without the flags suffix (*~#!%$@^-)
  local state
  state=$(timeout 10 sinfo -h -N -n "$1" -o %T 2>/dev/null | head -n 1) || return 1
  echo "${state%%[*~#!%\$@^-]*}"
}
node_usable() { [[ $(node_state "$1") =~ ^(idle|mixed|allocated|completing)$ ]]; }
all_nodes_usable() { local n; for n in "$NODE" "${NODES[@]}"; do node_usable "$n" || return 1; done; }

summary() {
  echo "devcluster $1 in $((EPOCHSECONDS - STARTED_AT))s: cluster $CLUSTER, node $NODE ($CPUS CPUs, $GPUS fake GPUs)," \
    "partitions cpu (default) gpu (GraceTime ${GRACE_TIME}s) gpu-urgent; nodes ${NODES[*]} ($NODE_CPUS CPUs, 1 fake" \
    "GPU each), partition multi; ports $CTLD_PORT-$PORT_B on 127.0.0.1; use: source $ROOT/env.sh"
}

write_env() {
  printf 'export SLURM_CONF=%s\nexport KOLORA_DEVCLUSTER=%s\n' "$CONF" "$ROOT" >"$ROOT/env.sh.tmp"
  mv -f "$ROOT/env.sh.tmp" "$ROOT/env.sh"
}

# ---------------------------------------------------------------------------------------------------- state root
if [[ -d $ROOT && ! -e $ROOT/$MARKER && -n $(ls -A "$ROOT") ]]; then
  die "$ROOT exists, is not empty and is not a devcluster folder (no $MARKER): choose another KOLORA_DEVCLUSTER"
fi
mkdir -p "$ROOT"
take_lock
ensure_packages
touch "$ROOT/$MARKER"
mkdir -p "$ROOT"/{etc,run,log,state/ctld,mysql/data,fakedev,munge}
for n in "$NODE" "${NODES[@]}"; do mkdir -p "$ROOT/state/d-$n"; done   # SlurmdSpoolDir=.../d-%n
chmod 755 "$ROOT/munge"   # munged refuses a socket folder others cannot reach
for ((i = 0; i < GPUS; i++)); do ln -sfn /dev/null "$ROOT/fakedev/nvidia$i"; done   # gres File= must be a device

if [[ ! -s $ROOT/munge/munge.key ]]; then
  (umask 077 && head -c 1024 /dev/urandom >"$ROOT/munge/munge.key")
fi
chmod 600 "$ROOT/munge/munge.key"
if [[ ! -s $ROOT/etc/db.pass ]]; then
  (umask 077 && od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$ROOT/etc/db.pass")   # 32 hex digits
fi
DB_PASS=$(<"$ROOT/etc/db.pass")

# FirstJobId: seconds-based and new at every slurmctld start, so that job ids (and submitit's job folders) never
# repeat after a --purge; Slurm keeps counting up from its saved state otherwise. A running slurmctld keeps its own.
if daemon_pid slurmctld >/dev/null && [[ $(<"$CONF") =~ FirstJobId=([0-9]+) ]]; then
  FIRST_JOB_ID=${BASH_REMATCH[1]}
else
  FIRST_JOB_ID=$((EPOCHSECONDS % 60000000 + 1000))   # stays below Slurm's MaxJobId (67043328)
fi

render my.cnf.in "$ROOT/etc/my.cnf"
render gres.conf.in "$ROOT/etc/gres.conf"
render slurmdbd.conf.in "$ROOT/etc/slurmdbd.conf" 600
render slurm.conf.in "$CONF"
CONF_CHANGED=$CHANGED

# ---------------------------------------------------------------------------------------------------- fast path
all_running() { local d; for d in "${DAEMONS[@]}"; do daemon_pid "$d" >/dev/null || return 1; done; }
if all_running && ! $CONF_CHANGED && all_nodes_usable; then
  [[ -f $ROOT/env.sh ]] || write_env
  for n in "${NODES[@]}"; do remember_node "$n"; done
  summary "already up"
  exit 0
fi

# Before starting anything: the ports of the daemons that are not running yet must be free.
for daemon_port in mariadbd:$DB_PORT slurmdbd:$DBD_PORT slurmctld:$CTLD_PORT slurmd:$SLURMD_PORT \
  "slurmd@${NODES[0]}:$PORT_A" "slurmd@${NODES[1]}:$PORT_B"; do
  daemon_pid "${daemon_port%:*}" >/dev/null || port_free "${daemon_port#*:}" \
    || die "port 127.0.0.1:${daemon_port#*:} for ${daemon_port%:*} is taken (another devcluster? set KOLORA_DEVCLUSTER_PORT_BASE)"
done

# ---------------------------------------------------------------------------------------------------- munged
if ! daemon_pid munged >/dev/null; then
  start_daemon munged "$ROOT/log/munged.log" munged --socket="$ROOT/munge/munge.sock" \
    --key-file="$ROOT/munge/munge.key" --pid-file="$(pidfile_of munged)" --log-file="$ROOT/log/munged.log" \
    --seed-file="$ROOT/munge/munged.seed" --force
fi
munge_works() { munge -n -S "$ROOT/munge/munge.sock" | unmunge -S "$ROOT/munge/munge.sock"; }
wait_for 10 "munge to answer on $ROOT/munge/munge.sock" munge_works || { log_tail "$ROOT/log/munged.log"; die "munged"; }

# ---------------------------------------------------------------------------------------------------- MariaDB
MYCNF=$ROOT/etc/my.cnf
if [[ ! -d $ROOT/mysql/data/mysql ]]; then
  mariadb-install-db --defaults-file="$MYCNF" --skip-test-db --auth-root-authentication-method=socket \
    >"$ROOT/log/mysql-install.log" 2>&1 || { log_tail "$ROOT/log/mysql-install.log"; die "mariadb-install-db failed"; }
fi
if ! daemon_pid mariadbd >/dev/null; then
  start_daemon mariadbd "$ROOT/log/mysqld.log" mariadbd --defaults-file="$MYCNF"
fi
wait_for 60 "MariaDB to answer" mariadb-admin --defaults-file="$MYCNF" ping \
  || { log_tail "$ROOT/log/mysqld.log"; die "MariaDB does not answer"; }
mariadb --defaults-file="$MYCNF" <<SQL || die "could not create the accounting database"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL

# ---------------------------------------------------------------------------------------------------- slurmdbd
if ! daemon_pid slurmdbd >/dev/null; then
  start_daemon slurmdbd "$ROOT/log/slurmdbd.log" slurmdbd   # reads dirname($SLURM_CONF)/slurmdbd.conf
fi
wait_for 60 "slurmdbd to answer sacctmgr" timeout 10 sacctmgr -n -P show cluster format=cluster \
  || { log_tail "$ROOT/log/slurmdbd.log"; die "slurmdbd does not answer"; }
if ! timeout 10 sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
  timeout 20 sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
fi

# ---------------------------------------------------------------------------------------------------- slurmctld, slurmd
if ! daemon_pid slurmctld >/dev/null; then
  start_daemon slurmctld "$ROOT/log/slurmctld.log" slurmctld -f "$CONF"
elif $CONF_CHANGED; then
  note "slurm.conf changed: scontrol reconfigure"
  timeout 20 scontrol reconfigure || die "scontrol reconfigure failed; see $ROOT/log/slurmctld.log"
fi
wait_for 30 "slurmctld to answer" timeout 10 scontrol ping || { log_tail "$ROOT/log/slurmctld.log"; die "slurmctld"; }
if ! daemon_pid slurmd >/dev/null; then
  # the marker lets down.sh find this cluster's slurmstepd processes, which inherit slurmd's environment
  start_daemon slurmd "$ROOT/log/slurmd-$NODE.log" env KOLORA_DEVCLUSTER_ROOT="$ROOT" slurmd -f "$CONF"
fi
# The multi-node partition's names resolve (a job's rendezvous host is the first node of its list); both are this
# machine's loopback. The line is added only when a name does not resolve yet, and down.sh removes it.
if ! getent hosts "${NODES[@]}" >/dev/null || [[ $(getent hosts "${NODES[@]}" | wc -l) != "${#NODES[@]}" ]]; then
  grep -qF "$HOSTS_TAG" /etc/hosts 2>/dev/null \
    || printf '127.0.0.1 %s %s\n' "${NODES[*]}" "$HOSTS_TAG" >>/etc/hosts \
    || die "cannot add ${NODES[*]} to /etc/hosts (root needed)"
fi
for n in "${NODES[@]}"; do
  if ! daemon_pid "slurmd@$n" >/dev/null; then
    node_slurmd_argv "$n"
    start_daemon "slurmd@$n" "$ROOT/log/slurmd-$n.log" "${NODE_ARGV[@]}"
  fi
  remember_node "$n"
done

# A node left DRAIN by an earlier run (e.g. a bad gres config), or DOWN (a node failed on purpose by node.sh), stays
# so across restarts: resume it once.
for n in "$NODE" "${NODES[@]}"; do
  deadline=$((EPOCHSECONDS + 30))
  resumed=false
  until node_usable "$n"; do
    state=$(node_state "$n" || true)
    if [[ $state =~ drain|down && $resumed == false ]] && daemon_pid "$(slurmd_of "$n")" >/dev/null; then
      note "node $n is $state: resuming it"
      timeout 10 scontrol update nodename="$n" state=resume || true
      resumed=true
    fi
    if ((EPOCHSECONDS >= deadline)); then
      log_tail "$ROOT/log/slurmd-$n.log"
      die "node $n is '${state:-unknown}' after 30s, not idle; logs in $ROOT/log"
    fi
    sleep 0.2
  done
done
wait_for 30 "sacct to answer" timeout 10 sacct -n -X --starttime=now || die "sacct does not answer"

write_env
summary "up"
