"""Sharded checkpoint I/O on 2 gloo ranks: save/load throughput against plain torch.save/torch.load
of the same bytes, the step-time stall of an asynchronous save, and the peak memory of
consolidating a >= 1 GB checkpoint against its largest shard.

* save: ``engine.save_checkpoint`` (every rank writes its shard through engine.io: aligned
  O_DIRECT writes, xxh3-128 in the I/O threads, fsync of every file and directory, manifest,
  renames) vs ``torch.distributed.checkpoint.save`` of the same tensors (no checksums) and each
  rank ``torch.save`` of them to one file, also plus ``os.fsync`` (the like-for-like durability).
* load: ``engine.load_checkpoint`` into a fresh engine (manifest, xxh3-128 of every file spread
  over the ranks and the I/O threads, ranged reads of the rank's partition, all-gather of the
  parameters) vs ``torch.distributed.checkpoint.load`` and each rank ``torch.load(weights_only=True)``
  of its file. Every load reads a cold page cache (``posix_fadvise(DONTNEED)`` on every file).
  Two DCP peers: "bare" loads the rank's partitions into bare tensors (the same bytes as our
  shards, but the model never sees them); "resume" is what a ZeRO-2 user of DCP does to resume:
  the model's full parameters (saved once, deduplicated) loaded into the model on every rank, plus
  the rank's optimizer-state shard. Our load publishes the master to every rank's parameters
  (the all-gather), so "resume" is the like-for-like figure; "bare" is kept for comparison.
* the disk's direct bandwidth: ``dd`` with O_DIRECT on the same filesystem, in the same run.
* async stall: wall time of "save + one training step" minus one training step, for the
  asynchronous and the synchronous save.
* consolidation: peak RSS of ``orch ckpt consolidate`` (a fresh process; .safetensors and .pt)
  vs the largest shard file, and vs the DeepSpeed ``zero_to_fp32`` way (load every master
  shard, concatenate, ``torch.save``).

    python -m bench.checkpoint_io [--quick] [--rounds N]
"""
from __future__ import annotations

import argparse
import json
import os
import queue as queue_mod
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, Measurement, machine, print_table

WIDTH = 4096


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(layers: int, width: int) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def _engine(layers: int, width: int, async_save: bool = False) -> Any:
    import engine
    from engine.checkpoint.engine_methods import CheckpointMethods

    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "checkpoint": {"async_save": async_save}}
    eng = engine.initialize(model=_model(layers, width), config=config)[0]
    if not isinstance(eng, CheckpointMethods):      # until engine.Engine inherits the mixin
        eng.__class__ = type("Engine", (CheckpointMethods, type(eng)), {})
    return eng


def _step(eng: Any, width: int) -> None:
    import torch

    x = torch.randn(2, width)
    eng.backward(eng(x).float().pow(2).mean())
    eng.step()


def _barrier_time(fn: Any) -> float:
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def _drop_page_cache(root: Path) -> None:
    """Evict every file under ``root`` from the page cache, so the next read comes from the disk."""
    import torch.distributed as dist

    dist.barrier()
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    dist.barrier()


def _prune(save_dir: Path, rank: int) -> None:
    """Keep only the newest checkpoint, outside the timed region (what ``keep=1`` would do)."""
    import torch.distributed as dist

    if rank == 0:
        from engine.checkpoint.save import prune

        prune(save_dir, 1)
    dist.barrier()


def _disk_direct_bandwidth(root: Path, gib: int = 1) -> tuple[float, float]:
    """(write, read) GB/s of ``dd`` with O_DIRECT on the checkpoint's filesystem."""
    import re

    path = root / "dd.bin"
    count = gib * 128

    def dd(args: list[str]) -> float:
        text = subprocess.run(["dd", *args], capture_output=True, text=True, check=True).stderr
        return float(re.search(r"copied, ([\d.]+) s", text).group(1))

    write = dd(["if=/dev/zero", f"of={path}", "bs=8M", f"count={count}", "oflag=direct", "conv=fsync"])
    return gib * 2**30 / write / 1e9, _dd_read(path)


