"""DeepSpeed's batch-size rule, and choosing batch sizes when the world size changes.

``train_batch_size = train_micro_batch_size_per_gpu × gradient_accumulation_steps × world size``
(world size = data-parallel ranks). As in DeepSpeed, any two of the three (with the world size)
determine the third; ``train_batch_size`` alone means accumulation 1 and micro = batch / world;
micro alone means accumulation 1. Unlike DeepSpeed, which floors the division and then fails
an assertion, a value that does not divide is reported with the arithmetic and a fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError, ConfigProblem

TB, MB, GAS = "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"


@dataclass(frozen=True)
class BatchSizes:
    """The three batch sizes for one world size; ``note`` explains any adjustment that was made."""

    train_batch_size: int
    train_micro_batch_size_per_gpu: int
    gradient_accumulation_steps: int
    world_size: int = 1
    note: str = field(default="", compare=False)

    @property
    def micro(self) -> int:
        return self.train_micro_batch_size_per_gpu

    @property
    def exact(self) -> bool:
        """False when ``batch_for_world_size`` could not keep the requested global batch."""
        return not self.note

    def __str__(self) -> str:
        return (f"train_batch_size {self.train_batch_size} = micro {self.micro} × accumulation "
                f"{self.gradient_accumulation_steps} × world size {self.world_size}")


def resolve_batch(tb: int | None, mb: int | None, gas: int | None, world_size: int,
                  auto_missing: frozenset[str] = frozenset()) -> BatchSizes:
    """Fill in the missing batch value(s) for ``world_size`` or raise ConfigError showing the arithmetic."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError([ConfigProblem("world_size", f"must be a positive integer, got {world_size!r}")])
    w = world_size
    if tb is not None and mb is not None and gas is not None:
        if tb != mb * gas * w:
            raise _err(TB, f"{TB} {tb} != {MB} {mb} × {GAS} {gas} × world size {w} = {mb * gas * w}",
                       f"set {TB} to {mb * gas * w}, or remove one of the three keys so it is computed")
        return BatchSizes(tb, mb, gas, w)
    if tb is not None and mb is not None:
        if tb % (mb * w):
            raise _err(TB, f"{TB} {tb} is not divisible by {MB} {mb} × world size {w} = {mb * w}, so "
                       f"{GAS} = {tb} / {mb * w} is not a whole number",
                       _fix_multiple(tb, mb * w, f"multiples of {mb} × {w}")
                       + _fix_divisors(tb // w if tb % w == 0 else None, MB))
        return BatchSizes(tb, mb, tb // (mb * w), w)
    if tb is not None and gas is not None:
        if tb % (gas * w):
            raise _err(TB, f"{TB} {tb} is not divisible by {GAS} {gas} × world size {w} = {gas * w}, so "
                       f"{MB} = {tb} / {gas * w} is not a whole number",
                       _fix_multiple(tb, gas * w, f"multiples of {gas} × {w}") + _fix_world(tb // gas if tb % gas == 0
                                                                                           else None))
        return BatchSizes(tb, tb // (gas * w), gas, w)
    if mb is not None and gas is not None:
        return BatchSizes(mb * gas * w, mb, gas, w)
    if tb is not None:
        if tb % w:
            raise _err(TB, f"{TB} {tb} is not divisible by world size {w}, so {MB} = {tb} / {w} "
                       "is not a whole number", _fix_multiple(tb, w, f"multiples of {w}") + _fix_world(tb))
        return BatchSizes(tb, tb // w, 1, w)
    if mb is not None:
        return BatchSizes(mb * w, mb, 1, w)
    missing = " and ".join(k for k in (TB, MB) if k in auto_missing)
    why = f' ({missing} is "auto" but auto_values had no value for it)' if missing else ""
    raise _err(MB, f"neither {TB} nor {MB} is set{why}",
               f"set {MB} (per-rank batch) or {TB} (global batch) in the ds_config, "
               f"or pass auto_values={{'{MB}': N}}")


def batch_for_world_size(tb: int, mb: int, world_size: int, keep_global: bool = True,
                         gas: int = 1) -> BatchSizes:
    """Batch sizes for a new world size after an elastic restart.

    keep_global: keep ``train_batch_size`` (the global batch, which the optimizer's behaviour
    depends on) by changing the accumulation steps, with the micro batch fixed. When that is
    impossible, return the nearest valid alternative, preferring the exact global batch with a
    smaller micro batch, then the closest global batch; ``note`` says what was changed and why.
    Otherwise keep micro batch and accumulation, letting the global batch scale with the world.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError([ConfigProblem("world_size", f"must be a positive integer, got {world_size!r}")])
    w = world_size
    if not keep_global:
        return BatchSizes(mb * gas * w, mb, gas, w)
    if tb % (mb * w) == 0:
        return BatchSizes(tb, mb, tb // (mb * w), w)
    best: tuple[int, int, int] | None = None  # (distance, -micro, global)
    for micro in range(mb, 0, -1):
        step = micro * w
        lower = max(step, (tb // step) * step)
        for candidate in {lower, lower + step}:
            key = (abs(candidate - tb), -micro, candidate)
            if best is None or key < best:
                best = key
    assert best is not None
    _, neg_micro, new_tb = best
    micro = -neg_micro
    why = f"{TB} {tb} is not divisible by {MB} {mb} × world size {w} = {mb * w}"
    if new_tb == tb:
        note = f"{why}; keeping the global batch {tb} with a smaller micro batch {micro}"
    else:
        note = (f"{why}, and no micro batch <= {mb} divides it; using the nearest global batch {new_tb} "
                f"(micro {micro} × accumulation {new_tb // (micro * w)} × {w})")
    return BatchSizes(new_tb, micro, new_tb // (micro * w), w, note=note)


def _err(path: str, message: str, hint: str) -> ConfigError:
    return ConfigError([ConfigProblem(path, message, hint)])


def _fix_multiple(value: int, step: int, label: str) -> str:
    below = (value // step) * step
    options = [v for v in (below, below + step) if v > 0]
    return f"set {TB} to {' or '.join(map(str, options))} ({label})"


def _fix_divisors(per_rank: int | None, key: str) -> str:
    if not per_rank:
        return ""
    return f", or set {key} to a divisor of {per_rank}: {_short(_divisors(per_rank))}"


def _fix_world(total: int | None) -> str:
    if not total:
        return ""
    return f", or run on a world size that divides {total}: {_short(_divisors(total))}"


def _short(values: list[int]) -> str:
    return ", ".join(map(str, values)) if len(values) <= 10 else ", ".join(map(str, values[:9])) + ", ..."


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))
