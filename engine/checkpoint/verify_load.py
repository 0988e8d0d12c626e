"""Which rank checks which file of a checkpoint being loaded, and when.

Every file the load needs is hashed by exactly one rank and the findings are shared, so all ranks
load the same checkpoint or fail alike. At the saved world size a rank's own shards (master and
optimizer states) are read whole with O_DIRECT while they are hashed, and their bytes are kept
(the partition is a view of them, not read again); the other files are hashed round-robin through
the page cache, which the ranged reads that follow then hit.

``later=True`` splits the work in two, so the load can publish the master weights while the
optimizer states are still on their way: the optimizer files' reads are queued behind the
master's on the I/O threads (``LaterChecks``), and only the other files are checked before
``open_verified`` returns. The caller must then either ``finish`` them (and share the findings)
or ``cancel`` them.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .collective import Group
from .manifest import CheckpointError, PendingCheck, file_problem, read_manifest, start_verified_read

__all__ = ["LaterChecks", "OpenedCheckpoint", "open_verified"]


class LaterChecks:
    """The optimizer-state files' checks, running on the I/O threads while the caller works."""

    def __init__(self, ckpt_dir: Path, manifest: Mapping[str, Any], own: list[str], others: list[str]) -> None:
        self.own: dict[str, PendingCheck] = {n: start_verified_read(ckpt_dir, n, manifest["files"][n]) for n in own}
        self._thread: Optional[ThreadPoolExecutor] = None
        self._others: Optional[Future] = None
        if others:      # hash_file waits on the pool, so it runs on a thread of its own, not on the pool
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="orch-verify")
            self._others = self._thread.submit(_problems, ckpt_dir, manifest, others)

    def finish(self) -> tuple[list[str], dict[str, torch.Tensor]]:
        """This rank's findings (problems, none when intact) and the bytes of its own files."""
        try:
            problems, data = _results(self.own)
            if self._others is not None:
                problems += self._others.result()
        finally:
            self._close()
        return problems, (data if not problems else {})

    def cancel(self) -> None:
        """Not needed any more (the load failed on something else): stop, leave nothing running."""
        for pending in self.own.values():
            pending.cancel()
        if self._others is not None:
            self._others.exception()
        self._close()

    def _close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None


@dataclass
class OpenedCheckpoint:
    """``open_verified``'s answer: the manifest (rank 0's, on every rank) or the problem; the rank's
    own shards already in memory; the optimizer files' checks still running (``later=True``)."""

    manifest: Optional[dict[str, Any]]
    problem: Optional[str] = None
    preloaded: dict[str, torch.Tensor] = field(default_factory=dict)
    later: Optional[LaterChecks] = None


def open_verified(ckpt_dir: Path, group: Group, with_optimizer: bool, whole: bool = True,
                  later: bool = False) -> OpenedCheckpoint:
    """Collective: rank 0's manifest for everyone, and every needed file's checksum checked by some
    rank (see the module docstring). ``whole=False`` (an NVMe-offloaded engine, which streams its
    partition) reads no file whole; ``later`` leaves the optimizer files' checks running."""
    found: tuple[Optional[dict[str, Any]], Optional[str]] = (None, None)
    if group.rank == 0:
        try:
            found = (read_manifest(ckpt_dir), None)
        except CheckpointError as exc:
            found = (None, str(exc))
    manifest, problem = group.broadcast(found)
    if problem:
        return OpenedCheckpoint(None, problem)
    names = sorted(n for n, rec in manifest["files"].items() if with_optimizer or rec.get("kind") != "optimizer")
    own, others = _verified_by(names, manifest, group.rank, group.world_size)
    if not whole:
        own, others = [], own + others
    now = [n for n in own if not (later and with_optimizer and _states(manifest, n))]
    pending = {n: start_verified_read(ckpt_dir, n, manifest["files"][n]) for n in now}
    checks = None
    if later and with_optimizer:      # queued behind the master's blocks on the I/O threads
        checks = LaterChecks(ckpt_dir, manifest, [n for n in own if _states(manifest, n)],
                             [n for n in others if _states(manifest, n)])
        others = [n for n in others if not _states(manifest, n)]
    try:
        mine, preloaded = _results(pending)
        mine += _problems(ckpt_dir, manifest, others)
        problems = [p for found in group.all_gather(mine) for p in found]
    except BaseException:
        if checks is not None:
            checks.cancel()
        raise
    if problems and checks is not None:
        checks.cancel()
    return OpenedCheckpoint(manifest, "; ".join(problems) or None, preloaded if not problems else {},
                            checks if not problems else None)


def _results(checks: Mapping[str, PendingCheck]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Wait for each file's verified read: the problems found, and the bytes of the intact files."""
    problems, data = [], {}
    for name, check in checks.items():
        problem, value = check.result()
        if problem:
            problems.append(problem)
        elif value is not None:
            data[name] = value
    return problems, data


def _states(manifest: Mapping[str, Any], name: str) -> bool:
    return manifest["files"][name].get("kind") == "optimizer"


def _problems(ckpt_dir: Path, manifest: Mapping[str, Any], names: list[str]) -> list[str]:
    return [p for n in names if (p := file_problem(ckpt_dir, n, manifest["files"][n], keep_in_cache=True))]


def _verified_by(names: list[str], manifest: Mapping[str, Any], rank: int, world: int) -> tuple[list[str], list[str]]:
    """The files ``rank`` checks: at the saved world size its own shards (first list: it reads them
    whole), the others round-robin (second list); every file exactly once over the ranks."""
    same_world = manifest.get("world_size") == world
    owned = {n: manifest["files"][n].get("rank") for n in names if manifest["files"][n].get("kind") in
             ("master", "optimizer")} if same_world else {}
    rest = [n for n in names if n not in owned]
    return [n for n, r in owned.items() if r == rank], rest[rank::world]
