"""What orch makes of Slurm's answers, and the errors a user gets where Slurm is missing. These
need no cluster: Slurm's words (squeue/sacct tables, job states) are given as Slurm prints them."""
from __future__ import annotations

import os
import sys

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.types import JobState
from orchestrator.backends.slurm.state import expand_nodes, infos_from_table, job_state, node_is_lost
from orchestrator.cli import app
from orchestrator.registry import Registry
from tests.shared_env import REPO

runner = CliRunner()


@pytest.mark.parametrize("slurm, ours", [
    ("PENDING", JobState.PENDING), ("CONFIGURING", JobState.PENDING), ("REQUEUE_HOLD", JobState.PENDING),
    ("SUSPENDED", JobState.PENDING),
    ("RUNNING", JobState.RUNNING), ("COMPLETING", JobState.RUNNING), ("STAGE_OUT", JobState.RUNNING),
    ("REQUEUED", JobState.RESTARTING), ("REQUEUE_FED", JobState.RESTARTING),
    ("COMPLETED", JobState.SUCCEEDED),
    ("CANCELLED", JobState.CANCELLED), ("CANCELLED by 1000", JobState.CANCELLED), ("REVOKED", JobState.CANCELLED),
    ("FAILED", JobState.FAILED), ("OUT_OF_MEMORY", JobState.FAILED), ("BOOT_FAIL", JobState.FAILED),
    ("DEADLINE", JobState.FAILED), ("PREEMPTED", JobState.FAILED),
    ("NODE_FAIL", JobState.NODE_FAIL), ("TIMEOUT", JobState.TIMEOUT),
    ("SOMETHING_NEW", JobState.UNKNOWN),
])
def test_every_slurm_job_state_has_a_meaning(slurm: str, ours: JobState) -> None:
    state, detail = job_state(slurm)
    assert state == ours
    if ours == JobState.UNKNOWN:
        assert "SOMETHING_NEW" in detail  # an unknown state is shown, not hidden


def test_a_requeued_job_waiting_to_start_again_is_restarting() -> None:
    assert job_state("PENDING", restarts=0)[0] == JobState.PENDING
    state, detail = job_state("PENDING", restarts=2)
    assert state == JobState.RESTARTING and "restart 2" in detail


def test_finished_states_end_a_wait_and_running_ones_do_not() -> None:
    """`orch submit --wait` polls until the state is final: every final Slurm state must map to a
    final orch state (else the wait never ends), and no running one may."""
    for slurm in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                  "BOOT_FAIL", "DEADLINE"):
        assert job_state(slurm)[0].finished, slurm
    for slurm in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "CONFIGURING", "SUSPENDED"):
        assert not job_state(slurm)[0].finished, slurm


def test_squeue_and_sacct_tables_are_read_per_job() -> None:
    squeue = "41|RUNNING|None|n[1-2]|0|0|\n42|PENDING|BeginTime||1|0|\n43|COMPLETING|None|gpu[07,09-10]|0|256|\n"
    infos = infos_from_table(["JobID", "State", "Reason", "NodeList", "Restarts", "ExitCode"], squeue, "squeue")
    assert infos["41"].nodes == ("n1", "n2") and infos["41"].state == "RUNNING"
    assert infos["42"].restarts == 1 and infos["42"].reason == "BeginTime" and infos["42"].nodes == ()
    assert infos["43"].nodes == ("gpu07", "gpu09", "gpu10")

    sacct = "50|CANCELLED by 0|0:15|n3\n50.batch|CANCELLED|0:15|n3\n51|COMPLETED|0:0|(null)\n"
    done = infos_from_table(["JobID", "State", "ExitCode", "NodeList"], sacct, "sacct")
    assert set(done) == {"50", "51"}  # job steps (50.batch) are not jobs
    assert job_state(done["50"].state)[0] == JobState.CANCELLED and done["51"].nodes == ()


def test_node_states_that_mean_a_lost_node() -> None:
    assert all(node_is_lost(s) for s in ("down*", "mixed*", "idle*", "down", "fail", "allocated*"))
    assert not any(node_is_lost(s) for s in ("allocated", "mixed", "idle", "completing", "draining"))
    assert expand_nodes("n[1-3],login") == ("n1", "n2", "n3", "login")


def test_submit_without_slurm_installed_names_sbatch_and_how_to_get_it(tmp_path, monkeypatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"name": "no-slurm", "nodes": 2, "python": sys.executable}))
    result = runner.invoke(app, ["submit", str(spec), "--cluster", "slurm"])
    assert result.exit_code == 2
    assert "`sbatch` was not found on PATH" in result.output
    assert "apt-get install slurm-client" in result.output and "PATH" in result.output
    assert "Traceback" not in result.output
    (record,) = Registry().list()
    assert record.state == JobState.FAILED and "sbatch" in record.detail


def test_elastic_sbatch_asks_for_the_whole_range_and_srun_uses_every_allocated_node() -> None:
    """With --ntasks-per-node on sbatch, Slurm allocates only MIN nodes of MIN-MAX; and
    `srun --nodes=MIN-MAX --ntasks-per-node=1` inside such an allocation crashes slurmctld 22.05."""
    result = runner.invoke(app, ["render", str(REPO / "examples" / "tiny-gpt-elastic.yaml"), "--cluster", "slurm"])
    assert result.exit_code == 0
    header = [line for line in result.output.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --nodes=1-3" in header and not any("ntasks-per-node" in h for h in header)
    srun = result.output.split("\nsrun ", 1)[1].split("\n", 1)[0]
    assert "--ntasks-per-node=1" in srun and "--nodes" not in srun and "--no-kill" in srun


def test_jobs_sharing_a_node_get_different_rendezvous_ports(tmp_path) -> None:
    """All jobs would listen on 29500; unless the spec names a port, it comes from the job id."""
    import subprocess

    text = runner.invoke(app, ["render", str(REPO / "examples" / "tiny-gpt-zero2.yaml"), "--cluster", "slurm"]).output
    line = next(ln for ln in text.splitlines() if ln.startswith("rdzv_port="))
    ports = {subprocess.run(["bash", "-c", f"{line}; echo $rdzv_port"], capture_output=True, text=True,
                            env={**os.environ, "SLURM_JOB_ID": str(job)}).stdout.strip() for job in (7, 8)}
    assert len(ports) == 2 and all(10000 <= int(p) < 30000 for p in ports)
    fixed = runner.invoke(app, ["render", str(REPO / "examples" / "tiny-gpt-zero2.yaml"), "--cluster", "slurm",
                                "--set", "rdzv_port=29400"]).output
    assert "rdzv_port=29400" in fixed.splitlines()
