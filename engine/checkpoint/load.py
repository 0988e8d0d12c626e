"""Loading: pick the checkpoint, verify it, and reshard it onto this engine's layout.

1. Rank 0 resolves the tag (``latest`` unless one is given) and reads the manifest; every rank
   gets rank 0's answer, so all ranks load the same checkpoint or fail the same way.
2. Checksums (verify_load.py): every file is hashed by one rank and the findings are shared;
   at the saved world size a rank reads its own shards whole while hashing them. A bad or
   missing file is named; with ``fallback_to_previous`` the next older complete checkpoint is
   tried instead of failing.
3. Reshard: each rank computes (reshard.py) which runs of which saved rank's flat tensors hold
   the elements of its own new partition, and reads exactly those byte ranges with ``pread``,
   for the master weights and every optimizer state. The optimizer then publishes the new
   master partition to the model as after a step (``load_master_partition``: cast into the
   rank's slice of the parameters, then all-gathered at stages 1-2, kept partitioned at 3).
   At stages 1-2 the publish (the all-gather: a third of a checkpoint's bytes, over the network)
   runs while the I/O threads still read and verify the optimizer-state files, which are two
   thirds of the bytes; the engine's master is only replaced once they turn out intact, and if
   one does not, every rank publishes its untouched master again (``_publish_while_checking``):
   the engine is exactly as before the call and the error names the file.
4. Everything else: loss scaler, LR schedule, step counters, buffers, RNG states (rank r gets
   the state saved by rank r, or by rank r mod N when the world grew), client_state. Frozen
   parameters are whole tensors among the extras; a stage-3 engine, which partitions them,
   reads only the byte ranges of its own share of each (``_read_frozen_pieces``).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .collective import Group
from .manifest import EXTRA_FILE, OBJECTS_FILE, CheckpointError, list_checkpoints, read_latest, validate_tag
from .reshard import plan_reads, source_runs, target_pieces
from .rng import restore_rng
from .async_save import AsyncWriter
from .state_names import ModelNames, model_names, unwrap
from .stream_load import PartitionReader
from ..io import aligned_empty
from .ranged_reads import RangedReads, tensor_bytes_view
from .tensorfile import ITEMSIZE
from .verify_load import LaterChecks, open_verified

__all__ = ["load_checkpoint", "read_partition"]


def load_checkpoint(engine: Any, load_dir: str | Path, tag: Optional[str] = None, load_module_strict: bool = True,
                    load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                    load_module_only: bool = False, *,
                    fallback_to_previous: bool = False) -> tuple[Optional[str], Optional[dict[str, Any]]]:
    """Load ``<load_dir>/<tag>`` (default: what ``latest`` names) into ``engine``; every rank calls it.

    Returns ``(checkpoint path, client_state)``, or ``(None, None)`` when there is no ``latest``
    (as DeepSpeed does). Works whatever world size and ZeRO stage wrote the checkpoint.
    """
    group = Group(engine.comm)
    failed = group.first_error(AsyncWriter.wait_all())
    if failed and group.rank == 0:
        warnings.warn(f"the last asynchronous checkpoint save failed ({failed}); loading what is on disk", stacklevel=2)
    load_dir = Path(load_dir)
    answer = group.broadcast(_candidates(load_dir, tag, fallback_to_previous) if group.rank == 0 else None)
    if isinstance(answer, str):
        raise CheckpointError(answer, load_dir)
    if not answer:
        if group.rank == 0:
            warnings.warn(f"no checkpoint to load: {load_dir / 'latest'} does not exist; pass tag= to load a "
                          "specific checkpoint", stacklevel=2)
        return None, None
    with_optimizer = load_optimizer_states and not load_module_only
    opt = engine.optimizer
    later = with_optimizer and getattr(opt, "publishes_apart", lambda: False)()
    problems = []
    for name in answer:
        opened = open_verified(load_dir / name, group, with_optimizer, whole=getattr(opt, "nvme", None) is None,
                               later=later)
        problem = opened.problem
        if problem is None:
            try:
                client_state = restore(engine, load_dir / name, opened.manifest, group, strict=load_module_strict,
                                       optimizer=with_optimizer,
                                       scheduler=load_lr_scheduler_states and not load_module_only,
                                       module_only=load_module_only, preloaded=opened.preloaded,
                                       later=opened.later)
                return str(load_dir / name), client_state
            except StatesProblem as exc:        # found after the publish; the engine is as it was
                problem = exc.problem
        problems.append(problem)
        if not fallback_to_previous:
            raise CheckpointError(f"cannot load checkpoint {load_dir / name}: {problem}. Pass "
                                  "fallback_to_previous=True to load the newest intact checkpoint instead.",
                                  load_dir / name)
        if group.rank == 0:
            warnings.warn(f"checkpoint {load_dir / name} is not usable ({problem}); trying the previous one",
                          stacklevel=2)
    raise CheckpointError(f"no intact checkpoint in {load_dir}: " + "; ".join(problems), load_dir)


class StatesProblem(Exception):
    """An optimizer-state file failed its check after the new master was published (and taken back)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def _candidates(load_dir: Path, tag: Optional[str], fallback: bool) -> list[str] | str:
    """Rank 0: the tags to try in order, or an error message."""
    try:
        first = str(tag) if tag is not None else read_latest(load_dir)
        if first is not None:
            validate_tag(first)
        if not fallback:
            return [first] if first else []
        older = [e.name for e in list_checkpoints(load_dir, include_partial=False) if e.complete and e.name != first]
        return ([first] if first else []) + older
    except CheckpointError as exc:
        return str(exc)


