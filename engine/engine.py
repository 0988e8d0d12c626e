"""The Engine: DeepSpeed's training-step protocol on top of the ZeRO optimizer.

This module only orchestrates. ``engine(batch)`` runs the module, ``backward(loss)`` scales
the loss and brackets autograd so the ZeRO optimizer knows whether this micro-step reduces
gradients, ``step()`` counts micro-steps and, at accumulation boundaries, steps the optimizer
and the LR schedule. Everything about buffers, communication and the update itself lives in
zero/ (stage12.py for stages 0-2, stage3.py for stage 3); precision in precision.py.

As in DeepSpeed, ``step()`` is called after every micro-batch; the loss passed to
``backward`` is divided by ``gradient_accumulation_steps`` so that the accumulated gradient is
the mean over the global batch, and a step skipped for fp16 overflow does not advance the LR
schedule (but does count in ``global_steps`` and ``skipped_steps``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .checkpoint.engine_methods import CheckpointMethods
from .comm import Comm, get_local_rank
from .config.batch import BatchSizes
from .log import get_logger
from .monitor.engine_hooks import EngineMonitoring
from .precision import PrecisionPolicy
from .zero.base import PartitionedOptimizer

__all__ = ["Engine", "TrainingCounters"]

log = get_logger()


@dataclass
class TrainingCounters:
    """Progress counters; Stateful so a checkpoint can save and restore them."""

    global_steps: int = 0      # optimizer steps attempted (skipped ones included, as DeepSpeed)
    global_samples: int = 0
    micro_steps: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in asdict(self):
            setattr(self, key, int(state[key]))


def _counter(name: str) -> property:
    return property(lambda self: getattr(self.counters, name),
                    lambda self, value: setattr(self.counters, name, int(value)))


class Engine(CheckpointMethods, nn.Module):
    """What ``engine.initialize`` returns first: the model wrapped for ZeRO training."""

    global_steps = _counter("global_steps")
    global_samples = _counter("global_samples")
    micro_steps = _counter("micro_steps")
    skipped_steps = _counter("skipped_steps")

    def __init__(self, module: nn.Module, optimizer: PartitionedOptimizer, lr_scheduler: Any, config: Any,
                 batch: BatchSizes, comm: Comm, device: torch.device, policy: PrecisionPolicy,
                 training_dataloader: Any = None) -> None:
        super().__init__()
        self.module = module
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.config = config
        self.comm = comm
        self.device = device
        self.precision = policy
        self.training_dataloader = training_dataloader
        self.counters = TrainingCounters()
        self._batch = batch
        self._last_step_applied = True
        self._since_boundary = 0   # micro-steps taken since the last optimizer step
        # The ds_config's monitoring sections; ``monitor`` is DeepSpeed's ``engine.monitor``.
        self.monitoring = EngineMonitoring.build(config, module, comm)
        self.monitor = self.monitoring.monitor

    # -- the training-step protocol ----------------------------------------------------------
    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """Run the module; in fp16/bf16, floating-point inputs are cast to the model's dtype."""
        if self.precision.mixed:
            inputs, kwargs = _cast_floats((inputs, kwargs), self.precision.model_dtype)
        with self.monitoring.forward(self.counters.global_steps):
            return self.module(*inputs, **kwargs)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
        """Backpropagate ``loss / gradient_accumulation_steps × loss_scale``; reduce on boundaries."""
        scaled = loss.float()
        if self.gradient_accumulation_steps() > 1:
            scaled = scaled / self.gradient_accumulation_steps()
        if self.loss_scale != 1.0:
            scaled = scaled * self.loss_scale
        self.optimizer.begin_backward(self.is_gradient_accumulation_boundary())
        with self.monitoring.backward():
            scaled.backward(retain_graph=retain_graph)
        self.optimizer.end_backward()
        return loss

    def step(self) -> None:
        """Call after every micro-batch; updates the weights at accumulation boundaries."""
        if self.is_gradient_accumulation_boundary():
            self._last_step_applied = self.optimizer.step()
            if not self._last_step_applied:
                self.counters.skipped_steps += 1
            elif self.lr_scheduler is not None:
                self.lr_scheduler.step()
            self.counters.global_steps += 1
            self.counters.global_samples += self.train_batch_size()
            self._report_progress()
            self.monitoring.after_step(self)
            self._since_boundary = 0
        else:
            self._since_boundary += 1
        self.counters.micro_steps += 1

    def is_gradient_accumulation_boundary(self) -> bool:
        return self._since_boundary + 1 >= self.gradient_accumulation_steps()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def was_step_skipped(self) -> bool:
        """Whether the last optimizer step was skipped (fp16 overflow / non-finite gradients)."""
        return not self._last_step_applied

    # -- what DeepSpeed scripts read ---------------------------------------------------------
    def train_batch_size(self) -> int:
        return self._batch.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self._batch.micro

    def gradient_accumulation_steps(self) -> int:
        return self._batch.gradient_accumulation_steps

    def set_gradient_accumulation_steps(self, steps: int) -> None:
        """Change accumulation (e.g. after an elastic restart) keeping micro-batch and world size."""
        if steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {steps}")
        if self._since_boundary:
            raise RuntimeError("set_gradient_accumulation_steps must be called between optimizer steps, "
                               f"not {self._since_boundary} micro-step(s) into one")
        micro, world = self._batch.micro, self.world_size
        self._batch = BatchSizes(micro * steps * world, micro, steps, world)

    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> Optional[torch.Tensor]:
        """The last step's gradient norm as a 0-dim device tensor (None before the first step), as
        DeepSpeed's ZeRO engines return it: reading it (``float()``) is a host sync, so convert it
        only when logging."""
        return self.optimizer.global_grad_norm

    @property
    def loss_scale(self) -> float:
        return self.optimizer.loss_scaler.loss_scale

    @property
    def loss_scaler(self) -> Any:
        return self.optimizer.loss_scaler

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def global_rank(self) -> int:
        return self.comm.rank

    @property
    def local_rank(self) -> int:
        return get_local_rank()

    @property
    def activation_checkpointing_enabled(self) -> bool:
        """The ``activation_checkpointing.enabled`` switch (or the ``gradient_checkpointing`` alias)."""
        return bool(self.config.activation_checkpointing.enabled)

    def steps_per_print(self) -> Optional[int]:
        return self.config.steps_per_print

    def zero_optimization_stage(self) -> int:
        return self.optimizer.stage

    def gradient_clipping(self) -> float:
        return self.optimizer.settings.gradient_clipping

    def fp16_enabled(self) -> bool:
        return self.precision.name == "fp16"

    def bfloat16_enabled(self) -> bool:
        return self.precision.name == "bf16"

    def model_state_bytes(self) -> dict[str, int]:
        """Bytes of model states on this rank: params, grads, master, optimizer_states, buffers."""
        out = self.optimizer.model_state_bytes()
        out["params"] += self._unmanaged_param_bytes()
        return out

    def model_state_split(self) -> dict[str, int]:
        """Where this rank's model states live: ``device`` (the training device), ``offloaded``
        (host memory, by ``offload_optimizer``/``offload_param``), and ``live_peak`` (stage 3: the
        most parameter bytes gathered at once so far; 0 otherwise)."""
        total = sum(self.model_state_bytes().values())
        offloaded = self.optimizer.offloaded_bytes()
        return {"device": total - offloaded, "offloaded": offloaded, "live_peak": self.optimizer.live_peak_bytes}

    def _unmanaged_param_bytes(self) -> int:
        """Parameters no optimizer partition holds (frozen ones below stage 3), counted whole."""
        held = list(self.optimizer.params) + list(getattr(self.optimizer, "frozen_params", ()))
        managed = {id(p) for p in held}
        return sum(p.numel() * p.element_size() for p in self.module.parameters() if id(p) not in managed)

    def save_16bit_model(self, save_dir: str, save_filename: str = "pytorch_model.bin",
                         exclude_frozen_parameters: bool = False) -> bool:
        """Rank 0 writes the model's weights in the training dtype as one ``torch.save`` file.

        Every rank must call it. At stage 3 the weights are gathered one module at a time, and only
        when ``zero_optimization.stage3_gather_16bit_weights_on_model_save`` is true (as in
        DeepSpeed; otherwise nothing is written and False is returned). Returns whether it saved.
        """
        from .zero.save16 import save_16bit_model

        return save_16bit_model(self, save_dir, save_filename, exclude_frozen_parameters)

    def _report_progress(self) -> None:
        every = self.config.steps_per_print
        if every and self.global_rank == 0 and self.counters.global_steps % every == 0:
            lr = ", ".join(f"{x:.3e}" for x in self.get_lr())
            norm = self.get_global_grad_norm()
            log.info(f"step={self.counters.global_steps} skipped={self.counters.skipped_steps} lr=[{lr}] "
                     f"loss_scale={self.loss_scale:g} grad_norm={None if norm is None else f'{float(norm):.4g}'}")


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        cast = [_cast_floats(v, dtype) for v in value]
        return type(value)(*cast) if hasattr(value, "_fields") else type(value)(cast)
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value
