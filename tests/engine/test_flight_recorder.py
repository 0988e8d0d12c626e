"""Hang reports read the flight recorder that holds the job's collectives.

An NCCL group records into ProcessGroupNCCL's own recorder, a gloo group into the generic one;
reading the wrong one gives an empty report exactly when a job hangs on GPUs. Both recorders are
off unless their environment is set before the group is created, which engine.init_distributed
does. The NCCL dump itself runs on a GPU in .ci/gpu-check (a CPU torch has no NCCL binding).
"""
from __future__ import annotations

import os

import pytest

from engine import flight_recorder
from tests.dist_utils import run_distributed


@pytest.mark.parametrize("backend,binding", [
    ("nccl", "_dump_nccl_trace_json"),
    ("cpu:gloo,cuda:nccl", "_dump_nccl_trace_json"),   # device collectives run on NCCL
    ("gloo", "_dump_fr_trace_json"),
])
def test_each_backend_is_read_from_its_own_recorder(backend, binding):
    assert flight_recorder.dump_function_name(backend) == binding


def test_nccl_also_dumps_on_its_own_timeout_and_gets_the_buffer_under_both_names():
    assert flight_recorder.recorder_env("nccl") == {
        "TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}
    assert flight_recorder.recorder_env("gloo") == {"TORCH_FR_BUFFER_SIZE": "2000"}


def test_a_users_setting_wins(monkeypatch):
    env = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "0", "TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}   # the user turned it off
    monkeypatch.setattr(os, "environ", env)
    flight_recorder.enable("nccl")
    assert env == {"TORCH_FR_BUFFER_SIZE": "0", "TORCH_NCCL_TRACE_BUFFER_SIZE": "0", "TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}


def test_on_cpu_torch_the_nccl_dump_says_what_is_missing():
    import torch._C._distributed_c10d as c10d

    if hasattr(c10d, "_dump_nccl_trace_json"):
        pytest.skip("this torch has NCCL: .ci/gpu-check dumps the NCCL recorder for real")
    with pytest.raises(RuntimeError, match="_dump_nccl_trace_json"):
        flight_recorder.dump("nccl")


def _collectives_seen_after_init() -> list[str]:
    import torch
    import torch.distributed as dist

    import engine
    from engine.trainer.watchdog import last_collectives

    for name in ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"):
        os.environ.pop(name, None)                           # nothing but init_distributed sets it
    engine.init_distributed(dist_backend="gloo", verbose=False)
    t = torch.ones(4)
    dist.all_reduce(t)
    lines, note = last_collectives()
    dist.destroy_process_group()
    return lines or [note]


def test_init_distributed_turns_the_recorder_on_before_the_group_exists():
    # The entry is what proves the recorder was on; its state ("scheduled" or "completed") is set by
    # gloo's completion callback on another thread and may still lag the dump on a loaded machine.
    for lines in run_distributed(_collectives_seen_after_init, 2, init=False):
        assert any("gloo:all_reduce" in line and "sizes [[4]]" in line for line in lines), lines
