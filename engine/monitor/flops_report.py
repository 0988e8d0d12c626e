"""The flops profiler's report: DeepSpeed's three parts (summary, top modules per depth, detailed tree)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .flops_profile import ModuleProfile, StepProfile

RULE = "-" * 30


def number(value: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.4g} {unit}".rstrip()


def seconds(value: float) -> str:
    return f"{value * 1000:.2f} ms" if value < 1 else f"{value:.2f} s"


def summary_lines(p: StepProfile) -> list[str]:
    def rate(flops: float, s: float) -> str:
        return number(flops / s, "FLOPS") if s > 0 else "n/a"

    rows = [
        ("params per device", number(p.params)),
        ("fwd FLOPs per device", number(p.fwd_flops)),
        ("bwd FLOPs per device", number(p.bwd_flops)),
        ("fwd+bwd FLOPs per device", number(p.total_flops)),
        ("fwd latency", seconds(p.fwd_latency_s)),
        ("bwd latency", seconds(p.bwd_latency_s)),
        ("fwd FLOPS per device = fwd FLOPs / fwd latency", rate(p.fwd_flops, p.fwd_latency_s)),
        ("bwd FLOPS per device = bwd FLOPs / bwd latency", rate(p.bwd_flops, p.bwd_latency_s)),
        ("fwd+bwd FLOPS per device", rate(p.total_flops, p.fwd_latency_s + p.bwd_latency_s)),
        ("step latency (incl. optimizer)", seconds(p.step_latency_s)),
    ]
    lines = [f"{RULE} orch flops profiler {RULE}", f"Profile summary at step {p.step}:",
             "Notations: FLOPs = floating-point operations (a multiply-add is 2), FLOPS = FLOPs per second,",
             "fwd = forward, bwd = backward; counted by torch's FlopCounterMode (matmul-class ops)", ""]
    lines += [f"{name + ':':<52}{value}" for name, value in rows]
    if p.flops_by_op:
        lines.append("FLOPs by op: " + ", ".join(f"{op} {number(f)}" for op, f in sorted(p.flops_by_op.items())))
    return lines


def top_lines(p: StepProfile, depth_limit: int, top: int) -> list[str]:
    depths = sorted({m.depth for m in p.modules})
    if depth_limit >= 0:
        depths = [d for d in depths if d <= depth_limit]
    lines = ["", f"{RULE} Aggregated profile per device {RULE}",
             f"Top {top} modules in terms of params, FLOPs or fwd latency at different model depths:"]
    for depth in depths:
        at = [m for m in p.modules if m.depth == depth]
        lines.append(f"depth {depth}:")
        for label, key, fmt in (("params", lambda m: m.params, number),
                                ("fwd FLOPs", lambda m: m.fwd_flops, number),
                                ("fwd latency", lambda m: m.fwd_latency_s, seconds)):
            best = sorted(at, key=key, reverse=True)[:top]
            lines.append(f"    {label:<12}- {{{', '.join(f'{_label(m)!r}: {fmt(key(m))!r}' for m in best)}}}")
    return lines


def detailed_lines(p: StepProfile, depth_limit: int) -> list[str]:
    total_fwd = max(p.fwd_flops, 1)
    lines = ["", f"{RULE} Detailed profile per device {RULE}",
             "Each module: params, fwd FLOPs (% of the model's), fwd latency, fwd TFLOP/s; "
             "a module's figures include its children's.",
             f"{'module':<40}{'type':<22}{'params':>12}{'fwd FLOPs':>14}{'%':>8}{'fwd latency':>14}{'TFLOP/s':>10}"]
    for m in p.modules:
        if depth_limit >= 0 and m.depth > depth_limit:
            continue
        name = "  " * m.depth + _label(m)
        lines.append(f"{name:<40}{m.type:<22}{number(m.params):>12}{number(m.fwd_flops):>14}"
                     f"{100.0 * m.fwd_flops / total_fwd:>7.2f}%{seconds(m.fwd_latency_s):>14}"
                     f"{m.fwd_tflops_per_s:>10.4f}")
    return lines


def format_report(p: StepProfile, section: Any) -> str:
    depth = int(section.module_depth)
    lines = summary_lines(p) + top_lines(p, depth, int(section.top_modules))
    if section.detailed:
        lines += detailed_lines(p, depth)
    lines.append(RULE * 3)
    return "\n".join(lines) + "\n"


def write_report(p: StepProfile, section: Any, out: Callable[[str], None] | None = None) -> str:
    text = format_report(p, section)
    if section.output_file:
        path = Path(section.output_file).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    elif out is not None:
        out(text)
    else:
        from engine.log import get_logger

        get_logger("engine.monitor").info(text)
    return text


def _label(m: ModuleProfile) -> str:
    return m.name or "(model)"
