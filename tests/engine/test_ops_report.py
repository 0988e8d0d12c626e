"""What ``orch doctor`` learns from engine.ops, how the implementation is chosen, what happens
without triton, and the block-size tuning cache."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from engine.ops import autotune, kernel_report, triton_status
from engine.ops.autotune import GPU_DEFAULT, INTERPRETER_CONFIG, KernelConfig, choose, config_for, read_cache, write_cache
from engine.ops.dispatch import interpreter_mode, resolve


@pytest.mark.skipif(not triton_status().available, reason="triton is not installed here")
def test_kernel_report_runs_the_kernels_on_this_machine():
    report = kernel_report()
    json.dumps(report)  # doctor prints it as JSON
    assert report["triton_importable"] is True
    assert report["triton_version"] == triton_status().version
    assert report["cuda_available"] is torch.cuda.is_available()
    assert report["mode"] == ("interpreter" if interpreter_mode() else "compiled")
    assert report["kernels_ok"] is True, report["checks"]
    assert set(report["checks"]) == {"adamw", "grad_norm"}
    assert report["checks"]["adamw"]["max_rel_error"] < 1e-5
    assert report["compiles"] is True
    assert report["detail"].startswith(f"triton {triton_status().version}: kernels correct")
    if not torch.cuda.is_available():
        assert "interpreter" in report["reason"] and "interpreter" in report["detail"]


NO_TRITON = textwrap.dedent(
    """
    import json, sys
    sys.modules["triton"] = None  # any `import triton` now raises ImportError
    import torch
    import engine.ops as ops
    report = ops.kernel_report()
    p = torch.randn(100, requires_grad=True)
    opt = ops.FusedAdamW([p], lr=0.1)
    p.grad = torch.ones(100)
    before = p.detach().clone()
    opt.step(grad_scale=2.0)
    moved = bool((p.detach() - before).abs().max() > 0)
    try:
        ops.FusedAdamW([p], impl="triton").step()
        forced = "no error"
    except RuntimeError as exc:
        forced = str(exc)
    total, found = ops.grad_norm_and_overflow([torch.ones(4)])
    json.dump({"report": report, "moved": moved, "forced": forced, "norm": total.item(), "found": found.item()}, sys.stdout)
    """
)


def test_without_triton_everything_falls_back_to_torch_and_says_why():
    done = subprocess.run([sys.executable, "-c", NO_TRITON], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    report = out["report"]
    assert report["triton_importable"] is False and report["kernels_ok"] is False
    assert report["mode"] == "unavailable"
    assert "triton is not importable" in report["reason"]
    assert report["compiles"] is False and "triton is not importable" in report["detail"]
    assert out["moved"] is True
    assert "impl='triton' needs triton" in out["forced"] and "impl='auto'" in out["forced"]
    assert out["norm"] == 2.0 and out["found"] == 0.0


def test_auto_picks_torch_fused_for_cpu_adamw_and_foreach_otherwise():
    cpu = torch.device("cpu")
    assert resolve("auto", cpu, torch_fused_ok=True) == "torch-fused"
    assert resolve("auto", cpu, torch_fused_ok=False) == "torch"
    assert resolve("torch", cpu, torch_fused_ok=True) == "torch"
    if torch.cuda.is_available() and triton_status().available:
        assert resolve("auto", torch.device("cuda")) == "triton"
    with pytest.raises(ValueError, match="impl='fast' is not one of 'auto', 'triton', 'torch'"):
        resolve("fast", cpu)


def test_tuning_keeps_the_fastest_configuration_and_skips_ones_that_fail():
    timings = {KernelConfig(1024, 4): 3.0, KernelConfig(2048, 8): 1.5, KernelConfig(4096, 8): 2.0}

    def measure(config):
        if config.block == 8192:
            raise RuntimeError("out of resources: shared memory")
        return timings[config]

    best, seen = choose([*timings, KernelConfig(8192, 16)], measure)
    assert best == KernelConfig(2048, 8)
    assert KernelConfig(8192, 16) not in seen
    assert choose([KernelConfig(8192, 16)], measure)[0] == GPU_DEFAULT


def test_tuning_cache_keeps_every_entry_and_survives_a_corrupt_file(tmp_path):
    path = tmp_path / "orch" / "triton-autotune.json"
    write_cache(path, "adamw|P_DT=float32|NVIDIA H100|triton-3.9.0", KernelConfig(2048, 8))
    write_cache(path, "norm|X_DT=bfloat16|NVIDIA H100|triton-3.9.0", KernelConfig(4096, 16))
    assert read_cache(path) == {
        "adamw|P_DT=float32|NVIDIA H100|triton-3.9.0": KernelConfig(2048, 8),
        "norm|X_DT=bfloat16|NVIDIA H100|triton-3.9.0": KernelConfig(4096, 16),
    }
    path.write_text("{ not json")
    assert read_cache(path) == {}
    write_cache(path, "lion|P_DT=float32|NVIDIA H100|triton-3.9.0", KernelConfig(1024, 4))
    assert len(read_cache(path)) == 1


def test_interpreter_and_cpu_use_large_blocks_and_never_tune(monkeypatch):
    monkeypatch.delenv("ORCH_OPS_BLOCK", raising=False)

    def measure(config):
        raise AssertionError("nothing is tuned off the GPU")

    assert config_for("adamw", torch.device("cpu"), "x", interpreted=True, measure=measure) == INTERPRETER_CONFIG


def test_forced_block_size_for_debugging(monkeypatch):
    monkeypatch.setenv("ORCH_OPS_BLOCK", "512")
    monkeypatch.setenv("ORCH_OPS_NUM_WARPS", "2")
    assert config_for("adamw", torch.device("cpu"), "x", interpreted=True) == KernelConfig(512, 2)
    monkeypatch.setenv("ORCH_OPS_BLOCK", "500")
    with pytest.raises(ValueError, match="ORCH_OPS_BLOCK=500 must be a power of two"):
        config_for("adamw", torch.device("cpu"), "x", interpreted=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not triton_status().available, reason="needs CUDA and triton")
def test_gpu_tunes_once_per_gpu_and_dtypes_and_caches_on_disk(tmp_path, monkeypatch):
    from engine.ops.adamw_kernel import adamw_step

    monkeypatch.setenv("ORCH_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ORCH_OPS_BLOCK", raising=False)
    monkeypatch.setattr(autotune, "_memory", {})
    p = torch.randn(1 << 16, device="cuda")
    g, m, v = torch.randn_like(p), torch.zeros_like(p), torch.zeros_like(p)
    adamw_step([p], [g], [m], [v], None, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    cached = read_cache(tmp_path / "triton-autotune.json")
    assert len(cached) == 1
    key, config = next(iter(cached.items()))
    assert key.startswith("adamw|") and torch.cuda.get_device_name() in key
    assert config in autotune.GPU_CANDIDATES
