#!/usr/bin/env bash
# Start the ssh tier's 3 hosts (tests/clusters/ssh_hosts.sh: network namespaces with their own sshd)
# for the `ssh` test tier; .ci/run calls this before the tests. The tests find them through
# tests/shared_env.py (ORCH_SSH_LAB, default /tmp/orch-ssh) and leave them up.
# Without root this does nothing and the tier skips, saying what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

export ORCH_SSH_LAB=${ORCH_SSH_LAB:-/tmp/orch-ssh}
if [ "$(id -u)" != 0 ]; then
  echo "ssh-up: not root; the ssh tests will skip (they need root for network namespaces and sshd)"
  exit 0
fi
if bash tests/clusters/ssh_hosts.sh status >/dev/null 2>&1; then
  echo "ssh-up: hosts already running ($ORCH_SSH_LAB)"
else
  bash tests/clusters/ssh_hosts.sh stop >/dev/null 2>&1 || true
  bash tests/clusters/ssh_hosts.sh start
fi
bash tests/clusters/ssh_hosts.sh status