# -- restoring ------------------------------------------------------------------------------------

def restore(engine: Any, ckpt_dir: Path, manifest: Mapping[str, Any], group: Group, *, strict: bool = True,
            optimizer: bool = True, scheduler: bool = True, module_only: bool = False,
            preloaded: Optional[Mapping[str, torch.Tensor]] = None,
            later: Optional[LaterChecks] = None) -> dict[str, Any]:
    """Put a verified checkpoint into ``engine``; returns its client_state. ``preloaded``: files
    already in memory (name -> bytes), read from there instead of the disk. ``later``: the
    optimizer files' checks, still running (``open_verified(later=True)``): the new master is
    published meanwhile, and taken back (``StatesProblem``) if they fail."""
    try:
        return _restore(engine, ckpt_dir, manifest, group, strict=strict, optimizer=optimizer, scheduler=scheduler,
                        module_only=module_only, preloaded=preloaded, later=later)
    finally:
        if later is not None:
            later.cancel()          # a no-op once finished; else nothing is left reading


def _restore(engine: Any, ckpt_dir: Path, manifest: Mapping[str, Any], group: Group, *, strict: bool,
             optimizer: bool, scheduler: bool, module_only: bool, preloaded: Optional[Mapping[str, torch.Tensor]],
             later: Optional[LaterChecks]) -> dict[str, Any]:
    opt = engine.optimizer
    names = model_names(engine.module, opt.params, [p.name for p in opt.layout.params])
    _check_compatible(manifest, names, opt, strict=strict, optimizer=optimizer, ckpt_dir=ckpt_dir)
    _check_extras(manifest, names, strict=strict, ckpt_dir=ckpt_dir)
    keys = list(manifest["optimizer"]["state_keys"]) if optimizer else []
    frozen = getattr(opt, "frozen_shares", None)      # stage 3: frozen parameters are partitioned
    owned = frozen.owned() if frozen is not None else {}
    nvme = getattr(opt, "nvme", None)      # NVMe offload: streamed into the swap files (stream_load.py)
    error = None
    try:
        buffers = (read_partition(ckpt_dir, manifest, opt, names, group.rank, [] if later else keys, preloaded)
                   if nvme is None else
                   {"reader": PartitionReader(ckpt_dir, manifest, _plan(manifest, opt, names, group.rank))})
        extras = _read_extras(ckpt_dir, manifest, skip={n for n, t in names.extras if id(t) in owned})
        pieces = _read_frozen_pieces(ckpt_dir, manifest, names, owned)
        objects = _read_objects(ckpt_dir, manifest)
    except Exception as exc:  # noqa: BLE001 - shared with every rank, then raised
        error = f"rank {group.rank}: {exc}"
    error = group.first_error(error)
    if error:
        raise CheckpointError(f"cannot read checkpoint {ckpt_dir}: {error}", ckpt_dir)
    if later is not None:
        buffers.update(_publish_while_checking(opt, ckpt_dir, manifest, names, group, keys, buffers["master"], later))
        opt.adopt_master_partition(buffers.pop("master"))
    elif nvme is None:
        opt.load_master_partition(buffers.pop("master"))   # and publishes it to the model, as a step does
    else:
        _stream_into_swap(opt, manifest, buffers.pop("reader"), names, keys, optimizer)
    _apply_extras(engine.module, extras)
    if frozen is not None:
        frozen.load(pieces)          # a collective: every rank, pieces or not
    if optimizer:
        _apply_optimizer(opt, manifest, buffers, names)
        if manifest["dtype_policy"]["name"] == engine.precision.name:
            _load_state(opt.loss_scaler, manifest["loss_scaler"], "loss scaler")
    if scheduler and manifest.get("lr_scheduler") is not None and hasattr(engine.lr_scheduler, "load_state_dict"):
        engine.lr_scheduler.load_state_dict(_resolve(manifest["lr_scheduler"], objects))
    if not module_only:
        if hasattr(engine, "counters"):
            engine.counters.load_state_dict(manifest["counters"])
        rng = manifest.get("rng") or []
        if rng:
            restore_rng(rng[group.rank % len(rng)])
        _restore_dataloader(engine, manifest, group)
    return _resolve(manifest.get("client_state", {}), objects)


