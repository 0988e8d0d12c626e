"""OnebitAdam: DeepSpeed's ``"type": "OneBitAdam"`` (arXiv:2102.02888), update rule as in
DeepSpeed's runtime/fp16/onebit/adam.py (removed from DeepSpeed in 0.19; its last form is the
reference):

- step 1 only sets up state (DeepSpeed's "initialization step": no update is applied);
- warm-up, steps 2 … ``max(freeze_step, 2)``: the engine all-reduces the gradients and
  ``m <- b1*m + (1-b1)*g``, ``v <- b2*v + (1-b2)*g*g``;
- after it, the variance ``v`` is frozen, the engine leaves gradients local, and each rank
  updates ``m`` with its own gradient, then replaces it by the compressed average
  (``CompressedAllReduce``: 1-bit signs, one scale per chunk, error feedback);
- every applied step: ``update = m / (sqrt(v) + eps) + weight_decay * w``, ``w <- w - lr * update``
  (no bias correction: DeepSpeed's 1-bit Adam accepts ``bias_correction`` and
  ``eps_inside_sqrt`` and ignores both; so do we, to train the same).

State keys ``step``, ``exp_avg``, ``exp_avg_sq`` (the engine's checkpoints carry them); the
compression errors are per rank and restart at zero after a load, as in DeepSpeed.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch

from ..comm import Comm
from ..ops.fused_optimizers import LowpList, _check_hyper
from ..ops.scaling import GradMultiplier, Scalar
from .allreduce import CompressedAllReduce


class OnebitAdam(torch.optim.Optimizer):
    """1-bit Adam over the engine's flat master partitions; see the module docstring."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, freeze_step: int = 100000,
                 bias_correction: bool = True, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 eps_inside_sqrt: bool = False, weight_decay: float = 0.0, cuda_aware: bool = False,
                 comm_backend_name: str = "nccl", impl: str = "auto") -> None:
        _check_hyper("OnebitAdam", lr=lr, eps=eps, weight_decay=weight_decay, betas=betas)
        if int(freeze_step) < 0:
            raise ValueError(f"OnebitAdam: freeze_step must be >= 0, got {freeze_step}")
        defaults = dict(lr=lr, bias_correction=bool(bias_correction), betas=(float(betas[0]), float(betas[1])),
                        eps=eps, eps_inside_sqrt=bool(eps_inside_sqrt), weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.freeze_step = int(freeze_step)
        self.cuda_aware, self.comm_backend_name, self.impl = bool(cuda_aware), comm_backend_name, impl
        self.comm: Optional[Comm] = None
        self._reducers: dict[int, CompressedAllReduce] = {}
        self._live: dict[int, int] = {}

    # -- what the engine asks -----------------------------------------------------------------------
    def attach_comm(self, comm: Comm) -> None:
        """The data-parallel group the momentum is averaged over."""
        self.comm = comm

    def set_live_numel(self, param: torch.Tensor, numel: int) -> None:
        """Only ``param``'s first ``numel`` elements are real (a flat partition's tail is padding):
        only they are compressed, so the padding neither dilutes the scale nor gains momentum."""
        self._live[id(param)] = int(numel)
        self._reducers.pop(id(param), None)

    @property
    def steps_taken(self) -> int:
        states = [self.state[p] for g in self.param_groups for p in g["params"] if p in self.state]
        return int(states[0]["step"]) if states else 0

    @property
    def averages_itself(self) -> bool:
        """True when the next step is compressed: the engine must then leave gradients local."""
        return self.steps_taken >= max(self.freeze_step, 2)

    # -- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None, *, grad_scale: Scalar = None, clip_coef: Scalar = None,
             lowp_out: LowpList = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        compressed = self.averages_itself
        multiplier = GradMultiplier(grad_scale, clip_coef)
        params = [p for g in self.param_groups for p in g["params"]]
        lowp = dict(zip(map(id, params), lowp_out)) if lowp_out is not None else {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(group, p, multiplier, compressed, lowp.get(id(p)))
        return loss

    def _update(self, group: dict[str, Any], p: torch.Tensor, multiplier: GradMultiplier, compressed: bool,
                lowp: Optional[torch.Tensor]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        state["step"] += 1
        if int(state["step"]) == 1:
            return                                   # DeepSpeed's initialization step
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        g = p.grad if multiplier.is_identity and p.grad.dtype == torch.float32 else \
            multiplier.apply([p.grad], torch.float32)[0]
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        if compressed:
            if self._comm().world_size > 1:
                live = self._live.get(id(p), m.numel())
                self._reducer(p, live)(m.view(-1)[:live])
        else:
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        update = v.sqrt().add_(float(group["eps"]))
        torch.div(m, update, out=update)          # one temporary for the whole update
        if group["weight_decay"] > 0.0:
            update.add_(p, alpha=float(group["weight_decay"]))
        p.add_(update, alpha=-float(group["lr"]))
        if lowp is not None:
            lowp.copy_(p.view(lowp.shape))

    def _comm(self) -> Comm:
        if self.comm is None:
            self.comm = Comm()
        return self.comm

    def _reducer(self, p: torch.Tensor, numel: int) -> CompressedAllReduce:
        reducer = self._reducers.get(id(p))
        if reducer is None:
            reducer = self._reducers[id(p)] = CompressedAllReduce(self._comm(), numel, p.device, impl=self.impl)
        return reducer

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for reducer in self._reducers.values():
            reducer.reset_errors()
