"""The public face: ``initialize``, ``init_distributed`` and ``add_config_arguments``.

Signatures follow DeepSpeed's so that a script changes ``import deepspeed`` to ``import engine``
and nothing else. ``initialize`` is where the pieces meet: the validated ds_config, the process
group, the precision policy, the ZeRO optimizer over the model's parameter groups, the LR
schedule and (optionally) a distributed data loader.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn
from torch.optim import Optimizer

from . import activation_checkpointing
from .comm import Comm, init_distributed, select_device
from .config import ConfigError, ConfigProblem, EngineConfig, load_config
from .engine import Engine
from .log import get_logger
from .optimizers import build_optimizer, rebind_optimizer
from .precision import build_loss_scaler, precision_policy
from .schedulers import build_scheduler
from .zero.grad_precision import GradientPrecision
from .zero.host_threads import apply_host_optimizer_threads
from .zero.nvme import NvmeOptimizerSwap, NvmeSettings
from .zero.nvme_params import NvmeParamSettings
from .zero.offload import OffloadSettings
from .zero.stage12 import Stage12Optimizer, ZeroSettings
from .zero.stage3 import Stage3Optimizer, Stage3Settings
from .zero.stage3_shards import materialize

__all__ = ["add_config_arguments", "init_distributed", "initialize"]

log = get_logger()

OptimizerArg = Union[Optimizer, Callable[[Iterable[Any]], Optimizer], None]


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--deepspeed``, ``--deepspeed_config`` (alias ``--engine_config``) as DeepSpeed does."""
    group = parser.add_argument_group("engine", "DeepSpeed-compatible engine configuration")
    group.add_argument("--deepspeed", default=False, action="store_true",
                       help="enable the engine (accepted for DeepSpeed scripts; always on)")
    group.add_argument("--deepspeed_config", "--engine_config", dest="deepspeed_config", default=None,
                       type=str, help="path to the ds_config JSON file")
    return parser


def initialize(args: Any = None, model: Optional[nn.Module] = None, optimizer: OptimizerArg = None,
               model_parameters: Optional[Iterable[Any]] = None, training_data: Any = None,
               lr_scheduler: Any = None, distributed_port: int = 29500, mpu: Any = None,
               dist_init_required: Optional[bool] = None, collate_fn: Optional[Callable[..., Any]] = None,
               config: Any = None, config_params: Any = None
               ) -> tuple[Engine, Union[Stage12Optimizer, Stage3Optimizer], Any, Any]:
    """Wrap ``model`` for ZeRO training; returns ``(engine, optimizer, dataloader, lr_scheduler)``.

    ``config`` is a ds_config path, JSON text or dict (``config_params`` is DeepSpeed's older
    name; ``args.deepspeed_config`` works too). ``optimizer`` may be a torch optimizer (its
    class and hyperparameters are kept), a callable taking parameter groups, or None to build
    the config's ``optimizer`` section. ``mpu`` (model parallelism) is not supported.
    """
    if model is None:
        raise TypeError("engine.initialize() needs model=: the torch.nn.Module to train")
    if mpu is not None:
        raise ValueError("engine.initialize(mpu=...): model parallelism is not supported by orch's engine; "
                         "remove mpu (data parallelism with ZeRO is used)")
    source = _config_source(args, config if config is not None else config_params)
    init_distributed(distributed_port=distributed_port, dist_init_required=dist_init_required, verbose=False)
    comm = Comm()
    cfg = load_config(source, world_size=comm.world_size)
    _log_config_notes(cfg, comm)
    device = select_device()   # also when the script made the process group itself
    policy = precision_policy(cfg.precision)
    if cfg.zero_optimization.stage < 3:
        model.to(device=device)    # the Init pieces are gathered on the group's device (NCCL: the GPU)
        materialize(model, comm)   # built under engine.zero.Init: stages 0-2 need the whole model
    model.to(device=device, dtype=policy.model_dtype if policy.mixed else None)
    groups = _param_groups(model, optimizer, model_parameters)
    zero = _zero_optimizer(cfg, model, groups, _optimizer_factory(optimizer, cfg), comm, policy.model_dtype, device)
    _broadcast_buffers(model, comm)
    scheduler = _scheduler(cfg, lr_scheduler, zero)
    batch = cfg.batch or cfg.resolve_batch(comm.world_size)
    dataloader = _dataloader(training_data, batch.micro, collate_fn, cfg, comm) if training_data is not None else None
    activation_checkpointing.configure(deepspeed_config=cfg)
    engine = Engine(model, zero, scheduler, cfg, batch, comm, device, policy, dataloader)
    return engine, zero, dataloader, scheduler


