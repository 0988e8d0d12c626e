"""NVMe offload (ZeRO-Infinity) step time: orch's NVMe offload vs its CPU offload vs DeepSpeed's, 2 gloo ranks.

Workload: ``bench-100m`` (105.6M parameters, seq 64, micro-batch 1; engine_vs_peers' ``comm``
workload), ZeRO stage 3, fp32, AdamW, clipping 1.0. Candidates, each a fresh ``torchrun`` launch
per round (bench/zero3_vs_peers.py's loop, timing and tables):

* ``orch-cpu``: ``offload_optimizer: {device: cpu}``;
* ``orch-nvme`` / ``deepspeed-nvme``: ``offload_optimizer: {device: nvme, nvme_path}`` with the same
  ``aio`` section (DeepSpeed's documented defaults: block_size 1 MiB, queue_depth 8,
  thread_count 1); DeepSpeed's ``async_io`` op is JIT-built with Debian's ``libaio-dev``;
* ``orch-nvme-param`` / ``deepspeed-nvme-param``: the same plus stage 3's parameter partition on
  the drive (``offload_param: {device: nvme, max_in_cpu: 0, buffer_count: 4}``; not run by default).

Goals (issue 16): orch NVMe step <= 0.8x DeepSpeed's NVMe step and <= 1.3x orch's CPU-offload
step; peak RSS <= DeepSpeed's. The swap files go to ``--nvme-path`` (default: a temporary
directory under ``ORCH_BENCH_NVME`` or the system temp dir): put it on the NVMe drive.

    python -m bench.nvme_offload [--rounds 3] [--steps 5] [--record] [--nvme-path DIR]
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from bench import engine_vs_peers as peers
from bench import zero3_vs_peers as z3
from bench.common import append_benchmarks_md, machine

CANDIDATES = ("orch-cpu", "orch-nvme", "deepspeed-nvme")
PARAM_CANDIDATES = ("orch-nvme-param", "deepspeed-nvme-param")     # + offload_param nvme (ZeRO-Infinity)
GOAL = "orch NVMe step <= 0.8x DeepSpeed ZeRO-Infinity and <= 1.3x orch CPU offload; peak RSS <= DeepSpeed's"
WORKLOAD = peers.Workload("nvme", "bench-100m", 1, GOAL)
AIO = {"block_size": 1048576, "queue_depth": 8, "thread_count": 1, "single_submit": False, "overlap_events": True}


def ds_config(micro_batch: int, device: str, nvme_path: str) -> dict[str, Any]:
    """``device``: cpu, nvme (optimizer states on the drive) or nvme-param (and the parameters)."""
    cfg = z3.ds_config(micro_batch, offload=False)
    section: dict[str, Any] = {"device": device.removesuffix("-param"), "pin_memory": False}
    if device != "cpu":
        section.update(nvme_path=nvme_path, buffer_count=4)
        cfg["aio"] = dict(AIO)
    cfg["zero_optimization"]["offload_optimizer"] = section
    if device.endswith("-param"):
        cfg["zero_optimization"]["offload_param"] = {"device": "nvme", "nvme_path": nvme_path, "pin_memory": False,
                                                     "buffer_count": 4, "max_in_cpu": 0}
    return cfg


def make_trainer(candidate: str, model: Any, micro_batch: int) -> peers.Trainer:
    library, _, device = candidate.partition("-")
    if library == "deepspeed":
        import deepspeed as lib
    else:
        import engine as lib
    cfg = ds_config(micro_batch, device, os.environ["ORCH_BENCH_NVME_PATH"])
    eng, _, _, _ = lib.initialize(model=model, config=cfg)
    return peers.Trainer(lambda x, y: eng(x, y), eng.backward, eng.step)


def worker(candidate: str, workload: peers.Workload, steps: int, warmup: int, out: Path) -> None:
    peers._make_trainer = make_trainer
    peers.worker(candidate, workload, steps, warmup, out, profile=False)


def verdicts(results: dict[str, peers.Result]) -> list[str]:
    cpu, ours, ds = (results.get(c) for c in CANDIDATES)     # CANDIDATES: orch-cpu, orch-nvme, deepspeed-nvme
    out = _param_verdicts(results)
    if ours and ours.launches and ds and ds.launches:
        t, m = ours.step_s / ds.step_s, ours.rss_mb / ds.rss_mb
        out.append(f"orch NVMe / DeepSpeed NVMe step time = {t:.2f} (goal <= 0.80): {'met' if t <= 0.8 else 'MISSED'}")
        out.append(f"orch NVMe / DeepSpeed NVMe peak RSS = {m:.2f} (goal <= 1.00): {'met' if m <= 1.0 else 'MISSED'}")
    if ours and ours.launches and cpu and cpu.launches:
        t = ours.step_s / cpu.step_s
        out.append(f"orch NVMe / orch CPU offload step time = {t:.2f} (goal <= 1.30): {'met' if t <= 1.3 else 'MISSED'}"
                   f"; peak RSS {ours.rss_mb / cpu.rss_mb:.2f}")
    return out


def _param_verdicts(results: dict[str, peers.Result]) -> list[str]:
    """The parameter-offload candidates against DeepSpeed's and orch's optimizer-only NVMe run (no goal set)."""
    ours, ds, states_only = (results.get(c) for c in (*PARAM_CANDIDATES, "orch-nvme"))
    out = []
    if ours and ours.launches and ds and ds.launches:
        out.append(f"orch / DeepSpeed with offload_param nvme: step time {ours.step_s / ds.step_s:.2f}, "
                   f"peak RSS {ours.rss_mb / ds.rss_mb:.2f}")
    if ours and ours.launches and states_only and states_only.launches:
        out.append(f"orch offload_param nvme / optimizer-only NVMe: step time {ours.step_s / states_only.step_s:.2f}, "
                   f"peak RSS {ours.rss_mb / states_only.rss_mb:.2f}")
    return out


def run(quick: bool = False, rounds: Optional[int] = None, steps: Optional[int] = None,
        candidates: Sequence[str] = CANDIDATES, record: bool = False, nvme_path: Optional[str] = None) -> list[dict]:
    rounds = rounds or (1 if quick else 3)
    steps = steps or (3 if quick else 5)
    warmup = 1 if quick else 2
    workload = dataclasses.replace(WORKLOAD, overrides={"n_layer": 2} if quick else {})
    names = [c for c in candidates if peers.deepspeed_available() or not c.startswith("deepspeed")]
    with tempfile.TemporaryDirectory(prefix="orch-nvme-bench-", dir=nvme_path or os.environ.get("ORCH_BENCH_NVME")) as d:
        os.environ["ORCH_BENCH_NVME_PATH"] = d
        print(f"machine: {machine()}\nswap files in {d}; {peers.WORLD} gloo ranks x 1 thread; {rounds} round(s) of "
              f"{warmup} warm-up + {steps} timed steps")
        results = z3.measure(workload, names, rounds, steps, warmup, module="bench.nvme_offload")
    lines, checks = z3.table(results), verdicts(results)
    print(f"\n{workload.describe()}\ngoal: {GOAL}\n" + "\n".join(lines))
    for line in checks + [peers.noise(results)]:
        print(f"  {line}")
    if record:
        md = [f"Code: {peers._revision()}. Machine: {machine()}. Command: `python -m bench.nvme_offload --rounds "
              f"{rounds} --steps {steps}`; swap files on the machine's disk.", "", f"**{workload.describe()}**, "
              f"ZeRO-3 fp32. Goal: {GOAL}.", "", *lines, "", *(f"- {c}" for c in checks), f"- {peers.noise(results)}"]
        append_benchmarks_md("NVMe offload vs CPU offload / DeepSpeed ZeRO-Infinity (bench/nvme_offload.py)", md)
    return [{"benchmark": "nvme_offload", "name": name, "median_s": r.step_s, "peak_rss_mb": r.rss_mb,
             "range_s": f"{r.step_range[0]:.3g}-{r.step_range[1]:.3g}"} for name, r in results.items() if r.launches]


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = peers.round_parser(__doc__.splitlines()[0], CANDIDATES + PARAM_CANDIDATES, CANDIDATES)
    parser.add_argument("--nvme-path", help="directory for the swap files (on the NVMe drive)")
    args = parser.parse_args(argv)
    if args.worker:
        candidate, spec = args.worker
        worker(candidate, peers.Workload(**json.loads(spec)["workload"]), args.steps, args.warmup, args.out)
        return
    run(args.quick, args.rounds, args.steps, args.candidates, args.record, args.nvme_path)


if __name__ == "__main__":
    main()
