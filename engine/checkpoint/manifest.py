"""The checkpoint format: file names, the manifest, checksums, and which checkpoints are complete.

No torch here: ``orch ckpt ls`` and ``orch ckpt verify`` use this module alone.

``manifest.json`` (format ``orch-checkpoint``, version 2) is the one file that describes a
checkpoint. It is written last, so a directory with a valid manifest is complete. Keys:

* ``tag``, ``global_step``, ``created_at``, ``world_size``, ``zero_stage``, ``partition_count``
  (ranks that own a slice of the master weights: the world size at stages 1-2, 1 at stage 0);
* ``dtype_policy``: ``{"name": "bf16", "model_dtype": "bfloat16", "master_dtype": "float32"}``;
* ``params``: per trainable parameter, in layout order, ``name`` (the plain model's state_dict
  key), ``shape``, ``dtype`` (model side), ``numel``, ``group`` and ``ranges``: the
  ``[rank, offset, length]`` runs of that rank's flat partition that hold the parameter's
  flattened elements, in order. Every per-element state (master weights, ``exp_avg``, ...) of
  rank ``r`` uses the same offsets in rank ``r``'s files. ``aliases`` maps tied names to the
  name that holds the data; ``extras`` lists buffers and frozen parameters (``extra.safetensors``);
* ``files``: per file, ``rank``, ``kind``, ``bytes``, the checksum and ``tensors``
  (``{name: {"dtype", "shape", "offset"}}``, ``offset`` in bytes from the start of the file).
  The checksum (version 2) is ``hash`` (the algorithm: ``xxh3_128`` or ``sha256``),
  ``hash_block`` and ``digest``: the block-tree digest of engine/io/hashing.py. Version 1
  manifests recorded ``sha256``, a flat sha256 of the file; both are read;
  ``shards``: ``{"master": [file per rank], "optimizer": [...]}`` (null where a rank wrote none);
* ``optimizer`` (class, per-element ``state_keys``, per group ``hyper`` and ``scalars``),
  ``loss_scaler``, ``lr_scheduler``, ``counters``, ``client_state``, ``rng`` (one entry per
  rank), ``dataloader`` (per rank, when the engine's loader is Stateful), ``layout`` (the
  engine's FlatLayout). A value that is not plain JSON is stored in ``objects.pt`` and the
  manifest holds ``{"$object": key}`` in its place.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from ..errors import UserError
from ..io import TreeHash, VerifiedRead, hash_file, read_verified, start_read_verified

__all__ = [
    "CheckpointEntry", "CheckpointError", "EXTRA_FILE", "FORMAT", "FORMAT_VERSION", "LATEST", "MANIFEST",
    "OBJECTS_FILE", "PendingCheck", "TMP_SUFFIX", "file_problem", "list_checkpoints", "master_file", "optim_file",
    "read_latest", "read_manifest", "read_verified_file", "resolve_checkpoint", "sha256_file", "shard_files",
    "start_verified_read", "validate_tag",
]

FORMAT = "orch-checkpoint"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
LATEST = "latest"
TMP_SUFFIX = ".tmp"          # directories being written (or being deleted) end with it
EXTRA_FILE = "extra.safetensors"
OBJECTS_FILE = "objects.pt"
PARTIAL_MARKER = ".orch-partial"   # inside a directory this package may delete when left over
_CHUNK = 8 << 20
_REQUIRED = ("tag", "global_step", "world_size", "zero_stage", "partition_count", "params", "files", "shards")
_STEP = re.compile(r"^step-(\d+)$")


class CheckpointError(UserError):
    """A checkpoint cannot be saved or loaded; the message names the file and what to do."""

    def __init__(self, message: str, path: Optional[Path | str] = None) -> None:
        super().__init__(message)
        self.path = str(path) if path is not None else None


def master_file(rank: int) -> str:
    return f"master-rank-{rank:05d}.safetensors"


def optim_file(rank: int) -> str:
    return f"optim-rank-{rank:05d}.safetensors"


def validate_tag(tag: str) -> str:
    """A tag names a directory inside the save dir: no separators, no temp suffix."""
    tag = str(tag)
    if not tag or tag in (".", "..") or "/" in tag or "\\" in tag or tag.endswith(TMP_SUFFIX) or tag == LATEST:
        raise CheckpointError(f"checkpoint tag {tag!r} cannot be used as a directory name: use letters, digits, "
                              f"'-', '_' or '.', not '/', and not ending in {TMP_SUFFIX!r} or named {LATEST!r}")
    return tag


def read_latest(save_dir: Path) -> Optional[str]:
    """The tag ``<save_dir>/latest`` names, or None when there is no such file."""
    try:
        tag = (Path(save_dir) / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"cannot read {Path(save_dir) / LATEST}: {exc}", Path(save_dir) / LATEST) from exc
    return tag or None


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    """Parse and check ``<ckpt_dir>/manifest.json``; every problem names the file."""
    path = Path(ckpt_dir) / MANIFEST
    if not Path(ckpt_dir).is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist", ckpt_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the save did not finish, or {ckpt_dir} is not an orch "
                              "checkpoint", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}", path) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): "
                              "the file is truncated or corrupt", path) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an orch checkpoint manifest (format {data.get('format')!r} "
                              f"if a JSON object, expected {FORMAT!r})" if isinstance(data, dict) else
                              f"{path} is not an orch checkpoint manifest (not a JSON object)", path)
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {version!r}; this engine reads up to "
                              f"{FORMAT_VERSION}: upgrade orch to load it", path)
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: the manifest is corrupt", path)
    _check_params(data, path)
    return data


def _check_params(data: Mapping[str, Any], path: Path) -> None:
    """Ranges must add up to each parameter and point into files the manifest lists; file names
    must stay inside the checkpoint directory."""
    names = list(data["files"]) + [n for kind in data["shards"].values() for n in kind if n]
    outside = [n for n in names if not isinstance(n, str) or "/" in n or "\\" in n or n.startswith(".")]
    if outside:
        raise CheckpointError(f"{path} names files outside the checkpoint ({outside[:3]}): the manifest is corrupt",
                              path)
    shards = data["shards"].get("master", [])
    for p in data["params"]:
        try:
            total = sum(int(n) for _, _, n in p["ranges"])
            bad_rank = next((r for r, _, _ in p["ranges"] if not (0 <= r < len(shards)) or shards[r] is None), None)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: parameter entry {p!r:.80} is malformed: the manifest is corrupt",
                                  path) from None
        if total != p["numel"] or bad_rank is not None:
            raise CheckpointError(f"{path}: the ranges of parameter {p['name']!r} do not match its size or name a "
                                  "rank without a shard: the manifest is corrupt", path)


def sha256_file(path: Path) -> tuple[int, str]:
    """(size in bytes, hex sha256) of a file, read in chunks (constant memory); reading and
    hashing overlap (hashlib releases the GIL), so this runs at the speed of the slower of the two."""
    h = hashlib.sha256()
    size = 0
    buffers = [memoryview(bytearray(_CHUNK)), memoryview(bytearray(_CHUNK))]
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(1, thread_name_prefix="sha256") as pool:
        pending = None
        for turn in itertools.count():
            buf = buffers[turn % 2]      # read into one buffer while the other is being hashed
            n = f.readinto(buf)
            if pending is not None:
                pending.result()
            if not n:
                break
            pending = pool.submit(h.update, buf[:n])
            size += n
    return size, h.hexdigest()


def file_problem(ckpt_dir: Path, name: str, record: Mapping[str, Any], keep_in_cache: bool = False) -> Optional[str]:
    """None when ``name`` has the size and checksum the manifest records, else what is wrong.
    ``keep_in_cache``: the caller reads the file next (see ``engine.io.hash_file``)."""
    def measure(path: Path, hasher: TreeHash) -> tuple[int, str, None]:
        return (*hash_file(path, hasher, keep_in_cache=keep_in_cache), None)

    return _checked(Path(ckpt_dir) / name, record, measure)[0]


def read_verified_file(ckpt_dir: Path, name: str, record: Mapping[str, Any]) -> tuple[Optional[str], Any]:
    """``(problem, bytes)``: the whole file in one aligned uint8 tensor, read once and verified on
    the way (``engine.io.read_verified``); ``bytes`` is None when there is a problem, and for
    format-1 (flat sha256) records, which are only checked."""
    problem, data = _checked(Path(ckpt_dir) / name, record, read_verified)
    return problem, (data if problem is None else None)


def start_verified_read(ckpt_dir: Path, name: str, record: Mapping[str, Any]) -> "PendingCheck":
    """``read_verified_file`` submitted to the I/O threads now; ``.result()`` waits for it."""
    path = Path(ckpt_dir) / name
    if "hash" not in record:                   # format 1 (flat sha256): checked when asked
        return PendingCheck(path, record, None, None)
    try:
        return PendingCheck(path, record, start_read_verified(path, TreeHash.of_record(dict(record))), None)
    except (OSError, KeyError, ValueError) as exc:        # reported by result(), as a direct read would be
        return PendingCheck(path, record, None, exc)


@dataclass
class PendingCheck:
    """One file's verified read in flight (``start_verified_read``)."""

    path: Path
    record: Mapping[str, Any]
    read: Optional[VerifiedRead]
    failure: Optional[BaseException]

    def result(self) -> tuple[Optional[str], Any]:
        """``(problem, bytes)`` as ``read_verified_file`` gives them."""
        if self.read is None and self.failure is None:
            return read_verified_file(self.path.parent, self.path.name, self.record)

        def measure(_path: Path, _hasher: TreeHash) -> tuple[int, str, Any]:
            if self.failure is not None:
                raise self.failure
            return self.read.wait()

        problem, data = _checked(self.path, self.record, measure)
        return problem, (data if problem is None else None)

    def cancel(self) -> None:
        """Not needed after all (another file failed): stop reading it."""
        if self.read is not None:
            self.read.cancel()


