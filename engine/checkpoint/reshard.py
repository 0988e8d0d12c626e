"""Which byte ranges of which saved shards one rank reads to fill its new partition.

Saved and loading layouts are both described per parameter: the saved manifest says which
``(rank, offset, length)`` runs hold each parameter's flattened elements; the loading rank's
layout says which elements of which parameters its partition holds and where. Matching by
parameter *name* (not by position) means the two layouts may differ in world size, ZeRO stage,
padding, parameter-group split and even parameter order. The result is a list of reads, each a
contiguous run of one saved rank's flat tensor copied into a contiguous run of the new one;
consecutive runs are merged, so a partition that maps onto one saved partition is one read.

No torch and no I/O here: this is interval arithmetic, tested on its own.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["Piece", "Read", "coalesce", "plan_reads", "source_runs", "target_pieces"]


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, start+length)`` of parameter ``name`` go to ``offset`` of the new partition."""

    name: str
    start: int
    length: int
    offset: int


@dataclass(frozen=True)
class Read:
    """Copy ``length`` elements from saved rank ``rank``'s flat tensor at ``src`` to ``dst``."""

    rank: int
    src: int
    dst: int
    length: int


def target_pieces(params: Sequence[tuple[str, int, int]],
                  segments: Iterable[tuple[int, int, int]]) -> list[Piece]:
    """Cut a rank's partition into per-parameter pieces.

    ``params``: ``(name, canonical_offset, numel)`` sorted by offset; ``segments``: the rank's
    ``(canonical_start, canonical_end, local_start)`` runs of real elements.
    """
    starts = [p[1] for p in params]
    out = []
    for lo, hi, local in segments:
        i = max(0, bisect.bisect_right(starts, lo) - 1)
        while i < len(params) and params[i][1] < hi:
            name, offset, numel = params[i]
            a, b = max(lo, offset), min(hi, offset + numel)
            if b > a:
                out.append(Piece(name, a - offset, b - a, local + a - lo))
            i += 1
    return out


def source_runs(saved_params: Iterable[Mapping[str, Any]]) -> dict[str, list[tuple[int, int, int, int]]]:
    """``name -> [(param_start, rank, offset, length)]`` from a manifest's ``params``."""
    out = {}
    for p in saved_params:
        runs, pos = [], 0
        for rank, offset, length in p["ranges"]:
            runs.append((pos, int(rank), int(offset), int(length)))
            pos += int(length)
        out[p["name"]] = runs
    return out


def plan_reads(pieces: Iterable[Piece], sources: Mapping[str, list[tuple[int, int, int, int]]]) -> list[Read]:
    """The reads that fill every piece whose parameter the checkpoint holds (others are skipped)."""
    reads = []
    for piece in pieces:
        runs = sources.get(piece.name)
        if not runs:
            continue
        lo, hi = piece.start, piece.start + piece.length
        i = max(0, bisect.bisect_right([r[0] for r in runs], lo) - 1)
        while i < len(runs) and runs[i][0] < hi:
            start, rank, offset, length = runs[i]
            a, b = max(lo, start), min(hi, start + length)
            if b > a:
                reads.append(Read(rank, offset + a - start, piece.offset + a - lo, b - a))
            i += 1
    return coalesce(reads)


def coalesce(reads: Iterable[Read]) -> list[Read]:
    """Merge reads that continue each other in both the source and the destination."""
    out: list[Read] = []
    for r in sorted(reads, key=lambda r: (r.rank, r.src)):
        last = out[-1] if out else None
        if last and last.rank == r.rank and last.src + last.length == r.src and last.dst + last.length == r.dst:
            out[-1] = Read(last.rank, last.src, last.dst, last.length + r.length)
        else:
            out.append(r)
    return out
