"""The engine at 8 and 64 NCCL ranks, simulated: what one rank moves and holds per step.

torch's fake process group lets this process be rank 0 of a world of N with the NCCL plan
(engine/scale_sim.py); the communication ledger counts what every collective moves. At that
scale the ZeRO paper's numbers must hold: bytes per rank per step within 5 % of 2Ψ·(N−1)/N
(stages 1-2) or 3Ψ·(N−1)/N (stage 3) bf16 elements, model-state bytes within 5 % of its
formula, stage 3's gathered memory within the largest unit plus the prefetch bucket, and a
number of collectives per step that grows with the buckets and units, never with N.
"""
from __future__ import annotations

import pytest
import torch

from engine.comm import Comm
from engine.comm_ledger import CommLedger, ring_bytes
from engine.models import build_model, get_preset
from engine.scale_sim import fsdp2_step, simulate

MODEL = "small"
SEQ = 16


def test_the_ledger_counts_what_a_ring_moves_per_rank() -> None:
    assert ring_bytes("all_reduce", 800, 8, 0) == (1400, 1400)
    assert ring_bytes("all_gather", 800, 8, 3) == (700, 700)
    assert ring_bytes("reduce_scatter", 800, 8, 3) == (700, 700)
    assert ring_bytes("reduce", 100, 4, 2, peer=2) == (0, 100)          # the destination sends nothing
    assert ring_bytes("reduce", 100, 4, 3, peer=2) == (100, 0)          # the ring's head receives nothing
    assert ring_bytes("broadcast", 100, 4, 0) == (100, 0)       # the source receives nothing
    assert ring_bytes("all_reduce", 800, 1, 0) == (0, 0)
    book = CommLedger()
    book.record("all_gather", torch.empty(10, dtype=torch.bfloat16), 4, 0)
    book.record("all_gather", torch.empty(30, dtype=torch.bfloat16), 4, 0)
    assert book.by_op() == {"all_gather/bfloat16": {"calls": 2, "elements": 40, "bytes_sent": 15 + 45,
                                                    "bytes_received": 15 + 45}}
    assert book.mark_step() == {"comm_calls": 2, "comm_bytes_sent": 60, "comm_bytes_received": 60}
    assert book.mark_step() == {"comm_calls": 0, "comm_bytes_sent": 0, "comm_bytes_received": 0}


def test_a_single_process_records_nothing() -> None:
    book = CommLedger()
    comm = Comm(book=book)
    comm.all_reduce(torch.ones(4))
    assert book.totals() == {"calls": 0, "bytes_sent": 0, "bytes_received": 0}


def _config(stage: int, d_model: int, **stage3: object) -> dict:
    zero = {"stage": stage, "reduce_bucket_size": 500_000, "allgather_bucket_size": 50_000_000}
    if stage == 3:
        zero |= {"stage3_prefetch_bucket_size": 4 * d_model * d_model, "stage3_max_reuse_distance": 0,
                 "stage3_param_persistence_threshold": 10 * d_model, **stage3}
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "gradient_clipping": 1.0,
            "zero_optimization": zero}


def _simulate(stage: int, world: int, checkpointing: bool = False, tied: bool = False, **stage3: object):
    preset = get_preset(MODEL)

    def factory():
        model = build_model(MODEL, seq_len=SEQ, tie_embeddings=tied)
        model.set_activation_checkpointing(checkpointing)
        return model

    return simulate(factory, _config(stage, preset.d_model, **stage3), world=world, vocab_size=preset.vocab_size,
                    seq_len=SEQ, model_name=MODEL)


