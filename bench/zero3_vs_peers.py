"""orch's ZeRO-3 beside FSDP2 and DeepSpeed ZeRO-3 (and CPU offload beside DeepSpeed's), 2 gloo ranks.

Workloads: bench/engine_vs_peers.py's two, fp32, AdamW (lr 3e-4, betas 0.9/0.95, weight decay 0.1),
gradient clipping 1.0: ``compute`` (``bench-27m``: 6 layers, d_model 512, 8 heads, seq 256, vocab
8192, micro-batch 8; the matmuls dominate) and ``comm`` (``bench-100m``: 105.6M parameters, seq 64,
micro-batch 1; gathering parameters, reducing gradients and the optimizer dominate). Candidates:

* ``fsdp2``: ``fully_shard`` per block and the root, torch AdamW ``fused=True``;
* ``deepspeed-z3`` / ``orch-z3``: ``initialize`` from the same ds_config, ZeRO stage 3 with
  DeepSpeed's defaults for every stage-3 knob (prefetch bucket, persistence threshold, live and
  reuse limits);
* ``deepspeed-z3-offload`` / ``orch-z3-offload``: the same with ``offload_optimizer: {device: cpu}``
  (DeepSpeedCPUAdam there, torch's fused CPU AdamW here).

Goals (issue 8): orch ZeRO-3 step time <= 1.0x FSDP2 and <= 0.95x DeepSpeed ZeRO-3; peak RSS
<= 0.8x DeepSpeed ZeRO-3. On a CPU-only machine "offload" moves nothing across a bus, so the
offload rows measure the bookkeeping and the host optimizer, not transfer overlap.

Method (shared with bench/engine_vs_peers.py, whose worker loop, ``Launch``/``Result`` and
tables this reuses): each candidate runs in its own ``torchrun`` launch (peak RSS is its own), one
compute thread per rank, ``warmup`` steps then ``steps`` timed steps bracketed by barriers (a
step's time is the slowest rank's); rounds interleave the candidates in a rotated order; figures
are medians over rounds with the range of the round medians.

    python -m bench.zero3_vs_peers [--workload compute comm] [--rounds 3] [--steps 5] [--record]
    python -m bench.zero3_vs_peers --quick           # reduced shapes, 1 round: a smoke run
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from bench import engine_vs_peers as peers
from bench.common import REPO, append_benchmarks_md, load_average, machine

CANDIDATES = ("fsdp2", "deepspeed-z3", "orch-z3", "deepspeed-z3-offload", "orch-z3-offload")
GOAL = "orch ZeRO-3 <= 1.0x FSDP2 and <= 0.95x DeepSpeed ZeRO-3 step time; peak RSS <= 0.8x DeepSpeed ZeRO-3"
# engine_vs_peers' two workloads (same presets and micro-batches), with issue 8's goals.
WORKLOADS: dict[str, peers.Workload] = {
    name: peers.Workload(name, w.preset, w.micro_batch, GOAL) for name, w in peers.WORKLOADS.items()}
# Not run by default: fine-tuning LoRA adapters on the comm workload's model, frozen. Stage 3
# partitions the frozen base as well, so each rank holds half of it (no goal in the issues).
WORKLOADS["lora"] = peers.Workload("lora", "bench-100m", 1, "frozen parameters partitioned at stage 3: orch "
                                   "peak RSS and step time beside FSDP2's and DeepSpeed ZeRO-3's", lora_rank=16)
_peer_trainer = peers._make_trainer   # DDP/FSDP2/ZeRO-1/2 trainers, before worker() installs ours


def ds_config(micro_batch: int, offload: bool) -> dict[str, Any]:
    """engine_vs_peers' ds_config at stage 3 (DeepSpeed's defaults otherwise), optionally offloading."""
    cfg = peers.ds_config(3, micro_batch)
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return cfg


def make_trainer(candidate: str, model: Any, micro_batch: int) -> peers.Trainer:
    """The trainer for one of ``CANDIDATES`` (FSDP2 comes from engine_vs_peers)."""
    if candidate == "fsdp2":
        return _peer_trainer(candidate, model, micro_batch)
    library, _, rest = candidate.partition("-z3")
    if library == "deepspeed":
        import deepspeed as lib
    else:
        import engine as lib
    eng, _, _, _ = lib.initialize(model=model, config=ds_config(micro_batch, offload=rest == "-offload"))
    return peers.Trainer(lambda x, y: eng(x, y), eng.backward, eng.step)


def worker(candidate: str, workload: peers.Workload, steps: int, warmup: int, out: Path) -> None:
    """One rank: engine_vs_peers' timing loop with this benchmark's trainers."""
    peers._make_trainer = make_trainer   # the loop looks its trainer factory up by this name
    peers.worker(candidate, workload, steps, warmup, out, profile=False)


def launch(candidate: str, workload: peers.Workload, steps: int, warmup: int, timeout: float = 1800,
           module: str = "bench.zero3_vs_peers") -> peers.Launch:
    """``candidate`` on ``workload`` in a fresh ``torchrun --nproc_per_node 2`` (as engine_vs_peers.launch);
    ``module``'s ``--worker`` entry trains it (bench.nvme_offload reuses this with its own candidates)."""
    with tempfile.TemporaryDirectory(prefix="bench-zero3-") as tmp:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={peers.WORLD}",
                "-m", module, "--worker", candidate, json.dumps({"workload": workload.__dict__}),
                "--steps", str(steps), "--warmup", str(warmup), "--out", tmp]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        load = load_average()
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
            raise RuntimeError(f"{candidate} failed (exit {proc.returncode}):\n{tail}")
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(peers.WORLD)]
    zero = ranks[0]
    cpu = [sum(r["phases"]["cpu"][i] for r in ranks) for i in range(len(zero["phases"]["cpu"]))]
    figures = {"step_s": statistics.median(zero["phases"]["total"]), "fastest_s": min(zero["phases"]["total"]),
               "cpu_s": statistics.median(cpu),
               "phases_s": {k: statistics.median(v) for k, v in zero["phases"].items() if k not in ("total", "cpu")},
               "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
               "rss_after_model_mb": max(r["rss_after_model_mb"] for r in ranks),
               "final_loss": zero["losses"][-1], "load": load}
    # engine_vs_peers.Launch gains figures over time: fill the fields it has
    return peers.Launch(**{f.name: figures[f.name] for f in dataclasses.fields(peers.Launch) if f.name in figures})


