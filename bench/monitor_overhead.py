"""Per-step cost of the ds_config's monitors: the bundled trainer on 2 gloo ranks, each monitor vs none.

Goal (issue 18): an enabled monitor costs at most 1 % of step time (ratio <= 1.01).

Each candidate is one ``torchrun --nproc-per-node 2 -m engine.train`` launch with the same
ds_config plus one monitoring section; the candidates run interleaved, round after round, so
drifting load on a shared machine hits them alike. A launch's step time is the median of its
``step_time_s`` records (``--log-every`` steps each, evaluation and checkpoints excluded), the
first record dropped as warm-up; a candidate's figure is the median over rounds. The ratio is
candidate / ``none`` from the same rounds.

W&B and Comet run offline (their real clients, writing to the run directory), so the figures
are the clients' own cost, without a network. ``comms_logger`` and ``flops_profiler`` are
diagnostics: the first times (and so waits for) every collective, the second profiles one step
(``profile_step``); both are reported, and the goal applies to the event monitors.

    python -m bench.monitor_overhead [--quick] [--rounds N] [--steps N] [--record]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import REPO, append_benchmarks_md, load_average, machine

BASE = {
    "train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 2},
}
CANDIDATES: dict[str, dict[str, Any]] = {
    "none": {},
    "csv_monitor": {"csv_monitor": {"enabled": True, "job_name": "bench"}},
    "wandb": {"wandb": {"enabled": True, "project": "orch-bench"}},
    "comet": {"comet": {"enabled": True, "project": "orch-bench", "online": False}},
    "comms_logger": {"comms_logger": {"enabled": True}},
    "flops_profiler": {"flops_profiler": {"enabled": True, "profile_step": 5, "output_file": "flops.txt"}},
}
EVENT_MONITORS = ("csv_monitor", "wandb", "comet")
GOAL = 1.01


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(work: Path, name: str, round_no: int, steps: int, log_every: int, model: str) -> float | None:
    """One 2-rank trainer run with candidate ``name``; the median step time of its records (s)."""
    run = work / f"{name}-{round_no}"
    run.mkdir(parents=True)
    config = run / "ds_config.json"
    section = json.loads(json.dumps(CANDIDATES[name]).replace('"flops.txt"', json.dumps(str(run / "flops.txt"))))
    config.write_text(json.dumps({**BASE, **section}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "TORCHELASTIC_", "WANDB_", "COMET_"))}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true",
               COMET_OFFLINE_DIRECTORY=str(run / "comet"), PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "-m", "engine.train",
           "--model", model, "--steps", str(steps), "--log-every", str(log_every), "--run-dir", str(run),
           "--deepspeed_config", str(config), "--watchdog-timeout", "0"]
    proc = subprocess.run(cmd, cwd=run, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        print(f"  {name} round {round_no} failed:\n{proc.stderr[-1500:]}")
        return None
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [r["step_time_s"] for r in rows if r.get("kind") == "train"][1:]
    return statistics.median(times) if times else None


def measure(names: list[str], rounds: int, steps: int, log_every: int, model: str) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="orch-monitor-bench-") as tmp:
        for round_no in range(rounds):
            for name in names:
                step = launch(Path(tmp), name, round_no, steps, log_every, model)
                if step is not None:
                    results[name].append(step)
                    print(f"  round {round_no + 1}: {name:<15} {step * 1000:8.2f} ms/step")
    return results


def write_cost_s(name: str, calls: int = 2000) -> float | None:
    """Seconds one optimizer step's events cost rank 0 in ``name`` (the engine's per-step write):
    a less noisy figure than the step-time ratio on a busy machine. Event monitors only."""
    if name not in EVENT_MONITORS:
        return None
    import time

    from engine.config import load_config
    from engine.monitor import build_monitor

    with tempfile.TemporaryDirectory(prefix="orch-monitor-cost-") as tmp:
        saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT", "COMET_OFFLINE_DIRECTORY")}
        os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", COMET_OFFLINE_DIRECTORY=tmp)
        try:
            monitor = build_monitor(load_config({**BASE, **CANDIDATES[name]}), rank=0)
            monitor.open(Path(tmp))
            monitor.write_events([("Train/Samples/lr", 1e-3, 0)])  # warm: first call opens files
            start = time.perf_counter()
            for step in range(1, calls + 1):
                monitor.write_events([("Train/Samples/lr", 1e-3, 8 * step)])
            cost = (time.perf_counter() - start) / calls
            monitor.close()
        finally:
            for key, value in saved.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    return cost


def table(results: dict[str, list[float]]) -> tuple[list[str], list[dict]]:
    base = statistics.median(results["none"]) if results.get("none") else None
    lines = ["| monitor | median step (ms) | range (ms) | ratio vs none | per-step write (ms) | write / step |"
             " goal |", "|---|---|---|---|---|---|---|"]
    rows = []
    for name, samples in results.items():
        if not samples:
            lines.append(f"| {name} | failed | - | - | - |")
            rows.append({"benchmark": "monitor_overhead", "name": name, "error": "every launch failed"})
            continue
        med = statistics.median(samples)
        ratio = med / base if base else None
        cost = write_cost_s(name)
        goal = "" if name == "none" else (f"<= {GOAL}" if name in EVENT_MONITORS else "diagnostic")
        cost_txt = f"{cost * 1000:.3f} | {1 + cost / base:.4f}" if cost is not None and base else "- | -"
        lines.append(f"| {name} | {med * 1000:.2f} | {min(samples) * 1000:.2f}-{max(samples) * 1000:.2f} | "
                     f"{ratio:.3f} | {cost_txt} | {goal} |" if ratio else f"| {name} | {med * 1000:.2f} | - | - | - |")
        rows.append({"benchmark": "monitor_overhead", "name": name, "median_s": med,
                     "range_s": f"{min(samples):.3g}-{max(samples):.3g}", "ratio": ratio, "write_cost_s": cost})
    return lines, rows


def run(quick: bool = False, rounds: int | None = None, steps: int | None = None, model: str = "small",
        record: bool = False, candidates: list[str] | None = None) -> list[dict]:
    rounds = rounds or (1 if quick else 3)
    steps = steps or (20 if quick else 60)
    log_every = 5 if quick else 10
    names = candidates or list(CANDIDATES)
    print(f"machine: {machine()} (load {load_average():.1f})\n2 gloo ranks x 1 thread, model {model}, {steps} steps, "
          f"log every {log_every}; {rounds} interleaved round(s)")
    results = measure(names, rounds, steps, log_every, model)
    lines, rows = table(results)
    print("\n".join(lines))
    if record:
        md = [f"Machine: {machine()}. Command: `python -m bench.monitor_overhead --rounds {rounds} --steps {steps}"
              f" --model {model}`. 2 gloo ranks x 1 thread, ZeRO-2, each candidate a fresh torchrun launch per "
              f"round; step = median of the run's step_time_s records (first dropped), then the median over "
              f"rounds. W&B and Comet offline (real clients).", "", *lines]
        append_benchmarks_md("Monitor overhead per step (bench/monitor_overhead.py)", md)
        print("\nappended to BENCHMARKS.md")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--model", default="small")
    parser.add_argument("--only", nargs="+", choices=list(CANDIDATES), help="candidates to run (none is always run)")
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args()
    names = ["none", *[n for n in args.only if n != "none"]] if args.only else None
    run(args.quick, args.rounds, args.steps, args.model, args.record, names)


if __name__ == "__main__":
    main()
