#!/usr/bin/env bash
# The `ssh` tier's own cluster: 3 bare "machines" on this one, reachable only over real OpenSSH.
#
#   tests/clusters/ssh_hosts.sh start        # bridge + 3 network namespaces, each with its own sshd
#   tests/clusters/ssh_hosts.sh stop         # every process of the hosts, the namespaces, the bridge
#   tests/clusters/ssh_hosts.sh kill HOST    # a host dies: SIGKILL every process in it, then its link goes down
#   tests/clusters/ssh_hosts.sh revive HOST  # a killed host boots again: link up, its sshd started
#   tests/clusters/ssh_hosts.sh pids HOST    # the pids of the processes running on HOST (one a line)
#   tests/clusters/ssh_hosts.sh status       # which hosts answer over ssh
#
# Each host is a network namespace (orchssh-<host>) with its own address on a private bridge
# (only the addresses below, which this script creates and removes), its own UTS hostname
# (`hostname` on it prints orch-h1 ...), its own /etc/hosts naming the 3 hosts and its own
# /etc/resolv.conf (`ip netns exec` bind-mounts /etc/netns/<ns>/*), and Debian's openssh-server
# sshd on port 22. The private network has no DNS server, so the resolver there answers "no" at
# once for a name or address outside the hosts file, as a cluster's DNS does; with the machine's
# own resolv.conf (a server the namespaces cannot reach) each such lookup waited out the resolver's
# timeouts, 10 s, and c10d's TCPStore makes one (of the peer's ::ffff:10.213.77.x address) for
# every connection on both ends: 30-40 s of every job's start. Host keys and
# the client key are generated on every start; the client side gets $LAB/ssh_config (aliases,
# identity, BatchMode) and $LAB/known_hosts, so `ssh -F $LAB/ssh_config orch-h1 hostname` works.
# The namespaces share the filesystem, so the hosts run this checkout's .venv python and orch.
#
# Needs root (namespaces, a bridge, sshd). Environment:
#   ORCH_SSH_LAB     state: keys, configs, sshd logs (default /tmp/orch-ssh)
#   ORCH_SSH_SUBNET  first three octets of the private /24 (default 10.213.77)
set -euo pipefail

LAB=${ORCH_SSH_LAB:-/tmp/orch-ssh}
SUBNET=${ORCH_SSH_SUBNET:-10.213.77}
HOSTS="orch-h1 orch-h2 orch-h3"
BRIDGE=orchsshbr0
GATEWAY=$SUBNET.1
RESOLV_MARK="orch ssh lab resolver"

log() { echo "ssh_hosts: $*" >&2; }
ns_of() { echo "orchssh-${1#orch-}"; }
veth_of() { echo "orchssh-${1#orch-}"; }
addr_of() { local n=${1#orch-h}; echo "$SUBNET.$((10 + n))"; }
known_host() { case " $HOSTS " in *" $1 "*) return 0 ;; esac; log "unknown host '$1' (hosts: $HOSTS)"; exit 2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    log "needs root (network namespaces, a bridge, sshd on port 22); run it as root or skip the ssh tier"
    exit 77
  fi
}

install_sshd() {
  [ -x /usr/sbin/sshd ] && return 0
  log "installing openssh-server"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server >/dev/null \
    || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server >/dev/null; }
  # the package's own service is not ours to run
  command -v systemctl >/dev/null && systemctl disable --now ssh >/dev/null 2>&1 || true
}

check_subnet_free() {
  if ip -o addr show | grep -v " $BRIDGE " | grep -q " inet $SUBNET\."; then
    log "$SUBNET.0/24 is already used on this machine; set ORCH_SSH_SUBNET to a free private /24"
    exit 2
  fi
}

make_keys() {
  rm -rf "$LAB"; mkdir -p "$LAB"; chmod 700 "$LAB"
  ssh-keygen -q -t ed25519 -N "" -C "orch-ssh-lab client" -f "$LAB/id_ed25519"
  cp "$LAB/id_ed25519.pub" "$LAB/authorized_keys"
  : > "$LAB/known_hosts"
  for h in $HOSTS; do
    mkdir -p "$LAB/$h"
    ssh-keygen -q -t ed25519 -N "" -C "$h" -f "$LAB/$h/ssh_host_ed25519_key"
    echo "$h,$(addr_of "$h") $(cut -d' ' -f1,2 "$LAB/$h/ssh_host_ed25519_key.pub")" >> "$LAB/known_hosts"
  done
}

write_client_config() {
  {
    for h in $HOSTS; do printf 'Host %s\n  HostName %s\n' "$h" "$(addr_of "$h")"; done
    cat <<EOF
Host *
  User root
  IdentityFile $LAB/id_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile $LAB/known_hosts
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  BatchMode yes
  ConnectTimeout 5
  LogLevel ERROR
EOF
  } > "$LAB/ssh_config"
}

