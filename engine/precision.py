"""Training precision: which dtypes the model and master weights use, and fp16 loss scaling.

fp16 gradients underflow unless the loss is multiplied by a large factor before backward
("loss scale") and the gradients divided by it afterwards. A fixed factor either underflows
or overflows as training goes on, so DeepSpeed adjusts it: ``DynamicLossScaler`` below has
DeepSpeed's semantics exactly (deepspeed/runtime/fp16/loss_scaler.py), so that a ds_config's
``fp16`` section trains the same way here:

* start at ``2**initial_scale_power``;
* a step whose gradients hold inf/NaN is skipped ("overflow");
* an overflow first spends one unit of ``hysteresis``; when none is left the scale is halved
  (never below ``min_loss_scale``); an overflow *at* the minimum is an error, because the run
  cannot make progress;
* after ``loss_scale_window`` consecutive clean steps the scale doubles and hysteresis is
  refilled; with ``consecutive_hysteresis`` every clean step refills it.

bf16 has fp32's exponent range, so it needs no scaling; fp32 needs none either. Both use
``StaticLossScaler(1.0)`` so the engine treats every precision the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = [
    "DynamicLossScaler", "LossScaleError", "LossScaler", "PrecisionPolicy", "StaticLossScaler",
    "build_loss_scaler", "precision_policy",
]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class PrecisionPolicy:
    """The dtypes of one training precision.

    model_dtype: the module's parameters, forward/backward and gradient reduction (2 bytes per
        element in fp16/bf16: the ZeRO paper's "2Ψ" for parameters and gradients).
    master_dtype: the optimizer's copy of the weights and its states (always fp32).
    """

    name: str
    model_dtype: torch.dtype
    master_dtype: torch.dtype = torch.float32

    @property
    def mixed(self) -> bool:
        return self.model_dtype != self.master_dtype


def precision_policy(name: str) -> PrecisionPolicy:
    """``"fp32" | "fp16" | "bf16"`` (the config's ``precision``) -> its dtypes."""
    try:
        return PrecisionPolicy(name, _DTYPES[name])
    except KeyError:
        raise ValueError(f"unknown precision {name!r}; expected one of {', '.join(_DTYPES)}") from None


class LossScaleError(RuntimeError):
    """fp16 gradients overflow even at ``min_loss_scale``: training cannot continue."""


class LossScaler(Protocol):
    """What the engine needs from a loss scaler (and what a checkpoint saves)."""

    @property
    def loss_scale(self) -> float: ...

    @property
    def dynamic(self) -> bool: ...

    def update(self, overflow: bool) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StaticLossScaler:
    """A fixed loss scale (fp16 ``loss_scale`` > 0), or 1.0 for bf16/fp32."""

    dynamic = False

    def __init__(self, scale: float = 1.0) -> None:
        self._scale = float(scale)

    @property
    def loss_scale(self) -> float:
        return self._scale

    def update(self, overflow: bool) -> None:
        """A static scale never changes; the overflowing step is still skipped by the engine."""

    def state_dict(self) -> dict[str, Any]:
        return {"loss_scale": self._scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._scale = float(state["loss_scale"])


class DynamicLossScaler:
    """DeepSpeed's dynamic loss scale state machine (see the module docstring)."""

    dynamic = True
    factor = 2.0

    def __init__(self, init_scale: float = 2.0 ** 16, scale_window: int = 1000, min_scale: float = 1.0,
                 hysteresis: int = 2, consecutive_hysteresis: bool = False,
                 raise_error_at_min_scale: bool = True) -> None:
        if scale_window < 1 or hysteresis < 1 or min_scale <= 0:
            raise ValueError("fp16 loss scaling needs loss_scale_window >= 1, hysteresis >= 1 and "
                             f"min_loss_scale > 0 (got {scale_window}, {hysteresis}, {min_scale})")
        self.scale = float(init_scale)
        self.scale_window = int(scale_window)
        self.min_scale = float(min_scale)
        self.hysteresis = int(hysteresis)
        self.consecutive_hysteresis = bool(consecutive_hysteresis)
        self.raise_error_at_min_scale = raise_error_at_min_scale
        self.hysteresis_left = self.hysteresis
        self.iteration = 0                 # updates seen so far
        self.last_overflow_iteration = -1

    @property
    def loss_scale(self) -> float:
        return self.scale

    def update(self, overflow: bool) -> None:
        """Advance one optimizer step; ``overflow`` says whether its gradients held inf/NaN."""
        if overflow:
            self._on_overflow()
        else:
            self._on_clean_step()
        self.iteration += 1

    def _on_overflow(self) -> None:
        if self.hysteresis > 1 and self.hysteresis_left > 1:
            self.hysteresis_left -= 1      # tolerate it: keep the scale this time
        elif self.scale == self.min_scale and self.raise_error_at_min_scale:
            raise LossScaleError(
                f"fp16 gradients overflow even at the minimum loss scale {self.min_scale:g}, so no "
                "step can be taken. Lower the learning rate, check the data/model for inf/NaN, "
                "lower fp16.min_loss_scale, or train in bf16 (\"bf16\": {\"enabled\": true}).")
        else:
            self.scale = max(self.scale / self.factor, self.min_scale)
        self.last_overflow_iteration = self.iteration

    def _on_clean_step(self) -> None:
        if self.consecutive_hysteresis:
            self.hysteresis_left = self.hysteresis
        clean_run = self.iteration - self.last_overflow_iteration - 1
        if clean_run > 0 and clean_run % self.scale_window == 0:
            if not self.consecutive_hysteresis:
                self.hysteresis_left = self.hysteresis
            self.scale *= self.factor

    def state_dict(self) -> dict[str, Any]:
        return {"loss_scale": self.scale, "hysteresis_left": self.hysteresis_left, "iteration": self.iteration,
                "last_overflow_iteration": self.last_overflow_iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["loss_scale"])
        self.hysteresis_left = int(state["hysteresis_left"])
        self.iteration = int(state["iteration"])
        self.last_overflow_iteration = int(state["last_overflow_iteration"])


def build_loss_scaler(cfg: Any) -> LossScaler:
    """The scaler a validated config asks for (``cfg`` is an ``EngineConfig``)."""
    fp16 = cfg.fp16
    if cfg.precision != "fp16":
        return StaticLossScaler(1.0)
    if fp16.loss_scale > 0:
        return StaticLossScaler(fp16.loss_scale)
    return DynamicLossScaler(init_scale=2.0 ** fp16.initial_scale_power, scale_window=fp16.loss_scale_window,
                             min_scale=fp16.min_loss_scale, hysteresis=fp16.hysteresis,
                             consecutive_hysteresis=fp16.consecutive_hysteresis)
