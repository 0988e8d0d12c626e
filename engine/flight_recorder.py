"""torch.distributed's flight recorder: the last collectives each rank entered, for hang reports.

torch keeps two recorders, and which one holds a job's collectives depends on the backend:

* NCCL collectives go to ProcessGroupNCCL's own recorder (CUDA events per entry), read with
  ``torch._C._distributed_c10d._dump_nccl_trace_json``. That binding exists only in CUDA builds
  of torch (a CPU wheel has no NCCL), so the choice cannot be probed on a CPU machine;
* gloo (and other CPU backends) record into the generic recorder, read with
  ``_dump_fr_trace_json``. It never sees an NCCL collective.

Both are off unless their buffer size is set in the environment *before* the process group is
created; ``enable`` (called by ``engine.init_distributed``) sets it when unset, a user's own
value (``0`` turns it off) wins. For NCCL it also asks ProcessGroupNCCL to dump its recorder when
one of its collectives times out (``TORCH_NCCL_DUMP_ON_TIMEOUT``), so a hang leaves a trace even
where the hang watchdog is off. Names follow torch 2.13's ProcessGroupNCCL.hpp and
FlightRecorder.hpp (``TORCH_FR_BUFFER_SIZE``, read by NCCL under its older name too).
"""
from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["DEFAULT_ENTRIES", "dump", "dump_function_name", "enable", "recorder_env"]

DEFAULT_ENTRIES = 2000
BUFFER_ENV = "TORCH_FR_BUFFER_SIZE"
NCCL_BUFFER_ENV = "TORCH_NCCL_TRACE_BUFFER_SIZE"   # NCCL's older name for the same setting
NCCL_DUMP_ON_TIMEOUT_ENV = "TORCH_NCCL_DUMP_ON_TIMEOUT"
NCCL_DUMP = "_dump_nccl_trace_json"
GENERIC_DUMP = "_dump_fr_trace_json"


def recorder_env(backend: str, entries: int | str = DEFAULT_ENTRIES) -> dict[str, str]:
    """The environment that turns the recorder of ``backend``'s collectives on."""
    env = {BUFFER_ENV: str(entries)}
    if _uses_nccl(backend):
        env[NCCL_BUFFER_ENV] = str(entries)
        env[NCCL_DUMP_ON_TIMEOUT_ENV] = "1"
    return env


def enable(backend: str, entries: int = DEFAULT_ENTRIES) -> None:
    """Set ``recorder_env`` where the user has not (call before the process group exists). A
    user's buffer size under either name is used for both."""
    user = os.environ.get(BUFFER_ENV) or os.environ.get(NCCL_BUFFER_ENV)
    for name, value in recorder_env(backend, user if user is not None else entries).items():
        os.environ.setdefault(name, value)


def dump_function_name(backend: str) -> str:
    """Which torch binding holds ``backend``'s collectives (a mixed "cpu:gloo,cuda:nccl" group
    runs its device collectives on NCCL)."""
    return NCCL_DUMP if _uses_nccl(backend) else GENERIC_DUMP


def dump(backend: str) -> dict[str, Any]:
    """The recorder's JSON (``{"entries": [...], ...}``) for ``backend``'s collectives; raises
    RuntimeError naming the binding when this torch lacks it."""
    from torch._C import _distributed_c10d as c10d

    name = dump_function_name(backend)
    function = getattr(c10d, name, None)
    if function is None:
        raise RuntimeError(f"torch {_torch_version()} has no {name} (a torch build without NCCL cannot read "
                           "NCCL's flight recorder)")
    raw = function(True, False)     # include collectives; not only the active ones
    return json.loads(raw.decode() if isinstance(raw, bytes) else raw)


def _uses_nccl(backend: str) -> bool:
    return "nccl" in str(backend).lower()


def _torch_version() -> str:
    import torch

    return torch.__version__
