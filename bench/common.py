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


BENCHMARKS_MD = REPO / "BENCHMARKS.md"
_BENCHMARKS_HEADER = """# Benchmarks

Measured numbers, newest at the bottom of each section. Every entry says when, on what machine,
with which command; each figure is a median with its range, beside the peer measured in the same
run, and the ratio ours/peer. Rows are appended by the benchmarks (`--record`) or by hand; never
rewrite an earlier row: add a new dated one.
"""


def append_benchmarks_md(section: str, lines: Sequence[str], path: Path = BENCHMARKS_MD) -> None:
    """Append a dated entry (``section`` heading + markdown ``lines``) to BENCHMARKS.md.

    Creates the file with a short header when absent; only ever appends, so entries written by
    other benchmarks (or by hand) are left exactly as they were.
    """
    text = "" if path.exists() else _BENCHMARKS_HEADER
    entry = [f"\n## {section} ({today()})\n", *lines]
    with path.open("a") as f:
        f.write(text + "\n".join(entry).rstrip("\n") + "\n")


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports ru_maxrss in KiB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def load_average() -> float:
    """The 1-minute load average (how busy the shared machine was), or -1 where unknown."""
    import os

    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return -1.0


def format_row(row: dict) -> tuple[str, str, str, str, str]:
    """(benchmark, figure, median, range, ratio) as text, for the rows benchmarks return.

    Benchmarks name their fields a little differently: seconds as ``median_s``/``range_s``,
    ratios as ``ratio`` (ours/peer), ``peer_over_ours`` or ``ratio_vs_ddp``; a row with
    ``error`` did not run. Each ratio is printed with its meaning.
    """
    name = str(row.get("name", "?"))
    if row.get("workload"):
        name = f"{row['workload']}: {name}"
    if row.get("kind") and row.get("benchmark") == "optimizer_kernels":
        name = f"{row['kind']}: {name}"
    if "error" in row:
        first = str(row["error"]).strip().splitlines()[-1][:120]
        return str(row.get("benchmark", "?")), name, "-", "-", first
    median = row.get("median_s")
    median_txt = f"{median:.4g} s" if isinstance(median, (int, float)) else "-"
    spread = row.get("range_s")
    range_txt = f"{spread} s" if spread else "-"
    ratios = []
    if isinstance(row.get("ratio"), (int, float)):
        ratios.append(f"ours/{row.get('peer') or 'peer'} {row['ratio']:.2f}")
    if isinstance(row.get("peer_over_ours"), (int, float)) and row["peer_over_ours"] != 1.0:
        ratios.append(f"this/ours {row['peer_over_ours']:.2f}")
    if isinstance(row.get("ratio_vs_ddp"), (int, float)):
        ratios.append(f"vs DDP {row['ratio_vs_ddp']:.2f}")
    if isinstance(row.get("goal_s"), (int, float)):
        ratios.append(f"goal < {row['goal_s']:g} s")
    return str(row.get("benchmark", "?")), name, median_txt, range_txt, "; ".join(ratios) or "-"


def train_records(run_dir: Path) -> list[dict]:
    """The trainer's per-step records of a run directory (metrics.jsonl), none if not there yet."""
    import json

    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [r for r in map(json.loads, lines) if r.get("kind") == "train"]


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> object:
    """The first truthy value of ``predicate()``, polled every 0.2 s; TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"benchmark: no {what} within {timeout:.0f} s")
