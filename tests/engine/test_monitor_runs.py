"""The monitoring sections in real runs: the bundled trainer (1-2 processes under torchrun, one
killed and restarted by torchrun's elastic agent) and a DeepSpeed script, beside DeepSpeed itself."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace as NS

import pytest

from engine.monitor.clients import client
from tests.dist_utils import free_port
from tests.trainer_runs import TINY_CONFIG, clean_env, records, run_trainer, write_config

pytestmark = pytest.mark.slow
needs_wandb = pytest.mark.skipif(not client("wandb").installed(), reason="wandb is not installed: pip install 'orch[wandb]'")
OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _kill_worker_after(run_dir: Path, agent: subprocess.Popen, step: int, timeout: float = 240) -> int:
    """SIGKILL the trainer worker (not torchrun) once it has logged ``step``; the step it had reached."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [r["step"] for r in records(run_dir, "train")] if (run_dir / "metrics.jsonl").exists() else []
        if done and max(done) >= step:
            workers = _children(agent.pid)
            assert workers, "torchrun has no worker to kill"
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            return max(done)
        if agent.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {agent.communicate()[1][-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not logged within {timeout}s")


@needs_wandb
def test_wandb_run_survives_a_killed_worker_with_the_same_id_and_no_step_twice(tmp_path: Path) -> None:
    """torchrun restarts a SIGKILLed worker; the restarted trainer resumes from its checkpoint and
    continues the same W&B run. W&B writes its offline file every flush interval (0.5 s here), so
    a killed attempt may lose its last steps: those replayed from the checkpoint are logged again,
    those already stored are not, and none appears twice."""
    config = write_config(tmp_path, wandb={"enabled": True, "project": "orch-tests", "group": "elastic"})
    run_dir, steps, batch = tmp_path / "run", 30, TINY_CONFIG["train_batch_size"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=1", "--max-restarts=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "engine.train",
           "--deepspeed_config", str(config), "--model", "tiny", "--steps", str(steps), "--log-every", "1",
           "--save-every", "5", "--run-dir", str(run_dir)]
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             env=clean_env(**OFFLINE, WANDB__TRANSACTION_LOG_FLUSH_INTERVAL="0.5"))
    try:
        _kill_worker_after(run_dir, agent, 12)
        out, err = agent.communicate(timeout=300)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    assert agent.returncode == 0, err[-3000:]
    from tests.monitor_files import wandb_runs

    attempts = wandb_runs(run_dir / "wandb")
    assert len(attempts) == 2, [a.path.name for a in attempts]
    first, second = attempts
    assert second.run_id == json.loads((run_dir / "monitor" / "wandb.json").read_text())["run_id"]
    assert first.run_id in ("", second.run_id)  # "" only if the kill came before W&B's first flush
    assert second.config["ds_config"]["wandb"]["project"] == "orch-tests"
    logged = first.steps + second.steps
    assert len(logged) == len(set(logged)), "a step was logged twice"
    resumed_at = [r["step"] for r in records(run_dir, "start")][-1]
    stored_before = max(first.steps, default=0)
    lost = set(range(stored_before + batch, resumed_at * batch + 1, batch))  # never stored, never replayed
    assert set(logged) == set(range(batch, steps * batch + 1, batch)) - lost
    rows = {r["_step"]: r for r in first.rows + second.rows}
    last = rows[steps * batch]
    assert {"Train/Samples/lr", "Train/Samples/train_loss", "Train/Samples/tokens_per_s"} <= set(last)
    assert last["Train/Samples/restart_count"] == 1


def test_all_monitors_in_one_trainer_run(tmp_path: Path) -> None:
    config = json.loads((Path(__file__).resolve().parents[2] / "examples/ds_configs/monitors_tiny_cpu.json").read_text())
    config["flops_profiler"]["output_file"] = str(tmp_path / "flops.txt")
    run_dir = tmp_path / "run"
    result = run_trainer("--deepspeed_config", str(write_config(tmp_path, config)), "--model", "tiny", "--steps", "6",
                         "--log-every", "2", "--run-dir", str(run_dir), ranks=2, **OFFLINE,
                         COMET_OFFLINE_DIRECTORY=str(tmp_path / "comet"))
    assert result.returncode == 0, result.stderr[-3000:]
    for section in ("wandb", "csv_monitor", "comet", "comms_logger", "flops_profiler"):
        assert f"config: {section}.enabled" not in result.stdout + result.stderr  # not reported as ignored
    csv_dir = run_dir / "csv_monitor" / "tiny"
    lr = (csv_dir / "Train_Samples_lr.csv").read_text().splitlines()
    assert lr[0] == "step,lr" and [int(r.split(",")[0]) for r in lr[1:]] == [8 * s for s in range(1, 7)]
    loss = (csv_dir / "Train_Samples_train_loss.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in loss[1:]] == [16, 32, 48]
    losses = [r["loss"] for r in records(run_dir, "train")]
    assert [float(r.split(",")[1]) for r in loss[1:]] == pytest.approx(losses)
    assert "Comm. Op" in result.stdout and "Communication ledger" in result.stdout
    assert "Profile summary at step 2" in (tmp_path / "flops.txt").read_text()
    if client("comet").installed():
        assert list((tmp_path / "comet").glob("*.zip"))


def test_a_missing_client_warns_once_and_the_job_succeeds(tmp_path: Path) -> None:
    blocker = tmp_path / "no-wandb"
    (blocker / "wandb").mkdir(parents=True)  # shadows an installed wandb: `import wandb` fails as if absent
    (blocker / "wandb" / "__init__.py").write_text("raise ImportError(\"No module named 'wandb'\")\n")
    config = write_config(tmp_path, wandb={"enabled": True})
    result = run_trainer("--deepspeed_config", str(config), "--model", "tiny", "--steps", "4", "--log-every", "1",
                         "--run-dir", str(tmp_path / "run"), PYTHONPATH=f"{blocker}:{os.environ.get('PYTHONPATH', '')}")
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in (result.stdout + result.stderr).splitlines() if "orch[wandb]" in line]
    assert len(warnings) == 1, warnings
    assert "wandb.enabled is set but the wandb package is not installed" in warnings[0]
    assert len(records(tmp_path / "run", "train")) == 4


# --- peer tier: csv_monitor beside DeepSpeed 0.19.8 ------------------------------------------------

def _deepspeed_missing() -> str:
    import importlib.util
    import shutil

    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed; DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8"
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler on PATH: DeepSpeed JIT-compiles its CPU ops on first use"
    return ""


def _csv_files(root: str) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(Path(root).iterdir())}


