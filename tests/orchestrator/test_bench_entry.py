"""`python -m bench`: finds every benchmark module, and records one dated summary in BENCHMARKS.md."""
from __future__ import annotations

import datetime
import subprocess
import sys

from bench.__main__ import discover, record, summary_table
from tests.shared_env import REPO


def test_every_benchmark_module_is_found_and_helpers_are_not():
    found = discover()
    assert {"cli_startup", "local_backend", "optimizer_kernels"} <= set(found)
    assert "common" not in found and not any(name.startswith("_") for name in found)
    listed = subprocess.run([sys.executable, "-m", "bench", "list"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0 and listed.stdout.split() == found


def test_the_summary_is_appended_with_date_machine_and_command(tmp_path):
    rows = [
        {"benchmark": "local_backend", "name": "orch submit --cluster local --wait", "median_s": 31.2,
         "range_s": "30.1-33.0", "peer": "torchrun x2 by hand (same job)", "peer_median_s": 30.0, "ratio": 1.04},
        {"benchmark": "optimizer_kernels", "kind": "cpu_step", "name": "torch AdamW(fused=True) sequence",
         "median_s": 0.012, "peer_over_ours": 1.31},
        {"benchmark": "collectives", "name": "(not run)", "error": "has no run(quick=...) entry point"},
    ]
    table = summary_table(rows)
    assert table[2] == ("| local_backend | orch submit --cluster local --wait | 31.2 s | 30.1-33.0 s | "
                        "ours/torchrun x2 by hand (same job) 1.04 |")
    assert table[3] == ("| optimizer_kernels | cpu_step: torch AdamW(fused=True) sequence | 0.012 s | - | "
                        "this/ours 1.31 |")
    assert table[4] == "| collectives | (not run) | - | - | has no run(quick=...) entry point |"

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nan earlier entry, kept as it was\n")
    record(rows, "python -m bench all --quick", path)
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nan earlier entry, kept as it was\n")
    assert f"## All benchmarks (python -m bench all) ({datetime.date.today().isoformat()})" in text
    assert "Command: `python -m bench all --quick`" in text and "Machine: " in text
    assert text.rstrip().endswith(table[-1])
