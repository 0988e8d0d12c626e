"""NVMe offload (``offload_optimizer: {device: nvme}``) as a DeepSpeed user meets it.

The same training with the optimizer states in swap files under ``nvme_path`` must give exactly
the CPU-offload run's losses and weights (the step is the same math, only streamed chunk by
chunk) at ZeRO stages 1-3 and 1, 2 and 4 gloo ranks; checkpoints of an NVMe run are read from
the swap files and load at another world size and into a CPU-offload run; the swap files
disappear at exit and on SIGTERM; a host keeps only the chunk buffers, not the states; and a
missing, unwritable or full ``nvme_path`` is an error naming the key, before anything is written.
"""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import nvme_cases
from tests.dist_utils import run_distributed
from tests.engine_zero_cases import ds_config, engine_run, full_weights, train_steps
from tests.nvme_cases import hold, nvme_error

CHUNK_ENV = {"ORCH_NVME_CHUNK_NUMEL": "4096"}    # several chunks per partition even for a tiny model
CASES = {"z1-fp32": (1, "fp32"), "z2-bf16": (2, "bf16"), "z3-fp32": (3, "fp32"), "z3-bf16-clip": (3, "bf16")}


def _offload(device: str, path: str, **extra: Any) -> dict[str, Any]:
    section: dict[str, Any] = {"device": device, **extra}
    if device == "nvme":
        section["nvme_path"] = path
    return {"offload_optimizer": section}


def nvme_against_cpu(stage: int, precision: str, path: str) -> dict[str, Any]:
    """One rank: the CPU-offload run and the NVMe run of the same 20 steps."""
    clip = 0.5 if precision == "bf16" else 0.0
    cpu = engine_run(ds_config(stage, 1, clip, precision, **_offload("cpu", path)), groups=True)
    nvme = engine_run(ds_config(stage, 1, clip, precision, **_offload("nvme", path)), groups=True)
    import gc

    gc.collect()         # the dropped engine's swap files go with it (a process exit removes them too)
    return {"cpu": cpu["losses"], "nvme": nvme["losses"],
            "same_weights": all(torch.equal(cpu["params"][k], nvme["params"][k]) for k in cpu["params"])}


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_nvme_offload_trains_exactly_like_cpu_offload(world: int, case: str, tmp_path: Path) -> None:
    stage, precision = CASES[case]
    for rank in run_distributed(nvme_against_cpu, world, stage, precision, str(tmp_path), timeout=600, env=CHUNK_ENV):
        assert len(rank["nvme"]) == 20
        assert rank["nvme"] == rank["cpu"], case
        assert rank["same_weights"], case
    assert list(tmp_path.iterdir()) == []         # every rank's swap directory is gone


# -- checkpoints -----------------------------------------------------------------------------------

def save_then_resume(path: str, ckpt: str, stage: int, precision: str) -> dict[str, Any]:
    """Train 6 steps with NVMe offload, save, train 4 more; a fresh NVMe engine loads and repeats them."""
    import engine
    from tests.engine_zero_cases import build

    config = ds_config(stage, 1, 0.0, precision, **_offload("nvme", path))
    eng = engine.initialize(model=build(), config=copy.deepcopy(config))[0]
    train_steps(eng, 0, 6)
    eng.save_checkpoint(ckpt)
    straight = train_steps(eng, 6, 10)
    fresh = engine.initialize(model=build(seed=3), config=copy.deepcopy(config))[0]
    fresh.load_checkpoint(ckpt)
    return {"straight": straight, "resumed": train_steps(fresh, 6, 10), "weights": full_weights(fresh.module)}


def load_into_cpu_offload(path: str, ckpt: str, stage: int, precision: str) -> dict[str, Any]:
    """A CPU-offload engine (another world size and stage) loads the NVMe run's checkpoint."""
    import engine
    from tests.engine_zero_cases import build

    config = ds_config(stage, 1, 0.0, precision, **_offload("cpu", path))
    eng = engine.initialize(model=build(seed=5), config=copy.deepcopy(config))[0]
    eng.load_checkpoint(ckpt)
    return {"resumed": train_steps(eng, 6, 10)}


