"""orch's ZeRO engine beside DDP, FSDP2 and DeepSpeed ZeRO-1/2: step time and peak memory, 2 gloo ranks.

Two workloads (issue 3), both fp32 GPTs from engine/models/presets.py, AdamW (lr 3e-4, betas
0.9/0.95, weight decay 0.1), gradient clipping 1.0:

* ``compute``: ``bench-27m`` (6 layers, d_model 512, 8 heads, seq 256, vocab 8192), micro-batch 8.
  The matmuls dominate. Goal: orch ZeRO-1/2 within 3 % of DDP.
* ``comm``: ``bench-100m`` (>= 100M parameters, seq 64), micro-batch 1. Gradient reduction and
  the optimizer dominate. Goal: orch ZeRO-2 <= 0.8x DeepSpeed ZeRO-2's step time, and peak RSS
  <= DeepSpeed's.

Candidates: ``ddp`` (DistributedDataParallel + torch AdamW ``fused=True``), ``fsdp2``
(``fully_shard`` per block and the root, same optimizer), ``deepspeed-z1``/``deepspeed-z2``
(``deepspeed.initialize``, its FusedAdam CPU op) and ``orch-z1``/``orch-z2``
(``engine.initialize``), the last four from the same ds_config.

Method: every candidate runs in its own ``torchrun`` launch (a fresh pair of processes, so
peak RSS is its own and nothing it allocates lingers for the next), with one compute thread per
rank. A launch takes ``warmup`` steps, then times ``steps`` steps, each bracketed by barriers
(so a step's time is the slowest rank's); the launch's figure is the median step. Rounds
interleave the candidates (in a rotated order each round) so load drifting on a shared machine
hits every candidate alike; the reported figure is the median over rounds, with the range of
the round medians, and the 1-minute load average seen before each launch says how busy it was.
Two figures beside it are less disturbed by other work on a shared machine: the fastest step
seen, and the CPU seconds per step of both ranks (gloo's threads included; it does not show
time spent waiting, so it cannot show the benefit of overlapping communication).

    python -m bench.engine_vs_peers [--rounds 3] [--steps 5] [--workload compute comm] [--record]
    python -m bench.engine_vs_peers --quick          # small shapes, 1 round: a smoke run
    python -m bench.engine_vs_peers --profile orch-z2 --workload comm   # where orch's step goes
    python -m bench.engine_vs_peers --workload compute --candidates ddp orch-z1 orch-z1-overlap

DeepSpeed candidates are skipped (with a note) when ``deepspeed`` is not importable; install it
with ``DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from bench.common import REPO, append_benchmarks_md, load_average, machine, peak_rss_mb

CANDIDATES = ("ddp", "fsdp2", "deepspeed-z1", "deepspeed-z2", "orch-z1", "orch-z2")
# Not run by default: the same ds_config plus "overlap_comm": true (DeepSpeed's default is off for
# stages 1-2), to see what overlapping the gradient reduction with backward is worth.
EXTRA_CANDIDATES = ("deepspeed-z1-overlap", "deepspeed-z2-overlap", "orch-z1-overlap", "orch-z2-overlap")
LR, BETAS, WEIGHT_DECAY, EPS, CLIP = 3e-4, (0.9, 0.95), 0.1, 1e-8, 1.0
WORLD = 2


@dataclass(frozen=True)
class Workload:
    """A model preset, its overrides, the micro-batch per rank and what it is meant to show."""

    name: str
    preset: str
    micro_batch: int
    goal: str
    overrides: dict[str, Any] = field(default_factory=dict)
    lora_rank: int = 0   # > 0: the whole model frozen, LoRA adapters of this rank on every block's Linears

    def describe(self) -> str:
        from engine.models import get_preset

        cfg = get_preset(self.preset, **self.overrides)
        millions = cfg.num_parameters() / 1e6
        lora = f", frozen, LoRA rank {self.lora_rank} on each block's 4 Linears" if self.lora_rank else ""
        return (f"{self.preset} ({millions:.1f}M params: {cfg.n_layer} layers, d_model {cfg.d_model}, "
                f"{cfg.n_head} heads, seq {cfg.seq_len}, vocab {cfg.vocab_size}){lora}, "
                f"micro-batch {self.micro_batch}, fp32")


WORKLOADS: dict[str, Workload] = {
    "compute": Workload("compute", "bench-27m", 8, "orch ZeRO-1/2 within 3 % of DDP"),
    "comm": Workload("comm", "bench-100m", 1,
                     "orch ZeRO-2 <= 0.8x DeepSpeed ZeRO-2 step time; peak RSS <= DeepSpeed's"),
}
# --quick: the same code paths on shapes that take seconds, to check the benchmark still runs.
QUICK_OVERRIDES: dict[str, dict[str, Any]] = {
    "compute": {"n_layer": 2, "seq_len": 64},
    "comm": {"n_layer": 2},
}


def ds_config(stage: int, micro_batch: int, overlap_comm: bool = False) -> dict[str, Any]:
    """The one ds_config DeepSpeed and orch both run (DeepSpeed's defaults for everything else)."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS,
                                                   "weight_decay": WEIGHT_DECAY}},
        "zero_optimization": {"stage": stage},
    }
    if overlap_comm:
        cfg["zero_optimization"]["overlap_comm"] = True
    return cfg


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


