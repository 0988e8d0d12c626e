"""How gradients are summed: in which dtype, and what each rank divides by before the sum.

Why this matters at scale: a bf16 gradient summed over 4 micro-steps and then over N ranks in
bf16 is rounded to 8 mantissa bits at every addition (NCCL's ring adds in the tensor's dtype,
N−1 times). Summing in fp32 keeps the result within fp32 rounding of the exact mean, so
``data_types.grad_accum_dtype`` defaults to fp32: gradient buckets, the reduction and the
buffer the optimizer reads (the rank's partition at stages 2-3, the flat buffer at stages 0-1,
which keep every gradient anyway) are fp32. Cost: 2 bytes more per gradient element a rank
holds, i.e. +2Ψ/N at stages 2-3 and +2Ψ at stages 0-1, plus the bucket buffers at 4 bytes an
element, and 2× the gradient bytes on the wire. ``"bf16"``/``"fp16"`` keep DeepSpeed's default.

``communication_data_type`` (DeepSpeed's key, ZeRO stages 1-3) sets the dtype gradients travel in
apart from the one they accumulate in: each bucket is cast into a staging buffer of that dtype,
reduced there, and the rank's reduced share is added (or copied) into its gradient partition in the
accumulation dtype. ``"bf16"`` with fp32 accumulation halves the bytes on the wire at the price of
one bf16 rounding of each rank's contribution and of the ring's partial sums; stage 0 reduces in
the accumulation dtype (config/features.py says so).

Pre-division (DeepSpeed's ``prescale_gradients`` / ``gradient_predivide_factor``): each rank
multiplies its bucket by ``1/predivide`` before the sum, and the step divides by
``world / predivide`` after it, so the product is always ``1/world`` and the result equals the
single-process reference whatever the factor. An fp16 sum would overflow at large N, so an fp16
reduction pre-divides by the world size unless the config names a factor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

__all__ = ["DTYPES", "GradientPrecision", "set_grad_dtype"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class GradientPrecision:
    """``accum_dtype``: the dtype gradients accumulate in and the step reads. ``comm_dtype``: the
    dtype they are reduced in at stages 1-3 (None: the accumulation dtype). ``predivide``: what each
    rank divides by before the sum (None: the rule in the module docstring)."""

    accum_dtype: Optional[torch.dtype] = torch.float32
    predivide: Optional[float] = None
    comm_dtype: Optional[torch.dtype] = None

    @classmethod
    def from_config(cls, cfg: Any, world_size: int) -> "GradientPrecision":
        """From a validated ds_config (``EngineConfig``)."""
        if cfg.prescale_gradients:
            factor: Optional[float] = float(world_size)
        elif cfg.gradient_predivide_factor != 1.0:
            factor = float(cfg.gradient_predivide_factor)
        else:
            factor = None
        comm = cfg.communication_data_type
        return cls(accum_dtype=DTYPES[cfg.grad_accum_dtype], predivide=factor,
                   comm_dtype=DTYPES[comm] if comm is not None else None)

    def dtype_for(self, model_dtype: torch.dtype) -> torch.dtype:
        """The accumulation dtype for a model in ``model_dtype`` (fp32 models always sum in fp32)."""
        if model_dtype == torch.float32 or self.accum_dtype is None:
            return model_dtype
        return self.accum_dtype

    def reduce_dtype_for(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype gradients are reduced in at stages 1-3 (``communication_data_type``, else the
        accumulation dtype)."""
        return self.comm_dtype if self.comm_dtype is not None else self.dtype_for(model_dtype)

    def predivide_for(self, model_dtype: torch.dtype, world_size: int, stage: int = 1) -> float:
        """The factor each rank divides its gradients by before they are summed over ``world_size`` ranks."""
        if world_size <= 1:
            return 1.0
        if self.predivide is not None:
            return self.predivide
        reduced = self.reduce_dtype_for(model_dtype) if stage >= 1 else self.dtype_for(model_dtype)
        return float(world_size) if reduced == torch.float16 else 1.0


def set_grad_dtype(param: torch.nn.Parameter, dtype: torch.dtype) -> None:
    """Make autograd accumulate ``param``'s gradient in ``dtype`` (torch's ``Parameter.grad_dtype``,
    torch >= 2.10), so a bf16 parameter's ``.grad`` may be a view of an fp32 buffer."""
    try:
        param.grad_dtype = dtype
    except (AttributeError, RuntimeError, TypeError) as exc:
        raise RuntimeError(f"data_types.grad_accum_dtype: this torch ({torch.__version__}) cannot keep a "
                           f"{param.dtype} parameter's gradient in {dtype} (needs Parameter.grad_dtype, "
                           "torch >= 2.10); upgrade torch or set grad_accum_dtype to the model's dtype") from exc
