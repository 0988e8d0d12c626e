"""``comms_logger``: the communication ledger, per op, with latency and bandwidth, like DeepSpeed's.

What moved comes from the engine's one communication ledger (engine/comm_ledger.py: op, dtype,
elements, calls, ring bytes): this module keeps no second count of it. What the ledger does not
know is how long each collective took, so when ``comms_logger.enabled`` is set the logger times
the engine's ``Comm`` calls (only those ``prof_all`` / ``prof_ops`` select), grouped by op and
message size as DeepSpeed's ``log_summary`` prints them. Bandwidths follow nccl-tests (and
DeepSpeed): algorithmic bandwidth = message / time (all_reduce: 2× message), bus bandwidth
scaled by (N−1)/N (all_reduce: 2(N−1)/N), in Gbit/s. Message size is the ledger's logical
message: the whole output of an all_gather, the whole input of a reduce_scatter.

Timing a collective means waiting for it (on a GPU, synchronising the device, as DeepSpeed
does), so this is a diagnostic: leave it off for production runs. ``verbose`` prints every op
as it completes; ``debug`` adds the engine function that issued it to the op's name.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Comm methods that issue exactly one ledger-recorded collective per call, and the op they record.
TIMED_METHODS = {"all_reduce": "all_reduce", "all_gather_into": "all_gather",
                 "reduce_scatter_into": "reduce_scatter", "all_to_all_into": "all_to_all", "broadcast": "broadcast"}
# Positional tensor arguments before ``async_op`` (broadcast: the tensor and ``src``, async_op by keyword).
TENSOR_ARGS = {"all_reduce": 1, "all_gather": 2, "reduce_scatter": 2, "all_to_all": 2}
# Ops whose ledger message is the second tensor argument (the input), not the first.
INPUT_MESSAGE = frozenset({"reduce_scatter", "all_to_all"})


@dataclass
class OpTimes:
    """Latencies (ms) of one (op name, message bytes) group."""

    latencies_ms: list[float] = field(default_factory=list)


def bandwidths_gbps(op: str, nbytes: int, ms: float, world: int) -> tuple[float, float]:
    """(algorithmic, bus) bandwidth in Gbit/s of ``op`` moving ``nbytes`` in ``ms`` milliseconds."""
    if ms <= 0 or world < 1:
        return 0.0, 0.0
    per_s = nbytes / (ms / 1000.0)
    if op == "all_reduce":
        alg, bus = 2 * per_s, per_s * 2 * (world - 1) / world
    elif op in ("all_gather", "reduce_scatter", "all_to_all"):
        alg, bus = per_s, per_s * (world - 1) / world
    else:  # reduce, broadcast: one message crosses each link once
        alg = bus = per_s
    return alg * 8 / 1e9, bus * 8 / 1e9


def human_size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1024 or unit == "TB":
            return f"{nbytes:.4g} {unit}"
        nbytes /= 1024
    return f"{nbytes} B"


_latest: "CommsLogger | None" = None


def log_summary() -> str:
    """DeepSpeed's ``deepspeed.comm.log_summary()``: the table of the engine's comms logger ("" if none)."""
    return _latest.log_summary() if _latest is not None else ""


class CommsLogger:
    """Times one ``Comm``'s collectives; ``summary``/``log_summary`` join them with the ledger."""

    def __init__(self, section: Any, comm: Any, out: Callable[[str], None] | None = None) -> None:
        global _latest
        _latest = self
        self.verbose, self.debug = bool(section.verbose), bool(section.debug)
        self.prof_all, self.prof_ops = bool(section.prof_all), list(section.prof_ops)
        self.comm = comm
        self.times: dict[tuple[str, int], OpTimes] = {}
        self._out = out or _engine_log
        self._sync = _device_sync(comm)
        self._ledger_start = comm.ledger.by_op()  # what moved before the logger started (model broadcast)
        for method, op in TIMED_METHODS.items():
            if hasattr(comm, method):
                setattr(comm, method, self._timed(getattr(comm, method), op))

    def profiled(self, op: str) -> bool:
        return self.prof_all or op in self.prof_ops

    def _timed(self, call: Callable[..., Any], op: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not (self.comm.active and self.profiled(op)):
                return call(*args, **kwargs)
            message = args[1] if op in INPUT_MESSAGE else args[0]
            return self._measure(op, message.numel() * message.element_size(), call, args, kwargs)
        return timed

    def _measure(self, op: str, nbytes: int, call: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        kwargs = {k: v for k, v in kwargs.items() if k != "async_op"}
        args = args[:TENSOR_ARGS[op]] if op in TENSOR_ARGS else args  # drop a positional async_op
        start = self._start()
        handle = call(*args, **kwargs)  # synchronous: the time is the collective's
        ms = self._stop(start)
        self._add(op, nbytes, ms)
        return handle

    def _start(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()

    def _stop(self, start: float) -> float:
        if self._sync is not None:
            self._sync()
        return 1000.0 * (time.perf_counter() - start)

    def _add(self, op: str, nbytes: int, ms: float) -> None:
        name = f"{op} | [Caller Func: {_caller()}]" if self.debug else op
        self.times.setdefault((name, nbytes), OpTimes()).latencies_ms.append(ms)
        if self.verbose and self.comm.rank == 0:
            alg, bus = bandwidths_gbps(op, nbytes, ms, self.comm.world_size)
            self._out(f"comm op: {name} | time (ms): {ms:.2f} | msg size: {human_size(nbytes)} | "
                      f"algbw (Gbps): {alg:.2f} | busbw (Gbps): {bus:.2f}")

    def summary(self) -> list[dict[str, Any]]:
        """One row per (op, message size): count, total and mean latency, mean alg/bus bandwidth."""
        rows = []
        for (name, nbytes), times in sorted(self.times.items()):
            lat = times.latencies_ms
            op = name.split(" |")[0]
            bws = [bandwidths_gbps(op, nbytes, ms, self.comm.world_size) for ms in lat]
            rows.append({"op": name, "msg_bytes": nbytes, "count": len(lat), "total_latency_ms": sum(lat),
                         "avg_latency_ms": sum(lat) / len(lat), "algbw_gbps": sum(b[0] for b in bws) / len(bws),
                         "busbw_gbps": sum(b[1] for b in bws) / len(bws)})
        return rows

    def ledger_since_start(self) -> dict[str, dict[str, Any]]:
        """The ledger's per-op totals since this logger started (what ``summary`` can have timed)."""
        out = {}
        for key, entry in self.comm.ledger.by_op().items():
            before = self._ledger_start.get(key, {})
            delta = {k: v - before.get(k, 0) for k, v in entry.items()}
            if delta["calls"]:
                out[key] = delta
        return out

    def log_summary(self) -> str:
        """DeepSpeed's ``log_summary`` table (rank 0 prints it) followed by the ledger's totals per op."""
        text = format_summary(self.summary(), self.ledger_since_start())
        if self.comm.rank == 0:
            self._out(text)
        return text


def format_summary(rows: list[dict[str, Any]], ledger_by_op: dict[str, dict[str, Any]]) -> str:
    cols = ("Comm. Op", "Message Size", "Count", "Total Latency(ms)", "Avg Latency(ms)", "tput_avg (Gbps)",
            "busbw_avg (Gbps)")
    lines = ["".join(f"{c: <20}" for c in cols)]
    last_op = None
    for r in rows:
        op = r["op"] if r["op"] != last_op else ""
        last_op = r["op"]
        lines.append(f"{op: <20}{human_size(r['msg_bytes']): <20}{r['count']: <20}{r['total_latency_ms']: <20.2f}"
                     f"{r['avg_latency_ms']: <20.2f}{r['algbw_gbps']: <20.2f}{r['busbw_gbps']: <20.2f}")
    lines.append("Communication ledger (this rank, since the comms logger started):")
    lines.append("".join(f"{c: <24}" for c in ("Op/dtype", "Calls", "Elements", "Bytes sent", "Bytes received")))
    for key, e in sorted(ledger_by_op.items()):
        lines.append(f"{key: <24}{e['calls']: <24}{e['elements']: <24}{human_size(e['bytes_sent']): <24}"
                     f"{human_size(e['bytes_received']): <24}")
    return "\n".join(lines)


def _engine_log(text: str) -> None:
    from engine.log import get_logger

    get_logger("engine.monitor").info(text)


def _device_sync(comm: Any) -> Callable[[], None] | None:
    if comm.backend == "nccl":
        import torch

        return torch.cuda.synchronize
    return None


def _caller() -> str:
    """The first function outside this module and engine/comm.py that issued the collective."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.endswith(("comms_logger.py", "comm.py")):
        frame = frame.f_back
    return frame.f_code.co_name if frame is not None else "?"
