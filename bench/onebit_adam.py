"""1-bit Adam beside Adam on the communication-bound workload: step time, bytes per step, and the
step time a 25 Gb/s link would give, at 2 and 4 gloo ranks, plus bytes per step at fake world 64.

Workload: ``bench-100m`` (fp32, micro-batch 1, seq 64), ZeRO stage 0 (1-bit Adam works without
ZeRO, as in DeepSpeed), ``gradient_clipping`` 1.0. ``adam``: ``"type": "Adam"`` (the gradient
all-reduce every step). ``onebit``: ``"type": "OneBitAdam"`` with ``freeze_step`` 2, so every
timed step is a compressed one (the local momentum averaged as 1-bit signs, no gradient
all-reduce). Same learning rate and betas for both.

Per timed step (barriers around it, so it is the slowest rank's): wall time; the time spent
inside collectives (every torch.distributed collective made synchronous and timed); the bytes
this rank sent (the communication ledger's ring bytes). The projection for a 25 Gb/s link is
``(step − collective time) + bytes sent / 3.125 GB/s``: loopback gloo moves bytes at memory
speed, so the compression shows in the bytes and in that projection, not much in the wall time.
Fake world 64: ``engine.scale_sim.simulate`` (torch's fake process group, the NCCL plan), one
steady-state step of each optimizer.

Each (candidate, world) is its own torchrun launch; rounds interleave the candidates; figures are
medians over rounds (each round's figure the median of its timed steps).

    python -m bench.onebit_adam [--rounds 2] [--steps 3] [--worlds 2 4] [--record]
    python -m bench.onebit_adam --quick          # 2 layers, 1 round: a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from bench.common import REPO, append_benchmarks_md, load_average, machine

CANDIDATES = ("adam", "onebit")
LINK_BYTES_PER_S = 25e9 / 8
FREEZE_STEP = 2
LR, BETAS = 3e-4, (0.9, 0.999)


def ds_config(candidate: str, micro_batch: int = 1) -> dict[str, Any]:
    params: dict[str, Any] = {"lr": LR, "betas": list(BETAS), "eps": 1e-8, "weight_decay": 0.0}
    if candidate == "onebit":
        optimizer = {"type": "OneBitAdam", "params": {**params, "freeze_step": FREEZE_STEP}}
    else:
        optimizer = {"type": "Adam", "params": params}
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "optimizer": optimizer, "zero_optimization": {"stage": 0}}


# -- one rank of one launch -----------------------------------------------------------------------
class CollectiveClock:
    """Makes torch.distributed's collectives synchronous and adds up the time spent in them."""

    NAMES = ("all_reduce", "all_to_all_single", "all_gather_into_tensor", "all_gather_single", "broadcast",
             "reduce", "reduce_scatter_tensor", "all_gather")

    def __init__(self) -> None:
        import torch.distributed as dist

        self.seconds = 0.0
        for name in self.NAMES:
            original = getattr(dist, name, None)
            if original is not None:
                setattr(dist, name, self._timed(original))

    def _timed(self, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            kwargs["async_op"] = False
            started = time.perf_counter()
            fn(*args, **kwargs)
            self.seconds += time.perf_counter() - started
            return _Done()
        return call


class _Done:
    def wait(self, *_: Any) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def worker(candidate: str, spec: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    import engine
    from engine.comm_ledger import ledger
    from engine.models import build_model

    torch.set_num_threads(1)
    clock = CollectiveClock()
    engine.init_distributed()
    model = build_model(spec["preset"], seed=0, **spec["overrides"])
    eng, _, _, _ = engine.initialize(model=model, config=ds_config(candidate))
    rank = dist.get_rank()
    tokens = torch.randint(0, model.config.vocab_size, (1, model.config.seq_len + 1),
                           generator=torch.Generator().manual_seed(rank))
    steps = []
    for i in range(spec["warmup"] + spec["steps"]):
        dist.barrier()
        ledger.mark_step()
        before, started = clock.seconds, time.perf_counter()
        loss = eng(tokens[:, :-1], tokens[:, 1:])
        eng.backward(loss)
        eng.step()
        dist.barrier()
        elapsed, moved = time.perf_counter() - started, ledger.mark_step()
        if i >= spec["warmup"]:
            steps.append({"seconds": elapsed, "collective_s": clock.seconds - before,
                          "bytes_sent": moved["comm_bytes_sent"], "loss": float(loss)})
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps(steps))
    dist.destroy_process_group()


# -- the driver ---------------------------------------------------------------------------------
def launch(candidate: str, world: int, spec: dict[str, Any]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "steps.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--standalone",
               "-m", "bench.onebit_adam", "--worker", candidate, json.dumps({**spec, "out": str(out)})]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
        if done.returncode:
            raise RuntimeError(f"{candidate} at {world} ranks failed:\n{done.stderr[-3000:]}")
        steps = json.loads(out.read_text())
    step = statistics.median(s["seconds"] for s in steps)
    comm = statistics.median(s["collective_s"] for s in steps)
    sent = statistics.median(s["bytes_sent"] for s in steps)
    return {"step_s": step, "collective_s": comm, "bytes_sent": sent,
            "projected_s": max(step - comm, 0.0) + sent / LINK_BYTES_PER_S}


def fake_world_bytes(world: int, spec: dict[str, Any]) -> dict[str, int]:
    """Bytes sent per rank in one steady-state step at a fake world, per candidate (fresh processes)."""
    out = {}
    for candidate in CANDIDATES:
        code = ("import json, sys; from bench.onebit_adam import simulate_bytes; "
                f"print(json.dumps(simulate_bytes({candidate!r}, {world}, json.loads(sys.argv[1]))))")
        done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], check=True, cwd=REPO,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        out[candidate] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def simulate_bytes(candidate: str, world: int, spec: dict[str, Any]) -> int:
    from engine.models import build_model, get_preset
    from engine.scale_sim import simulate

    cfg = get_preset(spec["preset"], **spec["overrides"])
    report = simulate(lambda: build_model(spec["preset"], seed=0, **spec["overrides"]), ds_config(candidate),
                      world=world, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len, steps=FREEZE_STEP + 2,
                      shapes_only=False)   # stage 0 adopts autograd's gradients: they must be real numbers
    return int(report.bytes_sent)