@pytest.mark.parametrize("stage,precision", [(2, "bf16"), (3, "bf16"), (3, "fp32")])
def test_nvme_checkpoints_resume_and_reshard_into_cpu_offload(stage: int, precision: str, tmp_path: Path) -> None:
    """bf16: the master is in the swap files; fp32 at stage 3 on CPU ranks: the partition is the master."""
    swap, ckpt = tmp_path / "nvme", tmp_path / "ckpt"
    swap.mkdir()
    ranks = run_distributed(save_then_resume, 2, str(swap), str(ckpt), stage, precision, timeout=600, env=CHUNK_ENV)
    assert ranks[0]["resumed"] == ranks[0]["straight"]
    manifest = (ckpt / "step-6" / "manifest.json").read_text()
    assert '"hash": "xxh3_128"' in manifest
    other = run_distributed(load_into_cpu_offload, 1, str(swap), str(ckpt), 5 - stage, precision, timeout=600)
    assert other[0]["resumed"] == pytest.approx(ranks[0]["straight"], rel=0, abs=2e-3)
    assert list(swap.iterdir()) == []


def reads_per_step(path: str) -> dict[str, Any]:
    """Three steps of a 263k-parameter model in 4096-element chunks, counting the chunk reads."""
    import engine
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])
    eng = engine.initialize(model=model, config=ds_config(2, 1, 0.0, "fp32", **_offload("nvme", path)))[0]
    swap = eng.optimizer.nvme
    counts: list[int] = []
    read = swap.pipeline._read

    def counting(chunk: Any, index: int) -> Any:
        counts[-1] += 1
        return read(chunk, index)

    swap.pipeline._read = counting
    for _ in range(3):
        counts.append(0)
        eng.backward(eng(torch.randn(2, 256)).pow(2).mean())
        eng.step()
    return {"reads": counts, "chunks": sum(f.chunks for f in swap.files), "buffers": len(swap._buffers)}


def test_a_step_does_not_read_again_the_chunks_the_last_step_left_in_its_buffers(tmp_path: Path) -> None:
    """Steps alternate their direction over the chunks, so each starts with what the last one
    wrote and still holds: every step after the first reads ``buffer_count`` chunks fewer."""
    [rank] = run_distributed(reads_per_step, 1, str(tmp_path), timeout=300, env=CHUNK_ENV)
    chunks, buffers = rank["chunks"], rank["buffers"]
    assert chunks > 2 * buffers, rank
    assert rank["reads"] == [chunks, chunks - buffers, chunks - buffers], rank


# -- swap files go away ----------------------------------------------------------------------------

HOLD_SCRIPT = textwrap.dedent("""
    import os, sys, time
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    import engine  # noqa: E402
    from tests.engine_zero_cases import build, ds_config, train_steps
    config = ds_config(2, 1, 0.0, "fp32", offload_optimizer={"device": "nvme", "nvme_path": sys.argv[1]})
    eng = engine.initialize(model=build(), config=config)[0]
    train_steps(eng, 0, 2)
    print("ready", flush=True)
    time.sleep(float(sys.argv[3]))
""")


def _hold(nvme: Path, seconds: float = 120) -> subprocess.Popen:
    return hold(HOLD_SCRIPT, nvme, seconds)


def test_swap_files_are_removed_on_sigterm(tmp_path: Path) -> None:
    proc = _hold(tmp_path)
    swap_dirs = list(tmp_path.iterdir())
    assert len(swap_dirs) == 1 and any(swap_dirs[0].glob("*.swp"))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM     # still dies of SIGTERM, as the launcher expects
    assert list(tmp_path.iterdir()) == []


def test_swap_files_are_removed_when_the_program_exits(tmp_path: Path) -> None:
    proc = _hold(tmp_path, seconds=0)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert list(tmp_path.iterdir()) == []


# -- a bad nvme_path -------------------------------------------------------------------------------

small_mount = nvme_cases.small_mount     # the fixture: a small tmpfs, full or read-only


def _build_error(path: str) -> str:
    return nvme_error(ds_config(2, 1, 0.0, "fp32", **_offload("nvme", path)))


def test_a_missing_nvme_path_is_named(tmp_path: Path) -> None:
    message = run_distributed(_build_error, 1, str(tmp_path / "not-there"))[0]
    assert "zero_optimization.offload_optimizer.nvme_path" in message and "does not exist" in message


