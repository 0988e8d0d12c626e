"""Saving: every rank writes its own shard, rank 0 writes the manifest last, then two renames.

The protocol, and why it survives a SIGKILL at any moment:

1. rank 0 removes leftovers of interrupted saves and creates ``<tag>.tmp/``;
2. every rank writes its files there through engine.io (large aligned writes, each block hashed
   by the I/O thread that writes it, xxh3-128 unless ``checkpoint.hash`` says sha256) and fsyncs them: the
   fp32 master partition and the optimizer-state partition of the slice it owns (at stage 0
   the state is replicated, so only rank 0 writes it); rank 0 also writes buffers/frozen
   parameters (stage 3 gathers its partitioned frozen parameters for that first, one unit at a
   time) and, if needed, ``objects.pt``;
3. rank 0 collects every rank's file sizes and digests, writes ``manifest.json``, fsyncs it
   and the directory, and renames ``<tag>.tmp`` to ``<tag>`` (an atomic step);
4. rank 0 replaces ``latest`` by writing a temp file, fsyncing it and renaming it over
   ``latest``; only then are checkpoints beyond ``keep`` deleted.

Until step 3's rename the previous checkpoint is what ``latest`` names and it is untouched;
between 3 and 4 both are complete; after 4 the new one is ``latest``. A directory without a
manifest is never loaded, and a ``*.tmp`` directory is never mistaken for a checkpoint.

Device tensors reach the writer through one reusable pinned host arena per engine (snapshot.py),
copied without blocking and waited for once. ``save_checkpoint`` with ``async_save`` snapshots
the whole shard into the same arena and hands steps 2-4 to a background thread (async_save.py);
the next save (or load) waits for it.
"""
from __future__ import annotations

import copy
import io
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from . import fsutil
from .async_save import AsyncWriter
from .collective import Group
from .manifest import (EXTRA_FILE, FORMAT, FORMAT_VERSION, LATEST, MANIFEST, OBJECTS_FILE, TMP_SUFFIX,
                       CheckpointError, list_checkpoints, master_file, optim_file, read_latest,
                       validate_tag)
from .rng import capture_rng
from .snapshot import SnapshotArena
from .state_names import model_names
from ..io import StreamWriter, TreeHash
from .tensorfile import TensorEntry, write_tensor_files

__all__ = ["SaveJob", "finalize", "prepare", "prune", "save_checkpoint", "write_shards"]


@dataclass
class SaveJob:
    """One save as one rank sees it: what it writes and (rank 0) the manifest to finish with."""

    save_dir: Path
    tag: str
    rank: int
    world_size: int
    files: dict[str, tuple[str, list[TensorEntry]]] = field(default_factory=dict)  # name -> (kind, entries)
    objects: dict[str, Any] = field(default_factory=dict)    # rank 0: values stored in objects.pt
    header: Optional[dict[str, Any]] = None                  # rank 0: the manifest without "files"
    save_latest: bool = True
    keep: Optional[int] = None
    hasher: TreeHash = field(default_factory=TreeHash)       # checksum algorithm of every file
    ready: Optional[Callable[[], None]] = None               # async: waits for the snapshot copies

    @property
    def tmp(self) -> Path:
        return self.save_dir / f"{self.tag}{TMP_SUFFIX}"

    @property
    def final(self) -> Path:
        return self.save_dir / self.tag


def save_checkpoint(engine: Any, save_dir: str | Path, tag: Optional[str] = None,
                    client_state: Optional[Mapping[str, Any]] = None, save_latest: bool = True, *,
                    keep: Optional[int] = None, async_save: Optional[bool] = None,
                    exclude_frozen_parameters: bool = False) -> bool:
    """Save ``engine`` as ``<save_dir>/<tag>/`` (tag defaults to ``step-<global_steps>``); every rank calls it.

    ``keep``: retain only the newest ``keep`` complete checkpoints (None keeps all). ``async_save``
    (default: the ds_config's ``checkpoint.async_save``) returns once the shard is copied to CPU.
    """
    group = Group(engine.comm)
    writer = async_writer(engine)
    failed = group.first_error(writer.wait())
    if failed:
        raise CheckpointError(f"the previous asynchronous checkpoint save failed: {failed}")
    if async_save is None:
        async_save = bool(getattr(getattr(engine.config, "checkpoint", None), "async_save", False))
    if async_save and getattr(engine.optimizer, "nvme", None) is not None:
        async_save = False    # the shards are copied from the swap files, which the next step rewrites
    job = prepare(engine, Path(save_dir), tag, dict(client_state or {}), group, snapshot=async_save,
                  save_latest=save_latest, keep=keep, exclude_frozen=exclude_frozen_parameters)
    if async_save:
        writer.start(job, write_shards, finalize)
        return True
    records, error = {}, None
    try:
        records = write_shards(job)
    except Exception as exc:  # noqa: BLE001 - shared with every rank below, then raised
        error = f"rank {group.rank} could not write its shard to {job.tmp}: {exc}"
    gathered = group.all_gather((records, error))
    error = "; ".join(e for _, e in gathered if e) or None
    if error is None and group.rank == 0:
        try:
            finalize(job, {name: rec for recs, _ in gathered for name, rec in recs.items()})
        except Exception as exc:  # noqa: BLE001
            error = f"rank 0 could not complete {job.final}: {exc}"
    error = group.broadcast(error)
    if error:
        raise CheckpointError(f"checkpoint {job.tag!r} was not saved ({error}); the previous checkpoint is intact",
                              job.tmp)
    return True