def _config_source(args: Any, config: Any) -> Any:
    from_args = None
    if args is not None:
        from_args = getattr(args, "deepspeed_config", None) or getattr(args, "engine_config", None)
    if config is not None and from_args is not None and str(from_args) != str(config):
        raise ValueError(f"two ds_configs given: config={config!r} and --deepspeed_config {from_args!r}; "
                         "pass only one")
    source = config if config is not None else from_args
    if source is None:
        raise ValueError("no ds_config: pass engine.initialize(config=\"ds_config.json\") (a path or dict), "
                         "or --deepspeed_config with engine.add_config_arguments(parser)")
    return source


def _log_config_notes(cfg: EngineConfig, comm: Comm) -> None:
    if comm.rank != 0:
        return
    for note in cfg.migrations:
        log.info(f"config: {note}")
    for feature in cfg.ignored_features():
        log.info(f"config: {feature}")
    offload = OffloadSettings.from_config(cfg.zero_optimization)
    if offload.any:
        where = " and ".join(k for k, on in (("optimizer states", offload.optimizer), ("parameters", offload.param))
                             if on)
        log.info(f"config: ZeRO-{cfg.zero_optimization.stage} offload: {where} in CPU memory"
                 f"{', pinned' if offload.pinned() else ''}")
    nvme = NvmeSettings.from_config(cfg.zero_optimization, cfg.aio)
    if nvme is not None:
        log.info(f"config: optimizer states (fp32 master, optimizer state) in swap files under {nvme.path}, "
                 f"streamed through {nvme.buffer_count} buffers by {nvme.threads} I/O threads")
    params = NvmeParamSettings.from_config(cfg.zero_optimization, cfg.aio)
    if params is not None:
        log.info(f"config: stage-3 parameter partitions in swap files under {params.path} (the first "
                 f"{params.max_in_cpu:,} elements per rank stay in host memory: max_in_cpu), read ahead through "
                 f"{params.buffer_count} buffers of at most {params.buffer_size:,} elements")


def _zero_optimizer(cfg: EngineConfig, model: nn.Module, groups: Any, make_optimizer: Any, comm: Comm,
                    model_dtype: torch.dtype, device: torch.device) -> Union[Stage12Optimizer, Stage3Optimizer]:
    """Stage 3's optimizer or stages 0-2's, from the config's ``zero_optimization`` section."""
    offload = OffloadSettings.from_config(cfg.zero_optimization)
    if offload.optimizer:
        apply_host_optimizer_threads(rank=comm.rank)
    common = dict(comm=comm, model_dtype=model_dtype, loss_scaler=build_loss_scaler(cfg), device=device,
                  offload=offload, grads=GradientPrecision.from_config(cfg, comm.world_size))
    if cfg.zero_optimization.stage == 3:
        opt = Stage3Optimizer(groups, make_optimizer, module=model, settings=_stage3_settings(cfg),
                              nvme_param=NvmeParamSettings.from_config(cfg.zero_optimization, cfg.aio), **common)
    else:
        opt = Stage12Optimizer(groups, make_optimizer, settings=_zero_settings(cfg), **common)
    nvme = NvmeSettings.from_config(cfg.zero_optimization, cfg.aio)
    if nvme is not None:          # offload_optimizer.device "nvme": the states move to swap files
        opt.nvme = NvmeOptimizerSwap(opt, nvme)
    return opt


def _zero_settings(cfg: EngineConfig) -> ZeroSettings:
    z = cfg.zero_optimization
    return ZeroSettings(stage=z.stage, reduce_bucket_size=int(z.reduce_bucket_size),
                        allgather_bucket_size=int(z.allgather_bucket_size), overlap_comm=bool(z.overlap_comm),
                        gradient_clipping=float(cfg.gradient_clipping))