write_host_config() {
  local h=$1 ns
  ns=$(ns_of "$h")
  mkdir -p "/etc/netns/$ns"
  {
    echo "127.0.0.1 localhost"
    for other in $HOSTS; do echo "$(addr_of "$other") $other"; done
  } > "/etc/netns/$ns/hosts"
  {
    echo "# $RESOLV_MARK: no DNS server on this network; nothing listens on port 53 here, so a"
    echo "# lookup beyond /etc/hosts fails at once instead of timing out"
    echo "nameserver 127.0.0.1"
  } > "/etc/netns/$ns/resolv.conf"
  cat > "$LAB/$h/sshd_config" <<EOF
Port 22
ListenAddress $(addr_of "$h")
HostKey $LAB/$h/ssh_host_ed25519_key
PidFile $LAB/$h/sshd.pid
AuthorizedKeysFile $LAB/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxStartups 64:30:128
MaxSessions 64
LogLevel INFO
EOF
}

start_network() {
  ip link add "$BRIDGE" type bridge
  ip addr add "$GATEWAY/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for h in $HOSTS; do
    local ns veth
    ns=$(ns_of "$h"); veth=$(veth_of "$h")
    ip netns add "$ns"
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$(addr_of "$h")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$GATEWAY"
  done
}

start_sshd() {
  local h=$1 ns
  ns=$(ns_of "$h")
  mkdir -p /run/sshd
  # unshare --uts: the host's own hostname, inherited by everything its sshd starts
  ip netns exec "$ns" unshare --uts sh -c 'hostname "$1" && exec /usr/sbin/sshd -f "$2" -E "$3"' \
    sshd-start "$h" "$LAB/$h/sshd_config" "$LAB/$h/sshd.log"
}

wait_ready() {
  local h=$1
  for _ in $(seq 1 100); do
    if [ "$(ssh -F "$LAB/ssh_config" "$h" hostname 2>/dev/null)" = "$h" ]; then return 0; fi
    sleep 0.1
  done
  log "$h: sshd does not answer; see $LAB/$h/sshd.log"
  return 1
}

cmd_start() {
  need_root
  install_sshd
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    log "already running (stop it first): $LAB"
    cmd_status && return 0
    return 1
  fi
  check_subnet_free
  make_keys
  write_client_config
  for h in $HOSTS; do write_host_config "$h"; done
  start_network
  for h in $HOSTS; do start_sshd "$h"; done
  for h in $HOSTS; do wait_ready "$h"; done
  log "up: $HOSTS (ssh -F $LAB/ssh_config HOST)"
}

kill_host_processes() {
  local ns=$1 pids
  pids=$(ip netns pids "$ns" 2>/dev/null || true)
  [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
}

cmd_stop() {
  need_root
  for h in $HOSTS; do
    local ns
    ns=$(ns_of "$h")
    kill_host_processes "$ns"
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "/etc/netns/$ns"
    ip link del "$(veth_of "$h")" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  log "stopped"
}

cmd_kill() {
  need_root
  local h=${1:?usage: ssh_hosts.sh kill HOST}
  known_host "$h"
  local ns
  ns=$(ns_of "$h")
  kill_host_processes "$ns"
  sleep 0.2
  kill_host_processes "$ns"   # anything forked while the first round was delivered
  ip link set "$(veth_of "$h")" down 2>/dev/null || true
  log "$h is dead"
}

cmd_revive() {
  need_root
  local h=${1:?usage: ssh_hosts.sh revive HOST}
  known_host "$h"
  kill_host_processes "$(ns_of "$h")"
  write_host_config "$h"   # as `start` writes it (a host an older version of this script started gets it too)
  ip link set "$(veth_of "$h")" up
  start_sshd "$h"
  wait_ready "$h"
  log "$h is up again"
}

cmd_pids() {
  local h=${1:?usage: ssh_hosts.sh pids HOST}
  known_host "$h"
  ip netns pids "$(ns_of "$h")"
}

cmd_status() {
  local rc=0 seen
  for h in $HOSTS; do
    # up: answers over ssh with its own hostname, and runs with the resolver this script gives it
    seen=$(ssh -F "$LAB/ssh_config" -o ConnectTimeout=2 "$h" \
      "hostname; grep -qF '$RESOLV_MARK' /etc/resolv.conf && echo lab-resolver" 2>/dev/null || true)
    if [ "$seen" = "$h"$'\n'"lab-resolver" ]; then
      echo "$h $(addr_of "$h") up"
    elif [ "${seen%%$'\n'*}" = "$h" ]; then
      echo "$h $(addr_of "$h") stale (started without the lab's resolv.conf; revive it)"; rc=1
    else
      echo "$h $(addr_of "$h") down"; rc=1
    fi
  done
  return $rc
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  kill) cmd_kill "${2:-}" ;;
  revive) cmd_revive "${2:-}" ;;
  pids) cmd_pids "${2:-}" ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|kill HOST|revive HOST|pids HOST|status" >&2; exit 2 ;;
esac