def async_writer(engine: Any) -> AsyncWriter:
    """The engine's background writer (created on first use)."""
    writer = engine.__dict__.get("_checkpoint_writer")
    if writer is None:
        writer = AsyncWriter()
        engine.__dict__["_checkpoint_writer"] = writer
    return writer


# -- step 1: agree on the tag, prepare the directory, collect what to write ----------------------

def prepare(engine: Any, save_dir: Path, tag: Optional[str], client_state: dict[str, Any], group: Group, *,
            snapshot: bool, save_latest: bool = True, keep: Optional[int] = None,
            exclude_frozen: bool = False) -> SaveJob:
    """Collective: rank 0 creates ``<tag>.tmp``; every rank lists the tensors it will write."""
    proposed = str(tag) if tag is not None else f"step-{int(engine.global_steps)}"
    decision: tuple[str, Optional[str]] = (proposed, None)
    if group.rank == 0:
        decision = (proposed, _make_tmp_dir(save_dir, proposed, client_state))
    decision = group.broadcast(decision)
    if decision[1]:
        raise CheckpointError(decision[1], save_dir)
    job = SaveJob(save_dir, decision[0], group.rank, group.world_size, save_latest=save_latest, keep=keep,
                  hasher=checkpoint_hasher(engine))
    mine: dict[str, Any] = {"tag": proposed, "error": None}
    try:
        _collect(engine, job, client_state, snapshot, exclude_frozen)
        mine.update(rng=capture_rng(), dataloader=_dataloader_state(engine))
    except Exception as exc:  # noqa: BLE001 - shared with every rank below, then raised
        mine["error"] = f"rank {group.rank}: {exc}"
    per_rank = group.all_gather(mine)
    errors = [r["error"] for r in per_rank if r["error"]]
    if errors:
        raise CheckpointError(f"checkpoint {job.tag!r} was not saved: {'; '.join(errors)}", job.tmp)
    _check_tags(engine, [r["tag"] for r in per_rank], job.tag, group.rank)
    if job.header is not None:
        job.header["rng"] = [r["rng"] for r in per_rank]
        job.header["dataloader"] = [r["dataloader"] for r in per_rank]
    return job


def _collect(engine: Any, job: SaveJob, client_state: dict[str, Any], snapshot: bool, exclude_frozen: bool) -> None:
    """What this rank writes (copied to CPU when ``snapshot``), and on rank 0 the manifest draft."""
    opt = engine.optimizer
    names = model_names(engine.module, opt.params, [p.name for p in opt.layout.params])
    whole = _gather_partitioned_frozen(opt, exclude_frozen)   # first: a collective on every rank
    keys, groups = _optimizer_state(opt)
    job.files = _shard_files(opt, keys, job.rank, _as_is)
    if job.rank == 0:
        extras = [(n, whole.get(id(t), t)) for n, t in names.extras
                  if not (exclude_frozen and isinstance(t, torch.nn.Parameter))]
        if extras:
            entries = [TensorEntry(n, _dtype(t), tuple(t.shape), [_as_is(t)]) for n, t in extras]
            job.files[EXTRA_FILE] = ("extra", entries)
        job.header = _header(engine, job, names, extras, keys, groups, client_state, snapshot)
    job.ready = stage_host_copies(engine, job.files, snapshot)


_DEFERRABLE = ("master", "optimizer")   # never written by forward/backward (snapshot.py says why)