def _publish_while_checking(opt: Any, ckpt_dir: Path, manifest: Mapping[str, Any], names: ModelNames, group: Group,
                            keys: list[str], master: torch.Tensor, later: LaterChecks) -> dict[str, torch.Tensor]:
    """Publish the new master to the model (the all-gather) while the I/O threads still read and
    verify the optimizer files; then this rank's partition of every state in ``keys``.

    Nothing else has changed yet and the engine's own master is untouched, so when any rank finds
    a bad file (or cannot read its states) every rank publishes the old master again, which puts
    the parameters back as they were, and the problem is raised: ``StatesProblem`` for a failed
    check (the caller may fall back to an older checkpoint), ``CheckpointError`` otherwise."""
    opt.publish_partition(master)          # the same collectives on every rank
    problem, error, states = None, None, {}
    try:
        problems, data = later.finish()
        problem = "; ".join(problems) or None
        if problem is None:
            states = read_partition(ckpt_dir, manifest, opt, names, group.rank, keys, data, master=False)
    except Exception as exc:  # noqa: BLE001 - shared with every rank, then raised
        error = f"rank {group.rank}: {exc}"
    found = group.all_gather((problem, error))
    problem, error = ("; ".join(f[i] for f in found if f[i]) or None for i in (0, 1))
    if problem or error:
        opt.publish_partition(None)        # the engine's untouched master, as before the load
        if error:
            raise CheckpointError(f"cannot read checkpoint {ckpt_dir}: {error}", ckpt_dir)
        raise StatesProblem(problem)
    return states


def _check_compatible(manifest: Mapping[str, Any], names: ModelNames, opt: Any, *, strict: bool, optimizer: bool,
                      ckpt_dir: Path) -> None:
    """Name/shape mismatches and a different optimizer are user errors, reported before any read."""
    saved = {p["name"]: p for p in manifest["params"]}
    mine = {n: e for n, e in zip(names.params, opt.layout.params)}
    wrong = [f"{n} (checkpoint {saved[n]['shape']}, model {list(e.shape)})" for n, e in mine.items()
             if n in saved and list(saved[n]["shape"]) != list(e.shape)]
    if wrong:
        raise CheckpointError(f"{ckpt_dir}: parameter shapes differ: {', '.join(wrong[:5])}; the checkpoint "
                              "belongs to another model configuration", ckpt_dir)
    missing, unexpected = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
    if strict and (missing or unexpected):
        raise CheckpointError(f"{ckpt_dir}: the checkpoint does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}; pass load_module_strict=False to load the "
                              "parameters both have", ckpt_dir)
    saved_class = manifest["optimizer"]["class"]
    if optimizer and manifest["optimizer"]["state_keys"] and saved_class != type(opt.optimizer).__name__:
        raise CheckpointError(f"{ckpt_dir} holds {saved_class} optimizer states but this engine uses "
                              f"{type(opt.optimizer).__name__}; pass load_optimizer_states=False to load the "
                              "weights only", ckpt_dir)


