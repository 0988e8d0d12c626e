"""What the backends that supervise their own units share (local: simulated nodes; ssh: hostfile hosts).

Both start a detached supervisor process that writes the job's state file, and both decide the
job's end from its units' fates the same way; only what a unit is called differs. Keeping both in
one place keeps the two backends' answers identical: cancelled wins, every unit succeeding is
success, an elastic job that finished on survivors without a failure is success, a failed unit is
a failure (the first one is named), and otherwise units were lost.
"""
from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..errors import UserError

START_TIMEOUT_S = 60.0


class Unit(Protocol):
    """One supervised unit: its state is SUCCEEDED, FAILED, NODE_FAIL or still running."""

    state: str


U = TypeVar("U", bound=Unit)


def final_state(units: Sequence[U], elastic: bool, cancelled: bool, *, noun: str,
                lost_name: Callable[[U], str], failure: Callable[[U], str]) -> tuple[str, str]:
    """(state, detail) for the job; ``noun`` is the units' plural ("nodes", "hosts")."""
    if cancelled:
        return "CANCELLED", "cancelled by user"
    ok = [u for u in units if u.state == "SUCCEEDED"]
    failed = [u for u in units if u.state == "FAILED"]
    lost = ", ".join(lost_name(u) for u in units if u.state == "NODE_FAIL")
    if len(ok) == len(units):
        return "SUCCEEDED", ""
    if ok and elastic and not failed:
        return "SUCCEEDED", f"finished on {len(ok)} of {len(units)} {noun} after losing {lost}"
    if failed:
        return "FAILED", failure(failed[0])
    return "NODE_FAIL", f"lost {lost}"


def wait_started(kind: str, run: Path, proc: subprocess.Popen[bytes],
                 read_state: Callable[[Path], dict[str, Any] | None],
                 check: Callable[[dict[str, Any]], None] = lambda state: None) -> None:
    """Return once ``kind``'s supervisor (``run/kind/supervisor.log``) wrote its state, or say why not.

    ``check`` may refuse a state the supervisor wrote (e.g. it could not start any unit).
    """
    log = run / kind / "supervisor.log"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        state = read_state(run)
        if state is not None:
            check(state)
            return
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise UserError(f"{kind} supervisor exited with code {proc.returncode} before starting:\n{tail}")
        time.sleep(0.1)
    raise UserError(f"{kind} supervisor did not start within {START_TIMEOUT_S:.0f} s", hint=f"see {log}")
