"""A newcomer's session in an 80-column terminal: `orch list`, `orch doctor`, `orch status` during an
elastic restart, and `orch check` of a spec with several mistakes.

The rendering width is fixed (COLUMNS=80, which rich reads when it prints), Slurm's commands are
the recorded ones of test_slurm_recorded.py (same argv, same parsing as on a cluster).
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
from tests.orchestrator.test_slurm_recorded import RecordedSlurm, slurm, squeue_row, submit  # noqa: F401

runner = CliRunner()
NARROW = {"COLUMNS": "80"}


def orch(*argv: str, code: int = 0) -> str:
    result = runner.invoke(app, list(argv), env=NARROW)
    assert result.exit_code == code, result.output
    return result.output


def recorded_job(name: str, cluster: str, native_id: str, state: JobState, detail: str, restarts: int = 0) -> str:
    """A finished job of another cluster, as the registry keeps it (its status needs no cluster)."""
    from orchestrator.registry import new_job_id

    registry = Registry()
    job_id = new_job_id(name)
    registry.add(job_id, name, cluster, f"/runs/{job_id}", {"name": name})
    registry.set_native_id(job_id, native_id)
    registry.update_state(job_id, state, detail, restarts)
    return job_id


# -- orch list -----------------------------------------------------------------------------------

def jobs_of_every_kind(tmp_path: Path, fake: RecordedSlurm) -> list[str]:
    ids = [submit(tmp_path, fake, native_id="4242", name="tiny-gpt-elastic", nodes="1:2", max_restarts=2)]
    fake.answer("squeue", squeue_row("4242", "RUNNING", nodes="n[1-2]", restarts=1))
    fake.answer("sinfo", "n1|allocated\nn2|allocated\n")
    ids.append(recorded_job("tiny-gpt", "local", "pid:81234", JobState.SUCCEEDED, "finished"))
    ids.append(recorded_job("gpt-1b-gpu", "kubernetes", "ml-team/gpt-1b-gpu", JobState.FAILED,
                            "PyTorchJob gpt-1b-gpu failed: worker-1 exited with code 137 (OOMKilled); "
                            "see `orch logs` [pod gpt-1b-gpu-worker-1]", restarts=3))
    return ids


def test_every_job_id_in_orch_list_at_80_columns_is_complete(tmp_path, slurm) -> None:
    ids = jobs_of_every_kind(tmp_path, slurm)
    out = orch("list")
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), out
    for job_id in ids:  # each id whole on one line: a user can double-click and copy it
        assert any(job_id in line.split() for line in lines), (job_id, out)
    assert "…" not in out and "ml-team/gpt-1b-gpu" in out and "4242" in out
    assert "[pod gpt-1b-gpu-worker-1]" in " ".join(out.split())  # brackets are text, not markup


def test_a_narrow_listing_keeps_a_table_with_details_below_each_row(tmp_path, slurm) -> None:
    local_ids = [recorded_job("tiny-gpt", "local", f"pid:{n}", JobState.SUCCEEDED, "finished") for n in (1, 2)]
    out = orch("list", "--no-refresh")
    header, rule, *rows = out.splitlines()[1:]
    assert header.split()[:3] == ["job", "id", "cluster"] and set(rule) == {"-"}
    assert {row.split()[0] for row in rows if not row.startswith(" ")} == set(local_ids)


def test_a_very_long_job_name_turns_the_listing_into_blocks_headed_by_the_whole_id(tmp_path, slurm) -> None:
    long_name = "pretrain-" + "x" * 50
    job_id = recorded_job(long_name, "kubernetes", f"research/{long_name}", JobState.SUCCEEDED, "Succeeded")
    out = orch("list", "--no-refresh")
    assert job_id in out.splitlines()  # the id alone on its line, never cut
    assert f"native id research/{long_name}" in out and "SUCCEEDED" in out


def test_list_plain_and_json_rows_round_trip_through_orch_status(tmp_path, slurm) -> None:
    ids = jobs_of_every_kind(tmp_path, slurm)
    rows = json.loads(orch("list", "-o", "json"))
    assert [r["job_id"] for r in rows] == ids[::-1]  # newest first
    plain = [line.split("\t") for line in orch("list", "--plain").splitlines()]
    assert [p[0] for p in plain] == [r["job_id"] for r in rows] and all(len(p) == 7 for p in plain)
    for row, fields in zip(rows, plain):
        assert fields[1:4] == [row["cluster"], row["state"], str(row["restarts"])] and fields[5] == row["native_id"]
        status_line = orch("status", row["job_id"]).splitlines()[0]
        assert status_line.split()[:3] == [row["job_id"], row["cluster"], row["state"]]
        assert f"restarts {row['restarts']}" in status_line
    elastic = next(r for r in rows if r["cluster"] == "slurm")
    assert elastic["state"] == "RUNNING" and elastic["restarts"] == 1 and elastic["native_id"] == "4242"


def test_an_unknown_list_output_format_names_the_choices(slurm) -> None:
    assert "--output 'yaml' is not one of table, plain, json" in orch("list", "-o", "yaml", code=2)


# -- orch doctor ---------------------------------------------------------------------------------

def doctor_row(out: str, component: str) -> tuple[str, str]:
    """A row of the doctor table at 80 columns: its status and its detail, wrapped lines joined."""
    status, detail, inside = "", [], False
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("│").split("│")] if line.startswith("│") else None
        if cells is None or len(cells) != 3:
            inside = False
            continue
        if cells[0]:
            inside = cells[0] == component
            status = cells[1] if inside else status
        if inside:
            detail.append(cells[2])
    assert status, f"no {component} row in\n{out}"
    return status, " ".join(detail)


def squashed(text: str) -> str:
    """Text without whitespace: a long path folds across table lines at any character."""
    return "".join(text.split())


DNS_FAILURE = ("{cmd}: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host\n"
               "{cmd}: error: fetch_config: DNS SRV lookup failed\n"
               "{cmd}: error: _establish_config_source: failed to fetch config\n"
               "{cmd}: fatal: Could not establish a configuration source\n")


def test_doctor_says_slurm_is_installed_but_has_no_cluster_configuration(slurm, monkeypatch) -> None:
    monkeypatch.delenv("SLURM_CONF")
    for cmd in ("sbatch", "scontrol"):
        slurm.answer(cmd, stderr=DNS_FAILURE.format(cmd=cmd), rc=1)
    out = orch("doctor")
    assert all(len(line) <= 80 for line in out.splitlines())
    status, detail = doctor_row(out, "slurm")
    assert status == "NO CONFIG"
    assert detail.startswith("installed, no cluster configuration found; set SLURM_CONF or run on a login node")
    assert "MISSING" not in status and "res_nsearch" not in out and "resolve_ctls" not in out


def test_doctor_names_a_slurm_conf_that_does_not_exist(slurm, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "missing.conf"))
    slurm.answer("sbatch", stderr="sbatch: error: s_p_parse_file: unable to status file", rc=1)
    status, detail = doctor_row(orch("doctor"), "slurm")
    assert status == "NO CONFIG" and squashed(f"SLURM_CONF={tmp_path / 'missing.conf'} does not exist") in squashed(detail)


def test_doctor_says_slurm_is_usable_when_the_controller_answers(slurm, tmp_path) -> None:
    (tmp_path / "slurm.conf").write_text("ClusterName=lab\n")
    slurm.answer("sbatch", "slurm 23.11.4\n")
    slurm.answer("scontrol", "Slurmctld(primary) at ctl1 is UP\n")
    status, detail = doctor_row(orch("doctor"), "slurm")
    assert status == "OK" and "slurm 23.11.4, controller ctl1 up" in detail


def test_doctor_says_when_the_slurm_controller_does_not_answer(slurm, tmp_path) -> None:
    (tmp_path / "slurm.conf").write_text("ClusterName=lab\n")
    slurm.answer("sbatch", "slurm 23.11.4\n")
    slurm.answer("scontrol", "Slurmctld(primary) at ctl1 is DOWN\n", rc=1)
    status, detail = doctor_row(orch("doctor"), "slurm")
    assert status == "UNREACHABLE" and "the Slurm controller does not answer" in detail
    assert "scontrol ping" in detail


def test_doctor_says_kubernetes_has_a_client_but_no_kubeconfig(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    status, detail = doctor_row(orch("doctor"), "kubernetes")
    assert status == "NO CONFIG"
    assert re.search(r"client \S+ installed, no kubeconfig found at", detail) and "set KUBECONFIG" in detail


def test_doctor_says_when_the_kubeconfigs_api_server_does_not_answer(tmp_path, monkeypatch) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "lab",
        "clusters": [{"name": "lab", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "me"}}],
        "users": [{"name": "me", "user": {"token": "t"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    status, detail = doctor_row(orch("doctor"), "kubernetes")
    assert status == "UNREACHABLE" and "context 'lab'" in detail
    assert squashed(f"127.0.0.1:{port} does not answer") in squashed(detail)


def test_doctor_on_helm_missing_and_present(tmp_path, monkeypatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    status, detail = doctor_row(orch("doctor"), "helm")
    assert status == "MISSING" and "needed only to install charts/orch-job" in detail
    helm = bin_dir / "helm"
    helm.write_text("#!/bin/sh\necho v3.14.2+gc309b6f\n")
    helm.chmod(0o755)
    status, detail = doctor_row(orch("doctor"), "helm")
    assert status == "OK" and "v3.14.2" in detail


# -- orch check: every problem of the spec and its ds_config in one run ---------------------------

def write_job(tmp_path: Path, spec: dict, ds_config: dict | None = None) -> Path:
    if ds_config is not None:
        (tmp_path / "ds_config.json").write_text(json.dumps(ds_config))
        spec = {**spec, "ds_config": "ds_config.json"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def problem_lines(out: str) -> list[str]:
    """The ``  - file: key: ...`` lines of an error (the error console never wraps them)."""
    return [line.removeprefix("  - ") for line in out.splitlines() if line.startswith("  - ")]


def test_check_reports_the_specs_and_the_ds_configs_problems_in_one_run(tmp_path) -> None:
    job = write_job(tmp_path, {"name": "Tiny_GPT", "nodes": 1, "procs_per_node": 2, "max_restarts": -1},
                    {"train_batch_size": 8, "zero_optimization": {"stage": 5},
                     "fp16": {"enabled": True, "loss_scael": 0}})
    out = orch("check", str(job), code=2)
    assert "4 problems in" in out and "and its ds_config" in out
    lines = problem_lines(out)
    assert lines[0].startswith(f"{job}: name: 'Tiny_GPT' is not a DNS-1035 label") and "(e.g. 'gpt-tiny')" in lines[0]
    assert lines[1].startswith(f"{job}: max_restarts:") and "greater than or equal to 0" in lines[1]
    ds = str(tmp_path / "ds_config.json")
    assert any(line.startswith(f"{ds}: zero_optimization.stage: must be <= 3, got 5") for line in lines)
    assert any(line.startswith(f"{ds}: fp16.loss_scael: unknown key") and "did you mean 'loss_scale'" in line
               for line in lines)
    assert "Traceback" not in out


def test_submit_of_such_a_spec_also_lists_everything_and_records_nothing(tmp_path) -> None:
    job = write_job(tmp_path, {"name": "Tiny_GPT", "python": sys.executable},
                    {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 5}})
    out = orch("submit", str(job), code=2)
    assert "2 problems" in out and "name: 'Tiny_GPT'" in out and "zero_optimization.stage: must be <= 3" in out
    assert Registry().list(include_finished=True) == []


def test_a_missing_ds_config_file_is_reported_with_the_specs_problems(tmp_path) -> None:
    job = write_job(tmp_path, {"name": "Tiny_GPT", "ds_config": "nope.json"})
    lines = problem_lines(orch("check", str(job), code=2))
    assert len(lines) == 2 and f"ds_config: file {tmp_path / 'nope.json'} not found" in lines[1]


def test_a_valid_spec_still_gets_the_ds_configs_problems_all_at_once(tmp_path) -> None:
    job = write_job(tmp_path, {"name": "tiny-gpt", "args": ["--model", "tiny"]},
                    {"train_batch_size": 8, "zero_optimization": {"stage": 5}, "gradient_clipping": -1})
    out = " ".join(orch("check", str(job), code=2).split())
    assert "zero_optimization.stage: must be <= 3, got 5" in out and "gradient_clipping" in out


# -- orch status while a local elastic job recovers ------------------------------------------------

def local_job_recovering(tmp_path: Path, *, lost_node: bool, max_restarts: int = 3) -> tuple[str, Path]:
    """A local elastic job as its supervisor and trainer describe it mid-recovery: the supervisor
    (this process stands in for it: alive) and the trainer's files in the run directory."""
    import os
    import time

    from orchestrator.backends.local.supervisor import NodeRecord, SupervisorState, write_state

    from orchestrator.registry import new_job_id

    job_id, run = new_job_id("tiny-gpt-elastic"), tmp_path / "run"
    (run / "local").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("step-10")
    (run / "job.json").write_text(json.dumps({"name": "tiny-gpt-elastic", "max_restarts": max_restarts}))
    (run / "status.json").write_text(json.dumps({"state": "failed", "step": 13, "total_steps": 40,
                                                 "error": "RuntimeError: Connection reset by peer",
                                                 "time": time.time() - 5}))
    nodes = {"0": NodeRecord(0, pid=1), "1": NodeRecord(1, pid=2),
             "2": NodeRecord(2, pid=3, state="NODE_FAIL" if lost_node else "RUNNING",
                             ended_at=time.time() if lost_node else None)}
    write_state(run, SupervisorState(supervisor_pid=os.getpid(), rdzv_port=29500, nodes=nodes))
    registry = Registry()
    registry.add(job_id, "tiny-gpt-elastic", "local", str(run), {"name": "tiny-gpt-elastic"})
    registry.set_native_id(job_id, f"pid:{os.getpid()}")
    return job_id, run


