"""NVMe offload of stage 3's parameters (``offload_param: {device: nvme}``) as a DeepSpeed user meets it.

The same training with each rank's parameter partition in swap files under ``nvme_path`` must
give exactly the ``offload_param: cpu`` run's losses and weights (the gathers read the same
values, only from a buffer the drive filled) at 1, 2 and 4 gloo ranks, with the optimizer on the
host or in its own swap files, and the units must have been read ahead of their gathers;
checkpoints of such a run resume it and load into a CPU-offload run at another world size; the
swap files disappear at exit and on SIGTERM; a host keeps the buffers, not the partition; and a
missing, unwritable or full ``nvme_path``, or a ``buffer_size`` smaller than a unit, is an error
naming the key.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.dist_utils import free_port, run_distributed
from tests.engine_zero_cases import build, ds_config, full_weights, param_groups, train_steps
from tests import nvme_cases
from tests.nvme_cases import ROOT, hold, nvme_error

# (precision, optimizer offload, model, max_in_cpu): every element swapped, or the first spans resident
CASES = {"bf16-cpu-optimizer": ("bf16", "cpu", "tinylm", 0),
         "fp32-nvme-optimizer": ("fp32", "nvme", "tinylm", 0),
         "bf16-tied-gpt-partly-resident": ("bf16", "none", "gpt-ckpt", 1000)}


def _zero(param: str, optimizer: str, path: str, max_in_cpu: int = 0, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"offload_param": {"device": param, "max_in_cpu": max_in_cpu, "buffer_count": 2, **extra},
                           "stage3_param_persistence_threshold": 16}
    if param == "nvme":
        out["offload_param"]["nvme_path"] = path
    if optimizer != "none":
        out["offload_optimizer"] = {"device": optimizer, **({"nvme_path": path} if optimizer == "nvme" else {})}
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_nvme_param_offload_trains_exactly_like_cpu_param_offload(world: int, case: str, tmp_path: Path) -> None:
    for rank in run_distributed(swap_run, world, case, str(tmp_path), timeout=600):
        assert len(rank["nvme"]) == 20
        assert rank["nvme"] == rank["cpu"], case
        assert rank["same_weights"], case
        assert rank["prefetch_hits"] > rank["demand_reads"], rank     # after step 1 the trace reads ahead
    assert list(tmp_path.iterdir()) == []         # every rank's swap directory is gone


def swap_run(case: str, path: str, init: bool = False) -> dict[str, Any]:
    """One rank: the offload_param cpu run and the nvme run of the same 20 steps, and how the nvme
    run's units were read (found read ahead, or read when their gather asked)."""
    precision, optimizer, model, max_in_cpu = CASES[case]
    clip = 0.5 if precision == "bf16" else 0.0
    groups = model == "tinylm"
    runs = {}
    for device in ("cpu", "nvme"):
        import engine

        net = build(model, init=init)
        config = ds_config(3, 1, clip, precision, **_zero(device, optimizer, path, max_in_cpu))
        eng = engine.initialize(model=net, model_parameters=param_groups(net) if groups else None, config=config)[0]
        losses = train_steps(eng, 0, 20)
        swap = getattr(eng.optimizer.store, "swap", None)
        runs[device] = {"losses": losses, "params": full_weights(net),
                        "reads": (swap.prefetch_hits, swap.demand_reads) if swap else None}
    import gc

    del eng, net
    gc.collect()          # the dropped engine's swap files go with it (a process exit removes them too)
    cpu, nvme = runs["cpu"], runs["nvme"]
    return {"cpu": cpu["losses"], "nvme": nvme["losses"],
            "same_weights": all(torch.equal(cpu["params"][k], nvme["params"][k]) for k in cpu["params"]),
            "prefetch_hits": nvme["reads"][0], "demand_reads": nvme["reads"][1]}


def test_a_model_built_in_zero_init_goes_to_the_drive_and_trains_the_same(tmp_path: Path) -> None:
    """``engine.zero.Init`` pieces (in host memory until ``initialize``) are written to the swap files."""
    for rank in run_distributed(swap_run, 2, "bf16-cpu-optimizer", str(tmp_path), True, timeout=600):
        assert rank["nvme"] == rank["cpu"] and rank["same_weights"]
    assert list(tmp_path.iterdir()) == []


# -- checkpoints -----------------------------------------------------------------------------------

def save_then_resume(path: str, ckpt: str) -> dict[str, Any]:
    """A LoRA GPT (frozen base partitioned too) trains 6 steps with its parameters on NVMe, saves,
    trains 4 more; a fresh NVMe engine with other weights loads the checkpoint and repeats them."""
    import engine

    config = ds_config(3, 1, 0.0, "bf16", **_zero("nvme", "cpu", path))
    eng = engine.initialize(model=build("lora-gpt"), config=copy.deepcopy(config))[0]
    train_steps(eng, 0, 6)
    eng.save_checkpoint(ckpt)
    straight = train_steps(eng, 6, 10)
    fresh = engine.initialize(model=build("lora-gpt", seed=3), config=copy.deepcopy(config))[0]
    fresh.load_checkpoint(ckpt)
    return {"straight": straight, "resumed": train_steps(fresh, 6, 10)}


def load_into_cpu_param_offload(path: str, ckpt: str) -> dict[str, Any]:
    """An offload_param cpu engine at another world size loads the NVMe run's checkpoint."""
    import engine

    config = ds_config(3, 1, 0.0, "bf16", **_zero("cpu", "cpu", path))
    eng = engine.initialize(model=build("lora-gpt", seed=5), config=copy.deepcopy(config))[0]
    eng.load_checkpoint(ckpt)
    return {"resumed": train_steps(eng, 6, 10)}


