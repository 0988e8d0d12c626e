#!/usr/bin/env bash
# Install and start the lab Slurm cluster (../shared/slurm/cluster.sh: slurmctld + 3 slurmd nodes on
# this machine) for the `slurm` test tier; .ci/run calls this before the tests. The tests find the
# running cluster through tests/shared_env.py (SLURM_LAB, default /tmp/orch-slurm) and leave it up.
# Without ../shared/slurm/cluster.sh (a user's clone) this does nothing and the tier skips.
set -euo pipefail
cd "$(dirname "$0")/.."

script=${ORCH_SLURM_CLUSTER_SH:-../shared/slurm/cluster.sh}
if [ ! -f "$script" ]; then
  echo "slurm-up: no $script; the slurm tests will skip (or set ORCH_TEST_SLURM_CONF)"
  exit 0
fi
export SLURM_LAB=${SLURM_LAB:-/tmp/orch-slurm}
export SLURM_CONF=$SLURM_LAB/etc/slurm.conf

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null; then
  echo "slurm-up: installing Slurm (slurmctld, slurmd, slurm-client, munge)"
  bash "$script" install
fi
if [ -f "$SLURM_CONF" ] && timeout 30 scontrol ping 2>/dev/null | grep -q "is UP"; then
  echo "slurm-up: cluster already running ($SLURM_CONF)"
else
  bash "$script" start
fi
sinfo --Node
