"""``orch check``: validate a job before submitting it, and estimate its model-state memory.

Two estimates, both for model states only (activations, fragmentation and the framework's own
memory come on top):

* per stage, the ZeRO paper's figures (arXiv:1910.02054, section 3): with mixed-precision Adam
  every parameter costs 2 bytes (fp16/bf16 weights) + 2 (gradients) + 12 (fp32 master, momentum,
  variance) = 16 bytes; stage 1 partitions the 12, stage 2 also the gradient, stage 3 everything
  across the N data-parallel ranks. fp32 training has 4 + 4 + 8. orch's engine accumulates and
  reduces bf16/fp16 gradients in fp32 unless ``data_types.grad_accum_dtype`` says "bf16"/"fp16"
  (engine/zero/grad_precision.py), so its gradients cost 4 bytes, not the paper's 2: 18Ψ/N at
  stage 3, 2Ψ + 16Ψ/N at stage 2, 6Ψ + 16Ψ/N at stage 1 (stage 1 keeps the whole gradient and
  reduce-scatters it into a gradient partition, as DeepSpeed's fp32 partition gradient; fp32
  training keeps a fp32 master copy once partitioned). ``offload_optimizer`` moves
  the master, the optimizer states and the gradient partition to CPU memory, as
  orch's engine does (engine/zero/offload.py); ``offload_param`` (stage 3) the parameter partition.
  With ``offload_optimizer.device: nvme`` the master and states go to swap files instead and
  host memory keeps the gradient partition and the chunk buffers (``estimate_nvme_offload``).
* per way of running it (``memory_options``), DeepSpeed's estimators, with their meaning, so the
  numbers match what DeepSpeed users know: ``estimate_zero2_model_states_mem_needs`` and
  ``estimate_zero3_model_states_mem_needs`` (deepspeed/runtime/zero/stage_1_and_2.py, stage3.py).
  They assume mixed precision, count the largest layer's gathered fp16 params and grads
  (4 bytes x its parameters) on the GPU at stage 3, and multiply CPU figures by a 1.5 buffer
  factor; CPU figures are per node (all of a node's ranks together). ``recommend`` then says which
  is the least offloading that fits a given GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import UserError
from .spec import BUNDLED_TRAINER, JobSpec


@dataclass(frozen=True)
class MemoryEstimate:
    stage: int
    gpu_bytes: float      # model states per GPU (params + grads + optimizer states)
    cpu_bytes: float      # per rank, when offloaded


@dataclass(frozen=True)
class MemoryOption:
    """One way to run the model (stage, offload, zero.Init) and its DeepSpeed-estimated needs."""

    stage: int
    offload_optimizer: bool
    offload_param: bool
    zero_init: bool
    gpu_bytes: float      # per GPU
    cpu_bytes: float      # per node (DeepSpeed's estimators count a node's ranks together)

    def describe(self) -> str:
        parts = [f"ZeRO-{self.stage}", f"offload_optimizer={'cpu' if self.offload_optimizer else 'none'}"]
        if self.stage == 3:
            parts.append(f"offload_param={'cpu' if self.offload_param else 'none'}")
            parts.append(f"zero.Init={'yes' if self.zero_init else 'no'}")
        return ", ".join(parts)


@dataclass
class CheckReport:
    spec: JobSpec
    world_size: int
    batch: Any | None = None                 # engine.config.BatchSizes
    precision: str = "fp32"
    grad_accum_dtype: str = "fp32"           # data_types.grad_accum_dtype, resolved
    stage: int = 0
    num_parameters: int | None = None
    estimates: list[MemoryEstimate] = field(default_factory=list)
    largest_layer_parameters: int | None = None
    options: list[MemoryOption] = field(default_factory=list)   # DeepSpeed's estimator, every way to run
    recommendation: str | None = None                            # with gpu_memory_bytes: what fits
    notes: list[str] = field(default_factory=list)
    autotune: Any | None = None                                  # autotune.AutotuneAnswer (--autotune)
    config: Any | None = None                                    # the loaded EngineConfig
    preset: Any | None = None                                    # the bundled trainer's model preset


def bytes_per_parameter(precision: str, grad_accum_dtype: str = "fp32") -> tuple[int, int, int]:
    """(weights, gradients, optimizer states incl. fp32 master) bytes per parameter for Adam;
    gradients take the accumulation dtype's size (fp32 unless the ds_config says otherwise)."""
    if precision == "fp32":
        return 4, 4, 8
    return 2, 4 if grad_accum_dtype == "fp32" else 2, 12


