"""What ``orch list`` prints: a table for people, tab-separated rows or JSON for scripts.

The values a user copies from the listing and types back (the job id, the cluster's own id,
the cluster name) are never shortened: in a narrow terminal the other columns wrap first, and
when even that cannot make room, each job becomes a short block headed by its full id. UI only;
the records come from the registry.
"""
from __future__ import annotations

import datetime as _dt
import json
import textwrap
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

from rich.console import Console

from .registry import JobRecord

OUTPUTS = ("table", "plain", "json")
# One row of ``--plain`` output, in this order (tab-separated, no header: ``cut -f1`` gives the ids)
PLAIN_FIELDS = ("job_id", "cluster", "state", "restarts", "submitted", "native_id", "detail")
_GAP = 2           # spaces between table columns (no vertical lines: every column is for content)
_DETAIL_MIN = 24   # narrowest detail column; with less room the detail goes below its row


def row(record: JobRecord) -> dict[str, Any]:
    """One job as scripts see it (``-o json``; ``--plain`` prints these values in PLAIN_FIELDS order)."""
    return {
        "job_id": record.job_id, "name": record.name, "cluster": record.cluster, "state": record.state.value,
        "restarts": record.restarts,
        "submitted": _dt.datetime.fromtimestamp(record.created_at).astimezone().isoformat(timespec="seconds"),
        "native_id": record.native_id, "run_dir": record.run_dir, "detail": record.detail,
    }


def plain_text(records: Sequence[JobRecord]) -> str:
    """Tab-separated rows, one job per line; tabs and newlines inside a value become spaces."""
    lines = []
    for record in records:
        values = row(record)
        lines.append("\t".join(" ".join(str(values[f]).split()) for f in PLAIN_FIELDS))
    return "".join(line + "\n" for line in lines)


def json_text(records: Sequence[JobRecord]) -> str:
    return json.dumps([row(r) for r in records], indent=2) + "\n"


def _submitted(created_at: float, now: _dt.datetime) -> str:
    """``05:36`` for today's jobs, ``12-06 05:36`` before (the full time is in ``-o json``)."""
    when = _dt.datetime.fromtimestamp(created_at)
    return when.strftime("%H:%M") if when.date() == now.date() else when.strftime("%m-%d %H:%M")


def _state_cell(record: JobRecord) -> str:
    """The state word, and the restart count when there were restarts (wraps below the word)."""
    n = record.restarts
    return record.state.value + (f" {n} restart{'s' if n != 1 else ''}" if n else "")


@dataclass
class _Column:
    header: str
    cells: list[str]
    keep: bool = False      # never broken or shortened: a value users copy and type back
    floor: int = 0          # narrowest a wrapping column may become

    def natural(self) -> int:
        return max(len(v) for v in [self.header, *self.cells])

    def least(self) -> int:
        if self.keep:
            return self.natural()
        words = [len(w) for v in [self.header, *self.cells] for w in v.split()]
        return max([self.floor, *words]) if self.floor == 0 else self.floor


def _columns(records: Sequence[JobRecord], now: _dt.datetime, with_time: bool,
             with_detail: bool) -> list[_Column]:
    cols = [_Column("job id", [r.job_id for r in records], keep=True),
            _Column("cluster", [r.cluster for r in records], keep=True),
            _Column("state", [_state_cell(r) for r in records])]
    if with_time:
        cols.append(_Column("time", [_submitted(r.created_at, now) for r in records]))
    cols.append(_Column("native id", [r.native_id for r in records], keep=True))
    if with_detail:
        cols.append(_Column("detail", [r.detail for r in records], floor=_DETAIL_MIN))
    return cols


def _fit(cols: list[_Column], width: int) -> list[int] | None:
    """Column widths within ``width``: wrapping columns give up space (widest first) down to their
    least; None when even that is too wide."""
    widths = [c.natural() for c in cols]
    excess = sum(widths) + _GAP * (len(cols) - 1) - width
    while excess > 0:
        room = [(w - c.least(), i) for i, (c, w) in enumerate(zip(cols, widths)) if w > c.least()]
        if not room:
            return None
        _, i = max(room)
        widths[i] -= 1
        excess -= 1
    return widths


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=False) or [""]


def table_lines(records: Sequence[JobRecord], width: int) -> list[str]:
    """The listing as lines of at most ``width`` characters (ids whole, never cut): one row per job
    with its detail beside it, or below it when the row leaves the detail too little room, or one
    block per job when even the row does not fit."""
    now = _dt.datetime.now()
    for with_detail, with_time in ((True, True), (False, True), (False, False)):
        cols = _columns(records, now, with_time, with_detail)
        widths = _fit(cols, width)
        if widths is not None:
            break
    else:
        return _blocks(records, now, width)
    lines = _row_lines([c.header for c in cols], cols, widths)
    lines.append("-" * (sum(widths) + _GAP * (len(cols) - 1)))
    for record, cells in zip(records, zip(*(c.cells for c in cols))):
        lines += _row_lines(list(cells), cols, widths)
        if not with_detail and record.detail:
            lines += textwrap.wrap(record.detail, width, initial_indent="    ", subsequent_indent="    ",
                                   break_on_hyphens=False)
    return lines


def _row_lines(cells: list[str], cols: list[_Column], widths: list[int]) -> list[str]:
    """One row; a wrapping column's cell continues on the next lines, kept values stay whole."""
    wrapped = [[v] if c.keep else _wrap(v, w) for c, v, w in zip(cols, cells, widths)]
    return [(" " * _GAP).join((w[k] if k < len(w) else "").ljust(n) for w, n in zip(wrapped, widths)).rstrip()
            for k in range(max(map(len, wrapped)))]


def _blocks(records: Sequence[JobRecord], now: _dt.datetime, width: int) -> list[str]:
    """For terminals too narrow for a table: the full id on its own line, the rest indented below."""
    lines: list[str] = []
    for r in records:
        lines.append(r.job_id)
        about = f"{r.cluster}  {_state_cell(r)}  submitted {_submitted(r.created_at, now)}"
        for text in (about, f"native id {r.native_id}", r.detail):
            lines += textwrap.wrap(text, max(width, 20), initial_indent="  ", subsequent_indent="    ",
                                   break_long_words=False, break_on_hyphens=False)
    return lines


def print_table(console: Console, records: Sequence[JobRecord], title: str) -> None:
    console.print(title, markup=False, highlight=False)
    for line in table_lines(records, console.width):
        console.print(line, markup=False, highlight=False)
