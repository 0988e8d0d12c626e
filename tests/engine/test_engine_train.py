"""`python -m engine.train` as a job runs it: one process, or several under torchrun (gloo, CPU)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from engine.trainer.metrics import TRAIN_FIELDS
from tests import trainer_runs
from tests.trainer_runs import clean_env, run_trainer

STEPS, LOG_EVERY = 40, 10

DS_CONFIG = {
    "train_batch_size": 8,
    "train_micro_batch_size_per_gpu": 4,
    "steps_per_print": LOG_EVERY,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.0}},
    "zero_optimization": {"stage": 1},
}


def _engine_ready() -> str | None:
    """Why the engine core cannot run the trainer yet, or None when it can."""
    try:
        import engine

        engine.initialize  # noqa: B018 (resolves the lazy name)
        engine.init_distributed  # noqa: B018
    except (AttributeError, ImportError) as exc:
        return f"engine.initialize is not available yet ({exc})"
    return None


needs_engine = pytest.mark.skipif(_engine_ready() is not None, reason=str(_engine_ready()))


def _engine_can_checkpoint() -> bool:
    if _engine_ready() is not None:
        return False
    from engine.engine import Engine  # the class initialize returns

    return hasattr(Engine, "save_checkpoint") and hasattr(Engine, "load_checkpoint")


needs_checkpoints = pytest.mark.skipif(
    not _engine_can_checkpoint(), reason="Engine.save_checkpoint/load_checkpoint not implemented yet")


def write_config(directory: Path, config: dict | None = None) -> Path:
    return trainer_runs.write_config(directory, config or DS_CONFIG)


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    return trainer_runs.records(run_dir, kind)


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    """The reference: 40 steps of the tiny GPT in one process (global batch 8 = 4 x 2 accumulation)."""
    if _engine_ready() is not None:
        pytest.skip(_engine_ready())
    work = tmp_path_factory.mktemp("single")
    result = run_trainer("--deepspeed_config", str(write_config(work)), "--model", "tiny",
                         "--steps", str(STEPS), "--run-dir", str(work / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run"


@needs_engine
def test_tiny_gpt_trains_and_its_loss_falls(single_run):
    curve = losses(read_metrics(single_run))
    assert sorted(curve) == [10, 20, 30, 40]
    assert curve[10] < math.log(512)
    assert curve[40] < curve[10] - 1.0, curve  # the synthetic successor rule is being learned


@needs_engine
def test_metrics_and_status_files_have_the_documented_fields(single_run):
    records = read_metrics(single_run)
    for r in records:
        assert set(TRAIN_FIELDS) <= set(r), set(TRAIN_FIELDS) - set(r)
        assert r["world_size"] == 1 and r["restart_count"] == 0
        assert r["samples"] == r["step"] * 8
        assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0 and r["mem"] > 0
        assert r["lr"] == pytest.approx(3e-3)
        assert r["grad_norm"] is None or r["grad_norm"] > 0
        assert r["loss_scale"] is None  # fp32: no loss scaling
    status = json.loads((single_run / "status.json").read_text())
    assert status["state"] == "finished"
    assert status["step"] == status["total_steps"] == STEPS


@needs_engine
@pytest.mark.slow
def test_two_ranks_under_torchrun_follow_the_single_process_curve(single_run, tmp_path):
    # Same global batch (8 = 4 x 2 ranks, no accumulation) and the same samples per step, so the
    # loss curve must match the single-process one.
    result = run_trainer("--deepspeed-config", str(write_config(tmp_path)), "--steps", str(STEPS),
                         "--run_dir", str(tmp_path / "run"), ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path / "run")
    assert {r["world_size"] for r in records} == {2}
    # the communication ledger's per-step figures: stage 1 reduces and gathers every step
    assert all(r["comm_bytes_per_step"] > 0 and r["comm_calls_per_step"] >= 2 for r in records), records
    two, one = losses(records), losses(read_metrics(single_run))
    assert sorted(two) == sorted(one)
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), (step, two, one)
    assert result.stdout.count("loss") >= 4  # console lines come from rank 0 only, once per log step
    assert result.stdout.count("step     10/40") == 1


@needs_engine
def test_trains_from_a_token_file_with_eval_and_orch_environment(tmp_path):
    from engine.trainer.data import SyntheticTokens

    tokens = SyntheticTokens(512, 64, seed=9).samples(range(64)).astype("uint16")
    tokens.tofile(tmp_path / "train.bin")
    run_dir = tmp_path / "orch-run"
    result = run_trainer("--deepspeed_config", str(write_config(tmp_path)), "--steps", "30",
                         "--data", str(tmp_path / "train.bin"), "--eval-every", "15", "--log-every", "15",
                         ORCH_RUN_DIR=str(run_dir), ORCH_RESTART_COUNT="2")
    assert result.returncode == 0, result.stderr[-3000:]
    train, evals = read_metrics(run_dir), read_metrics(run_dir, "eval")
    assert [r["step"] for r in train] == [15, 30]
    assert train[1]["loss"] < train[0]["loss"]
    assert {r["restart_count"] for r in train} == {2}
    assert [r["step"] for r in evals] == [15, 30]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]


@needs_engine
def test_a_deepspeed_config_without_optimizer_trains_with_the_default_adamw(tmp_path):
    # "Memory-Efficient Fine-Tuning" from the DeepSpeed guide users start from: fp16, ZeRO-2 with
    # optimizer offload, the top-level gradient_checkpointing alias, and no optimizer section.
    config = {"train_batch_size": 16, "fp16": {"enabled": True},
              "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
              "gradient_checkpointing": True}
    result = run_trainer("--deepspeed_config", str(write_config(tmp_path, config)), "--steps", "4",
                         "--log-every", "2", "--lr", "1e-3", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path / "run")
    assert [r["lr"] for r in records] == [pytest.approx(1e-3)] * 2
    assert all(r["loss_scale"] >= 1 for r in records)  # fp16 reports its dynamic loss scale
    assert records[1]["loss"] < records[0]["loss"]
    assert "gradient_checkpointing" in result.stdout  # the engine says how it read the alias


def test_flag_spellings_and_orch_environment_defaults(tmp_path, monkeypatch):
    from engine.run_contract import restart_count
    from engine.trainer.args import parse_args

    config = str(write_config(tmp_path))
    for flag in ("--deepspeed_config", "--deepspeed-config", "--config", "--engine_config", "--engine-config"):
        assert parse_args([flag, config]).deepspeed_config == config
    args = parse_args(["--config", config, "--seq_len", "32", "--save-every", "5", "--data_dtype", "uint32"])
    assert (args.seq_len, args.save_every, args.data_dtype, args.model, args.steps) == (32, 5, "uint32", "tiny", 100)
    assert args.run_dir is None and args.save_dir is None and args.save_keep == 3

    monkeypatch.setenv("ORCH_RUN_DIR", "/runs/job-1")
    monkeypatch.setenv("ORCH_CHECKPOINT_DIR", "/ckpt/job-1")
    monkeypatch.setenv("ORCH_CHECKPOINT_EVERY", "50")
    monkeypatch.setenv("ORCH_CHECKPOINT_KEEP", "2")
    args = parse_args(["--config", config, "--deepspeed", "--local_rank=0"])  # DeepSpeed launcher habits
    assert (args.run_dir, args.save_dir, args.save_every, args.save_keep) == ("/runs/job-1", "/ckpt/job-1", 50, 2)
    assert parse_args(["--config", config, "--save-every", "0"]).save_every == 0  # the flag wins

    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert restart_count() == 3 + 1  # Slurm requeues plus torchrun worker restarts
    monkeypatch.setenv("ORCH_RESTART_COUNT", "5")
    assert restart_count() == 5 + 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--deepspeed_config PATH is required"),
        (["--deepspeed_config", "nope.json"], "ds_config file 'nope.json' does not exist"),
        (["--model", "gigantic"], "unknown model 'gigantic'; choose one of: tiny"),
        (["--data", "missing.bin"], "data file 'missing.bin' does not exist"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--stpes", "5"], "unrecognized arguments: --stpes"),
    ],
)
def test_user_errors_exit_2_with_one_clear_line(tmp_path, args, message):
    if args and args[0] != "--deepspeed_config":
        args = ["--deepspeed_config", str(write_config(tmp_path)), *args]
    result = subprocess.run([sys.executable, "-m", "engine.train", *args], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path, env=clean_env())
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("engine.train: error:"), result.stderr
    assert message in lines[0]


@needs_engine
def test_a_misspelled_ds_config_key_exits_2_naming_it(tmp_path):
    config = {**DS_CONFIG, "gradient_acumulation_steps": 1}
    result = run_trainer("--deepspeed_config", str(write_config(tmp_path, config)), "--steps", "2",
                         "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "gradient_acumulation_steps" in result.stderr
    assert "gradient_accumulation_steps" in result.stderr  # the suggestion


@needs_checkpoints
@pytest.mark.slow
def test_resume_from_latest_continues_the_same_curve_on_more_ranks(single_run, tmp_path):
    # Part 1: one process, 20 steps, checkpoints every 10. Part 2: the job restarts with 2 ranks
    # and 40 steps; it must resume at step 20 and reproduce the uninterrupted curve.
    config = str(write_config(tmp_path))
    common = ["--deepspeed_config", config, "--run-dir", str(tmp_path / "run"), "--save-every", "10",
              "--save-keep", "1"]
    first = run_trainer(*common, "--steps", "20")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()
    second = run_trainer(*common, "--steps", str(STEPS), ranks=2, ORCH_RESTART_COUNT="1")
    assert second.returncode == 0, second.stderr[-3000:]
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    assert [r["world_size"] for r in records] == [1, 1, 2, 2]
    resumed, reference = losses(records), losses(read_metrics(single_run))
    for step in (30, 40):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-4), (resumed, reference)
    step_dirs = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert step_dirs == ["step-40"]  # --save-keep 1


@needs_checkpoints
def test_a_launcher_checkpoint_request_is_answered(tmp_path):
    # The Slurm template asks for a checkpoint before the time limit through these files; the
    # trainer answers at its next log step (the one step in a log window that reads back from the
    # device and runs a collective of its own).
    control = tmp_path / "run" / "control"
    control.mkdir(parents=True)
    (control / "checkpoint-request").write_text("0\n")
    result = run_trainer("--deepspeed_config", str(write_config(tmp_path)), "--steps", "5", "--log-every", "2",
                         "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (control / "checkpoint-done").read_text().strip() == "2"
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()
