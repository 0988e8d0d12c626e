"""Running Slurm's client commands (sbatch, squeue, sacct, sinfo, scancel) with errors a user can act on.

Every call goes through ``run``: a missing command names itself and how to install it or put it
on PATH, a machine without a Slurm configuration or an unreachable controller says so, and
a command that hangs (a wedged controller) times out instead of freezing ``orch status``.
"""
from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ...errors import UserError

TIMEOUT_S = 60.0

INSTALL_HINT = ("install the Slurm client commands (Debian/Ubuntu: apt-get install slurm-client; "
                "RHEL/Rocky: dnf install slurm) or add the directory that holds them to PATH, "
                "e.g. export PATH=/opt/slurm/bin:$PATH; `orch doctor` checks")


class SlurmUnavailable(UserError):
    """Slurm could not be asked at all (no command, no configuration, no controller)."""


def command(name: str) -> str:
    """The full path of a Slurm command, or a SlurmUnavailable naming it and the fix."""
    path = shutil.which(name)
    if path is None:
        raise SlurmUnavailable(f"`{name}` was not found on PATH; --cluster slurm runs Slurm's "
                               f"{name} on this machine", hint=INSTALL_HINT)
    return path


def diagnose(stderr: str) -> str | None:
    """A hint for the Slurm client errors that mean "this machine cannot talk to Slurm"."""
    text = stderr.lower()
    if "configuration source" in text or "fetch_config" in text or ("slurm.conf" in text and "no such file" in text):
        return ("this machine has no Slurm configuration: set SLURM_CONF=/path/to/slurm.conf, "
                "or run orch on a login node of the cluster")
    if "unable to contact slurm controller" in text or "connection refused" in text:
        return "slurmctld is not reachable from here: `scontrol ping` tells whether it is up"
    if "munge" in text and ("credential" in text or "socket" in text):
        return "munge authentication failed: is munged running on this machine (`munge -n | unmunge`)?"
    return None


def run(argv: Sequence[str], *, cwd: Path | str | None = None,
        timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run a Slurm command (argv[0] is looked up on PATH); the caller looks at returncode."""
    exe = command(argv[0])
    try:
        return subprocess.run([exe, *argv[1:]], capture_output=True, text=True, cwd=cwd,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(f"`{' '.join(argv[:2])} ...` did not answer within {timeout:.0f} s",
                               hint="the Slurm controller may be overloaded or down: try `scontrol ping`") from None


def failure(argv: Sequence[str], result: subprocess.CompletedProcess[str]) -> UserError:
    """The error for a Slurm command that exited non-zero: its own stderr, plus a hint if known."""
    stderr = (result.stderr or result.stdout or "").strip() or f"exit status {result.returncode}"
    hint = diagnose(stderr)
    cls = SlurmUnavailable if hint else UserError
    return cls(f"`{Path(argv[0]).name} {' '.join(argv[1:])}` failed:\n{stderr}", hint=hint)
