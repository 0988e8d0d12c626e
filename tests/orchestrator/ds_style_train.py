"""A training script written the way DeepSpeed users write them (argparse with --local_rank,
``add_config_arguments``, ``initialize(args=...)``, ``model_engine(batch)``/``backward``/``step``),
with ``import engine as deepspeed`` the only change. `orch launch` must run it unchanged.

Rank 0 writes what the job saw to ``--out``: its arguments, every rank's host, the losses.
"""
import argparse
import json
import os
import socket

import torch
import torch.distributed as dist

import engine as deepspeed


def main() -> None:
    parser = argparse.ArgumentParser(description="DeepSpeed-style regression")
    parser.add_argument("--local_rank", type=int, default=-1, help="passed by the deepspeed launcher")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", required=True)
    parser.add_argument("--note", default="")
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    model_engine, _, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(1234 + rank)
    losses = []
    for _ in range(args.steps * model_engine.gradient_accumulation_steps()):
        x = torch.randn(model_engine.train_micro_batch_size_per_gpu(), 16, generator=generator)
        loss = torch.nn.functional.mse_loss(model_engine(x), x.sum(dim=1, keepdim=True))
        model_engine.backward(loss)
        model_engine.step()
        losses.append(loss.item())
    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"argv_note": args.note, "local_rank_arg": args.local_rank, "LOCAL_RANK": os.environ["LOCAL_RANK"],
                       "world_size": world, "hosts": hosts, "losses": losses,
                       "deepspeed_config": args.deepspeed_config}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