def test_nvme_param_checkpoints_resume_and_reshard_into_cpu_param_offload(tmp_path: Path) -> None:
    swap, ckpt = tmp_path / "nvme", tmp_path / "ckpt"
    swap.mkdir()
    ranks = run_distributed(save_then_resume, 2, str(swap), str(ckpt), timeout=600)
    assert ranks[0]["resumed"] == ranks[0]["straight"]
    other = run_distributed(load_into_cpu_param_offload, 1, str(swap), str(ckpt), timeout=600)
    assert other[0]["resumed"] == pytest.approx(ranks[0]["straight"], rel=0, abs=2e-3)
    assert list(swap.iterdir()) == []


# -- swap files go away ----------------------------------------------------------------------------

small_mount = nvme_cases.small_mount     # the fixture: a small tmpfs, full or read-only

HOLD_SCRIPT = textwrap.dedent("""
    import os, sys, time
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    import engine  # noqa: E402
    from tests.engine_zero_cases import build, ds_config, train_steps
    param = {"device": "nvme", "nvme_path": sys.argv[1], "max_in_cpu": 0}
    eng = engine.initialize(model=build(), config=ds_config(3, 1, 0.0, "fp32", offload_param=param))[0]
    train_steps(eng, 0, 2)
    print("ready", flush=True)
    time.sleep(float(sys.argv[3]))
""")


def test_parameter_swap_files_are_removed_on_sigterm(tmp_path: Path) -> None:
    proc = hold(HOLD_SCRIPT, tmp_path)
    swap_dirs = list(tmp_path.iterdir())
    assert len(swap_dirs) == 1 and any(swap_dirs[0].glob("params-rank00000-group*.swp"))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM     # still dies of SIGTERM, as the launcher expects
    assert list(tmp_path.iterdir()) == []


def test_parameter_swap_files_are_removed_when_the_program_exits(tmp_path: Path) -> None:
    proc = hold(HOLD_SCRIPT, tmp_path, seconds=0)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert list(tmp_path.iterdir()) == []


# -- bad settings ----------------------------------------------------------------------------------

def _build_error(path: str, param: Any = None) -> str:
    section = {"device": "nvme", "nvme_path": path, "max_in_cpu": 0, **(param or {})}
    return nvme_error(ds_config(3, 1, 0.0, "fp32", offload_param=section, stage3_param_persistence_threshold=16))


def test_a_missing_parameter_nvme_path_is_named(tmp_path: Path) -> None:
    message = run_distributed(_build_error, 1, str(tmp_path / "not-there"))[0]
    assert "zero_optimization.offload_param.nvme_path" in message and "does not exist" in message


def test_an_unwritable_parameter_nvme_path_is_named(small_mount: Any) -> None:
    message = run_distributed(_build_error, 1, str(small_mount("1m", readonly=True)))[0]
    assert "zero_optimization.offload_param.nvme_path" in message and "cannot create swap files" in message


def test_a_full_parameter_nvme_path_is_named_with_the_sizes(small_mount: Any) -> None:
    where = small_mount("8k")     # below the 16 KiB file of the 3,827-parameter model's fp32 partition
    message = run_distributed(_build_error, 1, str(where))[0]
    assert "zero_optimization.offload_param.nvme_path" in message and "not enough space" in message
    assert "parameter swap file" in message and "GiB are free" in message
    assert list(where.iterdir()) == []          # nothing half-made left behind


def test_buffers_too_small_for_a_unit_or_none_at_all_are_named(tmp_path: Path) -> None:
    message = run_distributed(_build_error, 1, str(tmp_path), {"buffer_size": 100})[0]
    assert "zero_optimization.offload_param.buffer_size" in message and "set buffer_size to at least 2176" in message
    assert "'head'" in message                   # the largest unit: the 64 x 33 head and its 64 biases
    message = run_distributed(_build_error, 1, str(tmp_path), {"buffer_count": 0})[0]
    assert "zero_optimization.offload_param.buffer_count" in message and "at least 1" in message
    assert list(tmp_path.iterdir()) == []


# -- host memory -----------------------------------------------------------------------------------

RSS_SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
    import torch
    from torch import nn
    import engine
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(6)])     # 25.2 M parameters, fp32
    param = {"device": sys.argv[1], "max_in_cpu": 0, "buffer_count": 2}
    if sys.argv[1] == "nvme":
        param["nvme_path"] = sys.argv[2]
    zero = {"stage": 3, "offload_param": param}      # the optimizer's side alike in both runs
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": zero,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}
    eng = engine.initialize(model=model, config=config)[0]
    for _ in range(3):
        eng.backward(eng(torch.randn(2, 2048)).pow(2).mean())
        eng.step()
    import ctypes, gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)     # both runs: count live memory, not the heap's free pages
    rss = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
    swap = getattr(eng.optimizer.store, "swap", None)
    print(json.dumps({"rss": rss, "partition": 4 * eng.optimizer.store.layout.partition_numel,
                      "buffers": swap.buffer_bytes if swap else 0}))
""")


def test_an_nvme_param_run_holds_the_buffers_not_the_partition_in_host_memory(tmp_path: Path) -> None:
    out = {}
    for device in ("cpu", "nvme"):
        env = {**os.environ, "ORCH_NVME_CHUNK_NUMEL": str(1 << 20), "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, device, str(tmp_path), str(free_port())],
                                capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        out[device] = json.loads(result.stdout.strip().splitlines()[-1])
    saved = out["cpu"]["rss"] - out["nvme"]["rss"]
    slack = 8 << 20       # the I/O threads' stacks and the allocator's rounding
    assert saved >= out["cpu"]["partition"] - out["nvme"]["buffers"] - slack, out
    assert list(tmp_path.iterdir()) == []
