"""A JobSpec as the local cluster's plan (templates/local/plan.sh.j2): one torchrun agent per simulated node.

The plan is what the supervisor runs (as ``local/plan.json``) and what ``orch render`` shows
(as a shell script that would do the same).
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

from engine.run_contract import ENV_NODE_RANK, ENV_RESTART_COUNT

from ...launch import (base_context, job_environment, preview_run_dir, program_argv, render_template,
                       rendezvous_id, run_dir_placement, side_files, torchrun_options)
from ...spec import JobSpec
from ...types import Placement, Rendered

TEMPLATE = "local/plan.sh.j2"


def placement(spec: JobSpec, run_dir: str | None = None, job_token: str = "") -> Placement:
    """Everything in the run directory; the nodes run this machine's interpreter."""
    return run_dir_placement(spec, run_dir or preview_run_dir(spec), sys.executable, job_token)


@dataclass(frozen=True)
class NodeCommand:
    """One simulated node of the local cluster: a torchrun agent and the env it adds."""

    rank: int
    argv: list[str]
    env: dict[str, str]


# What `orch render --cluster local` shows when the spec fixes no port: the local backend picks a
# free one at submit (and writes the plan it runs, with that port, to the run directory).
PREVIEW_RDZV_PORT = 29500


def local_rdzv_port(spec: JobSpec) -> int | None:
    """The rendezvous port a local job must use (``local.rdzv_port``, else ``rdzv_port``); None: any free one."""
    return spec.local.rdzv_port or spec.rdzv_port


def local_node_commands(spec: JobSpec, placement: Placement, rdzv_port: int) -> list[NodeCommand]:
    """The torchrun agents of a local job. The rendezvous store is hosted by orch's supervisor
    (``is_host=false`` on every agent), so any simulated node can die without taking it along."""
    rdzv_id = rendezvous_id(spec, placement)
    nodes = []
    for rank in range(spec.nodes.max):
        argv = [placement.python, "-m", "torch.distributed.run", *torchrun_options(spec, placement),
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{rdzv_port}", f"--rdzv-id={rdzv_id}",
                "--rdzv-conf=is_host=false,join_timeout=120,last_call_timeout=5,close_timeout=10",
                *program_argv(spec, placement)]
        # torch caches a non-rank-0 node's view of the workers' bootstrap store across rendezvous
        # rounds; after a node loss changes the membership, that view can be stale and the new
        # worker group never forms. Rebuilding it every round avoids that.
        env = {ENV_NODE_RANK: str(rank), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        if spec.gpus_per_node:
            first = rank * spec.gpus_per_node
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(first, first + spec.gpus_per_node))
        nodes.append(NodeCommand(rank, argv, env))
    return nodes


def total_ranks(spec: JobSpec) -> int:
    """Every worker the local job may run at once: all its simulated nodes share this machine."""
    return max(1, spec.nodes.max * spec.procs_per_node)


def threads_per_rank(ranks: int, cpus: int | None = None) -> int:
    """Each worker's intra-op threads when nothing sets ``OMP_NUM_THREADS``: the CPUs this process may
    use (``nproc``: its affinity) shared by ``ranks`` workers, at least one.

    Why: torchrun sets ``OMP_NUM_THREADS=1`` only when it starts several workers per node, so a
    job of several one-worker nodes gave every worker a thread per core. Three such nodes on two
    cores ran three two-thread OpenMP teams that spun against each other: a tiny GPT's step took
    1-6 s instead of 0.1 s. And a node of several workers on a 16-core laptop got torchrun's 1."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, ranks))


def render(spec: JobSpec, placement_: Placement | None = None) -> Rendered:
    """The plan; ``placement_`` defaults to where ``orch render`` shows the files."""
    where = placement_ or placement(spec)
    context = base_context(spec, where)
    port = local_rdzv_port(spec)
    context["rdzv_port"] = port or PREVIEW_RDZV_PORT
    context["port_chosen_at_submit"] = port is None
    context["nodes"] = local_node_commands(spec, where, context["rdzv_port"])
    context["total_ranks"] = total_ranks(spec)
    return Rendered("local", "plan", "plan.sh", render_template(TEMPLATE, context), side_files(spec), where)


def supervisor_plan(spec: JobSpec, placement: Placement) -> dict[str, Any]:
    """What the supervisor runs (``local/plan.json``): the same node commands the plan text shows."""
    port = local_rdzv_port(spec) or PREVIEW_RDZV_PORT
    return {"rdzv_port": port, "elastic": spec.nodes.elastic, "threads_per_rank": threads_per_rank(total_ranks(spec)),
            "env": {**job_environment(spec, placement), ENV_RESTART_COUNT: "0"}, "cwd": str(spec.base_dir),
            "nodes": [asdict(n) for n in local_node_commands(spec, placement, port)]}
