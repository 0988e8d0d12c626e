"""``Engine.save_16bit_model``: the model's weights, whole and in the training dtype, in one file.

DeepSpeed's ``save_16bit_model`` writes ``module.state_dict()`` from rank 0 so the weights load
into the plain model (``load_state_dict(torch.load(path))``) for inference or export. At stages
0-2 every rank holds every weight; at stage 3 they are gathered one fetch unit at a time to the
host, and only when ``stage3_gather_16bit_weights_on_model_save`` allows it (gathering a large
model is expensive; DeepSpeed then writes nothing, warns and returns False, and so do we).
Names are the plain model's (no ``module.`` prefix), tied weights appear under each of their names.
Frozen parameters are included (stage 3 gathers them like the trainable ones) unless
``exclude_frozen_parameters``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_16bit_model"]


def save_16bit_model(engine: Any, save_dir: str | os.PathLike[str], save_filename: str = "pytorch_model.bin",
                     exclude_frozen_parameters: bool = False) -> bool:
    """See ``Engine.save_16bit_model``. Collective: every rank calls it; rank 0 writes."""
    from ..checkpoint.state_names import unwrap

    opt = engine.optimizer
    if opt.stage == 3:
        if not opt.settings.gather_16bit_weights_on_model_save:
            warnings.warn("save_16bit_model: zero_optimization.stage3_gather_16bit_weights_on_model_save is false, "
                          "so the stage-3 weights were not gathered and nothing was saved; set it to true, or use "
                          "save_checkpoint() and `orch ckpt consolidate`", stacklevel=3)
            return False
        state = opt.full_state_dict(engine.module, rank0_only=True, frozen=not exclude_frozen_parameters)
    else:
        state = {k: v.detach().to("cpu", copy=True) for k, v in unwrap(engine.module).state_dict().items()} \
            if engine.global_rank == 0 else {}
    if exclude_frozen_parameters and state:
        frozen = {n for n, p in unwrap(engine.module).named_parameters(remove_duplicate=False) if not p.requires_grad}
        state = {k: v for k, v in state.items() if k not in frozen}
    if engine.global_rank == 0:
        path = Path(save_dir) / save_filename
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
    if engine.comm.active:
        torch.distributed.barrier(group=engine.comm.group)
    return True
