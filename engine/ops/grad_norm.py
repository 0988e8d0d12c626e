"""``grad_norm_and_overflow``: the global gradient norm and the inf/nan check in one pass.

It feeds the clip factor (``min(1, max_norm / (norm + eps))``, computed on the device) and the
fp16 skip-step decision, which is the only place a host sync is needed.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .dispatch import resolve


def grad_norm_and_overflow(
    tensors: Sequence[torch.Tensor], norm_type: float = 2.0, *, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total_norm, found_inf): 0-dim fp32 tensors on the tensors' device.

    ``found_inf`` is 1.0 when any element is inf or nan (then the norm is not finite either),
    else 0.0. Nothing is read back to the host. ``impl``: "auto" (Triton on CUDA, torch on
    CPU), "triton" or "torch".
    """
    tensors = [t for t in tensors if t is not None]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"grad_norm_and_overflow: tensors[{i}] must be a floating-point tensor")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"grad_norm_and_overflow: all tensors must be on one device, got {sorted(map(str, devices))}")
    _check_norm_type(norm_type)
    nonempty = [t for t in tensors if t.numel() > 0]
    if not nonempty:
        device = tensors[0].device if tensors else torch.device("cpu")
        zero = torch.zeros((), dtype=torch.float32, device=device)
        return zero, zero.clone()
    device = nonempty[0].device
    if resolve(impl, device, owner="grad_norm_and_overflow") == "triton":
        from .norm_kernel import norm_and_overflow

        return norm_and_overflow(nonempty, norm_type)
    from .torch_impl import norm_and_overflow as torch_norm

    return torch_norm(nonempty, norm_type)


def _check_norm_type(norm_type: float) -> None:
    p = float(norm_type)
    if not p > 0:  # also rejects nan
        raise ValueError(f"grad_norm_and_overflow: norm_type must be a positive number or inf, got {norm_type}")
