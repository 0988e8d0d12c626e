"""Scale table: the engine as one rank of 8-1024 NCCL ranks, simulated on CPU, beside FSDP2.

    python -m bench.scale                         # the recorded table (bench-100m, 350m, 1b, 3b; stages 1-3)
    python -m bench.scale --quick                 # bench-100m at N = 8 and 64
    python -m bench.scale --world 64 --stage 3 --model 350m --checkpointing
    python -m bench.scale --stage 3 --model 350m 1b --hold-tied   # the tied unit gathered once a step
    python -m bench.scale --stage 3 --model 350m 1b --untied      # lm_head a weight of its own

Each row runs in a fresh process (engine/scale_sim.py): torch's fake process group of N ranks,
the NCCL collective plan, bf16, AdamW, micro-batch 1, short sequences; stage 3 builds the model
under ``engine.zero.Init``. Initial values are not drawn and matrix products are not computed
(engine/sim_modes.py: nothing measured depends on values), for orch and FSDP2 alike, so a 3B
row takes about a minute of CPU. Columns, per rank per steady-state step:

* ``bytes/ZeRO``: bytes this rank sends (ledger) ÷ the ZeRO paper's 2Ψ·(N−1)/N (stages 1-2) or
  3Ψ·(N−1)/N (stage 3) bf16 elements. Goal ≤ 1.05.
* ``vs FSDP2``: our bytes ÷ FSDP2's (``fully_shard`` per block and the root, bf16 parameters,
  reductions in the engine's gradient dtype: fp32 unless ``data_types.grad_accum_dtype`` says
  otherwise) on the same model under the same fake group. Goal ≤ 1.0.
* ``staging/unit``: stage 3's peak of gathered units + staging buffers ÷ (largest fetch unit +
  the prefetch bucket). Goal ≤ 1.05. A tied embedding (the largest unit) is released when the
  head's backward is done (engine/zero/stage3_hooks.py), so no block's unit sits beside it.
  ``FSDP2 staging``: FSDP2's peak of unsharded parameters + all-gather outputs (engine/fsdp2_staging.py)
  ÷ the same denominator.
* ``--hold-tied`` sets orch's ``stage3_hold_tied_params``: the tied unit is gathered once a step and
  held from the embedding's forward through the head's backward, as FSDP2 holds its root; without it
  (the default) it is gathered for the embedding and again for the head. ``--reuse-distance`` sets
  ``stage3_max_reuse_distance`` (default 0). ``--untied`` builds the preset with its own lm_head
  weight (``tie_embeddings=False``, as Llama-style models are): no unit is read twice in forward,
  so there is nothing to hold and both the bytes and the staging goal apply to the same run.
* ``calls``: collectives per step; ``state/formula``: model-state bytes ÷ the paper's formula.

Numbers describe communication and memory only: the fake group moves no data, so losses and
times are meaningless (time is CPU compute of one rank).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Optional

from bench.common import REPO

WORLDS = (8, 64, 256, 1024)
TABLE = [(m, s) for m in ("bench-100m", "350m", "1b", "3b") for s in (1, 2, 3)]
QUICK = [("bench-100m", s) for s in (1, 2, 3)]
SEQ_LEN = 32


def ds_config(stage: int, d_model: int, hold_tied: bool = False, reuse_distance: int = 0) -> dict[str, Any]:
    """A scale run's ds_config: bf16 AdamW; stage 3 prefetches one MLP matrix and releases after use
    (a tied unit, too, unless ``hold_tied``)."""
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "reduce_bucket_size": 50_000_000,
                            "allgather_bucket_size": 50_000_000}
    if stage == 3:
        zero |= {"stage3_prefetch_bucket_size": 4 * d_model * d_model, "stage3_max_reuse_distance": reuse_distance,
                 "stage3_param_persistence_threshold": 10 * d_model, "stage3_hold_tied_params": hold_tied}
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0}},
           "gradient_clipping": 1.0, "zero_optimization": zero}
    return cfg


def one_row(model: str, stage: int, world: int, peer: bool, checkpointing: bool, hold_tied: bool = False,
            reuse_distance: int = 0, untied: bool = False) -> dict[str, Any]:
    """Simulate one configuration in this process (the child side)."""
    from engine.models import build_model, get_preset
    from engine.scale_sim import fsdp2_step, simulate

    shape: dict[str, Any] = {"seq_len": SEQ_LEN} | ({"tie_embeddings": False} if untied else {})
    preset = get_preset(model, **shape)

    def factory() -> Any:
        m = build_model(model, **shape)
        if checkpointing:
            m.set_activation_checkpointing(True)
        return m

    report = simulate(factory, ds_config(stage, preset.d_model, hold_tied, reuse_distance), world=world,
                      vocab_size=preset.vocab_size, seq_len=SEQ_LEN, model_name=model)
    row = report.as_dict() | {"hold_tied": hold_tied, "reuse_distance": reuse_distance, "untied": untied}
    if peer:
        import torch

        grads = next(iter(report.step_by_op.get(k) and k.split("/")[1] for k in report.step_by_op
                          if k.startswith("reduce_scatter/")), "bfloat16")
        fsdp = fsdp2_step(lambda: build_model(model, **shape), lambda m: list(m.blocks), world=world,
                          vocab_size=preset.vocab_size, seq_len=SEQ_LEN, steps=1,
                          reduce_dtype=getattr(torch, grads))   # the engine's gradient dtype (fp32 by default)
        row["fsdp2_bytes_sent"] = fsdp["bytes_sent"]
        row["fsdp2_calls"] = fsdp["calls"]
        row["fsdp2_peak_gathered_bytes"] = fsdp["peak_gathered_bytes"]
        row["fsdp2_peak_unsharded_bytes"] = fsdp["peak_unsharded_bytes"]
    return row


def run_child(model: str, stage: int, world: int, peer: bool, checkpointing: bool, hold_tied: bool = False,
              reuse_distance: int = 0, untied: bool = False, timeout: int = 1800) -> Optional[dict[str, Any]]:
    argv = [sys.executable, "-m", "bench.scale", "--child", "--model", model, "--stage", str(stage),
            "--world", str(world), "--reuse-distance", str(reuse_distance)] + (["--peer"] if peer else []) \
        + (["--checkpointing"] if checkpointing else []) + (["--hold-tied"] if hold_tied else []) \
        + (["--untied"] if untied else [])
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        print(f"  {model} stage {stage} N={world}: no result within {timeout} s", file=sys.stderr)
        return None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    print(f"  {model} stage {stage} N={world}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None


def fsdp2_staging_ratio(row: dict[str, Any]) -> float:
    """FSDP2's gathered peak over stage 3's staging denominator (largest fetch unit + prefetch bucket)."""
    bound = row.get("largest_unit_bytes", 0) + row.get("prefetch_bytes", 0)
    peak = row.get("fsdp2_peak_gathered_bytes")
    return peak / bound if peak and bound else float("nan")


def tie_policy(row: dict[str, Any]) -> str:
    """The table's ``tied`` column: ``untied``, or what stage 3 does with the tied unit."""
    return "untied" if row.get("untied") else "hold" if row.get("hold_tied") else "release"