def _check_extras(manifest: Mapping[str, Any], names: ModelNames, *, strict: bool, ckpt_dir: Path) -> None:
    saved = {e["name"]: e for e in manifest.get("extras", [])}
    mine = {n: t for n, t in names.extras}
    shape = {n: list(getattr(t, "ds_shape", t.shape)) for n, t in mine.items()}   # ds_shape: partitioned (stage 3)
    wrong = [f"{n} (checkpoint {saved[n]['shape']}, model {shape[n]})" for n in mine
             if n in saved and list(saved[n]["shape"]) != shape[n]]
    if wrong:
        raise CheckpointError(f"{ckpt_dir}: buffer shapes differ: {', '.join(wrong[:5])}", ckpt_dir)
    missing = sorted(n for n, t in mine.items() if n not in saved and not isinstance(t, torch.nn.Parameter))
    unexpected = sorted(set(saved) - set(mine))
    if strict and (missing or unexpected):
        raise CheckpointError(f"{ckpt_dir}: the checkpoint's buffers do not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}; pass load_module_strict=False to load those both have",
                              ckpt_dir)


def read_partition(ckpt_dir: Path, manifest: Mapping[str, Any], opt: Any, names: ModelNames, rank: int,
                   keys: list[str], preloaded: Optional[Mapping[str, torch.Tensor]] = None,
                   master: bool = True) -> dict[str, torch.Tensor]:
    """This rank's new local partition of the master weights (unless ``master=False``) and of each
    state in ``keys`` (CPU).

    Only the byte ranges that hold elements of this rank's partition are read. Elements the
    checkpoint lacks (non-strict loads) keep the current master value and zero states. A tensor
    whose file is ``preloaded`` and saved with exactly this partition's layout is a view of the
    preloaded bytes (no copy); other pieces are copied from them.
    """
    preloaded = preloaded or {}
    layout = opt.layout
    reads = _plan(manifest, opt, names, rank)
    gaps = _uncovered(layout.partition_numel, reads)
    kinds = ([("master", "master")] if master else []) + [(k, "optimizer") for k in keys]
    out = {key: view for key, kind in kinds
           if (view := _identity_view(manifest, preloaded, reads, kind, key, rank, layout.partition_numel)) is not None}
    reads_for = {key: [] if key in out else reads for key, _ in kinds}
    if master and "master" not in out:
        out["master"] = _aligned_tensor(layout.partition_numel, torch.float32)
    current = opt.master_partition() if master and gaps and getattr(opt, "nvme", None) is not None else None
    for lo, hi in gaps if master else ():    # padding, and (non-strict) parameters the checkpoint lacks
        out["master"][lo:hi] = (current[lo:hi] if current is not None
                                else _current_master(opt.master_params, layout, lo, hi))
    for key in keys:
        if key not in out:
            out[key] = _aligned_tensor(layout.partition_numel, getattr(torch, _tensor_dtype(manifest, key)))
        for lo, hi in gaps:
            out[key][lo:hi] = 0
    with RangedReads(ckpt_dir, preloaded) as files:
        for key, shard_kind in kinds:
            buf = out[key]
            item = buf.element_size()
            raw = _bytes_of(buf)
            for r in reads_for[key]:
                name = manifest["shards"][shard_kind][r.rank]
                tensor = manifest["files"][name]["tensors"][key]
                if ITEMSIZE[tensor["dtype"]] != item:
                    raise CheckpointError(f"{ckpt_dir / name}: tensor {key!r} is {tensor['dtype']}, expected "
                                          f"{buf.dtype}", ckpt_dir / name)
                files.read(name, tensor["offset"] + r.src * item, raw[r.dst * item:(r.dst + r.length) * item])
    return out


def _plan(manifest: Mapping[str, Any], opt: Any, names: ModelNames, rank: int) -> list[Any]:
    """The reads that fill this rank's new local partition (reshard.py)."""
    layout = opt.layout
    owner = rank if layout.partition_count > 1 else 0
    params = [(n, e.offset, e.numel) for n, e in zip(names.params, layout.params)]
    segments = [(s.canonical_start, s.canonical_end, s.local_start) for s in layout.segments(owner)]
    return plan_reads(target_pieces(params, segments), source_runs(manifest["params"]))


def _stream_into_swap(opt: Any, manifest: Mapping[str, Any], reader: PartitionReader, names: ModelNames,
                      keys: list[str], optimizer: bool) -> None:
    """NVMe offload: master and ``keys`` go chunk by chunk into the swap files (never whole in host
    memory), with the saved scalars (``step``) when the optimizer is loaded; then published."""
    olds = _saved_groups(opt, manifest, names)
    scalars = [_scalars(old["scalars"]) if keys else {} for old in olds] if optimizer else None
    opt.nvme.load_streamed(reader.fill, ["master", *keys], scalars)
    opt._publish_params(True)


