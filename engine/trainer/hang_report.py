"""The hang dumps of all ranks side by side: which rank fell behind.

In a collective hang, most ranks wait inside collective #N while one rank never got there;
its stack, not theirs, shows the cause. Each ``hang/rank-<r>.txt`` (written by
watchdog.py) names the phase and the last collective that rank entered; rank 0 reads
them all after the dumps and writes ``hang/summary.txt`` with one verdict line first.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SECTION_MARK = "=== hang on rank"
_SEQ = re.compile(r"^last collective entered: #(\d+)")


@dataclass(frozen=True)
class RankDump:
    rank: int
    phase: str
    last_collective: str
    last_seq: int | None


def read_dump(path: Path, rank: int) -> RankDump | None:
    """The newest incident in one rank's file (earlier restarts append theirs above it)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    if SECTION_MARK not in text:
        return None
    section = text[text.rindex(SECTION_MARK):]
    phase, last, seq = "?", "none recorded", None
    for line in section.splitlines():
        if line.startswith("phase: "):
            phase = line.removeprefix("phase: ")
        elif line.startswith("last collective entered: "):
            last = line.removeprefix("last collective entered: ")
            m = _SEQ.match(line)
            seq = int(m.group(1)) if m else None
    return RankDump(rank, phase, last, seq)


def verdict(dumps: dict[int, RankDump], world_size: int) -> str:
    """One sentence: who to look at first."""
    missing = [r for r in range(world_size) if r not in dumps]
    prefix = f"rank(s) {missing} wrote no dump here (killed first, or another filesystem); " if missing else ""
    seqs = {r: d.last_seq for r, d in dumps.items() if d.last_seq is not None}
    if not seqs:
        return prefix + "no collectives were recorded; compare the ranks' phases and stacks"
    top = max(seqs.values())
    behind = sorted(r for r, s in seqs.items() if s < top)
    if behind:
        ahead = sorted(r for r, s in seqs.items() if s == top)
        first = dumps[behind[0]]
        return (prefix + f"rank(s) {behind} never entered collective #{top}, which rank(s) {ahead} are "
                f"waiting in: look at rank {first.rank}'s stack first (it was in {first.phase})")
    return prefix + (f"every rank's last collective is #{top}: the ranks are stuck outside collectives "
                     "(data, compute, I/O); see each rank's stack")


def write_summary(hang_dir: Path, world_size: int) -> tuple[Path, str]:
    dumps = {r: d for r in range(world_size)
             if (d := read_dump(hang_dir / f"rank-{r}.txt", r)) is not None}
    text = verdict(dumps, world_size)
    lines = [text, ""] + [f"rank {d.rank}: {d.phase}; last collective {d.last_collective}"
                          for d in dumps.values()]
    path = hang_dir / "summary.txt"
    path.write_text("\n".join(lines) + "\n")
    return path, text
