#!/usr/bin/env bash
# local-cluster.sh - a throw-away N-node SLURM cluster plus loopback sshd/pdsh on ONE machine.
#
#   slurm/local-cluster.sh start [N]   # N fake nodes (default 2): nK = 127.0.0.K
#   slurm/local-cluster.sh status      # exit 0 all up, 1 partly up, 3 stopped
#   slurm/local-cluster.sh env         # eval "$(slurm/local-cluster.sh env)"
#   slurm/local-cluster.sh stop
#
# What it gives you, so that both of DeepSpeed's multi-node paths can be tested here:
#   * SLURM: munged, slurmctld and one `slurmd -N nK` per node, node nK reachable at
#     127.0.0.K (the whole 127.0.0.0/8 is loopback on Linux, no interface setup needed).
#   * ssh/pdsh: one sshd listening on 127.0.0.1..N with root key auth, and an ssh client
#     config so that `ssh 127.0.0.2`, `ssh n2` and `pdsh -w 127.0.0.[1-2]` log in without
#     prompts - what DeepSpeed's pdsh launcher and its ssh check need.
#
# Everything lives in $LAB (default /tmp/harness-cluster): configs, keys, logs, spool, state
# and the PID files. `stop` ends only the PIDs recorded there, never anything found by name.
# Outside $LAB it writes $SSH_CLIENT_CONF (ssh reads client config only from fixed places;
# Debian's /etc/ssh/ssh_config includes ssh_config.d/*.conf) and, if absent,
# /etc/pdsh/rcmd_default; `stop` removes both again.
#
# Needs root (daemons run as root, munged as user munge). On a machine without the Debian
# packages it installs them with apt-get (fresh CI machine: ~1 min, then ~5-10 s to start).
set -euo pipefail

LAB=${LAB:-/tmp/harness-cluster}
CTLD_PORT=${CTLD_PORT:-16817}               # slurmctld; distinct from a system SLURM's 6817
SLURMD_BASE_PORT=${SLURMD_BASE_PORT:-17000} # node nK listens on BASE+K (all slurmds share one IP stack)
SSH_PORT=${SSH_PORT:-22}                    # DeepSpeed's pdsh runner assumes the ssh default port
CPUS_PER_NODE=${CPUS_PER_NODE:-2}           # advertised; config_overrides lets it exceed the hardware
SSH_CLIENT_CONF=${SSH_CLIENT_CONF:-/etc/ssh/ssh_config.d/harness-cluster.conf}
PACKAGES=(slurmctld slurmd slurm-client munge openssh-server openssh-client pdsh)

SLURM_CONF_FILE=$LAB/etc/slurm.conf
MUNGE_SOCK=$LAB/munge/run/munge.socket.2
SSHD_PID=$LAB/ssh/sshd.pid
export SLURM_CONF=$SLURM_CONF_FILE