def _partitioned_extra(stage: int, precision: str, g: float) -> float:
    """Bytes per parameter (before dividing by N) a partitioned run holds beyond the paper's
    table: stage 1's reduced gradient partition, and fp32 training's master copy at stages 1-2
    (a rank's pieces are spread over the buckets, so the master cannot be the parameters)."""
    extra = g if stage == 1 else 0.0
    return extra + (4.0 if precision == "fp32" and stage in (1, 2) else 0.0)


def estimate_model_states(num_parameters: int, world_size: int, stage: int, precision: str,
                          offload_optimizer: bool = False, offload_param: bool = False,
                          grad_accum_dtype: str = "fp32") -> MemoryEstimate:
    """Per-GPU (and per-rank CPU) bytes of model states for one ZeRO stage."""
    w, g, o = bytes_per_parameter(precision, grad_accum_dtype)
    n = max(world_size, 1)
    weights = w / n if stage >= 3 else w
    grads = g / n if stage >= 2 else g
    states = o / n if stage >= 1 else o
    extra = _partitioned_extra(stage, precision, g) / n if n > 1 else 0.0
    gpu, cpu = weights + grads + states + extra, 0.0
    if offload_optimizer and stage >= 1:
        # the reduced gradient partition (and fp32's master copy) go with them
        moved = states + extra + (grads if stage >= 2 else 0)
        gpu, cpu = gpu - moved, cpu + moved
    if offload_param and stage >= 3:
        gpu, cpu = gpu - weights, cpu + weights
    return MemoryEstimate(stage, gpu * num_parameters, cpu * num_parameters)


def deepspeed_zero2_estimate(total_params: int, gpus_per_node: int = 1, nodes: int = 1,
                             offload_optimizer: bool = False, buffer_factor: float = 1.5) -> tuple[float, float]:
    """(CPU bytes per node, GPU bytes per GPU) as DeepSpeed's ``estimate_zero2_model_states_mem_needs``."""
    total_gpus = max(1, nodes * gpus_per_node)
    if offload_optimizer:
        return total_params * max(4 * total_gpus, 16) * buffer_factor, 2.0 * total_params
    return total_params * 4 * gpus_per_node * buffer_factor, 4.0 * total_params + 16.0 * total_params / total_gpus


def deepspeed_zero3_estimate(total_params: int, largest_layer_params: int, gpus_per_node: int = 1, nodes: int = 1,
                             offload_optimizer: bool = False, offload_param: bool = False, zero_init: bool = True,
                             buffer_factor: float = 1.5) -> tuple[float, float]:
    """(CPU bytes per node, GPU bytes per GPU) as DeepSpeed's ``estimate_zero3_model_states_mem_needs``.

    The GPU always holds the largest layer gathered (fp16 params + grads: 4 bytes each). Without
    ``zero.Init`` every rank of a node first builds the whole fp32 model in CPU memory.
    """
    total_gpus = max(1, nodes * gpus_per_node)
    per_node = 1.0 / max(1, nodes)
    largest = 4.0 * largest_layer_params
    whole_fp32 = 4 * gpus_per_node
    if offload_optimizer and offload_param:
        gpu, host = largest, 18 * per_node
    elif offload_optimizer:
        gpu, host = largest + 2.0 * total_params / total_gpus, 16 * per_node
    else:
        gpu = largest + 18.0 * total_params / total_gpus
        if zero_init:
            return largest_layer_params * whole_fp32 * buffer_factor, gpu
        return total_params * whole_fp32 * buffer_factor, gpu
    factor = host if zero_init else max(whole_fp32, host)
    return total_params * factor * buffer_factor, gpu


