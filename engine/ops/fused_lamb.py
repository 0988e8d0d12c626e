"""FusedLamb: DeepSpeed's ``"type": "Lamb"`` optimizer over our kernels.

Same hyperparameters and defaults as ``deepspeed.ops.lamb.FusedLamb`` (``max_coeff`` 10,
``min_coeff`` 0.01, ``bias_correction``, ``eps_inside_sqrt``, L2-style ``weight_decay`` added
to the update before the trust ratio) and the same state keys as our AdamW (``step``,
``exp_avg``, ``exp_avg_sq``), so checkpoints look alike. ``step()`` takes the engine's
extras (``grad_scale``, ``clip_coef``, ``lowp_out``) like every optimizer in engine.ops.

The trust ratio is per parameter. Handed a flat ZeRO partition, the engine first calls
``set_segments`` to say where each parameter lies in it (see ``segments.py``); the Triton
path then takes two launches per step whatever the number of parameters.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .fused_optimizers import LowpList, _check_hyper, _FusedOptimizer
from .scaling import Scalar
from .lamb_torch import lamb_torch
from .segments import SegmentPlan, SegmentSpec


class FusedLamb(_FusedOptimizer):
    """LAMB with DeepSpeed FusedLamb's update rule; ``impl`` as for ``FusedAdamW``."""

    _state_tensor_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eps_inside_sqrt: bool = False,
        weight_decay: float = 0.0,
        max_coeff: float = 10.0,
        min_coeff: float = 0.01,
        impl: str = "auto",
    ) -> None:
        _check_hyper("FusedLamb", lr=lr, eps=eps, weight_decay=weight_decay, betas=betas)
        if not 0 <= min_coeff <= max_coeff:
            raise ValueError(f"FusedLamb: need 0 <= min_coeff <= max_coeff, got min_coeff={min_coeff}, max_coeff={max_coeff}")
        defaults = dict(lr=lr, bias_correction=bool(bias_correction), betas=(float(betas[0]), float(betas[1])), eps=eps,
                        eps_inside_sqrt=bool(eps_inside_sqrt), weight_decay=weight_decay,
                        max_coeff=float(max_coeff), min_coeff=float(min_coeff), impl=impl)
        super().__init__(params, defaults)
        self._specs: dict[int, SegmentSpec] = {}
        self._plans: dict[tuple, SegmentPlan] = {}
        self.lamb_coeffs: list[torch.Tensor] = []

    def set_segments(self, param: torch.Tensor, spec: SegmentSpec) -> None:
        """Give ``param`` (a flat tensor holding several parameters) per-parameter trust ratios."""
        self._specs[id(param)] = spec
        self._plans.clear()

    def get_lamb_coeffs(self) -> list[float]:
        """The last step's coefficients, one per segment (DeepSpeed's method; syncs with the device)."""
        return [float(c) for coeffs in self.lamb_coeffs for c in coeffs.tolist()]

    def step(self, closure: Any = None, *, grad_scale: Scalar = None, clip_coef: Scalar = None,  # type: ignore[override]
             lowp_out: LowpList = None) -> Any:
        self.lamb_coeffs = []
        return super().step(closure, grad_scale=grad_scale, clip_coef=clip_coef, lowp_out=lowp_out)

    def _init_state(self, group: dict[str, Any], p: torch.Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _bucket_key(self, state: dict[str, Any]) -> tuple:
        return (float(state["step"]),)

    def _plan(self, params: list[torch.Tensor]) -> SegmentPlan:
        key = tuple((id(p), p.numel()) for p in params)
        if key not in self._plans:
            self._plans[key] = SegmentPlan.build(params, [self._specs.get(id(p)) for p in params])
        return self._plans[key]

    def _update(self, group, params, lowp, multiplier, *, contiguous):
        states = [self.state[p] for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        beta1, beta2 = (float(b) for b in group["betas"])
        hyper = dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
                     weight_decay=float(group["weight_decay"]), step=int(steps[0]),
                     max_coeff=group["max_coeff"], min_coeff=group["min_coeff"],
                     bias_correction=group["bias_correction"], eps_inside_sqrt=group["eps_inside_sqrt"],
                     multiplier=multiplier)
        lists = (self._plan(params), params, [p.grad for p in params], [s["exp_avg"] for s in states],
                 [s["exp_avg_sq"] for s in states], lowp)
        if self._impl(group, params[0].device, contiguous) == "triton":
            from .lamb_kernel import lamb_step

            self.lamb_coeffs.append(lamb_step(*lists, **hyper))
        else:
            self.lamb_coeffs.append(lamb_torch(*lists, **hyper))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_specs", {})
        self.__dict__.setdefault("_plans", {})
        self.__dict__.setdefault("lamb_coeffs", [])
