"""GPT size presets as plain dataclasses.

This module must not import torch: ``orch check`` reads parameter counts from here to estimate
memory before a job is submitted, and the orchestrator CLI must start without paying for torch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine.errors import UserError


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT-style decoder (pre-LN, learned positions, GELU MLP)."""

    n_layer: int
    d_model: int
    n_head: int
    vocab_size: int
    seq_len: int
    mlp_ratio: int = 4
    bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("n_layer", "d_model", "n_head", "vocab_size", "seq_len", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"GPTConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def num_parameters(self, *, exclude_position_embedding: bool = False) -> int:
        """Exact parameter count of the model this config builds (tied head counted once)."""
        d, hidden = self.d_model, self.mlp_ratio * self.d_model
        b = 1 if self.bias else 0
        attention = 3 * d * d + 3 * d * b + d * d + d * b
        mlp = d * hidden + hidden * b + hidden * d + d * b
        norms = 2 * (2 * d)  # LayerNorm weight + bias, two per block
        per_block = attention + mlp + norms
        embeddings = self.vocab_size * d + self.seq_len * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        total = embeddings + self.n_layer * per_block + 2 * d + head
        return total - (self.seq_len * d if exclude_position_embedding else 0)

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6N plus the attention term 12·L·d·T (PaLM appendix B).

        N excludes the position embedding (a lookup, no matmul) but keeps the token embedding,
        whose weight does the lm_head matmul when tied.
        """
        t = self.seq_len if seq_len is None else seq_len
        n = self.num_parameters(exclude_position_embedding=True)
        return 6 * n + 12 * self.n_layer * self.d_model * t


# Vocabulary of 50304 = GPT-2's 50257 rounded up to a multiple of 64 for tensor-core friendly matmuls.
PRESETS: dict[str, GPTConfig] = {
    # CPU sizes: tests and laptops.
    "tiny": GPTConfig(n_layer=2, d_model=64, n_head=4, vocab_size=512, seq_len=64),
    "small": GPTConfig(n_layer=4, d_model=256, n_head=4, vocab_size=8192, seq_len=256),
    # Benchmarks (bench/): fixed shapes that the recorded numbers refer to.
    "bench-27m": GPTConfig(
        n_layer=6, d_model=512, n_head=8, vocab_size=8192, seq_len=256, tie_embeddings=False
    ),
    "bench-100m": GPTConfig(n_layer=14, d_model=768, n_head=12, vocab_size=8192, seq_len=64),
    # GPU sizes.
    "gpt2-124m": GPTConfig(n_layer=12, d_model=768, n_head=12, vocab_size=50304, seq_len=1024),
    "350m": GPTConfig(n_layer=24, d_model=1024, n_head=16, vocab_size=50304, seq_len=1024),
    "1b": GPTConfig(n_layer=18, d_model=2048, n_head=16, vocab_size=50304, seq_len=2048),
    "3b": GPTConfig(n_layer=36, d_model=2560, n_head=20, vocab_size=50304, seq_len=2048),
    "7b": GPTConfig(n_layer=32, d_model=4096, n_head=32, vocab_size=50304, seq_len=2048),
}


class UnknownPreset(UserError, KeyError):
    """A model name that is not a preset; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError's default str() adds quotes around the message
        return str(self.args[0])


def get_preset(name: str, **overrides: object) -> GPTConfig:
    """The preset ``name`` with fields replaced by ``overrides`` (e.g. ``seq_len=128``)."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise UnknownPreset(
            f"unknown model {name!r}; choose one of: {', '.join(PRESETS)}"
        ) from None
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"unknown GPTConfig field(s) {bad}; valid fields: {sorted(fields)}")
    clean = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(base, **clean) if clean else base


def preset_num_parameters(name: str, **overrides: object) -> int:
    """Parameter count of preset ``name`` without building it (no torch import)."""
    return get_preset(name, **overrides).num_parameters()
