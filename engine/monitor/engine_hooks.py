"""What the Engine does for the monitoring sections, kept out of engine.py (which only orchestrates).

``EngineMonitoring.build(config, module, comm)`` reads the ds_config once; the Engine then calls
``forward(global_steps)`` / ``backward()`` around its module and autograd calls and
``after_step(engine)`` at every optimizer step. With no section enabled every call is a cheap
no-op: one attribute test, no context manager.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from .base import MonitorMaster
from .factory import build_monitor

_NO_OP = nullcontext()


@dataclass
class EngineMonitoring:
    monitor: MonitorMaster
    flops_profiler: Any = None   # FlopsProfiler, when flops_profiler.enabled
    comms_logger: Any = None     # CommsLogger, when comms_logger.enabled

    @classmethod
    def build(cls, config: Any, module: Any, comm: Any) -> "EngineMonitoring":
        profiler = logger = None
        if config.flops_profiler.enabled:
            from .flops_profiler import FlopsProfiler

            sync = None
            if comm.backend == "nccl":
                import torch

                sync = torch.cuda.synchronize
            profiler = FlopsProfiler(config.flops_profiler, module, comm.rank, synchronize=sync)
        if config.comms_logger.enabled:
            from .comms_logger import CommsLogger

            logger = CommsLogger(config.comms_logger, comm)
        return cls(build_monitor(config, comm.rank), profiler, logger)

    def forward(self, global_steps: int) -> Any:
        return self.flops_profiler.forward(global_steps) if self.flops_profiler is not None else _NO_OP

    def backward(self) -> Any:
        return self.flops_profiler.backward() if self.flops_profiler is not None else _NO_OP

    def after_step(self, engine: Any) -> None:
        """At an optimizer step: DeepSpeed's per-step events, and the end of a profiled step."""
        if self.monitor.enabled and engine.global_rank == 0:
            samples = engine.global_samples
            events = [("Train/Samples/lr", engine.get_lr()[0], samples)]
            if engine.fp16_enabled():
                events.append(("Train/Samples/loss_scale", float(engine.loss_scale), samples))
            self.monitor.write_events(events)
        if self.flops_profiler is not None:
            self.flops_profiler.end_step()

    def close(self) -> None:
        self.monitor.close()
