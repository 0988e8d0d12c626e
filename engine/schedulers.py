"""DeepSpeed's learning-rate schedules, with its parameter names and step semantics.

A ds_config's ``scheduler`` section must produce the same learning rates here as under
DeepSpeed (deepspeed/runtime/lr_schedules.py), so the rules are DeepSpeed's:

* constructing a schedule sets the first learning rate at once (``last_batch_iteration`` -1);
* ``step()`` advances one *optimizer* step; the engine does not call it for a skipped
  (overflowed) fp16 step, as DeepSpeed does not;
* warm-up ``"log"`` grows as ``log(i + 1) / log(warmup_num_steps)``, ``"linear"`` as
  ``i / warmup_num_steps``; ``warmup_num_steps`` is at least 2;
* OneCycle cycles momentum inversely to the lr and writes ``betas = (momentum, 0.99)``.

Every schedule is Stateful (``state_dict`` / ``load_state_dict``); loading also re-applies the
learning rate, so a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

from torch.optim import Optimizer

__all__ = ["LRRangeTest", "OneCycle", "SCHEDULES", "WarmupCosineLR", "WarmupDecayLR", "WarmupLR", "build_scheduler"]

PerGroup = Union[float, Sequence[float]]


def _torch_optimizer(optimizer: Any) -> Optimizer:
    """The torch optimizer whose param_groups carry the lr (ours wraps one as ``.optimizer``)."""
    if isinstance(optimizer, Optimizer):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, Optimizer):
        return inner
    raise TypeError(f"{type(optimizer).__name__} is not a torch.optim.Optimizer and does not wrap one")


class _Schedule:
    """Shared mechanics: the iteration counter, applying lrs, and the Stateful protocol."""

    def __init__(self, optimizer: Any, last_batch_iteration: int = -1) -> None:
        self.optimizer = _torch_optimizer(optimizer)
        self.last_batch_iteration = last_batch_iteration
        self._last_lr: list[float] = [g["lr"] for g in self.optimizer.param_groups]

    def _per_group(self, value: PerGroup, name: str) -> list[float]:
        groups = len(self.optimizer.param_groups)
        if isinstance(value, (list, tuple)):
            if len(value) != groups:
                raise ValueError(f"{name}: expected {groups} values (one per parameter group), got {len(value)}")
            return [float(v) for v in value]
        return [float(value)] * groups

    def get_lr(self) -> list[float]:
        raise NotImplementedError

    def _apply(self) -> None:
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            if hasattr(group["lr"], "fill_"):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = list(lrs)

    def step(self, last_batch_iteration: Optional[int] = None) -> None:
        self.last_batch_iteration = self.last_batch_iteration + 1 if last_batch_iteration is None \
            else last_batch_iteration
        self._apply()

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last_batch_iteration = int(state["last_batch_iteration"])
        self._apply()


def _warmup_fraction(iteration: int, steps: int, kind: str) -> float:
    if kind == "linear":
        return iteration / steps
    return math.log(iteration + 1) / math.log(steps)


class WarmupLR(_Schedule):
    """From ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps``, then constant.

    ``warmup_max_lr`` None means the optimizer's own lr (DeepSpeed's behaviour).
    """

    def __init__(self, optimizer: Any, warmup_min_lr: PerGroup = 0.0, warmup_max_lr: Optional[PerGroup] = None,
                 warmup_num_steps: int = 1000, warmup_type: str = "log", last_batch_iteration: int = -1) -> None:
        super().__init__(optimizer, last_batch_iteration)
        if warmup_num_steps < 1:
            raise ValueError(f"warmup_num_steps must be a positive integer, got {warmup_num_steps}")
        if warmup_max_lr is None:
            warmup_max_lr = [float(g["lr"]) for g in self.optimizer.param_groups]
        self.min_lrs = self._per_group(warmup_min_lr, "warmup_min_lr")
        self.max_lrs = self._per_group(warmup_max_lr, "warmup_max_lr")
        self.warmup_num_steps = max(2, int(warmup_num_steps))
        self.warmup_type = warmup_type if warmup_type in ("log", "linear") else "log"
        if last_batch_iteration == -1:
            self._apply()

    def _gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return _warmup_fraction(self.last_batch_iteration, self.warmup_num_steps, self.warmup_type)
        return 1.0

    def get_lr(self) -> list[float]:
        if self.last_batch_iteration < 0:
            return list(self.min_lrs)
        gamma = self._gamma()
        return [lo + (hi - lo) * gamma for lo, hi in zip(self.min_lrs, self.max_lrs)]


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then linear decay to 0 at ``total_num_steps``."""

    def __init__(self, optimizer: Any, total_num_steps: int, warmup_min_lr: PerGroup = 0.0,
                 warmup_max_lr: PerGroup = 0.001, warmup_num_steps: int = 1000, warmup_type: str = "log",
                 last_batch_iteration: int = -1) -> None:
        self.total_num_steps = int(total_num_steps)
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type, last_batch_iteration)

    def _gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return super()._gamma()
        remaining = self.total_num_steps - self.last_batch_iteration
        return max(0.0, remaining / max(1.0, self.total_num_steps - self.warmup_num_steps))