def measure(workload: peers.Workload, candidates: Sequence[str], rounds: int, steps: int,
            warmup: int, module: str = "bench.zero3_vs_peers") -> dict[str, peers.Result]:
    """Interleaved rounds, the order rotated each round."""
    results = {c: peers.Result(c, []) for c in candidates}
    for r in range(rounds):
        order = list(candidates[r % len(candidates):]) + list(candidates[:r % len(candidates)])
        for c in order:
            one = launch(c, workload, steps, warmup, module=module)
            results[c].launches.append(one)
            print(f"  round {r + 1}/{rounds} {c:<21} step {one.step_s:7.3f} s  cpu {one.cpu_s:7.3f} s  "
                  f"rss {one.peak_rss_mb:7.0f} MiB  loss {one.final_loss:.4f}  load {one.load:.1f}", flush=True)
    return results


def table(results: dict[str, peers.Result]) -> list[str]:
    """Markdown rows: step time, range, CPU time, phases, peak RSS, and orch's ratios to each peer."""
    fsdp = results.get("fsdp2")
    lines = ["| candidate | step s (median) | range of round medians | CPU s/step, 2 ranks | fwd / bwd / step s "
             "(rank 0) | peak RSS MiB/rank (before wrapping) | loss, last step | time / FSDP2 "
             "| orch / DeepSpeed same config: time, CPU, RSS |", "|---|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        if not res.launches:
            continue
        lo, hi = res.step_range
        peer = results.get(name.replace("orch", "deepspeed")) if name.startswith("orch") else None
        vs_peer = [peers._ratio(res, peer, f) for f in (lambda r: r.step_s, lambda r: r.cpu_s, lambda r: r.rss_mb)]
        phases = " / ".join(f"{res.phase(p):.3f}" for p in ("forward", "backward", "step"))
        lines.append(f"| {name} | {res.step_s:.3f} | {lo:.3f}-{hi:.3f} | {res.cpu_s:.3f} | {phases} "
                     f"| {res.rss_mb:.0f} ({res.rss_before_mb:.0f}) "
                     f"| {statistics.median(x.final_loss for x in res.launches):.4f} "
                     f"| {peers._fmt(peers._ratio(res, fsdp, lambda r: r.step_s))} "
                     f"| {', '.join(peers._fmt(r) for r in vs_peer) if peer and peer.launches else ''} |")
    return lines


def verdicts(results: dict[str, peers.Result], goals: bool = True) -> list[str]:
    """The issue's goals, checked against this run's medians (``goals=False``: the ratios alone)."""
    ours, fsdp, ds = results.get("orch-z3"), results.get("fsdp2"), results.get("deepspeed-z3")
    out = []
    if not goals:
        for peer, label in ((fsdp, "FSDP2"), (ds, "DeepSpeed ZeRO-3")):
            if ours and ours.launches and peer and peer.launches:
                out.append(f"orch ZeRO-3 / {label}: step time {ours.step_s / peer.step_s:.2f}, "
                           f"peak RSS {ours.rss_mb / peer.rss_mb:.2f}")
        return out
    if ours and ours.launches and fsdp and fsdp.launches:
        t = ours.step_s / fsdp.step_s
        out.append(f"orch ZeRO-3 / FSDP2 step time = {t:.2f} (goal <= 1.00): {'met' if t <= 1.0 else 'MISSED'}")
    if ours and ours.launches and ds and ds.launches:
        t, m = ours.step_s / ds.step_s, ours.rss_mb / ds.rss_mb
        out.append(f"orch ZeRO-3 / DeepSpeed ZeRO-3 step time = {t:.2f} (goal <= 0.95): "
                   f"{'met' if t <= 0.95 else 'MISSED'}")
        out.append(f"orch ZeRO-3 / DeepSpeed ZeRO-3 peak RSS = {m:.2f} (goal <= 0.80): "
                   f"{'met' if m <= 0.8 else 'MISSED'}")
    ours, ds = results.get("orch-z3-offload"), results.get("deepspeed-z3-offload")
    if ours and ours.launches and ds and ds.launches:
        out.append(f"offload: orch / DeepSpeed step time = {ours.step_s / ds.step_s:.2f}, "
                   f"peak RSS = {ours.rss_mb / ds.rss_mb:.2f}")
    return out


def run(quick: bool = False, rounds: Optional[int] = None, steps: Optional[int] = None,
        candidates: Sequence[str] = CANDIDATES, record: bool = False,
        workloads: Sequence[str] = ("compute", "comm")) -> list[dict]:
    """Each workload in turn (see ``run_workload``); the rows of all of them."""
    rows: list[dict] = []
    for name in workloads:
        w = WORKLOADS[name]
        workload = dataclasses.replace(w, overrides=peers.QUICK_OVERRIDES.get(name, {"n_layer": 2}) if quick else {})
        rows += run_workload(workload, quick, rounds, steps, candidates, record)
    return rows


def run_workload(workload: peers.Workload, quick: bool, rounds: Optional[int], steps: Optional[int],
                 candidates: Sequence[str], record: bool) -> list[dict]:
    """Measure, print the table and verdicts, return one row per candidate (``python -m bench`` rows)."""
    rounds = rounds or (1 if quick else 3)
    steps = steps or (3 if quick else 5)
    warmup = 1 if quick else 2
    names = list(candidates)
    skipped = ""
    if not peers.deepspeed_available():
        names = [c for c in names if not c.startswith("deepspeed")]
        skipped = "deepspeed is not installed, so its candidates were skipped (see bench/engine_vs_peers.py)"
        print(f"note: {skipped}")
    print(f"machine: {machine()}\n{peers.WORLD} gloo ranks x 1 thread; {rounds} interleaved round(s) of {warmup} "
          f"warm-up + {steps} timed steps per launch{' (quick: reduced shapes)' if quick else ''}")
    results = measure(workload, names, rounds, steps, warmup)
    lines, checks = table(results), verdicts(results, goals=not workload.lora_rank)
    print(f"\n{workload.describe()}\ngoal: {workload.goal}\n" + "\n".join(lines))
    for line in checks + [peers.noise(results)]:
        print(f"  {line}")
    if record:
        md = [f"Code: {peers._revision()}. Machine: {machine()}. Command: `python -m bench.zero3_vs_peers"
              f"{' --quick' if quick else ''} --workload {workload.name} --rounds {rounds} --steps {steps}`. {peers.WORLD} gloo ranks x 1 "
              f"thread, each candidate a fresh torchrun launch per round; step = median of {steps} steps after "
              f"{warmup} warm-up, then the median over {rounds} interleaved rounds. ZeRO-3 knobs at DeepSpeed's "
              f"defaults for both libraries.", *([f"Note: {skipped}."] if skipped else []), "",
              f"**{workload.describe()}**. Goal: {workload.goal}.", "", *lines, "",
              *(f"- {c}" for c in checks), f"- {peers.noise(results)}"]
        append_benchmarks_md("ZeRO-3 and offload vs FSDP2 / DeepSpeed ZeRO-3 (bench/zero3_vs_peers.py)", md)
        print("\nappended to BENCHMARKS.md")
    rows = []
    for name, r in results.items():
        if not r.launches:
            continue
        peer = results.get(name.replace("orch", "deepspeed")) if name.startswith("orch") else None
        rows.append({"benchmark": "zero3_vs_peers", "workload": workload.name, "name": name, "median_s": r.step_s,
                     "range_s": f"{r.step_range[0]:.3g}-{r.step_range[1]:.3g}", "cpu_s": r.cpu_s,
                     "peak_rss_mb": r.rss_mb, "peer": peer.candidate if peer and peer.launches else None,
                     "ratio": peers._ratio(r, peer, lambda x: x.step_s),
                     "rss_ratio": peers._ratio(r, peer, lambda x: x.rss_mb)})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = peers.round_parser(__doc__.splitlines()[0], CANDIDATES, CANDIDATES)
    parser.add_argument("--workload", nargs="+", choices=list(WORKLOADS), default=["compute", "comm"],
                        help="default: compute comm (lora: adapters on a frozen model)")
    args = parser.parse_args(argv)
    if args.worker:
        candidate, spec = args.worker
        worker(candidate, peers.Workload(**json.loads(spec)["workload"]), args.steps, args.warmup, args.out)
        return
    run(args.quick, args.rounds, args.steps, args.candidates, args.record, args.workload)


if __name__ == "__main__":
    main()
