"""The hang watchdog: a rank that stops inside a step makes every rank dump its stacks, and the job fails
with a message that points to the dumps."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine.trainer.hang_report import read_dump, verdict
from engine.trainer.step_timer import Position
from engine.trainer.watchdog import HANG_EXIT_CODE, Watchdog
from tests.trainer_runs import TINY_CONFIG, clean_env

TIMEOUT_S = 8


def orch(*args: str, home: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          env=clean_env(ORCH_HOME=str(home), COLUMNS="200"), timeout=timeout)


@pytest.fixture(scope="module")
def hung_job(tmp_path_factory):
    """A local job of 2 ranks where rank 1 sleeps inside step 3 (ORCH_TEST_STALL), watchdog at 8 s."""
    work = tmp_path_factory.mktemp("hang")
    spec = {
        "name": "hang-demo", "nodes": 1, "procs_per_node": 2, "program": "engine.train",
        "args": ["--model", "tiny", "--steps", "20", "--log-every", "1"],
        "ds_config": TINY_CONFIG, "max_restarts": 0,
        "env": {"ORCH_TEST_STALL": "1@3", "ORCH_WATCHDOG_TIMEOUT": str(TIMEOUT_S)},
    }
    (work / "hang.yaml").write_text(yaml.safe_dump(spec))
    home = work / "home"
    started = time.monotonic()
    submitted = orch("submit", str(work / "hang.yaml"), "--cluster", "local", "--wait", home=home)
    elapsed = time.monotonic() - started
    job_id = re.search(r"submitted (\S+)", submitted.stdout).group(1)
    return home, job_id, home / "runs" / job_id, submitted, elapsed


@pytest.mark.slow
def test_a_stalled_rank_fails_the_job_and_every_rank_dumps_its_stacks(hung_job):
    home, job_id, run_dir, submitted, elapsed = hung_job
    assert submitted.returncode == 1, submitted.stdout + submitted.stderr
    assert "FAILED" in submitted.stdout
    assert elapsed < 150  # the job ends by itself: it does not wait for gloo's 30-minute timeout

    dumps = {r: (run_dir / "hang" / f"rank-{r}.txt") for r in (0, 1)}
    assert all(p.exists() for p in dumps.values()), sorted(os.listdir(run_dir))
    # Both dumps follow the last completed step by the timeout (plus at most a few polls).
    last_step = max(r["time"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                    if r.get("kind") == "train")
    for path in dumps.values():
        assert TIMEOUT_S - 1 <= path.stat().st_mtime - last_step <= TIMEOUT_S + 15

    stalled, waiting = dumps[1].read_text(), dumps[0].read_text()
    # Rank 1 is asleep in the test hook inside step 3's backward phase; rank 0 waits in the
    # gradient all-reduce that rank 1 never entered, and its flight recorder says so.
    assert "phase: backward of step 3" in stalled and "in stall_if_requested" in stalled
    assert "last completed step: 2" in stalled
    assert "in all_reduce" in waiting and "in backward" in waiting
    assert re.search(r"^last collective entered: #\d+ gloo:all_reduce .*NOT completed", waiting, re.M)
    summary = (run_dir / "hang" / "summary.txt").read_text()
    assert summary.startswith("rank(s) [1] never entered collective")


@pytest.mark.slow
def test_the_failure_message_points_to_the_dumps(hung_job):
    home, job_id, run_dir, _, _ = hung_job
    logs = orch("logs", job_id, home=home).stdout
    assert f"hang watchdog: no training step completed in {TIMEOUT_S} s" in logs
    assert str(run_dir / "hang" / "rank-1.txt") in logs
    assert f"exitcode  : {HANG_EXIT_CODE}" in logs  # torchrun's summary carries our message too
    assert "look at rank 1's stack first" in logs
    status = orch("status", job_id, "--metrics", home=home).stdout
    assert "FAILED" in status and "trainer failed" in status
    assert "hang watchdog" in status and str(run_dir / "hang") in status


def test_dumps_name_the_phase_and_the_summary_names_the_rank_behind(tmp_path):
    # Two watchdogs of a pretend 2-rank job write real dumps of this process (no process group:
    # the flight recorder section says why it is empty); then rank 1's file is edited to the
    # state of a real hang: it entered collective #11 while rank 0 waits in #12.
    entered = time.monotonic() - 30
    dogs = [Watchdog(5, tmp_path, r, 2, lambda r=r: Position("backward", 3, r, 2, entered)) for r in (0, 1)]
    for dog in dogs:
        dog.dump(dogs[0]._position())
    text = (tmp_path / "hang" / "rank-0.txt").read_text()
    assert "phase: backward of step 3, micro-step 1/2, entered 3" in text
    assert "(no process group: a single-process run)" in text
    assert "in test_dumps_name_the_phase_and_the_summary_names_the_rank_behind" in text  # this stack
    both = {r: read_dump(tmp_path / "hang" / f"rank-{r}.txt", r) for r in (0, 1)}
    assert verdict(both, 2).startswith("no collectives were recorded")

    for rank, seq in ((0, 12), (1, 11)):
        path = tmp_path / "hang" / f"rank-{rank}.txt"
        path.write_text(path.read_text().replace("last collective entered: none recorded",
                                                 f"last collective entered: #{seq} gloo:all_reduce: x"))
    both = {r: read_dump(tmp_path / "hang" / f"rank-{r}.txt", r) for r in (0, 1)}
    assert verdict(both, 2).startswith("rank(s) [1] never entered collective #12, which rank(s) [0]")
    assert verdict({0: both[0]}, 2).startswith("rank(s) [1] wrote no dump here")
    assert "the watchdog off" in dogs[0].message(None) and "before the first step" in dogs[0].message(None)


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--watchdog-timeout", "-1"], {}, "--watchdog-timeout must be >= 0 seconds (0 = off), got -1.0"),
    (["--watchdog-timeout", "inf"], {}, "--watchdog-timeout must be >= 0 seconds"),
    ([], {"ORCH_WATCHDOG_TIMEOUT": "ten"}, "environment variable ORCH_WATCHDOG_TIMEOUT='ten' must be a number"),
])
def test_bad_watchdog_settings_are_one_line_errors(tmp_path, args, env, message):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps(TINY_CONFIG))
    result = subprocess.run([sys.executable, "-m", "engine.train", "--deepspeed_config", str(config), *args],
                            capture_output=True, text=True, timeout=60, env=clean_env(**env))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("engine.train: error: ") and message in lines[0], lines
