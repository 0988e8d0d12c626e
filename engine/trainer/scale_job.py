"""One job's scale simulation: ``orch check JOB --simulate`` runs this as ``python -m engine.trainer.scale_job``.

Why: "will this OOM or crawl on 512 GPUs?" should be answered on a laptop before anything is
submitted. The job's own trainer arguments and ds_config are read exactly as the bundled
trainer reads them (``engine.trainer.args``, "auto" filled by ``auto_fill``), then the scale
simulator (scale_sim.py) runs rank 0 of the job's world under torch's fake process group with
the NCCL plan: stage 3 builds the model under ``engine.zero.Init``, so only ``1/N`` of a 7B
model is ever resident, and arithmetic is skipped (sim_modes.py), so a step takes seconds. The
measured step uses short sequences (nothing it measures depends on the sequence length); the
activation memory of one micro-batch is measured separately at the job's full sequence length
on the meta device.

The answer, per GPU: model states (what offload keeps in host memory excluded), the peak of
gathered units and staging buffers, reduce buckets, activations; collective bytes and calls per
step; and a verdict against the GPU memory and, for time, communication at a link bandwidth
against compute at a sustained throughput (both flags, defaults stated in the output).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

from ..errors import UserError

__all__ = ["JobSimulation", "main", "simulate_job"]

SIM_SEQ_LEN = 32          # tokens per sample in the measured step
MEMORY_HEADROOM = 0.9     # of the GPU's memory: the CUDA context, allocator caching and fragmentation


@dataclass
class JobSimulation:
    """The answer for one job (JSON on stdout of ``python -m engine.trainer.scale_job``)."""

    model: str
    world: int
    stage: int
    precision: str
    parameters: int
    micro_batch: int
    gradient_accumulation: int
    seq_len: int
    activation_checkpointing: bool
    model_state_bytes: int         # on the GPU: params, grads, fp32 master, optimizer states (offloaded excluded)
    offloaded_bytes: int           # the part of the model states offload keeps in host memory
    peak_gathered_bytes: int       # stage 3: gathered units + staging at once
    largest_unit_bytes: int
    buffer_bytes: int              # reduce buckets
    activation_bytes: int          # one micro-batch at seq_len, saved for backward
    gpu_bytes: int                 # the sum above: the peak one GPU needs
    gpu_memory_bytes: int
    bytes_sent: int                # per rank per step
    bytes_received: int
    zero_volume: int
    calls: int
    comm_seconds: float            # bytes_sent at link_bytes_per_s
    compute_seconds: float         # 6·Ψ·tokens per rank per step at gpu_flops
    link_bytes_per_s: float
    gpu_flops: float
    by_op: dict[str, Any]
    simulated_seconds: float       # wall time of the whole simulation on this machine

    @property
    def fits(self) -> bool:
        return self.gpu_bytes <= MEMORY_HEADROOM * self.gpu_memory_bytes

    @property
    def communication_bound(self) -> bool:
        return self.comm_seconds > self.compute_seconds

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"fits": self.fits, "communication_bound": self.communication_bound}


def _activation_bytes(preset: Any, micro: int, dtype: Any, checkpointing: bool) -> int:
    """One micro-batch's activations at the full sequence length (meta device, no arithmetic).

    With checkpointing each block keeps only its input; the peak adds one block's activations,
    rebuilt during backward (the whole-model difference per block)."""
    from engine.models.gpt import GPT
    from engine.sim_modes import meta_saved_bytes

    def measure(ckpt: bool) -> int:
        def factory() -> Any:
            model = GPT(preset)
            model.set_activation_checkpointing(ckpt)
            return model
        return meta_saved_bytes(factory, batch=micro, seq_len=preset.seq_len, vocab_size=preset.vocab_size,
                                dtype=dtype)

    full = measure(False)
    if not checkpointing:
        return full
    outside = measure(True)
    per_block = max(0, full - outside) // max(1, preset.n_layer)
    block_inputs = preset.n_layer * micro * preset.seq_len * preset.d_model * dtype.itemsize
    return outside + block_inputs + per_block


def _check_host_memory(stage: int, parameters: int) -> None:
    """Stages 0-2 hold the whole model on the simulated rank: refuse what this machine cannot hold."""
    if stage == 3:
        return
    need = 8 * parameters   # bf16 params + grads + the flat copies made while taking them over
    try:
        have = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if need > have:
        raise UserError(f"simulating ZeRO stage {stage} holds the whole model on this machine: about "
                        f"{need / 1e9:.0f} GB for {parameters / 1e9:.1f}B parameters, {have / 1e9:.0f} GB free. "
                        "Stage 3 builds it partitioned (zero.Init); or run the simulation on a bigger machine")


def simulate_job(trainer_argv: Sequence[str], *, world: int, preset_name: Optional[str] = None,
                 gpu_memory_bytes: float = 80e9, link_bytes_per_s: float = 25e9, gpu_flops: float = 400e12,
                 rank: int = 0) -> JobSimulation:
    """Simulate one step of the bundled trainer started with ``trainer_argv`` as ``rank`` of ``world``."""
    import torch

    import engine
    from engine.models import build_model, get_preset
    from engine.scale_sim import simulate
    from engine.trainer.args import parse_args
    from engine.trainer.auto_fill import filled_ds_config

    started = time.perf_counter()
    if world < 1:
        raise UserError(f"world size must be >= 1, got {world}")
    args = parse_args(list(trainer_argv))
    name = preset_name or args.model
    preset = get_preset(name, seq_len=args.seq_len)
    ds = filled_ds_config(args, preset.d_model)
    cfg = engine.load_config(ds, world_size=world)
    stage = cfg.zero_optimization.stage
    _check_host_memory(stage, preset.num_parameters())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
    checkpointing = bool(cfg.activation_checkpointing.enabled)

    def factory() -> Any:
        with torch.device("cpu"):
            model = build_model(name, seq_len=preset.seq_len)
        model.set_activation_checkpointing(checkpointing)
        return model

    report = simulate(factory, ds, world=world, rank=rank, vocab_size=preset.vocab_size,
                      seq_len=min(SIM_SEQ_LEN, preset.seq_len), model_name=name)
    micro, accumulation = cfg.batch.micro, cfg.batch.gradient_accumulation_steps
    activations = _activation_bytes(preset, micro, dtype, checkpointing)
    on_gpu = report.model_state_bytes - report.offloaded_bytes
    tokens = micro * accumulation * preset.seq_len
    return JobSimulation(
        model=name, world=world, stage=stage, precision=cfg.precision, parameters=report.parameters,
        micro_batch=micro, gradient_accumulation=accumulation, seq_len=preset.seq_len,
        activation_checkpointing=checkpointing, model_state_bytes=on_gpu, offloaded_bytes=report.offloaded_bytes,
        peak_gathered_bytes=report.peak_gathered_bytes, largest_unit_bytes=report.largest_unit_bytes,
        buffer_bytes=report.buffer_bytes, activation_bytes=activations,
        gpu_bytes=on_gpu + report.peak_gathered_bytes + report.buffer_bytes + activations,
        gpu_memory_bytes=int(gpu_memory_bytes), bytes_sent=report.bytes_sent,
        bytes_received=report.bytes_received, zero_volume=report.zero_volume, calls=report.calls,
        comm_seconds=report.bytes_sent / link_bytes_per_s, compute_seconds=6 * report.parameters * tokens / gpu_flops,
        link_bytes_per_s=link_bytes_per_s, gpu_flops=gpu_flops, by_op=report.step_by_op,
        simulated_seconds=time.perf_counter() - started)


def _one_compute_thread() -> None:
    """The simulated step computes nothing big (sim_modes.py): its kernels are small copies and
    fills, which parallel threads only wait on. One thread halved the CPU time of a 7B job at 512
    ranks (BENCHMARKS.md); ``OMP_NUM_THREADS``, when set, still decides."""
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.trainer.scale_job",
        description="Simulate one step of the bundled trainer as rank 0 of WORLD NCCL ranks (fake process "
                    "group) and print what one GPU holds and moves, as JSON. Trainer arguments follow `--`.")
    parser.add_argument("--world", type=int, required=True, help="ranks in the job (nodes x GPUs per node)")
    parser.add_argument("--preset", help="model preset (default: the trainer's --model)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0)
    parser.add_argument("--link-gb-s", type=float, default=25.0, help="per-GPU network bandwidth, GB/s")
    parser.add_argument("--gpu-tflops", type=float, default=400.0, help="sustained bf16 TFLOP/s per GPU")
    parser.add_argument("trainer_args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    trainer_args = ns.trainer_args[1:] if ns.trainer_args[:1] == ["--"] else ns.trainer_args
    _one_compute_thread()
    try:
        result = simulate_job(trainer_args, world=ns.world, preset_name=ns.preset,
                              gpu_memory_bytes=ns.gpu_memory_gb * 1e9, link_bytes_per_s=ns.link_gb_s * 1e9,
                              gpu_flops=ns.gpu_tflops * 1e12)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
