"""``orch check``'s memory estimate for ZeRO-3 and offload, as a user sizing a job reads it.

Two questions a user asks before submitting: how much do the model states need per GPU at each
stage (the ZeRO paper's figures, with what orch's offload moves to the host), and which stage and
offload combination fits my GPU. The second uses DeepSpeed's estimators
(``estimate_zero2/3_model_states_mem_needs``), so the figures must be the ones DeepSpeed prints;
the reference numbers below are from DeepSpeed's memory documentation (t5-3b: 2851M parameters,
32M in the largest layer, 1 node of 8 GPUs). ``orch check`` must not import torch.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.check import (check_job, deepspeed_zero2_estimate, deepspeed_zero3_estimate,
                                estimate_model_states, largest_layer_parameters, memory_options, recommend)
from orchestrator.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
GiB = 2**30
T5_3B, T5_LARGEST = 2_851_598_336, 32_899_072   # t5-3b, as in DeepSpeed's docs example


@pytest.mark.parametrize("offload_opt, offload_par, init, cpu_gib, gpu_gib", [
    (True, True, True, 71.71, 0.12), (True, True, False, 127.48, 0.12),
    (True, False, True, 63.74, 0.79), (True, False, False, 127.48, 0.79),
    (False, False, True, 1.47, 6.10), (False, False, False, 127.48, 6.10),
])
def test_zero3_estimate_matches_deepspeeds_table(offload_opt: bool, offload_par: bool, init: bool,
                                                 cpu_gib: float, gpu_gib: float) -> None:
    cpu, gpu = deepspeed_zero3_estimate(int(T5_3B), int(T5_LARGEST), gpus_per_node=8, nodes=1,
                                        offload_optimizer=offload_opt, offload_param=offload_par, zero_init=init)
    assert cpu / GiB == pytest.approx(cpu_gib, abs=0.02) and gpu / GiB == pytest.approx(gpu_gib, abs=0.02)


@pytest.mark.parametrize("offload, cpu_gib, gpu_gib", [(True, 127.48, 5.31), (False, 127.48, 15.93)])
def test_zero2_estimate_matches_deepspeeds_table(offload: bool, cpu_gib: float, gpu_gib: float) -> None:
    cpu, gpu = deepspeed_zero2_estimate(int(T5_3B), gpus_per_node=8, nodes=1, offload_optimizer=offload)
    assert cpu / GiB == pytest.approx(cpu_gib, abs=0.02) and gpu / GiB == pytest.approx(gpu_gib, abs=0.02)


def test_zero_paper_figures_per_stage_and_what_offload_moves() -> None:
    psi, n = 1_000_000, 8
    bf16 = {"grad_accum_dtype": "bf16"}       # the paper's 2-byte gradients (DeepSpeed's default)
    z3 = estimate_model_states(psi, n, 3, "bf16", **bf16)
    assert z3.gpu_bytes == pytest.approx(16 * psi / n) and z3.cpu_bytes == 0
    # offload_optimizer: gradients, master and Adam states (14Ψ/N) to the host; offload_param the rest
    z3o = estimate_model_states(psi, n, 3, "bf16", offload_optimizer=True, **bf16)
    assert z3o.gpu_bytes == pytest.approx(2 * psi / n) and z3o.cpu_bytes == pytest.approx(14 * psi / n)
    z3oo = estimate_model_states(psi, n, 3, "bf16", offload_optimizer=True, offload_param=True, **bf16)
    assert z3oo.gpu_bytes == 0 and z3oo.cpu_bytes == pytest.approx(16 * psi / n)
    z2o = estimate_model_states(psi, n, 2, "bf16", offload_optimizer=True, **bf16)
    assert z2o.gpu_bytes == pytest.approx(2 * psi) and z2o.cpu_bytes == pytest.approx(14 * psi / n)
    # stage 1 keeps full gradients on the device; their reduced partition goes to the host with the states
    z1o = estimate_model_states(psi, n, 1, "bf16", offload_optimizer=True, **bf16)
    assert z1o.gpu_bytes == pytest.approx(4 * psi) and z1o.cpu_bytes == pytest.approx(14 * psi / n)


def test_fp32_gradient_accumulation_costs_two_bytes_per_gradient_element_held() -> None:
    """The engine's default under bf16: gradients summed in fp32, so the gradient share a rank holds
    doubles: the partition at stages 2-3, the whole gradient at stage 1."""
    psi, n = 1_000_000, 8
    assert estimate_model_states(psi, n, 3, "bf16").gpu_bytes == pytest.approx(18 * psi / n)
    assert estimate_model_states(psi, n, 2, "bf16").gpu_bytes == pytest.approx(2 * psi + 16 * psi / n)
    # stage 1: the whole fp32 gradient and its reduce-scattered partition (the optimizer's gradient)
    assert estimate_model_states(psi, n, 1, "bf16").gpu_bytes == pytest.approx(6 * psi + 16 * psi / n)
    # fp32 training partitioned at stages 1-2 keeps a master copy (a rank's pieces span the buckets)
    assert estimate_model_states(psi, n, 2, "fp32").gpu_bytes == pytest.approx(4 * psi + 16 * psi / n)
    z3o = estimate_model_states(psi, n, 3, "bf16", offload_optimizer=True)   # the fp32 partition goes to the host
    assert z3o.gpu_bytes == pytest.approx(2 * psi / n) and z3o.cpu_bytes == pytest.approx(16 * psi / n)
    assert estimate_model_states(psi, n, 3, "fp32").gpu_bytes == pytest.approx(16 * psi / n)   # unchanged


@pytest.mark.parametrize("gpu_gib, expected", [
    (80, "ZeRO-2, offload_optimizer=none"),
    (12, "ZeRO-3, offload_optimizer=none, offload_param=none, zero.Init=yes"),
    (4, "ZeRO-3, offload_optimizer=cpu, offload_param=none, zero.Init=yes"),
    (0.5, "ZeRO-3, offload_optimizer=cpu, offload_param=cpu, zero.Init=yes"),
])
def test_recommendation_is_the_least_offloading_that_fits(gpu_gib: float, expected: str) -> None:
    advice = recommend(memory_options(int(T5_3B), int(T5_LARGEST), 8, 1), gpu_gib * GiB)
    assert advice.startswith(expected + " fits"), advice


def test_nothing_fits_says_what_to_do() -> None:
    advice = recommend(memory_options(int(T5_3B), int(T5_LARGEST), 8, 1), 0.05 * GiB)
    assert advice.startswith("nothing fits") and "add GPUs" in advice


def test_check_job_sizes_the_bundled_gpt_and_recommends_for_a_gpu() -> None:
    spec = load_spec(REPO / "examples" / "gpt-1b-gpu.yaml")   # 32 ranks, 4 nodes of 8
    report = check_job(spec, gpu_memory_bytes=80e9)
    from engine.models.presets import get_preset

    cfg = get_preset("1b")
    assert report.largest_layer_parameters == largest_layer_parameters(cfg) == cfg.vocab_size * cfg.d_model
    assert [e.stage for e in report.estimates] == [0, 1, 2, 3]
    assert {(o.stage, o.offload_optimizer, o.offload_param) for o in report.options} == {
        (2, False, False), (2, True, False), (3, False, False), (3, True, False), (3, True, True)}
    assert report.recommendation and report.recommendation.startswith("ZeRO-2, offload_optimizer=none fits")
    assert any(n.startswith("memory: ") for n in report.notes)


def test_orch_check_does_not_import_torch() -> None:
    code = ("import sys\nfrom orchestrator.check import check_job\nfrom orchestrator.spec import load_spec\n"
            f"r = check_job(load_spec({str(REPO / 'examples' / 'gpt-1b-gpu.yaml')!r}), gpu_memory_bytes=8e9)\n"
            "assert r.recommendation, r\nassert 'torch' not in sys.modules, 'orch check imported torch'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
