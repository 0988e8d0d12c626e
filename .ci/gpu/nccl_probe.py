"""NCCL probe at world 1 with the communicator forced active: every collective of every plan the
engine uses, on bf16 CUDA tensors, through engine.initialize at stages 1-3 (ZeRO-3 with
activation checkpointing and zero.Init), then NCCL's flight-recorder dump. A world of 1 normally
skips every collective (Comm.active is False); forcing it makes NCCL run each call for real, so a
host tensor, a wrong dtype or an unsupported in-place form fails here, not on 512 GPUs."""
import os
import pickle
import sys

import torch
import torch.distributed as dist

os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29611")
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")

import engine  # noqa: E402
from engine import comm  # noqa: E402
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
    c.reduce_to_owners(x, [(0, 0, 4096)])
    c.broadcast(x)
    c.all_gather_partitions(x, 4096, 1024)               # chunked, one chunk in flight
    print(f"plan {plan_name}: every collective ran on {x.device} {x.dtype}")
for stage in (1, 2, 3):
    cfg = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 2_000_000, "allgather_bucket_size": 2_000_000,
                                 "stage3_max_reuse_distance": 0, "stage3_param_persistence_threshold": 1000}}
    with (engine.zero.Init(config_dict_or_path=cfg) if stage == 3 else torch.no_grad()):
        model = build_model("small")
    model.set_activation_checkpointing(stage == 3)
    eng, *_ = engine.initialize(model=model, config=cfg)
    for _ in range(2):
        x = torch.randint(0, 8192, (2, 128), device="cuda")
        loss = eng(x, x)
        eng.backward(loss)
        eng.step()
    print(f"stage {stage}: loss {loss.item():.4f}, ledger {comm.ledger.mark_step()}")
dump = torch._C._distributed_c10d._dump_nccl_trace()
entries = pickle.loads(dump).get("entries", [])
print(f"NCCL flight recorder: {len(entries)} entries; last: {entries[-1].get('profiling_name') if entries else None}")
sys.exit(0 if entries else 1)
