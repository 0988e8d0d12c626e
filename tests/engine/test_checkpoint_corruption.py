"""Damaged checkpoints and user mistakes: every error names the file or key, and says what to do.

A user's session in one process: train, save twice, damage the newest checkpoint the ways disks
and people do (a flipped byte, a deleted shard, a truncated manifest or shard), and try to
resume. Loading must refuse and name the damaged file, fall back to the previous checkpoint only
when asked, and ``orch ckpt verify`` / ``ls`` must point at the same file.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.checkpoint.manifest import CheckpointError
from orchestrator.cli import app
from tests.checkpoint_cases import Sampler, build, train
from tests.cli_process import run_orch

runner = CliRunner()


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """Checkpoints step-2 and step-4 of a small ZeRO-2 bf16 run."""
    eng = build(2, "bf16")
    sampler = Sampler()
    for _ in range(2):
        train(eng, sampler, 2)
        eng.save_checkpoint(tmp_path, client_state={"sampler": sampler.state_dict()})
    assert (tmp_path / "latest").read_text() == "step-4"
    return tmp_path


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def resume(root: Path, **kwargs) -> tuple:
    return build(2, "bf16", seed=7).load_checkpoint(root, **kwargs)


def test_a_flipped_byte_is_named_and_the_previous_checkpoint_loads_only_when_asked(run: Path) -> None:
    shard = run / "step-4" / "optim-rank-00000.safetensors"
    flip_byte(shard)
    with pytest.raises(CheckpointError, match="optim-rank-00000.safetensors fails its xxh3_128 check") as err:
        resume(run)
    assert "fallback_to_previous=True" in str(err.value)

    eng = build(2, "bf16", seed=7)
    with pytest.warns(UserWarning, match="optim-rank-00000.safetensors"):
        path, client_state = eng.load_checkpoint(run, fallback_to_previous=True)
    assert Path(path).name == "step-2" and eng.global_steps == 2 and client_state["sampler"]["position"] == 2

    verify = runner.invoke(app, ["ckpt", "verify", str(run)])
    assert verify.exit_code == 1
    assert "CORRUPT" in verify.output and "optim-rank-00000.safetensors fails its xxh3_128" in verify.output
    assert "ok" in verify.output and "step-2" in verify.output


def test_weights_only_loading_does_not_need_the_optimizer_shards(run: Path) -> None:
    flip_byte(run / "step-4" / "optim-rank-00000.safetensors")
    eng = build(2, "bf16", seed=7)
    path, _ = eng.load_checkpoint(run, load_optimizer_states=False)
    assert Path(path).name == "step-4"
    assert eng.optimizer.optimizer.state == {} or all(
        not st for st in eng.optimizer.optimizer.state.values())   # fresh optimizer, trained weights


def test_a_deleted_shard_is_named(run: Path) -> None:
    (run / "step-4" / "master-rank-00000.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"step-4/master-rank-00000.safetensors is missing"):
        resume(run)


def test_a_truncated_shard_is_named(run: Path) -> None:
    shard = run / "step-4" / "master-rank-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"master-rank-00000.safetensors has 100 bytes"):
        resume(run)


def test_a_truncated_manifest_is_named_and_listed_as_corrupt(run: Path) -> None:
    manifest = run / "step-4" / "manifest.json"
    manifest.write_text(manifest.read_text()[:500])
    with pytest.raises(CheckpointError, match=r"step-4/manifest.json is not valid JSON .* truncated or corrupt"):
        resume(run)
    with pytest.warns(UserWarning, match="manifest.json"):
        path, _ = resume(run, fallback_to_previous=True)
    assert Path(path).name == "step-2"

    listing = runner.invoke(app, ["ckpt", "ls", str(run)])
    assert listing.exit_code == 0, listing.output
    rows = {line.split()[1]: line for line in listing.output.splitlines() if "step-" in line}
    assert "corrupt" in rows["step-4"] and "latest" in rows["step-4"]
    assert "complete" in rows["step-2"] and " 2 " in rows["step-2"]


def test_an_interrupted_save_is_listed_incomplete_ignored_and_cleaned(run: Path) -> None:
    partial = run / "step-6.tmp"
    partial.mkdir()
    (partial / ".orch-partial").touch()
    (partial / "master-rank-00000.safetensors").write_bytes(b"half a shard")
    listing = runner.invoke(app, ["ckpt", "ls", str(run)])
    assert "incomplete" in listing.output and "step-6.tmp" in listing.output
    eng = build(2, "bf16", seed=7)
    path, _ = eng.load_checkpoint(run)
    assert Path(path).name == "step-4"
    eng.save_checkpoint(run, tag="step-6")
    assert not partial.exists() and (run / "latest").read_text() == "step-6"


def test_loading_into_another_model_or_optimizer_says_what_differs(run: Path, tmp_path: Path) -> None:
    import engine
    from tests.checkpoint_cases import ds_config, make_net, with_checkpoints

    wider = make_net(seed=1, hidden=30)
    eng, _, _, _ = engine.initialize(model=wider, config=ds_config(2, 1, "bf16"))
    with pytest.raises(CheckpointError, match=r"parameter shapes differ: .*up.weight \(checkpoint \[21, 12\], "
                                              r"model \[30, 12\]\)"):
        with_checkpoints(eng).load_checkpoint(run)

    config = ds_config(2, 1, "bf16")
    config["optimizer"] = {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}
    sgd = with_checkpoints(engine.initialize(model=make_net(seed=1), config=config)[0])
    with pytest.raises(CheckpointError, match="holds FusedAdamW optimizer states .* load_optimizer_states=False"):
        sgd.load_checkpoint(run)
    path, _ = sgd.load_checkpoint(run, load_optimizer_states=False)
    assert Path(path).name == "step-4"


def test_no_latest_returns_none_and_bad_tags_are_refused(tmp_path: Path) -> None:
    eng = build(1)
    with pytest.warns(UserWarning, match="no checkpoint to load"):
        assert eng.load_checkpoint(tmp_path) == (None, None)
    with pytest.raises(CheckpointError, match="cannot be used as a directory name"):
        eng.save_checkpoint(tmp_path, tag="runs/1")
    with pytest.raises(CheckpointError, match="client_state cannot be stored safely"):
        eng.save_checkpoint(tmp_path, client_state={"args": object()})
    assert not any(tmp_path.iterdir())   # refused saves leave nothing behind
    result = runner.invoke(app, ["ckpt", "verify", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_ckpt_ls_and_verify_run_without_importing_torch(run: Path) -> None:
    for command in ("ls", "verify"):
        result = run_orch("ckpt", command, str(run))
        assert result.returncode == 0, result.stderr
        assert "step-4" in result.stdout


def test_a_grown_model_loads_non_strictly_keeping_its_new_parameters(run: Path) -> None:
    import engine
    import torch
    from torch import nn

    from tests.checkpoint_cases import CkptNet, ds_config, with_checkpoints

    class Grown(CkptNet):
        def __init__(self) -> None:
            super().__init__()
            self.adapter = nn.Linear(3, 3)

    torch.manual_seed(3)
    model = Grown()
    fresh_adapter = model.adapter.weight.detach().clone()
    eng = with_checkpoints(engine.initialize(model=model, config=ds_config(2, 1, "bf16"))[0])
    with pytest.raises(CheckpointError, match=r"missing \['adapter.bias', 'adapter.weight'\]"):
        eng.load_checkpoint(run, load_optimizer_states=False)
    eng.load_checkpoint(run, load_module_strict=False, load_optimizer_states=False)
    reference = build(2, "bf16", seed=7)
    reference.load_checkpoint(run)
    assert torch.equal(model.up.weight, reference.module.up.weight)
    assert torch.equal(model.adapter.weight, fresh_adapter.to(model.adapter.weight.dtype))
