"""The loss-scale unscale and the clip factor, carried to a kernel without a host sync.

``grad_scale`` divides the gradient and ``clip_coef`` multiplies it. Either may be a Python
number or a one-element tensor; a tensor that lives on the parameters' device is read by the
kernel itself, so a clip factor computed on the GPU never travels to the host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

Scalar = float | int | torch.Tensor | None

NONE, VALUE, POINTER = 0, 1, 2  # how a kernel receives each factor (its GS_MODE / CLIP_MODE)


@dataclass(frozen=True)
class GradMultiplier:
    grad_scale: Scalar = None
    clip_coef: Scalar = None

    def __post_init__(self) -> None:
        for name in ("grad_scale", "clip_coef"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
            elif isinstance(value, (int, float)):
                if not math.isfinite(value) or value <= 0:
                    raise ValueError(f"{name} must be a finite number > 0, got {value}")
            else:
                raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")

    @property
    def is_identity(self) -> bool:
        return self.grad_scale is None and self.clip_coef is None

    def kernel_args(self, device: torch.device) -> dict[str, Any]:
        """Arguments gs_ptr/gs_val/GS_MODE and clip_ptr/clip_val/CLIP_MODE for our kernels."""
        gs_mode, gs_ptr, gs_val = _kernel_form(self.grad_scale, device)
        clip_mode, clip_ptr, clip_val = _kernel_form(self.clip_coef, device)
        return {
            "gs_ptr": gs_ptr, "gs_val": gs_val, "GS_MODE": gs_mode,
            "clip_ptr": clip_ptr, "clip_val": clip_val, "CLIP_MODE": clip_mode,
        }

    def divisor(self, device: torch.device) -> torch.Tensor | None:
        """grad_scale / clip_coef as one fp32 tensor on ``device`` (torch's fused ``grad_scale``)."""
        if self.is_identity:
            return None
        scale = _as_tensor(self.grad_scale, device) if self.grad_scale is not None else None
        clip = _as_tensor(self.clip_coef, device) if self.clip_coef is not None else None
        if clip is None:
            return scale
        return (scale if scale is not None else torch.ones((), device=device)) / clip

    def apply(self, grads: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        """New tensors in ``dtype`` holding grad / grad_scale * clip_coef (the inputs are untouched)."""
        out = [g.to(dtype, copy=True) for g in grads]
        if not out:
            return out
        device = out[0].device
        if self.grad_scale is not None:
            torch._foreach_div_(out, _foreach_scalar(self.grad_scale, device))
        if self.clip_coef is not None:
            torch._foreach_mul_(out, _foreach_scalar(self.clip_coef, device))
        return out


def _kernel_form(value: Scalar, device: torch.device) -> tuple[int, torch.Tensor | None, float]:
    if value is None:
        return NONE, None, 1.0
    if isinstance(value, torch.Tensor):
        if value.device == device:
            return POINTER, value.reshape(()), 1.0
        return VALUE, None, float(value)  # a CPU scalar for GPU params: reading it costs no device sync
    return VALUE, None, float(value)


def _as_tensor(value: Scalar, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.reshape(()).to(device=device, dtype=torch.float32)
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def _foreach_scalar(value: Scalar, device: torch.device) -> float | torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.reshape(()).to(device=device, dtype=torch.float32)
    return float(value)