def test_an_unwritable_nvme_path_is_named(small_mount: Any) -> None:
    message = run_distributed(_build_error, 1, str(small_mount("1m", readonly=True)))[0]
    assert "zero_optimization.offload_optimizer.nvme_path" in message and "cannot create swap files" in message


def test_a_full_nvme_path_is_named_with_the_sizes(small_mount: Any) -> None:
    where = small_mount("16k")   # below the ~46 KB of fp32 master + Adam states of the 3,827-parameter model
    message = run_distributed(_build_error, 1, str(where), env={"ORCH_NVME_CHUNK_NUMEL": "65536"})[0]
    assert "zero_optimization.offload_optimizer.nvme_path" in message and "not enough space" in message
    assert "GiB are free" in message
    assert list(where.iterdir()) == []          # nothing half-made left behind


def save_until_full(ckpt: str) -> dict[str, Any]:
    import engine
    from engine.checkpoint.manifest import CheckpointError
    from tests.engine_zero_cases import build

    eng = engine.initialize(model=build(), config=ds_config(2, 1, 0.0, "fp32"))[0]
    saved, error = [], None
    for step in range(40):
        train_steps(eng, step, step + 1)
        try:
            eng.save_checkpoint(ckpt)
            saved.append(eng.global_steps)
        except CheckpointError as exc:
            error = str(exc)
            break
    return {"saved": saved, "error": error}


def test_a_full_disk_during_a_save_leaves_latest_on_the_last_complete_checkpoint(small_mount: Any) -> None:
    where = small_mount("1m")
    result = run_distributed(save_until_full, 1, str(where))[0]
    assert result["error"] and "was not saved" in result["error"] and result["saved"]
    assert (where / "latest").read_text() == f"step-{result['saved'][-1]}"
    from engine.checkpoint.manifest import file_problem, read_manifest

    manifest = read_manifest(where / f"step-{result['saved'][-1]}")
    assert not [p for n, rec in manifest["files"].items() if (p := file_problem(where / manifest["tag"], n, rec))]


# -- host memory -----------------------------------------------------------------------------------

RSS_SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
    import torch
    from torch import nn
    import engine
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(6)])     # 25.2 M parameters
    section = {"device": sys.argv[1]}
    if sys.argv[1] == "nvme":
        section["nvme_path"] = sys.argv[2]
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2, "offload_optimizer": section},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "bf16": {"enabled": True}}
    eng = engine.initialize(model=model, config=config)[0]
    for _ in range(3):
        eng.backward(eng(torch.randn(2, 2048)).float().pow(2).mean())
        eng.step()
    import ctypes, gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)     # both runs: count live memory, not the heap's free pages
    rss = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
    swap = eng.optimizer.nvme
    print(json.dumps({"rss": rss, "states": 12 * sum(p.numel() for p in model.parameters()),
                      "buffers": swap.buffer_bytes if swap else 0}))
""")


def test_an_nvme_run_holds_the_buffers_not_the_states_in_host_memory(tmp_path: Path) -> None:
    import json

    from tests.dist_utils import free_port

    out = {}
    for device in ("cpu", "nvme"):
        env = {**os.environ, "ORCH_NVME_CHUNK_NUMEL": str(1 << 20), "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, device, str(tmp_path), str(free_port())],
                                capture_output=True, text=True, env=env, timeout=600,
                                cwd=Path(__file__).resolve().parents[2])
        assert result.returncode == 0, result.stderr
        out[device] = json.loads(result.stdout.strip().splitlines()[-1])
    saved = out["cpu"]["rss"] - out["nvme"]["rss"]
    slack = 8 << 20       # the I/O threads' stacks and the allocator's rounding (measured: ~1 MiB)
    assert saved >= out["cpu"]["states"] - out["nvme"]["buffers"] - slack, out
    assert list(tmp_path.iterdir()) == []


BUILD_RSS_SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[4])
    import torch
    from torch import nn
    import engine
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(6)])     # 25.2 M parameters
    section = {"device": sys.argv[1]}
    if sys.argv[1] == "nvme":
        section["nvme_path"] = sys.argv[2]
    config = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
              "zero_optimization": {"stage": int(sys.argv[3]), "offload_optimizer": section}, "bf16": {"enabled": True}}
    import ctypes, gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    def status(key):
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
    numel = sum(p.numel() for p in model.parameters())     # before stage 3 partitions them
    open("/proc/self/clear_refs", "w").write("5")      # VmHWM restarts from the current RSS
    before = status("VmRSS")
    eng = engine.initialize(model=model, config=config)[0]
    grown = status("VmHWM") - before
    swap = eng.optimizer.nvme
    print(json.dumps({"grown": grown, "states": 12 * numel, "master": 4 * numel,
                      "buffers": swap.buffer_bytes if swap else 0}))
""")