class WarmupCosineLR(_Schedule):
    """Ratio of the optimizer's lr: warm up from ``warmup_min_ratio`` to 1, then cosine to ``cos_min_ratio``."""

    def __init__(self, optimizer: Any, total_num_steps: int, warmup_min_ratio: float = 0.0,
                 warmup_num_steps: int = 1000, cos_min_ratio: float = 0.0001, warmup_type: str = "log",
                 last_batch_iteration: int = -1) -> None:
        super().__init__(optimizer, last_batch_iteration)
        if warmup_num_steps < 1:
            raise ValueError(f"warmup_num_steps must be a positive integer, got {warmup_num_steps}")
        self.total_num_steps = int(total_num_steps)
        self.warmup_min_ratio = float(warmup_min_ratio)
        self.warmup_num_steps = max(2, int(warmup_num_steps))
        self.cos_min_ratio = float(cos_min_ratio)
        self.warmup_type = warmup_type if warmup_type in ("log", "linear") else "log"
        self.base_lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        if last_batch_iteration == -1:
            self._apply()

    def get_lr_ratio(self) -> float:
        i = self.last_batch_iteration
        if i < 0:
            return 0.0
        if i < self.warmup_num_steps:
            frac = _warmup_fraction(i, self.warmup_num_steps, self.warmup_type)
            return self.warmup_min_ratio + frac * (1.0 - self.warmup_min_ratio)
        progress = min(1.0, (i - self.warmup_num_steps + 1) / max(1, self.total_num_steps - self.warmup_num_steps))
        cosine = (1 + math.cos(math.pi * progress)) / 2
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def get_lr(self) -> list[float]:
        ratio = self.get_lr_ratio()
        return [lr * ratio for lr in self.base_lrs]


