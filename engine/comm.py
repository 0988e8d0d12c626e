"""Process-group setup and the collectives the ZeRO engine uses, chosen per backend.

Why a module of its own: each logical operation the engine needs ("every rank ends up with
the sum of the slice it owns", "every rank ends up with every rank's partition") can be done
with several torch.distributed calls, and which is fastest depends on the backend:

* gloo (CPU): an in-place ``all_reduce`` beats gloo's own ``reduce_scatter`` (measured with
  ``python -m bench.collectives``, 2 ranks, 25M floats: reduce_scatter 195 ms vs all_reduce
  89 ms), so "reduce to shards" is an ``all_reduce`` after which each owner reads its shard.
  "Gather partitions" is one ``broadcast`` per owner of its own slice, all in flight at once:
  2 ranks, 27.4M floats, 25-40 ms, against 74-79 ms for zeroing the other slices and summing
  with ``all_reduce`` and 140-146 ms for gloo's in-place ``all_gather`` (4 ranks: 65, 162 and
  207 ms). A broadcast moves each slice once, where the all-reduce sends the whole buffer
  through a reduce-scatter and an all-gather phase; the calls grow with N, which is why it is
  gloo's plan (CPU jobs of a few ranks) and never NCCL's. ``all_gather`` with lists of
  different sizes fails on gloo, so partitions are always padded to equal size
  (see zero/partition.py).
* nccl (GPU): the ZeRO layouts shard every bucket and fetch unit evenly (zero/partition.py), so a
  reduction is one ``reduce_scatter_tensor`` (half the bytes of ``all_reduce``, one call whatever
  the world size) and a gather one in-place ``all_gather_into_tensor`` (no staging buffer).

The choice is the ``CollectivePlan`` table below; ``Comm`` applies it. With no process group
(a single process), every collective is a no-op, so the engine runs unchanged on one CPU.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, Optional, Sequence

import torch
import torch.distributed as dist

from . import flight_recorder
from .comm_ledger import CommLedger, ledger
from .errors import UserError
from .log import get_logger

__all__ = [
    "CollectivePlan", "Comm", "CommLedger", "DistributedSetupError", "Handle", "PLANS", "default_backend",
    "get_local_rank", "get_rank", "get_world_size", "init_distributed", "ledger", "select_device",
    "shutdown_distributed",
]

ReduceKind = Literal["all_reduce", "reduce_scatter"]
GatherKind = Literal["all_reduce", "all_gather", "broadcast"]


class DistributedSetupError(UserError, RuntimeError):
    """The environment does not describe a usable process group (message says what to set)."""


@dataclass(frozen=True)
class CollectivePlan:
    """How one backend implements the engine's two partitioned collectives.

    ``reduce``: ``"all_reduce"`` reduces the whole bucket everywhere (each owner then reads
    its shard); ``"reduce_scatter"`` leaves each rank only the sum of its own shard.
    ``gather``: ``"all_gather"`` is the in-place ``all_gather_single``; ``"all_reduce"`` zeroes
    every slice but the local one and sums (exact, since all but one addend are zero);
    ``"broadcast"``: every owner broadcasts its slice in place (``Comm.broadcast_rows``).
    """

    reduce: ReduceKind
    gather: GatherKind


# Measured on 2 and 4 gloo ranks (25-27M fp32 elements); see the module docstring.
PLANS: dict[str, CollectivePlan] = {
    "gloo": CollectivePlan(reduce="all_reduce", gather="broadcast"),
    "nccl": CollectivePlan(reduce="reduce_scatter", gather="all_gather"),
}
_FALLBACK_PLAN = CollectivePlan(reduce="all_reduce", gather="all_gather")

# torch 2.13 renamed the single-tensor collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def default_backend() -> str:
    """NCCL when CUDA is usable, gloo otherwise (what DeepSpeed users expect)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def get_rank() -> int:
    return dist.get_rank() if _initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(dist_backend: Optional[str] = None, auto_mpi_discovery: bool = True,
                     distributed_port: int = 29500, verbose: bool = True,
                     timeout: Optional[timedelta] = None, init_method: Optional[str] = None,
                     dist_init_required: Optional[bool] = None, config: object = None,
                     rank: int = -1, world_size: int = -1) -> None:
    """Join the process group torchrun (or Slurm/Kubernetes via torchrun) describes.

    Same signature as ``deepspeed.init_distributed`` so scripts keep working; MPI discovery
    and ``config`` are accepted and ignored (orch always launches through torchrun).
    A no-op when a group already exists or when nothing describes one: a plain ``python
    train.py`` then runs as a single process with world size 1 and no process group.
    """
    if not dist.is_available() or dist.is_initialized() or dist_init_required is False:
        return
    env = os.environ
    rank = rank if rank >= 0 else int(env.get("RANK", "-1"))
    world_size = world_size if world_size > 0 else int(env.get("WORLD_SIZE", "-1"))
    if rank < 0 and world_size < 0 and init_method is None:
        return  # no launcher: single process
    if rank < 0 or world_size < 0:
        missing = [k for k, v in (("RANK", rank), ("WORLD_SIZE", world_size)) if v < 0]
        raise DistributedSetupError(
            f"the environment sets only part of a process group: {', '.join(missing)} missing. "
            "Launch with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), "
            "or unset them all to run as a single process.")
    if init_method is None:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing and world_size > 1:
            raise DistributedSetupError(
                f"{' and '.join(missing)} not set, so rank {rank} cannot find the others. "
                "Launch with torchrun, or export MASTER_ADDR (rank 0's host) and MASTER_PORT (a free port).")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(distributed_port))
        init_method = "env://"
    backend = dist_backend or default_backend()
    flight_recorder.enable(backend)   # read by torch when the group is created: hang reports need it
    kwargs: dict[str, object] = {"timeout": timeout} if timeout is not None else {}
    if backend == "nccl":   # this rank's GPU, known to NCCL from the start (no guessing on GPU 0)
        kwargs["device_id"] = select_device()
    dist.init_process_group(backend=backend, init_method=init_method, rank=rank,
                            world_size=world_size, **kwargs)
    _destroy_at_exit()
    if verbose:  # rank 0 prints it (engine/log.py)
        get_logger().info(f"process group ready: backend={backend} world_size={world_size}")