def run(quick: bool = False, rounds: Optional[int] = None, steps: Optional[int] = None,
        worlds: Sequence[int] = (2, 4), fake_world: int = 64, record: bool = False) -> list[dict[str, Any]]:
    spec = {"preset": "bench-100m", "overrides": {"n_layer": 2} if quick else {},
            "warmup": FREEZE_STEP + 1, "steps": steps or (1 if quick else 3)}
    rounds = rounds or (1 if quick else 2)
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    loads: list[float] = []
    failed: list[str] = []
    for r in range(rounds):
        for world in worlds:
            order = CANDIDATES if r % 2 == 0 else tuple(reversed(CANDIDATES))
            for candidate in order:
                loads.append(load_average())
                try:
                    results.setdefault((candidate, world), []).append(launch(candidate, world, spec))
                except RuntimeError as exc:      # e.g. a rank killed for memory on a shared machine
                    print(str(exc).splitlines()[0], "(SIGKILL: out of memory?)" if "-9" in str(exc) else "")
                    failed.append(f"{candidate} @ {world} ranks")
                    results.pop((candidate, world), None)
    fake = fake_world_bytes(fake_world, spec)
    rows = summarize(results, fake, fake_world, spec, quick)
    rows += [{"benchmark": "onebit_adam", "name": name, "error": "launch failed (see the output above)"}
             for name in failed]
    if record:
        record_rows(rows, loads, quick, rounds, spec)
    return rows


