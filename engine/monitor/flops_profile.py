"""What a FLOPs profile holds: one record per module and the step's totals (shared by the
profiler that fills it and the report that prints it)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModuleProfile:
    """One module of the profiled step (names as ``model.named_modules()``: "" is the model)."""

    name: str
    type: str
    depth: int
    params: int
    fwd_flops: int = 0
    fwd_latency_s: float = 0.0

    @property
    def fwd_tflops_per_s(self) -> float:
        return self.fwd_flops / self.fwd_latency_s / 1e12 if self.fwd_latency_s > 0 else 0.0


@dataclass
class StepProfile:
    """The profiled step: totals and one entry per module."""

    step: int
    modules: list[ModuleProfile]
    fwd_flops: int = 0
    bwd_flops: int = 0
    fwd_latency_s: float = 0.0
    bwd_latency_s: float = 0.0
    step_latency_s: float = 0.0
    flops_by_op: dict[str, int] = field(default_factory=dict)

    @property
    def total_flops(self) -> int:
        return self.fwd_flops + self.bwd_flops

    @property
    def params(self) -> int:
        return self.modules[0].params if self.modules else 0
