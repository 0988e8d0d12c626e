"""The Slurm backend's state logic on recorded Slurm output, without a cluster.

Like submitit's ``MockedSubprocess``, the Slurm commands are replaced by small executables on
PATH that print what a real squeue/sacct/sinfo/sbatch printed for the same question (the texts
below are in the exact formats orch asks for), so everything from ``orch submit`` to
``orch status`` runs as it does on a cluster: the same argv, the same parsing, the same
composition of Slurm's answer with the nodes' health and the trainer's status file. The
real-cluster tier (test_slurm_backend.py) checks the same paths against a live slurmctld.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.registry import Registry
from orchestrator.types import JobState

runner = CliRunner()
COMMANDS = ("sbatch", "squeue", "sacct", "sinfo", "scancel", "scontrol")

FAKE = """#!/bin/sh
# A recorded Slurm command: prints the recorded answer and exits with the recorded status.
answers={answers}
name=$(basename "$0")
printf '%s %s\\n' "$name" "$*" >> "$answers/calls.log"
[ -f "$answers/$name.out" ] && cat "$answers/$name.out"
[ -f "$answers/$name.err" ] && cat "$answers/$name.err" >&2
exit "$(cat "$answers/$name.rc" 2>/dev/null || echo 0)"
"""


class RecordedSlurm:
    """Slurm's client commands replaced by recordings; ``answer`` sets what one prints next."""

    def __init__(self, root: Path) -> None:
        self.answers = root / "answers"
        self.answers.mkdir()
        bin_dir = root / "bin"
        bin_dir.mkdir()
        for name in COMMANDS:
            exe = bin_dir / name
            exe.write_text(FAKE.format(answers=self.answers))
            exe.chmod(0o755)
        self.bin = bin_dir

    def answer(self, command: str, stdout: str = "", *, stderr: str = "", rc: int = 0) -> None:
        (self.answers / f"{command}.out").write_text(stdout)
        (self.answers / f"{command}.err").write_text(stderr)
        (self.answers / f"{command}.rc").write_text(str(rc))

    def calls(self, command: str) -> list[str]:
        log = self.answers / "calls.log"
        lines = log.read_text().splitlines() if log.exists() else []
        return [line.split(" ", 1)[1] for line in lines if line.split(" ", 1)[0] == command]


@pytest.fixture
def slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RecordedSlurm:
    fake = RecordedSlurm(tmp_path)
    monkeypatch.setenv("PATH", f"{fake.bin}:/usr/bin:/bin")
    # the backend remembers per SLURM_CONF whether sacct has accounting: one conf per test
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))
    return fake


