"""Which steps a W&B run already holds, so a restarted trainer logs the rest and nothing twice.

Online, W&B's server knows: a resumed run's ``run.step`` is the next step it will accept.
Offline, each attempt writes its own ``wandb/offline-run-<time>-<id>/run-<id>.wandb``, and the
process writes that file only every ``x_transaction_log_flush_interval`` seconds (and at the
end): a killed attempt may have handed steps to W&B that never reached the disk. So the
truth is the files themselves, read here: a LevelDB-style log (7-byte file header, 32 KiB
blocks, records with a 7-byte header: CRC32, length, type FULL/FIRST/MIDDLE/LAST) of protobuf
``Record`` messages, W&B's ``datastore`` format. A torn tail, as a kill leaves, ends the scan.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(data: bytes) -> Iterator[bytes]:
    pos, partial = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        pos += HEADER
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        chunk = data[pos:pos + length]
        if len(chunk) < length:
            return
        pos += length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            partial = chunk
        elif kind == MIDDLE:
            partial += chunk
        elif kind == LAST:
            yield partial + chunk


def records(path: Path) -> Iterator[Any]:
    """The protobuf ``Record`` messages of one ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in raw_records(path.read_bytes()):
        record = pb.Record()
        try:
            record.ParseFromString(raw)
        except Exception:  # a torn record: what follows is unreadable
            return
        yield record


def history_steps(path: Path) -> list[int]:
    steps = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                if (item.key or "/".join(item.nested_key)) == "_step":
                    steps.append(int(json.loads(item.value_json)))
    return steps


def offline_last_step(wandb_dir: Path, run_id: str, exclude: Path | None = None) -> int:
    """The highest step any earlier offline attempt of ``run_id`` under ``wandb_dir`` wrote (-1: none)."""
    top = -1
    for run_path in wandb_dir.glob(f"offline-run-*-{run_id}"):
        if exclude is not None and run_path.resolve() == exclude.resolve():
            continue
        for path in run_path.glob(f"run-{run_id}.wandb"):
            top = max([top, *history_steps(path)])
    return top


def held_through(run: Any) -> int:
    """The highest step this W&B run already holds (-1: none): the server's, or the offline files'."""
    if getattr(run.settings, "_offline", False) or getattr(run.settings, "mode", "") == "offline":
        run_path = Path(run.dir).parent  # <wandb dir>/offline-run-<time>-<id>/files
        return offline_last_step(run_path.parent, run.id, exclude=run_path)
    return int(run.step) - 1 if getattr(run, "resumed", False) and run.step else -1
