"""Segments: the pieces of an optimizer's tensors that each get a trust ratio (LAMB).

An optimizer handed the model's parameters sees one tensor per parameter: a segment each. The
ZeRO engine hands it one flat fp32 partition per parameter group instead, holding many
parameters back to back (and, at stages 1/2, only this rank's piece of some of them). For
LAMB's per-parameter trust ratio to mean the same thing there, the engine describes each flat
tensor as consecutive segments, each tagged with the global index (*key*) of the parameter it
belongs to, and gives a ``reduce`` that sums a ``[2, n_keys]`` tensor of squared norms across
ranks, so a parameter split between two partitions gets one ratio from its whole norm.

Padding at the end of a partition belongs to the last segment: it holds zeros in the weights
and the gradients, so it adds nothing to either norm and its update stays zero.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

Reduce = Callable[[torch.Tensor], None]


@dataclass(frozen=True)
class SegmentSpec:
    """How one tensor splits: consecutive ``lengths`` (summing to its numel), each with a key
    in ``range(n_keys)``; ``reduce`` sums a ``[2, n_keys]`` fp32 tensor across ranks in place."""

    lengths: tuple[int, ...]
    keys: tuple[int, ...]
    n_keys: int
    reduce: Reduce | None = None

    def __post_init__(self) -> None:
        if len(self.lengths) != len(self.keys):
            raise ValueError("SegmentSpec: one key per length")
        if any(n < 0 for n in self.lengths) or any(not 0 <= k < self.n_keys for k in self.keys):
            raise ValueError(f"SegmentSpec: lengths must be >= 0 and keys in [0, {self.n_keys})")


@dataclass
class SegmentPlan:
    """The segments of an ordered list of tensors; see the module docstring."""

    per_tensor: list[tuple[list[int], list[int]]]    # (lengths, keys) per tensor, empty segments dropped
    n_keys: int
    reduce_fn: Reduce | None = None
    _keys_cache: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, tensors: Sequence[torch.Tensor], specs: Sequence[SegmentSpec | None]) -> "SegmentPlan":
        """Tensors without a spec are one segment each, keyed after every spec's keys."""
        given = [s for s in specs if s is not None]
        n_keys = max((s.n_keys for s in given), default=0)
        reduces = {id(s.reduce): s.reduce for s in given if s.reduce is not None}
        if len(reduces) > 1:
            raise ValueError("SegmentPlan: tensors stepped together must share one cross-rank reduce")
        per_tensor = []
        for t, spec in zip(tensors, specs):
            if spec is None:
                per_tensor.append(([t.numel()], [n_keys]))
                n_keys += 1
                continue
            if sum(spec.lengths) != t.numel():
                raise ValueError(f"SegmentSpec covers {sum(spec.lengths)} elements of a tensor of {t.numel()}")
            kept = [(n, k) for n, k in zip(spec.lengths, spec.keys) if n > 0]
            per_tensor.append(([n for n, _ in kept], [k for _, k in kept]))
        return cls(per_tensor, n_keys, next(iter(reduces.values()), None))

    @property
    def lengths(self) -> list[int]:
        return [n for lengths, _ in self.per_tensor for n in lengths]

    def views(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor's segments as flat views, in plan order."""
        out: list[torch.Tensor] = []
        for t, (lengths, _) in zip(tensors, self.per_tensor):
            out.extend(t.reshape(-1).split(lengths))
        return out

    def keys_on(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._keys_cache:
            keys = [k for _, ks in self.per_tensor for k in ks]
            self._keys_cache[key] = torch.tensor(keys, dtype=torch.long).to(device)
        return self._keys_cache[key]

    def programs_per_segment(self, block: int, device: torch.device) -> torch.Tensor:
        """How many ``block``-element programs cover each segment (cached: no upload per step)."""
        key = f"programs:{block}:{device}"
        if key not in self._keys_cache:
            counts = [-(-n // block) for n in self.lengths]
            self._keys_cache[key] = torch.tensor(counts, dtype=torch.long).to(device)
        return self._keys_cache[key]

    def reduce(self, segment_sums: torch.Tensor) -> torch.Tensor:
        """``[2, n_segments]`` sums -> ``[2, n_keys]`` sums over every segment of each key, all ranks."""
        keys = self.keys_on(segment_sums.device)
        totals = torch.zeros(2, self.n_keys, dtype=torch.float32, device=segment_sums.device)
        totals.index_add_(1, keys, segment_sums.to(torch.float32))
        if self.reduce_fn is not None:
            self.reduce_fn(totals)
        return totals


def trust_coefficients(key_sums: torch.Tensor, keys: torch.Tensor, max_coeff: float, min_coeff: float) -> torch.Tensor:
    """Per segment: clamp(||w|| / ||update||, min_coeff, max_coeff), or 1 where either norm is 0
    (DeepSpeed's rule), from the ``[2, n_keys]`` squared norms; stays on the device."""
    w, u = key_sums.sqrt()
    ratio = (w / torch.where(u == 0, torch.ones_like(u), u)).clamp(min=float(min_coeff), max=float(max_coeff))
    coeff = torch.where((w != 0) & (u != 0), ratio, torch.ones_like(ratio))
    return coeff.index_select(0, keys).contiguous()


def lamb_step_size(lr: float, beta1: float, beta2: float, step: int, bias_correction: bool) -> float:
    """DeepSpeed FusedLamb's step size: the bias corrections fold into it (eps is not rescaled)."""
    if not bias_correction:
        return float(lr)
    return float(lr) * (1.0 - float(beta2) ** step) ** 0.5 / (1.0 - float(beta1) ** step)
