"""The fused AdamW kernel on one tensor of more than 2^31 elements (a 7B model's flat partition at
small N): offsets past int32 must not wrap. GPU only (about 35 GB of device memory)."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a > 2^31-element tensor)")]


def test_adamw_updates_the_last_elements_of_a_tensor_past_two_to_the_31() -> None:
    from engine.ops import FusedAdamW

    n = 2**31 + 4096
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of device memory")
    p = torch.nn.Parameter(torch.ones(n, device="cuda"))
    p.grad = torch.full((n,), 0.5, device="cuda")
    p.grad[-4096:] = torch.linspace(-1, 1, 4096, device="cuda")
    opt = FusedAdamW([p], lr=0.1, weight_decay=0.0, impl="triton")
    opt.step()
    tail = p.detach()[-4096:].clone()
    head = p.detach()[:4].clone()
    del opt, p
    torch.cuda.empty_cache()
    ref = torch.nn.Parameter(torch.ones(4096 + 4, device="cuda"))
    ref.grad = torch.cat([torch.full((4,), 0.5, device="cuda"), torch.linspace(-1, 1, 4096, device="cuda")])
    torch.optim.AdamW([ref], lr=0.1, weight_decay=0.0).step()
    torch.testing.assert_close(head, ref.detach()[:4])
    torch.testing.assert_close(tail, ref.detach()[4:])
