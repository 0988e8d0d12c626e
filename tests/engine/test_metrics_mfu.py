"""MFU arithmetic (nanoGPT / PaLM appendix B), the GPU peak table and the cached CPU probe."""
from __future__ import annotations

import json

import pytest

from engine.trainer.mfu import (GPU_PEAK_BF16_FLOPS, PEAK_ENV, achieved_flops, cpu_peak, cpu_probe_key, device_peak,
                        gpu_peak, measure_matmul_flops, mfu)
from engine.models.presets import get_preset


def test_gpt2_124m_flops_per_token_match_nanogpt_by_hand():
    cfg = get_preset("gpt2-124m")  # 12 layers, d 768, vocab 50304, T 1024
    # nanoGPT prints "number of parameters: 123.69M" for this model: its count leaves out the
    # position embedding (1024 x 768) but keeps the tied token embedding.
    n = cfg.num_parameters(exclude_position_embedding=True)
    assert n == 123_689_472
    # 6N + 12 * n_layer * d_model * T = 742_136_832 + 113_246_208
    assert cfg.flops_per_token() == 855_383_040
    # A shorter sequence only shrinks the attention term.
    assert cfg.flops_per_token(seq_len=512) == 855_383_040 - 12 * 12 * 768 * 512


def test_mfu_of_a_nanogpt_iteration_on_eight_a100s():
    # nanoGPT's GPT-2 recipe: 12 sequences x 1024 tokens x 40 accumulation steps per iteration;
    # at one iteration per second on 8 A100s that is 491,520 tokens/s.
    tokens_per_s = 12 * 1024 * 40
    assert achieved_flops(855_383_040, tokens_per_s) == 420_437_871_820_800
    a100 = gpu_peak("NVIDIA A100-SXM4-80GB")
    assert a100 is not None and a100.flops == 312e12
    assert mfu(855_383_040, tokens_per_s, a100.flops, 8) == pytest.approx(0.168444660, rel=1e-8)
    assert mfu(855_383_040, tokens_per_s, a100.flops, 1) == pytest.approx(8 * 0.168444660, rel=1e-8)
    with pytest.raises(ValueError, match="must be positive"):
        mfu(1, 1, 0.0, 8)


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA A100-SXM4-40GB", 312), ("NVIDIA A100-PCIE-40GB", 312), ("NVIDIA H100 80GB HBM3", 989),
    ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989), ("NVIDIA GH200 480GB", 989),
])
def test_peak_table_matches_device_names_as_cuda_reports_them(name, tflops):
    peak = gpu_peak(name)
    assert peak is not None and peak.flops == tflops * 1e12
    assert name in peak.source and "bf16" in peak.source


def test_unknown_gpus_have_no_peak_and_the_override_wins(monkeypatch):
    assert gpu_peak("NVIDIA GeForce RTX 4090") is None
    assert {fragment for fragment, _ in GPU_PEAK_BF16_FLOPS} >= {"A100", "H100", "H200"}
    import torch

    monkeypatch.setenv(PEAK_ENV, "123.5")
    peak = device_peak(torch.device("cpu"), torch.float32)
    assert peak is not None and peak.flops == 123.5e12 and PEAK_ENV in peak.source
    monkeypatch.setenv(PEAK_ENV, "fast")
    with pytest.raises(ValueError, match=f"{PEAK_ENV}='fast' must be a number of TFLOP/s"):
        device_peak(torch.device("cpu"), torch.float32)


def test_cpu_peak_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("ORCH_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(PEAK_ENV, raising=False)
    first = cpu_peak(torch.float32, torch.get_num_threads())
    assert "measured now" in first.source
    assert 1e8 < first.flops < 1e14  # between 0.1 GFLOP/s and 100 TFLOP/s: a CPU
    cache = json.loads((tmp_path / "cpu-peak.json").read_text())
    key = cpu_probe_key(torch.float32, torch.get_num_threads())
    assert cache[key]["flops"] == first.flops

    # The next run reads the figure instead of measuring: a planted value comes back exactly.
    cache[key]["flops"] = 4.2e11
    (tmp_path / "cpu-peak.json").write_text(json.dumps(cache))
    again = device_peak(torch.device("cpu"), torch.float32)
    assert again is not None and again.flops == 4.2e11 and "cached in" in again.source

    # Another thread count (or dtype) is another machine configuration: measured separately.
    threads = torch.get_num_threads()
    assert cpu_probe_key(torch.float32, threads + 1) != key != cpu_probe_key(torch.bfloat16, threads)

    # A damaged cache is not an error: the probe runs again and rewrites it.
    (tmp_path / "cpu-peak.json").write_text("{not json")
    assert "measured now" in cpu_peak(torch.float32, torch.get_num_threads()).source
    assert key in json.loads((tmp_path / "cpu-peak.json").read_text())


def test_the_probe_times_a_real_matmul():
    import torch

    flops = measure_matmul_flops(torch.float32, min_seconds=0.001, max_n=256, repeats=2)
    assert flops > 1e8
