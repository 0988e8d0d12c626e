"""The few object collectives saving and loading need, as no-ops when there is one process.

Every decision that could differ between ranks (a file failed its checksum on one rank, a write
failed on another) is shared before anyone acts on it, so ranks always fail or succeed together
instead of one raising while the others wait in a collective forever.
"""
from __future__ import annotations

from typing import Any, Optional

import torch.distributed as dist

__all__ = ["Group"]


class Group:
    """The data-parallel group of an engine's ``Comm`` (or the default group)."""

    def __init__(self, comm: Any = None) -> None:
        self.group = getattr(comm, "group", None)
        self.active = bool(getattr(comm, "active", dist.is_available() and dist.is_initialized()
                                   and dist.get_world_size() > 1))
        self.rank = int(getattr(comm, "rank", dist.get_rank() if self.active else 0))
        self.world_size = int(getattr(comm, "world_size", dist.get_world_size() if self.active else 1))

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not self.active:
            return obj
        box = [obj]
        global_src = dist.get_global_rank(self.group, src) if self.group is not None else src
        dist.broadcast_object_list(box, src=global_src, group=self.group)
        return box[0]

    def first_error(self, error: Optional[str]) -> Optional[str]:
        """Every rank's error message (None for success) combined: the same answer on all ranks."""
        errors = [e for e in self.all_gather(error) if e]
        return "; ".join(errors) if errors else None
