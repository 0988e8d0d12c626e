"""1-bit Adam (``"type": "OneBitAdam"``) through engine.initialize on 2 and 4 real gloo ranks.

DeepSpeed 0.19.8 no longer has 1-bit Adam ("OneBitAdam is not a supported DeepSpeed Optimizer":
the compressed-communication optimizers were removed with the features listed in its issue
#8489), so the peer here is a float64 reference of the algorithm as DeepSpeed <= 0.18 ran it
(runtime/fp16/onebit/adam.py + runtime/comm/nccl.py): a first step that only initialises,
warm-up Adam without bias correction on the averaged gradient, then a frozen variance and the
local momenta averaged by the two-phase compressed all-reduce with worker and server error
feedback. The reference simulates every rank in one process.

Also measured here: the ledger's bytes per step after the warm-up against uncompressed
Adam's (the goal: at most 1/16), at 2 and 4 ranks and, through a fake process group, at 64.
"""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

from tests.dist_utils import run_distributed, ledgered_steps
from tests.engine_zero_cases import GLOBAL_BATCH, STEPS, global_batch, make_model, train_steps

pytestmark = pytest.mark.slow

LR, BETAS, EPS, WD, FREEZE = 3e-3, (0.9, 0.99), 1e-8, 0.01, 6


def onebit_config(freeze_step: int = FREEZE, **params) -> dict:
    return {"train_batch_size": GLOBAL_BATCH, "gradient_clipping": 0.0, "zero_optimization": {"stage": 0},
            "optimizer": {"type": "OneBitAdam", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS,
                                                           "weight_decay": WD, "freeze_step": freeze_step,
                                                           "cuda_aware": False, "comm_backend_name": "nccl",
                                                           **params}}}


def adam_config() -> dict:
    cfg = onebit_config()
    cfg["optimizer"] = {"type": "Adam", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD}}
    return cfg


