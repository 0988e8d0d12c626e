"""Checkpoint checksums: xxh3-128 by default, sha256 when the ds_config asks, old sha256 checkpoints load.

A user's session: save with the default and with ``checkpoint.hash: sha256``, resume from each;
a checkpoint written by an earlier orch (manifest format 1: one flat sha256 per file) still loads
and a damaged one is still named; and the I/O layer's block digests are the same whether a file
was written with O_DIRECT or through the page cache, from tensors, bytes, reused buffers or
another file's ranges.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.checkpoint.manifest import CheckpointError
from engine.io import DirectFile, FileRange, StreamWriter, TreeHash, hash_file
from tests.checkpoint_cases import Sampler, build, differences, full_state, train
from tests.engine.test_nvme_offload import small_mount  # noqa: F401 - a fixture


def _save(root: Path, **checkpoint) -> dict:
    eng = build(2, "bf16", **checkpoint)
    sampler = Sampler()
    train(eng, sampler, 3)
    eng.save_checkpoint(root, client_state={"sampler": sampler.state_dict()})
    return full_state(eng)


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
def test_the_chosen_hash_is_recorded_verified_and_names_a_flipped_byte(algorithm: str, tmp_path: Path) -> None:
    saved = _save(tmp_path, hash=algorithm) if algorithm != "xxh3_128" else _save(tmp_path)
    manifest = json.loads((tmp_path / "step-3" / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert {rec["hash"] for rec in manifest["files"].values()} == {algorithm}
    fresh = build(2, "bf16", seed=9)
    fresh.load_checkpoint(tmp_path)
    assert differences(saved, full_state(fresh)) == []

    shard = tmp_path / "step-3" / "master-rank-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 1                                  # the last byte block, past the first hash block
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"master-rank-00000.safetensors fails its {algorithm} check"):
        build(2, "bf16", seed=9).load_checkpoint(tmp_path)


def _as_format_1(ckpt: Path) -> None:
    """Rewrite a manifest the way orch wrote it before block digests: a flat sha256 per file."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["format_version"] = 1
    for name, record in manifest["files"].items():
        for key in ("hash", "hash_block", "digest"):
            record.pop(key)
        record["sha256"] = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=1))


def test_a_format_1_sha256_checkpoint_still_loads_and_corruption_is_still_named(tmp_path: Path) -> None:
    saved = _save(tmp_path)
    _as_format_1(tmp_path / "step-3")
    fresh = build(2, "bf16", seed=9)
    path, client_state = fresh.load_checkpoint(tmp_path)
    assert Path(path).name == "step-3" and client_state["sampler"]["position"] == 3
    assert differences(saved, full_state(fresh)) == []

    shard = tmp_path / "step-3" / "optim-rank-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optim-rank-00000.safetensors fails its sha256 check"):
        build(2, "bf16", seed=9).load_checkpoint(tmp_path)


@pytest.mark.parametrize("direct", [True, False])
def test_block_digests_do_not_depend_on_how_the_bytes_arrived(direct: bool, tmp_path: Path) -> None:
    hasher = TreeHash(block=64 << 10)            # small blocks: every kind of piece crosses a boundary
    tensor = torch.arange(100_000, dtype=torch.float32)
    source = tmp_path / "source.bin"
    source.write_bytes(b"y" * 150_001)
    reused = bytearray(70_000)
    expected = bytearray(b"head" + tensor.numpy().tobytes())
    writer = StreamWriter(tmp_path / "out.bin", hasher=hasher, direct=direct)
    writer.write(b"head")
    writer.write(tensor)
    for fill in (b"a", b"b"):                     # one buffer, refilled: must be copied at once
        reused[:] = fill * len(reused)
        writer.write(memoryview(reused), reused=True)
        expected += fill * len(reused)
    with DirectFile(source, "r") as f:
        writer.write(FileRange(f, 1, 150_000))
        record = writer.close()
    expected += b"y" * 150_000
    data = (tmp_path / "out.bin").read_bytes()
    assert data == bytes(expected) and record["bytes"] == len(expected)
    assert hash_file(tmp_path / "out.bin", hasher) == (len(expected), record["digest"])
    leaves = [hasher.leaf(data[i:i + hasher.block]) for i in range(0, len(data), hasher.block)]
    assert record["digest"] == hasher.root(leaves) and record["hash"] == "xxh3_128"