def _saved_groups(opt: Any, manifest: Mapping[str, Any], names: ModelNames) -> list[Mapping[str, Any]]:
    """Per optimizer group of this engine, the saved group its first parameter came from."""
    saved_groups = manifest["optimizer"]["groups"]
    group_of = {p["name"]: p["group"] for p in manifest["params"]}
    first_name: dict[int, str] = {}
    for name, entry in zip(names.params, opt.layout.params):
        first_name.setdefault(entry.group, name)
    return [saved_groups[min(group_of.get(first_name.get(g, ""), g), len(saved_groups) - 1)]
            for g in range(len(opt.master_params))]


def _identity_view(manifest: Mapping[str, Any], preloaded: Mapping[str, torch.Tensor], reads: list[Any], kind: str,
                   key: str, rank: int, numel: int) -> Optional[torch.Tensor]:
    """Tensor ``key`` of this rank's preloaded shard as a view, when the checkpoint's partition is
    this one element for element (same world size and layout: every read copies run r of the
    rank's own file to the same place); else None."""
    name = manifest["shards"][kind][rank] if rank < len(manifest["shards"][kind]) else None
    data = preloaded.get(name) if name else None
    if data is None or any(r.rank != rank or r.src != r.dst for r in reads):
        return None
    saved = manifest["files"][name]["tensors"].get(key)
    if saved is None or list(saved["shape"]) != [numel]:
        return None
    item = ITEMSIZE[saved["dtype"]]
    if saved["offset"] % item:
        return None
    return data[saved["offset"]:saved["offset"] + numel * item].view(getattr(torch, saved["dtype"]))