def stage_host_copies(engine: Any, files: Mapping[str, tuple[str, list[TensorEntry]]],
                      snapshot: bool) -> Optional[Callable[[], None]]:
    """Put the tensors the writer reads into the engine's reused host arena (snapshot.py): every
    tensor of an asynchronous save, the device tensors of a synchronous one (non-blocking copies
    into pinned memory; a synchronous save reads CPU tensors in place). Returns what the writer
    calls before it reads: one wait for all the copies (None when nothing was staged)."""
    staged = [(kind, entry) for kind, entries in files.values() for entry in entries
              if any(_staged(c, snapshot) for c in entry.chunks)]
    if not staged:
        return None
    arena = snapshot_arena(engine)
    arena.reserve([c for _, entry in staged for c in entry.chunks if _staged(c, snapshot)])
    for kind, entry in staged:
        deferred = snapshot and kind in _DEFERRABLE
        entry.chunks = [arena.copy(c, deferred=deferred) if _staged(c, snapshot) else c for c in entry.chunks]
    arena.start(engine.optimizer.optimizer)
    return arena.wait


def _staged(chunk: Any, snapshot: bool) -> bool:
    return torch.is_tensor(chunk) and (snapshot or chunk.device.type != "cpu")


def snapshot_arena(engine: Any) -> SnapshotArena:
    """The engine's reusable host arena (every save, synchronous or not), reset for a new save
    (the previous one was waited for)."""
    arena = engine.__dict__.get("_checkpoint_arena")
    if arena is None:
        arena = engine.__dict__["_checkpoint_arena"] = SnapshotArena()
    arena.reset()
    return arena


def checkpoint_hasher(engine: Any) -> TreeHash:
    """The ds_config's ``checkpoint.hash`` (``xxh3_128`` unless set to ``sha256``)."""
    algorithm = getattr(getattr(engine.config, "checkpoint", None), "hash", None)
    return TreeHash(str(algorithm)) if algorithm else TreeHash()


def _gather_partitioned_frozen(opt: Any, exclude_frozen: bool) -> dict[int, torch.Tensor]:
    """Stage 3 partitions frozen parameters; rank 0 gets them whole (``id(param) -> host tensor``)
    to write among the extras, as every other stage does. Every rank must call it."""
    frozen = getattr(opt, "frozen_shares", None)
    if frozen is None or exclude_frozen:
        return {}
    return frozen.gather(rank0_only=True)


def _make_tmp_dir(save_dir: Path, tag: str, client_state: Mapping[str, Any]) -> Optional[str]:
    """Rank 0's part of step 1; returns a message for the user instead of raising (shared first)."""
    try:
        validate_tag(tag)
        _check_plain(client_state)
        save_dir.mkdir(parents=True, exist_ok=True)
        fsutil.remove_leftovers(save_dir)
        tmp = save_dir / f"{tag}{TMP_SUFFIX}"
        if tmp.exists():
            return f"{tmp} exists and was not made by a checkpoint save: move it away"
        fsutil.make_partial_dir(tmp)
    except CheckpointError as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot prepare checkpoint directory {save_dir}: {exc}"
    return None


def _check_tags(engine: Any, tags: list[str], agreed: str, rank: int) -> None:
    """DeepSpeed's ``checkpoint.tag_validation``: every rank should pass the same tag (rank 0's is used)."""
    differing = {r: t for r, t in enumerate(tags) if t != agreed}
    if not differing:
        return
    mode = str(getattr(getattr(engine.config, "checkpoint", None), "tag_validation", "Warn")).lower()
    message = f"checkpoint tags differ between ranks: rank 0 has {agreed!r}, others {differing}"
    if mode == "fail":   # decided from gathered tags, so every rank raises together
        raise CheckpointError(message + " (checkpoint.tag_validation is Fail)")
    if mode == "warn" and rank == 0:
        warnings.warn(message + "; rank 0's tag is used", stacklevel=3)


