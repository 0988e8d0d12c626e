"""``engine.zero.Init``: build a model already partitioned, so it is never whole on any rank.

    with engine.zero.Init(config_dict_or_path="ds_config.json"):
        model = MyModel()                 # each module's parameters are partitioned as it is built
    engine.initialize(model=model, config="ds_config.json")   # stage 3 takes the partitions over

As DeepSpeed's ``deepspeed.zero.Init``: inside the context every ``nn.Module`` subclass's
``__init__`` is wrapped; when a module's (outermost) ``__init__`` returns, its own parameters are
broadcast from rank 0 (so every rank agrees), cut into ``world_size`` equal pieces, and each rank
keeps its piece (``remote_device="cpu"`` keeps it in host memory); the parameter's data becomes an
empty tensor. At most one module's parameters are ever whole at once.

Partitioned parameters carry DeepSpeed's ``ds_shape`` and ``ds_numel``: outside the context their
``shape`` is ``(0,)``, so code that sizes them afterwards (parameter counts, weight-decay groups by
``dim()``) should read those, as with DeepSpeed.

Unlike DeepSpeed, initialisation code that runs *after* a submodule was built and touches its
parameters (a parent's ``reset_parameters`` drawing GPT-2's init, ``p.dim()`` checks,
``nn.init.normal_(p, generator=g)``) keeps working without ``GatheredParameters``: inside the
context a ``TorchFunctionMode`` answers shape questions from the recorded shape, applies dtype/
device conversions to the pieces, and for anything that reads or writes values gathers that one
parameter, runs the operation, and (for in-place operations) keeps rank 0's result partitioned
again. The result equals building the model whole and partitioning it afterwards.

``initialize`` with ZeRO stage 3 assembles each module's parameters from the pieces (one unit at
a time) into its own ``FlatLayout`` partitions; with stages 0-2 they are materialised whole.

``GatheredParameters(params, modifier_rank=None)`` gathers parameters for a block of code, before
or after ``initialize``; with ``modifier_rank`` the values that rank leaves are written back.
``register_external_parameter(module, param)`` tells stage 3 that ``module``'s forward uses a
parameter some other module owns (so it is gathered for it too).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..comm import Comm

__all__ = ["GatheredParameters", "Init", "full_from_shards", "is_partitioned_at_init", "materialize",
           "register_external_parameter", "release_init_shard"]

_ATTR = "_zero3_init"


@dataclass
class InitShard:
    """What ``Init`` keeps of a parameter: its shape and this rank's equal piece (zero-padded)."""

    shape: torch.Size
    numel: int
    piece: torch.Tensor
    world: int
    rank: int


def is_partitioned_at_init(t: torch.Tensor) -> bool:
    return _ATTR in getattr(t, "__dict__", {})


def _shard(t: torch.Tensor) -> InitShard:
    return t.__dict__[_ATTR]


def full_shape_view(p: torch.Tensor) -> torch.Tensor:
    """``p`` itself, or for an ``Init``-partitioned parameter a zero-stride stand-in with its full shape."""
    if not is_partitioned_at_init(p):
        return p
    return torch.empty((), dtype=p.dtype, device=p.device).expand(_shard(p).shape)


def mark_partitioned(p: torch.Tensor, shape: torch.Size) -> None:
    """DeepSpeed's attributes for code that sizes partitioned parameters: ``p.ds_shape``, ``p.ds_numel``
    (``p.shape`` is ``(0,)`` while the parameter is not gathered)."""
    p.__dict__["ds_shape"] = torch.Size(shape)
    p.__dict__["ds_numel"] = math.prod(shape)


def release_init_shard(p: torch.Tensor) -> None:
    p.__dict__.pop(_ATTR, None)


def full_from_shards(p: torch.Tensor, comm: Comm) -> torch.Tensor:
    """All ranks' pieces put together: the parameter's full value (a collective), on ``p``'s device."""
    info = _shard(p)
    if info.world != comm.world_size:
        raise RuntimeError(f"a parameter was partitioned by engine.zero.Init over {info.world} ranks but the "
                           f"process group has {comm.world_size}; build the model in the same process group")
    piece = info.piece.to(p.device)
    out = torch.empty(piece.numel() * info.world, dtype=piece.dtype, device=p.device)
    comm.all_gather_into(out, piece)
    return out[:info.numel].view(info.shape)


