"""Reading log files as they grow, for ``orch logs --follow`` on any backend with log files."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


def new_lines(path: Path, offsets: dict[Path, int], prefix: str = "", final: bool = False) -> Iterator[str]:
    """Complete lines appended to ``path`` since the last call (``offsets`` remembers where that
    was). A partial last line waits for its newline, unless ``final`` (the writer has exited)."""
    try:
        with path.open("rb") as f:
            f.seek(offsets.get(path, 0))
            data = f.read()
    except FileNotFoundError:
        return
    end = len(data) if final else data.rfind(b"\n") + 1
    offsets[path] = offsets.get(path, 0) + end
    for line in data[:end].decode(errors="replace").splitlines():
        yield prefix + line
