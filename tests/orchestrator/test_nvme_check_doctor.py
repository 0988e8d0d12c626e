"""``orch check`` and ``orch doctor`` for NVMe offload: what a rank puts on the drive and keeps in
RAM, which ``aio`` keys do nothing, and how fast (and whether O_DIRECT) the nvme_path is."""
from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from orchestrator.check import estimate_nvme_offload, estimate_nvme_param_offload
from orchestrator.cli import app
from tests.cli_process import run_orch

runner = CliRunner()
NVME_DS = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
           "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/local_nvme",
                                                                   "buffer_count": 4}},
           "aio": {"block_size": 1048576, "queue_depth": 8, "thread_count": 1, "single_submit": False,
                   "overlap_events": True}}


def job(tmp_path: Path, ds: dict) -> str:
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    spec = {"name": "nvme", "nodes": 1, "procs_per_node": 2, "program": "engine.train",
            "args": ["--model", "bench-100m"], "ds_config": "ds.json"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    return str(tmp_path / "job.yaml")


def test_check_says_what_each_rank_puts_on_the_drive_and_keeps_in_memory(tmp_path: Path) -> None:
    result = run_orch("check", job(tmp_path, NVME_DS))       # a real process, as a user runs it
    assert result.returncode == 0, result.stderr
    host, nvme = estimate_nvme_offload(105_572_352, 2, 2, "bf16", 4)
    assert nvme == 12 * 105_572_352 / 2                       # fp32 master + Adam m, v: the rank's half
    assert host < nvme              # gradient partition + 4 chunk buffers + the bf16 weights' way back
    out = " ".join(result.stdout.split())
    assert "offload: optimizer=nvme" in out
    assert "NVMe offload: 604.1 MiB per rank in swap files under /local_nvme" in out
    # the gradient partition is summed in fp32 (data_types.grad_accum_dtype's default): 4 bytes an element
    assert "host RAM 494.0 MiB per rank" in out and "instead of 805.5 MiB with CPU offload" in out
    assert "precision bf16, gradients summed in fp32" in out
    assert "ignored: aio.single_submit" in out and "ignored: aio.overlap_events" in out


def test_check_says_what_parameter_nvme_offload_puts_on_the_drive(tmp_path: Path) -> None:
    param = {"device": "nvme", "nvme_path": "/x", "buffer_count": 5, "buffer_size": 100_000_000, "max_in_cpu": 0}
    ds = {**NVME_DS, "zero_optimization": {"stage": 3, "offload_param": param}}
    result = runner.invoke(app, ["check", job(tmp_path, ds)])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    host, nvme = estimate_nvme_param_offload(105_572_352, 2, "bf16", 5, 100_000_000, 0, largest_layer=None)
    assert nvme == 2 * 105_572_352 / 2                         # the bf16 partition, the rank's half
    assert "NVMe parameter offload: 100.7 MiB per rank of stage 3's parameter partition in swap files under /x" in out
    assert "instead of 100.7 MiB with offload_param cpu" in out and "5 read buffers" in out
    # DeepSpeed's default max_in_cpu (1e9) keeps a 100M model's partition in host memory: check says so
    ds["zero_optimization"]["offload_param"] = {"device": "nvme", "nvme_path": "/x"}
    result = runner.invoke(app, ["check", job(tmp_path, ds)])
    assert "max_in_cpu keeps the whole partition in host memory" in " ".join(result.output.split())


def test_nvme_estimate_counts_the_master_only_where_it_is_not_the_models_own_fp32_copy() -> None:
    n = 100_000_000
    # bf16: the fp32 master is in the slot with m and v, at every stage
    assert estimate_nvme_offload(n, 2, 2, "bf16", 4)[1] == estimate_nvme_offload(n, 2, 3, "bf16", 4)[1] == 12 * n / 2
    # fp32 stages 1-2: the fp32 host staging of the updated weights is the master (engine/zero/nvme.py's alias)
    assert estimate_nvme_offload(n, 2, 1, "fp32", 4)[1] == estimate_nvme_offload(n, 2, 2, "fp32", 4)[1] == 8 * n / 2
    # fp32 stage 3: the partition on the GPU is no host tensor, so the master goes to the drive too;
    # with offload_param cpu the partition in host memory is the master
    assert estimate_nvme_offload(n, 2, 3, "fp32", 4)[1] == 12 * n / 2
    assert estimate_nvme_offload(n, 2, 3, "fp32", 4, partition_on_host=True)[1] == 8 * n / 2
    # the chunk buffers hold what a slot holds
    small = 10_000_000
    host_gpu, _ = estimate_nvme_offload(n, 1, 3, "fp32", 4, chunk_numel=small)
    host_cpu, _ = estimate_nvme_offload(n, 1, 3, "fp32", 4, chunk_numel=small, partition_on_host=True)
    assert host_gpu - host_cpu == 4 * small * 4


def test_parameter_nvme_estimate_counts_resident_elements_and_buffers() -> None:
    host, nvme = estimate_nvme_param_offload(8_000_000, 4, "fp32", 3, 1_000_000, 500_000, largest_layer=2_000_000)
    assert nvme == (2_000_000 - 500_000) * 4
    assert host == (500_000 + 3 * 500_000) * 4 + 2 * (8 << 20)   # resident + 3 buffers of the largest 1/N + staging


def test_doctor_measures_the_nvme_path_and_names_a_missing_one(tmp_path: Path) -> None:
    from orchestrator.doctor_storage import nvme_probe

    row = nvme_probe(tmp_path, nbytes=64 << 20)
    assert row.ok and "GB/s" in row.detail and ("O_DIRECT works" in row.detail or "O_DIRECT refused" in row.detail)
    assert list(tmp_path.iterdir()) == []                      # the scratch file is gone
    missing = nvme_probe(tmp_path / "nope")
    assert not missing.ok and "does not exist" in missing.detail
    result = runner.invoke(app, ["doctor", "--nvme-path", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "nvme_path" in result.output          # a failed row fails the report
