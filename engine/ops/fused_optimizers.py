"""FusedAdamW, FusedLion and FusedSGD: torch.optim.Optimizer subclasses over our kernels.

They hold the same per-parameter state, under the same keys, as torch.optim.AdamW / SGD
(``step``, ``exp_avg``, ``exp_avg_sq``; ``momentum_buffer``), so checkpoints move between them
and torch's optimizers in both directions.

``step()`` takes three extras the engine needs to do a whole mixed-precision update in one
pass: ``grad_scale`` (the loss scale to divide out), ``clip_coef`` (the global-norm clip
factor, possibly a GPU tensor: it is read on the device, no host sync) and ``lowp_out`` (the
bf16/fp16 working copies to refresh from the updated fp32 masters). Gradients may be fp32 or
bf16/fp16 whatever the parameters' dtype. After ``step()`` the contents of ``.grad`` are
unspecified (torch's fused CPU kernel unscales fp32 gradients in place).

Parameters are grouped by device, dtypes and step count, and each group is one launch, or
one launch per tensor of a million elements or more: never one launch per small tensor.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .dispatch import check_impl, resolve
from .scaling import GradMultiplier, Scalar
from .torch_impl import adamw_foreach, adamw_fused_cpu, has_fused_cpu_adamw, lion_foreach, sgd_foreach

LowpList = Sequence[torch.Tensor | None] | None


class _FusedOptimizer(torch.optim.Optimizer):
    """The step loop shared by our optimizers: grouping, extras, validation, impl choice."""

    _state_tensor_keys: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        check_impl(defaults["impl"], type(self).__name__)
        super().__init__(params, defaults)
        self._warned_fallback = False

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Any = None,
        *,
        grad_scale: Scalar = None,
        clip_coef: Scalar = None,
        lowp_out: LowpList = None,
    ) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        multiplier = GradMultiplier(grad_scale, clip_coef)
        lowp = self._lowp_by_param(lowp_out)
        for group in self.param_groups:
            buckets: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._check_grad(p)
                state = self.state[p]
                if not state:
                    self._init_state(group, p, state)
                lo = lowp.get(id(p))
                tensors = [p, p.grad, lo, *(state.get(k) for k in self._state_tensor_keys)]
                contiguous = all(t.is_contiguous() for t in tensors if t is not None)
                key = (p.device, p.dtype, p.grad.dtype, None if lo is None else lo.dtype, contiguous, *self._bucket_key(state))
                buckets.setdefault(key, []).append(p)
            for key, params in buckets.items():
                lows = [lowp[id(p)] for p in params] if key[3] is not None else None
                self._update(group, params, lows, multiplier, contiguous=key[4])
        return loss

    # -- per optimizer ------------------------------------------------------------------------
    def _init_state(self, group: dict[str, Any], p: torch.Tensor, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _bucket_key(self, state: dict[str, Any]) -> tuple:
        return ()

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], lowp: list[torch.Tensor] | None,
                multiplier: GradMultiplier, *, contiguous: bool) -> None:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------
    def _impl(self, group: dict[str, Any], device: torch.device, contiguous: bool, torch_fused_ok: bool = False) -> str:
        kind = resolve(group["impl"], device, torch_fused_ok=torch_fused_ok, owner=type(self).__name__)
        if kind == "triton" and not contiguous:
            if not self._warned_fallback:
                warnings.warn(f"{type(self).__name__}: non-contiguous parameters, gradients or state take the torch path", stacklevel=3)
                self._warned_fallback = True
            return "torch"
        return kind

    def _lowp_by_param(self, lowp_out: LowpList) -> dict[int, torch.Tensor]:
        if lowp_out is None:
            return {}
        name = type(self).__name__
        params = [p for group in self.param_groups for p in group["params"]]
        lowp_out = list(lowp_out)
        if len(lowp_out) != len(params):
            raise ValueError(
                f"{name}.step: lowp_out has {len(lowp_out)} tensors but the optimizer holds {len(params)} parameters; "
                "pass one low-precision tensor per parameter, in param_groups order (None skips one)"
            )
        found: dict[int, torch.Tensor] = {}
        for i, (p, lo) in enumerate(zip(params, lowp_out)):
            if lo is None:
                continue
            if not isinstance(lo, torch.Tensor) or not lo.is_floating_point():
                raise TypeError(f"{name}.step: lowp_out[{i}] must be a floating-point tensor, got {type(lo).__name__}")
            if lo.numel() != p.numel() or lo.device != p.device:
                raise ValueError(
                    f"{name}.step: lowp_out[{i}] has {lo.numel()} elements on {lo.device}, "
                    f"but parameter {i} has {p.numel()} on {p.device}"
                )
            found[id(p)] = lo.view(p.shape) if lo.shape != p.shape and lo.is_contiguous() else lo
        return found

    def _check_grad(self, p: torch.Tensor) -> None:
        g = p.grad
        if g.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        if g.numel() != p.numel() or g.device != p.device:
            raise ValueError(
                f"{type(self).__name__}: a gradient has {g.numel()} elements on {g.device} "
                f"for a parameter of {p.numel()} on {p.device}"
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # impl is this machine's choice, not a hyperparameter: a checkpoint does not override it
        impls = [group["impl"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, impl in zip(self.param_groups, impls):
            group["impl"] = impl

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_warned_fallback", False)
        for group in self.param_groups:
            group.setdefault("impl", self.defaults.get("impl", "auto"))
            for flag in ("amsgrad", "maximize"):
                if group.get(flag):
                    raise ValueError(f"{type(self).__name__} cannot load a state with {flag}=True: it implements neither")


class FusedAdamW(_FusedOptimizer):
    """AdamW (or Adam with L2 weight decay when ``adam_w_mode=False``) in one fused pass.

    ``bias_correction=False`` drops Adam's bias correction (DeepSpeed's option). ``impl``:
    "auto" (Triton on CUDA, torch's fused kernel on CPU), "triton", or "torch" (foreach).
    """

    _state_tensor_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        adam_w_mode: bool = True,
        bias_correction: bool = True,
        impl: str = "auto",
    ) -> None:
        _check_hyper("FusedAdamW", lr=lr, eps=eps, weight_decay=weight_decay, betas=betas)
        defaults = dict(lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps, weight_decay=weight_decay,
                        adam_w_mode=bool(adam_w_mode), bias_correction=bool(bias_correction), impl=impl)
        super().__init__(params, defaults)

    def _init_state(self, group: dict[str, Any], p: torch.Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _bucket_key(self, state: dict[str, Any]) -> tuple:
        return (float(state["step"]),)  # a CPU tensor: no device sync

    def _update(self, group, params, lowp, multiplier, *, contiguous):
        states = [self.state[p] for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        step = int(steps[0])
        beta1, beta2 = (float(b) for b in group["betas"])
        hyper = dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
                     weight_decay=float(group["weight_decay"]), adam_w_mode=group["adam_w_mode"])
        grads = [p.grad for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        torch_fused_ok = group["bias_correction"] and has_fused_cpu_adamw()
        kind = self._impl(group, params[0].device, contiguous, torch_fused_ok)
        if kind == "triton":
            from .adamw_kernel import adamw_step

            adamw_step(params, grads, exp_avgs, exp_avg_sqs, lowp, step=step,
                       bias_correction=group["bias_correction"], multiplier=multiplier, **hyper)
        elif kind == "torch-fused":
            adamw_fused_cpu(params, grads, exp_avgs, exp_avg_sqs, steps, lowp, multiplier=multiplier, **hyper)
        else:
            adamw_foreach(params, grads, exp_avgs, exp_avg_sqs, lowp, step=step,
                          bias_correction=group["bias_correction"], multiplier=multiplier, **hyper)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            # a torch.optim.Adam checkpoint says decoupled_weight_decay=False: that is Adam-L2
            group.setdefault("adam_w_mode", bool(group.get("decoupled_weight_decay", True)))
            group.setdefault("bias_correction", True)
            for p in group["params"]:
                p_state = self.state.get(p)
                if p_state and "step" in p_state:
                    # torch's fused/capturable AdamW keeps step on the device; ours lives on the
                    # host so that bias correction never waits for the GPU
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=torch.float32)


class FusedLion(_FusedOptimizer):
    """Lion (sign of an interpolated momentum) in one fused pass; state key ``exp_avg``."""

    _state_tensor_keys = ("exp_avg",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        impl: str = "auto",
    ) -> None:
        _check_hyper("FusedLion", lr=lr, weight_decay=weight_decay, betas=betas)
        super().__init__(params, dict(lr=lr, betas=(float(betas[0]), float(betas[1])), weight_decay=weight_decay, impl=impl))

    def _init_state(self, group, p, state):
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _update(self, group, params, lowp, multiplier, *, contiguous):
        beta1, beta2 = (float(b) for b in group["betas"])
        hyper = dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, weight_decay=float(group["weight_decay"]))
        grads = [p.grad for p in params]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        if self._impl(group, params[0].device, contiguous) == "triton":
            from .lion_kernel import lion_step

            lion_step(params, grads, exp_avgs, lowp, multiplier=multiplier, **hyper)
        else:
            lion_foreach(params, grads, exp_avgs, lowp, multiplier=multiplier, **hyper)


class FusedSGD(_FusedOptimizer):
    """SGD with momentum, dampening, Nesterov and L2 weight decay, torch.optim.SGD's semantics."""

    _state_tensor_keys = ("momentum_buffer",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        impl: str = "auto",
    ) -> None:
        _check_hyper("FusedSGD", lr=lr, weight_decay=weight_decay, momentum=momentum)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("FusedSGD: nesterov=True needs momentum > 0 and dampening = 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=bool(nesterov), impl=impl))

    def _init_state(self, group, p, state):
        pass  # the momentum buffer appears on the first step, as in torch

    def _bucket_key(self, state):
        return ("momentum_buffer" in state,)

    def _update(self, group, params, lowp, multiplier, *, contiguous):
        momentum = float(group["momentum"])
        first_step = False
        buffers = None
        if momentum != 0.0:
            first_step = "momentum_buffer" not in self.state[params[0]]
            if first_step:
                for p in params:
                    self.state[p]["momentum_buffer"] = torch.empty_like(p, memory_format=torch.contiguous_format)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
        hyper = dict(lr=float(group["lr"]), momentum=momentum, dampening=float(group["dampening"]),
                     weight_decay=float(group["weight_decay"]), nesterov=group["nesterov"], first_step=first_step)
        grads = [p.grad for p in params]
        if self._impl(group, params[0].device, contiguous) == "triton":
            from .sgd_kernel import sgd_step

            sgd_step(params, grads, buffers, lowp, multiplier=multiplier, **hyper)
        else:
            sgd_foreach(params, grads, buffers, lowp, multiplier=multiplier, **hyper)


def _check_hyper(owner: str, *, lr: float, weight_decay: float, eps: float | None = None,
                 betas: Sequence[float] | None = None, momentum: float | None = None) -> None:
    if isinstance(lr, torch.Tensor):
        lr = float(lr)
    checks = [("lr", lr, lr >= 0), ("weight_decay", weight_decay, weight_decay >= 0)]
    if eps is not None:
        checks.append(("eps", eps, eps >= 0))
    if momentum is not None:
        checks.append(("momentum", momentum, momentum >= 0))
    for name, value, ok in checks:
        if not ok or (isinstance(value, float) and math.isnan(value)):
            raise ValueError(f"{owner}: {name} must be >= 0, got {value}")
    if betas is not None:
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ValueError(f"{owner}: betas must be two numbers in [0, 1), got {tuple(betas)}")


__all__ = ["FusedAdamW", "FusedLion", "FusedSGD"]
