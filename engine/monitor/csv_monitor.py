"""``csv_monitor``: one CSV file per metric, in DeepSpeed's layout.

DeepSpeed 0.19.8 writes ``<output_path>/<job_name>/<name>.csv``, the file name being the event
name with ``/`` and spaces turned into ``_`` (``Train/Samples/lr`` -> ``Train_Samples_lr.csv``),
a header row ``step,<last /-part of the name>`` and one ``step,value`` row per event, with the
csv module's default ``\\r\\n`` line ends. orch writes the same files, so scripts that read
DeepSpeed's CSVs read orch's. Two differences, both on restart: the header is written only when
a file is new (DeepSpeed repeats it mid-file after every restart), and steps a previous attempt
of the run already wrote are skipped (see base.StepMark).

With ``output_path`` empty, the bundled trainer writes under ``<run dir>/csv_monitor`` (like its
TensorBoard files); a script without a run directory gets DeepSpeed's ``./<job_name>``.
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from .base import Event, Sink


def csv_log_dir(section: Any, run_dir: Path | None) -> Path:
    base = Path(section.output_path).expanduser() if section.output_path else (
        run_dir / "csv_monitor" if run_dir is not None else Path())
    return base / section.job_name


def csv_file_name(event_name: str) -> str:
    return event_name.replace("/", "_").replace(" ", "_") + ".csv"


def csv_header(event_name: str) -> list[str]:
    return ["step", event_name.split("/")[-1]]


class CsvMonitor(Sink):
    name = "csv_monitor"

    def __init__(self, log_dir: Path, state_dir: Path | None) -> None:
        super().__init__(state_dir)
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, tuple[IO[str], Any]] = {}

    def emit(self, events: Sequence[Event]) -> None:
        touched = set()
        for name, value, step in events:
            handle, writer = self._writer(name)
            writer.writerow([step, _plain(value)])
            touched.add(handle)
        for handle in touched:
            handle.flush()

    def _writer(self, name: str) -> tuple[IO[str], Any]:
        entry = self._files.get(name)
        if entry is None:
            path = self.log_dir / csv_file_name(name)
            new = not path.exists() or path.stat().st_size == 0
            handle = path.open("a", newline="")
            writer = csv.writer(handle)
            if new:
                writer.writerow(csv_header(name))
            entry = self._files[name] = (handle, writer)
        return entry

    def finish(self) -> None:
        for handle, _ in self._files.values():
            handle.close()
        self._files.clear()


def _plain(value: Any) -> Any:
    """Python numbers as they are; a tensor or numpy scalar as its Python value."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value
