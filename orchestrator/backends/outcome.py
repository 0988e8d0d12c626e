"""A job's final state from its units' fates, for the backends that supervise their units themselves.

The local backend (simulated nodes) and the ssh backend (hosts of a hostfile) decide the job's end
the same way; only what a unit is called differs. Keeping the decision in one place keeps the two
backends' answers identical: cancelled wins, every unit succeeding is success, an elastic job that
finished on survivors without a failure is success, a failed unit is a failure (the first one is
named), and otherwise units were lost.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar


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