# ---------------------------------------------------------------------------------------------
# One rank of one launch (runs under torchrun)
# ---------------------------------------------------------------------------------------------
@dataclass
class Trainer:
    """The three phases of a training step, whatever library is behind them."""

    forward: Callable[[Any, Any], Any]
    backward: Callable[[Any], None]
    step: Callable[[], None]


def _torch_trainer(model: Any, wrapped: Any) -> Trainer:
    import torch

    try:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                fused=True)
    except (RuntimeError, TypeError):  # fused kernels refuse some tensor types (e.g. older DTensor)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Trainer(lambda x, y: wrapped(x, y), lambda loss: loss.backward(), step)


def _make_trainer(candidate: str, model: Any, micro_batch: int) -> Trainer:
    if candidate == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return _torch_trainer(model, DistributedDataParallel(model))
    if candidate == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return _torch_trainer(model, model)
    library, variant = candidate.split("-z")
    if library == "deepspeed":
        import deepspeed as lib
    else:
        import engine as lib
    config = ds_config(int(variant[0]), micro_batch, overlap_comm=variant.endswith("-overlap"))
    eng, _, _, _ = lib.initialize(model=model, config=config)
    return Trainer(lambda x, y: eng(x, y), eng.backward, eng.step)


def _init_process_group(candidate: str) -> None:
    import torch.distributed as dist

    if candidate.startswith("deepspeed"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")


def worker(candidate: str, workload: Workload, steps: int, warmup: int, out: Path, profile: bool) -> None:
    """Train ``warmup + steps`` steps on this rank; write per-step phase times and peak RSS."""
    import torch
    import torch.distributed as dist

    from engine.models import build_model, get_preset

    torch.set_num_threads(1)
    _init_process_group(candidate)
    rank = dist.get_rank()
    cfg = get_preset(workload.preset, **workload.overrides)
    model = build_model(workload.preset, seed=0, **workload.overrides)
    if workload.lora_rank:
        add_lora_adapters(model, workload.lora_rank)
    rss_model = peak_rss_mb()
    trainer = _make_trainer(candidate, model, workload.micro_batch)
    gen = torch.Generator().manual_seed(1000 + rank)
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "step": [], "total": [], "cpu": []}
    losses = []
    prof = _profiler() if profile else None
    for i in range(warmup + steps):
        tokens = torch.randint(0, cfg.vocab_size, (workload.micro_batch, cfg.seq_len + 1), generator=gen)
        x, y = tokens[:, :-1], tokens[:, 1:]
        if prof is not None and i == warmup:
            prof.__enter__()
        dist.barrier()
        c0, t0 = time.process_time(), time.perf_counter()
        loss = trainer.forward(x, y)
        t1 = time.perf_counter()
        trainer.backward(loss)
        t2 = time.perf_counter()
        trainer.step()
        t3 = time.perf_counter()
        c3 = time.process_time()   # CPU seconds of all this process's threads (gloo's included)
        dist.barrier()
        t4 = time.perf_counter()
        losses.append(float(loss.detach()))
        if i >= warmup:
            for name, secs in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t0, c3 - c0)):
                phases[name].append(secs)
    if prof is not None:
        prof.__exit__(None, None, None)
        if rank == 0:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
    result = {"rank": rank, "phases": phases, "losses": losses, "peak_rss_mb": peak_rss_mb(),
              "rss_after_model_mb": rss_model}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def add_lora_adapters(model: Any, rank: int) -> None:
    """Freeze ``model`` and give each block's four Linears a trainable low-rank update (LoRA):
    ``base(x) + B(A(x))``, B initialised to zero as in the LoRA paper (arXiv:2106.09685)."""
    import torch
    from torch import nn

    class LoRALinear(nn.Module):
        def __init__(self, base: nn.Linear) -> None:
            super().__init__()
            self.base = base
            self.a = nn.Linear(base.in_features, rank, bias=False)
            self.b = nn.Linear(rank, base.out_features, bias=False)
            nn.init.zeros_(self.b.weight)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + self.b(self.a(x))

    model.requires_grad_(False)
    torch.manual_seed(7)
    for block in model.blocks:
        for owner, name in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "fc"), (block.mlp, "proj")):
            setattr(owner, name, LoRALinear(getattr(owner, name)))