class OneCycle(_Schedule):
    """1Cycle: lr up from ``cycle_min_lr`` to ``cycle_max_lr`` and back, then optional decay.

    Momentum (``betas[0]``) moves the opposite way between ``cycle_max_mom`` and
    ``cycle_min_mom`` when the optimizer has betas; stair counts hold values flat in steps.
    """

    def __init__(self, optimizer: Any, cycle_min_lr: PerGroup, cycle_max_lr: PerGroup, decay_lr_rate: float = 0.0,
                 cycle_first_step_size: int = 2000, cycle_second_step_size: Optional[int] = None,
                 cycle_first_stair_count: int = 0, cycle_second_stair_count: Optional[int] = None,
                 decay_step_size: int = 0, cycle_momentum: bool = True, cycle_min_mom: PerGroup = 0.8,
                 cycle_max_mom: PerGroup = 0.9, decay_mom_rate: float = 0.0, last_batch_iteration: int = -1) -> None:
        super().__init__(optimizer, last_batch_iteration)
        first = float(cycle_first_step_size)
        second = float(cycle_second_step_size) if cycle_second_step_size is not None else first
        if first <= 0 or second < 0:
            raise ValueError(f"cycle_first_step_size must be > 0 and cycle_second_step_size >= 0, got {first}, {second}")
        self.first_step_size, self.second_step_size = first, second
        self.total_size = first + second
        self.step_ratio = first / self.total_size
        self.first_stair_count = cycle_first_stair_count
        self.second_stair_count = cycle_first_stair_count if cycle_second_stair_count is None \
            else cycle_second_stair_count
        self.decay_step_size = decay_step_size
        self.min_lrs = self._per_group(cycle_min_lr, "cycle_min_lr")
        self.max_lrs = self._per_group(cycle_max_lr, "cycle_max_lr")
        self.decay_lr_rate = decay_lr_rate
        no_decay = math.isclose(decay_step_size, 0)
        self.skip_lr_decay = no_decay or math.isclose(decay_lr_rate, 0)
        self.skip_mom_decay = no_decay or math.isclose(decay_mom_rate, 0)
        self.decay_mom_rate = decay_mom_rate
        self.cycle_momentum = bool(cycle_momentum) and "betas" in self.optimizer.defaults
        self.min_moms = self._per_group(cycle_min_mom, "cycle_min_mom")
        self.max_moms = self._per_group(cycle_max_mom, "cycle_max_mom")
        if last_batch_iteration == -1:
            for group, lr in zip(self.optimizer.param_groups, self.min_lrs):
                group["lr"] = lr
            self._last_lr = list(self.min_lrs)
            if self.cycle_momentum:
                self._set_momentum(self.min_moms)

    def _scale_factor(self) -> float:
        iteration = self.last_batch_iteration + 1
        cycle = math.floor(1 + iteration / self.total_size)
        x = 1.0 + iteration / self.total_size - cycle
        if x <= self.step_ratio:
            scale, stairs = x / self.step_ratio, self.first_stair_count
        else:
            scale, stairs = (x - 1) / (self.step_ratio - 1), self.second_stair_count
        if stairs > 0:  # quantise from the integer position, as DeepSpeed does
            pos = iteration % self.total_size
            if pos <= self.first_step_size:
                where = pos * stairs / self.first_step_size
            else:
                where = (self.total_size - pos) * stairs / self.second_step_size
            scale = math.floor(where) / stairs
        return scale

    def get_lr(self) -> list[float]:
        if self.last_batch_iteration < self.total_size:
            scale = self._scale_factor()
            return [lo + (hi - lo) * scale for lo, hi in zip(self.min_lrs, self.max_lrs)]
        if self.skip_lr_decay:
            return list(self.min_lrs)
        interval = (self.last_batch_iteration - self.total_size + 1) / self.decay_step_size
        return [lo / (1 + self.decay_lr_rate * interval) for lo in self.min_lrs]

    def get_mom(self) -> list[float]:
        if self.last_batch_iteration < self.total_size:
            scale = self._scale_factor()
            return [hi - (hi - lo) * scale for lo, hi in zip(self.min_moms, self.max_moms)]
        if self.skip_mom_decay:
            return list(self.max_moms)
        interval = (self.last_batch_iteration - self.total_size + 1) / self.decay_step_size
        return [hi * (1 + self.decay_mom_rate * interval) for hi in self.max_moms]

    def _set_momentum(self, moms: list[float]) -> None:
        for group, mom in zip(self.optimizer.param_groups, moms):
            group["betas"] = (mom, 0.99)

    def _apply(self) -> None:
        super()._apply()
        if self.cycle_momentum:
            self._set_momentum(self.get_mom())


class LRRangeTest(_Schedule):
    """lr = ``lr_range_test_min_lr × (1 + step_rate × interval)``, interval continuous or staircase."""

    def __init__(self, optimizer: Any, lr_range_test_min_lr: PerGroup = 1e-3, lr_range_test_step_size: int = 2000,
                 lr_range_test_step_rate: float = 1.0, lr_range_test_staircase: bool = False,
                 last_batch_iteration: int = -1) -> None:
        super().__init__(optimizer, last_batch_iteration)
        if lr_range_test_step_size < 1:
            raise ValueError(f"lr_range_test_step_size must be a positive integer, got {lr_range_test_step_size}")
        self.min_lrs = self._per_group(lr_range_test_min_lr, "lr_range_test_min_lr")
        self.step_size = lr_range_test_step_size
        self.step_rate = lr_range_test_step_rate
        self.staircase = lr_range_test_staircase
        if last_batch_iteration == -1:
            for group, lr in zip(self.optimizer.param_groups, self.min_lrs):
                group["lr"] = lr
            self._last_lr = list(self.min_lrs)

    def get_lr(self) -> list[float]:
        interval = (self.last_batch_iteration + 1) / self.step_size
        if self.staircase:
            interval = math.floor(interval)
        return [lr * (1 + self.step_rate * interval) for lr in self.min_lrs]


SCHEDULES: dict[str, type[_Schedule]] = {
    "WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR, "WarmupCosineLR": WarmupCosineLR,
    "OneCycle": OneCycle, "LRRangeTest": LRRangeTest,
}


def build_scheduler(scheduler_cfg: Any, optimizer: Any) -> _Schedule:
    """The schedule a validated ``scheduler`` section names (its params already checked by config)."""
    return SCHEDULES[scheduler_cfg.type](optimizer, **dict(scheduler_cfg.params))
