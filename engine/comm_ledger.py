"""The communication ledger: what every collective the engine issues moved, per rank.

Why: at 2-4 CPU ranks every collective plan "works"; at 512 NCCL ranks the difference between
moving 3Ψ and N×Ψ bytes per step decides whether a job trains or crawls. The ledger makes that
visible without a GPU: ``engine.comm.Comm`` records every call it issues (op, dtype, element
count, call count, and the bytes this rank sends and receives), the scale simulator
(``python -m bench.scale``) reads it under a fake process group of any size, and the trainer puts
per-step totals into its metrics records.

Bytes are those of the bandwidth-optimal ring algorithm NCCL uses for large messages (the same
factors nccl-tests uses for "bus bandwidth"), for a message of ``S`` bytes on ``N`` ranks:

=====================  =======================================  ==================================
op                     sent by this rank                        received by this rank
=====================  =======================================  ==================================
all_reduce             2·S·(N−1)/N                              same
all_gather             S_out·(N−1)/N (S_out: the whole output)  same
reduce_scatter         S_in·(N−1)/N (S_in: the whole input)     same
all_to_all             S·(N−1)/N (S: the whole input)           same
reduce (to ``dst``)    S, except ``dst`` sends 0                S, except the ring's head (dst+1)
broadcast (from src)   S, except the ring's tail (src−1)        S, except ``src``
=====================  =======================================  ==================================

These are exactly the volumes the ZeRO paper counts (arXiv:1910.02054 §7: stage 1/2 move
2Ψ·(N−1)/N elements per step, stage 3 3Ψ·(N−1)/N), so the ledger can be compared with them.
"""
from __future__ import annotations

import contextlib
import inspect
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

__all__ = ["CommLedger", "LedgerEntry", "ledger", "record_torch_collectives", "ring_bytes"]


@dataclass
class LedgerEntry:
    """Totals for one (op, dtype) pair."""

    op: str
    dtype: str
    calls: int = 0
    elements: int = 0          # elements of the logical message (the full output/input, see ring_bytes)
    bytes_sent: int = 0
    bytes_received: int = 0

    def add(self, elements: int, sent: int, received: int) -> None:
        self.calls += 1
        self.elements += elements
        self.bytes_sent += sent
        self.bytes_received += received


def ring_bytes(op: str, nbytes: int, world: int, rank: int, peer: int = 0) -> tuple[int, int]:
    """``(sent, received)`` bytes of ``op`` on a message of ``nbytes`` (see the module docstring).

    ``peer`` is the destination of ``reduce`` and the source of ``broadcast``.
    """
    if world <= 1:
        return 0, 0
    if op == "all_reduce":
        both = 2 * nbytes * (world - 1) // world
        return both, both
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        both = nbytes * (world - 1) // world
        return both, both
    if op == "reduce":
        return (0 if rank == peer else nbytes), (0 if rank == (peer + 1) % world else nbytes)
    if op == "broadcast":
        return (0 if rank == (peer - 1) % world else nbytes), (0 if rank == peer else nbytes)
    raise ValueError(f"unknown collective {op!r}")


@dataclass
class CommLedger:
    """Per-(op, dtype) totals since the last ``reset``, plus per-step deltas (``mark_step``)."""

    entries: dict[tuple[str, str], LedgerEntry] = field(default_factory=dict)
    enabled: bool = True
    _step_start: dict[tuple[str, str], tuple[int, int, int, int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, op: str, tensor: torch.Tensor, world: int, rank: int, *, peer: int = 0,
               elements: Optional[int] = None) -> None:
        """One call of ``op`` whose logical message is ``tensor`` (or ``elements`` of its dtype)."""
        if not self.enabled:
            return
        numel = tensor.numel() if elements is None else int(elements)
        sent, received = ring_bytes(op, numel * tensor.element_size(), world, rank, peer)
        key = (op, str(tensor.dtype).removeprefix("torch."))
        with self._lock:
            entry = self.entries.get(key)
            if entry is None:
                entry = self.entries[key] = LedgerEntry(*key)
            entry.add(numel, sent, received)

    def reset(self) -> None:
        with self._lock:
            self.entries.clear()
            self._step_start.clear()

    def totals(self) -> dict[str, int]:
        """``calls``, ``bytes_sent``, ``bytes_received`` over every op since the last reset."""
        with self._lock:
            entries = list(self.entries.values())
        return {"calls": sum(e.calls for e in entries), "bytes_sent": sum(e.bytes_sent for e in entries),
                "bytes_received": sum(e.bytes_received for e in entries)}

    def by_op(self) -> dict[str, dict[str, Any]]:
        """``{"all_gather/bfloat16": {"calls", "elements", "bytes_sent", "bytes_received"}, ...}``."""
        with self._lock:
            return {f"{e.op}/{e.dtype}": {"calls": e.calls, "elements": e.elements, "bytes_sent": e.bytes_sent,
                                          "bytes_received": e.bytes_received} for e in self.entries.values()}

    def mark_step(self) -> dict[str, int]:
        """Totals since the previous ``mark_step`` (what one training step moved); starts the next."""
        with self._lock:
            now = {k: (e.calls, e.elements, e.bytes_sent, e.bytes_received) for k, e in self.entries.items()}
            before = self._step_start
            self._step_start = now
        delta = [tuple(v[i] - before.get(k, (0, 0, 0, 0))[i] for i in range(4)) for k, v in now.items()]
        return {"comm_calls": sum(d[0] for d in delta), "comm_bytes_sent": sum(d[2] for d in delta),
                "comm_bytes_received": sum(d[3] for d in delta)}


ledger = CommLedger()
"""The process's ledger: ``Comm`` records into it; read it with ``totals()``/``by_op()``."""


@contextlib.contextmanager
def record_torch_collectives(book: CommLedger, group: Any = None) -> Iterator[CommLedger]:
    """Record collectives other code issues through ``torch.distributed`` (a peer such as FSDP2).

    Wraps the module-level functions for the duration of the block, so a peer's traffic is
    counted by the same rules as the engine's.
    """
    import torch.distributed as dist

    def wrap(name: str, op: str, argument: str) -> tuple[Any, Any]:
        original = getattr(dist, name)
        signature = inspect.signature(original)

        def call(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs).arguments
            group = bound.get("group")
            book.record(op, bound[argument], dist.get_world_size(group), dist.get_rank(group))
            return original(*args, **kwargs)

        return original, call

    specs = {   # function -> (op, the argument holding the logical message)
        "all_gather_into_tensor": ("all_gather", "output_tensor"),
        "all_gather_single": ("all_gather", "output_tensor"),
        "reduce_scatter_tensor": ("reduce_scatter", "input"),
        "reduce_scatter_single": ("reduce_scatter", "input"),
        "all_reduce": ("all_reduce", "tensor"),
        "broadcast": ("broadcast", "tensor"),
    }
    saved = {}
    try:
        for name, (op, argument) in specs.items():
            if hasattr(dist, name):
                saved[name], patched = wrap(name, op, argument)
                setattr(dist, name, patched)
        yield book
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)
