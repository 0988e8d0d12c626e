"""Simulated nodes share one machine's CPUs: each worker of a local job gets its share of them as
intra-op threads unless the job (or the shell) sets ``OMP_NUM_THREADS``. torchrun alone gives a
one-worker node a thread per core, and three such nodes on two cores spun three OpenMP teams
against each other (a tiny GPT's step 1-6 s instead of 0.1 s)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orchestrator import jobs
from orchestrator.backends.local.render import render, threads_per_rank
from orchestrator.spec import load_spec
from orchestrator.types import JobState
from tests.polling import wait_until

REPORT = """\
import json, os, torch
rank = os.environ["RANK"]
with open(os.path.join(os.environ["ORCH_RUN_DIR"], f"threads-{rank}.json"), "w") as out:
    json.dump({"omp": os.environ.get("OMP_NUM_THREADS"), "torch": torch.get_num_threads()}, out)
"""


def test_each_worker_gets_its_share_of_the_cpus_and_at_least_one() -> None:
    assert threads_per_rank(4, cpus=16) == 4      # 2 nodes x 2 workers on a 16-core laptop (torchrun: 1)
    assert threads_per_rank(3, cpus=2) == 1       # 3 one-worker nodes on 2 cores (torchrun: 2 each)
    assert threads_per_rank(1, cpus=2) == 2
    assert threads_per_rank(64, cpus=8) == 1


def _spec(tmp_path: Path, env: dict[str, str] | None = None) -> Path:
    (tmp_path / "report.py").write_text(REPORT)
    spec = {"name": "threads", "nodes": 2, "procs_per_node": 1, "program": "report.py", "env": env or {}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "job.yaml"


def test_orch_render_shows_the_rule_and_keeps_a_users_setting(tmp_path: Path) -> None:
    text = render(load_spec(_spec(tmp_path))).text
    assert 'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))}"' in text
    mine = render(load_spec(_spec(tmp_path, {"OMP_NUM_THREADS": "3"}))).text
    assert mine.index("export OMP_NUM_THREADS=3") < mine.index('export OMP_NUM_THREADS="${OMP_NUM_THREADS:-')


def _run(spec_path: Path) -> list[dict]:
    record = jobs.submit(load_spec(spec_path), "local")

    def finished():
        rec, _ = jobs.status(record.job_id)
        return rec if rec.state.finished else None
    record = wait_until(finished, 240, f"job {record.job_id} to finish", poll=0.5)
    assert record.state == JobState.SUCCEEDED, record.detail
    return [json.loads((Path(record.run_dir) / f"threads-{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_two_one_worker_nodes_split_the_machine_and_a_jobs_own_setting_wins(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    shared, own = tmp_path / "shared", tmp_path / "own"
    shared.mkdir()
    own.mkdir()
    expected = threads_per_rank(2)
    assert _run(_spec(shared)) == [{"omp": str(expected), "torch": expected}] * 2
    assert _run(_spec(own, {"OMP_NUM_THREADS": "1"})) == [{"omp": "1", "torch": 1}] * 2
