"""orch's process on each ssh host: starts the host's torchrun agent and makes sure nothing of
the job outlives it.

The ssh backend runs ``python -m orchestrator.backends.ssh.agent --env K=V ... -- torchrun ...``
on every host. It is a child subreaper (workers that torchrun orphans are re-parented here, not to
init), reports its pid on the first line of output (what ``orch cancel`` and the tests use), and
stops the whole process tree when it is told to (SIGTERM/SIGHUP/SIGINT) or when the ssh
connection that started it goes away (end of its stdin): a job cannot leave orphans on a host
whose orch side was cancelled or died. Its last line says how torchrun exited, which tells a
finished host from one whose connection was lost.

orch's supervisor may also write ``restart-workers`` to its stdin when another host of an elastic
job was lost: a machine that dies takes its TCP connections with it silently, so the surviving
workers would wait in a collective until gloo's/NCCL's timeout. Killing them makes this host's
torchrun agent restart its workers at once, and the re-formed rendezvous leaves the dead host out.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from ..local.proctree import signal_tree, stop_tree

PR_SET_CHILD_SUBREAPER = 36
START_MARK = "orch-ssh-agent started"
EXIT_MARK = "orch-ssh-agent exit="
RESTART_WORKERS = b"restart-workers"


def parse_argv(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """``--env K=V ... -- COMMAND...`` -> (env, command)."""
    env: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i] != "--":
        if argv[i] != "--env" or i + 1 >= len(argv) or "=" not in argv[i + 1]:
            raise SystemExit(f"orch-ssh-agent: bad argument {argv[i]!r}; usage: --env K=V ... -- COMMAND")
        key, _, value = argv[i + 1].partition("=")
        env[key] = value
        i += 2
    command = argv[i + 1:]
    if not command:
        raise SystemExit("orch-ssh-agent: no command after --")
    return env, command


class HostAgent:
    def __init__(self, env: dict[str, str], command: list[str]) -> None:
        self.env, self.command = env, command
        self.stop_reason = ""
        self.restart_requested = False

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop_reason = f"signal {signal.Signals(signum).name}"

    def _watch_stdin(self) -> None:
        """Commands from orch's supervisor, one a line; the end of stdin means its side of the
        ssh connection went away."""
        pending = b""
        try:
            while chunk := os.read(0, 4096):
                *lines, pending = (pending + chunk).split(b"\n")
                self.restart_requested |= any(line.strip() == RESTART_WORKERS for line in lines)
        except OSError:
            pass
        self.stop_reason = self.stop_reason or "the ssh connection closed"

    def _restart_workers(self, torchrun_pid: int) -> None:
        self.restart_requested = False
        print("orch-ssh-agent: a host of this elastic job was lost; restarting this host's workers", flush=True)
        signal_tree(torchrun_pid, signal.SIGKILL, include_root=False)

    def _reap_orphans(self, child_pid: int) -> None:
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid == child_pid:
                return
            os.waitpid(info.si_pid, 0)

    def run(self) -> int:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        print(f"{START_MARK} host={socket.gethostname()} pid={os.getpid()}", flush=True)
        child = subprocess.Popen(self.command, env={**os.environ, **self.env}, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
        threading.Thread(target=self._watch_stdin, daemon=True).start()
        while child.poll() is None:
            if self.stop_reason:
                print(f"orch-ssh-agent: stopping the job on this host ({self.stop_reason})", flush=True)
                stop_tree(child.pid, grace_s=10.0)
                child.wait()
                break
            if self.restart_requested:
                self._restart_workers(child.pid)
            self._reap_orphans(child.pid)
            time.sleep(0.2)
        stop_tree(os.getpid(), grace_s=5.0, include_root=False)  # workers torchrun left behind
        code = child.returncode if child.returncode >= 0 else 128 - child.returncode
        print(f"{EXIT_MARK}{code}", flush=True)
        return code


def main(argv: list[str]) -> int:
    env, command = parse_argv(argv)
    return HostAgent(env, command).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
