"""Which DeepSpeed features a config switches on that orch's engine does not implement.

Two kinds, decided by what would happen if we silently went ahead:
- features whose absence changes the training result (numerics, batch sizes, the model itself)
  are errors (``unsupported_problems``): a run that looks like the user's DeepSpeed run but is
  not would be worse than no run;
- features whose absence changes only speed, memory, logging or tooling are accepted and
  listed by ``ignored_features`` so the trainer can say, once, what it does not do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .types import any_enabled

# An EngineConfig (model.py). The model calls these checks while it validates, so this module
# reads it by DeepSpeed key names instead of importing it: no cycle between the two.
Config = Any

PRECISION_HINT = 'use "bf16": {"enabled": true} or "fp16": {"enabled": true}'


@dataclass(frozen=True)
class IgnoredFeature:
    """A key the config sets that the engine accepts but does not act on, and why that is safe."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _grad_accum_problems(cfg: Config) -> list[tuple[str, str, str]]:
    """``data_types.grad_accum_dtype`` must be fp32 or the training precision: summing in a
    narrower or different format than the gradients have only loses bits."""
    chosen, precision = cfg.data_types.grad_accum_dtype, cfg.precision
    if chosen is None or chosen in ("fp32", precision):
        return []
    allowed = '"fp32"' if precision == "fp32" else f'"fp32" (the default) or "{precision}"'
    return [("data_types.grad_accum_dtype",
             f'"{chosen}" gradient accumulation does not fit {precision} training',
             f"set it to {allowed}, or remove it")]


def unsupported_problems(cfg: Config) -> list[tuple[str, str, str]]:
    """(path, message, hint) for every enabled feature that would silently change results."""
    out: list[tuple[str, str, str]] = []

    def bad(path: str, what: str, hint: str = "") -> None:
        out.append((path, f"{what} is not supported by orch's engine (it would change the training result)",
                    hint))

    if cfg.fp16.enabled and cfg.bf16.enabled:
        out.append(("bf16.enabled", "fp16 and bf16 cannot both be enabled",
                    "enable only one: bf16 where the hardware supports it (no loss scaling), else fp16"))
    if cfg.amp.enabled:
        out.append(("amp.enabled", "Apex AMP is not supported, use bf16/fp16", PRECISION_HINT))
    if cfg.torch_autocast.enabled:
        out.append(("torch_autocast.enabled", "torch_autocast is not supported, use bf16/fp16", PRECISION_HINT))
    if cfg.fp16.fp16_master_weights_and_grads:
        bad("fp16.fp16_master_weights_and_grads", "fp16 master weights", "remove it (master weights stay fp32)")
    if cfg.bf16.bf16_master_weights_and_grads:
        bad("bf16.bf16_master_weights_and_grads", "bf16 master weights", "remove it (master weights stay fp32)")
    if cfg.bf16.bf16_optimizer_states:
        bad("bf16.bf16_optimizer_states", "bf16 optimizer states", "remove it (optimizer states stay fp32)")
    if not cfg.managed_gradient_accumulation:
        bad("managed_gradient_accumulation", "client-managed accumulation (false)",
            "remove it: the engine steps the optimizer at accumulation boundaries, as DeepSpeed's default does")
    if cfg.gradient_allreduce_op != "mean":
        bad("gradient_allreduce_op", 'summed gradients ("sum")', 'remove it or set "mean"')
    out.extend(_grad_accum_problems(cfg))
    for key in ("param_dtype", "buffer_dtype"):
        if getattr(cfg.data_types, key) is not None:
            bad(f"data_types.{key}", f"data_types.{key}", "remove it; precision comes from bf16/fp16")
    zero = cfg.zero_optimization
    for key in ("zero_quantized_weights", "zero_quantized_nontrainable_weights", "zero_quantized_gradients"):
        if getattr(zero, key):
            bad(f"zero_optimization.{key}", "ZeRO++ quantized communication", f"remove {key}")
    for key in ("zenflow", "zeropp_loco_param"):
        if getattr(zero, key) is not None:
            bad(f"zero_optimization.{key}", key, f"remove {key}")
    for key, what in (("elasticity", "DeepSpeed elasticity (it rewrites the batch sizes)"),
                      ("progressive_layer_drop", "progressive layer drop"),
                      ("curriculum_learning", "curriculum learning"),
                      ("data_efficiency", "data efficiency (curriculum / random-LTD)"),
                      ("compression_training", "compression training"),
                      ("expert_parallel", "expert parallelism")):
        section = getattr(cfg, key)
        if section is not None and any_enabled(section):
            hint = ("use the job's nodes: MIN:MAX; the engine keeps the global batch across world sizes"
                    if key == "elasticity" else f"remove {key}")
            bad(key, what, hint)
    for key, what in (("sparse_attention", "sparse attention"), ("weight_quantization", "weight quantization")):
        if getattr(cfg, key) is not None:
            bad(key, what, f"remove {key}")
    tp = cfg.tensor_parallel
    if tp is not None and _int(tp.extras().get("autotp_size", 0)) > 1:
        bad("tensor_parallel.autotp_size", "tensor parallelism", "remove it; the engine is data-parallel (ZeRO)")
    if cfg.sequence_parallel_size is not None and cfg.sequence_parallel_size > 1:
        bad("sequence_parallel_size", "sequence parallelism", "remove it or set 1")
    return out