def memory_options(total_params: int, largest_layer_params: int | None, gpus_per_node: int,
                   nodes: int) -> list[MemoryOption]:
    """Every way DeepSpeed's estimators cover, in order of preference: less offloading first (CPU
    offload costs step time), and at equal offloading stage 2 (less communication) before stage 3."""
    z2 = {offload: deepspeed_zero2_estimate(total_params, gpus_per_node, nodes, offload) for offload in (False, True)}
    out = [MemoryOption(2, False, False, False, z2[False][1], z2[False][0])]

    def z3(offload_opt: bool, offload_par: bool) -> list[MemoryOption]:
        if largest_layer_params is None:
            return []
        found = []
        for init in (True, False):
            cpu, gpu = deepspeed_zero3_estimate(total_params, largest_layer_params, gpus_per_node, nodes,
                                                offload_opt, offload_par, init)
            found.append(MemoryOption(3, offload_opt, offload_par, init, gpu, cpu))
        return found

    out += z3(False, False)
    out.append(MemoryOption(2, True, False, False, z2[True][1], z2[True][0]))
    return out + z3(True, False) + z3(True, True)


def recommend(options: list[MemoryOption], gpu_memory_bytes: float, cpu_memory_bytes: Optional[float] = None,
              headroom: float = 0.8) -> str:
    """The first option (least offloading) whose model states fit ``headroom`` of the GPU (and the
    node's CPU memory, when given): the rest is left for activations and fragmentation."""
    for opt in options:
        if opt.gpu_bytes <= headroom * gpu_memory_bytes and \
                (cpu_memory_bytes is None or opt.cpu_bytes <= headroom * cpu_memory_bytes):
            return (f"{opt.describe()} fits: {human_bytes(opt.gpu_bytes)} of model states per GPU "
                    f"(<= {headroom:.0%} of {human_bytes(gpu_memory_bytes)}), {human_bytes(opt.cpu_bytes)} of CPU "
                    "memory per node")
    last = min(options, key=lambda o: (o.gpu_bytes, not o.zero_init)) if options else None
    need = f" even {last.describe()} needs {human_bytes(last.gpu_bytes)} per GPU;" if last else ""
    return (f"nothing fits {headroom:.0%} of {human_bytes(gpu_memory_bytes)} per GPU:{need} add GPUs (stage 3 divides "
            "the states by their number) or use GPUs with more memory")


def largest_layer_parameters(cfg: Any) -> int:
    """The most parameters one module of a bundled GPT (engine/models/gpt.py) owns directly: what
    stage 3 gathers at once (DeepSpeed's ``largest_layer_params``)."""
    d, hidden, b = cfg.d_model, cfg.mlp_ratio * cfg.d_model, 1 if cfg.bias else 0
    return max(cfg.vocab_size * d, cfg.seq_len * d, 3 * d * d + 3 * d * b, d * d + d * b,
               d * hidden + hidden * b, hidden * d + d * b, 2 * d)


def model_parameters_from_args(spec: JobSpec) -> int | None:
    """Parameter count of the bundled trainer's ``--model`` preset, without importing torch."""
    found = _preset_from_args(spec)
    return None if found is None else int(found.num_parameters())


def _preset_from_args(spec: JobSpec) -> Any:
    """The bundled trainer's ``--model`` preset config (torch-free), or None for other programs."""
    if spec.program != BUNDLED_TRAINER:
        return None
    args = list(spec.args)
    name = "tiny"
    for i, a in enumerate(args):
        if a == "--model" and i + 1 < len(args):
            name = args[i + 1]
        elif a.startswith("--model="):
            name = a.split("=", 1)[1]
    try:
        from engine.models.presets import get_preset
    except ImportError:
        return None
    try:
        return get_preset(name)
    except (KeyError, ValueError) as exc:
        raise UserError(f"args: --model {name!r}: {exc}") from None


