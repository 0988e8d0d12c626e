"""OnebitLamb: DeepSpeed's ``"type": "OneBitLamb"`` (1-bit LAMB, arXiv:2104.06069), the update
rule as DeepSpeed's runtime/fp16/onebit/lamb.py ran it (removed from DeepSpeed in 0.19; its last
form is the reference). Steps are counted from 1:

- step 1 only sets up state (the "initialization step": no update is applied);
- warm-up, steps 2 … ``max(freeze_step, 2)``: LAMB without bias correction on the all-reduced
  gradient: ``update = m / (sqrt(v) + eps) + weight_decay * w``, per parameter a trust ratio
  ``||w|| / ||update||`` clamped to [``min_coeff``, ``max_coeff``] (1 where either norm is 0),
  ``w -= lr * ratio * update``; the ratios' running average (``coeff_beta``) becomes the
  frozen coefficient, and at step ``freeze_step`` the variance is copied to a "fresh" one;
- compression: the gradients stay local. At the first compressed step each parameter's momentum
  gets a scaling coefficient (the mean of all parameters' ``||m|| / sqrt(numel)`` over its own),
  so that one compression scale fits them all. Each step every rank updates ``m`` with its own
  gradient, scales it, averages it by the 1-bit compressed all-reduce (error feedback), unscales
  it, reconstructs the averaged gradient ``(m - beta1 * m_prev) / (1 - beta1)`` to update the
  fresh variance, and steps with the frozen variance and a coefficient ``frozen * factor``:
  ``factor = max(denom / denom_fresh)`` per parameter (mixed towards 1 by the share of the
  update that is not weight decay), clamped to [``factor_min``, ``factor_max``] and to within
  ``factor_threshold`` of the last step's factor.

A flat master holds many parameters: the engine describes it as segments (``set_segments``, as
for LAMB), and every per-parameter quantity above is a per-segment vector (no host sync: the
clamps are tensor ops). Those vectors are checkpointed as one scalar state per segment
(``lamb_coeff_freeze.<i>``, ``last_factor.<i>``, ``scaling_coeff.<i>``), so a resumed run keeps
its coefficients (DeepSpeed restarts them when it loads a checkpoint taken during warm-up).
The flat master packs the parameters back to back; only its tail is padding, which is cut off
before compression and from the segments, so the segments are exactly DeepSpeed's parameters.
A group's ``exp_avg_mask`` multiplies the averaged, unscaled momentum (base.py), as in DeepSpeed.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch

from ..ops.segments import SegmentSpec
from .base import CompressedOptimizer

_SCALARS = ("lamb_coeff_freeze", "last_factor", "scaling_coeff")
_DEFAULTS = {"lamb_coeff_freeze": 0.0, "last_factor": 1.0, "scaling_coeff": 1.0}


class OnebitLamb(CompressedOptimizer):
    """1-bit LAMB over the engine's flat master partitions; see the module docstring."""

    name = "OnebitLamb"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, freeze_step: int = 100000,
                 bias_correction: bool = True, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 eps_inside_sqrt: bool = False, weight_decay: float = 0.0, max_coeff: float = 10.0,
                 min_coeff: float = 0.01, cuda_aware: bool = False, comm_backend_name: str = "nccl",
                 coeff_beta: float = 0.9, factor_max: float = 4.0, factor_min: float = 0.5,
                 factor_threshold: float = 0.1, impl: str = "auto") -> None:
        if int(freeze_step) < 0:
            raise ValueError(f"OnebitLamb: freeze_step must be >= 0, got {freeze_step}")
        if not 0.0 <= min_coeff <= max_coeff or not 0.0 <= factor_min <= factor_max:
            raise ValueError("OnebitLamb: need 0 <= min_coeff <= max_coeff and 0 <= factor_min <= factor_max")
        defaults = dict(lr=lr, bias_correction=bool(bias_correction), betas=betas, eps=eps,
                        eps_inside_sqrt=bool(eps_inside_sqrt), weight_decay=weight_decay,
                        max_coeff=float(max_coeff), min_coeff=float(min_coeff))
        super().__init__(params, defaults, cuda_aware=cuda_aware, comm_backend_name=comm_backend_name, impl=impl)
        self.freeze_step = int(freeze_step)
        self.coeff_beta, self.factor_threshold = float(coeff_beta), float(factor_threshold)
        self.factor_max, self.factor_min = float(factor_max), float(factor_min)
        self._vectors: dict[int, dict[str, torch.Tensor]] = {}
        self._lengths: dict[int, torch.Tensor] = {}

    def set_live_numel(self, param: torch.Tensor, numel: int) -> None:
        super().set_live_numel(param, numel)
        self._lengths.pop(id(param), None)

    def set_segments(self, param: torch.Tensor, spec: Optional[SegmentSpec]) -> None:
        super().set_segments(param, spec)
        self._vectors.pop(id(param), None)
        self._lengths.pop(id(param), None)

    @property
    def averages_itself(self) -> bool:
        """True when the next step is compressed: the engine must then leave gradients local."""
        return self.steps_taken >= max(self.freeze_step, 2)

    # -- per-segment bookkeeping -------------------------------------------------------------------
    def lengths(self, p: torch.Tensor) -> torch.Tensor:
        """Segment lengths of ``p``'s live part (the tail padding cut off), empty ones dropped."""
        cached = self._lengths.get(id(p))
        if cached is not None:
            return cached
        spec = self._specs.get(id(p))
        remaining = self._live.get(id(p), p.numel())
        out = []
        for n in (spec.lengths if spec is not None else (p.numel(),)):
            n = min(n, remaining)
            remaining -= n
            if n > 0:
                out.append(n)
        self._lengths[id(p)] = torch.tensor(out, device=p.device)
        return self._lengths[id(p)]

    def vectors(self, p: torch.Tensor, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The per-segment scalars as vectors whose elements the state holds as 0-dim views."""
        vecs = self._vectors.get(id(p))
        if vecs is None:
            n = len(self.lengths(p))
            vecs = {}
            for key in _SCALARS:
                saved = [state.get(f"{key}.{i}") for i in range(n)]
                vecs[key] = torch.tensor([_DEFAULTS[key] if s is None else float(s) for s in saved],
                                         dtype=torch.float32, device=p.device)
                if key != "scaling_coeff" or saved[0] is not None:
                    self._publish(state, key, vecs[key])
            self._vectors[id(p)] = vecs
        return vecs

    @staticmethod
    def _publish(state: dict[str, Any], key: str, vec: torch.Tensor) -> None:
        for i in range(vec.numel()):
            state[f"{key}.{i}"] = vec[i]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._vectors.clear()            # rebuilt from the loaded scalars at the next step

    # -- the step --------------------------------------------------------------------------------
    def _step_tensors(self, entries: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]) -> None:
        compressed = self.averages_itself
        states = [self._state(p) for _, p, _ in entries]
        for state in states:
            state["step"] += 1
        if int(states[0]["step"]) == 1:
            for (_, p, _), state in zip(entries, states):
                self.vectors(p, state)
            return                                          # DeepSpeed's initialization step
        if compressed and "scaling_coeff.0" not in states[0]:
            self._set_scaling_coefficients(entries, states)
        for (group, p, g), state in zip(entries, states):
            if compressed:
                self._compressed_step(group, p, g, state)
            else:
                self._warmup_step(group, p, g, state)

    def _warmup_step(self, group: dict[str, Any], p: torch.Tensor, g: torch.Tensor, state: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        if int(state["step"]) == self.freeze_step:
            state["exp_avg_sq_fresh"] = v.clone()
        update = self._update(group, p, m, v.sqrt().add_(float(group["eps"])))
        lengths, vecs = self.lengths(p), self.vectors(p, state)
        w_norm, u_norm = (segment_norms(self.live(p, x), lengths) for x in (p, update))
        usable = (w_norm > 0) & (u_norm > 0)
        coeff = torch.where(usable, (w_norm / u_norm).clamp_(max=group["max_coeff"]).clamp_(min=group["min_coeff"]),
                            torch.ones_like(w_norm))
        ema = vecs["lamb_coeff_freeze"] * self.coeff_beta + (1.0 - self.coeff_beta) * coeff
        vecs["lamb_coeff_freeze"].copy_(torch.where(coeff != 1.0, ema, vecs["lamb_coeff_freeze"]))
        self._apply(group, p, update, coeff, lengths)

    def _set_scaling_coefficients(self, entries: list, states: list[dict[str, Any]]) -> None:
        """Per segment: the mean momentum scale of all segments over this segment's own."""
        scales = []
        for (_, p, _), state in zip(entries, states):
            lengths = self.lengths(p)
            scales.append(segment_norms(self.live(p, state["exp_avg"]), lengths) / lengths.to(torch.float32).sqrt())
        united = torch.cat(scales).mean()
        for (_, p, _), state, scale in zip(entries, states, scales):
            coeff = self.vectors(p, state)["scaling_coeff"]
            coeff.copy_(torch.where(scale > 0, united / scale, torch.ones_like(scale)))
            self._publish(state, "scaling_coeff", coeff)

    def _compressed_step(self, group: dict[str, Any], p: torch.Tensor, g: torch.Tensor,
                         state: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if "exp_avg_sq_fresh" not in state:         # freeze_step < 2: DeepSpeed's zeros
            state["exp_avg_sq_fresh"] = torch.zeros_like(v)
        fresh = state["exp_avg_sq_fresh"]
        lengths, vecs = self.lengths(p), self.vectors(p, state)
        scaling = expand(vecs["scaling_coeff"], lengths)
        last = m.clone()
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        self.live(p, m).mul_(scaling)
        self.average(p, m)
        self.live(p, m).div_(scaling)
        self.apply_mask(group, p, m)
        rebuilt = torch.sub(m, last, alpha=beta1).div_(1.0 - beta1)     # the averaged gradient
        fresh.mul_(beta2).addcmul_(rebuilt, rebuilt, value=1.0 - beta2)
        eps = float(group["eps"])
        denom = v.sqrt().add_(eps)
        prelim = torch.div(m, denom)
        update = prelim.add(p, alpha=float(group["weight_decay"])) if group["weight_decay"] > 0.0 else prelim
        ratio_to_fresh = denom.div_(fresh.sqrt().add_(eps))
        factor = segment_max(self.live(p, ratio_to_fresh), lengths)
        if group["weight_decay"] > 0.0:
            u_norm = segment_norms(self.live(p, update), lengths)
            share = torch.where(u_norm > 0, (segment_norms(self.live(p, prelim), lengths) / u_norm).clamp_(max=1.0),
                                torch.ones_like(u_norm))
            factor = factor * share + (1.0 - share)
        last_factor = vecs["last_factor"]
        factor = factor.clamp_(max=self.factor_max).clamp_(min=self.factor_min)
        factor = torch.minimum(factor, last_factor * (1.0 + self.factor_threshold))
        factor = torch.maximum(factor, last_factor * (1.0 - self.factor_threshold))
        last_factor.copy_(factor)
        self._apply(group, p, update, vecs["lamb_coeff_freeze"] * factor, lengths)

    @staticmethod
    def _update(group: dict[str, Any], p: torch.Tensor, m: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
        update = denom.reciprocal_().mul_(m)
        if group["weight_decay"] > 0.0:
            update.add_(p, alpha=float(group["weight_decay"]))
        return update

    def _apply(self, group: dict[str, Any], p: torch.Tensor, update: torch.Tensor, coeff: torch.Tensor,
               lengths: torch.Tensor) -> None:
        """``w -= lr * coeff[segment] * update`` over the live part."""
        live = self.live(p, update)
        live.mul_(expand(coeff, lengths))
        self.live(p, p.detach()).sub_(live, alpha=float(group["lr"]))


def segment_norms(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """L2 norm of each consecutive segment of flat ``x`` (fp32)."""
    return torch.segment_reduce(x.float().square(), "sum", lengths=lengths).sqrt_()


def segment_max(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return torch.segment_reduce(x.float(), "max", lengths=lengths)


def expand(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each segment's value repeated over its elements."""
    return values.repeat_interleave(lengths)
