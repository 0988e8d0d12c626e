"""The job registry: an SQLite record of every submitted job and its state history.

One file at ``$ORCH_HOME/registry.db`` (default ``~/.orch``). Several ``orch`` commands may run at
once (a ``--follow`` view, a ``cancel`` from another terminal, a cron ``orch list``): WAL mode
lets readers proceed while one writer commits, every write is one short transaction, and a busy
timeout makes a second writer wait instead of failing. A job record is never deleted by orch.
"""
from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .types import JobRef, JobState
from .errors import UserError

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id      TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    cluster     TEXT NOT NULL,
    native_id   TEXT NOT NULL DEFAULT '',
    run_dir     TEXT NOT NULL,
    spec_json   TEXT NOT NULL,
    state       TEXT NOT NULL,
    detail      TEXT NOT NULL DEFAULT '',
    restarts    INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id  TEXT NOT NULL REFERENCES jobs(job_id),
    state   TEXT NOT NULL,
    detail  TEXT NOT NULL DEFAULT '',
    at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_job ON events(job_id, id);
"""


def orch_home() -> Path:
    return Path(os.environ.get("ORCH_HOME", Path.home() / ".orch")).expanduser()


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    name: str
    cluster: str
    native_id: str
    run_dir: str
    spec: dict[str, Any]
    state: JobState
    detail: str
    restarts: int
    created_at: float
    updated_at: float

    @property
    def ref(self) -> JobRef:
        return JobRef(self.job_id, self.cluster, self.native_id, self.run_dir)  # type: ignore[arg-type]


@dataclass(frozen=True)
class StateEvent:
    state: JobState
    detail: str
    at: float


def new_job_id(name: str) -> str:
    """Readable and unique: the job name, the submit time and a random suffix."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


class Registry:
    """Job records in SQLite; open one per command, it holds no long-lived locks."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or orch_home() / "registry.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as db:
                db.executescript(_SCHEMA)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise self._corrupt(exc) from None

    def _corrupt(self, exc: Exception) -> UserError:
        return UserError(f"job registry {self.path} is unreadable ({exc})",
                         hint=f"move it aside (mv {self.path} {self.path}.bad) and orch starts a new one; "
                              "run directories and checkpoints are not affected")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._corrupt(exc) from None
        try:
            db.execute("PRAGMA busy_timeout = 30000")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            yield db
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            raise self._corrupt(exc) from None
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- writes --------------------------------------------------------------------------------
    def add(self, job_id: str, name: str, cluster: str, run_dir: str, spec: dict[str, Any],
            state: JobState = JobState.PENDING, native_id: str = "") -> None:
        now = time.time()
        with self._transaction() as db:
            db.execute("INSERT INTO jobs (job_id, name, cluster, native_id, run_dir, spec_json, state,"
                       " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (job_id, name, cluster, native_id, run_dir, json.dumps(spec), state.value, now, now))
            db.execute("INSERT INTO events (job_id, state, detail, at) VALUES (?, ?, 'submitted', ?)",
                       (job_id, state.value, now))

    def set_native_id(self, job_id: str, native_id: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET native_id = ?, updated_at = ? WHERE job_id = ?",
                       (native_id, time.time(), job_id))

    def update_state(self, job_id: str, state: JobState, detail: str = "", restarts: int | None = None) -> bool:
        """Record a state; an event is added only when state or detail changed. Returns changed."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT state, detail, restarts FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                raise UserError(f"no job {job_id!r} in the registry", hint="see `orch list`")
            new_restarts = row[2] if restarts is None else max(row[2], restarts)
            changed = (row[0], row[1]) != (state.value, detail)
            if JobState(row[0]).finished and not state.finished:
                return False  # a finished job never goes back to running (late, stale reports)
            db.execute("UPDATE jobs SET state = ?, detail = ?, restarts = ?, updated_at = ? WHERE job_id = ?",
                       (state.value, detail, new_restarts, now, job_id))
            if changed:
                db.execute("INSERT INTO events (job_id, state, detail, at) VALUES (?, ?, ?, ?)",
                           (job_id, state.value, detail, now))
            return changed

    # -- reads ---------------------------------------------------------------------------------
    _COLUMNS = "job_id, name, cluster, native_id, run_dir, spec_json, state, detail, restarts, created_at, updated_at"

    @staticmethod
    def _record(row: tuple[Any, ...]) -> JobRecord:
        return JobRecord(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), JobState(row[6]),
                         row[7], row[8], row[9], row[10])

    def get(self, job_id: str) -> JobRecord:
        """A job by id; a unique prefix or the name of the newest job with that name also works."""
        with self._connect() as db:
            row = db.execute(f"SELECT {self._COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                rows = db.execute(f"SELECT {self._COLUMNS} FROM jobs WHERE job_id LIKE ? || '%' "
                                  "ORDER BY created_at DESC", (job_id,)).fetchall()
                if len(rows) > 1:
                    names = {r[1] for r in rows}
                    if names != {job_id}:
                        raise UserError(f"{job_id!r} matches {len(rows)} jobs: "
                                        + ", ".join(r[0] for r in rows[:5]), hint="give more of the id")
                row = rows[0] if rows else None
        if row is None:
            raise UserError(f"no job {job_id!r} in the registry {self.path}", hint="see `orch list`")
        return self._record(row)

    def list(self, *, include_finished: bool = True, limit: int = 200) -> list[JobRecord]:
        with self._connect() as db:
            rows = db.execute(f"SELECT {self._COLUMNS} FROM jobs ORDER BY created_at DESC LIMIT ?",
                              (limit,)).fetchall()
        records = [self._record(r) for r in rows]
        return records if include_finished else [r for r in records if not r.state.finished]

    def history(self, job_id: str) -> list[StateEvent]:
        with self._connect() as db:
            rows = db.execute("SELECT state, detail, at FROM events WHERE job_id = ? ORDER BY id",
                              (job_id,)).fetchall()
        return [StateEvent(JobState(s), d, at) for s, d, at in rows]
