"""How many CPU threads the host optimizer of ``offload_optimizer`` gets.

The offloaded step (fused CPU AdamW over the rank's fp32 partition) is memory-bound work that
scales with threads. torchrun sets ``OMP_NUM_THREADS=1`` for every worker when it starts more
than one per node (to keep N ranks from oversubscribing the cores), which leaves a rank's host
step on one core while the others idle: at 8 ranks on a 64-core node, 1/8 of the machine. The
rule, applied once per process when an optimizer is offloaded:

* ``ORCH_HOST_OPTIMIZER_THREADS`` wins when set (orch's own knob, for a user who wants 1 even
  under torchrun);
* an ``OMP_NUM_THREADS`` other than torchrun's ``1`` is the user's choice and is kept;
* otherwise (unset, or ``1`` set under a launcher that sets ``LOCAL_WORLD_SIZE``) the rank takes
  its share of the node's physical cores: ``cores // local ranks`` (at least 1), where cores are
  those this process may run on (CPU affinity, a cgroup CPU quota) without SMT siblings.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

from ..log import get_logger

__all__ = ["THREADS_ENV", "apply_host_optimizer_threads", "host_optimizer_threads", "physical_cores"]

THREADS_ENV = "ORCH_HOST_OPTIMIZER_THREADS"
log = get_logger(__name__)
_applied: Optional[int] = None


def host_optimizer_threads(env: Mapping[str, str], cores: int, local_ranks: int) -> tuple[int, str]:
    """``(threads, why)`` by the rule in the module docstring."""
    own = env.get(THREADS_ENV, "").strip()
    if own:
        return max(1, int(own)), f"{THREADS_ENV}={own}"
    omp = env.get("OMP_NUM_THREADS", "").strip()
    launched = "LOCAL_WORLD_SIZE" in env
    if omp and not (omp == "1" and launched):
        return max(1, int(omp)), f"OMP_NUM_THREADS={omp} (set by the user)"
    share = max(1, cores // max(1, local_ranks))
    before = "torchrun's OMP_NUM_THREADS=1" if omp else "OMP_NUM_THREADS unset"
    return share, f"{cores} physical cores / {local_ranks} local ranks ({before})"


def physical_cores() -> int:
    """Cores this process may use: its CPU affinity, without SMT siblings, within a cgroup quota."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:      # not Linux
        allowed = list(range(os.cpu_count() or 1))
    cores: set[str] = set()
    for cpu in allowed:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    count = len(cores) or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(count, quota)) if quota else count


def _cgroup_cpu_quota() -> Optional[int]:
    """Whole CPUs of a cgroup v2 ``cpu.max`` limit (a Kubernetes CPU limit), None without one."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, int(quota) // max(1, int(period)))


def apply_host_optimizer_threads(env: Optional[Mapping[str, str]] = None, rank: int = 0) -> int:
    """Set torch's intra-op threads for the host optimizer (once per process); rank 0 logs why."""
    global _applied
    import torch

    env = os.environ if env is None else env
    local = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    threads, why = host_optimizer_threads(env, physical_cores(), local)
    if _applied != threads:
        torch.set_num_threads(threads)
        if rank == 0 and _applied is None:
            log.info(f"offload: host optimizer on {threads} thread(s) per rank: {why}")
        _applied = threads
    return threads
