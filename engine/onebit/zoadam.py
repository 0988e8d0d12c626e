"""ZeroOneAdam: DeepSpeed's ``"type": "ZeroOneAdam"`` (0/1 Adam, arXiv:2202.06009), the update
rule as DeepSpeed's runtime/fp16/onebit/zoadam.py ran it (removed from DeepSpeed in 0.19, like
1-bit Adam; its last form is the reference). Steps are counted from 1, DeepSpeed's way:

- step 1 only sets up state (the "initialization step": no update is applied);
- *variance phase* (up to step ``var_freeze_step + 1``): a step ``t`` with ``t % var_interval
  == 0`` is a variance step: the engine all-reduces the gradients, and ``v`` and ``m`` take the
  averaged gradient. Any other step leaves the gradients local and only ``m`` moves, by the
  gradient averaged through the 1-bit compressed all-reduce (with error feedback). Every step
  applies ``w -= lr * (m / (sqrt(v) + eps) + weight_decay * w)`` (no bias correction). Each
  ``var_update_scaler`` variance steps the interval doubles (the paper's kappa);
- *local-step phase* (after it; ``v`` frozen, the error buffers restarted once): every rank
  updates ``m`` with its own gradient and steps on its own, accumulating its updates in ``u``
  and the learning rates in ``lrs``. Every ``local_step_interval`` steps the ranks synchronise:
  the local updates are undone, ``u * (sqrt(v) + eps)`` is averaged by the compressed
  all-reduce, the momentum becomes ``-u / lrs`` and the averaged update is applied. The interval
  doubles every ``local_step_scaler`` steps, up to ``local_step_clipper`` (the paper's H).

A group's ``exp_avg_mask`` multiplies what each compressed all-reduce returns (the averaged
gradient of the variance phase, the averaged update of a sync), where DeepSpeed applies it
(base.py). Each model parameter is compressed on its own (its own scales and error buffers, one compressed
all-reduce per parameter), as in DeepSpeed: a single scale over the whole flat master would drown
the small parameters' gradients (measured on the bundled tiny GPT: +60 % loss against +1 %).
Where orch differs, and why: on one rank the variance phase's non-variance steps update ``m`` with the plain gradient (the
paper's rule at n = 1), where DeepSpeed's code skips the momentum update. The policy counters
and ``u`` live in the optimizer state, so checkpoints carry them and a resumed run continues
the same schedule (DeepSpeed restarts them at load); the error buffers restart at zero.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .base import CompressedOptimizer


class ZeroOneAdam(CompressedOptimizer):
    """0/1 Adam over the engine's flat master partitions; see the module docstring."""

    name = "ZeroOneAdam"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, eps_inside_sqrt: bool = False,
                 weight_decay: float = 0.0, var_freeze_step: int = 100000, var_update_scaler: int = 16,
                 local_step_scaler: int = 32678, local_step_clipper: int = 16, cuda_aware: bool = False,
                 comm_backend_name: str = "nccl", impl: str = "auto") -> None:
        for key, value, low in (("var_freeze_step", var_freeze_step, 0), ("var_update_scaler", var_update_scaler, 1),
                                ("local_step_scaler", local_step_scaler, 1),
                                ("local_step_clipper", local_step_clipper, 1)):
            if int(value) < low:
                raise ValueError(f"ZeroOneAdam: {key} must be >= {low}, got {value}")
        defaults = dict(lr=lr, bias_correction=bool(bias_correction), betas=betas, eps=eps,
                        eps_inside_sqrt=bool(eps_inside_sqrt), weight_decay=weight_decay)
        super().__init__(params, defaults, cuda_aware=cuda_aware, comm_backend_name=comm_backend_name, impl=impl)
        self.var_freeze_step, self.var_update_scaler = int(var_freeze_step), int(var_update_scaler)
        self.local_step_scaler, self.local_step_clipper = int(local_step_scaler), int(local_step_clipper)

    # -- the schedule ------------------------------------------------------------------------------
    def frozen_after(self, steps_done: int) -> bool:
        """Whether the step after ``steps_done`` steps is in the local-step phase (variance frozen)."""
        return steps_done >= max(self.var_freeze_step + 1, 2)

    @property
    def averages_itself(self) -> bool:
        """True unless the coming step is the initialization step or a variance step (whose
        gradients the engine all-reduces in full)."""
        state = self._first_state()
        if not state or int(state["step"]) == 0:
            return False
        done = int(state["step"])
        return self.frozen_after(done) or (done + 1) % int(state["var_interval"]) != 0

    def _schedule(self, state: dict[str, Any]) -> None:
        """The policy counters (DeepSpeed keeps them per parameter; every tensor holds the same)."""
        state.setdefault("var_interval", 1)
        state.setdefault("var_counter", 0)
        state.setdefault("local_step_interval", 1)
        state.setdefault("local_step_counter", 0)
        state.setdefault("lrs", 0.0)

    # -- the step --------------------------------------------------------------------------------
    def _step_tensors(self, entries: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]) -> None:
        first = self._first_state()
        done = int(first["step"]) if first else 0
        frozen = self.frozen_after(done)
        if frozen and not self.frozen_after(done - 1):
            self.reset_errors()          # the errors held gradients; from now on they hold updates
        for group, p, g in entries:
            state = self._state(p)
            self._schedule(state)
            state["step"] += 1
            t = int(state["step"])
            if t == 1:
                continue                                   # DeepSpeed's initialization step
            if frozen:
                self._local_step(group, p, g, state, t)
            else:
                self._variance_phase_step(group, p, g, state, t)

    def _variance_phase_step(self, group: dict[str, Any], p: torch.Tensor, g: torch.Tensor,
                             state: dict[str, Any], t: int) -> None:
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        variance_step = t % state["var_interval"] == 0
        if variance_step:                                  # g is the all-reduced average
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        else:                                              # g is local: average it, 1 bit per element
            g = self.average_per_parameter(p, g, out=torch.zeros_like(g))
            self.apply_mask(group, p, g)
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        p.sub_(self._update(group, p, m, self._denominator(group, v)), alpha=float(group["lr"]))
        if variance_step:
            state["var_counter"] += 1
            if state["var_counter"] == self.var_update_scaler:
                state["var_counter"] = 0
                state["var_interval"] *= 2

    def _local_step(self, group: dict[str, Any], p: torch.Tensor, g: torch.Tensor, state: dict[str, Any],
                    t: int) -> None:
        beta1 = group["betas"][0]
        lr = float(group["lr"])
        m = state["exp_avg"]
        if "momentum_accumulator" not in state:
            state["momentum_accumulator"] = torch.zeros_like(p, dtype=torch.float32)
        u = state["momentum_accumulator"]
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        state["lrs"] += lr
        denom = self._denominator(group, state["exp_avg_sq"])
        update = self._update(group, p, m, denom)
        p.sub_(update, alpha=lr)
        u.sub_(update, alpha=lr)
        if t % state["local_step_interval"] == 0:          # synchronise the ranks
            p.sub_(u)                                      # undo the local steps
            u.mul_(denom)
            self.average_per_parameter(p, u)
            self.apply_mask(group, p, u)
            torch.div(u, -state["lrs"], out=m)
            p.add_(u.div_(denom))
            u.zero_()
            state["lrs"] = 0.0
        state["local_step_counter"] += 1
        if state["local_step_counter"] == self.local_step_scaler:
            state["local_step_counter"] = 0
            state["local_step_interval"] = min(self.local_step_clipper, state["local_step_interval"] * 2)

    @staticmethod
    def _denominator(group: dict[str, Any], v: torch.Tensor) -> torch.Tensor:
        return v.sqrt().add_(float(group["eps"]))

    @staticmethod
    def _update(group: dict[str, Any], p: torch.Tensor, m: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
        """``m / denom + weight_decay * p`` in a new tensor."""
        update = torch.div(m, denom)
        if group["weight_decay"] > 0.0:
            update.add_(p, alpha=float(group["weight_decay"]))
        return update
