"""FSDP2's gathered-parameter memory, measured the way the scale simulator measures stage 3's.

Why: the scale table compares stage 3's staging peak (gathered units + all-gather staging, at
once) with the largest fetch unit plus the prefetch bucket. Whether a policy's peak is good is a
question of what the peer holds: torch's FSDP2 keeps the root module's parameters (a GPT's tied
embedding/head, final norm and position embedding) unsharded from forward through backward, and
copies each all-gather's flat output into per-parameter buffers, so its peak is its own to measure.

FSDP2 frees gathered memory by resizing storages to 0 (``free_storage``), so Python references
say nothing; what is alive is the storages' ``nbytes``. The probe sums, over every FSDP parameter
group, the distinct non-empty storages of

* each ``FSDPParam.all_gather_outputs`` (the unsharded parameters are views of them),
* the group's pending ``_all_gather_result.all_gather_output`` (issued, not yet copied out: a
  backward prefetch), and
* the communication context's ``all_gather_state`` (forward keeps the last flat output until the
  next group's copy-out, to overlap the two),

sampled after ``unshard`` (a flat output allocated), after ``_to_unsharded`` (copy-out done, the
flat output still referenced), after ``pre_backward`` (which prefetches the next group) and
before ``post_backward`` and ``reshard`` (the state while the module computed). These are private
attributes and methods of torch 2.13's ``torch/distributed/fsdp/_fully_shard`` (``_fsdp_param_group.py``:
``FSDPParamGroup.unshard/_to_unsharded/pre_backward/post_backward/reshard``, ``_all_gather_result``,
``comm_ctx.all_gather_state``; ``_fsdp_param.py``: ``FSDPParam.all_gather_outputs``); acceptable in
a simulator, and checked by the scale tests, which fail if the probe stops seeing a gather.

``peak_unsharded_bytes`` counts the unsharded parameters alone. The difference is FSDP2's design,
not noise: in forward, a group's flat output outlives its copy-out until the next group's
copy-out (``wait_for_unshard``'s deferred free), so just after the root's copy-out the root is
there twice (unsharded and flat) with block 0's flat output beside it.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

from torch import nn

__all__ = ["Fsdp2StagingProbe"]

# method name -> sample before the call (True) or after it (False)
_SAMPLED = {"unshard": False, "_to_unsharded": False, "pre_backward": False, "post_backward": True, "reshard": True}


class Fsdp2StagingProbe:
    """Peak bytes of FSDP2's unsharded parameters and all-gather outputs alive at once, over ``model``'s groups."""

    def __init__(self, model: nn.Module) -> None:
        self.groups = _param_groups(model)
        self.peak_bytes = 0            # unsharded parameters + all-gather outputs
        self.peak_unsharded_bytes = 0  # unsharded parameters alone (a lower bound: no flat outputs)

    def reset(self) -> None:
        self.peak_bytes = self.peak_unsharded_bytes = 0

    def live_bytes(self) -> tuple[int, int]:
        """(unsharded parameters + all-gather outputs, unsharded parameters alone) alive now."""
        unsharded: dict[int, int] = {}
        flat: dict[int, int] = {}
        for group in self.groups:
            _add_storages(unsharded, [t for param in group.fsdp_params for t in param.all_gather_outputs])
            pending = (group._all_gather_result, getattr(group.comm_ctx.all_gather_state, "all_gather_result", None))
            _add_storages(flat, [result.all_gather_output for result in pending if result is not None])
        return sum((flat | unsharded).values()), sum(unsharded.values())

    def sample(self) -> None:
        both, unsharded = self.live_bytes()
        self.peak_bytes = max(self.peak_bytes, both)
        self.peak_unsharded_bytes = max(self.peak_unsharded_bytes, unsharded)

    @contextlib.contextmanager
    def watching(self) -> Iterator["Fsdp2StagingProbe"]:
        """Sample at every gather, copy-out, backward start and release of any FSDP2 group."""
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        saved = {name: FSDPParamGroup.__dict__[name] for name in _SAMPLED}
        for name, before in _SAMPLED.items():
            setattr(FSDPParamGroup, name, self._probed(saved[name], before))
        try:
            yield self
        finally:
            for name, method in saved.items():
                setattr(FSDPParamGroup, name, method)

    def _probed(self, method: Any, before: bool) -> Any:
        @functools.wraps(method)
        def probed(group: Any, *args: Any, **kwargs: Any) -> Any:
            if before:
                self.sample()
            out = method(group, *args, **kwargs)
            if not before:
                self.sample()
            return out
        return probed


def _add_storages(into: dict[int, int], tensors: list[Any]) -> None:
    for t in tensors:
        storage = t.untyped_storage()
        if storage.nbytes():
            into[storage.data_ptr()] = storage.nbytes()


def _param_groups(model: nn.Module) -> list[Any]:
    groups: dict[int, Any] = {}
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        if get_state is None:
            continue
        for group in get_state()._fsdp_param_groups:
            groups[id(group)] = group
    if not groups:
        raise ValueError("no FSDP2 parameter groups under the model: call fully_shard first")
    return list(groups.values())
