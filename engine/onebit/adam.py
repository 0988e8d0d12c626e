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
  ``eps_inside_sqrt`` and ignores both; so do we, to train the same);
- DeepSpeed's param-group keys: ``exp_avg_mask`` multiplies the averaged momentum (base.py);
  ``non_freeze: True`` keeps a group out of the compression: after the freeze its gradients
  are all-reduced in full precision here (the engine no longer reduces them) and it steps as in
  the warm-up, variance included.

State keys ``step``, ``exp_avg``, ``exp_avg_sq`` (the engine's checkpoints carry them); the
compression errors are per rank and restart at zero after a load, as in DeepSpeed.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch

from .base import CompressedOptimizer


class OnebitAdam(CompressedOptimizer):
    """1-bit Adam over the engine's flat master partitions; see the module docstring."""

    name = "OnebitAdam"
    folds_grad_factor = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, freeze_step: int = 100000,
                 bias_correction: bool = True, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 eps_inside_sqrt: bool = False, weight_decay: float = 0.0, cuda_aware: bool = False,
                 comm_backend_name: str = "nccl", impl: str = "auto") -> None:
        if int(freeze_step) < 0:
            raise ValueError(f"OnebitAdam: freeze_step must be >= 0, got {freeze_step}")
        defaults = dict(lr=lr, bias_correction=bool(bias_correction), betas=betas, eps=eps,
                        eps_inside_sqrt=bool(eps_inside_sqrt), weight_decay=weight_decay)
        super().__init__(params, defaults, cuda_aware=cuda_aware, comm_backend_name=comm_backend_name, impl=impl)
        self.freeze_step = int(freeze_step)

    @property
    def averages_itself(self) -> bool:
        """True when the next step is compressed: the engine must then leave gradients local."""
        return self.steps_taken >= max(self.freeze_step, 2)

    def _step_tensors(self, entries: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]) -> None:
        compressed = self.averages_itself
        for group, p, g in entries:
            state = self._state(p)
            state["step"] += 1
            if int(state["step"]) == 1:
                continue                                 # DeepSpeed's initialization step
            beta1, beta2 = group["betas"]
            m, v = state["exp_avg"], state["exp_avg_sq"]
            factor = self.grad_factor(p)
            hyper = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
            if compressed and group.get("non_freeze") is True:
                g = self._full_average(g)
            elif compressed and self.world_size > 1:
                self._fused_compressed_step(group, p, m, v, g, beta1, (1.0 - beta1) * factor, hyper)
                continue
            m.mul_(beta1).add_(g, alpha=(1.0 - beta1) * factor)
            if compressed and group.get("non_freeze") is not True:
                self.average(p, m)
                self.apply_mask(group, p, m)
            else:
                v.mul_(beta2).addcmul_(g, g, value=(1.0 - beta2) * factor * factor)
            adam_update(p, m, v, *hyper)

    def _full_average(self, g: torch.Tensor) -> torch.Tensor:
        """A ``non_freeze`` group's local gradient averaged over the ranks in full precision (in place
        when ``g`` is the gradient itself: it is not read again before the next backward)."""
        if self.world_size > 1:
            self._comm().all_reduce(g)
            g.div_(self.world_size)
        return g

    def _fused_compressed_step(self, group: dict[str, Any], p: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                               g: torch.Tensor, beta1: float, coef: float, hyper: tuple[float, float, float]) -> None:
        """The compressed step in fewer passes over memory: the momentum update happens inside
        the compression's first pass and each block of the averaged momentum is masked and
        updates its parameters as soon as it is decompressed (same arithmetic, same bits, as the
        separate passes). The padding after the live part is updated after it."""
        def then(lo: int, hi: int) -> None:
            self.apply_mask(group, p, m, lo, hi)
            adam_update(p, m, v, *hyper, lo=lo, hi=hi)

        self.average_momentum(p, m, g, beta1, coef, then)
        live = self._live.get(id(p), p.numel())
        if live < p.numel():
            adam_update(p, m, v, *hyper, lo=live)


def adam_update(p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: float, eps: float,
                weight_decay: float, lo: int = 0, hi: Optional[int] = None) -> None:
    """``p -= lr * (m / (sqrt(v) + eps) + weight_decay * p)`` over elements ``[lo, hi)`` (default:
    all), block by block through one cached buffer: memory traffic of reading p, m, v and
    writing p, and no Ψ-sized temporary."""
    flat_p, flat_m, flat_v = p.view(-1), m.view(-1), v.view(-1)
    end = flat_p.numel() if hi is None else hi
    block = _BLOCK if p.device.type == "cpu" else max(end - lo, 1)     # one pass per op on a GPU
    buffer = _update_buffer(p.device, min(block, max(end - lo, 1)))
    for start in range(lo, end, block):
        stop = min(start + block, end)
        update = torch.sqrt(flat_v[start:stop], out=buffer[:stop - start]).add_(eps)
        torch.div(flat_m[start:stop], update, out=update)
        if weight_decay > 0.0:
            update.add_(flat_p[start:stop], alpha=weight_decay)
        flat_p[start:stop].add_(update, alpha=-lr)


_BLOCK = 1 << 18
_BUFFERS: dict[str, torch.Tensor] = {}


def _update_buffer(device: torch.device, numel: int) -> torch.Tensor:
    key = str(device)
    if key not in _BUFFERS or _BUFFERS[key].numel() < numel:
        _BUFFERS[key] = torch.empty(numel, dtype=torch.float32, device=device)
    return _BUFFERS[key]
