"""A GPT-style decoder in plain PyTorch: the model the bundled trainer runs.

Pre-LN blocks, causal self-attention through ``scaled_dot_product_attention`` (flash/memory-
efficient kernels where the device has them), GELU MLP, learned positions, and an lm_head that
shares the token embedding's weight. Weights are drawn from an explicit seeded generator, so
every rank (at any world size) builds the same model without a broadcast.
"""
from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.presets import GPTConfig


def _checkpoint_function() -> Callable[..., torch.Tensor]:
    """The engine's activation-checkpoint helper if it exists, else torch's own."""
    try:
        return importlib.import_module("engine").checkpointing.checkpoint
    except (ImportError, AttributeError):
        import torch.utils.checkpoint as tuc

        return functools.partial(tuc.checkpoint, use_reentrant=False)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.activation_checkpointing = cfg.activation_checkpointing

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return _checkpoint_function()(self._body, x)
        return self._body(x)


class GPT(nn.Module):
    """``model(idx)`` returns logits; ``model(idx, targets)`` returns the mean cross-entropy."""

    def __init__(self, cfg: GPTConfig, *, seed: int = 1234) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """GPT-2 init (normal 0.02; residual projections scaled by 1/sqrt(2L)) from ``seed``.

        Parameters are visited in a fixed order with one generator, so the result depends only on
        the seed and the device type, never on the rank or world size.
        """
        device = next(self.parameters()).device
        if device.type == "meta":  # shapes only (parameter counting, deferred init)
            return
        gen = torch.Generator(device=device).manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():  # a tied weight is listed once
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, 0.0, residual_std, generator=gen)
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02, generator=gen)
            elif "ln" in name.split(".")[-2] and name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        for block in self.blocks:
            block.activation_checkpointing = enabled

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.config.seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds the model's seq_len {self.config.seq_len}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    def num_parameters(self, *, exclude_position_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - (self.wpe.weight.numel() if exclude_position_embedding else 0)

    def flops_per_token(self, seq_len: int | None = None) -> int:
        return self.config.flops_per_token(seq_len)
