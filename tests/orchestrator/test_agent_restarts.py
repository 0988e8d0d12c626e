"""Restarts are counted from the launchers, whatever the program: a script that reports nothing
still shows ``restarts 1`` in ``orch status`` and ``orch list`` after torchrun restarted its
workers once (the agents' attempt record in ``<run dir>/torchelastic``)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from engine.run_contract import agent_restarts, recorded_restarts, write_status
from orchestrator import jobs
from orchestrator.cli import app
from orchestrator.registry import Registry
from orchestrator.spec import load_spec
from orchestrator.types import JobState
from tests.polling import wait_until

runner = CliRunner()

# Knows nothing of orch: rank 1 fails on the first start of the workers, everything else succeeds.
FLAKY_SCRIPT = """\
import os, sys, time
if os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    sys.exit(1)
time.sleep(1)
"""


def attempts(root: Path, agent: str, *numbers: int) -> None:
    for n in numbers:
        (root / "torchelastic" / agent / f"attempt_{n}").mkdir(parents=True)


def test_the_agents_record_counts_the_most_restarts_per_incarnation_summed(tmp_path: Path) -> None:
    assert agent_restarts(tmp_path) == 0
    attempts(tmp_path, "job-7-0_ab_cd123", 0, 1)     # node 0 of the first incarnation: restarted once
    attempts(tmp_path, "job-7-0_x1y2z3w4", 0)        # node 1: its workers restarted with node 0's
    attempts(tmp_path, "job-7-1_q1w2e3r4", 0, 1, 2)  # after a Slurm requeue: two more
    assert agent_restarts(tmp_path) == 3
    write_status(tmp_path, "running", restart_count=5)  # a program that counts more wins
    assert recorded_restarts(tmp_path) == 5


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_program_that_reports_nothing_still_shows_its_worker_restart(tmp_path: Path) -> None:
    (tmp_path / "flaky.py").write_text(FLAKY_SCRIPT)
    spec = {"name": "flaky", "nodes": 1, "procs_per_node": 2, "program": "flaky.py", "max_restarts": 2}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    record = jobs.submit(load_spec(tmp_path / "job.yaml"), "local")

    def finished():
        rec, _ = jobs.status(record.job_id)
        return rec if rec.state.finished else None
    record = wait_until(finished, 400, f"job {record.job_id} to finish", poll=1.0)
    assert record.state == JobState.SUCCEEDED, record.detail
    assert not (Path(record.run_dir) / "status.json").exists()  # the program wrote nothing
    status = runner.invoke(app, ["status", record.job_id])
    assert "restarts 1" in status.output, status.output
    assert Registry().get(record.job_id).restarts == 1
