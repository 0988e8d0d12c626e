"""What ``orch ckpt ls`` and ``orch ckpt verify`` report, from manifests and sha256 alone (no torch).

``list_dir`` describes every checkpoint in a save directory (or the one checkpoint given);
``verify`` re-hashes every file a manifest lists. Both accept a save directory or a checkpoint
directory, and raise ``CheckpointError`` only for a path that is neither.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .manifest import (MANIFEST, CheckpointEntry, CheckpointError, file_problem, list_checkpoints, read_latest,
                       read_manifest)

__all__ = ["CheckpointRow", "VerifyReport", "list_dir", "verify"]


@dataclass(frozen=True)
class CheckpointRow:
    """One line of ``orch ckpt ls``."""

    tag: str
    step: Optional[int]
    world_size: Optional[int]
    zero_stage: Optional[int]
    size_bytes: int
    status: str          # "complete" | "incomplete" | "corrupt"
    latest: bool
    detail: str = ""


@dataclass
class VerifyReport:
    """One checkpoint's verification: files checked, and every problem found (empty when intact)."""

    checkpoint: Path
    files: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _entries(path: Path) -> tuple[list[CheckpointEntry], Optional[str]]:
    path = Path(path)
    if (path / MANIFEST).exists() or path.name.endswith(".tmp"):
        try:
            entry = CheckpointEntry(path.name, path, read_manifest(path), None)
        except CheckpointError as exc:
            entry = CheckpointEntry(path.name, path, None, str(exc))
        return [entry], read_latest(path.parent)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory (give a save directory or one checkpoint in it)", path)
    return list_checkpoints(path), read_latest(path)


def _disk_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_dir(path: str | Path) -> list[CheckpointRow]:
    """Checkpoints under ``path``, newest first; incomplete and corrupt ones are listed too."""
    entries, latest = _entries(Path(path))
    rows = []
    for e in entries:
        if e.manifest is not None:
            m = e.manifest
            size = sum(int(f["bytes"]) for f in m["files"].values()) + (e.path / MANIFEST).stat().st_size
            rows.append(CheckpointRow(e.name, int(m["global_step"]), int(m["world_size"]), int(m["zero_stage"]),
                                      size, "complete", e.name == latest))
        else:
            status = "incomplete" if e.in_progress or "is missing" in (e.problem or "") else "corrupt"
            rows.append(CheckpointRow(e.name, e.step, None, None, _disk_size(e.path), status, e.name == latest,
                                      e.problem or ""))
    return rows


def verify(path: str | Path, progress: Optional[Callable[[str], None]] = None) -> list[VerifyReport]:
    """Check every file of every complete checkpoint under ``path`` (or of the one given)."""
    entries, _ = _entries(Path(path))
    reports = []
    for e in entries:
        report = VerifyReport(e.path)
        if e.manifest is None:
            if not e.in_progress:
                report.problems.append(e.problem or f"{e.path}: no manifest")
                reports.append(report)
            continue
        for name, record in sorted(e.manifest["files"].items()):
            if progress:
                progress(f"{e.name}/{name}")
            problem = file_problem(e.path, name, record)
            report.files += 1
            report.bytes += int(record["bytes"])
            if problem:
                report.problems.append(problem)
        reports.append(report)
    if not reports:
        raise CheckpointError(f"{path} holds no complete checkpoint to verify", path)
    return reports