def _partition(p: torch.Tensor, comm: Comm, remote: Optional[torch.device], dtype: Optional[torch.dtype],
               stats: "InitStats") -> None:
    """Keep this rank's piece of ``p`` (rank 0's values) and empty its data."""
    with torch.no_grad():
        full = p.data.contiguous()
        comm.broadcast(full, src=0)
        world = comm.world_size
        size = math.ceil(full.numel() / world) if full.numel() else 0
        flat = full.reshape(-1)
        lo, hi = min(full.numel(), comm.rank * size), min(full.numel(), (comm.rank + 1) * size)
        target = dtype if dtype is not None and full.is_floating_point() else full.dtype
        piece = torch.zeros(size, dtype=target, device=remote or full.device)
        piece[:hi - lo].copy_(flat[lo:hi])
        stats.note(full.numel() * full.element_size(), piece.numel() * piece.element_size())
        p.__dict__[_ATTR] = InitShard(full.shape, full.numel(), piece, world, comm.rank)
        mark_partitioned(p, full.shape)
        p.data = torch.empty(0, dtype=target, device=full.device)


@dataclass
class InitStats:
    """What ``Init`` allocated: the largest parameter ever whole, and the pieces kept."""

    largest_whole_bytes: int = 0
    kept_bytes: int = 0
    partitioned: int = 0

    def note(self, whole: int, kept: int) -> None:
        self.saw_whole(whole)
        self.kept_bytes += kept
        self.partitioned += 1

    def saw_whole(self, nbytes: int) -> None:
        self.largest_whole_bytes = max(self.largest_whole_bytes, nbytes)


class Init:
    """Partition parameters as modules are built (see the module docstring). DeepSpeed's arguments;
    ``module`` partitions an already built model, ``data_parallel_group`` picks the group,
    ``remote_device`` ("cpu") keeps the pieces in host memory, ``dtype`` casts them, and
    ``config_dict_or_path``/``config`` read ``offload_param`` and the precision from a ds_config."""

    def __init__(self, module: Optional[nn.Module] = None, data_parallel_group: Any = None,
                 mem_efficient_linear: bool = True, remote_device: Optional[str] = None, pin_memory: bool = False,
                 config_dict_or_path: Any = None, config: Any = None, enabled: bool = True,
                 dtype: Optional[torch.dtype] = None, mpu: Any = None, **_ignored: Any) -> None:
        self.enabled = enabled
        self.comm = Comm(data_parallel_group)
        source = config_dict_or_path if config_dict_or_path is not None else config
        self.remote = torch.device(remote_device) if remote_device not in (None, "none") else None
        self.dtype = dtype
        if source is not None:
            self._read_config(source)
        self.stats = InitStats()
        self._patched: list[tuple[type, Callable[..., None]]] = []
        self._mode: Optional[_PartitionedTensorMode] = None
        self._subclass_hook: Any = None
        if module is not None and enabled:
            for sub in module.modules():
                self._partition_module(sub)

    def _read_config(self, source: Any) -> None:
        from ..config import load_config

        cfg = load_config(source, world_size=self.comm.world_size) if not hasattr(source, "zero_optimization") \
            else source
        if cfg.zero_optimization.offload_param.device != "none" and self.remote is None:
            self.remote = torch.device("cpu")
        if self.dtype is None and cfg.precision in ("fp16", "bf16"):
            self.dtype = torch.float16 if cfg.precision == "fp16" else torch.bfloat16

    # -- the context ----------------------------------------------------------------------------
    def __enter__(self) -> "Init":
        if not self.enabled:
            return self
        for cls in _subclasses(nn.Module):
            self._wrap(cls)
        original = nn.Module.__dict__.get("__init_subclass__")
        ctx = self

        def init_subclass(cls: type, **kwargs: Any) -> None:
            ctx._wrap(cls)
            if original is not None:
                original.__func__(cls, **kwargs)
            else:
                super(nn.Module, cls).__init_subclass__(**kwargs)

        self._subclass_hook = original
        nn.Module.__init_subclass__ = classmethod(init_subclass)  # type: ignore[assignment]
        self._mode = _PartitionedTensorMode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.enabled:
            return
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        for cls, init in reversed(self._patched):
            cls.__init__ = init  # type: ignore[method-assign]
        self._patched.clear()
        if self._subclass_hook is not None:
            nn.Module.__init_subclass__ = self._subclass_hook  # type: ignore[assignment]
        else:
            del nn.Module.__init_subclass__

    def _wrap(self, cls: type) -> None:
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_zero3_wrapped", False):
            return
        ctx = self

        @functools.wraps(init)
        def wrapped(module: nn.Module, *args: Any, **kwargs: Any) -> None:
            depth = module.__dict__.get("_zero3_init_depth", 0)
            object.__setattr__(module, "_zero3_init_depth", depth + 1)
            try:
                init(module, *args, **kwargs)
            finally:
                object.__setattr__(module, "_zero3_init_depth", depth)
            if depth == 0:
                del module.__dict__["_zero3_init_depth"]
                ctx._partition_module(module)

        wrapped._zero3_wrapped = True  # type: ignore[attr-defined]
        cls.__init__ = wrapped  # type: ignore[method-assign]
        self._patched.append((cls, init))

    def _partition_module(self, module: nn.Module) -> None:
        for p in module.__dict__.get("_parameters", {}).values():
            if p is not None and not is_partitioned_at_init(p) and p.numel() > 0:
                _partition(p, self.comm, self.remote, self.dtype, self.stats)