log() { echo "local-cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

# running PID: exists and is not a zombie (a container's PID 1 may reap daemons late)
running() { kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
# alive PIDFILE: true when the file names a running process
alive() { [ -s "$1" ] && running "$(cat "$1")"; }

# every PID file this cluster owns (node count recorded at start)
pid_files() {
  local n i
  n=$(cat "$LAB/nodes" 2>/dev/null || echo 0)
  echo "$LAB/munge/run/munged.pid" "$LAB/run/slurmctld.pid"
  for i in $(seq 1 "$n"); do echo "$LAB/run/slurmd-n$i.pid"; done
  echo "$SSHD_PID"
}

count_alive() { local f c=0; for f in $(pid_files); do alive "$f" && c=$((c+1)); done; echo "$c"; }
count_all()   { pid_files | wc -w; }

# ---------------------------------------------------------------------------------------
install_packages() {
  local missing=0 b
  for b in slurmctld slurmd sbatch scontrol munged munge sshd ssh ssh-keygen pdsh; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing=1
  done
  [ "$missing" = 0 ] && return 0
  command -v apt-get >/dev/null || die "SLURM/munge/sshd/pdsh missing and no apt-get to install ${PACKAGES[*]}"
  log "installing ${PACKAGES[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

# ---------------------------------------------------------------------------------------
start_munge() {
  # munged refuses keys/dirs that others can write, and runs as user munge: own dirs for it.
  install -d -o munge -g munge -m 0700 "$LAB/munge/etc" "$LAB/munge/lib" "$LAB/munge/log"
  install -d -o munge -g munge -m 0755 "$LAB/munge/run"
  if [ ! -s "$LAB/munge/etc/munge.key" ]; then
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile="$LAB/munge/etc/munge.key" --force
    else
      dd if=/dev/urandom of="$LAB/munge/etc/munge.key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$LAB/munge/etc/munge.key"; chmod 0400 "$LAB/munge/etc/munge.key"
  fi
  # own socket, so a system munged (if any) is neither used nor disturbed
  runuser -u munge -- /usr/sbin/munged \
    --key-file="$LAB/munge/etc/munge.key" --socket="$MUNGE_SOCK" \
    --pid-file="$LAB/munge/run/munged.pid" --log-file="$LAB/munge/log/munged.log" \
    --seed-file="$LAB/munge/lib/munged.seed"
  local _; for _ in $(seq 50); do [ -S "$MUNGE_SOCK" ] && break; sleep 0.1; done
  munge -S "$MUNGE_SOCK" -n | unmunge -S "$MUNGE_SOCK" >/dev/null || die "munge round trip failed"
}

# ---------------------------------------------------------------------------------------
write_slurm_conf() {
  local n=$1 host i
  host=$(hostname -s)
  {
    cat <<EOF
# generated by slurm/local-cluster.sh - do not edit, rewritten on every start
ClusterName=harness
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire (default 120 s) is also how long a requeued job must wait before it may start
# again; 10 s keeps preemption/requeue tests short (minimum is 5)
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
# no cgroups and no systemd in containers: track processes by parent chain, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# no slurmdbd: sacct does not work, read job state with 'scontrol show job'
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# a requeued job that becomes eligible is only picked up by a periodic pass (default 60 s / 30 s)
SchedulerParameters=sched_interval=2,bf_interval=2
# trust the node lines below, not the probed hardware (else nodes DRAIN on CPU mismatch)
SlurmdParameters=config_overrides
ReturnToService=2
# short timeouts keep tests fast; MinJobAge keeps finished jobs visible to scontrol for 5 min
KillWait=5
MinJobAge=300
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
# let 'scontrol requeue' / --requeue work and restart requeued jobs quickly
JobRequeue=1
StateSaveLocation=$LAB/state
# %n = node name: every slurmd on this machine needs its own spool, pid and log
SlurmdSpoolDir=$LAB/spool/%n
SlurmctldPidFile=$LAB/run/slurmctld.pid
SlurmdPidFile=$LAB/run/slurmd-%n.pid
SlurmctldLogFile=$LAB/log/slurmctld.log
SlurmdLogFile=$LAB/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
EOF
    for i in $(seq 1 "$n"); do
      # all nodes share the real hostname; NodeAddr + Port tell the slurmds apart
      echo "NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.$i Port=$((SLURMD_BASE_PORT+i)) CPUs=$CPUS_PER_NODE State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
  } > "$SLURM_CONF_FILE"
}

start_slurm() {
  local n=$1 i _
  mkdir -p "$LAB"/{etc,log,run,state}
  for i in $(seq 1 "$n"); do mkdir -p "$LAB/spool/n$i"; done
  write_slurm_conf "$n"
  slurmctld -f "$SLURM_CONF_FILE" -c               # -c: clean state, no jobs from a past run
  for i in $(seq 1 "$n"); do slurmd -f "$SLURM_CONF_FILE" -N "n$i"; done
  # "State=IDLE " (not IDLE+NOT_RESPONDING, not UNKNOWN) = that slurmd has registered
  for _ in $(seq 150); do
    [ "$(scontrol show node -o 2>/dev/null | grep -c 'State=IDLE ')" -eq "$n" ] && return 0
    sleep 0.2
  done
  scontrol show node -o >&2 || true
  die "nodes not IDLE after 30 s (see $LAB/log)"
}

# ---------------------------------------------------------------------------------------
start_sshd() {
  local n=$1 S=$LAB/ssh i addrs="" names="" _
  for i in $(seq 1 "$n"); do addrs+="127.0.0.$i "; names+="n$i "; done
  install -d -m 0700 "$S"
  [ -f "$S/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$S/ssh_host_ed25519_key"
  [ -f "$S/id_ed25519" ]           || ssh-keygen -q -t ed25519 -N '' -f "$S/id_ed25519" -C harness-cluster
  install -m 0600 "$S/id_ed25519.pub" "$S/authorized_keys"
  # one known_hosts line under a fixed alias, valid for every address and any port
  echo "harness-cluster $(cut -d' ' -f1,2 "$S/ssh_host_ed25519_key.pub")" > "$S/known_hosts"

  {
    echo "Port $SSH_PORT"
    for a in $addrs; do echo "ListenAddress $a"; done   # loopback only, never 0.0.0.0
    cat <<EOF
HostKey $S/ssh_host_ed25519_key
PidFile $SSHD_PID
AuthorizedKeysFile $S/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# the key files live under /tmp (mode 1777), which StrictModes would reject
StrictModes no
# DeepSpeed/pdsh open many sessions at once
MaxStartups 100:30:200
MaxSessions 100
UseDNS no
PrintMotd no
EOF
  } > "$S/sshd_config"

  # client side, read by ssh (so by pdsh and by DeepSpeed's ssh check) for these hosts only
  mkdir -p "$(dirname "$SSH_CLIENT_CONF")"
  {
    echo "# generated by slurm/local-cluster.sh (LAB=$LAB); removed by its 'stop'"
    for i in $(seq 1 "$n"); do printf 'Host n%s\n    HostName 127.0.0.%s\n' "$i" "$i"; done
    cat <<EOF
Host $addrs$names
    User root
    Port $SSH_PORT
    IdentityFile $S/id_ed25519
    IdentitiesOnly yes
    HostKeyAlias harness-cluster
    UserKnownHostsFile $S/known_hosts
    StrictHostKeyChecking yes
    BatchMode yes
    GSSAPIAuthentication no
    LogLevel ERROR
EOF
  } > "$SSH_CLIENT_CONF"

  # pdsh defaults to rsh; make plain `pdsh -w ...` use ssh (DeepSpeed sets PDSH_RCMD_TYPE=ssh
  # itself). Only when the machine has no choice of its own; `stop` removes only ours.
  if [ -d /etc/pdsh ] && [ ! -e /etc/pdsh/rcmd_default ]; then
    echo ssh > /etc/pdsh/rcmd_default && echo /etc/pdsh/rcmd_default > "$LAB/ssh/created-rcmd_default"
  fi

  mkdir -p /run/sshd && chmod 0755 /run/sshd   # privilege-separation dir, normally made by systemd
  /usr/sbin/sshd -t -f "$S/sshd_config"
  /usr/sbin/sshd -f "$S/sshd_config" -E "$S/sshd.log" \
    || die "sshd did not start (port $SSH_PORT on 127.0.0.x taken? see $S/sshd.log; try SSH_PORT=...)"
  for _ in $(seq 50); do ssh "127.0.0.$n" true 2>/dev/null && break; sleep 0.1; done
  # Every node answers through pdsh, by address and by slurm node name. Judged by the answers,
  # not by silence: each login runs the machine's shell start-up, which may run `pyenv rehash`;
  # concurrent logins race on its shim folder and print errors that mean nothing about ssh.
  local targets="${addrs// /,}${names// /,}" out missing="" t
  out=$(PDSH_RCMD_TYPE=ssh pdsh -w "${targets%,}" echo harness-ssh-ok 2>"$S/pdsh-check.err") || true
  for t in $addrs$names; do
    grep -qx "$t: harness-ssh-ok" <<<"$out" || missing+=" $t"
  done
  if [ -n "$missing" ]; then
    { echo "$out"; cat "$S/pdsh-check.err"; } >&2
    die "pdsh over ssh failed: no answer from$missing"
  fi
}

# ---------------------------------------------------------------------------------------
cmd_start() {
  local n=${1:-2} t0
  [[ "$n" =~ ^[1-9][0-9]?$ ]] || die "node count must be 1..99, got '$n'"
  [ "$(id -u)" = 0 ] || die "must run as root (daemons, munge user, sshd)"
  if [ -s "$LAB/nodes" ] && [ "$(count_alive)" -gt 0 ]; then
    local have; have=$(cat "$LAB/nodes")
    if [ "$(count_alive)" = "$(count_all)" ]; then
      [ "$have" = "$n" ] || die "already running with $have nodes; stop it first"
      log "already running ($have nodes, LAB=$LAB)"
      return 0
    fi
    log "partly running: restarting everything"
    cmd_stop
  fi
  t0=$(date +%s.%N)
  install_packages
  local t1; t1=$(date +%s.%N)
  mkdir -p "$LAB" && chmod 0755 "$LAB"    # munged checks that parent dirs are not writable by others
  echo "$n" > "$LAB/nodes"
  # a half-started cluster is worse than none: on any failure stop what did start
  trap 'log "start failed; stopping what was started"; cmd_stop' EXIT
  start_munge
  start_slurm "$n"
  start_sshd "$n"
  trap - EXIT
  awk -v a="$t0" -v b="$t1" -v c="$(date +%s.%N)" -v n="$n" -v lab="$LAB" \
    'BEGIN{printf "local-cluster: %d nodes up (install %.1fs, start %.1fs), LAB=%s\n", n, b-a, c-b, lab}' >&2
  sinfo -N >&2
}

cmd_stop() {
  # 1. cancel every job of THIS cluster (its own slurmctld), so no slurmstepd/job is orphaned
  if alive "$LAB/run/slurmctld.pid"; then
    local jobs _
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 100); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
    fi
  fi
  # 2. daemons by PID file: slurmds first (they talk to slurmctld), munged after slurm
  local f pid _
  for f in "$LAB"/run/slurmd-*.pid "$LAB/run/slurmctld.pid" "$LAB/munge/run/munged.pid" "$SSHD_PID"; do
    [ -s "$f" ] || continue
    pid=$(cat "$f")
    if running "$pid"; then
      kill -TERM "$pid"
      for _ in $(seq 100); do running "$pid" || break; sleep 0.1; done
      running "$pid" && kill -KILL "$pid"
      log "stopped $(basename "$f" .pid) ($pid)"
    fi
    rm -f "$f"
  done
  # 3. the ssh client config, only if it is ours
  if [ -f "$SSH_CLIENT_CONF" ] && grep -qF "LAB=$LAB)" "$SSH_CLIENT_CONF"; then
    rm -f "$SSH_CLIENT_CONF"
  fi
  if [ -s "$LAB/ssh/created-rcmd_default" ]; then
    rm -f "$(cat "$LAB/ssh/created-rcmd_default")" "$LAB/ssh/created-rcmd_default"
  fi
  rm -f "$LAB/nodes"
}

cmd_status() {
  local f up
  if [ ! -s "$LAB/nodes" ]; then echo "stopped (LAB=$LAB)"; return 3; fi
  for f in $(pid_files); do
    if alive "$f"; then echo "up    $(basename "$f" .pid) pid $(cat "$f")"; else echo "down  $(basename "$f" .pid)"; fi
  done
  up=$(count_alive)
  if alive "$LAB/run/slurmctld.pid"; then sinfo -N 2>/dev/null || true; fi
  if [ "$up" = "$(count_all)" ]; then return 0; elif [ "$up" = 0 ]; then return 3; else return 1; fi
}

cmd_env() {
  echo "export SLURM_CONF=$SLURM_CONF_FILE"
  echo "export PDSH_RCMD_TYPE=ssh"
}

case "${1:-}" in
  start)  shift; cmd_start "$@" ;;
  stop)   cmd_stop ;;
  status) cmd_status ;;
  env)    cmd_env ;;
  *) echo "usage: $0 start [N] | stop | status | env    (state in LAB=$LAB)" >&2; exit 2 ;;
esac
