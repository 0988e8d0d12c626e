"""The Slurm backend on a real cluster: time from `orch submit` to the first completed training
step, beside the same job submitted by hand (a minimal sbatch + srun torchrun script); and the
time from a node crash to the first step after the resume, for a fixed-size job (Slurm requeues
it) and an elastic one (torchrun re-forms on the survivors).

    python -m bench.slurm_backend [--rounds 3] [--quick]

Needs a running Slurm: SLURM_CONF, or the lab cluster of ../shared/slurm/cluster.sh (started with
`cluster.sh start`); the crash figures need the lab cluster, whose nodes it kills and restarts.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, Measurement, interleaved, machine, print_table

LAB = Path(os.environ.get("SLURM_LAB", "/tmp/orch-slurm"))
CLUSTER_SH = Path(os.environ.get("ORCH_SLURM_CLUSTER_SH", REPO.parent / "shared" / "slurm" / "cluster.sh"))
DS_CONFIG = {"train_batch_size": 12, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 1000,
             "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 2}}


def _env(home: str) -> dict[str, str]:
    return {**os.environ, "ORCH_HOME": home, "SLURM_CONF": os.environ.get("SLURM_CONF", str(LAB / "etc/slurm.conf"))}


def _records(run_dir: Path) -> list[dict]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [r for r in map(json.loads, lines) if r.get("kind") == "train"]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"benchmark: no {what} within {timeout:.0f} s")


def _spec(home: Path, nodes: int | str, steps: int, every: int) -> Path:
    import yaml

    (home / "ds_config.json").write_text(json.dumps(DS_CONFIG))
    path = home / "job.yaml"
    path.write_text(yaml.safe_dump({
        "name": "bench-slurm", "nodes": nodes, "procs_per_node": 1, "python": sys.executable,
        "args": ["--model", "tiny", "--steps", str(steps), "--log-every", "1"], "ds_config": "ds_config.json",
        "checkpoint": {"every_steps": every, "keep": 2}, "max_restarts": 3}))
    return path


def _orch_submit(home: Path, spec: Path) -> tuple[str, Path, str]:
    out = subprocess.run([sys.executable, "-m", "orchestrator", "submit", str(spec), "--cluster", "slurm"],
                         capture_output=True, text=True, env=_env(str(home)), check=True, timeout=300).stdout
    job_id = out.split("submitted ")[1].split()[0]
    native = out.split("native id ")[1].split(")")[0]
    return job_id, home / "runs" / job_id, native


def orch_first_step() -> float:
    """Seconds from `orch submit` (the CLI starting) to the first completed step."""
    with tempfile.TemporaryDirectory(dir=_shared_tmp()) as tmp:
        home = Path(tmp)
        spec = _spec(home, 2, 1000, 0)
        t0 = time.time()
        _, run_dir, native = _orch_submit(home, spec)
        first = _wait(lambda: _records(run_dir), 300, "first step")[0]["time"]
        _scancel(native)
        return first - t0


def by_hand_first_step() -> float:
    """The same job as a minimal hand-written sbatch script: seconds from sbatch to the first step."""
    with tempfile.TemporaryDirectory(dir=_shared_tmp()) as tmp:
        run_dir = Path(tmp)
        (run_dir / "ds_config.json").write_text(json.dumps(DS_CONFIG))
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                    "--rdzv-backend=c10d", "-m", "engine.train", "--deepspeed_config",
                    str(run_dir / "ds_config.json"), "--model", "tiny", "--steps", "1000", "--log-every", "1"]
        script = run_dir / "job.sbatch"
        script.write_text(
            "#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n"
            f"#SBATCH --output={run_dir}/slurm.out\n"
            f"export ORCH_RUN_DIR={shlex.quote(str(run_dir))} CUDA_VISIBLE_DEVICES=''\n"
            'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
            f'srun {shlex.join(torchrun[:4])} --rdzv-endpoint="$head:$((10000 + SLURM_JOB_ID % 20000))" '
            f'--rdzv-id="$SLURM_JOB_ID" {shlex.join(torchrun[4:])}\n')
        t0 = time.time()
        native = subprocess.run(["sbatch", "--parsable", f"--chdir={REPO}", str(script)], capture_output=True,
                                text=True, env=_env(tmp), check=True, timeout=60).stdout.strip()
        first = _wait(lambda: _records(run_dir), 300, "first step")[0]["time"]
        _scancel(native)
        return first - t0


def crash_recovery(elastic: bool) -> float:
    """Seconds from killing a node (after the first checkpoint) to the first step after the resume."""
    with tempfile.TemporaryDirectory(dir=_shared_tmp()) as tmp:
        home = Path(tmp)
        _, run_dir, native = _orch_submit(home, _spec(home, "2:3" if elastic else 2, 1000, 5))
        _wait(lambda: (run_dir / "checkpoints" / "latest").exists() and len(_records(run_dir)) > 6, 300,
              "first checkpoint")
        nodes = _job_nodes(native)
        victim = nodes[-1]
        killed = time.time()
        _lab("kill_node", victim)
        try:
            if elastic:
                done = lambda: [r for r in _records(run_dir) if r["time"] > killed and r["world_size"] < len(nodes)]
            else:
                done = lambda: [r for r in _records(run_dir) if r["time"] > killed and r["restart_count"] >= 1]
            first = _wait(done, 600, "step after the resume")[0]["time"]
        finally:
            _scancel(native)
            _lab("start_node", victim)
            _wait(lambda: all(s == "idle" for s in _node_states().values()), 120, "nodes back to idle")
        return first - killed


def _shared_tmp() -> str:
    """Run dirs must be visible on every node: on the lab cluster /tmp is (same machine)."""
    return os.environ.get("ORCH_BENCH_SHARED_TMP", tempfile.gettempdir())


def _scancel(native: str) -> None:
    subprocess.run(["scancel", native], capture_output=True, timeout=60)
    _wait(lambda: not subprocess.run(["squeue", "--noheader", f"--jobs={native}"], capture_output=True,
                                     text=True, timeout=60).stdout.strip(), 120, f"job {native} to leave")


def _job_nodes(native: str) -> list[str]:
    from orchestrator.backends.slurm.queries import query_jobs

    return list(query_jobs([native])[native].nodes)


def _node_states() -> dict[str, str]:
    out = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N %T"], capture_output=True, text=True,
                         timeout=60).stdout
    return dict(line.split(None, 1) for line in out.splitlines() if line.strip())


def _lab(*argv: str) -> None:
    subprocess.run(["bash", str(CLUSTER_SH), *argv], check=True, capture_output=True, timeout=60,
                   env={**os.environ, "SLURM_LAB": str(LAB)})


def _cluster_ready() -> str | None:
    """Why the benchmark cannot run here, or None."""
    os.environ.setdefault("SLURM_CONF", str(LAB / "etc" / "slurm.conf"))
    if not Path(os.environ["SLURM_CONF"]).exists():
        return f"no Slurm configuration at {os.environ['SLURM_CONF']}: start the lab cluster ({CLUSTER_SH} start)"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=60)
    if "UP" not in ping.stdout:
        return f"slurmctld is not up ({ping.stdout.strip() or ping.stderr.strip()})"
    return None


def _lab_lock() -> object:
    """The lock the slurm tests take (tests/shared_env.py): they and this benchmark crash nodes."""
    import fcntl

    LAB.mkdir(parents=True, exist_ok=True)
    handle = open(LAB / "orch-users.lock", "w")  # noqa: SIM115 - held until the process ends
    print(f"waiting for {LAB}/orch-users.lock (a test session may be using the cluster)...", flush=True)
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def run(quick: bool = False, rounds: int | None = None) -> list[dict]:
    _lock = _lab_lock() if CLUSTER_SH.exists() else None  # noqa: F841 - held for the whole run
    why = _cluster_ready()
    if why:
        print(f"skipped: {why}")
        return [{"benchmark": "slurm_backend", "name": "(not run)", "error": why}]
    rounds = rounds or (1 if quick else 3)
    version = subprocess.run(["sbatch", "--version"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {machine()}; {version}")
    results = interleaved({"orch": orch_first_step, "by hand": by_hand_first_step}, rounds)
    ours = Measurement("orch submit --cluster slurm", results["orch"])
    peer = Measurement("sbatch of a hand-written script", results["by hand"])
    print_table("submit -> first completed step, tiny GPT on 2 nodes (wall seconds)", ours, [peer])
    rows = [{"benchmark": "slurm_backend", "name": "submit -> first step", "median_s": ours.median,
             "range_s": ours.spread, "peer": peer.name, "peer_median_s": peer.median,
             "ratio": ours.median / peer.median}]
    if not CLUSTER_SH.exists():
        print(f"node-crash figures skipped: they need the lab cluster ({CLUSTER_SH})")
        return rows
    for elastic, name in ((False, "node crash -> resumed step (requeue)"),
                          (True, "node crash -> resumed step (elastic 2:3)")):
        m = Measurement(name, [crash_recovery(elastic) for _ in range(rounds)])
        print(f"{name}: median {m.median:.1f} s (range {m.spread} s)")
        rows.append({"benchmark": "slurm_backend", "name": name, "median_s": m.median, "range_s": m.spread})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args()
    run(args.quick, args.rounds)
