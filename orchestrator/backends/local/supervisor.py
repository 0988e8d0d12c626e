"""The local cluster's head process: hosts the rendezvous store, runs one torchrun agent per
simulated node, and records what happens to them in ``<run dir>/local/state.json``.

Started detached by ``orch submit --cluster local`` (``python -m orchestrator.backends.local.supervisor
RUN_DIR``), it outlives the CLI. It plays the role the Slurm controller or the Kubernetes
operator plays elsewhere: it never restarts workers itself (torchrun's agents do that), it only
keeps the store up, watches exit codes, and on SIGTERM stops every process of the job.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.run_contract import RunPaths

from .. import supervised
from .proctree import stop_tree

PR_SET_CHILD_SUBREAPER = 36
POLL_S = 0.25


@dataclass
class NodeRecord:
    rank: int
    pid: int
    state: str = "RUNNING"         # RUNNING, SUCCEEDED, FAILED, NODE_FAIL, CANCELLED
    exit_code: int | None = None
    ended_at: float | None = None


@dataclass
class SupervisorState:
    supervisor_pid: int
    rdzv_port: int
    state: str = "RUNNING"
    detail: str = ""
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    nodes: dict[str, NodeRecord] = field(default_factory=dict)


def state_path(run_dir: Path) -> Path:
    return run_dir / "local" / "state.json"


def write_state(run_dir: Path, state: SupervisorState) -> None:
    """Atomic replace, so readers never see half a file."""
    path = state_path(run_dir)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(state), indent=1))
    os.replace(tmp, path)


def read_state(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads(state_path(run_dir).read_text())
    except (OSError, ValueError):
        return None


def final_state(nodes: list[NodeRecord], elastic: bool, cancelled: bool) -> tuple[str, str]:
    """The job's state from its nodes' fates."""
    return supervised.final_state(
        nodes, elastic, cancelled, noun="nodes",
        lost_name=lambda n: f"node {n.rank} (signal {-(n.exit_code or 0)})",
        failure=lambda n: f"node {n.rank} exited with code {n.exit_code}; see logs/node-{n.rank}.log")


class Supervisor:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.plan = json.loads((run_dir / "local" / "plan.json").read_text())
        self.cancelled = False
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def _start_store(self) -> Any:
        # The c10d rendezvous store lives here, not in node 0's agent, so killing any node keeps it.
        from torch.distributed import TCPStore

        return TCPStore("127.0.0.1", int(self.plan["rdzv_port"]), is_master=True, multi_tenant=True,
                        wait_for_workers=False, use_libuv=True)

    def _start_nodes(self) -> dict[str, NodeRecord]:
        paths = RunPaths(self.run_dir)
        paths.logs.mkdir(exist_ok=True)
        nodes = {}
        for node in self.plan["nodes"]:
            env = {**os.environ, **self.plan["env"], **node["env"]}
            if "OMP_NUM_THREADS" not in env and self.plan.get("threads_per_rank"):   # render.threads_per_rank
                env["OMP_NUM_THREADS"] = str(self.plan["threads_per_rank"])
            log = open(paths.node_log(node["rank"]), "ab", buffering=0)  # noqa: SIM115 - kept by child
            proc = subprocess.Popen(node["argv"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=self.plan["cwd"], start_new_session=True)
            log.close()
            self.procs[node["rank"]] = proc
            nodes[str(node["rank"])] = NodeRecord(rank=node["rank"], pid=proc.pid)
        return nodes

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.cancelled = True

    def _reap_orphans(self) -> None:
        """As subreaper we inherit orphaned workers; reap them, but never our agents (Popen does)."""
        ours = {p.pid for p in self.procs.values()}
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid in ours:
                return
            os.waitpid(info.si_pid, 0)

    def run(self) -> int:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, self._on_sigterm)
        state = SupervisorState(supervisor_pid=os.getpid(), rdzv_port=int(self.plan["rdzv_port"]))
        try:
            store = self._start_store()
        except Exception as exc:  # port taken between choosing and binding, most likely
            state.state, state.detail, state.finished_at = "FAILED", f"rendezvous store: {exc}", time.time()
            write_state(self.run_dir, state)
            return 1
        state.nodes = self._start_nodes()
        write_state(self.run_dir, state)
        while any(n.state == "RUNNING" for n in state.nodes.values()):
            if self.cancelled:
                self._stop_all(state)
                break
            changed = False
            for key, node in state.nodes.items():
                if node.state != "RUNNING":
                    continue
                code = self.procs[node.rank].poll()
                if code is None:
                    continue
                node.exit_code, node.ended_at, changed = code, time.time(), True
                node.state = "SUCCEEDED" if code == 0 else ("NODE_FAIL" if code < 0 else "FAILED")
            self._reap_orphans()
            if changed:
                write_state(self.run_dir, state)
            time.sleep(POLL_S)
        # Workers of a lost node may still be running (torchrun starts them in new sessions and
        # they were re-parented to us): nothing of the job may outlive it.
        stop_tree(os.getpid(), grace_s=5.0, include_root=False)
        state.state, state.detail = final_state(list(state.nodes.values()), bool(self.plan["elastic"]),
                                                self.cancelled)
        state.finished_at = time.time()
        write_state(self.run_dir, state)
        del store
        return 0

    def _stop_all(self, state: SupervisorState) -> None:
        for node in state.nodes.values():
            if node.state == "RUNNING":
                stop_tree(node.pid, grace_s=10.0)
                self.procs[node.rank].wait(timeout=5)
                node.state, node.exit_code, node.ended_at = "CANCELLED", self.procs[node.rank].returncode, time.time()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m orchestrator.backends.local.supervisor RUN_DIR", file=sys.stderr)
        return 2
    return Supervisor(Path(argv[1])).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
