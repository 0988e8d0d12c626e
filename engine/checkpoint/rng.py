"""Every random number generator a training step may draw from, as plain JSON and back.

Dropout masks (torch, CUDA), data shuffling (numpy, python's ``random``) all continue where they
stopped after a resume, which is what makes a resumed loss curve identical to an uninterrupted
one. States are stored base64-encoded: about 14 KB per rank.
"""
from __future__ import annotations

import base64
import random
from typing import Any, Mapping

import numpy as np
import torch

__all__ = ["capture_rng", "restore_rng"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


def capture_rng() -> dict[str, Any]:
    """This process's generator states (CUDA only where CUDA has been initialised)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": _b64(np.asarray(internal, dtype="<u4").tobytes()),
                   "gauss_next": gauss},
        "numpy": {"kind": kind, "keys": _b64(np.asarray(keys, dtype="<u4").tobytes()), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": _b64(torch.get_rng_state().numpy().tobytes()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s.numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Put the generators back as ``capture_rng`` found them."""
    py = state["python"]
    internal = tuple(int(x) for x in np.frombuffer(_unb64(py["state"]), dtype="<u4"))
    random.setstate((py["version"], internal, py["gauss_next"]))
    npy = state["numpy"]
    keys = np.frombuffer(_unb64(npy["keys"]), dtype="<u4").astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(torch.frombuffer(bytearray(_unb64(state["torch"])), dtype=torch.uint8))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        states = [torch.frombuffer(bytearray(_unb64(s)), dtype=torch.uint8) for s in cuda]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:  # another node shape: at least this process's device continues its own stream
            torch.cuda.set_rng_state(states[min(torch.cuda.current_device(), len(states) - 1)])
