"""What runs on an ssh host, tested without ssh: the remote command line goes through a real POSIX
shell (as sshd hands it to the user's login shell) and orch's host agent runs under it.

The ssh tier (test_ssh_backend.py) runs the same through real OpenSSH on the test hosts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.backends.local.proctree import alive, descendants
from orchestrator.backends.ssh.agent import EXIT_MARK, START_MARK
from orchestrator.backends.ssh.remote import remote_command, ssh_argv
from tests.polling import wait_until

PRINT_ARGV = "import json, os, sys; print('SEEN ' + json.dumps([sys.argv[1:], os.environ['X'], os.getcwd()]))"
WORDS = ["a b", "'", '"', "$(touch PWNED)", "`touch PWNED`", "; touch PWNED", "*", "line\nbreak", "\\", "", "-n", "--"]


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_every_word_survives_the_remote_shell(tmp_path: Path, shell: str) -> None:
    workdir = tmp_path / "dir 'with' $(touch PWNED) \"quotes\""
    workdir.mkdir()
    line = remote_command(str(workdir), sys.executable, {"X": "$HOME 'q' ;|&"},
                          [sys.executable, "-c", PRINT_ARGV, *WORDS])
    # stdin stays open while it runs, as the ssh channel does (its end means "connection lost")
    proc = subprocess.Popen([shell, "-c", line], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    stdout = proc.stdout.read()
    assert proc.wait(timeout=60) == 0, stdout
    proc.stdin.close()
    seen = json.loads(next(line for line in stdout.splitlines() if line.startswith("SEEN "))[5:])
    assert seen == [WORDS, "$HOME 'q' ;|&", str(workdir)]
    assert stdout.splitlines()[0].startswith(START_MARK) and f"{EXIT_MARK}0" in stdout
    assert not list(tmp_path.rglob("PWNED"))


def test_the_ssh_call_keeps_user_options_first_and_the_host_after_the_end_of_options() -> None:
    argv = ssh_argv("worker-0", ["-p", "2222", "-o", "ServerAliveInterval=30"], "true")
    assert argv[:5] == ["ssh", "-p", "2222", "-o", "ServerAliveInterval=30"]  # ssh: the first value wins
    assert argv[-3:] == ["--", "worker-0", "true"]


def _agent(tmp_path: Path, *command: str) -> subprocess.Popen[str]:
    line = remote_command(str(tmp_path), sys.executable, {"X": "1"}, list(command))
    return subprocess.Popen(["sh", "-c", line], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)


SPAWNER = ("import subprocess, sys, time; "
           "[subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True) "
           "for _ in range(2)]; print('workers started', flush=True); time.sleep(600)")


def test_the_agent_stops_its_whole_tree_when_the_connection_closes(tmp_path: Path) -> None:
    """Workers in their own sessions (as torchrun starts them) are stopped too: no orphans."""
    agent = _agent(tmp_path, sys.executable, "-c", SPAWNER)
    assert agent.stdout.readline().startswith(START_MARK)
    assert agent.stdout.readline().strip() == "workers started"
    tree = descendants(agent.pid)
    assert len(tree) >= 3  # (the shell exec'd the agent) agent's python child and its 2 workers
    agent.stdin.close()  # what the ssh connection going away looks like on the host
    assert agent.wait(timeout=60) == 128 + signal.SIGTERM
    assert f"{EXIT_MARK}{128 + signal.SIGTERM}" in agent.stdout.read()
    assert not [p for p in tree if alive(p)]


def test_restart_workers_kills_the_workers_but_not_the_agent(tmp_path: Path) -> None:
    agent = _agent(tmp_path, sys.executable, "-c", SPAWNER)
    assert agent.stdout.readline().startswith(START_MARK)
    agent.stdout.readline()
    child = wait_until(lambda: [p for p in descendants(agent.pid) if len(descendants(p)) == 2], 30, "the workers")[0]
    workers = descendants(child)
    agent.stdin.write("restart-workers\n")
    agent.stdin.flush()
    wait_until(lambda: not [p for p in workers if alive(p)], 30, "the workers to be killed")
    assert agent.poll() is None and alive(child)  # the torchrun stand-in is still there
    os.killpg(agent.pid, signal.SIGTERM)
    assert agent.wait(timeout=60) == 128 + signal.SIGTERM
    time.sleep(0.2)
    assert not alive(child)


def test_orch_render_shows_one_ssh_call_per_host(tmp_path: Path) -> None:
    """The plan `orch render --cluster ssh` prints, without connecting anywhere."""
    from orchestrator.backends import get_backend
    from orchestrator.errors import UserError
    from orchestrator.spec import load_spec
    from tests.shared_env import REPO

    example = REPO / "examples" / "tiny-gpt-ssh.yaml"
    rendered = get_backend("ssh").dryrun(load_spec(example))
    calls = [line for line in rendered.text.splitlines() if line.startswith("ssh ")]
    assert [c.split(" -- ")[1].split()[0] for c in calls] == ["worker-0", "worker-1", "worker-2"]
    assert "is_host=true" in calls[0] and all("is_host=false" in c for c in calls[1:])
    assert all("--rdzv-endpoint=worker-0:" in c and "--nnodes=2:3" in c for c in calls)

    (tmp_path / "gpus").write_text("a slots=4\nb slots=4\n")
    spec = load_spec(example, [f"ssh.hostfile={tmp_path / 'gpus'}", "ssh.include=a:1,3@b:0,2", "nodes=2",
                               "gpus_per_node=2", "procs_per_node=2"])
    request = get_backend("ssh").dryrun(spec).request
    assert [h["name"] for h in request["hosts"]] == ["a", "b"]
    assert "CUDA_VISIBLE_DEVICES=1,3" in request["hosts"][0]["argv"][-1]
    assert "CUDA_VISIBLE_DEVICES=0,2" in request["hosts"][1]["argv"][-1]
    with pytest.raises(UserError, match="nodes: 3 needs 3 hosts but the hostfile .* has 2: a, b"):
        get_backend("ssh").dryrun(load_spec(example, [f"ssh.hostfile={tmp_path / 'gpus'}", "nodes=3"]))
    with pytest.raises(UserError, match="ssh: include and exclude are mutually exclusive"):
        load_spec(example, ["ssh.include=worker-0", "ssh.exclude=worker-1"])
    with pytest.raises(UserError, match="ssh.hostfile: required for --cluster ssh"):
        get_backend("ssh").dryrun(load_spec(REPO / "examples" / "tiny-gpt-zero2.yaml"))
