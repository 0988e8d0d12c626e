"""Asynchronous saves: training continues while a background thread writes a CPU snapshot.

The caller (save.py) copies this rank's shard to CPU memory and gathers everything that needs a
collective (RNG states, the tag) before handing the job over, because collectives must not run
on a second thread next to the training step's. The writer thread therefore coordinates through
the checkpoint directory itself: each rank, once its files are written and fsynced, drops
``rank-<r>.done.json`` (its file records) into ``<tag>.tmp/``, or ``rank-<r>.failed.json`` if it
could not; rank 0's thread waits for all of them and then finishes the protocol (manifest,
renames, ``latest``). The directory must be shared between ranks, which the final rename needs
anyway.

The thread is not a daemon, so a process that returns from ``main`` still completes its last
checkpoint before exiting. ``wait()`` (called by the next save and by loads) joins it.
"""
from __future__ import annotations

import json
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["AsyncWriter", "DONE_SUFFIX", "wait_for_ranks"]

DONE_SUFFIX = ".done.json"
FAILED_SUFFIX = ".failed.json"
DEFAULT_TIMEOUT_S = 3600.0


def _record_path(tmp: Path, rank: int, suffix: str) -> Path:
    return tmp / f"rank-{rank:05d}{suffix}"


def _publish(tmp: Path, rank: int, suffix: str, payload: Any) -> None:
    path = _record_path(tmp, rank, suffix)
    part = path.with_name(path.name + ".part")
    with open(part, "w") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def wait_for_ranks(tmp: Path, world_size: int, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Rank 0: block until every rank's done record is in ``tmp``; returns all file records."""
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        failed = sorted(tmp.glob(f"rank-*{FAILED_SUFFIX}"))
        if failed:
            messages = [json.loads(p.read_text()).get("error", "?") for p in failed]
            raise RuntimeError("; ".join(messages))
        done = [_record_path(tmp, r, DONE_SUFFIX) for r in range(world_size)]
        if all(p.exists() for p in done):
            records: dict[str, Any] = {}
            for p in done:
                records.update(json.loads(p.read_text()))
                p.unlink()
            return records
        if time.monotonic() > deadline:
            missing = [r for r, p in enumerate(done) if not p.exists()]
            raise TimeoutError(f"ranks {missing} did not finish writing their shards within {timeout:.0f} s")
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


class AsyncWriter:
    """One background save at a time for one engine."""

    _all: "weakref.WeakSet[AsyncWriter]" = weakref.WeakSet()

    def __init__(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.timeout = timeout
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[str] = None
        self.last_tag: Optional[str] = None
        AsyncWriter._all.add(self)

    @classmethod
    def wait_all(cls) -> Optional[str]:
        """Join every engine's running save in this process (a load must see finished checkpoints)."""
        errors = [e for w in list(cls._all) if (e := w.wait())]
        return "; ".join(errors) or None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, job: Any, write: Callable[[Any], dict[str, Any]],
              finalize: Callable[[Any, dict[str, Any]], None]) -> None:
        """Run ``write(job)`` on every rank and ``finalize(job, records)`` on rank 0, in a thread."""
        if self._thread is not None:
            raise RuntimeError("internal: wait() for the previous asynchronous save before starting another")
        self.last_tag = job.tag
        self._thread = threading.Thread(target=self._run, args=(job, write, finalize),
                                        name=f"checkpoint-writer-{job.tag}", daemon=False)
        self._thread.start()

    def _run(self, job: Any, write: Callable[[Any], dict[str, Any]],
             finalize: Callable[[Any, dict[str, Any]], None]) -> None:
        try:
            records = write(job)
            _publish(job.tmp, job.rank, DONE_SUFFIX, records)
            if job.rank == 0:
                finalize(job, wait_for_ranks(job.tmp, job.world_size, self.timeout))
        except BaseException as exc:  # noqa: BLE001 - reported by wait()
            self._error = f"rank {job.rank}, checkpoint {job.tag!r}: {type(exc).__name__}: {exc}"
            try:
                _publish(job.tmp, job.rank, FAILED_SUFFIX, {"error": self._error})
            except OSError:
                pass

    def wait(self) -> Optional[str]:
        """Join the running save; returns its error message (None when it succeeded or none ran)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        return error
