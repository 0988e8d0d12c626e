"""Reading log files as they grow, for ``orch logs [--follow]`` on any backend with log files."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
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


def follow(streams: Callable[[], dict[str, Path]], *, prefixed: bool, keep_going: Callable[[], bool] | None,
           poll_s: float = 0.5) -> Iterator[str]:
    """Lines of the files ``streams()`` names (stream name -> file; asked again each round, so new
    nodes' files join), each prefixed ``[name] `` when ``prefixed``. Without ``keep_going``, what is
    there now; with it, keep reading until it returns False, then read what was written last."""
    offsets: dict[Path, int] = {}
    while True:
        current = streams()
        for name, path in current.items():
            yield from new_lines(path, offsets, f"[{name}] " if prefixed else "")
        if keep_going is None:
            return
        if not keep_going():
            for name, path in current.items():
                yield from new_lines(path, offsets, f"[{name}] " if prefixed else "", final=True)
            return
        time.sleep(poll_s)
