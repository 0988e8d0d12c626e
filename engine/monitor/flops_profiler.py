"""``flops_profiler``: at ``profile_step``, what each module costs: params, FLOPs, latency, TFLOP/s.

DeepSpeed's keys and moment: the step whose ``global_steps`` (optimizer steps already taken)
equals ``profile_step`` is profiled, on rank 0, across all its micro-batches. FLOPs are counted
by torch's ``FlopCounterMode`` (the matmul-class ops: mm, addmm, bmm, convolution, attention),
forward and backward separately, so the model's total can be checked against the analytic count
MFU uses (engine/mfu.py: 6N plus the attention term). CPU attention (``_scaled_dot_product_
flash_attention_for_cpu``) is counted with torch's own SDPA formulas, which FlopCounterMode does
not register for CPU. Forward latency per module comes from forward hooks (on a GPU each
boundary synchronises, as DeepSpeed's profiler does), which is why only one step is profiled.

The report (flops_report.py) goes to ``output_file`` when set, else to standard output.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .flops_profile import ModuleProfile, StepProfile
from .flops_report import write_report


def cpu_attention_formulas() -> dict[Any, Callable[..., int]]:
    """FlopCounterMode formulas for the CPU flash-attention kernels (torch registers GPU ones only)."""
    import torch
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    out: dict[Any, Callable[..., int]] = {}
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None:
        out[fwd] = lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)
    if bwd is not None:
        out[bwd] = (lambda grad_out, q, k, v, *args, out_shape=None, **kwargs:
                    sdpa_backward_flop_count(grad_out, q, k, v))
    return out


class FlopsProfiler:
    """Profiles one training step of ``model``; the engine calls the ``forward``/``backward`` contexts
    and ``end_step`` at the optimizer step."""

    def __init__(self, section: Any, model: Any, rank: int, synchronize: Callable[[], None] | None = None,
                 out: Callable[[str], None] | None = None) -> None:
        self.section, self.model, self.rank = section, model, rank
        self.profile_step = int(section.profile_step)
        self.result: StepProfile | None = None
        self._sync = synchronize
        self._out = out
        self._active = False
        self._hooks: list[Any] = []
        self._entries: dict[int, ModuleProfile] = {}
        self._started = 0.0

    def active_at(self, global_steps: int) -> bool:
        """Whether the step about to run (``global_steps`` taken so far) is the profiled one."""
        if self._active:
            return True
        if self.rank != 0 or self.result is not None or global_steps != self.profile_step:
            return False
        self._begin(global_steps)
        return True

    @contextmanager
    def forward(self, global_steps: int) -> Iterator[None]:
        if not self.active_at(global_steps):
            yield
            return
        with self._counted("fwd"):
            yield

    @contextmanager
    def backward(self) -> Iterator[None]:
        if not self._active:
            yield
            return
        with self._counted("bwd"):
            yield

    def end_step(self) -> StepProfile | None:
        """At the optimizer step: finish the profile, write the report, remove the hooks."""
        if not self._active:
            return None
        self._synchronize()
        assert self.result is not None
        self.result.step_latency_s = time.perf_counter() - self._started
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._active = False
        write_report(self.result, self.section, self._out)
        return self.result

    # -- internals ---------------------------------------------------------------------------
    def _begin(self, global_steps: int) -> None:
        modules = []
        for name, module in self.model.named_modules():
            entry = ModuleProfile(name, type(module).__name__, name.count(".") + 1 if name else 0,
                                  sum(_numel(p) for p in module.parameters()))
            self._entries[id(module)] = entry
            modules.append(entry)
            self._hooks.append(module.register_forward_pre_hook(self._pre_hook))
            self._hooks.append(module.register_forward_hook(self._post_hook))
        self.result = StepProfile(global_steps, modules)
        self._active = True
        self._synchronize()
        self._started = time.perf_counter()

    @contextmanager
    def _counted(self, phase: str) -> Iterator[None]:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False, depth=None, custom_mapping=cpu_attention_formulas())
        self._phase = phase
        self._synchronize()
        start = time.perf_counter()
        with counter:
            yield
        self._synchronize()
        self._phase = ""
        self._add(phase, counter, time.perf_counter() - start)

    def _add(self, phase: str, counter: Any, seconds: float) -> None:
        result = self.result
        assert result is not None
        counts = counter.get_flop_counts()
        total = int(counter.get_total_flops())
        for op, flops in counts.get("Global", {}).items():
            result.flops_by_op[str(op)] = result.flops_by_op.get(str(op), 0) + int(flops)
        if phase == "bwd":
            result.bwd_flops += total
            result.bwd_latency_s += seconds
            return
        result.fwd_flops += total
        result.fwd_latency_s += seconds
        root = type(self.model).__name__
        for entry in result.modules:
            key = f"{root}.{entry.name}" if entry.name else root
            entry.fwd_flops += int(sum(counts.get(key, {}).values()))

    def _pre_hook(self, module: Any, args: Any) -> None:
        if getattr(self, "_phase", "") == "fwd":
            self._synchronize()
            module.__dict__["_orch_fwd_start"] = time.perf_counter()

    def _post_hook(self, module: Any, args: Any, output: Any) -> None:
        start = module.__dict__.pop("_orch_fwd_start", None)
        if start is not None:
            self._synchronize()
            self._entries[id(module)].fwd_latency_s += time.perf_counter() - start

    def _synchronize(self) -> None:
        if self._sync is not None:
            self._sync()


def _numel(p: Any) -> int:
    """A parameter's full size, also when ZeRO-3 has partitioned it (DeepSpeed's ``ds_numel``)."""
    return int(p.__dict__.get("ds_numel", p.numel()))
