"""A JobSpec as an ssh plan (templates/ssh/plan.sh.j2): one ssh call per host of the hostfile,
each starting orch's host agent with that host's torchrun elastic agent.

``orch render --cluster ssh`` shows the plan as the shell script that would do the same; a submit
writes it to ``<run dir>/ssh/plan.json`` for the supervisor, with the rendezvous address found by
the preflight (the first host's ``hostname -I``, as DeepSpeed picks its master address).
"""
from __future__ import annotations

import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

from ...errors import UserError
from ...launch import (base_context, job_environment, preview_run_dir, program_argv, render_template,
                       rendezvous_id, run_dir_placement, side_files, torchrun_options)
from ...spec import JobSpec
from ...types import Placement, Rendered
from .dsenv import deepspeed_env
from .hostfile import Host, read_hostfile, select_hosts
from .remote import remote_command, ssh_argv

TEMPLATE = "ssh/plan.sh.j2"
# a lost host counts as gone after 3 missed 3 s heartbeats (torch: 5 s x 3)
RDZV_CONF = ("join_timeout=120,last_call_timeout=5,close_timeout=10,"
             "keep_alive_interval=3,keep_alive_max_attempt=3")


@dataclass(frozen=True)
class HostPlan:
    """What runs on one host: its torchrun agent, the env it gets, and the ssh call that starts it."""

    rank: int
    host: str
    slots: tuple[int, ...]
    env: dict[str, str]
    torchrun: list[str]
    remote: str
    argv: list[str]


def python_of(spec: JobSpec) -> str:
    """ssh.python, else the spec's python, else this interpreter's path (what DeepSpeed's launcher runs)."""
    return spec.ssh.python or spec.python or sys.executable


def workdir_of(spec: JobSpec) -> str:
    return spec.ssh.workdir or str(spec.base_dir)


def placement(spec: JobSpec, run_dir: str | None = None, job_token: str = "") -> Placement:
    return run_dir_placement(spec, run_dir or preview_run_dir(spec), python_of(spec), job_token)


def job_hosts(spec: JobSpec) -> list[Host]:
    """The hosts a job runs on: the hostfile after include/exclude, the first ``nodes.max`` of them."""
    if not spec.ssh.hostfile:
        raise UserError("ssh.hostfile: required for --cluster ssh",
                        hint="a DeepSpeed hostfile, e.g. `worker-0 slots=8` a line; set ssh.hostfile: hosts.txt")
    path = Path(spec.ssh.hostfile).expanduser()
    hosts = select_hosts(read_hostfile(path if path.is_absolute() else spec.base_dir / path),
                         spec.ssh.include, spec.ssh.exclude)
    if len(hosts) < spec.nodes.max:
        raise UserError(f"nodes: {spec.nodes} needs {spec.nodes.max} hosts but the hostfile (after include/exclude) "
                        f"has {len(hosts)}: {', '.join(h.name for h in hosts)}",
                        hint=f"set nodes: {len(hosts)} or add hosts")
    short = [h for h in hosts[:spec.nodes.max] if len(h.slots) < spec.gpus_per_node]
    if short:
        raise UserError(f"gpus_per_node: {spec.gpus_per_node} but {short[0].name} has "
                        f"{len(short[0].slots)} slot(s) selected ({','.join(map(str, short[0].slots))})",
                        hint="lower gpus_per_node or select more slots of that host")
    return hosts[:spec.nodes.max]


def default_rdzv_port(job_id: str) -> int:
    """A port per job (two jobs on the same first host must not collide), below the ephemeral range."""
    return 10000 + zlib.crc32(job_id.encode()) % 20000


def host_env(spec: JobSpec, where: Placement, rank: int, host: Host) -> dict[str, str]:
    """.deepspeed_env, then orch's job environment and the spec's env, then this host's own."""
    env = {**deepspeed_env(spec.base_dir), **job_environment(spec, where), "ORCH_RESTART_COUNT": "0",
           "ORCH_NODE_RANK": str(rank), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    if spec.gpus_per_node:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(s) for s in host.slots[:spec.gpus_per_node])
    return env


def host_plans(spec: JobSpec, where: Placement, hosts: list[Host], rdzv_addr: str, rdzv_port: int) -> list[HostPlan]:
    """One torchrun agent per host; the first host runs the c10d store (``is_host``)."""
    plans = []
    for rank, host in enumerate(hosts):
        torchrun = [where.python, "-m", "torch.distributed.run", *torchrun_options(spec, where),
                    "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_addr}:{rdzv_port}",
                    f"--rdzv-id={rendezvous_id(spec, where)}",
                    f"--rdzv-conf=is_host={'true' if rank == 0 else 'false'},{RDZV_CONF}",
                    *program_argv(spec, where)]
        env = host_env(spec, where, rank, host)
        remote = remote_command(workdir_of(spec), where.python, env, torchrun)
        plans.append(HostPlan(rank, host.name, host.slots, env, torchrun, remote,
                              ssh_argv(host.name, list(spec.ssh.ssh_options), remote)))
    return plans


def render(spec: JobSpec, where: Placement | None = None, *, rdzv_addr: str | None = None,
           rdzv_port: int | None = None, hosts: list[Host] | None = None) -> Rendered:
    """The plan; without a submit's address and port, the first host's name and the spec's port."""
    where = where or placement(spec)
    hosts = hosts or job_hosts(spec)
    addr = rdzv_addr or spec.ssh.master_addr or hosts[0].name.rpartition("@")[2]
    port = rdzv_port or spec.rdzv_port or default_rdzv_port(where.job_token or spec.name)
    plans = host_plans(spec, where, hosts, addr, port)
    context = {**base_context(spec, where), "hosts": plans, "rdzv_endpoint": f"{addr}:{port}",
               "endpoint_at_submit": rdzv_addr is None and not spec.ssh.master_addr,
               "workdir": workdir_of(spec), "python": where.python}
    request = {"elastic": spec.nodes.elastic, "ssh_options": list(spec.ssh.ssh_options),
               "rdzv_endpoint": f"{addr}:{port}", "workdir": workdir_of(spec),
               "hosts": [{"name": p.host, "rank": p.rank, "argv": p.argv} for p in plans]}
    return Rendered("ssh", "plan", "plan.sh", render_template(TEMPLATE, context), side_files(spec), where,
                    request=request)