def _profiler() -> Any:
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU])


# ---------------------------------------------------------------------------------------------
# The parent: launches, rounds, table
# ---------------------------------------------------------------------------------------------
@dataclass
class Launch:
    """What one torchrun launch of one candidate measured."""

    step_s: float                     # median step time (slowest rank, barrier to barrier)
    fastest_s: float                  # the least disturbed step
    cpu_s: float                      # median CPU seconds per step, both ranks together
    phases_s: dict[str, float]        # rank 0's median forward / backward / step
    peak_rss_mb: float                # the larger of the two ranks' peaks
    rss_after_model_mb: float         # peak before the library wrapped the model
    final_loss: float
    load: float


def launch(candidate: str, workload: Workload, steps: int, warmup: int, *, profile: bool = False,
           timeout: float = 900) -> Launch:
    """Run ``candidate`` on ``workload`` in a fresh ``torchrun --nproc_per_node 2``."""
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        spec = json.dumps({"workload": workload.__dict__})
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
                "-m", "bench.engine_vs_peers", "--worker", candidate, spec, "--steps", str(steps),
                "--warmup", str(warmup), "--out", tmp] + (["--profile-step"] if profile else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        load = load_average()
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if profile:
            print(proc.stdout)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
            raise RuntimeError(f"{candidate} on {workload.name} failed (exit {proc.returncode}):\n{tail}")
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(WORLD)]
    zero = ranks[0]
    cpu = [sum(r["phases"]["cpu"][i] for r in ranks) for i in range(len(zero["phases"]["cpu"]))]
    return Launch(step_s=statistics.median(zero["phases"]["total"]), fastest_s=min(zero["phases"]["total"]),
                  cpu_s=statistics.median(cpu),
                  phases_s={k: statistics.median(v) for k, v in zero["phases"].items() if k not in ("total", "cpu")},
                  peak_rss_mb=max(r["peak_rss_mb"] for r in ranks),
                  rss_after_model_mb=max(r["rss_after_model_mb"] for r in ranks),
                  final_loss=zero["losses"][-1], load=load)