def test_page_aligned_memory_is_written_in_place_with_the_same_digest(tmp_path: Path) -> None:
    from engine.io import aligned_empty

    hasher = TreeHash(block=64 << 10)
    source = aligned_empty(3 * hasher.block + 1000)      # whole blocks straight from it, then the tail staged
    source.copy_(torch.randint(0, 255, (source.numel(),), dtype=torch.uint8))
    writer = StreamWriter(tmp_path / "out.bin", hasher=hasher)
    writer.write(source)
    writer.write(b"tail")
    record = writer.close()
    data = (tmp_path / "out.bin").read_bytes()
    assert data == source.numpy().tobytes() + b"tail"
    assert hash_file(tmp_path / "out.bin", hasher) == (len(data), record["digest"])


@pytest.mark.parametrize("direct", [True, False])
def test_a_reserved_write_and_a_one_pass_read_give_the_same_bytes_and_digest(direct: bool, tmp_path: Path) -> None:
    from engine.io import read_verified

    hasher = TreeHash(block=64 << 10)
    tensor = torch.arange(50_000, dtype=torch.float32)[1:]      # not page-aligned: staged
    size = 4 + (tensor.numel() * 4)
    writer = StreamWriter(tmp_path / "out.bin", hasher=hasher, direct=direct, size=size)
    writer.write(b"head")
    writer.write(tensor)
    record = writer.close()
    data = (tmp_path / "out.bin").read_bytes()
    assert data == b"head" + tensor.numpy().tobytes()         # reserved, then exactly the bytes written
    got_size, digest, buffer = read_verified(tmp_path / "out.bin", hasher)
    assert (got_size, digest) == (size, record["digest"]) == hash_file(tmp_path / "out.bin", hasher)
    assert buffer.numpy().tobytes() == data and buffer.data_ptr() % 4096 == 0


def test_a_submitted_read_gives_the_same_bytes_and_one_given_up_leaves_no_file_open(tmp_path: Path) -> None:
    import os

    from engine.io import IOPool, start_read_verified

    hasher = TreeHash(block=64 << 10)
    data = os.urandom(3 << 20) + b"tail"
    (tmp_path / "shard.bin").write_bytes(data)
    pool = IOPool(threads=2)
    def files_open_on_the_shard() -> list[str]:     # other fds may come and go (other threads, gc)
        found = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                link = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:                          # closed since the listing
                continue
            if link.endswith("shard.bin"):
                found.append(link)
        return found

    first, second = (start_read_verified(tmp_path / "shard.bin", hasher, pool) for _ in range(2))
    size, digest, buffer = first.wait()
    assert (size, digest) == hash_file(tmp_path / "shard.bin", hasher) and buffer.numpy().tobytes() == data
    second.cancel()                      # queued behind the first: most of its blocks never start
    assert files_open_on_the_shard() == []
    pool.shutdown()


def test_a_full_disk_fails_when_the_file_is_reserved_not_midway(small_mount: Any) -> None:
    disk = small_mount("1m")
    with pytest.raises(OSError, match="No space left"):
        StreamWriter(disk / "big.bin", size=4 << 20)
    assert (disk / "big.bin").stat().st_size == 0          # what the reservation took is given back


def test_a_page_aligned_tensor_after_a_header_goes_in_place_past_the_first_block(tmp_path: Path) -> None:
    from engine.io import aligned_empty

    hasher = TreeHash(block=64 << 10)
    source = aligned_empty(5 * hasher.block)                  # what an async save's arena hands the writer
    source.copy_(torch.randint(0, 255, (source.numel(),), dtype=torch.uint8))
    header = b"h" * 4096                                      # a shard's header ends on a page boundary
    writer = StreamWriter(tmp_path / "out.bin", hasher=hasher, size=len(header) + source.numel())
    writer.write(header)
    writer.write(source)                                      # staged up to the first block, then in place
    record = writer.close()
    data = (tmp_path / "out.bin").read_bytes()
    assert data == header + source.numpy().tobytes()
    assert hash_file(tmp_path / "out.bin", hasher) == (len(data), record["digest"])