def test_a_local_elastic_job_that_lost_a_node_shows_its_recovery(tmp_path) -> None:
    job_id, _ = local_job_recovering(tmp_path, lost_node=True)
    out = orch("status", job_id)
    assert f"{job_id}  local  RESTARTING" in out
    assert "restarting after node-2 was lost; resuming from step 10" in out
    assert "trainer restarting: stopped at step 13/40, resuming from step 10" in out and "failed" not in out


def test_a_local_worker_failure_with_restarts_left_is_a_restart_and_without_a_failure(tmp_path) -> None:
    job_id, _ = local_job_recovering(tmp_path, lost_node=False)
    out = orch("status", job_id)
    assert "RESTARTING" in out and "restarting after a worker stopped at step 13; resuming from step 10" in out
    job_id, _ = local_job_recovering(tmp_path / "none-left", lost_node=False, max_restarts=0)
    out = orch("status", job_id)
    assert "RESTARTING" not in out and "trainer failed: step 13/40" in out


def test_check_reports_a_clusters_refusal_and_the_ds_configs_problems_together(tmp_path) -> None:
    job = write_job(tmp_path, {"name": "tiny-gpt", "nodes": 2, "kubernetes": {"image": "orch:latest"}},
                    {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 5}})
    out = orch("check", str(job), "--cluster", "kubernetes", code=2)
    assert "kubernetes.checkpoint_pvc" in out and "zero_optimization.stage: must be <= 3, got 5" in out


@pytest.mark.parametrize("state, restarts, shows", [
    (JobState.RUNNING, 0, "trainer restarting: stopped at step 13/40, resuming from step 10"),  # e.g. a pod restarting
    (JobState.RUNNING, 3, "trainer failed: step 13/40"),            # max_restarts used up: the job is ending
    (JobState.FAILED, 0, "trainer failed: step 13/40"),
])
def test_the_progress_line_of_any_cluster_tells_recovery_from_failure(tmp_path, state, restarts, shows) -> None:
    from orchestrator.live import progress_line

    _, run = local_job_recovering(tmp_path, lost_node=False, max_restarts=3)
    line = progress_line(run, with_metrics=False, job_state=state, restarts=restarts)
    assert line.splitlines()[0] == shows