@pytest.mark.parametrize("stage", [2, 3])
def test_building_an_nvme_engine_never_holds_the_fp32_master_in_host_memory(stage: int, tmp_path: Path) -> None:
    """The constructor writes the first master values into the swap files chunk by chunk from the
    parameters: its peak memory is the CPU-offload constructor's without the fp32 master (plus the
    chunk buffers). At stage 2 that is below the states' size; stage 3's constructor (either
    offload) also holds the full weights while it partitions them, which one rank cannot shed."""
    import json

    from tests.dist_utils import free_port

    out = {}
    for device in ("cpu", "nvme"):
        env = {**os.environ, "ORCH_NVME_CHUNK_NUMEL": str(1 << 20), "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-c", BUILD_RSS_SCRIPT, device, str(tmp_path), str(stage),
                                 str(free_port())], capture_output=True, text=True, env=env, timeout=600,
                                cwd=Path(__file__).resolve().parents[2])
        assert result.returncode == 0, result.stderr
        out[device] = json.loads(result.stdout.strip().splitlines()[-1])
    nvme, cpu = out["nvme"], out["cpu"]
    slack = 16 << 20       # the I/O threads' stacks, the allocator's rounding
    assert nvme["grown"] <= cpu["grown"] - nvme["master"] + nvme["buffers"] + slack, out
    if stage == 2:
        assert nvme["grown"] < nvme["states"], out
    assert list(tmp_path.iterdir()) == []


LOAD_RSS_SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
    import torch
    from torch import nn
    import engine
    torch.manual_seed(0)
    config = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
              "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": sys.argv[1]}}}
    def build():
        return engine.initialize(model=nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(6)]), config=config)[0]
    eng = build()
    for _ in range(2):
        eng.backward(eng(torch.randn(2, 2048)).float().pow(2).mean())
        eng.step()
    eng.save_checkpoint(sys.argv[2])
    expected = {k: v.clone() for k, v in eng.optimizer.optimizer_state_partitions().items() if v.dim() == 1}
    expected["master"] = eng.optimizer.master_partition()
    fresh = build()
    import ctypes, gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    def status(key):
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
    open("/proc/self/clear_refs", "w").write("5")      # VmHWM restarts from the current RSS
    before = status("VmRSS")
    fresh.load_checkpoint(sys.argv[2])
    grown = status("VmHWM") - before
    got = {k: v for k, v in fresh.optimizer.optimizer_state_partitions().items() if v.dim() == 1}
    got["master"] = fresh.optimizer.master_partition()
    same = sorted(expected) == sorted(got) and all(torch.equal(expected[k], got[k]) for k in expected)
    print(json.dumps({"grown": grown, "states": sum(v.numel() * v.element_size() for v in expected.values()),
                      "buffers": fresh.optimizer.nvme.buffer_bytes, "same": same}))
""")


def test_an_nvme_checkpoint_loads_into_the_swap_files_without_the_states_in_host_memory(tmp_path: Path) -> None:
    import json

    from tests.dist_utils import free_port

    swap, ckpt = tmp_path / "nvme", tmp_path / "ckpt"
    swap.mkdir()
    env = {**os.environ, "ORCH_NVME_CHUNK_NUMEL": str(1 << 20), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", LOAD_RSS_SCRIPT, str(swap), str(ckpt), str(free_port())],
                            capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["same"], "the loaded master and states differ from the saved ones"
    # the load's peak growth: the swap's chunk buffers and the checksum pass's staging blocks (the I/O
    # threads + 1, 16 MiB each), not the 302 MB of master and states (reading them whole grew by all of it)
    staging = (4 + 1) * (16 << 20)
    assert out["grown"] <= out["buffers"] + staging + (16 << 20) < out["states"], out
    assert list(swap.iterdir()) == []