def check_job(spec: JobSpec, *, num_parameters: int | None = None, largest_layer: int | None = None,
              gpu_memory_bytes: float | None = None, lenient: bool = False, autotune: bool = False) -> CheckReport:
    """Validate the ds_config for the job's world size and estimate memory for every stage.

    ``largest_layer`` (parameters of the biggest module) defaults to the bundled preset's;
    ``gpu_memory_bytes`` adds a recommendation of the least offloading that fits. ``lenient``
    lets unknown keys DeepSpeed ignores through as notes; ``autotune`` leaves "auto" batch sizes
    for autotune.py's answer (``answer_for_report``), which reads the report.
    """
    from .check_config import load_job_config

    report = CheckReport(spec=spec, world_size=spec.world_size)
    offload_opt = offload_par = False
    ds = spec.ds_config_dict()
    if ds is None:
        report.notes.append("no ds_config: the trainer uses its defaults (fp32, ZeRO stage 0)")
    else:
        cfg, config_notes = load_job_config(spec, ds, lenient=lenient, autotune=autotune)
        report.config = cfg
        report.notes.extend(config_notes)
        report.batch = cfg.batch
        report.precision = cfg.precision
        report.grad_accum_dtype = cfg.grad_accum_dtype
        report.stage = cfg.zero_optimization.stage
        report.notes.extend(cfg.migrations)
        if spec.nodes.elastic and cfg.batch is not None:
            report.notes.extend(_elastic_notes(cfg, spec))
        offload_opt = _offloaded(cfg.zero_optimization.offload_optimizer)
        offload_par = _offloaded(cfg.zero_optimization.offload_param)
        if offload_opt or offload_par:
            report.notes.append(f"offload: optimizer={cfg.zero_optimization.offload_optimizer.device}, "
                                f"param={cfg.zero_optimization.offload_param.device}")
    report.num_parameters = num_parameters or model_parameters_from_args(spec)
    preset = report.preset = _preset_from_args(spec)
    report.largest_layer_parameters = largest_layer or (largest_layer_parameters(preset) if preset else None)
    if report.num_parameters and report.config is not None:
        report.notes.extend(nvme_notes(report.config, report.num_parameters, spec.world_size,
                                       report.largest_layer_parameters))
    if report.num_parameters:
        report.estimates = [
            estimate_model_states(report.num_parameters, spec.world_size, stage, report.precision,
                                  offload_opt, offload_par, report.grad_accum_dtype)
            for stage in range(4)
        ]
        report.options = memory_options(report.num_parameters, report.largest_layer_parameters,
                                        spec.procs_per_node, spec.nodes.max)
        if gpu_memory_bytes:
            report.recommendation = recommend(report.options, gpu_memory_bytes)
            report.notes.append(f"memory: {report.recommendation}")
    from .backends.kubernetes.storage import storage_warnings

    report.notes.extend(storage_warnings(spec) if spec.kubernetes.image else [])
    return report


NVME_CHUNK_NUMEL = 4 << 20        # engine/zero/nvme.py's default chunk (elements per swap slot)


def estimate_nvme_offload(num_parameters: int, world_size: int, stage: int, precision: str,
                          buffer_count: int, chunk_numel: int = NVME_CHUNK_NUMEL,
                          grad_accum_dtype: str = "fp32", partition_on_host: bool = False) -> tuple[float, float]:
    """(host RAM, NVMe) bytes per rank for ``offload_optimizer: nvme`` (engine/zero/nvme.py).

    The swap files hold Adam's m and v and the fp32 master (12 bytes per parameter, the rank's 1/N),
    except where the model's own copy of the rank's partition is an fp32 host tensor, which
    nvme.py then uses as the master (``aliased``: 8 bytes): fp32 at stages 1-2 (the host staging
    the updated weights go back to the device through) and fp32 stage 3 whose partition is in
    host memory (``partition_on_host``: offload_param cpu). Host memory keeps the reduced gradient
    partition and ``buffer_count`` chunk buffers of what a slot holds, instead of all of the
    states, and at stages 1-2 that staging (the model's dtype, the rank's 1/N)."""
    weights, grads, _ = bytes_per_parameter(precision, grad_accum_dtype)
    aliased = precision == "fp32" and (stage in (1, 2) or partition_on_host)
    states = 8 if aliased else 12
    n = max(world_size, 1)
    nvme = states * num_parameters / n
    buffers = buffer_count * chunk_numel * states
    publish = weights * num_parameters / n if stage in (1, 2) else 0.0
    host = grads * num_parameters / n + min(buffers, nvme) + publish
    return host, nvme