def _checked(path: Path, record: Mapping[str, Any], measure: Any) -> tuple[Optional[str], Any]:
    """``measure(path, hasher) -> (size, digest, data)`` against the record: (problem, data)."""
    data = None
    try:
        if "hash" in record:
            hasher = TreeHash.of_record(dict(record))
            size, digest, data = measure(path, hasher)
            expected, algorithm = record["digest"], hasher.algorithm
        else:                                   # format 1: a flat sha256 of the file
            size, digest = sha256_file(path)
            expected, algorithm = record["sha256"], "sha256"
    except FileNotFoundError:
        return f"{path} is missing (listed in the manifest)", None
    except (KeyError, ValueError) as exc:
        return f"the manifest's checksum record for {path} is malformed ({exc})", None
    except (OSError, EOFError) as exc:
        return f"{path} cannot be read: {exc}", None
    if size != record["bytes"]:
        return f"{path} has {size} bytes, the manifest records {record['bytes']} (truncated or overwritten)", None
    if digest != expected:
        return f"{path} fails its {algorithm} check (the file is corrupt)", None
    return None, data


@dataclass(frozen=True)
class CheckpointEntry:
    """One directory in a save dir: a complete checkpoint, or why it is not one."""

    name: str
    path: Path
    manifest: Optional[dict[str, Any]]
    problem: Optional[str]

    @property
    def complete(self) -> bool:
        return self.manifest is not None

    @property
    def in_progress(self) -> bool:
        return self.name.endswith(TMP_SUFFIX)

    @property
    def step(self) -> Optional[int]:
        if self.manifest is not None:
            return int(self.manifest["global_step"])
        m = _STEP.match(self.name.removesuffix(TMP_SUFFIX))
        return int(m.group(1)) if m else None


