"""The trainer's GPT: presets, parameter counts without torch, reproducible init, a working loss."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from engine.models import PRESETS, build_model, get_preset, preset_num_parameters  # noqa: E402


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_matches_the_built_model(name):
    # Meta device: the 3B preset costs no memory, only shapes.
    model = build_model(name, device="meta")
    assert model.num_parameters() == preset_num_parameters(name)
    assert preset_num_parameters(name) == sum(p.numel() for p in model.parameters())


def test_preset_sizes_are_what_their_names_say():
    millions = {name: preset_num_parameters(name) / 1e6 for name in PRESETS}
    assert millions["tiny"] < 1
    assert 120 < millions["gpt2-124m"] < 128
    assert 330 < millions["350m"] < 370
    assert 0.9e3 < millions["1b"] < 1.2e3
    assert 2.5e3 < millions["3b"] < 3.5e3
    assert 26 < millions["bench-27m"] < 28.5
    assert millions["bench-100m"] >= 100
    bench = get_preset("bench-27m")
    assert (bench.n_layer, bench.d_model, bench.n_head, bench.seq_len, bench.vocab_size) == (6, 512, 8, 256, 8192)
    assert get_preset("bench-100m").seq_len <= 128


def test_parameter_counts_do_not_import_torch():
    # `orch check` sizes jobs from these numbers and must not pay for importing torch.
    code = (
        "import sys; from engine.models import preset_num_parameters, PRESETS; "
        "n = preset_num_parameters('1b', seq_len=4096); "
        "assert 'torch' not in sys.modules, 'torch was imported'; print(n)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == get_preset("1b", seq_len=4096).num_parameters()


def test_overrides_change_the_shape_and_unknown_names_are_explained():
    model = build_model("tiny", seq_len=32, n_layer=3)
    assert model.config.seq_len == 32 and len(model.blocks) == 3
    with pytest.raises(KeyError, match="choose one of: tiny, small"):
        build_model("tinyy")
    with pytest.raises(ValueError, match="n_layers"):
        get_preset("tiny", n_layers=3)


def test_same_seed_builds_the_same_weights_and_another_seed_does_not():
    a, b, c = build_model("tiny", seed=7), build_model("tiny", seed=7), build_model("tiny", seed=8)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.wte.weight, c.wte.weight)


def test_lm_head_shares_the_token_embedding():
    model = build_model("tiny")
    assert model.lm_head.weight is model.wte.weight
    assert not build_model("bench-27m", device="meta").config.tie_embeddings


def test_initial_loss_is_near_uniform_and_training_lowers_it():
    torch.manual_seed(0)
    model = build_model("tiny")
    vocab, seq = model.config.vocab_size, model.config.seq_len
    x = torch.randint(0, vocab, (4, seq))
    y = torch.roll(x, -1, dims=1)
    loss = model(x, y)
    assert loss.dim() == 0
    assert abs(loss.item() - math.log(vocab)) < 0.3  # GPT-2 init: close to a uniform guess
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):  # memorise one batch
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
    assert model(x, y).item() < loss.item() - 2.0
    assert model(x).shape == (4, seq, vocab)  # no targets: logits


def test_attention_is_causal():
    model = build_model("tiny").eval()
    x = torch.randint(0, 512, (1, 16))
    changed = x.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 512
    with torch.no_grad():
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[0, :10], b[0, :10])
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    plain, ckpt = build_model("tiny"), build_model("tiny", activation_checkpointing=True)
    x = torch.randint(0, 512, (2, 64))
    y = torch.roll(x, -1, dims=1)
    loss_a, loss_b = plain(x, y), ckpt(x, y)
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(loss_a, loss_b)
    for (name, pa), pb in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_flops_per_token_is_six_n_plus_attention():
    cfg = get_preset("gpt2-124m")
    n = cfg.num_parameters() - cfg.seq_len * cfg.d_model  # without position embeddings
    assert cfg.flops_per_token() == 6 * n + 12 * cfg.n_layer * cfg.d_model * cfg.seq_len
    assert cfg.flops_per_token(128) < cfg.flops_per_token()
    # nanoGPT's figure for GPT-2 small at T=1024 is about 0.85 GFLOPs per token (fwd+bwd)
    assert 0.8e9 < cfg.flops_per_token() < 0.9e9
    assert build_model("tiny").flops_per_token(64) == get_preset("tiny").flops_per_token(64)


def test_bad_shapes_are_rejected_with_the_field_name():
    with pytest.raises(ValueError, match="divisible by n_head"):
        get_preset("tiny", d_model=66)
    model = build_model("tiny")
    with pytest.raises(ValueError, match="exceeds the model's seq_len 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
