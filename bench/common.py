"""Small shared helpers for benchmarks: timing repeats, medians, a ratio table, BENCHMARKS.md rows."""
from __future__ import annotations

import datetime as _dt
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Measurement:
    name: str
    samples: list[float]
    unit: str = "s"

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> str:
        return f"{min(self.samples):.3g}-{max(self.samples):.3g}"


def time_call(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def time_command(argv: Sequence[str], repeats: int) -> list[float]:
    def run() -> None:
        subprocess.run(list(argv), check=True, capture_output=True)
    run()  # warm the page cache once
    return time_call(run, repeats)


def interleaved(named: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each candidate once per round, alternating, so drifting machine load hits all alike."""
    results: dict[str, list[float]] = {name: [] for name in named}
    for _ in range(rounds):
        for name, fn in named.items():
            results[name].append(fn())
    return results


def machine() -> str:
    try:
        import torch
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        gpu = "torch missing"
    cpu = platform.processor() or platform.machine()
    import os
    return f"{platform.node()} ({cpu}, {os.cpu_count()} cores, {gpu}, Python {platform.python_version()})"


def print_table(title: str, ours: Measurement, peers: list[Measurement]) -> None:
    print(f"\n{title}")
    print(f"  {'':<34} {'median':>10} {'range':>18} {'ours/peer':>10}")
    print(f"  {ours.name:<34} {ours.median:>9.4g}{ours.unit} {ours.spread:>18} {'':>10}")
    for p in peers:
        print(f"  {p.name:<34} {p.median:>9.4g}{p.unit} {p.spread:>18} {ours.median / p.median:>10.2f}")


def today() -> str:
    return _dt.date.today().isoformat()