@pytest.mark.parametrize("world", [8, 64])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_at_scale_a_step_moves_the_zero_volume_and_holds_the_zero_memory(stage: int, world: int) -> None:
    report = _simulate(stage, world)
    preset = get_preset(MODEL)
    # stage 3 gathers the head for its forward and keeps it for its backward, which comes next
    kept = preset.vocab_size * preset.d_model / (3 * report.parameters) if stage == 3 else 0.0
    assert 0.95 - kept <= report.volume_ratio <= 1.05, report.as_dict()
    assert 0.95 <= report.state_ratio <= 1.05, report.as_dict()
    ops = {key.split("/")[0] for key in report.by_op}
    if stage == 3:
        assert "reduce_scatter" in ops and "reduce" not in ops      # one reduce-scatter per bucket
        assert report.peak_gathered_bytes <= 1.05 * (report.largest_unit_bytes + report.prefetch_bytes), \
            report.as_dict()
        units = 4 * preset.n_layer + 3                 # 4 matrices a block, the embeddings, the head
        buckets = report.parameters // 500_000 + 1     # reduce_bucket_size
        assert report.calls <= 2 * units + buckets + 4, report.as_dict()   # each unit gathered twice, a
        # reduce-scatter per bucket, the persistent unit, the norm: nothing grows with N
    else:
        # one reduce-scatter and one all-gather per reduce bucket, the norm's all-reduce: nothing grows with N
        assert {key.split("/")[0] for key in report.step_by_op} == {"reduce_scatter", "all_gather", "all_reduce"}
        assert report.calls <= 2 * _reduce_buckets(500_000) + 1, report.step_by_op


def _reduce_buckets(bucket_numel: int) -> int:
    """Stages 1-2's reduce buckets for the model (whole consecutive parameters, at most ``bucket_numel``)."""
    from engine.zero.partition import FlatLayout

    model = build_model(MODEL, seq_len=SEQ, tie_embeddings=False)
    return len(FlatLayout.bucketed([list(model.named_parameters())], 8, bucket_numel).spans)


def test_stage_3_with_activation_checkpointing_gathers_each_unit_three_times_at_most() -> None:
    report = _simulate(3, 8, checkpointing=True)
    assert report.bytes_sent <= 4 / 3 * report.zero_volume * 1.05, report.as_dict()
    assert report.peak_gathered_bytes <= 1.05 * (report.largest_unit_bytes + report.prefetch_bytes), \
        report.as_dict()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("world", [8, 64])
def test_a_tied_embedding_is_gathered_twice_a_step_and_never_held_beside_the_blocks(world: int,
                                                                                    checkpointing: bool) -> None:
    """GPT's wte is lm_head's weight: one unit, the largest, read by the embedding's forward and the head's
    forward and backward. It is gathered for the embedding, again for the head (kept into the head's
    backward, which comes next) and released when the head's backward is done, although its gradient is
    final only after the embedding's backward (which reads no weight and gathers nothing)."""
    report = _simulate(3, world, checkpointing=checkpointing, tied=True)
    preset = get_preset(MODEL)
    tied = preset.vocab_size * preset.d_model
    assert report.largest_unit_bytes == 2 * tied, report.as_dict()
    assert report.peak_gathered_bytes <= 1.05 * (report.largest_unit_bytes + report.prefetch_bytes), \
        report.as_dict()
    # the tied unit twice; every other unit twice, or three times when recomputation gathers it again
    gathered = 2 * tied + (3 if checkpointing else 2) * (report.parameters - tied)
    gather_bytes = report.step_by_op["all_gather/bfloat16"]["bytes_sent"]
    assert gather_bytes <= 1.01 * gathered * 2 * (world - 1) / world, report.as_dict()
    if not checkpointing:
        assert 0.95 <= report.volume_ratio <= 1.05, report.as_dict()


@pytest.mark.parametrize("world", [8, 64])
def test_holding_the_tied_embedding_gathers_it_once_a_step_as_fsdp2_does(world: int) -> None:
    """``stage3_hold_tied_params``: the tied unit is gathered at the embedding's forward and held through the
    head's backward, one gather a step fewer than releasing it; FSDP2, which never reshards its root (the
    tied embedding) after forward, moves as much and holds at least as much."""
    release = _simulate(3, world, tied=True)
    hold = _simulate(3, world, tied=True, stage3_hold_tied_params=True)
    tied = release.largest_unit_bytes
    gathers = {name: r.step_by_op["all_gather/bfloat16"] for name, r in (("release", release), ("hold", hold))}
    assert gathers["release"]["calls"] - gathers["hold"]["calls"] == 1, gathers
    assert abs(gathers["release"]["bytes_sent"] - gathers["hold"]["bytes_sent"] - tied * (world - 1) / world) <= 1
    assert release.bytes_sent - hold.bytes_sent == gathers["release"]["bytes_sent"] - gathers["hold"]["bytes_sent"]
    # held beside a block's unit and the prefetch: above the release policy's peak
    assert release.peak_gathered_bytes <= 1.05 * (tied + release.prefetch_bytes) < hold.peak_gathered_bytes
    preset = get_preset(MODEL)
    fsdp = fsdp2_step(lambda: build_model(MODEL, seq_len=SEQ), lambda m: list(m.blocks), world=world,
                      vocab_size=preset.vocab_size, seq_len=SEQ, steps=1, reduce_dtype=torch.float32)
    assert hold.bytes_sent <= fsdp["bytes_sent"] < release.bytes_sent, (hold.bytes_sent, fsdp, release.bytes_sent)
    # the probe saw FSDP2 hold its root (the tied embedding) beside a block, and its flat all-gather outputs
    block = sum(p.numel() for p in build_model(MODEL, seq_len=SEQ).blocks[0].parameters()) * 2
    assert fsdp["peak_gathered_bytes"] > fsdp["peak_unsharded_bytes"] >= tied + block, fsdp
    assert hold.peak_gathered_bytes <= fsdp["peak_unsharded_bytes"], (hold.as_dict(), fsdp)


