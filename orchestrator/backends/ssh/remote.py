"""The command lines of an ssh job: what runs on a host, and the ssh client call that runs it.

ssh sends its command to the remote user's login shell as one string (``$SHELL -c STRING``), so
every word is quoted for a POSIX shell here (``shlex.quote``), once, and nothing else touches it:
a path, an argument or an environment value with spaces, quotes, ``$``, ``;`` or newlines reaches
the remote program exactly as written. The job's environment travels as arguments of the host
agent (``--env K=V``), not through the remote shell's syntax or sshd's ``AcceptEnv``.
"""
from __future__ import annotations

import shlex

AGENT_MODULE = "orchestrator.backends.ssh.agent"
# Our defaults come after the user's ssh_options: for ssh the first value of an option wins, so
# the user's (and their ~/.ssh/config's) choices stand. BatchMode: a detached job cannot answer
# a password prompt. ServerAlive: a host that dies without closing its connections is noticed in
# about 15 s instead of at the next TCP timeout.
DEFAULT_SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3")


def shell_join(words: list[str]) -> str:
    return " ".join(shlex.quote(str(w)) for w in words)


def remote_command(workdir: str, python: str, env: dict[str, str], command: list[str]) -> str:
    """``cd WORKDIR && exec PYTHON -m ...agent --env K=V ... -- COMMAND``, quoted for the remote shell."""
    words = [python, "-m", AGENT_MODULE]
    for key, value in env.items():
        words += ["--env", f"{key}={value}"]
    return f"cd -- {shlex.quote(workdir)} && exec {shell_join([*words, '--', *command])}"


def ssh_argv(host: str, ssh_options: list[str], remote: str, *, ssh: str = "ssh") -> list[str]:
    """The local ssh client call (an argv list: no local shell is involved)."""
    return [ssh, *ssh_options, *DEFAULT_SSH_OPTIONS, "-T", "--", host, remote]
