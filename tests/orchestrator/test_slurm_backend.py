"""orch on a real multi-node Slurm cluster, as a user meets it: submit the tiny example on two
nodes and follow it, cancel a running job, survive a node crash (Slurm requeues a fixed-size
job; an elastic job shrinks), requeue before the time limit, and clear errors for what Slurm
refuses. Real slurmctld and slurmd nodes, sbatch/srun, torchrun agents and gloo workers."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator import jobs
from orchestrator.types import JobState
from orchestrator.backends.slurm.queries import query_jobs, query_sacct
from orchestrator.cli import app
from orchestrator.registry import Registry
from orchestrator.spec import load_spec
from tests.polling import wait_until
from tests.shared_env import REPO, SlurmLab

pytestmark = pytest.mark.slurm
runner = CliRunner()
EXAMPLES = REPO / "examples"
# A global batch that divides over 2 and 3 ranks: elastic jobs keep it by changing accumulation.
# Fixed-size jobs take it in one micro-batch per rank (fewer collectives: faster on 2 CPU cores).
ELASTIC_MICRO, FIXED_MICRO = 2, 6
DS_CONFIG = {"train_batch_size": 12, "train_micro_batch_size_per_gpu": FIXED_MICRO, "steps_per_print": 1000,
             "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 2}}


@pytest.fixture
def slurm(slurm_cluster: SlurmLab):
    """The cluster, left as the test found it: its jobs cancelled, crashed nodes started again."""
    yield slurm_cluster
    unfinished = [r.native_id for r in Registry().list() if r.native_id and not r.state.finished]
    if unfinished:
        subprocess.run(["scancel", *unfinished], capture_output=True, timeout=60)
    slurm_cluster.restore_nodes()


def write_job(tmp_path: Path, *, name: str = "slurm-tiny", nodes: int | str = 2, steps: int = 20,
              every: int = 5, **extra) -> Path:
    """A job spec like a user's: the bundled trainer, tiny GPT, this venv's python on the nodes."""
    micro = ELASTIC_MICRO if isinstance(nodes, str) else FIXED_MICRO
    (tmp_path / "ds_config.json").write_text(json.dumps({**DS_CONFIG, "train_micro_batch_size_per_gpu": micro}))
    spec = {"name": name, "nodes": nodes, "procs_per_node": 1, "python": sys.executable,
            "args": ["--model", "tiny", "--steps", str(steps), "--log-every", "1"],
            "ds_config": "ds_config.json", "checkpoint": {"every_steps": every, "keep": 2}, **extra}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def submit(spec_path: Path, *sets: str) -> str:
    args = ["submit", str(spec_path), "--cluster", "slurm"]
    for s in sets:
        args += ["--set", s]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return re.search(r"submitted (\S+)", result.output).group(1)


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [m for m in map(json.loads, lines) if m.get("kind") == "train"]


def follow_states(job_id: str, timeout: float) -> list[JobState]:
    """Poll `orch status` (once a second) until the job finishes; the states seen, in order."""
    seen: list[JobState] = []

    def finished() -> bool:
        record, _ = jobs.status(job_id)
        if not seen or seen[-1] != record.state:
            seen.append(record.state)
        return record.state.finished

    wait_until(finished, timeout, f"job {job_id} to finish", poll=1.0)
    return seen


def job_processes(run_dir: Path) -> list[int]:
    """Processes on any node of the lab cluster that belong to the job (they carry its run dir)."""
    needle = f"ORCH_RUN_DIR={run_dir}\0".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if needle in Path(f"/proc/{entry}/environ").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def batch_log(run_dir: Path, native_id: str) -> str:
    return (run_dir / f"slurm-{native_id}.out").read_text()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_example_on_two_nodes_follow_logs_status_and_checkpoints(slurm, tmp_path) -> None:
    job_id = submit(EXAMPLES / "tiny-gpt-zero2.yaml", "procs_per_node=1", f"python={sys.executable}",
                    "args=[--model, tiny, --steps, '8', --log-every, '1']", "checkpoint.every_steps=4")
    record = Registry().get(job_id)
    run_dir = Path(record.run_dir)
    assert record.native_id.isdigit() and record.cluster == "slurm"
    assert "#SBATCH --nodes=2" in (run_dir / "job.sbatch").read_text()
    assert json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2

    followed = runner.invoke(app, ["logs", job_id, "--follow"])  # returns when the job has ended
    assert followed.exit_code == 0, followed.output
    assert re.search(r"^\[n\d\] step +8/8", followed.output, re.M), followed.output[-2000:]

    status = runner.invoke(app, ["status", job_id, "--history"])
    assert status.exit_code == 0 and "SUCCEEDED" in status.output, status.output
    assert [e.state for e in Registry().history(job_id)][-1] == JobState.SUCCEEDED

    node_logs = sorted(p.stem for p in (run_dir / "logs").glob("node-*.log"))
    assert len(node_logs) == 2, node_logs
    for node in (n.removeprefix("node-") for n in node_logs):
        one = runner.invoke(app, ["logs", job_id, "--node", node])
        assert one.exit_code == 0 and f"orch: node {node} starting (job {record.native_id}, restart 0)" in one.output
        assert not re.search(r"^\[n\d\]", one.output, re.M)  # one node's log, unprefixed
    assert "rendezvous" in batch_log(run_dir, record.native_id)

    steps = metrics(run_dir)
    assert [m["step"] for m in steps] == list(range(1, 9)) and {m["world_size"] for m in steps} == {2}
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-8"


@pytest.mark.timeout(240)
def test_cancel_ends_a_running_job_and_leaves_no_process_on_any_node(slurm, tmp_path) -> None:
    job_id = submit(write_job(tmp_path, steps=100_000, every=0))
    record = Registry().get(job_id)
    run_dir = Path(record.run_dir)
    wait_until(lambda: metrics(run_dir), 120, "the first training step")
    assert job_processes(run_dir), "the running job should have processes on its nodes"

    result = runner.invoke(app, ["cancel", job_id])
    assert result.exit_code == 0 and "CANCELLED" in result.output, result.output
    assert query_jobs([record.native_id])[record.native_id].state == "CANCELLED"
    assert job_processes(run_dir) == []
    assert Registry().get(job_id).state == JobState.CANCELLED
    again = runner.invoke(app, ["cancel", job_id])
    assert again.exit_code == 2 and "already finished" in again.output


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_node_crash_requeues_a_fixed_size_job_that_resumes_from_its_checkpoint(slurm, tmp_path) -> None:
    steps, every = 16, 5
    job = jobs.submit(load_spec(write_job(tmp_path, steps=steps, every=every)), "slurm")
    run_dir = Path(job.run_dir)
    wait_until(lambda: (run_dir / "checkpoints" / "latest").exists() and len(metrics(run_dir)) > every + 1,
               180, "training past the first checkpoint")
    first_nodes = query_jobs([job.native_id])[job.native_id].nodes
    victim = first_nodes[-1]  # not the first node, which runs the batch script
    slurm.kill_node(victim)
    crashed_at = max(m["step"] for m in metrics(run_dir))

    seen = follow_states(job.job_id, 300)
    record = Registry().get(job.job_id)
    assert record.state == JobState.SUCCEEDED, (seen, record.detail)
    assert JobState.RESTARTING in seen and record.restarts == 1, (seen, record.restarts)
    log = batch_log(run_dir, job.native_id)
    assert f"job {job.native_id} restart 1 on" in log and "NODE FAILURE" in log
    assert not (run_dir / "logs" / f"node-{victim}.log").read_text().count("restart 1")

    after = [m for m in metrics(run_dir) if m["restart_count"] == 1]
    resumed_from = after[0]["step"] - 1
    assert resumed_from > 0 and resumed_from % every == 0 and crashed_at - resumed_from <= every + 1
    assert after[-1]["step"] == steps and {m["world_size"] for m in after} == {2}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_node_crash_shrinks_an_elastic_job_that_finishes_without_requeue(slurm, tmp_path) -> None:
    steps, every = 14, 5
    job = jobs.submit(load_spec(write_job(tmp_path, name="slurm-elastic", nodes="2:3", steps=steps,
                                          every=every, max_restarts=3)), "slurm")
    run_dir = Path(job.run_dir)
    wait_until(lambda: (run_dir / "checkpoints" / "latest").exists() and len(metrics(run_dir)) > every + 1,
               180, "training on 3 nodes past the first checkpoint")
    nodes = query_jobs([job.native_id])[job.native_id].nodes
    assert len(nodes) == 3, f"an elastic 2:3 job on an idle 3-node cluster should get 3 nodes, got {nodes}"
    slurm.kill_node(nodes[-1])

    def shrunk() -> str:
        _, st = jobs.status(job.job_id)
        return st.detail if "continuing on" in st.detail or "2 of up to 3 nodes" in st.detail else ""
    wait_until(shrunk, 120, "orch status to report the job continuing without the lost node", poll=1.0)
    seen = follow_states(job.job_id, 300)
    record = Registry().get(job.job_id)
    assert record.state == JobState.SUCCEEDED, (seen, record.detail)
    history = Registry().history(job.job_id)
    assert not any("requeued" in ev.detail for ev in history), history  # never requeued: the job lived on
    # while the survivors re-formed, a poll that caught it read as recovery ("restarting after node X was lost",
    # or "after a worker stopped" before Slurm marks the node), never as a failure
    shown = "\n".join(f"{ev.state.value} {ev.detail}" for ev in history)
    assert all(ev.detail.startswith("restarting after ") and "; resuming from step " in ev.detail
               for ev in history if ev.state == JobState.RESTARTING), shown
    assert not any("failed" in ev.detail for ev in history if not ev.state.finished), shown
    print(shown)
    assert "restart 1" not in batch_log(run_dir, job.native_id)

    worlds = [m["world_size"] for m in metrics(run_dir)]
    assert worlds[0] == 3 and worlds[-1] == 2 and worlds == sorted(worlds, reverse=True)
    assert metrics(run_dir)[-1]["step"] == steps
    assert record.restarts >= 1  # torchrun restarted the workers on the survivors


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_pre_timeout_signal_checkpoints_then_requeues(slurm, tmp_path) -> None:
    """Slurm sends USR2 to the batch shell signal_before_timeout_s before the time limit; here it
    is sent at once (`scancel --signal=USR2 --batch` is how Slurm delivers it) instead of after
    minutes. No periodic checkpoints: the only checkpoint is the one the signal asked for."""
    steps = 30  # enough that the job is still training when the signal arrives
    job = jobs.submit(load_spec(write_job(tmp_path, steps=steps, every=0,
                                          slurm={"time": "30", "signal_before_timeout_s": 20})), "slurm")
    run_dir = Path(job.run_dir)
    wait_until(lambda: len(metrics(run_dir)) >= 5, 120, "5 training steps")
    subprocess.run(["scancel", "--signal=USR2", "--batch", job.native_id], check=True, timeout=60)

    seen = follow_states(job.job_id, 300)
    record = Registry().get(job.job_id)
    assert record.state == JobState.SUCCEEDED, (seen, record.detail)
    assert JobState.RESTARTING in seen and record.restarts == 1
    assert "time limit near, requesting a checkpoint and requeueing" in batch_log(run_dir, job.native_id)

    before = [m for m in metrics(run_dir) if m["restart_count"] == 0]
    after = [m for m in metrics(run_dir) if m["restart_count"] == 1]
    resumed_from = after[0]["step"] - 1
    assert resumed_from >= 5 and resumed_from <= before[-1]["step"] + 1  # the checkpoint on request
    assert after[-1]["step"] == steps


@pytest.mark.timeout(240)
def test_status_of_many_jobs_is_one_squeue_call_and_sacct_knows_finished_jobs(slurm, tmp_path) -> None:
    (tmp_path / "hello.py").write_text("import os\nprint('hello from rank', os.environ['RANK'])\n")
    spec = tmp_path / "hello.yaml"
    spec.write_text(yaml.safe_dump({"name": "hello", "nodes": 1, "program": "hello.py",
                                    "python": sys.executable}))
    ids = [submit(spec) for _ in range(3)]
    records = [Registry().get(i) for i in ids]

    # a squeue that records its calls, in front of the real one
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real = subprocess.run(["bash", "-c", "command -v squeue"], capture_output=True, text=True).stdout.strip()
    (bin_dir / "squeue").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/squeue.calls\nexec {real} "$@"\n')
    (bin_dir / "squeue").chmod(0o755)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
        refreshed = jobs.refresh(records)
    assert len((tmp_path / "squeue.calls").read_text().splitlines()) == 1
    assert all(r.state in (JobState.PENDING, JobState.RUNNING, JobState.SUCCEEDED) for r in refreshed)

    for job_id in ids:
        assert follow_states(job_id, 120)[-1] == JobState.SUCCEEDED
        assert "hello from rank 0" in runner.invoke(app, ["logs", job_id]).output
    finished = query_sacct([r.native_id for r in records])  # what is left once squeue forgets them
    assert {finished[r.native_id].state for r in records} == {"COMPLETED"}


@pytest.mark.timeout(120)
def test_unknown_partition_is_refused_naming_the_key_and_the_partitions(slurm, tmp_path) -> None:
    partitions = subprocess.run(["sinfo", "--noheader", "--format=%R"], capture_output=True,
                                text=True, timeout=60).stdout.split()
    result = runner.invoke(app, ["submit", str(write_job(tmp_path)), "--cluster", "slurm",
                                 "--set", "slurm.partition=no-such-partition"])
    assert result.exit_code == 2
    assert "slurm.partition" in result.output and "Invalid partition name specified" in result.output
    assert all(p in result.output for p in partitions)
    (record,) = Registry().list()
    assert record.state == JobState.FAILED and record.detail.startswith("submit refused")


@pytest.mark.timeout(120)
def test_a_script_sbatch_rejects_shows_sbatch_s_own_message(slurm, tmp_path) -> None:
    result = runner.invoke(app, ["submit", str(write_job(tmp_path)), "--cluster", "slurm",
                                 "--set", "slurm.sbatch_options.gres=no-such-gpu:1"])
    assert result.exit_code == 2
    assert "sbatch rejected" in result.output and "Invalid generic resource (gres) specification" in result.output
    assert "job.sbatch" in result.output  # where the rejected script is kept


def test_doctor_says_slurm_is_usable_where_the_controller_answers(slurm) -> None:
    """The real cluster's answer to `orch doctor` (SLURM_CONF names the lab's slurm.conf)."""
    from orchestrator.doctor_clusters import slurm as slurm_row

    row = slurm_row()
    assert row.ok and row.status == "OK", row
    assert re.search(r"slurm\S* \d+\.\d+\.\d+, controller \S+ up \(config: .*slurm\.conf\)", row.detail), row.detail
    result = runner.invoke(app, ["doctor"], env={"COLUMNS": "80"})
    assert "│ slurm " in result.output and "NO CONFIG" not in result.output.split("│ slurm ")[1].split("\n")[0]