class _PartitionedTensorMode(TorchFunctionMode):
    """Inside ``Init``: torch calls on partitioned parameters behave as on the whole parameter."""

    _SHAPE = frozenset({"dim", "ndimension", "size", "numel", "nelement", "__len__", "stride", "is_contiguous",
                        "shape", "ndim"})
    _PASS = frozenset({"dtype", "device", "requires_grad", "is_leaf", "grad", "layout", "is_cuda", "is_meta",
                       "is_sparse", "is_quantized", "is_floating_point", "is_complex", "element_size",
                       "get_device", "_has_compatible_shallow_copy_type", "data", "grad_fn", "_base", "__hash__",
                       "name", "requires_grad_", "retain_grad", "register_hook", "_is_view", "is_nested",
                       "__class__", "__dict__", "_version"})
    _CONVERT = frozenset({"to", "cuda", "cpu", "float", "half", "bfloat16", "double"})

    def __init__(self, ctx: Init) -> None:
        super().__init__()
        self.ctx = ctx

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        parts = [t for t in _flatten((args, kwargs)) if isinstance(t, torch.Tensor) and is_partitioned_at_init(t)]
        if not parts:
            return func(*args, **kwargs)
        name = _func_name(func)
        if name in self._PASS:
            return func(*args, **kwargs)
        if name in self._SHAPE:
            stand_ins = {id(t): _stand_in(t) for t in parts}
            return func(*_replace((args, kwargs), stand_ins)[0], **_replace((args, kwargs), stand_ins)[1])
        if name in self._CONVERT and args and args[0] is parts[0] and len(parts) == 1:
            return self._convert(parts[0], name, args[1:], kwargs)
        return self._on_whole(func, name, parts, args, kwargs)

    def _convert(self, p: torch.Tensor, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
        info = _shard(p)
        if name == "to":
            device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        else:
            device = torch.device("cpu") if name == "cpu" else (torch.device("cuda", *args[:1]) if name == "cuda"
                                                                  else None)
            dtype = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16,
                     "double": torch.float64}.get(name)
        if dtype is not None and info.piece.is_floating_point():
            info.piece = info.piece.to(dtype)
        if device is not None and self.ctx.remote is None:
            info.piece = info.piece.to(device)
        out = torch.empty(0, dtype=dtype or p.dtype, device=device or p.device)
        return out

    def _on_whole(self, func: Any, name: str, parts: list[torch.Tensor], args: tuple, kwargs: dict) -> Any:
        comm = self.ctx.comm
        with torch.no_grad():
            wholes = [full_from_shards(t, comm) for t in parts]
        self.ctx.stats.saw_whole(sum(w.numel() * w.element_size() for w in wholes))
        saved = [t.data for t in parts]
        for t, whole in zip(parts, wholes):
            t.data = whole
        try:
            with torch._C.DisableTorchFunction():
                out = func(*args, **kwargs)
        finally:
            in_place = name.endswith("_") and not name.endswith("__") or name == "__setitem__"
            for t, whole, empty in zip(parts, wholes, saved):
                if in_place:
                    self._keep_piece(t, whole)
                t.data = empty
        return out

    def _keep_piece(self, t: torch.Tensor, whole: torch.Tensor) -> None:
        info = _shard(t)
        with torch.no_grad():
            whole = whole.contiguous()
            self.ctx.comm.broadcast(whole, src=0)
            size = info.piece.numel()
            flat = whole.reshape(-1)
            lo, hi = min(info.numel, info.rank * size), min(info.numel, (info.rank + 1) * size)
            info.piece[:hi - lo].copy_(flat[lo:hi])


