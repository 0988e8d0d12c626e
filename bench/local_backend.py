"""The local cluster: its overhead against plain torchrun on the same job, and the time it takes
an elastic job to recover from losing a node (goal: < 60 s from the kill to the first completed
step after the resume).

    python -m bench.local_backend [--rounds 3] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, Measurement, interleaved, machine, print_table

EXAMPLE = REPO / "examples" / "tiny-gpt-zero2.yaml"
ELASTIC = REPO / "examples" / "tiny-gpt-elastic.yaml"


def _orch(args: list[str], home: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ORCH_HOME": home}
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          env=env, check=True, timeout=900)


def orch_submit_wait(steps: int) -> float:
    with tempfile.TemporaryDirectory() as home:
        t0 = time.perf_counter()
        _orch(["submit", str(EXAMPLE), "--cluster", "local", "--wait",
               "--set", f"args=[--model, tiny, --steps, '{steps}']", "--set", "checkpoint.every_steps=0"], home)
        return time.perf_counter() - t0


def plain_torchrun(steps: int) -> float:
    """The same job (2 nodes x 2 procs, c10d rendezvous on localhost), launched by hand."""
    ds_config = REPO / "examples" / "ds_configs" / "zero2_tiny_cpu.json"
    with tempfile.TemporaryDirectory() as run_dir:
        port = _free_port()
        env = {**os.environ, "ORCH_RUN_DIR": run_dir, "CUDA_VISIBLE_DEVICES": ""}
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=bench",
                "-m", "engine.train", "--deepspeed_config", str(ds_config), "--model", "tiny",
                "--steps", str(steps)]
        t0 = time.perf_counter()
        procs = [subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for _ in range(2)]
        codes = [p.wait(timeout=900) for p in procs]
        elapsed = time.perf_counter() - t0
        if any(codes):
            raise RuntimeError(f"plain torchrun failed: {codes}")
        return elapsed


def _free_port() -> int:
    from orchestrator.backends.local.backend import free_port

    return free_port()


def recovery_seconds() -> float:
    """Kill one of 3 nodes after the first checkpoint; seconds until a step completes on 2 nodes."""
    with tempfile.TemporaryDirectory() as home:
        out = _orch(["submit", str(ELASTIC), "--cluster", "local",
                     "--set", "args=[--model, tiny, --steps, '60', --log-every, '1']",
                     "--set", "checkpoint.every_steps=10"], home)
        job_id = out.stdout.split("submitted ")[1].split()[0]
        run_dir = Path(home) / "runs" / job_id
        metrics = run_dir / "metrics.jsonl"
        _wait(lambda: _max_step(metrics) >= 12, 300)
        state = json.loads((run_dir / "local" / "state.json").read_text())
        from orchestrator.backends.local.proctree import signal_tree

        killed = time.time()
        signal_tree(state["nodes"]["2"]["pid"], signal.SIGKILL)
        _wait(lambda: any(r.get("world_size") == 2 and r.get("time", 0) > killed for r in _records(metrics)), 300)
        first = min(r["time"] for r in _records(metrics) if r.get("world_size") == 2 and r.get("time", 0) > killed)
        _orch(["cancel", job_id], home)
        return first - killed


def _records(path: Path) -> list[dict]:
    """Training records of metrics.jsonl (not eval or trainer-start records)."""
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []
    return [r for r in records if r.get("kind", "train") == "train"]


def _max_step(path: Path) -> int:
    return max((int(r.get("step", 0)) for r in _records(path)), default=0)


def _wait(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not reached")
        time.sleep(0.2)


def run(quick: bool = False) -> list[dict]:
    rounds = 1 if quick else 3
    steps = 30 if quick else 60
    results = interleaved({"orch local": lambda: orch_submit_wait(steps),
                           "plain torchrun": lambda: plain_torchrun(steps)}, rounds)
    ours = Measurement("orch submit --cluster local --wait", results["orch local"])
    peer = Measurement("torchrun x2 by hand (same job)", results["plain torchrun"])
    print(f"machine: {machine()}")
    print_table(f"tiny GPT ZeRO-2, 2 nodes x 2 procs, {steps} steps, wall time", ours, [peer])
    recovery = Measurement("recovery after losing 1 of 3 nodes", [recovery_seconds() for _ in range(rounds)])
    print(f"\nrecovery: kill -> first step on the survivors: median {recovery.median:.1f} s "
          f"(range {recovery.spread} s; goal < 60 s)")
    return [{"benchmark": "local_backend", "name": ours.name, "median_s": ours.median, "range_s": ours.spread,
             "peer": peer.name, "peer_median_s": peer.median, "ratio": ours.median / peer.median},
            {"benchmark": "local_backend", "name": recovery.name, "median_s": recovery.median,
             "range_s": recovery.spread, "goal_s": 60}]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    run(parser.parse_args().quick)