def submit(tmp_path: Path, fake: RecordedSlurm, native_id: str = "4242", **spec: object) -> str:
    """``orch submit --cluster slurm`` of a small spec; sbatch answers with ``native_id``."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"name": "recorded", "nodes": 2, "python": sys.executable, **spec}))
    fake.answer("sbatch", f"{native_id}\n")
    result = runner.invoke(app, ["submit", str(path), "--cluster", "slurm"])
    assert result.exit_code == 0, result.output
    return re.search(r"submitted (\S+)", result.output).group(1)


def status(job_id: str) -> str:
    result = runner.invoke(app, ["status", job_id])
    assert result.exit_code == 0, result.output
    return result.output


def squeue_row(job: str, state: str, reason: str = "None", nodes: str = "", restarts: int = 0,
               exit_code: str = "0") -> str:
    """One line as ``squeue --noheader --Format=JobID:|,State:|,Reason:|,NodeList:|,RestartCnt:|,exit_code:|`` prints it."""
    return f"{job}|{state}|{reason}|{nodes}|{restarts}|{exit_code}|\n"


def test_submit_sends_the_rendered_script_and_records_slurms_job_id(tmp_path, slurm) -> None:
    job_id = submit(tmp_path, slurm)
    (call,) = slurm.calls("sbatch")
    record = Registry().get(job_id)
    assert record.native_id == "4242" and call.startswith("--parsable --chdir=")
    script = Path(record.run_dir) / "job.sbatch"
    assert call.endswith(str(script)) and "#SBATCH --job-name=recorded" in script.read_text()


def test_a_lost_node_of_an_elastic_job_is_named_and_the_job_goes_on(tmp_path, slurm) -> None:
    job_id = submit(tmp_path, slurm, nodes="2:3", max_restarts=2)
    slurm.answer("squeue", squeue_row("4242", "RUNNING", nodes="n[1-2]"))
    slurm.answer("sinfo", "n1|allocated\nn2|down*\n")
    out = status(job_id)
    assert "RUNNING" in out and "node n2 lost; elastic job continuing on n1" in out
    assert "node n1: RUNNING" in out and "node n2: NODE_FAIL" in out
    assert slurm.calls("sinfo") == ["--noheader --Node --nodes=n1,n2 --format=%N|%T"]


@pytest.mark.parametrize("requeue, says", [
    (True, "node n2 not responding; Slurm requeues the job once it declares the node down"),
    (False, "the job fails once Slurm declares it down (slurm.requeue is false)"),
])
def test_a_lost_node_of_a_fixed_size_job_says_what_slurm_will_do(tmp_path, slurm, requeue, says) -> None:
    job_id = submit(tmp_path, slurm, slurm={"requeue": requeue})
    slurm.answer("squeue", squeue_row("4242", "RUNNING", nodes="n[1-2]"))
    slurm.answer("sinfo", "n1|allocated\nn2|idle*\n")
    assert says in status(job_id)


def test_an_elastic_job_below_its_maximum_says_how_many_nodes_it_has(tmp_path, slurm) -> None:
    job_id = submit(tmp_path, slurm, nodes="1:3", max_restarts=2)
    slurm.answer("squeue", squeue_row("4242", "RUNNING", nodes="n[1-2]"))
    slurm.answer("sinfo", "n1|allocated\nn2|allocated\n")
    assert "Slurm job 4242 on n1, n2 (2 of up to 3 nodes)" in status(job_id)


def test_a_pending_reason_that_never_resolves_by_waiting_comes_with_the_fix(tmp_path, slurm) -> None:
    job_id = submit(tmp_path, slurm)
    slurm.answer("squeue", squeue_row("4242", "PENDING", reason="PartitionTimeLimit"))
    out = status(job_id)
    assert "PENDING" in out and "waiting: PartitionTimeLimit: slurm.time exceeds the partition's limit" in out
    assert not slurm.calls("sinfo")  # nodes are asked about only for running jobs


def test_a_requeued_job_waiting_to_start_again_is_restarting_with_its_count(tmp_path, slurm) -> None:
    job_id = submit(tmp_path, slurm)
    slurm.answer("squeue", squeue_row("4242", "PENDING", reason="BeginTime", restarts=2))
    out = status(job_id)
    assert "RESTARTING" in out and "restarts 2" in out
    assert "requeued (restart 2), waiting to start again (Slurm: BeginTime)" in out


@pytest.mark.parametrize("raw, says", [("256", "exit code 1"), ("9", "killed by signal 9")])
def test_squeue_raw_wait_status_becomes_an_exit_code_or_a_signal(tmp_path, slurm, raw, says) -> None:
    job_id = submit(tmp_path, slurm)
    slurm.answer("squeue", squeue_row("4242", "FAILED", nodes="n1", exit_code=raw))
    out = status(job_id)
    assert "FAILED" in out and says in out and f"see `orch logs {job_id}`" in out


def test_a_job_squeue_forgot_is_read_from_sacct(tmp_path, slurm) -> None:
    job_id = submit(tmp_path, slurm)
    slurm.answer("squeue", "")
    slurm.answer("sacct", "4242|TIMEOUT|0:15|n[1-2]\n4242.batch|CANCELLED|0:15|n1\n")
    out = status(job_id)
    assert "TIMEOUT" in out and "reached its time limit (slurm.time)" in out and "signal 15" in out
    (call,) = slurm.calls("sacct")
    assert "--parsable2" in call and "--jobs=4242" in call and "-c" not in call.split()


@pytest.mark.parametrize("trainer, state, says", [
    ({"state": "finished"}, JobState.SUCCEEDED, "the trainer reported it finished"),
    ({"state": "failed", "error": "CUDA out of memory"}, JobState.FAILED, "CUDA out of memory"),
    ({}, JobState.UNKNOWN, "Slurm no longer knows job 4242"),
])
def test_without_accounting_the_trainers_status_file_tells_how_a_job_ended(tmp_path, slurm, trainer, state,
                                                                           says) -> None:
    job_id = submit(tmp_path, slurm)
    if trainer:
        (Path(Registry().get(job_id).run_dir) / "status.json").write_text(json.dumps(trainer))
    slurm.answer("squeue", "")
    slurm.answer("sacct", stderr="sacct: error: Slurm accounting storage is disabled\n", rc=1)
    out = status(job_id)
    assert Registry().get(job_id).state == state and says in out
    # asked: the accounting database, then the job-completion log (sacct -c)
    assert [c.split()[0] for c in slurm.calls("sacct")] == ["--noheader", "-c"]


def test_a_cluster_without_accounting_is_not_asked_again(tmp_path, slurm) -> None:
    job_id = submit(tmp_path, slurm)
    slurm.answer("squeue", "")
    slurm.answer("sacct", stderr="sacct: error: Slurm accounting storage is disabled\n", rc=1)
    for _ in range(3):
        assert "UNKNOWN" in status(job_id)
    assert len(slurm.calls("sacct")) == 2 and len(slurm.calls("squeue")) == 3


@pytest.mark.parametrize("stderr, key, hint", [
    ("sbatch: error: Batch job submission failed: Invalid partition name specified", "slurm.partition",
     "this cluster has: debug, gpu"),
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
     "slurm.account", "sacctmgr show assoc"),
    ("sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit)",
     "slurm.time", "sinfo -o '%P %l'"),
    ("sbatch: error: Batch job submission failed: Requested node configuration is not available",
     "nodes / procs_per_node / gpus_per_node / slurm.mem / slurm.cpus_per_task / slurm.constraint", "sinfo -o '%P %D %c %m %G %f'"),
])
def test_sbatch_refusals_name_the_spec_key_and_how_to_check_it(tmp_path, slurm, stderr, key, hint) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"name": "refused", "nodes": 2, "slurm": {"partition": "gpux"}}))
    slurm.answer("sbatch", stderr=stderr + "\n", rc=1)
    slurm.answer("sinfo", "debug\ngpu\ngpu\n")
    result = runner.invoke(app, ["submit", str(spec), "--cluster", "slurm"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"sbatch rejected the job ({key}):" in result.output and hint in result.output
    (record,) = Registry().list()
    assert record.state == JobState.FAILED and "submit refused" in record.detail


def test_an_unreachable_controller_is_not_blamed_on_the_spec(tmp_path, slurm) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"name": "nocontroller", "nodes": 1}))
    slurm.answer("sbatch", stderr="sbatch: error: Batch job submission failed: Unable to contact slurm "
                                  "controller (connect failure)\n", rc=1)
    result = runner.invoke(app, ["submit", str(spec), "--cluster", "slurm"])
    assert result.exit_code == 2 and "slurmctld is not reachable from here" in result.output


def test_logs_show_the_batch_output_and_every_nodes_file_and_follow_ends_with_the_job(tmp_path, slurm) -> None:
    job_id = submit(tmp_path, slurm)
    run = Path(Registry().get(job_id).run_dir)
    (run / "slurm-4242.out").write_text("orch: job 4242 restart 0 on n[1-2]\n")
    (run / "logs" / "node-n1.log").write_text("orch: node n1 starting\nstep 1 loss 5.0\n")
    (run / "logs" / "node-n2.log").write_text("orch: node n2 starting\npartial line without newline")
    shown = runner.invoke(app, ["logs", job_id])
    assert shown.output.splitlines() == ["[batch] orch: job 4242 restart 0 on n[1-2]", "[n1] orch: node n1 starting",
                                         "[n1] step 1 loss 5.0", "[n2] orch: node n2 starting"]
    assert runner.invoke(app, ["logs", job_id, "--node", "n1"]).output.splitlines()[-1] == "step 1 loss 5.0"
    missing = runner.invoke(app, ["logs", job_id, "--node", "n9"])
    assert missing.exit_code == 2 and "this job has: batch, n1, n2" in missing.output

    slurm.answer("squeue", squeue_row("4242", "COMPLETED", nodes="n[1-2]"))
    followed = runner.invoke(app, ["logs", job_id, "--node", "n2", "--follow"])
    assert followed.exit_code == 0  # the job is over: the last partial line is shown, then it stops
    assert followed.output.splitlines() == ["orch: node n2 starting", "partial line without newline"]


def test_cancel_runs_scancel_and_waits_until_slurm_reports_the_job_ended(tmp_path, slurm) -> None:
    job_id = submit(tmp_path, slurm)
    slurm.answer("squeue", squeue_row("4242", "CANCELLED", nodes="n[1-2]"))
    result = runner.invoke(app, ["cancel", job_id])
    assert result.exit_code == 0 and f"{job_id}: CANCELLED" in result.output
    assert slurm.calls("scancel") == ["4242"]
    assert Registry().get(job_id).state == JobState.CANCELLED


# -- an elastic restart is shown as the recovery it is, "failed" is kept for failures --------------

def trainer_wrote(job_id: str, *, latest: str | None = None, **status_json: object) -> Path:
    """What the trainer leaves in the run directory: status.json, and checkpoints/latest."""
    run = Path(Registry().get(job_id).run_dir)
    (run / "status.json").write_text(json.dumps(status_json))
    if latest is not None:
        (run / "checkpoints").mkdir(exist_ok=True)
        (run / "checkpoints" / "latest").write_text(latest)
    return run


def status_at_80_columns(job_id: str) -> str:
    result = runner.invoke(app, ["status", job_id], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.output


def test_an_elastic_job_recovering_from_a_lost_node_is_restarting_not_failed(tmp_path, slurm) -> None:
    job_id = submit(tmp_path, slurm, nodes="1:2", max_restarts=2)
    slurm.answer("squeue", squeue_row("4242", "RUNNING", nodes="n[1-2]"))
    slurm.answer("sinfo", "n1|allocated\nn2|down*\n")
    # n2 is gone: the ranks on n1 stopped in a collective, torchrun is re-forming on n1
    trainer_wrote(job_id, latest="step-30", state="failed", step=33, total_steps=120,
                  error="RuntimeError: [gloo] Connection closed by peer [10.0.0.2]:41234")
    for _ in range(3):  # every poll of the recovery says the same
        out = status_at_80_columns(job_id)
        assert f"{job_id}  slurm  RESTARTING" in out
        assert "restarting after node n2 was lost; resuming from step 30" in out
        assert "trainer restarting: stopped at step 33/120, resuming from step 30" in out
        assert "why it stopped: RuntimeError: [gloo] Connection closed by peer" in out
        assert "failed" not in out
    assert "RESTARTING" in runner.invoke(app, ["list"], env={"COLUMNS": "80"}).output

    # the agents re-formed on n1 and the trainer resumed from step 30
    trainer_wrote(job_id, state="running", step=31, total_steps=120, restart_count=1)
    out = status_at_80_columns(job_id)
    assert "RUNNING  restarts 1  node n2 lost; elastic job continuing on n1" in out
    assert "trainer running: step 31/120" in out and "failed" not in out


def test_a_worker_failure_without_restarts_left_is_a_failure(tmp_path, slurm) -> None:
    job_id = submit(tmp_path, slurm, nodes="1:2", max_restarts=1)
    slurm.answer("squeue", squeue_row("4242", "RUNNING", nodes="n1"))
    slurm.answer("sinfo", "n1|allocated\n")
    trainer_wrote(job_id, latest="step-60", state="failed", step=64, total_steps=120, restart_count=1,
                  error="ValueError: loss is NaN")
    out = status_at_80_columns(job_id)
    assert "RUNNING" in out and "RESTARTING" not in out and "restarting" not in out
    assert "trainer failed: step 64/120" in out and "trainer error: ValueError: loss is NaN" in out

    slurm.answer("squeue", squeue_row("4242", "FAILED", nodes="n1", exit_code="256"))
    out = status_at_80_columns(job_id)
    assert "FAILED" in out and "exit code 1" in out and "trainer failed: step 64/120" in out


def test_a_first_failure_with_restarts_left_restarts_from_the_latest_checkpoint(tmp_path, slurm) -> None:
    job_id = submit(tmp_path, slurm, max_restarts=3)
    slurm.answer("squeue", squeue_row("4242", "RUNNING", nodes="n[1-2]"))
    slurm.answer("sinfo", "n1|allocated\nn2|allocated\n")
    trainer_wrote(job_id, state="failed", step=12, total_steps=120, error="OSError: [Errno 5] EIO")
    out = status_at_80_columns(job_id)
    assert "RESTARTING" in out and "restarting after a worker stopped at step 12; starting over (no " \
                                   "checkpoint yet)" in " ".join(out.split())


def test_a_requeued_job_says_where_it_will_resume(tmp_path, slurm) -> None:
    job_id = submit(tmp_path, slurm)
    slurm.answer("squeue", squeue_row("4242", "PENDING", reason="BeginTime", restarts=1))
    trainer_wrote(job_id, latest="step-30", state="failed", step=33, total_steps=120, error="node n2 failed")
    out = status_at_80_columns(job_id)
    assert "requeued (restart 1), waiting to start again (Slurm: BeginTime); will resume from step 30" in out
    assert "trainer restarting: stopped at step 33/120, resuming from step 30" in out
    assert "trainer failed" not in out