def materialize(module: nn.Module, comm: Optional[Comm] = None) -> int:
    """Make every ``Init``-partitioned parameter of ``module`` whole again (stages 0-2); returns how many."""
    comm = comm or Comm()
    count = 0
    for p in _unique_params(module):
        if is_partitioned_at_init(p):
            with torch.no_grad():
                whole = full_from_shards(p, comm)
            release_init_shard(p)
            p.data = whole
            count += 1
    return count


class GatheredParameters:
    """Gather ``params`` (a parameter or an iterable) for a block; with ``modifier_rank`` keep that
    rank's changes. Works on ``Init``-partitioned parameters and on a stage-3 engine's parameters;
    for anything else it does nothing, as DeepSpeed's does."""

    def __init__(self, params: Any, modifier_rank: Optional[int] = None, fwd_module: Any = None,
                 enabled: bool = True) -> None:
        self.params = [params] if isinstance(params, torch.Tensor) else list(params or [])
        self.modifier_rank = modifier_rank
        self.enabled = enabled
        self._init_parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._engine_ctx: list[Any] = []

    def __enter__(self) -> "GatheredParameters":
        if not self.enabled:
            return self
        comm = Comm()
        owners: dict[int, tuple[Any, list[int]]] = {}
        for p in self.params:
            if is_partitioned_at_init(p):
                with torch.no_grad():
                    whole = full_from_shards(p, comm)
                self._init_parts.append((p, p.data))
                p.data = whole
            elif _owner(p) is not None:
                opt, index = _owner(p)
                owners.setdefault(id(opt), (opt, []))[1].append(index)
        for opt, indices in owners.values():
            ctx = opt.gathered(indices)
            ctx.__enter__()
            self._engine_ctx.append((opt, indices, ctx))
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.enabled:
            return
        comm = Comm()
        for p, empty in self._init_parts:
            if self.modifier_rank is not None:
                info = _shard(p)
                with torch.no_grad():
                    whole = p.data.contiguous()
                    comm.broadcast(whole, src=self.modifier_rank)
                    size = info.piece.numel()
                    lo, hi = min(info.numel, info.rank * size), min(info.numel, (info.rank + 1) * size)
                    info.piece[:hi - lo].copy_(whole.reshape(-1)[lo:hi])
            p.data = empty
        self._init_parts.clear()
        for opt, indices, ctx in self._engine_ctx:
            if self.modifier_rank is not None:
                opt.write_back(indices, self.modifier_rank)
            ctx.__exit__(*exc)
        self._engine_ctx.clear()


def register_external_parameter(module: nn.Module, parameter: nn.Parameter) -> None:
    """``module``'s forward uses ``parameter`` although another module owns it (DeepSpeed's API).

    Call it before ``engine.initialize`` or after: stage 3 then gathers ``parameter`` for ``module``.
    """
    module.__dict__.setdefault("_zero3_external_params", []).append(parameter)
    owner = _owner(parameter)
    if owner is not None:
        owner[0].coordinator.add_external(module, [parameter])


def _owner(p: torch.Tensor) -> Optional[tuple[Any, int]]:
    """The stage-3 optimizer managing ``p`` and its index there, if any."""
    found = getattr(p, "__dict__", {}).get("_zero3_owner")
    if found is None:
        return None
    ref, index = found
    opt = ref()
    return None if opt is None else (opt, index)


# -- helpers ----------------------------------------------------------------------------------------
def _subclasses(cls: type) -> Iterator[type]:
    seen: set[type] = set()
    stack = list(cls.__subclasses__())
    while stack:
        sub = stack.pop()
        if sub not in seen:
            seen.add(sub)
            yield sub
            stack.extend(sub.__subclasses__())


def _unique_params(module: nn.Module) -> Iterator[nn.Parameter]:
    seen: set[int] = set()
    for sub in module.modules():
        for p in sub._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                yield p


def _func_name(func: Any) -> str:
    owner = getattr(func, "__self__", None)
    if type(owner).__name__ == "getset_descriptor":
        return owner.__name__
    return getattr(func, "__name__", "")


def _stand_in(t: torch.Tensor) -> torch.Tensor:
    return full_shape_view(t)


def _flatten(value: Any) -> Iterable[Any]:
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    else:
        yield value


def _replace(value: Any, table: dict[int, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return table.get(id(value), value)
    if isinstance(value, list):
        return [_replace(v, table) for v in value]
    if isinstance(value, tuple):
        return tuple(_replace(v, table) for v in value)
    if isinstance(value, dict):
        return {k: _replace(v, table) for k, v in value.items()}
    return value
