"""What DeepSpeed's compressed-communication optimizers share (1-bit Adam, 0/1 Adam, 1-bit LAMB).

Each is a torch optimizer over the engine's flat fp32 master tensors (one per parameter group
at ZeRO stage 0) or over plain parameters. The engine talks to them through three hooks:

- ``attach_comm(comm)``: the data-parallel group the momentum (or gradient) is averaged over;
- ``set_live_numel(master, n)``: only the first ``n`` elements of a flat master are parameters,
  the rest is alignment padding, which is never compressed (it would dilute the scale);
- ``averages_itself``: asked before each step; True when the coming step's gradients must stay
  local because the optimizer averages them (compressed) itself.

This base keeps the per-tensor ``CompressedAllReduce`` (its error-feedback buffers persist
across steps), the step count, and the gradient in fp32 with the loss scale and clip factor
applied. Subclasses implement ``_step_tensors``.

A parameter group may carry DeepSpeed's ``exp_avg_mask``: a tensor of the group's elements
(shaped like its one parameter, or its parameters flattened back to back) that multiplies the
averaged momentum (the averaged gradient, for 0/1 Adam) after every compressed all-reduce.
1-bit compression cannot represent zero, so elements whose gradient is always zero (BERT's
position embeddings past the training sequence length) would otherwise drift by about
``scale / eps`` per step. As in DeepSpeed, the mask is the script's: checkpoints do not store it.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch

from ..comm import Comm
from ..ops.fused_optimizers import LowpList, _check_hyper
from ..ops.onebit import BlockDone, MomentumInput
from ..ops.scaling import GradMultiplier, Scalar
from ..ops.segments import SegmentSpec
from .allreduce import CompressedAllReduce


class CompressedOptimizer(torch.optim.Optimizer):
    """Base of the compressed-communication optimizers; see the module docstring."""

    name = "CompressedOptimizer"
    # Whether _step_tensors takes the gradient's factor (1/loss scale x clip) as a number to fold
    # into its own arithmetic; otherwise the gradient arrives already multiplied.
    folds_grad_factor = False

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], *, cuda_aware: bool = False,
                 comm_backend_name: str = "nccl", impl: str = "auto") -> None:
        _check_hyper(self.name, lr=defaults["lr"], eps=defaults["eps"], weight_decay=defaults["weight_decay"],
                     betas=defaults["betas"])
        defaults = {**defaults, "betas": (float(defaults["betas"][0]), float(defaults["betas"][1]))}
        super().__init__(params, defaults)
        # cuda_aware / comm_backend_name choose DeepSpeed's transport (MPI, NCCL, HCCL); orch's
        # collectives pick theirs from the process group, so both are accepted and kept for show.
        self.cuda_aware, self.comm_backend_name, self.impl = bool(cuda_aware), comm_backend_name, impl
        self.comm: Optional[Comm] = None
        self._reducers: dict[Any, CompressedAllReduce] = {}
        self._specs: dict[int, SegmentSpec] = {}
        self._live: dict[int, int] = {}
        self._factors: dict[int, float] = {}
        self._masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # id(p) -> (user mask, flat)

    # -- what the engine asks -----------------------------------------------------------------------
    def attach_comm(self, comm: Comm) -> None:
        """The data-parallel group the momentum is averaged over."""
        self.comm = comm

    def set_live_numel(self, param: torch.Tensor, numel: int) -> None:
        """Only ``param``'s first ``numel`` elements are real (a flat partition's tail is padding)."""
        self._live[id(param)] = int(numel)
        self._reducers.pop(id(param), None)
        for group in self.param_groups:
            if any(q is param for q in group["params"]):
                self.momentum_mask(group, param)          # a mask of the wrong size fails here, at set-up

    @property
    def steps_taken(self) -> int:
        state = self._first_state()
        return int(state["step"]) if state else 0

    @property
    def averages_itself(self) -> bool:
        return False

    # -- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None, *, grad_scale: Scalar = None, clip_coef: Scalar = None,
             lowp_out: LowpList = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        multiplier = GradMultiplier(grad_scale, clip_coef)
        entries = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    g, factor = self._grad_and_factor(p, multiplier)
                    if self.folds_grad_factor:
                        self._factors[id(p)] = factor
                    elif factor != 1.0:
                        g = g.mul_(factor) if g is not p.grad else g.mul(factor)
                    entries.append((group, p, g))
        if entries:
            self._step_tensors(entries)
        if lowp_out is not None:
            params = [p for g in self.param_groups for p in g["params"]]
            for p, lowp in zip(params, lowp_out):
                if lowp is not None:
                    lowp.copy_(p.view(lowp.shape))
        return loss

    def _step_tensors(self, entries: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]) -> None:
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------------
    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        """``p``'s state, created with ``step`` 0 and zero moments on first use."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        return state

    def _first_state(self) -> dict[str, Any]:
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state and self.state[p]:
                    return self.state[p]
        return {}

    @staticmethod
    def _grad_and_factor(p: torch.Tensor, multiplier: GradMultiplier) -> tuple[torch.Tensor, float]:
        """(fp32 gradient, the number still to multiply it by): an fp32 gradient with plain-number
        factors is not copied (one pass over Ψ saved); otherwise a multiplied fp32 copy and 1."""
        scale, clip = (_host_number(x, p.device) for x in (multiplier.grad_scale, multiplier.clip_coef))
        if p.grad.dtype == torch.float32 and not any(torch.is_tensor(x) for x in (scale, clip)):
            return p.grad, (1.0 / float(scale) if scale is not None else 1.0) * (float(clip) if clip is not None else 1.0)
        return multiplier.apply([p.grad], torch.float32)[0], 1.0

    def grad_factor(self, p: torch.Tensor) -> float:
        """For ``folds_grad_factor`` optimizers: what this step's gradient of ``p`` is to be multiplied by."""
        return self._factors.get(id(p), 1.0)

    def _comm(self) -> Comm:
        if self.comm is None:
            self.comm = Comm()
        return self.comm

    @property
    def world_size(self) -> int:
        return self._comm().world_size

    def live(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The flat view of ``t`` (shaped like ``p``) that holds parameters, padding excluded."""
        return t.view(-1)[:self._live.get(id(p), t.numel())]

    def average(self, p: torch.Tensor, t: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``t`` (shaped like ``p``) averaged over the ranks by the compressed all-reduce, written
        to ``out`` (default: ``t`` itself); ``p``'s error-feedback buffers carry what was lost."""
        out = t if out is None else out
        if self.world_size == 1:
            return out.copy_(t) if out is not t else out
        self._reducer(p)(self.live(p, t), out=self.live(p, out))
        return out

    def average_momentum(self, p: torch.Tensor, m: torch.Tensor, g: torch.Tensor, beta1: float, coef: float,
                         then: BlockDone) -> None:
        """``m <- average(beta1 * m + coef * g)`` over the ranks (world > 1), the momentum update
        done inside the compression's first pass, and ``then(lo, hi)`` called on each block of
        the live part as soon as it is final (the parameter update, while the block is in cache);
        the padding after the live part gets the plain momentum update and is left to the caller."""
        live = self._live.get(id(p), p.numel())
        tail_m = m.view(-1)[live:]
        if tail_m.numel():
            tail_m.mul_(beta1).add_(g.view(-1)[live:], alpha=coef)
        self._reducer(p)(self.live(p, m), momentum=MomentumInput(self.live(p, g), beta1, coef), then=then)

    def set_segments(self, param: torch.Tensor, spec: Optional[SegmentSpec]) -> None:
        """Where each model parameter lies in a flat master (the engine's hook, shared with LAMB)."""
        if spec is not None:
            self._specs[id(param)] = spec
        self._reducers = {k: r for k, r in self._reducers.items() if not (isinstance(k, tuple) and k[0] == id(param))}

    def segment_views(self, p: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        """``t`` (shaped like ``p``) as flat views, one per model parameter, padding at the end cut off."""
        spec = self._specs.get(id(p))
        live = self.live(p, t)
        if spec is None:
            return [live]
        out, start = [], 0
        for n in spec.lengths:
            n = min(n, live.numel() - start)
            if n > 0:
                out.append(live[start:start + n])
            start += max(n, 0)
        return out

    def average_per_parameter(self, p: torch.Tensor, t: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """As ``average``, but each model parameter compressed on its own (its own scales and
        error buffers), as DeepSpeed's 0/1 Adam does: one scale over parameters of very
        different magnitudes would drown the small ones."""
        out = t if out is None else out
        if self.world_size == 1:
            return out.copy_(t) if out is not t else out
        for i, (src, dst) in enumerate(zip(self.segment_views(p, t), self.segment_views(p, out))):
            key = (id(p), i)
            reducer = self._reducers.get(key)
            if reducer is None:
                reducer = self._reducers[key] = CompressedAllReduce(self._comm(), src.numel(), p.device, impl=self.impl)
            reducer(src, out=dst)
        return out

    def momentum_mask(self, group: dict[str, Any], p: torch.Tensor) -> Optional[torch.Tensor]:
        """``group``'s ``exp_avg_mask`` as an fp32 tensor shaped like ``p`` (zero over the padding
        after the live part), or None without one; see the module docstring."""
        mask = group.get("exp_avg_mask")
        if mask is None:
            return None
        cached = self._masks.get(id(p))
        if cached is not None and cached[0] is mask:
            return cached[1]
        live = self._live.get(id(p), p.numel())
        flat = torch.as_tensor(mask).detach().reshape(-1)
        if flat.numel() != live:
            raise ValueError(f"{self.name}: the parameter group's 'exp_avg_mask' has {flat.numel()} elements, "
                             f"but the group's parameters have {live}; give one mask element per parameter "
                             "element (shaped like the group's one parameter, or its parameters flattened back "
                             "to back)")
        full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        full[:live].copy_(flat)
        self._masks[id(p)] = (mask, full.view_as(p))
        return self._masks[id(p)][1]

    def apply_mask(self, group: dict[str, Any], p: torch.Tensor, t: torch.Tensor, lo: int = 0,
                   hi: Optional[int] = None) -> None:
        """``t *= exp_avg_mask`` (elements ``[lo, hi)`` of the flat tensor), if the group has one."""
        mask = self.momentum_mask(group, p)
        if mask is not None:
            end = t.numel() if hi is None else hi
            t.view(-1)[lo:end].mul_(mask.view(-1)[lo:end])

    def reset_errors(self) -> None:
        for reducer in self._reducers.values():
            reducer.reset_errors()

    def _reducer(self, p: torch.Tensor) -> CompressedAllReduce:
        reducer = self._reducers.get(id(p))
        if reducer is None:
            numel = self._live.get(id(p), p.numel())
            reducer = self._reducers[id(p)] = CompressedAllReduce(self._comm(), numel, p.device, impl=self.impl)
        return reducer

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Errors are per rank and not checkpointed: they restart at zero (as in DeepSpeed)."""
        super().load_state_dict(state_dict)
        self.reset_errors()


def _host_number(value: Scalar, device: torch.device) -> Scalar:
    """A CPU tensor factor for CPU parameters as a plain number: reading it costs no device sync,
    and a number folds into the momentum update, where a tensor costs a fresh Ψ-sized gradient
    copy every step (the clip coefficient whenever gradient clipping is on)."""
    if torch.is_tensor(value) and value.device.type == "cpu" and device.type == "cpu":
        return float(value)
    return value