@dataclass
class Result:
    """A candidate's launches on one workload, summarised over rounds."""

    candidate: str
    launches: list[Launch]

    @property
    def step_s(self) -> float:
        return statistics.median(x.step_s for x in self.launches)

    @property
    def step_range(self) -> tuple[float, float]:
        return min(x.step_s for x in self.launches), max(x.step_s for x in self.launches)

    @property
    def fastest_s(self) -> float:
        return min(x.fastest_s for x in self.launches)

    @property
    def cpu_s(self) -> float:
        return statistics.median(x.cpu_s for x in self.launches)

    @property
    def rss_before_mb(self) -> float:
        return statistics.median(x.rss_after_model_mb for x in self.launches)

    @property
    def rss_mb(self) -> float:
        return statistics.median(x.peak_rss_mb for x in self.launches)

    def phase(self, name: str) -> float:
        return statistics.median(x.phases_s[name] for x in self.launches)


def measure(workloads: Sequence[Workload], candidates: Sequence[str], rounds: int, steps: int,
            warmup: int) -> dict[str, dict[str, Result]]:
    """Interleaved rounds: every (workload, candidate) once per round, the order rotated each round."""
    results = {w.name: {c: Result(c, []) for c in candidates} for w in workloads}
    for r in range(rounds):
        for w in workloads:
            order = list(candidates[r % len(candidates):]) + list(candidates[:r % len(candidates)])
            for c in order:
                one = launch(c, w, steps, warmup)
                results[w.name][c].launches.append(one)
                print(f"  round {r + 1}/{rounds} {w.name:<8} {c:<13} step {one.step_s:7.3f} s  cpu {one.cpu_s:7.3f} s  "
                      f"rss {one.peak_rss_mb:7.0f} MiB  loss {one.final_loss:.4f}  load {one.load:.1f}", flush=True)
    return results


def _ratio(a: Optional[Result], b: Optional[Result], what: Callable[[Result], float]) -> Optional[float]:
    return what(a) / what(b) if a and b and a.launches and b.launches else None


