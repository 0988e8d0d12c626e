"""``engine.zero.Init(remote_device="nvme", config_dict_or_path=ds_config)`` as a DeepSpeed user meets it.

Building a model whose partition does not fit in host memory is why ZeRO-Infinity users pass
``remote_device="nvme"``: each parameter's piece goes to the rank's swap file under the config's
``offload_param.nvme_path`` as the parameter is built, and ``engine.initialize`` takes the pieces
from there. The model trains exactly as one built under ``Init(remote_device="cpu")`` with
``offload_param: cpu`` (the same values, only kept on the drive); building it grows host memory by
the swap buffers, not the partition; the Init file is gone once ``initialize`` took it over; and a
``remote_device`` the config contradicts, or an nvme without its ``nvme_path``, is an error naming
the key.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional

import pytest

from tests import nvme_cases
from tests.dist_utils import free_port, run_distributed
from tests.engine_zero_cases import MODELS, ds_config, param_groups, train_steps
from tests.nvme_cases import ROOT

STEPS = 6


def _config(device: str, path: Optional[str]) -> dict[str, Any]:
    param: dict[str, Any] = {"device": device, "max_in_cpu": 0, "buffer_count": 2}
    if path is not None:
        param["nvme_path"] = path
    return ds_config(3, 1, 0.5, "bf16", offload_param=param, offload_optimizer={"device": "cpu"},
                     stage3_param_persistence_threshold=16)


def built_and_trained(remote: Optional[str], device: str, path: str) -> dict[str, Any]:
    """One rank: tinylm built under ``Init(remote_device=remote)`` with the ``device`` config, where its
    pieces were while it waited for ``initialize``, and its losses."""
    import engine

    config = _config(device, path if device == "nvme" else None)
    with engine.zero.Init(remote_device=remote, config_dict_or_path=config) as init:
        net = MODELS["tinylm"](seed=0)
    shards = [p._zero3_init for p in net.parameters()]
    home = init.swap.directory if init.swap is not None else None
    on_drive = sorted(f.name for f in home.iterdir()) if home is not None else []
    in_memory = sum(s._piece.numel() for s in shards if s._piece is not None)
    eng = engine.initialize(model=net, model_parameters=param_groups(net), config=config)[0]
    init_files_left = home is not None and home.exists()
    losses = train_steps(eng, 0, STEPS)
    return {"losses": losses, "on_drive": on_drive, "in_memory": in_memory, "kept": init.stats.kept_bytes,
            "init_files_left": init_files_left}


def both_builds(remote: Optional[str], path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """One rank: the model built in host memory, then on the drive (one process start for both)."""
    return built_and_trained("cpu", "cpu", path), built_and_trained(remote, "nvme", path)


@pytest.mark.parametrize("world,remote", [(1, "nvme"), (2, "nvme"), (2, None)])
def test_a_model_built_on_the_drive_trains_exactly_like_one_built_in_host_memory(world: int, remote: Optional[str],
                                                                                 tmp_path: Path) -> None:
    """``remote=None``: the device comes from the config's offload_param, as in DeepSpeed."""
    for rank, (host, drive) in enumerate(run_distributed(both_builds, world, remote, str(tmp_path), timeout=300)):
        assert len(drive["losses"]) == STEPS and drive["losses"] == host["losses"]
        assert host["in_memory"] > 0 and drive["in_memory"] == 0      # no piece waited in host memory
        assert drive["kept"] == host["kept"]                           # the same pieces, on the drive
        assert drive["on_drive"] == [f"params-rank{rank:05d}-init.swp"]
        assert drive["init_files_left"] is False                       # initialize took them over
    assert list(tmp_path.iterdir()) == []                              # every swap directory is gone


# -- host memory while building ---------------------------------------------------------------------

