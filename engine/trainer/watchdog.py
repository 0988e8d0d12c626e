"""The hang watchdog: when no training step completes in time, every rank says where it is stuck.

A distributed job that hangs (one rank stuck in a data loader, a deadlock, a rank that never
enters a collective the others wait in) otherwise sits silent until the collective timeout,
often 30 minutes or more, and leaves nothing to debug. Each rank runs a small thread that the
trainer feeds after every completed step and checkpoint save (``beat``), and after each phase of
its first step, where kernels compile (``progress``). When ``timeout_s`` passes without one,
the thread

1. writes ``<run_dir>/hang/rank-<r>.txt``: the phase the rank was in (from the trainer's
   StepTimer), the Python stack of every thread (``faulthandler``), and the last collectives
   this rank entered from torch.distributed's flight recorder (NCCL's own for an NCCL group, the
   generic one for gloo; ``engine.init_distributed`` turns it on, engine/flight_recorder.py);
2. prints a line saying so, and hands the same message to torchrun's error file so the
   launcher's failure summary names the dumps;
3. waits a short while for the other ranks' dumps (all watchdogs fire within about one poll
   interval of each other, because the last completed step is common to all ranks), then
   exits with status ``HANG_EXIT_CODE`` so the job fails instead of hanging.

A C-level ``faulthandler.dump_traceback_later`` backs this up: should a call hold the GIL
forever, the Python thread cannot run, and that fallback dumps the stacks to stderr and exits.

``ORCH_TEST_STALL=<rank>@<step>`` (tests only) makes that rank sleep inside that step.
"""
from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine import flight_recorder
from engine.log import ALL_RANKS, TRAINER, get_logger
from engine.run_contract import ENV_TEST_STALL, ENV_WATCHDOG_TIMEOUT, RunPaths
from engine.trainer.step_timer import Position

HANG_EXIT_CODE = 124  # as GNU timeout: "the command timed out"
FLIGHT_RECORDER_ENV = flight_recorder.BUFFER_ENV
LAST_COLLECTIVES = 8

log = get_logger(TRAINER)