def select_device() -> torch.device:
    """``cuda:LOCAL_RANK`` made current (so every rank of a node does not land on GPU 0), or the CPU.

    ``initialize`` calls it too: a script that made its process group itself may not have."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", get_local_rank() % max(1, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    return device


def shutdown_distributed() -> None:
    """Leave the process group in order: wait for this rank's queued device work, then destroy it.

    Why: a process that exits with its group alive has the group destroyed during interpreter
    finalization, while gloo's worker threads may still hold finished work objects whose tensors
    need the (already gone) interpreter to be freed: a SIGABRT ``terminate called without an
    active exception`` after a run that trained well, now and then, more often on a loaded
    machine. Destroying the group while the interpreter is whole avoids it. The bundled trainer
    calls this after its last step (after a barrier, so no rank leaves while another still
    talks to it); ``init_distributed`` also registers it to run at exit for user scripts.
    """
    if not _initialized():
        return
    if torch.cuda.is_available() and str(dist.get_backend()) == "nccl":
        torch.cuda.synchronize()
    dist.destroy_process_group()


_EXIT_HOOKED = False


def _destroy_at_exit() -> None:
    global _EXIT_HOOKED
    if not _EXIT_HOOKED:
        atexit.register(_exit_handler)   # atexit runs after non-daemon threads (async saves) are joined
        _EXIT_HOOKED = True


def _exit_handler() -> None:
    """At exit, destroy a gloo group the script left alive (destroying gloo's group is local and
    cannot hang). An NCCL group is left to torch: destroying it while a failed peer is inside a
    collective can block, and torch only warns about a leftover NCCL group."""
    if _initialized() and str(dist.get_backend()) != "nccl":
        shutdown_distributed()


class Handle:
    """Pending collectives; ``wait()`` blocks until all are done (a no-op when none are)."""

    __slots__ = ("_works",)

    def __init__(self, works: Sequence[object] = ()) -> None:
        self._works = [w for w in works if w is not None]

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works = []

    @classmethod
    def join(cls, handles: Sequence["Handle"]) -> "Handle":
        """One handle that waits for all of ``handles``."""
        return cls([work for handle in handles for work in handle._works])


class Comm:
    """The data-parallel group's collectives, implemented as the backend's plan says.

    Sums only: gloo has no AVG reduction, and the engine folds the 1/world factor into the
    single multiplier it applies to the gradient before the optimizer step anyway. Every call
    is recorded in the communication ledger (comm_ledger.py).
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None, plan: Optional[CollectivePlan] = None,
                 book: Optional[CommLedger] = None) -> None:
        self.group = group
        self.enabled = _initialized()
        self.rank = dist.get_rank(group) if self.enabled else 0
        self.world_size = dist.get_world_size(group) if self.enabled else 1
        self.backend = str(dist.get_backend(group)) if self.enabled else "none"
        self.plan = plan or PLANS.get(self.backend, _FALLBACK_PLAN)
        self.active = self.enabled and self.world_size > 1
        self.ledger = book or ledger

    @property
    def device(self) -> torch.device:
        """Where this group's collectives need their tensors: the current GPU on NCCL, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _note(self, op: str, tensor: torch.Tensor, peer: int = 0) -> None:
        self.ledger.record(op, tensor, self.world_size, self.rank, peer=peer)

    def all_reduce(self, tensor: torch.Tensor, async_op: bool = False) -> Handle:
        if not self.active:
            return Handle()
        self._note("all_reduce", tensor)
        return Handle([dist.all_reduce(tensor, group=self.group, async_op=async_op)])

    def all_gather_into(self, output: torch.Tensor, local: torch.Tensor, async_op: bool = False) -> Handle:
        """``output`` (``world_size × local.numel()`` elements) receives every rank's ``local``, rank-major.

        ``local`` may be ``output``'s own slice for this rank (the in-place form NCCL supports).
        """
        if not self.active:
            if output.data_ptr() != local.data_ptr():
                output.reshape(-1)[:local.numel()].copy_(local.reshape(-1))
            return Handle()
        self._note("all_gather", output)
        return Handle([_all_gather_single(output, local, group=self.group, async_op=async_op)])

    def reduce_scatter_into(self, output: torch.Tensor, data: torch.Tensor, async_op: bool = False) -> Handle:
        """``output`` (``data.numel() / world_size`` elements) receives the sum of every rank's slice
        ``rank`` of ``data`` (rank-major). ``output`` may be ``data``'s own slice (in place)."""
        if not self.active:
            if output.data_ptr() != data.data_ptr():
                output.copy_(data.reshape(-1)[:output.numel()].view_as(output))
            return Handle()
        self._note("reduce_scatter", data)
        return Handle([_reduce_scatter_single(output, data, group=self.group, async_op=async_op)])

    def all_to_all_into(self, output: torch.Tensor, data: torch.Tensor, async_op: bool = False) -> Handle:
        """``output``'s slice ``r`` receives rank ``r``'s slice ``rank`` of ``data`` (equal
        rank-major slices): the exchange a compressed all-reduce's first phase needs."""
        if not self.active:
            if output.data_ptr() != data.data_ptr():
                output.copy_(data.view_as(output))
            return Handle()
        self._note("all_to_all", data)
        return Handle([dist.all_to_all_single(output, data, group=self.group, async_op=async_op)])

    def broadcast_rows(self, rows: torch.Tensor, async_op: bool = False) -> Handle:
        """Every rank's ``rows[r]`` := owner ``r``'s ``rows[r]``: a gather of equal rank-major slices
        (``rows`` is ``world_size × k``, each row contiguous, e.g. a slice of a flat buffer viewed
        ``(world, -1)``) as one in-place ``broadcast`` per owner, all issued before any is waited
        for. The gloo plan's gather (see the module docstring)."""
        handle = Handle.join([self.broadcast(rows[src], src, async_op=True) for src in range(self.world_size)])
        if not async_op:
            handle.wait()
        return handle

    def _global_rank(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group else rank

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False) -> Handle:
        if not self.active:
            return Handle()
        self._note("broadcast", tensor, peer=src)
        return Handle([dist.broadcast(tensor, src=self._global_rank(src), group=self.group, async_op=async_op)])

    def reduce_to_shards(self, buffer: torch.Tensor, async_op: bool = False) -> Handle:
        """Sum ``buffer`` (``world_size`` equal rank-major shards) across ranks so that this rank's
        shard holds the sum of everyone's; the other shards may hold anything afterwards.

        One collective whatever the world size: the plan's in-place reduce-scatter, or an
        all-reduce (gloo, where it is faster; see the module docstring)."""
        if not self.active:
            return Handle()
        if self.plan.reduce == "all_reduce":
            return self.all_reduce(buffer, async_op)
        size = buffer.numel() // self.world_size
        return self.reduce_scatter_into(buffer[self.rank * size:(self.rank + 1) * size], buffer, async_op)

    def all_gather_partitions(self, flat: torch.Tensor, partition_numel: int, bucket_numel: int) -> None:
        """Fill every rank's partition of ``flat`` (rank-major, equal partitions) from its owner.

        The local partition ``flat[rank*P:(rank+1)*P]`` is the input. ``bucket_numel``
        (``allgather_bucket_size``, DeepSpeed's meaning: elements gathered at a time) bounds the
        transient memory: when the whole gather is larger, it goes in chunks of
        ``bucket_numel / world`` elements per rank, one in flight at a time, through one
        staging buffer reused for every chunk.
        """
        if not self.active:
            return
        world, rank, size = self.world_size, self.rank, partition_numel
        by_rank = flat[:world * size].view(world, size)
        chunk = max(1, min(bucket_numel // world, size))    # elements per rank gathered at a time
        if self.plan.gather == "broadcast":
            Handle.join([self.broadcast_rows(by_rank[:, lo:lo + chunk], async_op=True)
                         for lo in range(0, size, chunk)]).wait()
            return
        if self.plan.gather == "all_reduce":
            flat[: rank * size].zero_()
            flat[(rank + 1) * size:].zero_()
            step = max(1, bucket_numel // world) * world
            Handle.join([self.all_reduce(flat[i:i + step], async_op=True)
                         for i in range(0, flat.numel(), step)]).wait()
            return
        if chunk >= size:
            self.all_gather_into(flat[:world * size], flat[rank * size:(rank + 1) * size])
            return
        staging = torch.empty(world * chunk, dtype=flat.dtype, device=flat.device)
        for lo in range(0, size, chunk):
            hi = min(size, lo + chunk)
            out = staging[:world * (hi - lo)]
            self.all_gather_into(out, by_rank[rank, lo:hi])
            by_rank[:, lo:hi].copy_(out.view(world, hi - lo))
