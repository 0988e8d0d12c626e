"""NCCL probe at world 1 with the communicator forced active: every collective of every plan the
engine uses, on bf16 CUDA tensors, through engine.initialize at stages 1-3 (ZeRO-3 with
activation checkpointing and zero.Init) with the host syncs of one step counted by CUDA's own
detector, two checkpoint saves through the reused pinned arena, then NCCL's flight-recorder dump
as the hang watchdog reads it (the recorder turned on by engine.init_distributed alone). A world of 1 normally
skips every collective (Comm.active is False); forcing it makes NCCL run each call for real, so a
host tensor, a wrong dtype or an unsupported in-place form fails here, not on 512 GPUs."""
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

for name in ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"):
    os.environ.pop(name, None)            # engine.init_distributed must turn the recorder on itself
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29611")
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")

import engine  # noqa: E402
from engine import comm, flight_recorder  # noqa: E402
from engine.host_syncs import count_host_syncs  # noqa: E402
from engine.models import build_model  # noqa: E402

_init = comm.Comm.__init__


def forced(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.active = self.enabled            # world 1, collectives issued anyway


comm.Comm.__init__ = forced
engine.init_distributed(dist_backend="nccl")
for plan_name, plan in comm.PLANS.items():
    c = comm.Comm(plan=plan)
    x = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    c.all_reduce(x)
    c.all_gather_into(x, x[:4096])                       # in place (world 1: the whole tensor)
    c.reduce_scatter_into(x, x)
    c.reduce_to_shards(x)
    c.broadcast(x)
    c.all_gather_partitions(x, 4096, 1024)               # chunked, one chunk in flight
    print(f"plan {plan_name}: every collective ran on {x.device} {x.dtype}")


def check_checkpoint_arena(eng, stage):
    """Two saves: the same pinned host arena both times, the same bytes on disk."""
    try:
        with tempfile.TemporaryDirectory() as save_dir:
            eng.save_checkpoint(save_dir, tag="a")
            arena = eng.__dict__["_checkpoint_arena"]
            first = (arena._buffer.data_ptr(), arena.nbytes, arena._buffer.is_pinned())
            eng.save_checkpoint(save_dir, tag="b")
            reused = first == (arena._buffer.data_ptr(), arena.nbytes, arena._buffer.is_pinned())
            shards = sorted((Path(save_dir) / "a").glob("*.safetensors"))
            identical = bool(shards) and all(p.read_bytes() == (Path(save_dir) / "b" / p.name).read_bytes()
                                             for p in shards)
    except Exception as exc:  # noqa: BLE001 - reported; the NCCL dump below still runs
        print(f"stage {stage}: checkpoint save failed: {type(exc).__name__}: {exc}")
        return False
    print(f"stage {stage}: checkpoint arena {first[1] / 2**20:.1f} MiB pinned={first[2]}, reused={reused}, "
          f"two saves identical={identical}")
    return reused and first[2] and identical


ok = True
for stage in (1, 2, 3):
    cfg = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 2_000_000, "allgather_bucket_size": 2_000_000,
                                 "stage3_max_reuse_distance": 0, "stage3_param_persistence_threshold": 1000}}
    with (engine.zero.Init(config_dict_or_path=cfg) if stage == 3 else torch.no_grad()):
        model = build_model("small")
    model.set_activation_checkpointing(stage == 3)
    eng, *_ = engine.initialize(model=model, config=cfg)
    for step in range(3):
        x = torch.randint(0, 8192, (2, 128), device="cuda")
        with count_host_syncs("cuda") as syncs:
            loss = eng(x, x)
            eng.backward(loss)
            eng.step()
    print(f"stage {stage}: loss {loss.item():.4f}, ledger {comm.ledger.mark_step()}, "
          f"host syncs in step 3: {syncs.report()}")
    ok = check_checkpoint_arena(eng, stage) and ok
print(f"NCCL env set by init_distributed: "
      f"{ {k: os.environ.get(k) for k in flight_recorder.recorder_env('nccl')} }")
data = flight_recorder.dump(str(dist.get_backend()))
entries = data.get("entries", [])
size = len(torch._C._distributed_c10d._dump_nccl_trace_json(True, False))
print(f"NCCL flight recorder ({flight_recorder.dump_function_name('nccl')}): {size} bytes, {len(entries)} entries; "
      f"last: {entries[-1].get('profiling_name') if entries else None} {entries[-1].get('state') if entries else ''}")
from engine.trainer.watchdog import last_collectives  # noqa: E402

lines, note = last_collectives()
print("as a hang report shows them:\n  " + "\n  ".join(lines or [note]))
sys.exit(0 if entries and lines and ok else 1)
