"""The ssh backend on the project's 3 ssh hosts (tests/clusters/ssh_hosts.sh): time from
`orch submit --cluster ssh` to the first completed training step, beside the same job started by
hand (one `ssh HOST torchrun ...` per host in parallel, what pdsh does); and the time from a host
dying (every process SIGKILLed, its link down) to the first step of the elastic job re-formed on
the other two.

    python -m bench.ssh_backend [--rounds 3] [--quick]

Needs the ssh hosts running (`sudo tests/clusters/ssh_hosts.sh start`; started here when run as
root) and holds their lock (the ssh tests kill hosts too).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, Measurement, interleaved, machine, print_table
from bench.common import train_records as _records
from bench.common import wait_for as _wait

LAB = Path(os.environ.get("ORCH_SSH_LAB", "/tmp/orch-ssh"))
HOSTS_SH = REPO / "tests" / "clusters" / "ssh_hosts.sh"
HOSTS = ("orch-h1", "orch-h2", "orch-h3")
DS_CONFIG = {"train_batch_size": 12, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 1000,
             "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 2}}
SSH = ["ssh", "-F", str(LAB / "ssh_config")]


def _spec(home: Path, nodes: str, steps: int, every: int) -> Path:
    import yaml

    (home / "ds_config.json").write_text(json.dumps(DS_CONFIG))
    (home / "hostfile").write_text("".join(f"{h} slots=1\n" for h in HOSTS))
    path = home / "job.yaml"
    path.write_text(yaml.safe_dump({
        "name": "bench-ssh", "nodes": nodes, "procs_per_node": 1,
        "args": ["--model", "tiny", "--steps", str(steps), "--log-every", "1"], "ds_config": "ds_config.json",
        "checkpoint": {"every_steps": every, "keep": 2}, "max_restarts": 3,
        "ssh": {"hostfile": "hostfile", "ssh_options": SSH[1:], "workdir": str(REPO)}}))
    return path


def _orch(home: Path, *argv: str) -> str:
    return subprocess.run([sys.executable, "-m", "orchestrator", *argv], capture_output=True, text=True, check=True,
                          env={**os.environ, "ORCH_HOME": str(home)}, timeout=600).stdout


def orch_first_step() -> float:
    """Seconds from `orch submit` (the CLI starting) to the first completed step on 3 hosts."""
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        spec = _spec(home, "3", 1000, 0)
        t0 = time.time()
        job_id = _orch(home, "submit", str(spec), "--cluster", "ssh").split("submitted ")[1].split()[0]
        first = _wait(lambda: _records(home / "runs" / job_id), 600, "first step")[0]["time"]
        _orch(home, "cancel", job_id)
        return first - t0


def by_hand_first_step() -> float:
    """The same job as `ssh HOST torchrun ...` on each host in parallel (as pdsh would start it)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        (run_dir / "ds_config.json").write_text(json.dumps(DS_CONFIG))
        port = 29000 + os.getpid() % 1000
        procs = []
        t0 = time.time()
        for rank, host in enumerate(HOSTS):
            command = (f"cd {REPO} && ORCH_RUN_DIR={run_dir} CUDA_VISIBLE_DEVICES= exec {sys.executable} -m "
                       f"torch.distributed.run --nnodes=3 --nproc-per-node=1 --rdzv-backend=c10d "
                       f"--rdzv-endpoint={HOSTS[0]}:{port} --rdzv-id=bench -m engine.train --deepspeed_config "
                       f"{run_dir}/ds_config.json --model tiny --steps 1000 --log-every 1")
            # -tt: a terminal, so that closing the connection hangs up torchrun (pdsh users rely on it)
            procs.append(subprocess.Popen([*SSH, "-tt", host, command], stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        first = _wait(lambda: _records(run_dir), 600, "first step")[0]["time"]
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=120)
        time.sleep(10)  # torchrun's workers exit after the hang-up; the next round must not share the CPUs
        return first - t0


def host_death_recovery() -> float:
    """Seconds from a host dying (after the first checkpoint) to the first step on the other two."""
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        job_id = _orch(home, "submit", str(_spec(home, "1:3", 1000, 5)), "--cluster", "ssh").split("submitted ")[1]
        job_id = job_id.split()[0]
        run_dir = home / "runs" / job_id
        _wait(lambda: (run_dir / "checkpoints" / "latest").exists() and len(_records(run_dir)) > 6, 600,
              "first checkpoint")
        killed = time.time()
        _hosts("kill", HOSTS[-1])
        try:
            done = lambda: [r for r in _records(run_dir) if r["time"] > killed and r["world_size"] == 2]  # noqa: E731
            first = _wait(done, 600, "step after the re-forming")[0]["time"]
        finally:
            _orch(home, "cancel", job_id)
            _hosts("revive", HOSTS[-1])
        return first - killed


def _hosts(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(HOSTS_SH), *argv], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "ORCH_SSH_LAB": str(LAB)})


def _hosts_ready() -> str | None:
    """Why the benchmark cannot run here, or None (starting the hosts when root and they are down)."""
    if _hosts("status").returncode == 0:
        return None
    if os.geteuid() != 0:
        return f"the ssh hosts are not running and starting them needs root (sudo {HOSTS_SH} start)"
    _hosts("stop")
    started = _hosts("start")
    return None if started.returncode == 0 else f"{HOSTS_SH} start failed: {started.stderr[-400:]}"


def run(quick: bool = False, rounds: int | None = None) -> list[dict]:
    LAB.parent.mkdir(parents=True, exist_ok=True)
    lock = open(f"{LAB}.lock", "w")  # noqa: SIM115 - the tests' lock (tests/shared_env.py), held for the run
    print(f"waiting for {LAB}.lock (a test session may be using the hosts)...", flush=True)
    fcntl.flock(lock, fcntl.LOCK_EX)
    why = _hosts_ready()
    if why:
        print(f"skipped: {why}")
        return [{"benchmark": "ssh_backend", "name": "(not run)", "error": why}]
    rounds = rounds or (1 if quick else 3)
    print(f"machine: {machine()}; {subprocess.run(['ssh', '-V'], capture_output=True, text=True).stderr.strip()}")
    results = interleaved({"orch": orch_first_step, "by hand": by_hand_first_step}, rounds)
    ours = Measurement("orch submit --cluster ssh", results["orch"])
    peer = Measurement("ssh HOST torchrun ... on each host", results["by hand"])
    print_table("submit -> first completed step, tiny GPT on 3 ssh hosts (wall seconds)", ours, [peer])
    rows = [{"benchmark": "ssh_backend", "name": "submit -> first step", "median_s": ours.median,
             "range_s": ours.spread, "peer": peer.name, "peer_median_s": peer.median,
             "ratio": ours.median / peer.median}]
    name = "host death -> resumed step (elastic 1:3)"
    m = Measurement(name, [host_death_recovery() for _ in range(rounds)])
    print(f"{name}: median {m.median:.1f} s (range {m.spread} s)")
    rows.append({"benchmark": "ssh_backend", "name": name, "median_s": m.median, "range_s": m.spread})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args()
    run(args.quick, args.rounds)
