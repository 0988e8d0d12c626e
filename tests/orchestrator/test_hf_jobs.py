"""Hugging Face Trainer jobs, as a user of HF + DeepSpeed meets orch: the usual script
(``HfArgumentParser(TrainingArguments)``, ``deepspeed`` passed as ``{ds_config}``, a ds_config
full of "auto") passes ``orch check``, runs as a 2-node local job with real DeepSpeed ZeRO-2 on CPU
(gloo), reports progress through ``OrchCallback`` (``orch status --metrics``, ``orch plot``),
survives a rank exiting mid-run (torchrun restarts the workers, HF resumes from its latest
checkpoint with the same losses, ``orch status`` shows the restart), and runs the same under Slurm.
The Kubernetes render replaces the placeholder with the ConfigMap's path.

The script is tests/orchestrator/hf_train_script.py: a tiny GPT-2 from its config, no download.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator import jobs
from orchestrator.backends import get_backend
from orchestrator.cli import app
from orchestrator.registry import Registry
from orchestrator.spec import load_spec
from orchestrator.types import JobState
from tests.polling import wait_until
from tests.shared_env import REPO, SlurmLab

runner = CliRunner()
SCRIPT = REPO / "tests" / "orchestrator" / "hf_train_script.py"
STEPS, SAVE_EVERY = 6, 3

# What HF's DeepSpeed docs hand out: everything the TrainingArguments know is "auto". ``torch_adam``
# makes DeepSpeed step with torch's AdamW on CPU instead of JIT-building its C++ FusedAdam.
HF_DS_CONFIG = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto",
                                                "torch_adam": True}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                          "reduce_bucket_size": "auto", "allgather_bucket_size": 50_000_000},
    "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
}


def write_hf_job(directory: Path, *, name: str = "hf-tiny", extra_args: tuple[str, ...] = (), **spec_extra) -> Path:
    """A user's HF job directory: train_hf.py, ds_config.json, job.yaml."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(SCRIPT, directory / "train_hf.py")
    (directory / "ds_config.json").write_text(json.dumps(HF_DS_CONFIG, indent=1))
    spec = {
        "name": name, "nodes": 2, "procs_per_node": 1, "program": "train_hf.py",
        "args": ["--output_dir", "{checkpoint_dir}", "--deepspeed", "{ds_config}", "--use_cpu",
                 "--max_steps", str(STEPS), "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
                 "--logging_steps", "1", "--save_steps", str(SAVE_EVERY), "--report_to", "none",
                 "--dataloader_num_workers", "0", "--include_num_input_tokens_seen", "true", *extra_args],
        "ds_config": "ds_config.json", "max_restarts": 1,
        "env": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}, **spec_extra,
    }
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def logged_losses(checkpoint_dir: Path) -> dict[int, float]:
    """(step -> loss) the script's rank 0 logged; a step logged again after a resume keeps its last value."""
    out: dict[int, float] = {}
    for line in (checkpoint_dir / "losses.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["loss"]
    return out


def wait_finished(job_id: str, timeout: float) -> JobState:
    def done():
        record, _ = jobs.status(job_id)
        return record.state if record.state.finished else None
    return wait_until(done, timeout, f"job {job_id} to finish", poll=2.0)


def needs_hf_and_deepspeed() -> None:
    for module, how in (("transformers", "pip install 'orch[hf]'"), ("accelerate", "pip install 'orch[hf]'"),
                        ("deepspeed", "DS_BUILD_OPS=0 pip install --no-build-isolation 'deepspeed==0.19.8'")):
        try:
            __import__(module)
        except ImportError:
            pytest.skip(f"HF Trainer jobs need {module}: {how}")


# -- what needs no training: check and render ---------------------------------------------------

def test_orch_check_accepts_auto_for_the_script_and_lists_what_it_must_fill(tmp_path: Path) -> None:
    result = runner.invoke(app, ["check", str(write_hf_job(tmp_path))])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "must fill" in text and "train_micro_batch_size_per_gpu" in text and "optimizer.params.lr" in text


def test_a_user_program_gets_no_deepspeed_config_flag_and_the_placeholder_becomes_the_run_path(tmp_path) -> None:
    spec = load_spec(write_hf_job(tmp_path))
    rendered = get_backend("local").dryrun(spec)
    assert "--deepspeed_config" not in rendered.text
    ds_path = rendered.placement.ds_config_path
    assert f"--deepspeed {ds_path}" in rendered.text and f"ORCH_DS_CONFIG={ds_path}" in rendered.text
    assert f"--output_dir {rendered.placement.checkpoint_dir}" in rendered.text


def test_the_kubernetes_render_passes_the_configmap_path(tmp_path: Path) -> None:
    spec = load_spec(write_hf_job(tmp_path, nodes=1))
    manifest = yaml.safe_load(get_backend("kubernetes").dryrun(spec).text)
    container = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[command.index("--deepspeed") + 1] == "/etc/orch/ds_config.json"
    assert "--deepspeed_config" not in command and "{ds_config}" not in " ".join(command)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ORCH_DS_CONFIG"] == "/etc/orch/ds_config.json"
    assert command[command.index("--output_dir") + 1] == env["ORCH_CHECKPOINT_DIR"]


def test_the_ds_config_placeholder_without_a_ds_config_is_refused_naming_the_fix(tmp_path: Path) -> None:
    path = write_hf_job(tmp_path)
    spec = yaml.safe_load(path.read_text())
    del spec["ds_config"]
    path.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["render", str(path)])
    assert result.exit_code != 0 and "{ds_config}" in result.output and "ds_config:" in result.output