# -- the float64 reference ----------------------------------------------------------------------
def compressed_allreduce_reference(momenta, worker_errors, server_errors):
    """DeepSpeed's compressed all-reduce, every rank at once, in float64."""
    world, n = len(momenta), momenta[0].numel()
    unit = world * (world * 8 // math.gcd(world, 8))
    padded = -(-n // unit) * unit
    chunk = padded // world
    signs, scales = [], []
    for r, m in enumerate(momenta):
        buf = torch.cat([m, torch.zeros(padded - n, dtype=m.dtype)]) + worker_errors[r]
        scale = buf.norm() / padded ** 0.5
        sign = torch.where(buf >= 0, 1.0, -1.0).double()
        worker_errors[r] = buf - scale * sign
        signs.append(sign)
        scales.append(scale)
    out = []
    for c in range(world):
        part = sum(signs[r][c * chunk:(c + 1) * chunk] * scales[r] / world for r in range(world)) + server_errors[c]
        scale = part.norm() / chunk ** 0.5
        sign = torch.where(part >= 0, 1.0, -1.0).double()
        server_errors[c] = part - scale * sign
        out.append(scale * sign)
    return torch.cat(out)[:n]


def rank_gradients(model, world: int, step: int) -> list[torch.Tensor]:
    """Each rank's flat gradient on its rows of the global batch (as train_global_batches splits it)."""
    x, y = global_batch(step)
    micro = GLOBAL_BATCH // world
    grads = []
    for r in range(world):
        model.zero_grad()
        model(x[r * micro:(r + 1) * micro], y[r * micro:(r + 1) * micro]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return grads


@functools.lru_cache(maxsize=None)
def onebit_reference(world: int, steps: int = STEPS, freeze_step: int = FREEZE) -> list[float]:
    model = make_model().double()
    params = list(model.parameters())
    w = torch.cat([p.detach().reshape(-1) for p in params])
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    worker_errors, server_errors = None, None
    losses = []
    for t in range(1, steps + 1):
        x, y = global_batch(t - 1)
        with torch.no_grad():
            losses.append(float(model(x, y)))
        grads = rank_gradients(model, world, t - 1)
        if t == 1:
            continue                          # DeepSpeed's initialisation step
        if t - 1 < max(freeze_step, 2):
            g = sum(grads) / world
            m = BETAS[0] * m + (1 - BETAS[0]) * g
            v = BETAS[1] * v + (1 - BETAS[1]) * g * g
        else:
            if worker_errors is None:
                unit = world * (world * 8 // math.gcd(world, 8))
                padded = -(-w.numel() // unit) * unit
                worker_errors = [torch.zeros(padded, dtype=torch.float64) for _ in range(world)]
                server_errors = [torch.zeros(padded // world, dtype=torch.float64) for _ in range(world)]
            local = [BETAS[0] * m + (1 - BETAS[0]) * g for g in grads]
            m = compressed_allreduce_reference(local, worker_errors, server_errors)
        w = w - LR * (m / (v.sqrt() + EPS) + WD * w)
        torch.nn.utils.vector_to_parameters(w, params)
    return losses


# -- what the ranks run -------------------------------------------------------------------------
def engine_steps(config: dict, steps: int = STEPS) -> dict:
    import engine

    model = make_model()
    eng, _, _, _ = engine.initialize(model=model, config=copy.deepcopy(config))
    losses, per_step = ledgered_steps(eng, train_steps, steps)
    return {"losses": losses, "bytes": per_step, "params": sum(p.numel() for p in model.parameters())}


def both_runs() -> dict:
    return {"onebit": engine_steps(onebit_config()), "adam": engine_steps(adam_config())}


@functools.lru_cache(maxsize=None)
def results(world: int) -> dict:
    return run_distributed(both_runs, world, timeout=400)[0]


@pytest.mark.parametrize("world", [2, 4])
def test_onebit_adam_follows_deepspeeds_algorithm(world):
    """Warm-up steps match to rounding; once compressed, an element whose compensated momentum sits
    at zero may take the other sign in fp32 than in float64 (a jump of 2 x scale that error
    feedback then carries), so the curves agree to about 1e-3 over the 20 steps (measured:
    at most 1.3e-3 at 2 ranks)."""
    got = results(world)["onebit"]["losses"]
    want = onebit_reference(world)
    gaps = [abs(a - b) / abs(b) for a, b in zip(got, want)]
    assert max(gaps[:FREEZE + 1]) < 1e-6, gaps
    assert max(gaps) < 5e-3, f"1-bit Adam's losses differ from the float64 reference by {max(gaps):.2e} (relative)"


def allreduce_rounds(rounds: int, numel: int) -> list[torch.Tensor]:
    from engine.comm import Comm
    from engine.onebit import CompressedAllReduce

    import torch.distributed as dist

    reducer = CompressedAllReduce(Comm(), numel, torch.device("cpu"))
    out = []
    for i in range(rounds):
        x = torch.randn(numel, generator=torch.Generator().manual_seed(100 * i + dist.get_rank()))
        out.append(reducer(x).clone())
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_compressed_allreduce_equals_deepspeeds_arithmetic(world):
    """Five rounds with error feedback, every rank's result against the float64 reference."""
    numel = 1000   # not a multiple of world x lcm(world, 8): the padding path runs
    per_rank = run_distributed(allreduce_rounds, world, 5, numel)
    worker_errors = server_errors = None
    for i in range(5):
        inputs = [torch.randn(numel, generator=torch.Generator().manual_seed(100 * i + r)).double()
                  for r in range(world)]
        if worker_errors is None:
            unit = world * (world * 8 // math.gcd(world, 8))
            padded = -(-numel // unit) * unit
            worker_errors = [torch.zeros(padded, dtype=torch.float64) for _ in range(world)]
            server_errors = [torch.zeros(padded // world, dtype=torch.float64) for _ in range(world)]
        want = compressed_allreduce_reference(inputs, worker_errors, server_errors)
        for r in range(world):
            got = per_rank[r][i].double()
            assert torch.equal(per_rank[r][i], per_rank[0][i])          # every rank holds the same result
            close = torch.isclose(got, want, rtol=1e-5, atol=1e-6)
            assert close.float().mean() >= 0.995, (i, r, (got - want).abs().max())


@pytest.mark.parametrize("world", [2, 4])
def test_momentum_exchange_moves_a_sixteenth_of_adams_bytes_after_warmup(world):
    run = results(world)
    onebit, adam = run["onebit"]["bytes"], run["adam"]["bytes"]
    after = onebit[max(FREEZE, 2):]               # compressed steps
    assert max(after) * 16 <= min(adam[1:]), (after, adam)
    assert onebit[1] >= 0.9 * adam[1]             # warm-up: a plain gradient all-reduce


def ledger_at_fake_world(world: int, numel: int) -> tuple[int, int]:
    """(compressed all-reduce, fp32 all-reduce) bytes sent per rank under a fake process group."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from engine.comm import Comm
    from engine.comm_ledger import CommLedger
    from engine.onebit import CompressedAllReduce

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        book = CommLedger()
        comm = Comm(book=book)
        CompressedAllReduce(comm, numel, torch.device("cpu"), impl="torch")(torch.randn(numel))
        compressed = book.totals()["bytes_sent"]
        book.reset()
        comm.all_reduce(torch.zeros(numel))
        return compressed, book.totals()["bytes_sent"]
    finally:
        dist.destroy_process_group()


def test_fake_world_64_moves_a_sixteenth_of_the_bytes():
    compressed, plain = run_distributed(ledger_at_fake_world, 1, 64, 1 << 20, init=False)[0]
    assert compressed * 16 <= plain, (compressed, plain)
    assert compressed * 40 >= plain             # and it is the bits that move: about 1/32


def refused_with_zero(stage: int) -> str:
    import engine
    from engine.config import ConfigError

    cfg = onebit_config()
    cfg["zero_optimization"] = {"stage": stage}
    try:
        engine.initialize(model=make_model(), config=cfg)
    except ConfigError as exc:
        return str(exc)
    return "accepted"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_are_refused_as_deepspeed_does(stage):
    message = run_distributed(refused_with_zero, 1, stage)[0]
    assert "optimizer.type" in message and "ZeRO" in message and "1bit-Adam is not compatible with ZeRO" in message


def low_precision_runs() -> dict:
    import torch.distributed as dist

    import engine
    from engine.comm import Comm

    out = {}
    for precision in ("bf16", "fp16"):
        cfg = onebit_config(freeze_step=3)
        cfg[precision] = {"enabled": True, **({"initial_scale_power": 8} if precision == "fp16" else {})}
        model = make_model()
        eng, _, _, _ = engine.initialize(model=model, config=cfg)
        losses = train_steps(eng, 0, 10)
        flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
        gathered = torch.empty(dist.get_world_size() * flat.numel())
        Comm().all_gather_into(gathered, flat)
        same = all(torch.equal(chunk, flat) for chunk in gathered.view(dist.get_world_size(), -1))
        out[precision] = {"losses": losses, "same_weights": same, "skipped": eng.skipped_steps}
    return out


def test_onebit_adam_under_bf16_and_fp16_keeps_every_rank_in_step():
    runs = run_distributed(low_precision_runs, 2, timeout=400)[0]
    for precision, run in runs.items():
        assert all(math.isfinite(x) for x in run["losses"]), (precision, run["losses"])
        assert run["same_weights"], f"{precision}: ranks' weights differ after compressed steps"
        assert max(run["losses"]) < run["losses"][0] + 0.2, (precision, run["losses"])   # no divergence
