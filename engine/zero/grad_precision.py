"""How gradients are summed: in which dtype, and what each rank divides by before the sum.

Why this matters at scale: a bf16 gradient summed over 4 micro-steps and then over N ranks in
bf16 is rounded to 8 mantissa bits at every addition (NCCL's ring adds in the tensor's dtype,
N−1 times). Summing in fp32 keeps the result within fp32 rounding of the exact mean, so
``data_types.grad_accum_dtype`` defaults to fp32: gradient buckets, the reduction and the
buffer the optimizer reads (the rank's partition at stages 2-3, the flat buffer at stages 0-1,
which keep every gradient anyway) are fp32. Cost: 2 bytes more per gradient element a rank
holds, i.e. +2Ψ/N at stages 2-3 and +2Ψ at stages 0-1, plus the bucket buffers at 4 bytes an
element, and 2× the gradient bytes on the wire. ``"bf16"``/``"fp16"`` keep DeepSpeed's default.

Pre-division (DeepSpeed's ``prescale_gradients`` / ``gradient_predivide_factor``): each rank
multiplies its bucket by ``1/predivide`` before the sum, and the step divides by
``world / predivide`` after it, so the product is always ``1/world`` and the result equals the
single-process reference whatever the factor. An fp16 sum would overflow at large N, so fp16
accumulation pre-divides by the world size unless the config names a factor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

__all__ = ["DTYPES", "GradientPrecision", "set_grad_dtype"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class GradientPrecision:
    """``accum_dtype``: the dtype of gradient buckets and of the reduced gradient the step reads.
    ``predivide``: what each rank divides by before the sum (None: the rule in the module docstring)."""

    accum_dtype: Optional[torch.dtype] = torch.float32
    predivide: Optional[float] = None

    @classmethod
    def from_config(cls, cfg: Any, world_size: int) -> "GradientPrecision":
        """From a validated ds_config (``EngineConfig``)."""
        if cfg.prescale_gradients:
            factor: Optional[float] = float(world_size)
        elif cfg.gradient_predivide_factor != 1.0:
            factor = float(cfg.gradient_predivide_factor)
        else:
            factor = None
        return cls(accum_dtype=DTYPES[cfg.grad_accum_dtype], predivide=factor)

    def dtype_for(self, model_dtype: torch.dtype) -> torch.dtype:
        """The accumulation dtype for a model in ``model_dtype`` (fp32 models always sum in fp32)."""
        if model_dtype == torch.float32 or self.accum_dtype is None:
            return model_dtype
        return self.accum_dtype

    def predivide_for(self, model_dtype: torch.dtype, world_size: int) -> float:
        """The factor each rank divides its gradients by before they are summed over ``world_size`` ranks."""
        if world_size <= 1:
            return 1.0
        if self.predivide is not None:
            return self.predivide
        return float(world_size) if self.dtype_for(model_dtype) == torch.float16 else 1.0


def set_grad_dtype(param: torch.nn.Parameter, dtype: torch.dtype) -> None:
    """Make autograd accumulate ``param``'s gradient in ``dtype`` (torch's ``Parameter.grad_dtype``,
    torch >= 2.10), so a bf16 parameter's ``.grad`` may be a view of an fp32 buffer."""
    try:
        param.grad_dtype = dtype
    except (AttributeError, RuntimeError, TypeError) as exc:
        raise RuntimeError(f"data_types.grad_accum_dtype: this torch ({torch.__version__}) cannot keep a "
                           f"{param.dtype} parameter's gradient in {dtype} (needs Parameter.grad_dtype, "
                           "torch >= 2.10); upgrade torch or set grad_accum_dtype to the model's dtype") from exc