class Watchdog:
    """One per rank; ``start`` before the loop, ``beat`` after each step, ``stop`` at the end."""

    def __init__(self, timeout_s: float, run_dir: Path, rank: int, world_size: int,
                 position: Callable[[], Position | None], *,
                 on_hang: Callable[[str], None] | None = None, grace_s: float | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError(f"watchdog timeout must be > 0 seconds, got {timeout_s}")
        self.timeout_s, self.run_dir, self.rank, self.world_size = timeout_s, Path(run_dir), rank, world_size
        self.hang_dir = RunPaths(self.run_dir).hang
        self._position, self._on_hang = position, on_hang
        self._poll_s = min(1.0, timeout_s / 10)
        self._grace_s = grace_s if grace_s is not None else min(30.0, max(5.0, timeout_s / 2))
        self._last_beat = time.monotonic()
        self._last_step: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="orch-hang-watchdog", daemon=True)

    @property
    def dump_path(self) -> Path:
        return self.hang_dir / f"rank-{self.rank}.txt"

    def start(self) -> None:
        self._last_beat = time.monotonic()
        self._arm_fallback()
        self._thread.start()

    def beat(self, step: int | None = None) -> None:
        """A step (or a checkpoint, an evaluation) completed: the rank is making progress."""
        self._last_beat = time.monotonic()
        self._last_step = step
        self._arm_fallback()

    def progress(self) -> None:
        """A part of a step completed (the first step's compiling phases): the clock restarts, the
        last completed step stays."""
        self.beat(self._last_step)

    def stop(self) -> None:
        self._stop.set()
        faulthandler.cancel_dump_traceback_later()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    # -- inside the watchdog thread ----------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            if time.monotonic() - self._last_beat > self.timeout_s:
                self._fire()
                return

    def _fire(self) -> None:
        fired_at = time.time()
        position = self._position()
        message = self.message(position)
        try:
            self.dump(position)
        except OSError as exc:
            message += f" (could not write {self.dump_path}: {exc}; stacks follow on stderr)"
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        log.error(f"[rank {self.rank}] {message}", extra=ALL_RANKS)
        _write_torchelastic_error(message)
        if self._on_hang is not None:
            try:
                self._on_hang(message)
            except Exception:  # noqa: BLE001 - reporting must not stop the exit
                pass
        self._wait_for_peers(fired_at)
        if self.rank == 0:
            _print_summary(self.hang_dir, self.world_size)
        faulthandler.cancel_dump_traceback_later()
        os._exit(HANG_EXIT_CODE)

    def message(self, position: Position | None) -> str:
        where = position.describe() if position is not None else "before the first step"
        return (f"hang watchdog: no training step completed in {self.timeout_s:g} s (this rank was in "
                f"{where}). Python stacks of every thread and the last collectives are in "
                f"{self.dump_path} (every rank writes its own file in {self.hang_dir}/); exiting with "
                f"status {HANG_EXIT_CODE}. If steps legitimately take longer, raise --watchdog-timeout "
                f"(or {ENV_WATCHDOG_TIMEOUT}); 0 turns the watchdog off.")

    def dump(self, position: Position | None) -> Path:
        self.hang_dir.mkdir(parents=True, exist_ok=True)
        with self.dump_path.open("a") as f:
            f.write(f"=== hang on rank {self.rank}/{self.world_size} at "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')} (host {socket.gethostname()}, pid {os.getpid()}, "
                    f"restart {os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}) ===\n")
            f.write(f"no step completed for {time.monotonic() - self._last_beat:.1f} s "
                    f"(timeout {self.timeout_s:g} s); last completed step: {self._last_step}\n")
            f.write(f"phase: {position.describe() if position else 'before the first step'}\n")
            lines, note = last_collectives()
            f.write(f"last collective entered: {lines[-1] if lines else 'none recorded'}\n\n")
            f.write("--- last collectives entered (torch.distributed flight recorder) ---\n")
            f.write("\n".join(lines or [note]) + "\n\n")
            f.write("--- Python stacks (most recent call first) ---\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.write("\n")
        return self.dump_path

    def _wait_for_peers(self, fired_at: float) -> None:
        """Until every rank's dump is fresh (and, on other ranks, rank 0's summary: the first rank
        to exit makes torchrun stop the rest), or the grace period ends (no shared disk)."""
        deadline = time.monotonic() + self._grace_s
        fresh_after = fired_at - self.timeout_s / 2 - 2 * self._poll_s
        wanted = [self.hang_dir / f"rank-{r}.txt" for r in range(self.world_size)]
        if self.rank != 0:
            wanted.append(self.hang_dir / "summary.txt")
        while time.monotonic() < deadline:
            if all(_modified_after(p, fresh_after) for p in wanted):
                return
            time.sleep(0.2)

    def _arm_fallback(self) -> None:
        # Fires only if the Python thread above could not act within a further grace period.
        faulthandler.dump_traceback_later(self.timeout_s + self._grace_s + 30, exit=True)


def last_collectives(limit: int = LAST_COLLECTIVES) -> tuple[list[str], str]:
    """(lines, note): this rank's newest flight-recorder entries, one line each, oldest first;
    when there are none, ``note`` says why. NCCL's recorder for an NCCL group, the generic one
    for gloo (engine.flight_recorder)."""
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return [], "(no process group: a single-process run)"
        backend = str(dist.get_backend())
        data = flight_recorder.dump(backend)
    except Exception as exc:  # noqa: BLE001 - a private API: say why, never fail the dump
        return [], f"(flight recorder unavailable in this torch: {exc.__class__.__name__}: {exc})"
    entries = data.get("entries") or []
    if not entries:
        return [], (f"(none recorded by {flight_recorder.dump_function_name(backend)}: set "
                    f"{FLIGHT_RECORDER_ENV}=2000 before the process group is created)")
    return [_describe_entry(e) for e in entries[-limit:]], ""


def _describe_entry(e: dict[str, Any]) -> str:
    # gloo reports every entry as "scheduled" and marks finished ones "retired"; NCCL's recorder
    # moves an entry's state to "completed" when its CUDA event fires.
    done = "completed" if e.get("retired") or e.get("state") == "completed" else f"NOT completed ({e.get('state', '?')})"
    return (f"#{e.get('collective_seq_id', '?')} {e.get('profiling_name', '?')} "
            f"group {e.get('process_group', ['?'])[-1]} sizes {e.get('input_sizes')} "
            f"{e.get('input_dtypes')}: {done}")


def _modified_after(path: Path, when: float) -> bool:
    try:
        return path.stat().st_mtime >= when
    except OSError:
        return False


def _print_summary(hang_dir: Path, world_size: int) -> None:
    from engine.trainer.hang_report import write_summary

    try:
        path, verdict = write_summary(hang_dir, world_size)
    except OSError:
        return
    log.error(f"hang watchdog: {verdict} (all ranks: {path})", extra=ALL_RANKS)


def _write_torchelastic_error(message: str) -> None:
    """torchrun prints the worker's error file in its failure summary: make it our message."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        Path(path).write_text(json.dumps({"message": message, "timestamp": str(int(time.time()))}))
    except OSError:
        pass


def enable_flight_recorder(backend: str, entries: int = flight_recorder.DEFAULT_ENTRIES) -> None:
    """Ask torch.distributed to record recent collectives (call before creating the process group;
    ``engine.init_distributed`` does too)."""
    flight_recorder.enable(backend, entries)


def stall_if_requested(rank: int, step: int) -> None:
    """Tests only: ``ORCH_TEST_STALL=1@3`` makes rank 1 sleep inside step 3, as a stuck rank would."""
    raw = os.environ.get(ENV_TEST_STALL, "")
    if not raw:
        return
    want_rank, _, want_step = raw.partition("@")
    if want_rank.strip() == str(rank) and want_step.strip() == str(step):
        while True:  # until the watchdog (or the test's timeout) ends the process
            time.sleep(1)