RSS_SCRIPT = textwrap.dedent("""
    import ctypes, gc, json, os, sys
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
    import torch
    from torch import nn
    import engine

    def rss():
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)      # live memory, not the heap's free pages
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024

    torch.manual_seed(0)
    param = {"device": sys.argv[1], "max_in_cpu": 0, "buffer_count": 2}
    if sys.argv[1] == "nvme":
        param["nvme_path"] = sys.argv[2]
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3, "offload_param": param},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}
    before = rss()
    with engine.zero.Init(remote_device=sys.argv[1], config_dict_or_path=config) as init:
        model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(8)])     # 33.6 M parameters, fp32
    built = rss()
    eng = engine.initialize(model=model, config=config)[0]
    eng.backward(eng(torch.randn(2, 2048)).pow(2).mean())
    eng.step()
    print(json.dumps({"growth": built - before, "partition": init.stats.kept_bytes,
                      "largest_whole": init.stats.largest_whole_bytes}))
""")


def test_building_on_the_drive_holds_a_layer_not_the_partition_in_host_memory(tmp_path: Path) -> None:
    out = {}
    for device in ("cpu", "nvme"):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, device, str(tmp_path), str(free_port())],
                                capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        out[device] = json.loads(result.stdout.strip().splitlines()[-1])
    print(out)
    partition = out["cpu"]["partition"]
    assert out["cpu"]["growth"] >= 0.9 * partition, out               # in host memory: the whole partition
    assert out["nvme"]["growth"] <= 0.25 * partition, out             # on the drive: a layer and the staging
    assert list(tmp_path.iterdir()) == []


# -- bad settings -----------------------------------------------------------------------------------

def init_error(remote: Optional[str], config: Optional[dict[str, Any]]) -> str:
    """What building tinylm under ``Init(remote_device=remote, config_dict_or_path=config)`` says."""
    import gc

    import engine
    from engine.errors import UserError

    try:
        with engine.zero.Init(remote_device=remote, config_dict_or_path=config):
            MODELS["tinylm"](seed=0)
    except UserError as exc:
        gc.collect()
        return str(exc)
    return "no error"


KEY = "zero_optimization.offload_param"


def test_remote_device_nvme_without_nvme_settings_is_named(tmp_path: Path) -> None:
    message = run_distributed(init_error, 1, "nvme", None)[0]
    assert f"{KEY}.device" in message and "config_dict_or_path" in message
    message = run_distributed(init_error, 1, "nvme", ds_config(3))[0]
    assert f"{KEY}.device" in message and "needs offload_param" in message
    no_path = ds_config(3, offload_param={"device": "nvme"})
    message = run_distributed(init_error, 1, "nvme", no_path)[0]
    assert f"{KEY}.nvme_path" in message and "not set" in message


def test_a_remote_device_the_config_contradicts_is_named(tmp_path: Path) -> None:
    message = run_distributed(init_error, 1, "nvme", _config("cpu", None))[0]
    assert f"{KEY}.device" in message and 'says "cpu"' in message and 'remote_device="nvme"' in message
    message = run_distributed(init_error, 1, "cpu", _config("nvme", str(tmp_path)))[0]
    assert f"{KEY}.device" in message and 'says "nvme"' in message
    message = run_distributed(init_error, 1, "disk", None)[0]
    assert "remote_device: 'disk'" in message
    assert list(tmp_path.iterdir()) == []


small_mount = nvme_cases.small_mount     # the fixture: a small tmpfs, full or read-only


def test_a_missing_unwritable_or_full_nvme_path_is_named(tmp_path: Path, small_mount: Any) -> None:
    message = run_distributed(init_error, 1, "nvme", _config("nvme", str(tmp_path / "not-there")))[0]
    assert f"{KEY}.nvme_path" in message and "does not exist" in message
    message = run_distributed(init_error, 1, "nvme", _config("nvme", str(small_mount("1m", readonly=True))))[0]
    assert f"{KEY}.nvme_path" in message and "cannot create swap files" in message
    full = small_mount("8k")          # two pages: tinylm's pieces need more
    message = run_distributed(init_error, 1, "nvme", _config("nvme", str(full)))[0]
    assert f"{KEY}.nvme_path" in message and "not enough space" in message and "zero.Init" in message
    assert list(full.iterdir()) == []                                  # nothing half-written left