def _aligned_tensor(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An empty CPU tensor on a page boundary, so whole-page ranges are read with O_DIRECT."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return aligned_empty(numel * itemsize).view(dtype)


def _uncovered(size: int, reads: list[Any]) -> list[tuple[int, int]]:
    """The ranges of ``[0, size)`` that no read fills."""
    gaps, pos = [], 0
    for lo, hi in sorted((r.dst, r.dst + r.length) for r in reads):
        if lo > pos:
            gaps.append((pos, lo))
        pos = max(pos, hi)
    if pos < size:
        gaps.append((pos, size))
    return gaps


def _current_master(master_params: list[torch.Tensor], layout: Any, lo: int, hi: int) -> torch.Tensor:
    """Elements ``[lo, hi)`` of the engine's local master partition (spread over group slices)."""
    parts = []
    for g, mp in zip(layout.groups, master_params):
        a, b = max(lo, g.local_offset), min(hi, g.local_offset + g.partition_numel)
        if b > a:
            parts.append(mp.detach().reshape(-1)[a - g.local_offset:b - g.local_offset].float().cpu())
    return torch.cat(parts) if parts else torch.empty(0)


_bytes_of = tensor_bytes_view


def _tensor_dtype(manifest: Mapping[str, Any], key: str) -> str:
    for name in manifest["shards"]["optimizer"]:
        if name:
            return manifest["files"][name]["tensors"][key]["dtype"]
    raise CheckpointError(f"the manifest lists optimizer state {key!r} but no optimizer shard")


def _read_extras(ckpt_dir: Path, manifest: Mapping[str, Any], skip: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    if not manifest.get("extras"):
        return {}
    tensors = manifest["files"][EXTRA_FILE]["tensors"]
    out = {}
    with RangedReads(ckpt_dir) as files:
        for name, t in tensors.items():
            if name in skip:
                continue
            value = torch.empty(t["shape"], dtype=getattr(torch, t["dtype"]))
            if value.numel():
                files.read(EXTRA_FILE, t["offset"], _bytes_of(value))
            out[name] = value
    return out


def _read_frozen_pieces(ckpt_dir: Path, manifest: Mapping[str, Any], names: ModelNames,
                        owned: Mapping[int, list[tuple[int, int, int]]]) -> dict[int, list[tuple[int, torch.Tensor]]]:
    """This rank's share of each partitioned frozen parameter (``owned``: ``id(param) -> [(offset in the
    partition, offset in the parameter, length)]``), read from the whole tensor in the extras file;
    values in the saved dtype, keyed like ``owned``. Parameters the checkpoint lacks are left out."""
    if not owned or not manifest.get("extras"):
        return {}
    tensors = manifest["files"][EXTRA_FILE]["tensors"]
    out: dict[int, list[tuple[int, torch.Tensor]]] = {}
    with RangedReads(ckpt_dir) as files:
        for name, param in names.extras:
            runs, saved = owned.get(id(param)), tensors.get(name)
            if runs is None or saved is None:
                continue
            item = ITEMSIZE[saved["dtype"]]
            out[id(param)] = []
            for local, start, length in runs:
                value = torch.empty(length, dtype=getattr(torch, saved["dtype"]))
                files.read(EXTRA_FILE, saved["offset"] + start * item, _bytes_of(value))
                out[id(param)].append((local, value))
    return out


def _read_objects(ckpt_dir: Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    if OBJECTS_FILE not in manifest["files"]:
        return {}
    return torch.load(ckpt_dir / OBJECTS_FILE, weights_only=True, map_location="cpu")


def _resolve(value: Any, objects: Mapping[str, Any]) -> Any:
    if isinstance(value, dict) and set(value) == {"$object"}:
        return objects[value["$object"]]
    return value


@torch.no_grad()
def _apply_extras(module: torch.nn.Module, extras: Mapping[str, torch.Tensor]) -> None:
    """Buffers and frozen parameters (names and shapes were checked by ``_check_extras``)."""
    state = unwrap(module).state_dict(keep_vars=True)
    for name, value in extras.items():
        if name in state:
            state[name].data.copy_(value)


def _apply_optimizer(opt: Any, manifest: Mapping[str, Any], buffers: Mapping[str, torch.Tensor],
                     names: ModelNames) -> None:
    """Optimizer states, scalars (``step``) and hyperparameters, through the optimizer's own loader."""
    inner = opt.optimizer
    sd = inner.state_dict()
    olds = _saved_groups(opt, manifest, names)
    state = {}
    if getattr(opt, "nvme", None) is not None:   # the states are in the swap files already (streamed)
        for pg, old in zip(inner.param_groups, olds):
            for key, value in old["hyper"].items():
                if key in pg and _numeric(value):
                    pg[key] = _like(pg[key], value)
        return
    for g, (mp, pg, old) in enumerate(zip(opt.master_params, sd["param_groups"], olds)):
        layout_group = opt.layout.groups[g]
        lo, hi = layout_group.local_offset, layout_group.local_offset + layout_group.partition_numel
        st: dict[str, Any] = {key: buf[lo:hi].to(mp.device) for key, buf in buffers.items()}
        if st:
            st.update(_scalars(old["scalars"]))
            state[pg["params"][0]] = st
        for key, value in old["hyper"].items():
            if key in pg and _numeric(value):   # lr, betas, eps, weight_decay...: not impl switches
                pg[key] = _like(pg[key], value)
    sd["state"] = state
    inner.load_state_dict(sd)


def _scalars(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A group's saved scalar states (``step``) as the optimizer keeps them."""
    return {key: torch.tensor(s["value"], dtype=getattr(torch, s["dtype"])) if s["tensor"] else s["value"]
            for key, s in saved.items()}


def _numeric(value: Any) -> bool:
    """A hyperparameter value (number or list of numbers), as opposed to an implementation switch
    (``fused``, ``foreach``, ``impl``) that belongs to the machine loading the checkpoint."""
    items = value if isinstance(value, list) else [value]
    return bool(items) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items)


def _like(current: Any, value: Any) -> Any:
    if isinstance(current, tuple):
        return tuple(value)
    if torch.is_tensor(current):
        return torch.tensor(value, dtype=current.dtype, device=current.device)
    return value


def _load_state(obj: Any, state: Mapping[str, Any], what: str) -> None:
    try:
        obj.load_state_dict(dict(state))
    except (KeyError, TypeError, ValueError) as exc:
        warnings.warn(f"the checkpoint's {what} state does not fit this engine's ({exc}); it starts fresh",
                      stacklevel=3)


def _restore_dataloader(engine: Any, manifest: Mapping[str, Any], group: Group) -> None:
    loader = getattr(engine, "training_dataloader", None)
    states = manifest.get("dataloader") or []
    if loader is None or not hasattr(loader, "load_state_dict") or len(states) != group.world_size:
        return
    if states[group.rank] is not None:
        loader.load_state_dict(states[group.rank])