def table(workload: Workload, results: dict[str, Result]) -> list[str]:
    """Markdown rows: each candidate's step time, range, CPU time, phases, RSS, and its ratios.

    Ratios are ours/theirs of medians: < 1 means faster (or smaller). CPU seconds (both ranks'
    processes, gloo threads included) are less disturbed by other work on a shared machine than
    wall time, so they are shown beside it as a second opinion.
    """
    ddp = results.get("ddp")
    lines = ["| candidate | step s (median) | range of round medians | fastest step s | CPU s/step, 2 ranks "
             "| fwd / bwd / step s (rank 0) | peak RSS MiB/rank (before wrapping) | loss, last step "
             "| time / DDP | CPU / DDP | orch / DeepSpeed same stage: time, CPU, RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        if not res.launches:
            continue
        lo, hi = res.step_range
        peer = results.get(name.replace("orch", "deepspeed")) if name.startswith("orch") else None
        vs_peer = [_ratio(res, peer, f) for f in (lambda r: r.step_s, lambda r: r.cpu_s, lambda r: r.rss_mb)]
        vs_ddp = [_ratio(res, ddp, f) for f in (lambda r: r.step_s, lambda r: r.cpu_s)]
        phases = " / ".join(f"{res.phase(p):.3f}" for p in ("forward", "backward", "step"))
        lines.append(f"| {name} | {res.step_s:.3f} | {lo:.3f}-{hi:.3f} | {res.fastest_s:.3f} | {res.cpu_s:.3f} "
                     f"| {phases} "
                     f"| {res.rss_mb:.0f} ({res.rss_before_mb:.0f}) "
                     f"| {statistics.median(x.final_loss for x in res.launches):.4f} "
                     f"| {_fmt(vs_ddp[0])} | {_fmt(vs_ddp[1])} "
                     f"| {', '.join(_fmt(r) for r in vs_peer) if peer else ''} |")
    return lines


def _fmt(ratio: Optional[float]) -> str:
    return "" if ratio is None else f"{ratio:.2f}"


def verdicts(workload: Workload, results: dict[str, Result]) -> list[str]:
    """The issue's goals, checked on this run's medians; the fastest-step and CPU-time ratios
    beside them say whether a miss is the machine's load or the code."""
    out = []
    ddp = results.get("ddp")
    if workload.name == "compute" and ddp and ddp.launches:
        for name, ours in results.items():
            if name.startswith("orch") and ours.launches:
                ratio = ours.step_s / ddp.step_s
                out.append(f"{name} / DDP step time = {ratio:.3f} (goal <= 1.03): "
                           f"{'met' if ratio <= 1.03 else 'MISSED'}"
                           f"; fastest-step ratio {ours.fastest_s / ddp.fastest_s:.3f}, "
                           f"CPU time ratio {ours.cpu_s / ddp.cpu_s:.3f}")
    if workload.name == "comm":
        ours, peer = results.get("orch-z2"), results.get("deepspeed-z2")
        if ours and peer and ours.launches and peer.launches:
            t, m = ours.step_s / peer.step_s, ours.rss_mb / peer.rss_mb
            out.append(f"orch-z2 / deepspeed-z2 step time = {t:.2f} (goal <= 0.80): {'met' if t <= 0.8 else 'MISSED'}"
                       f"; fastest-step ratio {ours.fastest_s / peer.fastest_s:.2f}, "
                       f"CPU time ratio {ours.cpu_s / peer.cpu_s:.2f}")
            out.append(f"orch-z2 / deepspeed-z2 peak RSS = {m:.2f} (goal <= 1.00): {'met' if m <= 1.0 else 'MISSED'}")
    return out


def noise(results: dict[str, Result]) -> str:
    """How much the round medians moved, and how loaded the machine was."""
    spreads = [(hi - lo) / r.step_s for r in results.values() if r.launches for lo, hi in [r.step_range]]
    loads = [x.load for r in results.values() for x in r.launches if x.load >= 0]
    load_txt = f"1-min load average {min(loads):.1f}-{max(loads):.1f}" if loads else "load unknown"
    if max(len(r.launches) for r in results.values()) < 2:
        return f"noise: one round only, so no spread to report; {load_txt} on {os.cpu_count()} cores"
    return (f"noise: round medians spread by at most {100 * max(spreads):.0f} % of their median "
            f"(typical {100 * statistics.median(spreads):.0f} %); {load_txt} on {os.cpu_count()} cores")


def _revision() -> str:
    """The commit measured, and whether engine/ had uncommitted changes (numbers would not reproduce)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "engine")
    return f"{head}{' + uncommitted engine/ changes' if dirty else ''}"


def run(quick: bool = False, rounds: Optional[int] = None, steps: Optional[int] = None,
        workloads: Sequence[str] = ("compute", "comm"), candidates: Sequence[str] = CANDIDATES,
        record: bool = False) -> list[dict]:
    """Measure, print one ratio table per workload, return one dict per (workload, candidate)."""
    rounds = rounds or (1 if quick else 3)
    steps = steps or (3 if quick else 5)
    warmup = 1 if quick else 2
    chosen = [WORKLOADS[w] for w in workloads]
    if quick:
        chosen = [Workload(w.name, w.preset, w.micro_batch, w.goal, QUICK_OVERRIDES[w.name]) for w in chosen]
    names = list(candidates)
    skipped = ""
    if not deepspeed_available():
        names = [c for c in names if not c.startswith("deepspeed")]
        skipped = ("deepspeed is not installed, so its candidates were skipped (DS_BUILD_OPS=0 pip install "
                   "--no-build-isolation deepspeed==0.19.8)")
        print(f"note: {skipped}")
    print(f"machine: {machine()}\n{WORLD} gloo ranks x 1 thread; {rounds} interleaved round(s) of "
          f"{warmup} warm-up + {steps} timed steps per launch{' (quick: reduced shapes)' if quick else ''}")
    results = measure(chosen, names, rounds, steps, warmup)
    rows: list[dict] = []
    md: list[str] = [f"Code: {_revision()}. Machine: {machine()}. Command: `python -m bench.engine_vs_peers"
                     f"{' --quick' if quick else ''} --rounds {rounds} --steps {steps}`. "
                     f"{WORLD} gloo ranks x 1 thread, each candidate a fresh torchrun launch per round; "
                     f"step = median of {steps} steps after {warmup} warm-up, then the median over "
                     f"{rounds} interleaved rounds. torch AdamW fused=True for DDP/FSDP2."]
    if skipped:
        md.append(f"Note: {skipped}.")
    for w in chosen:
        res = results[w.name]
        lines = table(w, res)
        print(f"\n{w.name}: {w.describe()}\ngoal: {w.goal}")
        print("\n".join(lines))
        checks = verdicts(w, res)
        for line in checks:
            print(f"  {line}")
        print(f"  {noise(res)}")
        md += ["", f"**{w.name}**: {w.describe()}. Goal: {w.goal}.", "", *lines, "",
               *(f"- {c}" for c in checks), f"- {noise(res)}"]
        ddp = res.get("ddp")
        for name, r in res.items():
            if not r.launches:
                continue
            peer = res.get(name.replace("orch", "deepspeed")) if name.startswith("orch") else None
            rows.append({"benchmark": "engine_vs_peers", "workload": w.name, "name": name,
                         "median_s": r.step_s, "range_s": f"{r.step_range[0]:.3g}-{r.step_range[1]:.3g}",
                         "cpu_s": r.cpu_s, "peak_rss_mb": r.rss_mb,
                         "phases_s": {p: r.phase(p) for p in ("forward", "backward", "step")},
                         "ratio_vs_ddp": _ratio(r, ddp, lambda x: x.step_s),
                         "peer": peer.candidate if peer and peer.launches else None,
                         "ratio": _ratio(r, peer, lambda x: x.step_s),
                         "rss_ratio": _ratio(r, peer, lambda x: x.rss_mb)})
    if record:
        append_benchmarks_md("Engine vs DDP / FSDP2 / DeepSpeed ZeRO-1/2 (bench/engine_vs_peers.py)", md)
        print("\nappended to BENCHMARKS.md")
    return rows


def round_parser(description: str, candidates: Sequence[str], default: Sequence[str]) -> argparse.ArgumentParser:
    """The options every interleaved-rounds benchmark takes (this one and bench/zero3_vs_peers.py),
    including the hidden ones a parent passes to its torchrun workers."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="reduced shapes, 1 round (a smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per launch (default 5)")
    left_out = [c for c in candidates if c not in default]
    parser.add_argument("--candidates", nargs="+", choices=list(candidates), default=list(default),
                        help=f"default: all but {', '.join(left_out)}" if left_out else "default: all")
    parser.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    parser.add_argument("--worker", nargs=2, metavar=("CANDIDATE", "WORKLOAD_JSON"), help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = round_parser(__doc__.splitlines()[0], CANDIDATES + EXTRA_CANDIDATES, CANDIDATES)
    parser.add_argument("--workload", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--profile", choices=CANDIDATES + EXTRA_CANDIDATES, default=None,
                        help="run one launch of this candidate under torch.profiler and print its top ops")
    parser.add_argument("--profile-step", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        candidate, spec = args.worker
        worker(candidate, Workload(**json.loads(spec)["workload"]), args.steps, args.warmup, args.out,
               args.profile_step)
        return
    if args.profile:
        for name in args.workload:
            w = WORKLOADS[name]
            one = launch(args.profile, w, args.steps or 3, 1, profile=True)
            print(f"{args.profile} on {name}: step {one.step_s:.3f} s, phases {one.phases_s}")
        return
    run(args.quick, args.rounds, args.steps, args.workload, args.candidates, args.record)


if __name__ == "__main__":
    main()
