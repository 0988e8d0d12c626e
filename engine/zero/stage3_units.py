"""Which parameters stage 3 gathers together: the fetch-unit plan, made before the layout.

The plan comes first because the layout follows it: every unit's parameters are sharded evenly
over the ranks as spans of their own (partition.py), so gathering a unit is one all-gather into
its buffer. A unit is

* the **persistent** parameters (``stage3_param_persistence_threshold`` elements or fewer, while
  their total stays under ``stage3_model_persistence_threshold``): kept gathered all the time;
* the parameters one module owns directly (a Linear's weight and bias), not persistent;
* a parameter no module owns, on its own.

Each of these is split into a trainable unit and a frozen one (``requires_grad=False``
parameters: released at a different moment, see stage3_hooks.py). Units are listed persistent
first, then in module order, which is the order a forward usually needs them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

__all__ = ["UnitPlan", "plan_units", "unit_keys"]


@dataclass(frozen=True)
class UnitPlan:
    """One fetch unit to build: a name for messages and the parameter indices it holds."""

    name: str
    params: tuple[int, ...]       # indices into the store's parameter list
    persistent: bool = False
    frozen: bool = False


def plan_units(module: nn.Module, params: Sequence[nn.Parameter], numels: Sequence[int], names: Sequence[str], *,
               trainable: int, persistence_threshold: int, model_persistence_threshold: int) -> list[UnitPlan]:
    """The units over ``params`` (``params[:trainable]`` the optimizer's, the rest frozen)."""
    index = {id(p): i for i, p in enumerate(params)}
    plans: list[UnitPlan] = []

    def add(name: str, indices: list[int], persistent: bool = False) -> None:
        hot = [i for i in indices if i < trainable]
        cold = [i for i in indices if i >= trainable]
        if hot:
            plans.append(UnitPlan(name, tuple(hot), persistent))
        if cold:
            plans.append(UnitPlan(f"{name} (frozen)", tuple(cold), persistent, frozen=True))

    persistent, total = [], 0
    for i, numel in enumerate(numels):
        if 0 < numel <= persistence_threshold and total + numel <= model_persistence_threshold:
            persistent.append(i)
            total += numel
    taken = set(persistent)
    add("(persistent)", persistent, persistent=True)
    for name, sub in module.named_modules(remove_duplicate=True):
        mine = []
        for p in sub._parameters.values():
            i = index.get(id(p)) if p is not None else None
            if i is not None and i not in taken and numels[i] > 0:
                mine.append(i)
                taken.add(i)
        add(name or "(root)", mine)
    for i, numel in enumerate(numels):   # parameters no submodule owns
        if i not in taken and numel > 0:
            add(names[i], [i])
    return plans


def unit_keys(plans: Sequence[UnitPlan], count: int) -> list[int]:
    """Per parameter, the index of its unit (-1: in none, an empty parameter): the layout's span keys."""
    keys = [-1] * count
    for u, plan in enumerate(plans):
        for i in plan.params:
            keys[i] = u
    return keys