# -- real runs: HF Trainer + DeepSpeed ZeRO-2 on CPU, 2 nodes x 1 process -----------------------

@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory):
    """One HF job that runs through: (job id, run dir, checkpoint dir). Shared by the tests below."""
    needs_hf_and_deepspeed()
    directory = tmp_path_factory.mktemp("hf-clean")
    home = tmp_path_factory.mktemp("hf-clean-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ORCH_HOME", str(home))
        record = jobs.submit(load_spec(write_hf_job(directory)), "local")
        state = wait_finished(record.job_id, timeout=900)
        record = Registry().get(record.job_id)
        yield record, state, home
    if not state.finished:
        jobs.cancel(record.job_id)


@pytest.mark.slow
@pytest.mark.peer
@pytest.mark.hf
@pytest.mark.timeout(1200)
def test_the_hf_job_succeeds_and_orch_status_and_plot_show_its_progress(clean_run, tmp_path, monkeypatch) -> None:
    record, state, home = clean_run
    monkeypatch.setenv("ORCH_HOME", str(home))
    logs = "".join(jobs.logs(record.job_id))
    assert state == JobState.SUCCEEDED, f"{record.detail}\n{logs[-3000:]}"
    losses = logged_losses(Path(record.run_dir) / "checkpoints")
    assert sorted(losses) == list(range(1, STEPS + 1))

    status = runner.invoke(app, ["status", record.job_id, "--metrics"])
    assert status.exit_code == 0, status.output
    assert f"step {STEPS}/{STEPS}" in status.output and f"loss {losses[STEPS]:.4f}" in status.output
    assert "restarts 0" in status.output

    png = tmp_path / "hf.png"
    plotted = runner.invoke(app, ["plot", record.job_id, "--output", str(png)])
    assert plotted.exit_code == 0, plotted.output
    assert png.stat().st_size > 0 and f"{STEPS} log steps" in " ".join(plotted.output.split())


@pytest.mark.slow
@pytest.mark.peer
@pytest.mark.hf
@pytest.mark.timeout(1500)
def test_a_rank_exiting_mid_run_restarts_and_resumes_from_hf_s_checkpoint_with_the_same_losses(
        clean_run, tmp_path) -> None:
    clean_record, clean_state, _ = clean_run
    assert clean_state == JobState.SUCCEEDED
    record = jobs.submit(load_spec(write_hf_job(tmp_path, name="hf-restart",
                                                extra_args=("--fail_rank", "1", "--fail_step", "4"))), "local")
    state = wait_finished(record.job_id, timeout=900)
    record = Registry().get(record.job_id)
    logs = "".join(jobs.logs(record.job_id))
    assert state == JobState.SUCCEEDED, f"{record.detail}\n{logs[-3000:]}"
    checkpoints = Path(record.run_dir) / "checkpoints"
    assert (checkpoints / "failed-once").read_text() == "4"
    resumed_at = [json.loads(line) for line in (Path(record.run_dir) / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["kind"] == "start"]
    assert [r["step"] for r in resumed_at] == [0, SAVE_EVERY]  # HF's checkpoint-3
    assert resumed_at[1]["restart_count"] == 1
    clean = logged_losses(Path(clean_record.run_dir) / "checkpoints")
    assert logged_losses(checkpoints) == pytest.approx(clean, rel=1e-5)

    status = runner.invoke(app, ["status", record.job_id])
    assert "restarts 1" in status.output, status.output
    listing = runner.invoke(app, ["list"])
    assert any(record.job_id in line and " 1 " in f" {line} " for line in listing.output.splitlines())


# -- the same script under Slurm --------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.peer
@pytest.mark.hf
@pytest.mark.timeout(1200)
def test_the_hf_job_runs_the_same_under_slurm(slurm_cluster: SlurmLab, tmp_path: Path) -> None:
    needs_hf_and_deepspeed()
    record = jobs.submit(load_spec(write_hf_job(tmp_path, name="hf-slurm", python=sys.executable)), "slurm")
    state = wait_finished(record.job_id, timeout=900)
    record = Registry().get(record.job_id)
    assert state == JobState.SUCCEEDED, f"{record.detail}\n{''.join(jobs.logs(record.job_id))[-3000:]}"
    status = runner.invoke(app, ["status", record.job_id, "--metrics"])
    assert f"step {STEPS}/{STEPS}" in status.output, status.output
    assert sorted(logged_losses(Path(record.run_dir) / "checkpoints")) == list(range(1, STEPS + 1))