def summarize(results: dict, fake: dict[str, int], fake_world: int, spec: dict[str, Any],
              quick: bool) -> list[dict[str, Any]]:
    rows = []
    print(f"\n1-bit Adam vs Adam, {spec['preset']}{' (quick)' if quick else ''}, stage 0, fp32, micro-batch 1")
    print(f"  {'world':>5} {'candidate':<8} {'step s':>8} {'coll. s':>8} {'MB sent':>9} {'@25Gb/s s':>10}")
    for (candidate, world), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        spread = f"{min(r['step_s'] for r in runs):.3g}-{max(r['step_s'] for r in runs):.3g}"
        print(f"  {world:>5} {candidate:<8} {med['step_s']:>8.3f} {med['collective_s']:>8.3f} "
              f"{med['bytes_sent'] / 2**20:>9.1f} {med['projected_s']:>10.3f}")
        rows.append({"benchmark": "onebit_adam", "name": f"{candidate} @ {world} gloo ranks", "median_s": med["step_s"],
                     "range_s": spread, "bytes_sent": med["bytes_sent"], "projected_25gbps_s": med["projected_s"],
                     "collective_s": med["collective_s"], "candidate": candidate, "world": world})
    for world in sorted({w for _, w in results}):
        a = next((r for r in rows if r.get("world") == world and r["candidate"] == "adam"), None)
        b = next((r for r in rows if r.get("world") == world and r["candidate"] == "onebit"), None)
        if a is None or b is None:
            continue
        print(f"  {world} ranks: 1-bit/Adam step {b['median_s'] / a['median_s']:.2f}x, bytes "
              f"{b['bytes_sent'] / a['bytes_sent']:.4f}x (1/{a['bytes_sent'] / b['bytes_sent']:.1f}), "
              f"projected @25 Gb/s {b['projected_25gbps_s'] / a['projected_25gbps_s']:.2f}x")
        rows.append({"benchmark": "onebit_adam", "name": f"1-bit/Adam @ {world} ranks",
                     "ratio": b["median_s"] / a["median_s"], "bytes_ratio": b["bytes_sent"] / a["bytes_sent"],
                     "projected_ratio": b["projected_25gbps_s"] / a["projected_25gbps_s"]})
    ratio = fake["onebit"] / fake["adam"]
    print(f"  fake world {fake_world}: Adam {fake['adam'] / 2**20:.1f} MiB/step, 1-bit Adam "
          f"{fake['onebit'] / 2**20:.2f} MiB/step: {ratio:.4f}x (1/{1 / ratio:.1f})")
    rows.append({"benchmark": "onebit_adam", "name": f"bytes/step @ fake world {fake_world}", "ratio": ratio,
                 "adam_bytes": fake["adam"], "onebit_bytes": fake["onebit"]})
    return rows


def record_rows(rows: list[dict[str, Any]], loads: list[float], quick: bool, rounds: int,
                spec: dict[str, Any]) -> None:
    lines = [f"Machine: {machine()}; load average before launches {min(loads):.1f}-{max(loads):.1f}.",
             f"Command: `python -m bench.onebit_adam{' --quick' if quick else ''} --rounds {rounds} "
             f"--steps {spec['steps']} --record`", "",
             "| world | candidate | step (median, range) | in collectives | sent/step | projected @25 Gb/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "candidate" in r:
            lines.append(f"| {r['world']} | {r['candidate']} | {r['median_s']:.3f} s ({r['range_s']}) | "
                         f"{r['collective_s']:.3f} s | {r['bytes_sent'] / 2**20:.1f} MiB | "
                         f"{r['projected_25gbps_s']:.3f} s |")
    lines.append("")
    for r in rows:
        if "bytes_ratio" in r:
            lines.append(f"- {r['name']}: step {r['ratio']:.2f}x, bytes {r['bytes_ratio']:.4f}x, "
                         f"projected @25 Gb/s {r['projected_ratio']:.2f}x")
        elif "adam_bytes" in r:
            lines.append(f"- {r['name']}: 1-bit/Adam {r['ratio']:.4f}x ({r['onebit_bytes'] / 2**20:.2f} vs "
                         f"{r['adam_bytes'] / 2**20:.1f} MiB)")
    append_benchmarks_md("1-bit Adam vs Adam, communication-bound bench-100m, stage 0", lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--fake-world", type=int, default=64)
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker[0], json.loads(args.worker[1]))
        return
    run(args.quick, args.rounds, args.steps, args.worlds, args.fake_world, args.record)


if __name__ == "__main__":
    main()