def _stage3_settings(cfg: EngineConfig) -> Stage3Settings:
    z = cfg.zero_optimization
    return Stage3Settings(
        stage=3, reduce_bucket_size=int(z.reduce_bucket_size), allgather_bucket_size=int(z.allgather_bucket_size),
        overlap_comm=bool(z.overlap_comm), gradient_clipping=float(cfg.gradient_clipping),
        prefetch_bucket_size=int(z.stage3_prefetch_bucket_size),
        param_persistence_threshold=int(z.stage3_param_persistence_threshold),
        model_persistence_threshold=int(min(z.stage3_model_persistence_threshold, 2**63 - 1)),
        max_live_parameters=int(z.stage3_max_live_parameters), max_reuse_distance=int(z.stage3_max_reuse_distance),
        hold_tied_params=bool(z.stage3_hold_tied_params),
        gather_16bit_weights_on_model_save=bool(z.stage3_gather_16bit_weights_on_model_save))


def _param_groups(model: nn.Module, optimizer: OptimizerArg,
                  model_parameters: Optional[Iterable[Any]]) -> list[tuple[dict[str, Any], list[tuple[str, Any]]]]:
    """``(hyperparameters, [(name, param)])`` per group, trainable parameters only."""
    if isinstance(optimizer, Optimizer):
        raw = [dict(g) for g in optimizer.param_groups]
    else:
        params = list(model_parameters) if model_parameters is not None else list(model.parameters())
        raw = [dict(g) for g in params] if params and isinstance(params[0], dict) else [{"params": params}]
    names = {id(p): n for n, p in model.named_parameters()}
    seen: set[int] = set()
    groups = []
    for g in raw:
        params = g.pop("params")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        named = []
        for p in params:
            if id(p) in seen:
                raise ValueError(f"parameter {names.get(id(p), '?')!r} appears in two parameter groups")
            seen.add(id(p))
            if p.requires_grad:
                named.append((names.get(id(p), f"param_{len(seen) - 1}"), p))
        groups.append((g, named))
    if not any(named for _, named in groups):
        raise ValueError("engine.initialize: the model has no trainable parameters (requires_grad=True)")
    return groups


def _optimizer_factory(optimizer: OptimizerArg, cfg: EngineConfig) -> Callable[[list[dict[str, Any]]], Optimizer]:
    if optimizer is not None and cfg.optimizer is not None:
        raise ConfigError([ConfigProblem("optimizer", "an optimizer was passed to engine.initialize() and the "
                                         "ds_config has an 'optimizer' section", "remove one of the two")])
    if isinstance(optimizer, Optimizer):
        return lambda groups: rebind_optimizer(optimizer, groups)
    if callable(optimizer):
        return optimizer
    if cfg.optimizer is not None:
        return lambda groups: build_optimizer(cfg.optimizer, groups)
    raise ConfigError([ConfigProblem("optimizer", "no optimizer: the ds_config has no 'optimizer' section and "
                                     "none was passed to engine.initialize()",
                                     "add e.g. {\"optimizer\": {\"type\": \"AdamW\", \"params\": {\"lr\": 1e-4}}}")])


def _scheduler(cfg: EngineConfig, client: Any, zero: Any) -> Any:
    """The config's schedule wins over the client's, as in DeepSpeed; a callable gets the optimizer."""
    if cfg.scheduler is not None:
        return build_scheduler(cfg.scheduler, zero.optimizer)
    if client is not None and callable(client) and not hasattr(client, "step"):
        return client(zero.optimizer)
    return client


def _broadcast_buffers(model: nn.Module, comm: Comm) -> None:
    """Start every rank from rank 0's buffers too (running statistics, etc.)."""
    for buf in model.buffers():
        comm.broadcast(buf.data, src=0)


def _dataloader(data: Any, micro: int, collate_fn: Any, cfg: EngineConfig, comm: Comm) -> Any:
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(data, num_replicas=comm.world_size, rank=comm.rank) if comm.world_size > 1 else None
    return DataLoader(data, batch_size=micro, sampler=sampler, shuffle=False, collate_fn=collate_fn,
                      drop_last=cfg.dataloader_drop_last)
