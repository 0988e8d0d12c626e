"""A user's first session with `orch`: help, render, check, doctor, and clean errors."""
from __future__ import annotations

import subprocess

import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from tests.cli_process import run_orch
from tests.shared_env import REPO

runner = CliRunner()
EXAMPLE = str(REPO / "examples" / "tiny-gpt-zero2.yaml")


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("render", "submit", "status", "list", "logs", "cancel", "check", "doctor", "ckpt"):
        assert command in result.output


def test_orch_help_runs_as_a_real_process_without_importing_torch() -> None:
    result = run_orch("--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout
    installed = subprocess.run(["orch", "--help"], capture_output=True, text=True, timeout=60)
    assert installed.returncode == 0 and "render" in installed.stdout


def test_render_does_not_import_torch_or_kubernetes() -> None:
    result = run_orch("render", EXAMPLE, "--cluster", "kubernetes")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["kind"] == "PyTorchJob"


def test_render_with_set_overrides(tmp_path) -> None:
    out = tmp_path / "job.sbatch"
    result = runner.invoke(app, ["render", EXAMPLE, "--cluster", "slurm", "--set", "nodes=3",
                                 "--set", "slurm.partition=gpu", "-o", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "#SBATCH --nodes=3" in text and "#SBATCH --partition=gpu" in text


def test_render_local_plan_shows_one_torchrun_per_node() -> None:
    result = runner.invoke(app, ["render", EXAMPLE, "--cluster", "local"])
    assert result.exit_code == 0
    assert result.output.count("-m torch.distributed.run") == 2
    assert "--rdzv-backend=c10d" in result.output


def test_typo_in_spec_key_is_a_clean_error_naming_key_and_suggestion(tmp_path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("name: demo\nnodes: 2\nprocs_per_nod: 2\nslurm:\n  partiton: gpu\n")
    result = runner.invoke(app, ["render", str(spec), "--cluster", "slurm"])
    assert result.exit_code == 2
    assert "procs_per_nod: unknown key; did you mean `procs_per_node`?" in result.output
    assert "slurm.partiton: unknown key; did you mean `partition`?" in result.output
    assert "Traceback" not in result.output


def test_unknown_cluster_and_bad_set_are_clean_errors() -> None:
    result = runner.invoke(app, ["render", EXAMPLE, "--cluster", "slurn"])
    assert result.exit_code == 2 and "did you mean `slurm`" in result.output
    result = runner.invoke(app, ["render", EXAMPLE, "--set", "nodes"])
    assert result.exit_code == 2 and "expected KEY=VALUE" in result.output
    result = runner.invoke(app, ["render", "missing.yaml"])
    assert result.exit_code == 2 and "missing.yaml: file not found" in result.output


def test_invalid_yaml_names_file_and_line(tmp_path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("name: demo\nnodes: [2\n")
    result = runner.invoke(app, ["render", str(spec)])
    assert result.exit_code == 2 and f"{spec}:3" in result.output and "invalid YAML" in result.output


def test_check_prints_batch_and_memory_per_stage() -> None:
    result = runner.invoke(app, ["check", EXAMPLE, "--params", "1e9", "--gpu-memory-gb", "80"])
    assert result.exit_code == 0, result.output
    assert "train_batch_size 24 = micro 2 x accumulation 3 x 4 ranks" in result.output
    # fp32 Adam, N=4: stage 0 16 B/param = 14.9 GiB; stage 3 = 4 B/param = 3.7 GiB
    assert "14.9 GiB" in result.output and "3.7 GiB" in result.output


def test_check_rejects_a_ds_config_that_does_not_fit_the_world_size(tmp_path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("name: demo\nnodes: 3\nprocs_per_node: 1\n"
                    "ds_config: {train_batch_size: 8, train_micro_batch_size_per_gpu: 2}\n")
    result = runner.invoke(app, ["check", str(spec)])
    assert result.exit_code == 2, result.output
    assert "train_batch_size" in result.output and "Traceback" not in result.output


def test_check_reports_ds_config_typos_with_suggestion(tmp_path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("name: demo\nds_config: {train_batch_size: 8, zero_optimization: {stag: 2}}\n")
    result = runner.invoke(app, ["check", str(spec)])
    assert result.exit_code == 2
    assert "zero_optimization.stag" in result.output and "stage" in result.output


def test_doctor_reports_every_component() -> None:
    result = runner.invoke(app, ["doctor"])
    for component in ("python", "torch", "gloo", "triton kernels", "slurm", "kubernetes", "helm",
                      "monitor: wandb", "monitor: comet", "monitor: tensorboard"):
        assert component in result.output
    assert result.exit_code == 0, result.output


def test_doctor_says_which_monitoring_clients_are_installed() -> None:
    from engine.monitor.clients import CLIENTS
    from orchestrator.doctor import run_probes

    probes = {p.name: p for p in run_probes()}
    for c in CLIENTS:
        probe = probes[f"monitor: {c.section}"]
        assert probe.optional and probe.ok == c.installed()
        assert (c.version() in probe.detail) if probe.ok else (f"pip install {c.module}" in probe.detail)