def _as_is(t: torch.Tensor) -> torch.Tensor:
    return t.detach()


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _optimizer_state(opt: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """Per-element state keys (sorted), and per group the hyperparameters and scalar states."""
    if getattr(opt, "nvme", None) is not None:
        return _nvme_optimizer_state(opt)
    keys: set[str] = set()
    groups = []
    for mp, pg in zip(opt.master_params, opt.optimizer.param_groups):
        scalars = {}
        for key, value in opt.optimizer.state.get(mp, {}).items():
            if torch.is_tensor(value) and value.dim() >= 1 and value.numel() == mp.numel():
                keys.add(key)
            elif torch.is_tensor(value) and value.numel() == 1:
                scalars[key] = {"value": value.item(), "tensor": True, "dtype": _dtype(value)}
            elif isinstance(value, (int, float, bool)) or value is None:
                scalars[key] = {"value": value, "tensor": False}
            else:
                raise CheckpointError(f"optimizer state {key!r} of {type(opt.optimizer).__name__} is a "
                                      f"{type(value).__name__}, which checkpoints cannot store")
        groups.append({"hyper": _hyper(pg), "scalars": scalars})
    return sorted(keys), groups


def _nvme_optimizer_state(opt: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """``_optimizer_state`` of an NVMe-offloaded optimizer: the keys and scalars its swap keeps."""
    groups = []
    for scalars, pg in zip(opt.nvme.scalars, opt.optimizer.param_groups):
        out = {}
        for key, value in scalars.items():
            out[key] = ({"value": value.item(), "tensor": True, "dtype": _dtype(value)} if torch.is_tensor(value)
                        else {"value": value, "tensor": False})
        groups.append({"hyper": _hyper(pg), "scalars": out})
    return opt.nvme.state_keys, groups


def _hyper(param_group: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in param_group.items():
        if key == "params":
            continue
        if torch.is_tensor(value) and value.numel() == 1:
            value = value.item()
        elif isinstance(value, tuple):
            value = list(value)
        if _json_roundtrips(value):
            out[key] = value
    return out


def _shard_files(opt: Any, keys: list[str], rank: int, copy_: Any) -> dict[str, tuple[str, list[TensorEntry]]]:
    """This rank's master and optimizer-state files (none for ranks > 0 at stage 0)."""
    layout = opt.layout
    if layout.partition_count == 1 and rank != 0:
        return {}
    owner = rank if layout.partition_count > 1 else 0
    size = (layout.partition_numel,)
    if getattr(opt, "nvme", None) is not None:     # straight from the swap files, no copy in memory
        files = {master_file(owner): ("master", [TensorEntry("master", "float32", size,
                                                             opt.nvme.file_ranges("master"))])}
        if keys:
            files[optim_file(owner)] = ("optimizer", [
                TensorEntry(k, _dtype_name(opt.nvme.state_dtype(k)), size, opt.nvme.file_ranges(k)) for k in keys])
        return files
    files = {master_file(owner): ("master", [TensorEntry("master", "float32", size,
                                                         [copy_(mp.reshape(-1)) for mp in opt.master_params])])}
    if keys:
        entries = []
        for key in keys:
            chunks = []
            for mp in opt.master_params:
                value = opt.optimizer.state.get(mp, {}).get(key)
                chunks.append(copy_(value.reshape(-1)) if torch.is_tensor(value)
                              else torch.zeros(mp.numel(), dtype=mp.dtype))
            dtypes = {_dtype(c) for c in chunks}
            if len(dtypes) != 1:
                raise CheckpointError(f"optimizer state {key!r} has different dtypes across groups: {sorted(dtypes)}")
            entries.append(TensorEntry(key, dtypes.pop(), size, chunks))
        files[optim_file(owner)] = ("optimizer", entries)
    return files


def _dataloader_state(engine: Any) -> Any:
    loader = getattr(engine, "training_dataloader", None)
    if loader is None or not callable(getattr(loader, "state_dict", None)):
        return None
    state = loader.state_dict()
    return state if _json_roundtrips(state) else None


def _header(engine: Any, job: SaveJob, names: Any, extras: list[tuple[str, torch.Tensor]], keys: list[str],
            groups: list[dict[str, Any]], client_state: dict[str, Any], snapshot: bool) -> dict[str, Any]:
    """Rank 0: the manifest but the file records and per-rank RNG (manifest.py documents every key)."""
    opt = engine.optimizer
    layout = opt.layout
    count = layout.partition_count
    precision = engine.precision
    scheduler = getattr(engine, "lr_scheduler", None)
    counters = engine.counters.state_dict() if hasattr(engine, "counters") else {"global_steps": engine.global_steps}
    objects: dict[str, Any] = {}

    def plain(key: str, value: Any) -> Any:
        if _json_roundtrips(value):
            return copy.deepcopy(value)
        objects[key] = copy.deepcopy(value) if snapshot else value
        return {"$object": key}

    job.objects = objects
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tag": job.tag,
        "global_step": int(engine.global_steps), "created_at": time.time(),
        "world_size": job.world_size, "zero_stage": int(opt.stage), "partition_count": count,
        "dtype_policy": {"name": precision.name, "model_dtype": _dtype_name(precision.model_dtype),
                         "master_dtype": _dtype_name(precision.master_dtype)},
        "params": [{"name": name, "shape": list(e.shape), "dtype": e.dtype, "numel": e.numel, "group": e.group,
                    "ranges": _ranges(layout, i)} for i, (name, e) in enumerate(zip(names.params, layout.params))],
        "aliases": names.aliases,
        "extras": [{"name": n, "shape": list(t.shape), "dtype": _dtype(t)} for n, t in extras],
        "state_dict_keys": [k for k in names.keys if k in set(names.params) | set(names.aliases)
                            | {n for n, _ in extras}],
        "shards": {"master": [master_file(r) if count > 1 or r == 0 else None for r in range(job.world_size)],
                   "optimizer": [optim_file(r) if keys and (count > 1 or r == 0) else None
                                 for r in range(job.world_size)]},
        "optimizer": {"class": type(opt.optimizer).__name__, "state_keys": keys, "groups": groups},
        "loss_scaler": opt.loss_scaler.state_dict(),
        "lr_scheduler": plain("lr_scheduler", scheduler.state_dict()) if hasattr(scheduler, "state_dict") else None,
        "counters": counters,
        "client_state": plain("client_state", client_state),
        "rng": [], "dataloader": [],          # filled from every rank by prepare()
        "layout": layout.to_dict(),
        "torch_version": torch.__version__,
    }
    return header


def _ranges(layout: Any, index: int) -> list[list[int]]:
    """``[rank, local offset, length]`` runs holding parameter ``index``'s elements, in element order."""
    return [[rank, local, length] for rank, local, _, length in layout.param_runs(index)]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _json_roundtrips(value: Any) -> bool:
    try:
        return json.loads(json.dumps(value, allow_nan=False)) == value
    except (TypeError, ValueError):
        return False


def _check_plain(client_state: Mapping[str, Any]) -> None:
    """client_state must load back with ``torch.load(weights_only=True)``: plain data and tensors."""
    if _json_roundtrips(dict(client_state)):
        return
    buf = io.BytesIO()
    try:
        torch.save(dict(client_state), buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the message names the culprit
        raise CheckpointError(
            f"client_state cannot be stored safely ({str(exc).splitlines()[0]}): keep it to dicts, lists, numbers, "
            "strings and tensors (e.g. vars(args) instead of an argparse.Namespace)") from None


# -- step 2: write this rank's files ------------------------------------------------------------

def write_shards(job: SaveJob) -> dict[str, dict[str, Any]]:
    """Write and fsync this rank's files into ``<tag>.tmp``; returns their manifest records."""
    if job.ready is not None:
        job.ready()
    files = [(job.tmp / name, entries, {"format": "pt", "producer": "orch", "kind": kind, "rank": str(job.rank)})
             for name, (kind, entries) in job.files.items()]
    records = {name: record | {"rank": job.rank, "kind": kind} for (name, (kind, _)), record
               in zip(job.files.items(), write_tensor_files(files, hasher=job.hasher))}
    if job.rank == 0 and job.objects:
        data = io.BytesIO()
        torch.save(job.objects, data)
        writer = StreamWriter(job.tmp / OBJECTS_FILE, hasher=job.hasher)
        try:
            writer.write(data.getbuffer())
            record = writer.close()
        except BaseException:
            writer.abort()
            raise
        records[OBJECTS_FILE] = record | {"tensors": {}, "rank": 0, "kind": "objects"}
    return records


# -- steps 3 and 4: manifest, renames, retention -------------------------------------------------

def finalize(job: SaveJob, records: Mapping[str, Mapping[str, Any]]) -> None:
    """Rank 0: write the manifest last, rename the directory into place, then replace ``latest``."""
    assert job.header is not None, "finalize runs on rank 0"
    manifest = dict(job.header)
    manifest["files"] = {name: dict(records[name]) for name in sorted(records)}
    missing = [n for kind in ("master", "optimizer") for n in manifest["shards"][kind] if n and n not in records]
    if missing:
        raise CheckpointError(f"shards {missing} were not written", job.tmp)
    fsutil.write_durable(job.tmp / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    fsutil.fsync_dir(job.tmp)
    fsutil.move_into_place(job.tmp, job.final)
    if job.save_latest:
        fsutil.atomic_write_text(job.save_dir / LATEST, job.tag)
    if job.keep is not None:
        prune(job.save_dir, job.keep, protect={job.tag})


def prune(save_dir: Path, keep: int, protect: set[str] = frozenset()) -> list[str]:
    """Delete complete checkpoints beyond the newest ``keep`` (never ``latest``'s or ``protect``)."""
    keep = max(1, int(keep))
    latest = read_latest(save_dir)
    complete = [e for e in list_checkpoints(save_dir, include_partial=False) if e.complete]
    doomed = [e for e in complete[keep:] if e.name != latest and e.name not in protect]
    for entry in doomed:
        fsutil.remove_dir(entry.path)
    return [e.name for e in doomed]