def nvme_notes(cfg: Any, num_parameters: int, world_size: int, largest_layer: Optional[int] = None) -> list[str]:
    """``orch check``'s lines for NVMe offload: bytes per rank on the drive and in host memory."""
    zero = cfg.zero_optimization
    notes = []
    if zero.offload_optimizer.device == "nvme":
        host, nvme = estimate_nvme_offload(num_parameters, world_size, zero.stage, cfg.precision,
                                           max(3, int(zero.offload_optimizer.buffer_count)),
                                           grad_accum_dtype=cfg.grad_accum_dtype,
                                           partition_on_host=zero.offload_param.device == "cpu")
        cpu = estimate_model_states(num_parameters, world_size, zero.stage, cfg.precision, True, False,
                                    cfg.grad_accum_dtype).cpu_bytes
        notes.append(f"NVMe offload: {human_bytes(nvme)} per rank in swap files under "
                     f"{zero.offload_optimizer.nvme_path}; host RAM {human_bytes(host)} per rank (gradient "
                     f"partition + {max(3, int(zero.offload_optimizer.buffer_count))} chunk buffers) instead of "
                     f"{human_bytes(cpu)} with CPU offload. `orch doctor --nvme-path DIR` measures the drive")
    if zero.offload_param.device == "nvme":
        notes.append(_nvme_param_note(zero.offload_param, cfg.precision, num_parameters, world_size, largest_layer))
    if cfg.aio is not None:
        notes += [f"ignored: {f}" for f in cfg.ignored_features() if str(f).startswith("aio")]
        if "nvme" in (zero.offload_optimizer.device, zero.offload_param.device):
            notes.append("aio: block_size sets the I/O request size, thread_count x queue_depth the I/O threads "
                         "(at most 16)")
    return notes


def estimate_nvme_param_offload(num_parameters: int, world_size: int, precision: str, buffer_count: int,
                                buffer_size: int, max_in_cpu: int, largest_layer: Optional[int] = None,
                                block: int = 8 << 20) -> tuple[float, float]:
    """(host RAM, NVMe) bytes per rank for stage 3's ``offload_param: nvme`` (engine/zero/nvme_params.py).

    The rank's parameter partition (Ψ/N elements in the model dtype) goes to the swap files beyond
    its first ``max_in_cpu`` elements, which stay in host memory as DeepSpeed keeps them. Host
    memory adds ``buffer_count`` read buffers, each the largest fetch unit's piece (the largest
    layer's 1/N when known, at most ``buffer_size`` elements), and the write-back's two staging
    blocks (``aio.block_size``)."""
    weights = bytes_per_parameter(precision)[0]
    partition = num_parameters / max(world_size, 1)
    resident = min(partition, max_in_cpu)
    piece = buffer_size if largest_layer is None else min(buffer_size, -(-largest_layer // max(world_size, 1)))
    host = (resident + buffer_count * piece) * weights + 2 * block
    return host, (partition - resident) * weights


def _nvme_param_note(section: Any, precision: str, num_parameters: int, world_size: int,
                     largest_layer: Optional[int]) -> str:
    host, nvme = estimate_nvme_param_offload(num_parameters, world_size, precision, int(section.buffer_count),
                                             int(section.buffer_size), int(section.max_in_cpu), largest_layer)
    cpu = bytes_per_parameter(precision)[0] * num_parameters / max(world_size, 1)
    line = (f"NVMe parameter offload: {human_bytes(nvme)} per rank of stage 3's parameter partition in swap files "
            f"under {section.nvme_path}; host RAM {human_bytes(host)} per rank for it (max_in_cpu "
            f"{int(section.max_in_cpu):,} elements + {int(section.buffer_count)} read buffers) instead of "
            f"{human_bytes(cpu)} with offload_param cpu")
    if nvme == 0:
        line += ("; max_in_cpu keeps the whole partition in host memory (DeepSpeed's meaning): set it lower, "
                 "e.g. 0, to use the drive")
    return line


def _offloaded(section: Any) -> bool:
    return section is not None and getattr(section, "device", "none") not in (None, "none")


def _elastic_notes(cfg: Any, spec: JobSpec) -> list[str]:
    notes = []
    for nodes in range(spec.nodes.min, spec.nodes.max + 1):
        ws = nodes * spec.procs_per_node
        try:
            b = cfg.batch_for_world_size(ws, keep_global=True)
            line = (f"elastic: on {nodes} node(s) ({ws} ranks): micro {b.micro} x accumulation "
                    f"{b.gradient_accumulation_steps} x {ws} = {b.train_batch_size}")
            notes.append(line if b.exact else f"{line} ({b.note})")
        except Exception as exc:  # the config explains why the global batch cannot be kept
            notes.append(f"elastic: on {nodes} node(s) ({ws} ranks): {exc}")
    return notes


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} TiB"
