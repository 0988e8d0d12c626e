"""``orch check JOB --simulate``: a user asks whether a job fits and how much it moves before submitting it.

The command runs the engine for one step as rank 0 of the job's world under torch's fake process
group (engine/trainer/scale_job.py in a child process) and prints per-GPU memory, collectives per step
and a verdict. What it prints must be what the scale simulator measures for the same model,
ds_config and world size.
"""
from __future__ import annotations

import re
import time

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app

runner = CliRunner()

ZERO3 = ("{train_micro_batch_size_per_gpu: 1, gradient_accumulation_steps: 1, bf16: {enabled: true}, "
         "optimizer: {type: AdamW, params: {lr: 0.0001}}, gradient_clipping: 1.0, "
         "zero_optimization: {stage: 3, stage3_prefetch_bucket_size: 4194304, stage3_max_reuse_distance: 0, "
         "stage3_param_persistence_threshold: 10240}}")


def _spec(tmp_path, *, nodes: int, procs: int, args: str, program: str = "engine.train", ds: str = ZERO3) -> str:
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: sim\nnodes: {nodes}\nprocs_per_node: {procs}\ngpus_per_node: {procs}\n"
                    f"program: {program}\nargs: {args}\nds_config: {ds}\n")
    return str(spec)


def _bytes(output: str, label: str) -> int:
    match = re.search(rf"{re.escape(label)}\s.*?\(([\d,]+) bytes\)", output)
    assert match, f"no {label!r} row in:\n{output}"
    return int(match.group(1).replace(",", ""))


def test_a_350m_job_on_64_gpus_prints_what_the_simulator_measures(tmp_path) -> None:
    spec = _spec(tmp_path, nodes=8, procs=8, args='["--model", "350m", "--seq-len", "256"]')
    result = runner.invoke(app, ["check", spec, "--simulate", "--gpu-memory-gb", "80"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "rank 0 of 64 ranks, ZeRO stage 3, bf16" in out and "seq_len 256" in out
    assert "verdict: fits" in out

    import yaml

    from engine.models import build_model, get_preset
    from engine.scale_sim import simulate

    preset = get_preset("350m", seq_len=256)
    report = simulate(lambda: build_model("350m", seq_len=256), yaml.safe_load(ZERO3), world=64,
                      vocab_size=preset.vocab_size, seq_len=32, model_name="350m")
    assert _bytes(out, "model states") == report.model_state_bytes
    assert _bytes(out, "peak gathered parameters + staging") == report.peak_gathered_bytes
    assert _bytes(out, "reduce buckets") == report.buffer_bytes
    assert f"{report.calls} calls, " in out and f"({report.bytes_sent:,} bytes;" in out
    assert abs(report.bytes_sent / report.zero_volume - 1) < 0.05        # stage 3 moves 3Ψ·(N−1)/N
    activations = _bytes(out, "activations (one micro-batch)")
    assert 24 * 256 * 1024 * 2 < activations < 24 * 256 * 1024 * 60      # 24 layers, 2-60 bytes/token/width
    total = _bytes(out, "total")
    assert total == report.model_state_bytes + report.peak_gathered_bytes + report.buffer_bytes + activations


@pytest.mark.slow
def test_a_7b_job_on_512_gpus_is_answered_within_minutes(tmp_path) -> None:
    spec = _spec(tmp_path, nodes=64, procs=8, args='["--model", "7b"]')
    started = time.perf_counter()
    result = runner.invoke(app, ["check", spec, "--simulate"])
    assert result.exit_code == 0, result.output
    assert "rank 0 of 512 ranks" in result.output and "6,6" in result.output   # ~6.6B parameters
    assert time.perf_counter() - started < 600, "the 7B simulation took too long"
    states = _bytes(result.output, "model states")
    psi = int(re.search(r"\(([\d,]+) parameters\)", result.output).group(1).replace(",", ""))
    assert states < 1.1 * 18 * psi / 512 + 2e8       # 16-18 bytes/param over 512 ranks + persistent params
    assert "per step at 25 GB/s" in result.output and "of 80 GB per GPU" in result.output


def test_a_job_running_its_own_program_needs_a_preset(tmp_path) -> None:
    spec = _spec(tmp_path, nodes=1, procs=2, args="[]", program="train.py")
    result = runner.invoke(app, ["check", spec, "--simulate"])
    assert result.exit_code == 2, result.output
    assert "--preset" in result.output and "Traceback" not in result.output


def test_a_bad_preset_or_memory_size_is_a_clear_error(tmp_path) -> None:
    spec = _spec(tmp_path, nodes=1, procs=2, args='["--model", "tiny"]')
    result = runner.invoke(app, ["check", spec, "--simulate", "--preset", "13x"])
    assert result.exit_code == 2 and "unknown model '13x'" in result.output and "7b" in result.output, result.output
    result = runner.invoke(app, ["check", spec, "--simulate", "--gpu-memory-gb", "0"])
    assert result.exit_code == 2 and "--gpu-memory-gb must be > 0" in result.output, result.output
    assert "Traceback" not in result.output


def test_a_job_that_cannot_fit_says_out_of_memory(tmp_path) -> None:
    ds = ("{train_micro_batch_size_per_gpu: 4, gradient_accumulation_steps: 1, bf16: {enabled: true}, "
          "optimizer: {type: AdamW, params: {lr: 0.0001}}, zero_optimization: {stage: 2}}")
    spec = _spec(tmp_path, nodes=1, procs=2, args='["--model", "gpt2-124m"]', ds=ds)
    result = runner.invoke(app, ["check", spec, "--simulate", "--gpu-memory-gb", "1"])
    assert result.exit_code == 0, result.output
    assert "verdict: OUT OF MEMORY" in result.output and "ZeRO stage 2" in result.output