def list_checkpoints(save_dir: Path, include_partial: bool = True) -> list[CheckpointEntry]:
    """Every checkpoint directory under ``save_dir``, newest step first (partial ones last)."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        raise CheckpointError(f"{save_dir} is not a directory", save_dir)
    out = []
    for child in save_dir.iterdir():
        if not child.is_dir():
            continue
        if child.name.endswith(TMP_SUFFIX):
            if include_partial:
                out.append(CheckpointEntry(child.name, child, None, "incomplete (a save in progress or interrupted)"))
            continue
        if not (child / MANIFEST).exists() and not any(child.glob("*.safetensors")):
            continue  # not ours
        try:
            out.append(CheckpointEntry(child.name, child, read_manifest(child), None))
        except CheckpointError as exc:
            out.append(CheckpointEntry(child.name, child, None, str(exc)))
    return sorted(out, key=lambda e: (e.complete, e.step if e.step is not None else -1, e.name), reverse=True)


def shard_files(manifest: Mapping[str, Any], kinds: Iterable[str] = ("master", "optimizer")) -> list[str]:
    """The shard file names of ``kinds``, rank order, skipping ranks that wrote none."""
    return [name for kind in kinds for name in manifest["shards"].get(kind, []) if name]


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, given either it or a save dir whose ``latest`` names one."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    if not path.exists():
        raise CheckpointError(f"{path} does not exist", path)
    tag = read_latest(path) if path.is_dir() else None
    if tag is None:
        raise CheckpointError(f"{path} is neither a checkpoint (no {MANIFEST}) nor a save directory with a "
                              f"'{LATEST}' file", path)
    return path / tag