# (path, predicate on the value, reason) for keys that only affect speed, memory or tooling.
def ignored_features(cfg: Config) -> list[IgnoredFeature]:
    """Keys the config sets (to non-default values) that the engine accepts but does not act on."""
    found: list[IgnoredFeature] = []

    def note(path: str, reason: str) -> None:
        found.append(IgnoredFeature(path, reason))

    # wandb, csv_monitor, comet, comms_logger and flops_profiler are implemented (engine/monitor/).
    simple = {
        "memory_breakdown": "memory breakdown logging is not implemented",
        "dump_state": "state dumping is not implemented",
        "sparse_gradients": "sparse embedding gradients are not implemented; gradients are reduced densely "
                            "(same result, more traffic)",
        "disable_allgather": "the engine chooses its own collectives",
        "graph_harvesting": "CUDA graph capture is not implemented",
        "use_data_before_expert_parallelism": "there is no expert parallelism",
    }
    for key, reason in simple.items():
        if getattr(cfg, key):
            note(key, reason)
    for key, reason in (("seq_parallel_communication_data_type", "there is no sequence parallelism"),
                        ("vocabulary_size", "DeepSpeed only uses it for a tensor-core alignment warning"),
                        ("log_level", "the engine logs through Python logging; set the level there")):
        if getattr(cfg, key) is not None:
            note(key, reason)
    if cfg.communication_data_type is not None and cfg.zero_optimization.stage == 0:
        note("communication_data_type", "applies at ZeRO stages 1-3; stage 0 reduces gradients in their "
             "accumulation dtype (data_types.grad_accum_dtype)")
    if cfg.optimizer is not None:
        if cfg.optimizer.legacy_fusion:
            note("optimizer.legacy_fusion", "legacy fused optimizers are not used")
        if cfg.optimizer.type == "AdamW" and cfg.optimizer.params.get("adam_w_mode") is False:
            note("optimizer.params.adam_w_mode", 'has no effect with type "AdamW" (DeepSpeed also runs AdamW); '
                 'use type "Adam" with adam_w_mode false for L2 weight decay')
    found += _sections(cfg)
    found += _activation_checkpointing(cfg)
    found += _zero(cfg)
    found += _aio(cfg)
    ck = cfg.checkpoint
    if ck.load_universal:
        note("checkpoint.load_universal", "every orch checkpoint reshards on load, so this is always on")
    if ck.use_node_local_storage:
        note("checkpoint.use_node_local_storage", "checkpoints go to the job's checkpoint directory")
    if ck.parallel_write.pipeline_stage:
        note("checkpoint.parallel_write.pipeline_stage", "there is no pipeline parallelism")
    if ck.writer is not None:
        note("checkpoint.writer", "the engine uses its own checkpoint writer")
    return found


def _sections(cfg: Config) -> list[IgnoredFeature]:
    reasons = {
        "autotuning": "answered before the job starts (orch check --autotune, orch submit), not at run time",
        "eigenvalue": "eigenvalue computation is not implemented",
        "nebula": "Nebula checkpointing is not implemented",
        "datastates": "DataStates checkpointing is not implemented",
        "hybrid_engine": "the RLHF hybrid engine is not implemented",
    }
    out = [IgnoredFeature(f"{k}.enabled", r) for k, r in reasons.items()
           if getattr(cfg, k) is not None and getattr(cfg, k).enabled]
    present = {
        "pipeline": "there is no pipeline parallelism",
        "timers": "DeepSpeed timers are not implemented",
        "compile": "DeepSpeed's compile/DeepCompile is not used; the model runs eagerly",
    }
    out += [IgnoredFeature(k, r) for k, r in present.items() if getattr(cfg, k) is not None]
    if cfg.tensor_parallel is not None and _int(cfg.tensor_parallel.extras().get("autotp_size", 0)) <= 1:
        out.append(IgnoredFeature("tensor_parallel", "tensor parallelism is off (autotp_size <= 1)"))
    return out


