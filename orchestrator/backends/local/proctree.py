"""Process trees on Linux, read from /proc: find everything a job started and stop it for sure.

torchrun starts its workers in new sessions, so signalling the agent's process group does not
reach them; the tree of parent links does (and orch's local supervisor is a child subreaper, so
orphans are re-parented to it rather than escaping to init).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state letter) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2:].split()  # the command name may contain spaces and ')'
    return int(rest[1]), rest[0]


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    st = _stat(pid)
    return st is not None and st[1] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (children first, then theirs)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[1] not in ("Z", "X"):
                children.setdefault(st[0], []).append(int(entry))
    out, frontier = [], [pid]
    while frontier:
        nxt = []
        for p in frontier:
            for c in children.get(p, []):
                out.append(c)
                nxt.append(c)
        frontier = nxt
    return out


def signal_tree(root: int, sig: int, *, include_root: bool = True) -> list[int]:
    """Send ``sig`` to ``root`` and all its descendants (root first, so a parent cannot react to
    its children's deaths: like a node losing power); returns the pids signalled."""
    pids = ([root] if include_root else []) + descendants(root)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    return pids


def stop_tree(root: int, *, grace_s: float = 10.0, include_root: bool = True) -> list[int]:
    """SIGTERM the tree, wait up to ``grace_s``, then SIGKILL whatever is left. Returns survivors
    (empty unless something ignores SIGKILL, e.g. a process stuck in the kernel)."""
    pids = set(signal_tree(root, signal.SIGTERM, include_root=include_root))
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    pids |= set(descendants(root))
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    time.sleep(0.1)
    return [p for p in pids if alive(p)]