def _train_with_csv_monitor(out: str) -> dict[str, dict[str, str]]:
    """A DeepSpeed script on each library: csv_monitor on, its own train_loss event every step."""
    import deepspeed

    import engine
    from engine.models import build_model
    from tests.dist_utils import train_global_batches
    from tests.engine_zero_cases import global_batch

    deepspeed.init_distributed(dist_backend="gloo")
    found = {}
    for name, library in (("deepspeed", deepspeed), ("orch", engine)):
        config = {"train_batch_size": 8, "gradient_accumulation_steps": 2, "steps_per_print": 100,
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                  "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 3}},
                  "zero_optimization": {"stage": 2},
                  "csv_monitor": {"enabled": True, "output_path": f"{out}/{name}", "job_name": "peer"}}
        model = build_model("tiny", seed=0)
        eng, _, _, _ = library.initialize(model=model, model_parameters=model.parameters(), config=config)
        for loss in train_global_batches(eng, map(global_batch, range(4))):
            eng.monitor.write_events([("Train/Samples/train_loss", loss, eng.global_samples)])
        if eng.global_rank == 0:
            found[name] = _csv_files(f"{out}/{name}/peer")
        eng.monitor.close() if name == "orch" else None
    return found


@pytest.mark.peer
@pytest.mark.skipif(bool(_deepspeed_missing()), reason=_deepspeed_missing())
def test_csv_monitor_files_equal_deepspeeds(tmp_path: Path) -> None:
    from tests.dist_utils import run_distributed

    found = run_distributed(_train_with_csv_monitor, 2, str(tmp_path), init=False, timeout=540,
                            env={"DS_ACCELERATOR": "cpu"})[0]
    ours, theirs = found["orch"], found["deepspeed"]
    assert sorted(ours) == sorted(theirs) == ["Train_Samples_lr.csv", "Train_Samples_train_loss.csv"]
    for name in theirs:
        ours_rows = [row.split(",") for row in ours[name].splitlines()]
        their_rows = [row.split(",") for row in theirs[name].splitlines()]
        assert ours_rows[0] == their_rows[0]                                  # header: step,<name>
        assert [r[0] for r in ours_rows] == [r[0] for r in their_rows]        # the same steps (samples)
        for a, b in zip(ours_rows[1:], their_rows[1:]):                       # lr may differ in the last ulp
            assert float(a[1]) == pytest.approx(float(b[1]), rel=1e-5)
        assert ours[name].count("\r\n") == theirs[name].count("\r\n")        # DeepSpeed's line ends
    assert len(ours["Train_Samples_lr.csv"].splitlines()) == 5               # header + 4 steps


def _both_csv_monitors(out: str) -> dict[str, dict[str, str]]:
    """The same event stream through DeepSpeed 0.19.8's csvMonitor and orch's CsvMonitor."""
    import deepspeed
    from deepspeed.monitor.config import CSVConfig
    from deepspeed.monitor.csv_monitor import csvMonitor

    from engine.monitor.csv_monitor import CsvMonitor, csv_log_dir

    deepspeed.init_distributed(dist_backend="gloo")
    events = [[("Train/Samples/lr", 1e-3 * s, 8 * s), ("Train/Samples/train_loss", 5.0 / s, 8 * s),
               ("Train/Samples/elapsed_time_ms_forward", 12.5, 8 * s)] for s in range(1, 5)]
    theirs = csvMonitor(CSVConfig(enabled=True, output_path=f"{out}/deepspeed", job_name="peer"))
    ours = CsvMonitor(csv_log_dir(NS(output_path=f"{out}/orch", job_name="peer"), None), None)
    for batch in events:
        theirs.write_events(batch)
        ours.write_events(batch)
    ours.close()
    return {"deepspeed": _csv_files(f"{out}/deepspeed/peer"), "orch": _csv_files(f"{out}/orch/peer")}


@pytest.mark.peer
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed; "
                    "DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8")
def test_csv_files_are_byte_for_byte_deepspeeds_for_the_same_events(tmp_path: Path) -> None:
    from tests.dist_utils import run_distributed

    found = run_distributed(_both_csv_monitors, 1, str(tmp_path), init=False, env={"DS_ACCELERATOR": "cpu"})[0]
    assert found["orch"] == found["deepspeed"]
    assert sorted(found["orch"]) == ["Train_Samples_elapsed_time_ms_forward.csv", "Train_Samples_lr.csv",
                                     "Train_Samples_train_loss.csv"]