def _activation_checkpointing(cfg: Config) -> list[IgnoredFeature]:
    ac = cfg.activation_checkpointing
    # cpu_checkpointing and synchronize_checkpoint_boundary are implemented (engine/activation_checkpointing.py)
    reasons = {
        "partition_activations": "needs model parallelism; the engine is data-parallel only",
        "contiguous_memory_optimization": "tunes DeepSpeed's model-parallel buffers, which the engine does not have",
        "profile": "checkpoint profiling is not implemented",
    }
    out = [IgnoredFeature(f"activation_checkpointing.{k}", r) for k, r in reasons.items() if getattr(ac, k)]
    if ac.number_checkpoints is not None:
        out.append(IgnoredFeature("activation_checkpointing.number_checkpoints",
                                  "only used by contiguous_memory_optimization"))
    return out


# zero_optimization keys that only tune DeepSpeed's own implementation: (key, default, reason)
_ZERO_KNOBS: tuple[tuple[str, Any, str], ...] = (
    ("legacy_stage1", False, "there is one stage-1 implementation"),
    ("mics_shard_size", -1, "MiCS sub-group sharding is not implemented; states shard over all ranks"),
    ("mics_hierarchical_params_gather", False, "MiCS is not implemented"),
    ("zero_hpz_partition_size", 1, "ZeRO++ hierarchical partitioning is not implemented"),
    ("leaf_module", None, "ZeRO-3 leaf modules are not used"),
    ("memory_efficient_linear", True, "DeepSpeed-specific linear layer replacement is not used"),
    ("override_module_apply", True, "DeepSpeed-specific hook, not used"),
    ("pipeline_loading_checkpoint", False, "there is no pipeline parallelism"),
    ("log_trace_cache_warnings", False, "there is no trace cache"),
    ("enable_sanity_checks", False, "DeepSpeed's internal checks are not implemented"),
    ("save_muon_momentum_buffer_in_memory", False, "Muon is not implemented"),
    ("stage3_use_all_reduce_for_fetch_params", False, "the engine chooses its own collectives"),
    ("stage3_allgather_sequential", False, "the engine chooses its own collectives"),
    ("stage3_module_granularity_threshold", 0, "not implemented (DeepSpeed hook tuning)"),
    ("use_multi_rank_bucket_allreduce", True, "the engine chooses its own collectives"),
)


def _zero(cfg: Config) -> list[IgnoredFeature]:
    zero = cfg.zero_optimization
    out = [IgnoredFeature(f"zero_optimization.{k}", reason)
           for k, default, reason in _ZERO_KNOBS if getattr(zero, k) != default]
    opt = zero.offload_optimizer
    always = "orch always overlaps swap-file reads and writes with the optimizer update"
    for key, default, reason in (("pipeline_read", False, always),
                                 ("pipeline_write", False, always),
                                 ("fast_init", False, "the swap files are written once at start-up either way"),
                                 ("super_offload", False, "SuperOffload is not implemented"),
                                 ("cpuadam_cores_perc", 0.8, "the CPU optimizer uses torch's threads")):
        if getattr(opt, key) != default:
            out.append(IgnoredFeature(f"zero_optimization.offload_optimizer.{key}", reason))
    return out


# DeepSpeed's aio keys that configure its libaio queue; orch's I/O threads map block_size and
# thread_count x queue_depth (requests in flight) and have no counterpart for these.
_AIO_IGNORED = {"single_submit": "orch's I/O threads submit each request on its own",
                "overlap_events": "orch's I/O threads always overlap submission and completion",
                "use_gds": "GPUDirect Storage is not used; transfers go through pinned host buffers",
                "intra_op_parallelism": "orch's I/O threads split large requests themselves"}


def _aio(cfg: Config) -> list[IgnoredFeature]:
    """``aio``: block_size and thread_count x queue_depth drive the NVMe I/O threads; the rest is noted."""
    if cfg.aio is None:
        return []
    aio = cfg.aio.extras()
    zero = cfg.zero_optimization
    if "nvme" not in (zero.offload_optimizer.device, zero.offload_param.device):
        return [IgnoredFeature("aio", "async I/O settings apply only to NVMe offload (offload_optimizer or "
                                      "offload_param device \"nvme\"), which this config does not use")]
    return [IgnoredFeature(f"aio.{key}", reason) for key, reason in _AIO_IGNORED.items() if key in aio]


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
