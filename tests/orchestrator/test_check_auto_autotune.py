"""``orch check`` with configs from the wild: "auto" for a user's program, --lenient for keys
DeepSpeed ignores, and --autotune answering the autotuning section without trials; ``orch
submit`` of a job whose ds_config enables autotuning runs with that answer and says so."""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from tests.cli_process import run_orch
from tests.engine.test_config_auto_lenient import HF_CONFIG

runner = CliRunner()


def job(tmp_path, ds: dict, *, program: str = "train.py", args: list | None = None, procs: int = 2) -> str:
    (tmp_path / "ds_config.json").write_text(json.dumps(ds))
    spec = {"name": "wild", "nodes": 1, "procs_per_node": procs, "program": program, "args": args or [],
            "ds_config": "ds_config.json"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_an_hf_config_full_of_auto_passes_for_a_user_program_and_lists_what_it_must_fill(tmp_path):
    result = run_orch("check", job(tmp_path, HF_CONFIG))       # a real process: torch is never imported
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert '"auto": the program (train.py) must fill' in result.stdout
    for key in ("optimizer.params.lr", "train_micro_batch_size_per_gpu", "gradient_clipping", "bf16.enabled"):
        assert key in result.stdout


def test_the_rest_of_an_auto_config_is_still_checked(tmp_path):
    bad = {**HF_CONFIG, "train_batch_size": 6, "gradient_accumulation_steps": 2}
    result = runner.invoke(app, ["check", job(tmp_path, bad, procs=2)])
    assert result.exit_code == 2
    assert "train_batch_size 6 is not divisible by gradient_accumulation_steps 2 × world size 2" in result.output


def test_the_bundled_trainer_fills_auto_from_its_args_so_check_does_too(tmp_path):
    path = job(tmp_path, HF_CONFIG, program="engine.train", args=["--model", "tiny", "--micro-batch", "3"])
    result = runner.invoke(app, ["check", path])
    assert result.exit_code == 0, result.output
    assert "train_batch_size 6 = micro 3 x accumulation 1 x 2 ranks" in result.output
    without = runner.invoke(app, ["check", job(tmp_path, HF_CONFIG, program="engine.train", args=["--model", "tiny"])])
    assert without.exit_code == 2 and "train_micro_batch_size_per_gpu" in without.output


def test_unknown_keys_deepspeed_ignores_pass_with_lenient_and_typos_do_not(tmp_path):
    ds = {"train_batch_size": 4, "cuda_visible_devices": "0,1", "zero_optimization": {"stage": 1}}
    strict = runner.invoke(app, ["check", job(tmp_path, ds)])
    assert strict.exit_code == 2 and "cuda_visible_devices: unknown key" in strict.output
    assert "--lenient" in strict.output
    lenient = runner.invoke(app, ["check", job(tmp_path, ds), "--lenient"])
    assert lenient.exit_code == 0, lenient.output
    assert "lenient: cuda_visible_devices: unknown key ignored" in lenient.output
    typo = runner.invoke(app, ["check", job(tmp_path, {**ds, "zero_optimization": {"stgae": 1}}), "--lenient"])
    assert typo.exit_code == 2 and "did you mean 'stage'" in typo.output


AUTOTUNE = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}, "zero_optimization": {"stage": 0},
            "autotuning": {"enabled": True, "metric": "throughput", "max_train_batch_size": 512,
                           "arg_mappings": {"train_micro_batch_size_per_gpu": "--micro-batch"}}}


def test_autotune_answers_stage_offload_and_micro_batch_from_the_memory_estimate(tmp_path):
    path = job(tmp_path, AUTOTUNE, program="engine.train", args=["--model", "1b"], procs=8)
    roomy = runner.invoke(app, ["check", path, "--autotune", "--gpu-memory-gb", "80"])
    assert roomy.exit_code == 0, roomy.output
    # gradients are summed in fp32 (data_types.grad_accum_dtype's default): a full fp32 gradient
    # buffer at ZeRO-0/1, a partition at ZeRO-2, so ZeRO-2 leaves the most room for the micro-batch
    assert "autotune: ZeRO-2, no offload, micro-batch 7" in roomy.output and "no trials" in roomy.output
    tight = runner.invoke(app, ["check", path, "--autotune", "--gpu-memory-gb", "16"])
    assert tight.exit_code == 0, tight.output
    line = next(x for x in tight.output.splitlines() if x.startswith("autotune:"))
    # 1B, bf16 Adam with fp32 gradient sums; ~8.8 GiB of activations per sample
    assert "ZeRO-2, no offload, micro-batch 1" in line, line
    hopeless = runner.invoke(app, ["check", path, "--autotune", "--gpu-memory-gb", "0.5"])
    assert hopeless.exit_code == 2 and "nothing fits" in hopeless.output


def test_autotune_for_a_gpu_job_needs_the_device_memory(tmp_path, monkeypatch):
    monkeypatch.delenv("ORCH_GPU_MEMORY_GB", raising=False)
    spec = yaml.safe_load(open(job(tmp_path, AUTOTUNE, program="engine.train", args=["--model", "1b"])))
    spec["gpus_per_node"] = 2
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["check", str(tmp_path / "job.yaml"), "--autotune"])
    assert result.exit_code == 2 and "--gpu-memory-gb" in result.output


@pytest.mark.slow
def test_submit_with_autotuning_enabled_runs_with_the_answer_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    ds = {**AUTOTUNE, "bf16": {"enabled": False}, "autotuning": {**AUTOTUNE["autotuning"], "max_train_batch_size": 8}}
    path = job(tmp_path, ds, program="engine.train", args=["--model", "tiny", "--steps", "2"])
    result = run_orch("submit", path, "--wait", must_not_import=("kubernetes",))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "autotuning: using ZeRO-0, no offload, micro-batch 4" in result.stderr
    run_dir = next((tmp_path / "home" / "runs").iterdir())
    plan = (run_dir / "plan.sh").read_text()
    assert "--micro-batch 4" in plan                      # through arg_mappings, as DeepSpeed's autotuner passes it
    logs = "".join(p.read_text() for p in (run_dir / "logs").rglob("*") if p.is_file())
    assert "global batch 8" in logs
