"""What a run tells its user: metrics.jsonl records, console lines, `orch status --metrics`, TensorBoard.

Real runs of the bundled trainer: two ranks under torchrun with ``wall_clock_breakdown`` on, and
one process with the ds_config's ``tensorboard`` section.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

from engine.trainer.metrics import START_FIELDS, TRAIN_FIELDS
from engine.models.presets import get_preset
from engine.trainer.step_timer import BREAKDOWN_PHASES
from orchestrator.live import progress_line
from tests.trainer_runs import records, run_trainer, write_config

STEPS = 6


@pytest.fixture(scope="module")
def breakdown_run(tmp_path_factory):
    """2 ranks, 6 steps, a record every 2 steps, wall-clock breakdown on, a watchdog that must stay quiet."""
    work = tmp_path_factory.mktemp("breakdown")
    config = write_config(work, wall_clock_breakdown=True, gradient_accumulation_steps=2)
    result = run_trainer("--deepspeed_config", str(config), "--steps", str(STEPS), "--log-every", "2",
                         "--save-every", "3", "--run-dir", str(work / "run"), "--watchdog-timeout", "60",
                         ranks=2, ORCH_CACHE_DIR=str(work / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run", result


@pytest.mark.slow
def test_every_record_carries_throughput_mfu_and_the_breakdown(breakdown_run):
    run_dir, _ = breakdown_run
    (start,) = records(run_dir, "start")
    assert set(START_FIELDS) <= set(start)
    assert start["step"] == 0 and start["world_size"] == 2 and start["wall_clock_breakdown"] is True
    assert start["flops_per_token"] == get_preset("tiny").flops_per_token()
    assert start["peak_tflops"] > 0 and "matmul probe" in start["peak_source"]  # CPU: measured

    train = records(run_dir, "train")
    assert [r["step"] for r in train] == [2, 4, 6]
    for r in train:
        assert set(TRAIN_FIELDS) <= set(r), set(TRAIN_FIELDS) - set(r)
        # TFLOP/s = FLOPs per token x tokens/s; MFU = that over 2 ranks' peak.
        assert r["tflops"] == pytest.approx(start["flops_per_token"] * r["tokens_per_s"] / 1e12, rel=1e-9)
        assert r["mfu"] == pytest.approx(r["tflops"] / (2 * start["peak_tflops"]), rel=1e-9)
        assert 0 < r["mfu"] < 1
        phases = r["breakdown_ms"]
        assert list(phases) == list(BREAKDOWN_PHASES)
        assert phases["reduce"] is None  # inside backward: not measured separately
        assert all(phases[p] > 0 for p in ("data", "forward", "backward", "optimizer"))
        # The timed phases of a step fit inside its wall time (checkpoints are not step time).
        in_step = sum(phases[p] for p in ("data", "forward", "backward", "optimizer"))
        assert in_step <= r["step_time_s"] * 1000 * 1.05
        assert r["mem_kind"] == "peak_rss" and r["mem"] > 50 * 2**20
    # A checkpoint at step 3 falls in the window of the record at step 4, and only there; the one at
    # step 6 comes after step 6's record (written before the save: a kill during it loses no record).
    assert [r["breakdown_ms"]["checkpoint"] > 0 for r in train] == [False, True, False]
    assert not (run_dir / "hang").exists()  # a healthy run never trips the watchdog


@pytest.mark.slow
def test_console_and_orch_status_show_mfu_and_the_breakdown(breakdown_run):
    run_dir, result = breakdown_run
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 3  # rank 0 only
    assert all("TFLOP/s (MFU " in line for line in lines)
    assert result.stdout.count("time (ms/step) | data:") == 3
    assert "MFU against" in result.stdout
    line = progress_line(run_dir, with_metrics=True)
    assert line.startswith("trainer finished: step 6/6")
    assert "TFLOP/s" in line and "MFU " in line and "ms/step" in line and "backward" in line
    assert "MFU" not in progress_line(run_dir, with_metrics=False)


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("tb")
    config = write_config(work, tensorboard={"enabled": True, "output_path": str(work / "tb"), "job_name": "tiny"})
    result = run_trainer("--deepspeed_config", str(config), "--steps", "4", "--log-every", "2",
                         "--run-dir", str(work / "run"), "--eval-every", "4", "--eval-iters", "1",
                         ORCH_PEAK_TFLOPS="0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    return work, result


def test_without_tensorboard_installed_the_run_says_so_and_keeps_the_jsonl(tmp_path):
    """The same run where ``import tensorboard`` fails, as on a machine without the package: a stand-in
    ``tensorboard`` package that raises ImportError comes first on PYTHONPATH, installed or not."""
    shadow = tmp_path / "no-tensorboard" / "tensorboard"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("No module named \'tensorboard\'")\n')
    work = tmp_path / "tb"
    work.mkdir()
    config = write_config(work, tensorboard={"enabled": True, "output_path": str(work / "tb"), "job_name": "tiny"})
    path = os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")]))
    result = run_trainer("--deepspeed_config", str(config), "--steps", "4", "--log-every", "2",
                         "--run-dir", str(work / "run"), PYTHONPATH=path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tensorboard.enabled is set but TensorBoard cannot be written" in result.stdout
    assert "pip install tensorboard" in result.stdout
    assert [r["step"] for r in records(work / "run", "train")] == [2, 4]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="the tensorboard package is not installed (pip install tensorboard)")
def test_tensorboard_event_files_hold_the_same_numbers_as_the_jsonl(tensorboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work, result = tensorboard_run
    log_dir = work / "tb" / "tiny"
    assert f"TensorBoard event files in {log_dir}" in result.stdout
    events = EventAccumulator(str(log_dir))
    events.Reload()
    train = records(work / "run", "train")
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in train]
    mfu = [e.value for e in events.Scalars("train/mfu")]
    assert mfu == [pytest.approx(r["mfu"], rel=1e-6) for r in train]
    assert [e.step for e in events.Scalars("eval/eval_loss")] == [4]


def test_the_peak_override_is_what_mfu_is_measured_against(tensorboard_run):
    work, result = tensorboard_run
    (start,) = records(work / "run", "start")
    assert start["peak_tflops"] == 0.5 and start["peak_source"] == "ORCH_PEAK_TFLOPS=0.5"
    for r in records(work / "run", "train"):
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.5, rel=1e-9)
        assert r["breakdown_ms"] is None  # wall_clock_breakdown is off by default
    status = json.loads((work / "run" / "status.json").read_text())
    assert status["state"] == "finished"
