"""What every ZeRO optimizer shares: the torch-optimizer face, the step, and the partition accessors.

Stages 0-2 (stage12.py) and stage 3 (stage3.py) differ in where parameters and gradients
live, not in how the update is made. Both own, per optimizer parameter group, one fp32 master
slice (``_masters``, wrapped as ``master_params`` for the inner torch optimizer) and find this
rank's reduced gradient for it with ``_own_grads()``. The step is then the same everywhere:

gradient norm over all partitions (one all-reduce of a device scalar), overflow check (the step's
one host sync), one combined multiplier (1/loss scale, 1/world size, the clip coefficient as a
device tensor) handed to the optimizer (engine.ops'
fused optimizers apply it while reading the gradient, and write the low-precision copy in the
same pass), then ``_publish_params`` makes the updated weights visible to the model.

The accessors at the end (``master_partition``, ``optimizer_state_partitions``, ``load_full``,
``load_master_partition``) are what checkpoints use, so every stage saves and reshards alike.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.optim import Optimizer

from ..comm import Comm
from ..optimizers import step_with_multiplier, takes_scale_kwargs
from ..precision import LossScaler
from .offload import OffloadSettings, synchronize
from .partition import FlatLayout

__all__ = ["PartitionedOptimizer"]


class PartitionedOptimizer:
    """Base of ``Stage12Optimizer`` (stages 0-2) and ``Stage3Optimizer``; see the module docstring."""

    layout: FlatLayout
    params: list[nn.Parameter]
    master_params: list[nn.Parameter]
    optimizer: Optimizer
    loss_scaler: LossScaler
    comm: Comm
    settings: Any
    stage: int
    model_dtype: torch.dtype
    master_is_view: bool
    offload: OffloadSettings
    _masters: list[torch.Tensor]
    _rank: int
    reducer: Any
    _fused_step: bool
    _lowp_grads: bool
    device: torch.device
    global_grad_norm: Optional[torch.Tensor] = None   # device tensor; float() it only to log
    overflow: bool = False
    nvme: Any = None     # NVMe offload (nvme.py): masters and states stream from swap files

    # -- torch.optim.Optimizer look-alike ---------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.loss_scale

    cur_scale = loss_scale  # DeepSpeed's name

    # -- what subclasses provide ----------------------------------------------------------------
    def reduce_gradients(self) -> None:
        raise NotImplementedError

    def _own_grads(self) -> list[torch.Tensor]:
        """Per group: the reduced gradient slice this rank's master partition consumes."""
        raise NotImplementedError

    def _lowp_targets(self) -> Optional[list[torch.Tensor]]:
        """Per group: the low-precision tensors the fused step may write directly (None: no)."""
        raise NotImplementedError

    def _publish_params(self, local_copied: bool = False) -> None:
        """Updated master partitions -> the model's parameters."""
        raise NotImplementedError

    def zero_grad(self, set_to_none: bool = True) -> None:
        raise NotImplementedError

    def _reduction_consumed(self) -> None:
        """The step has taken this step's reduced gradients (the next backward reduces anew)."""

    # -- the step ---------------------------------------------------------------------------------
    def step(self) -> bool:
        """One optimizer step at an accumulation boundary; False when skipped for overflow.

        The norm and the clip coefficient stay device tensors (the fused optimizers read the
        coefficient on the device). The one host sync of the step is the overflow bool: a step
        with inf/nan gradients must be skipped, not applied, and the dynamic loss scaler
        (fp16) must halve its scale for the next step, both host-side decisions that cannot
        wait a step. DeepSpeed's ZeRO optimizers take the same one bool per step."""
        self.reduce_gradients()
        self._reduction_consumed()
        grads = self._own_grads()
        if self.offload.optimizer:
            self.reducer.flush_host()  # the side stream's device-to-host gradient copies have landed
            synchronize(self.device)  # and the compute stream's
        divisor = self._grad_divisor()
        norm = self._global_norm(grads, self.local_gradients) / divisor
        self.global_grad_norm = norm
        self.overflow = not bool(torch.isfinite(norm))      # the step's one host sync (see above)
        if self.overflow:
            self.loss_scaler.update(True)
            self.zero_grad()
            return False
        clip = self.settings.gradient_clipping
        clip_coef = torch.clamp(clip / (norm + 1e-6), max=1.0) if clip > 0 else 1.0
        if self.nvme is not None:      # writes the model's copy chunk by chunk, then publish as usual
            self.nvme.step(grads, divisor, clip_coef)
            self.loss_scaler.update(False)
            self.zero_grad()
            self._publish_params(True)
            return True
        for mp, grad in zip(self.master_params, grads):
            mp.grad = grad if grad.dtype == torch.float32 or self._lowp_grads else grad.float()
        lowp = self._lowp_targets() if self._fused_step and not self.master_is_view else None
        copied = step_with_multiplier(self.optimizer, divisor, clip_coef, lowp_out=lowp)
        for mp in self.master_params:
            mp.grad = None
        self.loss_scaler.update(False)
        self.zero_grad()
        self._publish_params(copied)
        return True

    def _grad_divisor(self) -> float:
        """What the reduced gradients are divided by: the loss scale and, for averaging, the
        world size over what each rank already divided by before the sum (grad_precision.py)."""
        if self.local_gradients:
            return self.loss_scaler.loss_scale
        return self.loss_scaler.loss_scale * self.comm.world_size / self.reducer.predivide

    @property
    def local_gradients(self) -> bool:
        """Whether this step's gradients stay unreduced: the inner optimizer (1-bit Adam after its
        warm-up) averages its momentum across the ranks itself."""
        return bool(getattr(self.optimizer, "averages_itself", False))

    def _global_norm(self, grads: Sequence[torch.Tensor], local: bool = False) -> torch.Tensor:
        """L2 norm of the reduced gradient over all partitions, a 0-dim fp32 device tensor
        (inf/nan when it overflowed): one all-reduce of the squared sum, no host sync.

        ``local``: gradients were not reduced; the norm is the root mean square of the ranks'
        local norms, so every rank clips alike and skips an overflowed step together."""
        device = grads[0].device if grads else self.device
        square = torch.zeros((), dtype=torch.float32, device=device)
        for g in grads:
            if g.numel():
                square += torch.linalg.vector_norm(g, dtype=torch.float32).square()
        if self.layout.partition_count > 1 or (local and self.comm.world_size > 1):
            square = square.to(self.device) if self.comm.backend == "nccl" else square
            self.comm.all_reduce(square)
        if local and self.comm.world_size > 1:
            square = square / self.comm.world_size
        return square.sqrt()

    def _build_inner_optimizer(self, groups: Sequence[tuple[Mapping[str, Any], Any]],
                               make_optimizer: Callable[[list[dict[str, Any]]], Optimizer]) -> None:
        """The torch optimizer over the fp32 master slices, one group per ``groups`` entry.

        engine.ops' optimizers unscale, clip and write the low-precision copy in their one pass;
        they also read bf16/fp16 gradients directly, which saves a 4Ψ/N fp32 gradient copy.
        """
        self.master_params = [nn.Parameter(m) for m in self._masters]
        self.optimizer = make_optimizer([{**dict(hyper), "params": [mp]}
                                         for (hyper, _), mp in zip(groups, self.master_params)])
        self._fused_step = takes_scale_kwargs(self.optimizer)
        self._lowp_grads = self._fused_step and not self.master_is_view and self._allow_lowp_grads()

    def _allow_lowp_grads(self) -> bool:
        """Let the fp32 masters carry bf16/fp16 gradients (torch >= 2.10 has ``grad_dtype``)."""
        try:
            for mp in self.master_params:
                mp.grad_dtype = None
        except (AttributeError, RuntimeError, TypeError):
            return False
        return True

    # -- checkpoint access ------------------------------------------------------------------------
    def master_partition(self) -> torch.Tensor:
        """This rank's fp32 master weights as one flat tensor (``layout.partition_numel``)."""
        if self.nvme is not None:
            return self.nvme.partition("master")
        return self._masters[0] if len(self._masters) == 1 else torch.cat(self._masters)

    def optimizer_state_partitions(self) -> dict[str, torch.Tensor]:
        """This rank's optimizer states: flat tensors like the master partition (e.g.
        ``exp_avg``, ``exp_avg_sq``), scalars (``step``) as 0-dim tensors. Empty before the
        first step (torch creates optimizer state lazily)."""
        if self.nvme is not None:
            return self.nvme.state_partitions()
        states = [self.optimizer.state.get(mp, {}) for mp in self.master_params]
        keys = sorted({k for st in states for k in st})
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            values = [st.get(key) for st in states]
            if all(torch.is_tensor(v) and v.shape == mp.shape for v, mp in zip(values, self.master_params)):
                out[key] = values[0] if len(values) == 1 else torch.cat(values)
            else:
                first = next(v for v in values if v is not None)
                out[key] = first.detach().clone() if torch.is_tensor(first) else torch.tensor(float(first))
        return out

    @torch.no_grad()
    def load_full(self, master: torch.Tensor, optimizer_states: Optional[Mapping[str, Any]] = None) -> None:
        """Fill this rank's partitions from full canonical vectors (see partition.py).

        ``master``: every parameter's fp32 value, length ``layout.numel``. ``optimizer_states``:
        per-element states as vectors of the same length, scalars (``step``) as numbers or
        0-dim tensors. Works whatever world size or stage wrote them: that is resharding.
        """
        master = master.to(dtype=torch.float32)
        self.load_master_partition(self.layout.shard(master, self._rank))
        if optimizer_states:
            self._load_states(optimizer_states)

    @torch.no_grad()
    def load_master_partition(self, local: torch.Tensor) -> None:
        """This rank's new fp32 master partition (``layout.partition_numel``), published to the model."""
        if self.nvme is not None:
            self.nvme.load_partitions({"master": local})
            self._publish_params(True)
            return
        self.adopt_master_partition(local)
        self._publish_params(False)

    @torch.no_grad()
    def adopt_master_partition(self, local: torch.Tensor) -> None:
        """``local`` becomes this rank's fp32 master partition, without publishing it (a load that
        published it already with ``publish_partition``)."""
        for g, view in zip(self.layout.groups, self._masters):
            view.copy_(local[g.local_offset:g.local_offset + g.partition_numel])

    def publishes_apart(self) -> bool:
        """Whether ``publish_partition`` can show the model other values than the master's while the
        master stays as it is (a checkpoint load publishes before the optimizer files are verified,
        and takes it back by publishing the master again). Stages 1-2 with their own master copy."""
        return False

    def publish_partition(self, local: Optional[torch.Tensor]) -> None:
        """Publish ``local`` (a full fp32 partition) to the model's parameters on every rank without
        making it the master; ``None`` publishes the master again (see ``publishes_apart``)."""
        raise NotImplementedError(f"{type(self).__name__} publishes only its master")

    def _load_states(self, full_states: Mapping[str, Any]) -> None:
        if self.nvme is not None:
            self.nvme.load_full_states(full_states)
            return
        device = self._masters[0].device
        shards = {k: self.layout.shard(v.to(device, torch.float32), self._rank)
                  for k, v in full_states.items() if torch.is_tensor(v) and v.dim() == 1}
        state: dict[int, dict[str, Any]] = {}
        for i, g in enumerate(self.layout.groups):
            st: dict[str, Any] = {}
            for key, value in full_states.items():
                if key in shards:
                    st[key] = shards[key][g.local_offset:g.local_offset + g.partition_numel].clone()
                else:
                    st[key] = torch.tensor(float(value), dtype=torch.float32)
            state[i] = st
        sd = self.optimizer.state_dict()
        sd["state"] = state
        self.optimizer.load_state_dict(sd)

    live_peak_bytes = 0   # stage 3 overrides: the most gathered parameter bytes at once

    def offloaded_bytes(self) -> int:
        return 0

    @staticmethod
    def _bytes(t: Optional[torch.Tensor]) -> int:
        return 0 if t is None else t.numel() * t.element_size()

    def _state_bytes(self) -> int:
        return sum(self._bytes(v) for st in self.optimizer.state.values() for v in st.values() if torch.is_tensor(v))