def format_rows(rows: list[dict[str, Any]]) -> str:
    head = (f"{'N':>5} {'stage':>5} {'model':<11} {'tied':<7} {'Ψ':>8} {'MB/step':>8} {'bytes/ZeRO':>10} "
            f"{'vs FSDP2':>8} {'staging/unit':>12} {'FSDP2 staging':>13} {'calls':>6} {'FSDP2 calls':>11} "
            f"{'state MB':>8} {'state/formula':>13} {'act MB':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        peer = r.get("fsdp2_bytes_sent")
        lines.append(
            f"{r['world']:>5} {r['stage']:>5} {r['model']:<11} {tie_policy(r):<7} "
            f"{r['parameters'] / 1e6:>7.1f}M {r['bytes_sent'] / 2**20:>8.1f} {r['volume_ratio']:>10.3f} "
            f"{(r['bytes_sent'] / peer if peer else float('nan')):>8.4f} "
            f"{(r['staging_ratio'] if r['stage'] == 3 else float('nan')):>12.3f} {fsdp2_staging_ratio(r):>13.3f} "
            f"{r['calls']:>6} "
            f"{r.get('fsdp2_calls', '-'):>11} {r['model_state_bytes'] / 2**20:>8.1f} {r['state_ratio']:>13.3f} "
            f"{r['activation_bytes'] / 2**20:>7.1f}")
    return "\n".join(lines)


def run(quick: bool = False, worlds: tuple[int, ...] = WORLDS, table: Optional[list[tuple[str, int]]] = None,
        peer: bool = True, checkpointing: bool = False, hold_tied: bool = False,
        reuse_distance: int = 0, json_path: Optional[str] = None, untied: bool = False) -> list[dict[str, Any]]:
    """Every (N, model, stage) of the table; returns the summary rows ``python -m bench`` records."""
    table = table or (QUICK if quick else TABLE)
    worlds = (8, 64) if quick else worlds
    rows = []
    for world in worlds:
        for model, stage in table:
            row = run_child(model, stage, world, peer and stage == 3 or peer and quick, checkpointing, hold_tied,
                            reuse_distance, untied)
            if row is not None:
                rows.append(row)
                if json_path:       # every figure of the row, for ratios finer than the table prints
                    with open(json_path, "a") as out:
                        out.write(json.dumps(row, default=str) + "\n")
                print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
    print(format_rows(rows))
    return [{"benchmark": "scale", "name": f"N={r['world']} Z{r['stage']} {r['model']} bytes/ZeRO volume",
             "ours": r["volume_ratio"], "peer": None, "unit": "x"} for r in rows]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--world", type=int, nargs="*")
    parser.add_argument("--stage", type=int, nargs="*")
    parser.add_argument("--model", nargs="*")
    parser.add_argument("--peer", action="store_true", help="also FSDP2 (default for stage 3 rows)")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing on")
    parser.add_argument("--hold-tied", action="store_true",
                        help="stage 3: stage3_hold_tied_params (gather a tied unit once a step and hold it)")
    parser.add_argument("--reuse-distance", type=int, default=0, help="stage 3: stage3_max_reuse_distance")
    parser.add_argument("--untied", action="store_true", help="the preset with its own lm_head (tie_embeddings=False)")
    parser.add_argument("--json", metavar="PATH", help="also append every row, all its figures, to PATH (JSON lines)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        row = one_row(args.model[0], args.stage[0], args.world[0], args.peer, args.checkpointing, args.hold_tied,
                      args.reuse_distance, args.untied)
        print(json.dumps(row, default=str))
        return
    table = None
    if args.model or args.stage:
        table = [(m, s) for m in (args.model or ["bench-100m"]) for s in (args.stage or [1, 2, 3])]
    run(args.quick, tuple(args.world or WORLDS), table, peer=not args.no_peer, checkpointing=args.checkpointing,
        hold_tied=args.hold_tied, reuse_distance=args.reuse_distance, json_path=args.json, untied=args.untied)


if __name__ == "__main__":
    main()
