"""Token data for the bundled trainer, addressed by a global sample index.

Every sample has a global index ``i`` and its tokens depend only on ``(seed, i)``. The global
batch of a step is a contiguous run of indices, split into micro-batches by (accumulation step,
rank). So the data a step sees is the same at any world size, and resuming needs one number
(``consumed_samples``), which is what makes elastic restarts at a new world size continue the
same data order.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from engine.errors import UserError


class DataError(UserError, ValueError):
    """A data source the user pointed at cannot be used (missing file, wrong dtype, too short)."""


class TokenSource(Protocol):
    """Samples of ``seq_len + 1`` tokens (inputs and shifted targets) by global index."""

    seq_len: int

    def samples(self, indices: Sequence[int]) -> np.ndarray: ...


class SyntheticTokens:
    """Seeded tokens with structure a small model learns within tens of steps.

    Each sample is a walk through a fixed random successor table over a small active vocabulary
    (``n_active`` tokens): with probability ``1 - noise`` the next token is the table's successor
    of the current one, otherwise a random active token. A model first learns which tokens occur
    (loss falls from ln(vocab) towards ln(n_active)), then the successor table.
    """

    def __init__(
        self, vocab_size: int, seq_len: int, *, seed: int = 1234, noise: float = 0.1,
        n_active: int | None = None,
    ) -> None:
        self.vocab_size, self.seq_len, self.seed, self.noise = vocab_size, seq_len, seed, noise
        table_rng = np.random.default_rng([seed, 0x5EED])
        n = n_active if n_active is not None else min(vocab_size, 64)
        self.active = table_rng.choice(vocab_size, size=n, replace=False)
        self.successor = table_rng.permutation(n)

    def samples(self, indices: Sequence[int]) -> np.ndarray:
        width, n = self.seq_len + 1, len(self.active)
        jumps = np.empty((len(indices), width), dtype=bool)
        randoms = np.empty((len(indices), width), dtype=np.int64)
        for row, index in enumerate(indices):  # per-sample streams: content depends on (seed, i) only
            rng = np.random.default_rng([self.seed, int(index)])
            jumps[row] = rng.random(width) < self.noise
            randoms[row] = rng.integers(0, n, size=width)
        state = np.empty_like(randoms)
        state[:, 0] = randoms[:, 0]
        for t in range(1, width):  # the walk, vectorised across the batch
            state[:, t] = np.where(jumps[:, t], randoms[:, t], self.successor[state[:, t - 1]])
        return self.active[state]


def infer_token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds token ids below 65536 (GPT-2's 50257); larger vocabularies need uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class TokenFile:
    """A flat binary file of token ids (uint16/uint32, as nanoGPT's ``prepare.py`` writes).

    The file is cut into non-overlapping windows of ``seq_len + 1`` tokens; sample ``i`` is window
    ``perm_e[i mod n]`` where ``perm_e`` is a seeded permutation for epoch ``e = i // n``.
    """

    def __init__(
        self, path: str | os.PathLike[str], seq_len: int, *, vocab_size: int,
        dtype: str | np.dtype | None = None, seed: int = 1234,
    ) -> None:
        self.path, self.seq_len, self.seed = Path(path), seq_len, seed
        self.dtype = np.dtype(dtype) if dtype is not None else infer_token_dtype(vocab_size)
        if self.dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
            raise DataError(f"--data-dtype must be uint16 or uint32, got {self.dtype}")
        if not self.path.is_file():
            raise DataError(f"data file {str(self.path)!r} does not exist (--data)")
        size = self.path.stat().st_size
        if size % self.dtype.itemsize:
            raise DataError(
                f"data file {str(self.path)!r} is {size} bytes, not a whole number of "
                f"{self.dtype} tokens; pass the right --data-dtype"
            )
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        self.num_windows = len(self.tokens) // (seq_len + 1)
        if self.num_windows < 1:
            raise DataError(
                f"data file {str(self.path)!r} holds {len(self.tokens)} tokens, fewer than one "
                f"sample of seq_len+1 = {seq_len + 1}"
            )
        self.vocab_size = vocab_size
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _window(self, index: int) -> int:
        epoch, offset = divmod(index, self.num_windows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        return int(self._perm[offset])

    def samples(self, indices: Sequence[int]) -> np.ndarray:
        width = self.seq_len + 1
        out = np.empty((len(indices), width), dtype=np.int64)
        for row, index in enumerate(indices):
            start = self._window(int(index)) * width
            out[row] = self.tokens[start : start + width]
        if out.size and int(out.max()) >= self.vocab_size:
            raise DataError(
                f"data file {str(self.path)!r} has token id {int(out.max())} >= the model's vocab "
                f"size {self.vocab_size}; check --data-dtype or choose a model with a larger vocab"
            )
        return out


def open_source(
    data: str, *, vocab_size: int, seq_len: int, seed: int, dtype: str | None = None
) -> TokenSource:
    """``"synthetic"`` or a path to a token file, as given on the command line."""
    if data == "synthetic":
        return SyntheticTokens(vocab_size, seq_len, seed=seed)
    return TokenFile(data, seq_len, vocab_size=vocab_size, dtype=dtype, seed=seed)


@dataclass
class GlobalBatchSampler:
    """Which global sample indices each rank reads, step after step.

    Step ``s`` (counting from the position ``consumed_samples``) reads the global batch
    ``[consumed, consumed + B)``. Micro-step ``m`` of rank ``r`` reads the slice starting at
    ``consumed + (m * world_size + r) * micro``. The state is one integer, independent of the
    world size, so a run can resume on a different number of ranks.
    """

    global_batch_size: int
    consumed_samples: int = 0

    def micro_batch_indices(
        self, micro_step: int, rank: int, world_size: int, micro_batch_size: int
    ) -> range:
        if micro_batch_size * world_size * (micro_step + 1) > self.global_batch_size:
            raise ValueError(
                f"micro-step {micro_step} x {world_size} ranks x {micro_batch_size} samples "
                f"overruns the global batch of {self.global_batch_size}"
            )
        start = self.consumed_samples + (micro_step * world_size + rank) * micro_batch_size
        return range(start, start + micro_batch_size)

    def advance(self) -> None:
        """Mark the current global batch consumed (call once per optimizer step)."""
        self.consumed_samples += self.global_batch_size

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # The global batch size comes from the current config; only the position carries over.
        self.consumed_samples = int(state["consumed_samples"])


def split_inputs_targets(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inputs are tokens[:-1], targets the same sequence shifted by one."""
    return tokens[:, :-1], tokens[:, 1:]
