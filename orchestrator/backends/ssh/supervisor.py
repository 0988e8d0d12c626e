"""The ssh job's head process on the submitting machine: one ssh client per host, each running
orch's host agent (and through it the host's torchrun agent), with the output of every host in
``<run dir>/logs/<host>.log`` and what happened to each host in ``<run dir>/ssh/state.json``.

Started detached by ``orch submit --cluster ssh`` (``python -m orchestrator.backends.ssh.supervisor
RUN_DIR``), it outlives the CLI, like the local backend's supervisor. It keeps each ssh client's
stdin open: when this process goes away, every host agent sees its connection close and stops
its host's processes. On SIGTERM (``orch cancel``) it closes those stdins, waits for the hosts to
report their exit, and falls back to ``kill`` over a fresh connection for a host that does not.
A host whose connection drops without the agent's exit line was lost (the machine died or the
network between us did); an elastic job carries on without it, a fixed-size one is stopped.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, IO

from .. import supervised
from .agent import EXIT_MARK, RESTART_WORKERS, START_MARK
from .remote import ssh_argv

POLL_S = 0.25
CANCEL_GRACE_S = 30.0
STATE_FILE = "ssh/state.json"
PLAN_FILE = "ssh/plan.json"


@dataclass
class HostRecord:
    host: str
    ssh_pid: int
    state: str = "RUNNING"         # RUNNING, SUCCEEDED, FAILED, NODE_FAIL, CANCELLED
    exit_code: int | None = None
    remote_pid: int | None = None  # the host agent's pid on that host
    detail: str = ""
    ended_at: float | None = None


@dataclass
class SupervisorState:
    supervisor_pid: int
    state: str = "RUNNING"
    detail: str = ""
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    hosts: dict[str, HostRecord] = field(default_factory=dict)


def write_state(run_dir: Path, state: SupervisorState) -> None:
    path = run_dir / STATE_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(state), indent=1))
    os.replace(tmp, path)


def read_state(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def host_log(run_dir: Path, host: str) -> Path:
    return run_dir / "logs" / f"{host}.log"


def agent_marks(log: Path) -> tuple[int | None, int | None, str]:
    """(remote agent pid, remote exit code, last line) from a host's log."""
    pid = code = None
    last = ""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None, None, ""
    for line in text.splitlines():
        if line.startswith(START_MARK):
            m = re.search(r"pid=(\d+)", line)
            pid = int(m.group(1)) if m else pid
        elif line.startswith(EXIT_MARK):
            code = int(line[len(EXIT_MARK):].strip() or 1)
        if line.strip():
            last = line.strip()
    return pid, code, last


def host_outcome(ssh_code: int, remote_code: int | None, last_line: str) -> tuple[str, str]:
    """A host's state from its ssh client's exit and the agent's exit line."""
    if remote_code is None and ssh_code == 255:
        return "NODE_FAIL", f"lost: {last_line}" if last_line else "lost: ssh connection closed"
    code = remote_code if remote_code is not None else ssh_code
    return ("SUCCEEDED", "") if code == 0 else ("FAILED", f"exited with code {code}")


def final_state(hosts: list[HostRecord], elastic: bool, cancelled: bool) -> tuple[str, str]:
    """The job's state from its hosts' fates."""
    return supervised.final_state(hosts, elastic, cancelled, noun="hosts", lost_name=lambda h: h.host,
                               failure=lambda h: f"{h.host} {h.detail}; see logs/{h.host}.log")


class Supervisor:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.plan = json.loads((run_dir / PLAN_FILE).read_text())
        self.cancelled = False
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.stdins: dict[str, IO[bytes]] = {}

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.cancelled = True

    def _start_hosts(self) -> dict[str, HostRecord]:
        (self.run_dir / "logs").mkdir(exist_ok=True)
        records = {}
        for host in self.plan["hosts"]:
            name = host["name"]
            with open(host_log(self.run_dir, name), "ab", buffering=0) as log:
                proc = subprocess.Popen(host["argv"], stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            assert proc.stdin is not None
            self.procs[name], self.stdins[name] = proc, proc.stdin
            records[name] = HostRecord(host=name, ssh_pid=proc.pid)
        return records

    def _update(self, state: SupervisorState) -> bool:
        changed = False
        for name, record in state.hosts.items():
            if record.remote_pid is None:
                record.remote_pid, _, _ = agent_marks(host_log(self.run_dir, name))
                changed |= record.remote_pid is not None
            if record.state != "RUNNING" or self.procs[name].poll() is None:
                continue
            _, remote_code, last = agent_marks(host_log(self.run_dir, name))
            record.exit_code, record.ended_at, changed = self.procs[name].returncode, time.time(), True
            record.state, record.detail = host_outcome(record.exit_code, remote_code, last)
            self._close_stdin(name)
            if record.state == "NODE_FAIL" and self.plan["elastic"]:
                self._restart_survivors(state)
        return changed

    def _restart_survivors(self, state: SupervisorState) -> None:
        """A lost host's peers are stuck in a collective with it: have their agents restart them."""
        for name, record in state.hosts.items():
            if record.state == "RUNNING" and self.procs[name].poll() is None:
                try:
                    self.stdins[name].write(RESTART_WORKERS + b"\n")
                    self.stdins[name].flush()
                except OSError:
                    pass

    def _close_stdin(self, name: str) -> None:
        try:
            self.stdins[name].close()
        except OSError:
            pass

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, self._on_sigterm)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        state = SupervisorState(supervisor_pid=os.getpid())
        state.hosts = self._start_hosts()
        write_state(self.run_dir, state)
        while any(h.state == "RUNNING" for h in state.hosts.values()):
            if self.cancelled:
                self._stop_all(state, "CANCELLED")
                break
            if self._update(state):
                write_state(self.run_dir, state)
                if not self.plan["elastic"] and any(h.state == "NODE_FAIL" for h in state.hosts.values()):
                    self._stop_all(state, "CANCELLED")  # a fixed-size job cannot go on without the host
            time.sleep(POLL_S)
        self._update(state)
        state.state, state.detail = final_state(list(state.hosts.values()), bool(self.plan["elastic"]),
                                                self.cancelled)
        state.finished_at = time.time()
        write_state(self.run_dir, state)
        return 0

    def _stop_all(self, state: SupervisorState, as_state: str) -> None:
        """Close every connection (the agents stop their hosts), wait, then kill over a new one."""
        running = [n for n, h in state.hosts.items() if h.state == "RUNNING"]
        for name in running:
            self._close_stdin(name)
        deadline = time.monotonic() + CANCEL_GRACE_S
        while time.monotonic() < deadline and any(self.procs[n].poll() is None for n in running):
            time.sleep(0.1)
        for name in running:
            record = state.hosts[name]
            if self.procs[name].poll() is None:
                self.procs[name].kill()
                self.procs[name].wait()
                self._remote_kill(name, record.remote_pid)
            record.exit_code, record.ended_at = self.procs[name].returncode, time.time()
            record.state, record.detail = as_state, "stopped by orch"
        write_state(self.run_dir, state)

    def _remote_kill(self, name: str, remote_pid: int | None) -> None:
        if remote_pid is None:
            return
        argv = ssh_argv(name, [*self.plan["ssh_options"], "-o", "ConnectTimeout=10"],
                        f"kill -TERM {remote_pid}; sleep 12; kill -KILL {remote_pid} 2>/dev/null; true")
        subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m orchestrator.backends.ssh.supervisor RUN_DIR", file=sys.stderr)
        return 2
    return Supervisor(Path(argv[1])).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
