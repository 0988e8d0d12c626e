"""Durable, atomic filesystem steps: fsync files and directories, rename into place, delete safely.

Why each step: ``rename`` is atomic, but without ``fsync`` a power cut (or a node crash under a
network filesystem) can leave a renamed directory whose files are empty, so file contents are
synced before the rename, and the parent directory after it so that the rename itself is durable.
Deleting a checkpoint first renames it to ``*.tmp`` so that a half-deleted directory never looks
like a complete (or corrupt) checkpoint.
"""
from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

from .manifest import PARTIAL_MARKER, TMP_SUFFIX

__all__ = ["atomic_write_text", "fsync_dir", "make_partial_dir", "move_into_place", "remove_dir",
           "remove_leftovers", "write_durable"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (created, renamed, removed files) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (the caller renames or fsyncs the directory)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text``: readers see the old or the new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    write_durable(tmp, text.encode("utf-8"))
    os.replace(tmp, path)
    fsync_dir(path.parent)


def make_partial_dir(path: Path) -> None:
    """Create a directory that ``remove_leftovers`` may delete if the process dies before renaming it."""
    path.mkdir(parents=False, exist_ok=False)
    (path / PARTIAL_MARKER).touch()


def move_into_place(src: Path, dst: Path) -> None:
    """Rename the finished directory ``src`` to ``dst``, replacing an existing ``dst`` atomically.

    Re-saving an existing tag swaps the two directories with ``renameat2(RENAME_EXCHANGE)`` so
    ``dst`` is complete at every moment; where the kernel or filesystem lacks it, the old
    directory is moved aside first (a short window in which ``dst`` is absent).
    """
    if (src / PARTIAL_MARKER).exists():
        (src / PARTIAL_MARKER).unlink()
    if not dst.exists():
        os.rename(src, dst)
    elif _exchange(src, dst):
        remove_dir(src)          # src now holds the previous contents
    else:
        aside = dst.with_name(f"{dst.name}.replaced-{os.getpid()}{TMP_SUFFIX}")
        (dst / PARTIAL_MARKER).touch()
        os.rename(dst, aside)
        os.rename(src, dst)
        shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(dst.parent)


def _exchange(a: Path, b: Path) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def remove_dir(path: Path) -> None:
    """Delete a checkpoint directory; it is renamed to ``*.tmp`` first, so a crash midway leaves
    a leftover that the next save removes rather than a half-deleted checkpoint."""
    path = Path(path)
    if not path.exists():
        return
    (path / PARTIAL_MARKER).touch()
    doomed = path if path.name.endswith(TMP_SUFFIX) else path.with_name(f"{path.name}.deleting{TMP_SUFFIX}")
    if doomed != path:
        if doomed.exists():
            shutil.rmtree(doomed, ignore_errors=True)
        os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(save_dir: Path) -> list[str]:
    """Delete ``*.tmp`` directories an interrupted save or delete left in ``save_dir``.

    Only directories this package made (they hold the partial marker) or empty ones are removed;
    anything else a user put there is left alone. Call it only when no save is in flight.
    """
    removed = []
    for child in Path(save_dir).iterdir():
        if child.is_dir() and child.name.endswith(TMP_SUFFIX):
            if (child / PARTIAL_MARKER).exists() or not any(child.iterdir()):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child.name)
        elif child.is_file() and child.name.startswith(".") and child.name.endswith(TMP_SUFFIX):
            child.unlink(missing_ok=True)      # an interrupted `latest` replacement
            removed.append(child.name)
    return removed