@pytest.mark.parametrize("world", [8, 64])
def test_an_untied_model_meets_the_bytes_and_the_staging_goal_in_one_run(world: int) -> None:
    """With its own lm_head weight no unit is read twice in forward: the embedding is gathered once (its
    backward reads no weight), the head once (kept into its backward, which comes next), every block twice.
    That is what FSDP2 moves with the embedding and head in its never-resharded root, so the release
    policy is at or under FSDP2's bytes while its staging stays the largest unit plus the prefetch."""
    report = _simulate(3, world)
    preset = get_preset(MODEL)
    fsdp = fsdp2_step(lambda: build_model(MODEL, seq_len=SEQ, tie_embeddings=False), lambda m: list(m.blocks),
                      world=world, vocab_size=preset.vocab_size, seq_len=SEQ, steps=1, reduce_dtype=torch.float32)
    assert report.bytes_sent <= fsdp["bytes_sent"], (report.as_dict(), fsdp)
    assert report.peak_gathered_bytes <= 1.05 * (report.largest_unit_bytes + report.prefetch_bytes), \
        report.as_dict()
    assert report.peak_gathered_bytes < fsdp["peak_gathered_bytes"], (report.as_dict(), fsdp)


def test_holding_the_tied_embedding_under_activation_checkpointing_still_saves_its_second_gather() -> None:
    """Recomputation inside backward reads the blocks again, never the tied unit: held or not, the difference
    stays one gather of it a step, and the held unit's peak stays that of the plain run."""
    release = _simulate(3, 8, checkpointing=True, tied=True)
    hold = _simulate(3, 8, checkpointing=True, tied=True, stage3_hold_tied_params=True)
    before, after = release.step_by_op["all_gather/bfloat16"], hold.step_by_op["all_gather/bfloat16"]
    assert before["calls"] - after["calls"] == 1
    assert before["bytes_sent"] - after["bytes_sent"] == release.largest_unit_bytes * 7 // 8
    assert hold.peak_gathered_bytes == _simulate(3, 8, tied=True, stage3_hold_tied_params=True).peak_gathered_bytes


def test_released_parameters_keep_their_shape_only_while_their_gradients_are_due() -> None:
    """Between a unit's release and its gradient, autograd's AccumulateGrad needs the parameter's shape
    (stand-ins with no memory); outside that window a released parameter is empty, as with DeepSpeed."""
    import engine
    from engine.scale_sim import fake_world

    preset = get_preset(MODEL)
    cfg = _config(3, preset.d_model)
    with fake_world(8):
        with engine.zero.Init(config_dict_or_path=cfg):
            model = build_model(MODEL, seq_len=SEQ)      # tied: wte is lm_head's weight
        eng, *_ = engine.initialize(model=model, config=cfg)
        tokens = torch.randint(0, preset.vocab_size, (1, SEQ))
        loss = eng(tokens, tokens)
        qkv = model.blocks[0].attn.qkv.weight
        assert qkv.shape == (3 * preset.d_model, preset.d_model) and qkv.untyped_storage().nbytes() <= 2
        eng.backward(loss)
        assert qkv.numel() == 0 and model.wte.weight.numel() == 0
        assert model.wte.weight is model.lm_head.weight
        eng.step()
