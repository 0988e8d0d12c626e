"""``orch check JOB --simulate``: run the engine's scale simulation at the job's own world size.

Why: the memory estimate of ``orch check`` is a formula; the simulation runs the engine itself,
as rank 0 of the job's ``nodes × procs_per_node`` ranks under torch's fake process group with
the NCCL plan, on the job's model and ds_config, for one step (engine/trainer/scale_job.py), and reads
what that rank would hold and move: "will this OOM or crawl on 512 GPUs?" answered before
anything is submitted. It runs in a child process (``python -m engine.trainer.scale_job``): torch never
loads into the CLI, and a 7B model's partitions are freed with the child.

The model comes from the bundled trainer's ``--model`` preset (its ``--seq-len``, micro-batch
and precision flags and the ds_config's "auto" values are read the way the trainer reads them).
A job running its own program has no preset the simulation can build: ``--preset`` names the
bundled preset closest to that model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from .errors import UserError
from .spec import BUNDLED_TRAINER, JobSpec

__all__ = ["DEFAULT_GPU_MEMORY_GB", "describe_simulation", "simulate_spec", "simulation_argv"]

DEFAULT_GPU_MEMORY_GB = 80.0
SIMULATION_TIMEOUT_S = 900
_CONFIG_FLAGS = ("--deepspeed_config", "--deepspeed-config", "--config", "--engine_config", "--engine-config")


def _trainer_args(spec: JobSpec, preset: Optional[str]) -> list[str]:
    """The arguments the bundled trainer would get (its ds_config flag added by the caller)."""
    if spec.program != BUNDLED_TRAINER:
        if not preset:
            raise UserError(f"--simulate needs one of the bundled trainer's model presets; program {spec.program!r} "
                            "is the job's own", hint="pass --preset NAME (e.g. --preset 7b) naming the preset "
                            "closest to your model; `python -m engine.train --help` lists them")
        return ["--model", preset]
    args, skip = [], False
    for arg in spec.args:
        if skip:
            skip = False
            continue
        if arg in _CONFIG_FLAGS:
            skip = True
            continue
        if arg == "--deepspeed" or arg.split("=", 1)[0] in _CONFIG_FLAGS:
            continue
        args.append(arg)
    return args


def simulation_argv(spec: JobSpec, config_path: Path, *, preset: Optional[str] = None,
                    gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB) -> list[str]:
    """The child's command line: ``python -m engine.trainer.scale_job --world N ... -- <trainer args>``."""
    argv = [sys.executable, "-m", "engine.trainer.scale_job", "--world", str(spec.world_size),
            "--gpu-memory-gb", f"{gpu_memory_gb:g}"]
    if preset:
        argv += ["--preset", preset]
    return argv + ["--", *_trainer_args(spec, preset), "--deepspeed_config", str(config_path)]


def simulate_spec(spec: JobSpec, *, preset: Optional[str] = None, gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB,
                  timeout: float = SIMULATION_TIMEOUT_S) -> dict[str, Any]:
    """Run the simulation for ``spec``; the child's answer (engine.trainer.scale_job.JobSimulation as a dict)."""
    if gpu_memory_gb <= 0:
        raise UserError(f"--gpu-memory-gb must be > 0, got {gpu_memory_gb:g}")
    if preset:
        from engine.models.presets import get_preset   # torch-free: a wrong name fails before the child starts

        try:
            get_preset(preset)
        except KeyError as exc:
            raise UserError(f"--preset: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="orch-simulate-") as tmp:
        config_path = Path(tmp) / "ds_config.json"
        config_path.write_text(json.dumps(spec.ds_config_dict() or {}), encoding="utf-8")
        argv = simulation_argv(spec, config_path, preset=preset, gpu_memory_gb=gpu_memory_gb)
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise UserError(f"the simulation did not finish within {timeout:g} s") from None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise UserError(f"the simulation failed: {_child_error(proc.stderr)}")


def _child_error(stderr: str) -> str:
    """The child's one-line user error (``error: ...``), else the tail of what it printed."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        for marker in ("error: ", "Error: "):
            if marker in line:
                return line.split(marker, 1)[1]
    return "\n".join(lines[-8:]) or "no output"


def describe_simulation(sim: dict[str, Any]) -> list[str]:
    """What ``orch check --simulate`` prints: per GPU memory, collectives per step, the verdict."""
    from .check import human_bytes

    def row(label: str, value: int, note: str = "") -> str:
        return f"  {label:<34} {human_bytes(value):>10}  ({value:,} bytes){note}"

    ratio = sim["bytes_sent"] / sim["zero_volume"] if sim["zero_volume"] else 0.0
    lines = [
        f"simulated: {sim['model']} ({sim['parameters']:,} parameters), rank 0 of {sim['world']} ranks, "
        f"ZeRO stage {sim['stage']}, {sim['precision']}, micro-batch {sim['micro_batch']} x accumulation "
        f"{sim['gradient_accumulation']}, seq_len {sim['seq_len']}"
        f"{', activation checkpointing' if sim['activation_checkpointing'] else ''}",
        "per GPU:",
        row("model states", sim["model_state_bytes"]),
        *([row("offloaded to host memory", sim["offloaded_bytes"])] if sim["offloaded_bytes"] else []),
        row("peak gathered parameters + staging", sim["peak_gathered_bytes"],
            f"; largest unit {human_bytes(sim['largest_unit_bytes'])}" if sim["stage"] == 3 else ""),
        row("reduce buckets", sim["buffer_bytes"]),
        row("activations (one micro-batch)", sim["activation_bytes"]),
        row("total", sim["gpu_bytes"]),
        f"collectives per step: {sim['calls']} calls, {human_bytes(sim['bytes_sent'])} sent "
        f"({sim['bytes_sent']:,} bytes; {ratio:.3f}x the ZeRO volume), {human_bytes(sim['bytes_received'])} received",
        *(f"  {op}: {v['calls']} calls, {human_bytes(v['bytes_sent'])} sent" for op, v in sim["by_op"].items()),
    ]
    gpu = sim["gpu_memory_bytes"]
    fits = (f"fits: {human_bytes(sim['gpu_bytes'])} of {gpu / 1e9:g} GB per GPU "
            f"({sim['gpu_bytes'] / gpu:.0%}; keep under 90% for the CUDA context and the allocator)"
            if sim["fits"] else
            f"OUT OF MEMORY: needs {human_bytes(sim['gpu_bytes'])} per GPU, {gpu / 1e9:g} GB available "
            "(more ranks or ZeRO stage 3 divide the model states; activation checkpointing or a smaller "
            "micro-batch the activations; offload_optimizer moves the optimizer states to host memory)")
    link, flops = sim["link_bytes_per_s"], sim["gpu_flops"]
    speed = (f"communication {sim['comm_seconds']:.3f} s per step at {link / 1e9:g} GB/s per GPU vs compute "
             f"{sim['compute_seconds']:.3f} s at {flops / 1e12:g} TFLOP/s: "
             + ("COMMUNICATION-BOUND (raise the micro-batch or accumulation, or use fewer ranks per replica)"
                if sim["communication_bound"] else "communication can hide under compute"))
    return lines + [f"verdict: {fits}", f"time: {speed}",
                    f"(simulated in {sim['simulated_seconds']:.0f} s on this machine)"]
