"""Every benchmark of the project in one run: ``python -m bench all [--quick]``.

A benchmark is a module under bench/ with ``run(quick: bool = False) -> list[dict]``: it prints
its own detailed tables (ours beside the peers measured in the same run) and returns one row per
figure. This entry point runs them one after another, prints one summary table of medians,
ranges and ratios, and appends the same table to BENCHMARKS.md with the date, the machine and
the command. A benchmark that fails is reported as failed; the others still run. GPU sections
run inside each benchmark when CUDA is present.

    python -m bench list                         # the benchmarks found
    python -m bench all [--quick] [--no-record]  # all of them
    python -m bench cli_startup optimizer_kernels [--quick]   # some of them
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import bench
from bench.common import BENCHMARKS_MD, append_benchmarks_md, format_row, machine

NOT_BENCHMARKS = frozenset({"common"})


def discover() -> list[str]:
    """Names of the modules under bench/ that define ``run``, in alphabetical order."""
    names = []
    for info in pkgutil.iter_modules(bench.__path__):
        if info.name.startswith("_") or info.name in NOT_BENCHMARKS:
            continue
        names.append(info.name)
    return sorted(names)


def run_one(name: str, quick: bool) -> list[dict]:
    """The benchmark's rows, or one row saying why it did not run or how it failed."""
    try:
        module = importlib.import_module(f"bench.{name}")
    except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others
        return [{"benchmark": name, "name": "(not run)", "error": f"import failed: {exc}"}]
    fn = getattr(module, "run", None)
    if fn is None or "quick" not in inspect.signature(fn).parameters:
        return [{"benchmark": name, "name": "(not run)",
                 "error": "has no run(quick=...) entry point; run it on its own: python -m bench." + name}]
    print(f"\n=== bench.{name}{' (quick)' if quick else ''} ===", flush=True)
    started = time.perf_counter()
    try:
        rows = fn(quick=quick)
    except Exception:  # noqa: BLE001
        return [{"benchmark": name, "name": "(failed)", "error": traceback.format_exc(limit=3).strip()}]
    if not isinstance(rows, list):
        return [{"benchmark": name, "name": "(not run)", "error": f"run() returned {type(rows).__name__}, not rows"}]
    print(f"(bench.{name} took {time.perf_counter() - started:.0f} s)")
    return [{"benchmark": name, **r} if isinstance(r, dict) else {"benchmark": name, "name": str(r)} for r in rows]


def summary_table(rows: Sequence[dict]) -> list[str]:
    """A markdown table, one line per row: benchmark, figure, median, range, ratio."""
    lines = ["| benchmark | figure | median | range | ratio |", "|---|---|---|---|---|"]
    for r in rows:
        cells = format_row(r)
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return lines


def record(rows: Sequence[dict], command: str, path: Path = BENCHMARKS_MD) -> None:
    header = [f"Machine: {machine()}. Command: `{command}`. Medians with their ranges; ratios as each "
              "benchmark defines them (stated in the cell).", ""]
    append_benchmarks_md("All benchmarks (python -m bench all)", header + summary_table(rows), path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", help="'all', 'list', or benchmark module names")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    found = discover()
    if args.names == ["list"]:
        print("\n".join(found))
        return 0
    names = found if args.names == ["all"] else args.names
    unknown = sorted(set(names) - set(found))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; found: {', '.join(found)}")
    rows = [row for name in names for row in run_one(name, args.quick)]
    print(f"\nmachine: {machine()}")
    print("\n".join(summary_table(rows)))
    if not args.no_record:
        command = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
        record(rows, command)
        print(f"\nappended to {BENCHMARKS_MD}")
    return 1 if any("error" in r and r["name"] == "(failed)" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
