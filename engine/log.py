"""The engine's console output: the ``engine`` logger, printed by rank 0 unless a line says otherwise.

Every line the engine and its trainer print goes through ``logging.getLogger("engine")`` (or a
child such as ``engine.train``), so an application can raise the level, redirect or silence it
the usual way (``logging.getLogger("engine").setLevel(logging.WARNING)``). Like DeepSpeed's own
logger, ``engine`` has a console handler from the start, so a script that configures nothing
still sees the lines, and it does not propagate to the root logger (no duplicates when the
application adds its own handlers).

At hundreds of ranks the same line from every rank is noise: the handler passes only rank 0's
records. A line that concerns one rank (a hang watchdog dump) passes ``extra=ALL_RANKS``.
Informational lines go to stdout as ``[engine] ...``; warnings and errors to stderr. Lines of
``engine.train`` (the bundled trainer) read ``engine.train ...`` (``engine.train: ...`` for
warnings and errors), as its messages always have.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

ROOT = "engine"
TRAINER = "engine.train"
ALL_RANKS: dict[str, Any] = {"all_ranks": True}


def get_logger(name: str = ROOT) -> logging.Logger:
    """``engine`` or one of its children (``engine.train``); the console handler is installed once."""
    if not name.startswith(ROOT):
        raise ValueError(f"engine loggers are named 'engine' or 'engine.<part>', got {name!r}")
    _install()
    return logging.getLogger(name)


def process_rank() -> int:
    """This process's global rank: the process group's when it exists, else ``$RANK``, else 0."""
    dist = sys.modules.get("torch.distributed")  # never import torch just to log
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    raw = os.environ.get("RANK", "").strip()
    return int(raw) if raw.isdigit() else 0


class RankZeroFilter(logging.Filter):
    """Passes rank 0's records, and any record logged with ``extra=ALL_RANKS``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return bool(getattr(record, "all_ranks", False)) or process_rank() == 0


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if record.name == TRAINER or record.name.startswith(TRAINER + "."):
            # as the trainer always wrote them: "engine.train model tiny ...", "engine.train: [rank 1] ..."
            return f"{TRAINER}: {message}" if record.levelno >= logging.WARNING else f"{TRAINER} {message}"
        return f"[{ROOT}] {message}"


class ConsoleHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stdout below WARNING, stderr from WARNING up; the stream is looked up at each line, so
    a redirected ``sys.stdout`` (pytest's capture, a notebook) receives it."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(_Formatter())
        self.addFilter(RankZeroFilter())

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr if getattr(self, "_level_now", logging.INFO) >= logging.WARNING else sys.stdout

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ assigns one; ours is chosen per line
        pass

    def emit(self, record: logging.LogRecord) -> None:
        self._level_now = record.levelno
        super().emit(record)
        self.flush()


_installed = False


def _install() -> None:
    """Once per process; a level or handlers the application set before are kept."""
    global _installed
    if _installed:
        return
    _installed = True
    root = logging.getLogger(ROOT)
    if not root.handlers:
        root.addHandler(ConsoleHandler())
        root.propagate = False
    if root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
