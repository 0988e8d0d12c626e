"""Which collective is fastest for ZeRO's two partitioned operations, on 2 gloo ranks (CPU).

engine/comm.py picks one implementation per backend (``PLANS``); this benchmark is the
evidence for the gloo row. It times, on the same buffers in the same run:

* reduce to owners: native ``reduce_scatter_single`` vs in-place ``all_reduce`` (each owner
  reads its slice) vs one ``reduce`` per owner;
* gather partitions: in-place ``all_gather_single`` vs zero-others + ``all_reduce`` vs the
  list form of ``all_gather`` vs one in-place ``broadcast`` per owner, all in flight at once
  (the gloo plan's gather since 2026-12-06).

``--world`` sets the number of ranks (default 2).

Each figure is the median of ``--repeats`` calls, over ``--rounds`` interleaved rounds, and
is printed with its ratio to the first alternative of its group.

    python -m bench.collectives [--numel 25000000] [--repeats 5] [--rounds 3] [--world 2]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_rs_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_ag_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _cases(numel: int, rank: int, world: int) -> dict[str, dict[str, Callable[[], None]]]:
    flat = torch.randn(numel)
    size = numel // world
    out = torch.empty(size)
    own = slice(rank * size, (rank + 1) * size)

    def reduce_per_owner() -> None:
        for owner in range(world):
            dist.reduce(flat[owner * size:(owner + 1) * size], dst=owner)

    def gather_by_all_reduce() -> None:
        flat[: own.start].zero_()
        flat[own.stop:].zero_()
        dist.all_reduce(flat)

    def broadcast_per_owner() -> None:
        works = [dist.broadcast(flat[r * size:(r + 1) * size], src=r, async_op=True) for r in range(world)]
        for work in works:
            work.wait()

    def gather_list() -> None:
        outs = [flat[r * size:(r + 1) * size] for r in range(world)]
        dist.all_gather(outs, outs[rank].clone())

    return {
        "reduce to owners": {
            "reduce_scatter_single (native)": lambda: _rs_single(out, flat),
            "all_reduce + slice": lambda: dist.all_reduce(flat),
            "reduce per owner": reduce_per_owner,
        },
        "gather partitions": {
            "all_gather_single (in place)": lambda: _ag_single(flat, flat[own]),
            "zero others + all_reduce": gather_by_all_reduce,
            "all_gather (list)": gather_list,
            "broadcast per owner": broadcast_per_owner,
        },
    }


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue: "mp.Queue") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cases = _cases(args.numel, rank, world)
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for group, impls in cases.items():
            for name, fn in impls.items():
                fn()  # warm-up: first use of a shape allocates gloo buffers
                for _ in range(args.repeats):
                    dist.barrier()
                    t0 = time.perf_counter()
                    fn()
                    times.setdefault((group, name), []).append(time.perf_counter() - t0)
    if rank == 0:
        queue.put({key: statistics.median(v) for key, v in times.items()})
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(numel: int = 25_000_000, repeats: int = 5, rounds: int = 3, world: int = 2) -> dict[tuple[str, str], float]:
    """Median seconds per (operation, implementation), measured on ``world`` gloo ranks."""
    args = argparse.Namespace(numel=numel - numel % world, repeats=repeats, rounds=rounds)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, args=(world, _free_port(), args, queue), nprocs=world, start_method="spawn")
    return queue.get(timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=25_000_000, help="fp32 elements per buffer")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--world", type=int, default=2, help="gloo ranks")
    args = parser.parse_args()
    medians = run(args.numel, args.repeats, args.rounds, args.world)
    print(f"gloo, {args.world} ranks, {args.numel:,} fp32 elements; median of {args.repeats} x {args.rounds} rounds")
    groups: dict[str, list[tuple[str, float]]] = {}
    for (group, name), secs in medians.items():
        groups.setdefault(group, []).append((name, secs))
    for group, rows in groups.items():
        base = rows[0][1]
        print(f"\n{group}:")
        for name, secs in rows:
            print(f"  {name:<32} {secs * 1e3:8.1f} ms   ratio {secs / base:5.2f}")


if __name__ == "__main__":
    main()
