"""Data for the trainer: deterministic samples, world-size independent batches, resumable position."""
from __future__ import annotations

import numpy as np
import pytest

from engine.trainer.data import DataError, GlobalBatchSampler, SyntheticTokens, TokenFile, infer_token_dtype, open_source


def global_batch(sampler: GlobalBatchSampler, source, world: int, micro: int, accum: int) -> np.ndarray:
    """Everything all ranks read in one step, in (micro-step, rank) order."""
    parts = [source.samples(sampler.micro_batch_indices(m, r, world, micro))
             for m in range(accum) for r in range(world)]
    sampler.advance()
    return np.concatenate(parts)


LAYOUTS = [(1, 8, 1), (1, 2, 4), (2, 4, 1), (2, 1, 4), (4, 2, 1), (4, 1, 2)]  # (world, micro, accum): B = 8


def test_a_step_reads_the_same_global_batch_at_any_world_size():
    source = SyntheticTokens(512, 16, seed=3)
    batches = {}
    for world, micro, accum in LAYOUTS:
        sampler = GlobalBatchSampler(global_batch_size=8)
        batches[(world, micro, accum)] = [global_batch(sampler, source, world, micro, accum) for _ in range(3)]
    reference = batches[(1, 8, 1)]
    for layout, steps in batches.items():
        for step, (got, want) in enumerate(zip(steps, reference)):
            np.testing.assert_array_equal(got, want, err_msg=f"layout {layout}, step {step}")
    assert not np.array_equal(reference[0], reference[1])  # steps read different samples


def test_ranks_read_disjoint_slices_that_cover_the_global_batch():
    sampler = GlobalBatchSampler(global_batch_size=12, consumed_samples=24)
    seen = [i for m in range(3) for r in range(2) for i in sampler.micro_batch_indices(m, r, 2, 2)]
    assert sorted(seen) == list(range(24, 36))
    with pytest.raises(ValueError, match="overruns the global batch"):
        sampler.micro_batch_indices(3, 0, 2, 2)


def test_sampler_state_round_trip_continues_on_another_world_size():
    source = SyntheticTokens(512, 16, seed=3)
    straight = GlobalBatchSampler(global_batch_size=8)
    expected = [global_batch(straight, source, 2, 4, 1) for _ in range(5)]

    first = GlobalBatchSampler(global_batch_size=8)
    for _ in range(3):
        global_batch(first, source, 2, 4, 1)
    saved = first.state_dict()
    assert saved["consumed_samples"] == 24

    resumed = GlobalBatchSampler(global_batch_size=8)  # now 4 ranks, micro-batch 1, accumulation 2
    resumed.load_state_dict(saved)
    for step in (3, 4):
        np.testing.assert_array_equal(global_batch(resumed, source, 4, 1, 2), expected[step])


def test_synthetic_sample_depends_only_on_seed_and_index():
    a = SyntheticTokens(512, 32, seed=1)
    b = SyntheticTokens(512, 32, seed=1)
    np.testing.assert_array_equal(a.samples([7]), b.samples([3, 5, 7])[2:])
    assert a.samples([0]).shape == (1, 33)
    assert not np.array_equal(a.samples([0]), SyntheticTokens(512, 32, seed=2).samples([0]))
    tokens = a.samples(range(64))
    assert tokens.min() >= 0 and tokens.max() < 512


def test_synthetic_tokens_follow_a_learnable_successor_rule():
    # The structure the tiny model learns: most next tokens are determined by the current one.
    source = SyntheticTokens(512, 64, seed=5, noise=0.1)
    tokens = source.samples(range(50))
    successor = dict(zip(source.active[np.arange(len(source.active))], source.active[source.successor]))
    follows = np.mean([successor[a] == b for a, b in zip(tokens[:, :-1].ravel(), tokens[:, 1:].ravel())])
    assert 0.85 < follows < 0.97


def write_tokens(path, n: int, dtype=np.uint16, vocab: int = 1000) -> np.ndarray:
    tokens = (np.arange(n) % vocab).astype(dtype)
    tokens.tofile(path)
    return tokens


def test_token_file_windows_are_shuffled_per_epoch_and_cover_the_file(tmp_path):
    path = tmp_path / "train.bin"
    tokens = write_tokens(path, 10 * 17 + 5)  # 10 windows of seq_len+1 = 17, plus a tail
    source = TokenFile(path, 16, vocab_size=1000)
    assert source.num_windows == 10 and source.dtype == np.uint16
    epoch0 = source.samples(range(10))
    starts = sorted(int(row[0]) for row in epoch0)
    assert starts == [w * 17 for w in range(10)]  # every window once per epoch
    for row in epoch0:
        np.testing.assert_array_equal(row, tokens[row[0]: row[0] + 17])
    epoch1 = source.samples(range(10, 20))
    assert [r[0] for r in epoch1] != [r[0] for r in epoch0]  # a new order next epoch
    np.testing.assert_array_equal(TokenFile(path, 16, vocab_size=1000).samples([13]), epoch1[3:4])


def test_token_dtype_is_inferred_from_the_vocab_or_given(tmp_path):
    assert infer_token_dtype(50304) == np.uint16
    assert infer_token_dtype(128256) == np.uint32
    path = tmp_path / "big.bin"
    write_tokens(path, 400, dtype=np.uint32, vocab=100_000)
    source = open_source(str(path), vocab_size=128256, seq_len=16, seed=0)
    assert source.samples([0]).max() < 100_000
    assert TokenFile(path, 16, vocab_size=128256, dtype="uint32").num_windows == 400 // 17


def test_unusable_token_files_are_explained(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_source(str(tmp_path / "missing.bin"), vocab_size=512, seq_len=16, seed=0)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00" * 7)
    with pytest.raises(DataError, match="not a whole number of uint16 tokens"):
        TokenFile(odd, 16, vocab_size=512)
    short = tmp_path / "short.bin"
    write_tokens(short, 10)
    with pytest.raises(DataError, match="fewer than one sample"):
        TokenFile(short, 16, vocab_size=512)
    wide = tmp_path / "wide.bin"
    write_tokens(wide, 1000, vocab=1000)
    with pytest.raises(DataError, match="token id .* >= the model's vocab size 512"):
        TokenFile(wide, 16, vocab_size=512).samples(range(58))