def _dd_read(path: Path) -> float:
    """GB/s of one ``dd`` O_DIRECT read of ``path`` (each round's load is compared with the disk
    as it is in that round: on a shared machine the disk's figure moves by 2x within minutes)."""
    import re

    text = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=8M", "iflag=direct"], capture_output=True,
                          text=True, check=True).stderr
    return path.stat().st_size / float(re.search(r"copied, ([\d.]+) s", text).group(1)) / 1e9


def _peer_tensors(eng: Any) -> dict[str, Any]:
    """The rank's partitions as standalone tensors (a view would make torch.save write its whole
    storage, e.g. all of ``flat_params``: DeepSpeed's "checkpoint bloat")."""
    opt = eng.optimizer
    states = {k: v.clone() for k, v in opt.optimizer_state_partitions().items() if v.dim() == 1}
    return {"master": opt.master_partition().clone(), **states}


def _worker(rank: int, world: int, port: int, cfg: dict[str, Any], out: Any) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    root = Path(cfg["root"])
    layers, width, rounds = cfg["layers"], cfg["width"], cfg["rounds"]
    disk = _disk_direct_bandwidth(root) if rank == 0 else (0.0, 0.0)
    dist.barrier()
    eng = _engine(layers, width)
    _step(eng, width)
    peer_file = root / f"peer-rank{rank}.pt"
    times: dict[str, list[float]] = {k: [] for k in ("save", "torch.save", "torch.save+fsync", "dcp.save", "load",
                                                     "torch.load", "dcp.load", "dcp.save.resume", "dcp.load.resume")}
    fresh = _engine(layers, width)

    tensors = _peer_tensors(eng)   # cloned outside the timed region

    def peer_save(fsync: bool) -> None:
        with open(peer_file, "wb") as f:
            torch.save(tensors, f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    def peer_load() -> None:
        loaded = torch.load(peer_file, weights_only=True)
        fresh.optimizer.master_params[0].data.copy_(loaded["master"])

    import torch.distributed.checkpoint as dcp

    dcp_target = {k: torch.empty_like(v) for k, v in tensors.items()}

    def dcp_save(i: int) -> None:
        dcp.save({f"rank{rank}": tensors}, checkpoint_id=str(root / f"dcp-{i}"))

    def dcp_load(i: int) -> None:
        dcp.load({f"rank{rank}": dcp_target}, checkpoint_id=str(root / f"dcp-{i}"))

    # DCP "resume": the full model (replicated: DCP writes it once) + this rank's optimizer shard;
    # loaded in place into the fresh engine's parameters (every rank, all of them) and the shard
    states = {k: v for k, v in tensors.items() if k != "master"}
    resume_source = {"model": eng.module.state_dict(), "optimizer": {f"rank{rank}": states}}
    resume_target = {"model": fresh.module.state_dict(),
                     "optimizer": {f"rank{rank}": {k: torch.empty_like(v) for k, v in states.items()}}}

    def dcp_resume_save(i: int) -> None:
        dcp.save(resume_source, checkpoint_id=str(root / f"dcp-resume-{i}"))

    def dcp_resume_load(i: int) -> None:
        dcp.load(resume_target, checkpoint_id=str(root / f"dcp-resume-{i}"))

    dd_reads: list[float] = []    # rank 0: the disk's direct read right before each round's load
    for i in range(rounds):       # loads read cold: every file's page cache is dropped first
        times["save"].append(_barrier_time(lambda: eng.save_checkpoint(root / "ckpt", tag=f"round-{i}")))
        _prune(root / "ckpt", rank)     # deleting the previous checkpoint (keep=1) is not timed: the peers delete nothing
        times["torch.save"].append(_barrier_time(lambda: peer_save(False)))
        times["torch.save+fsync"].append(_barrier_time(lambda: peer_save(True)))
        times["dcp.save"].append(_barrier_time(lambda: dcp_save(i)))
        _drop_page_cache(root)
        if rank == 0:
            dd_reads.append(_dd_read(root / "dd.bin"))
        times["load"].append(_barrier_time(lambda: fresh.load_checkpoint(root / "ckpt")))
        _drop_page_cache(root)
        times["torch.load"].append(_barrier_time(peer_load))
        _drop_page_cache(root)
        times["dcp.load"].append(_barrier_time(lambda: dcp_load(i)))
        times["dcp.save.resume"].append(_barrier_time(lambda: dcp_resume_save(i)))
        _drop_page_cache(root)
        times["dcp.load.resume"].append(_barrier_time(lambda: dcp_resume_load(i)))
        if rank == 0:
            import shutil
            resume_bytes = sum(f.stat().st_size for f in (root / f"dcp-resume-{i}").rglob("*") if f.is_file())
            shutil.rmtree(root / f"dcp-{i}", ignore_errors=True)
            shutil.rmtree(root / f"dcp-resume-{i}", ignore_errors=True)
        dist.barrier()
    shard_bytes = sum(f.stat().st_size for f in (root / "ckpt" / f"round-{rounds - 1}").glob("*.safetensors"))
    peer_bytes = torch.tensor([peer_file.stat().st_size])
    dist.all_reduce(peer_bytes)
    del fresh

    # the step-time stall of a save: (save + step) - step, asynchronous and synchronous
    async_eng = _engine(layers, width, async_save=True)
    _step(async_eng, width)
    stall: dict[str, list[float]] = {"step": [], "async save + step": [], "sync save + step": [],
                                     "async call": [], "sync call": []}

    def save_then_step(kind: str, tag: str) -> None:
        t0 = time.perf_counter()
        async_eng.save_checkpoint(root / "async", tag=tag, async_save=kind == "async")
        stall[f"{kind} call"].append(time.perf_counter() - t0)
        _step(async_eng, width)

    for i in range(rounds):
        stall["step"].append(_barrier_time(lambda: _step(async_eng, width)))
        stall["async save + step"].append(_barrier_time(lambda: save_then_step("async", f"a{i}")))
        async_eng.wait_for_checkpoint()
        _prune(root / "async", rank)
        stall["sync save + step"].append(_barrier_time(lambda: save_then_step("sync", f"s{i}")))
        _prune(root / "async", rank)
    if rank == 0:
        (root / "dd.bin").unlink()
        out.put({"times": times, "stall": stall, "disk": disk, "dd_reads": dd_reads, "bytes": shard_bytes,
                 "resume_bytes": resume_bytes,
                 "peer_bytes": int(peer_bytes.item()),
                 "checkpoint": str(root / "ckpt" / f"round-{rounds - 1}")})
    dist.barrier()
    dist.destroy_process_group()


_CONSOLIDATE = r"""
import json, sys
from pathlib import Path

def hwm():  # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

mode, ckpt, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
if mode == "naive" or out.suffix == ".pt":
    import torch  # the .safetensors path runs without torch, as `orch ckpt consolidate` does
base = hwm()
if mode == "orch":
    from engine.checkpoint.consolidate import consolidate
    consolidate(ckpt, out)
else:  # the zero_to_fp32 way: every master shard in memory, then one torch.save
    import numpy as np
    from engine.checkpoint.tensorfile import read_header
    manifest = json.loads((ckpt / "manifest.json").read_text())
    parts = []
    for name in manifest["shards"]["master"]:
        offset = read_header(ckpt / name)["master"]["offset"]
        parts.append(torch.from_numpy(np.fromfile(ckpt / name, dtype=np.float32, offset=offset)))
    state = {}
    for p in manifest["params"]:
        pieces = [parts[r][o:o + n] for r, o, n in p["ranges"]]
        state[p["name"]] = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).reshape(p["shape"])
    torch.save(state, out)
peak = hwm()
print(json.dumps({"base": base, "peak": peak}))
"""


def _consolidation_rss(checkpoint: str, mode: str, suffix: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=Path(checkpoint).parent) as tmp:
        out = Path(tmp) / f"model{suffix}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", _CONSOLIDATE, mode, checkpoint, str(out)], env=env,
                                capture_output=True, text=True, timeout=1800, check=True)
        seconds = time.perf_counter() - t0
        return json.loads(result.stdout.strip().splitlines()[-1]) | {"seconds": seconds,
                                                                     "output_bytes": out.stat().st_size}


