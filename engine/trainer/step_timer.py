"""Where a training step spends its time, and which phase a rank is in right now.

The trainer runs every piece of a step inside ``timer.phase(name, step)``. Two readers use it:

* the step-time breakdown that DeepSpeed users switch on with ``"wall_clock_breakdown": true``:
  milliseconds per step in each phase, averaged over the steps since the last log record. On a
  GPU each phase boundary synchronises the device (as DeepSpeed's timers do), which is why it
  is off by default: without it nothing in the trainer synchronises between log steps (the loop
  reads the loss back only at a log step; tests/engine/test_trainer_host_syncs.py counts it);
* the hang watchdog (watchdog.py), which reports the phase a stuck rank was in. That
  costs one attribute assignment per phase, so it is always on.

The trainer times around the engine's public calls (``engine(batch)``, ``engine.backward``,
``engine.step``). Gradient reduction happens inside ``backward`` (and the ZeRO parameter
all-gather inside ``step``), so ``reduce`` is reported as ``None``: not measured separately,
included in ``backward``.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# The breakdown's keys, in the order the console prints them.
BREAKDOWN_PHASES = ("data", "forward", "backward", "reduce", "optimizer", "checkpoint", "eval")
NOT_MEASURED = frozenset({"reduce"})


@dataclass(frozen=True)
class Position:
    """The phase a rank entered last: what the watchdog reports when that rank stops moving."""

    phase: str
    step: int
    micro_step: int | None
    micro_steps: int | None
    entered: float  # time.monotonic()

    def describe(self, now: float | None = None) -> str:
        where = f"{self.phase} of step {self.step}"
        if self.micro_step is not None:
            where += f", micro-step {self.micro_step + 1}/{self.micro_steps}"
        age = (time.monotonic() if now is None else now) - self.entered
        return f"{where}, entered {age:.1f} s ago"


class StepTimer:
    """Phase tracking for every rank; durations only when ``breakdown`` is on."""

    def __init__(self, *, breakdown: bool, synchronize: Callable[[], None] | None = None) -> None:
        self.breakdown = breakdown
        self._sync = synchronize if breakdown else None
        self._totals: dict[str, float] = {}
        self.position: Position | None = None

    @contextmanager
    def phase(self, name: str, step: int, micro_step: int | None = None,
              micro_steps: int | None = None) -> Iterator[None]:
        self.position = Position(name, step, micro_step, micro_steps, time.monotonic())
        if not self.breakdown:
            yield
            return
        if self._sync is not None:
            self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync is not None:
                self._sync()
            self._totals[name] = self._totals.get(name, 0.0) + time.perf_counter() - start

    def window(self, steps: int) -> dict[str, float | None] | None:
        """Mean milliseconds per step of each phase since the last call (None when off); resets."""
        if not self.breakdown:
            return None
        out: dict[str, float | None] = {}
        for name in BREAKDOWN_PHASES:
            out[name] = None if name in NOT_MEASURED else 1000.0 * self._totals.get(name, 0.0) / max(steps, 1)
        self._totals.clear()
        return out