def run(quick: bool = False, rounds: int = 0) -> list[dict]:
    import torch.multiprocessing as mp

    layers = 1 if quick else 5     # 4096x4096 layers: 16.8M parameters each; 5 -> 1.0 GB checkpoint
    rounds = rounds or (2 if quick else 3)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("ORCH_BENCH_TMP")) as root:
        cfg = {"root": root, "layers": layers, "width": WIDTH, "rounds": rounds}
        procs = mp.start_processes(_worker, args=(2, _free_port(), cfg, out), nprocs=2, start_method="spawn",
                                   join=False)
        result = None
        while result is None:
            try:
                result = out.get(timeout=5)
            except queue_mod.Empty:
                if all(not p.is_alive() for p in procs.processes):
                    raise RuntimeError("the benchmark workers exited without a result") from None
        procs.join()
        gb = result["bytes"] / 1e9
        t = result["times"]
        print(f"machine: {machine()}")
        params = layers * (WIDTH * WIDTH + WIDTH) / 1e6
        print(f"2 gloo ranks, ZeRO-2 fp32, {layers} x Linear({WIDTH},{WIDTH}) = {params:.1f}M "
              f"parameters; checkpoint shards {gb:.2f} GB (torch.save files {result['peer_bytes'] / 1e9:.2f} GB); "
              f"median of {rounds}; every load reads a cold page cache; deleting old checkpoints is not timed")
        disk_w, disk_r = result["disk"]
        print(f"disk direct bandwidth (dd, O_DIRECT, 1 GiB, same filesystem): write {disk_w:.2f} GB/s, "
              f"read {disk_r:.2f} GB/s; load average {os.getloadavg()[0]:.1f}")
        save = Measurement("save_checkpoint (xxh3-128, fsync, manifest)", t["save"])
        dcp_save = Measurement("torch.distributed.checkpoint.save", t["dcp.save"])
        peers = [dcp_save, Measurement("DCP save, resume layout", t["dcp.save.resume"]),
                 Measurement("torch.save, same tensors", t["torch.save"]),
                 Measurement("torch.save + fsync", t["torch.save+fsync"])]
        print_table("save, seconds (lower is better)", save, peers)
        load = Measurement("load_checkpoint (verify, publish)", t["load"])
        load_peers = [Measurement("DCP load, resume (model + shard)", t["dcp.load.resume"]),
                      Measurement("DCP load, bare tensors", t["dcp.load"]),
                      Measurement("torch.load + copy", t["torch.load"])]
        print_table("load from a cold page cache, seconds (lower is better)", load, load_peers)
        for m, kind, disk in ((save, "save", disk_w), (load, "load", disk_r)):
            print(f"  {kind}: ours {gb / m.median:.2f} GB/s = {gb / m.median / disk:.2f} x the disk's direct {kind} "
                  f"bandwidth (goal >= 0.8)")
        per_round = [gb / t_load / dd for t_load, dd in zip(t["load"], result["dd_reads"])]
        print(f"  load vs dd direct read measured right before it, per round: median {statistics.median(per_round):.2f}"
              f" (range {min(per_round):.2f}-{max(per_round):.2f}; dd read "
              f"{'/'.join(f'{dd:.2f}' for dd in result['dd_reads'])} GB/s)")
        for p in peers + load_peers:
            print(f"  {p.name}: {result['peer_bytes'] / 1e9 / p.median:.2f} GB/s")
        print(f"  DCP resume checkpoint: {result['resume_bytes'] / 1e9:.2f} GB (the replicated model written once); "
              "its load reads the whole model on every rank")
        for p in load_peers[:2]:
            per = [q / o for o, q in zip(t["load"], p.samples)]
            print(f"  load throughput vs {p.name}: {p.median / load.median:.2f}x (per round: median "
                  f"{statistics.median(per):.2f}x, range {min(per):.2f}-{max(per):.2f}; goal >= 1.0)")
        for m, p, disk in [(save, q, disk_w) for q in peers] + [(load, q, disk_r) for q in load_peers]:
            rows.append({"name": f"checkpoint {m.name.split(' ')[0]} {gb:.2f} GB, 2 ranks", "median_s": m.median,
                         "range_s": m.spread, "peer": p.name, "peer_median_s": p.median, "peer_range_s": p.spread,
                         "ratio": m.median / p.median, "gb_per_s": gb / m.median,
                         "peer_gb_per_s": result["peer_bytes"] / 1e9 / p.median,
                         "of_disk_direct": gb / m.median / disk})

        s = result["stall"]
        step = statistics.median(s["step"])
        stall_async = statistics.median(s["async save + step"]) - step
        stall_sync = statistics.median(s["sync save + step"]) - step
        call_async, call_sync = statistics.median(s["async call"]), statistics.median(s["sync call"])
        print(f"\nsave during training (one step {step * 1e3:.0f} ms): the save call blocks {call_async * 1e3:.0f} ms "
              f"async vs {call_sync * 1e3:.0f} ms sync ({call_async / call_sync:.2f}); step-time stall "
              f"(save + next step - a step) {stall_async * 1e3:.0f} ms async vs {stall_sync * 1e3:.0f} ms sync "
              f"({stall_async / stall_sync:.2f}). On CPU ranks the writer thread competes with the step for the "
              "same cores; on GPU ranks the step runs on the device.")
        rows.append({"name": "async save: blocking part of the call", "median_s": call_async,
                     "peer": "sync save call", "peer_median_s": call_sync, "ratio": call_async / call_sync})
        rows.append({"name": "async save step stall", "median_s": stall_async, "peer": "sync save stall",
                     "peer_median_s": stall_sync, "ratio": stall_async / stall_sync})

        manifest = json.loads((Path(result["checkpoint"]) / "manifest.json").read_text())
        largest = max(f["bytes"] for f in manifest["files"].values())
        size_note = "quick: below the 1 GB of the goal" if gb < 1 else "goal >= 1 GB met"
        print(f"\nconsolidation of {gb:.2f} GB ({size_note}); "
              f"largest shard {largest / 1e6:.0f} MB")
        peer = _consolidation_rss(result["checkpoint"], "naive", ".pt")
        for suffix in (".safetensors", ".pt"):
            ours = _consolidation_rss(result["checkpoint"], "orch", suffix)
            ratio = ours["peak"] / largest
            print(f"  orch consolidate -> {suffix:<12} peak RSS {ours['peak'] / 1e6:6.0f} MB "
                  f"(at start {ours['base'] / 1e6:.0f} MB), {ours['seconds']:.1f} s; "
                  f"peak / largest shard {ratio:.2f} (goal < 2); vs load-all {ours['peak'] / peer['peak']:.2f}")
            rows.append({"name": f"consolidate {gb:.2f} GB -> {suffix}: peak RSS {ours['peak'] / 1e6:.0f} MB = "
                                 f"{ratio:.2f} x largest shard (goal < 2)", "rss_ratio": ratio,
                         "ratio": ours["peak"] / peer["peak"], "peer": "load-all-shards peak RSS",
                         "peak_rss_mb": ours["peak"] / 1e6, "largest_shard_mb": largest / 1e6,
                         "median_s": ours["seconds"]})
        print(f"  load every shard + torch.save      peak RSS {peer['peak'] / 1e6:6.0f} MB, {peer['seconds']:.1f} s; "
              f"peak / largest shard {peer['peak'] / largest:.2f}")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 67 MB checkpoint instead of 1 GB, 2 rounds")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 3, 2 with --quick)")
    args = parser.parse_args()
    run(args.quick, args.rounds)
