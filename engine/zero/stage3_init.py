"""``engine.zero.Init``: build a model already partitioned, so it is never whole on any rank.

    with engine.zero.Init(config_dict_or_path="ds_config.json"):
        model = MyModel()                 # each module's parameters are partitioned as it is built
    engine.initialize(model=model, config="ds_config.json")   # stage 3 takes the partitions over

As DeepSpeed's ``deepspeed.zero.Init``: inside the context every ``nn.Module`` subclass's
``__init__`` is wrapped; when a module's (outermost) ``__init__`` returns, its own parameters are
broadcast from rank 0 (so every rank agrees), cut into ``world_size`` equal pieces, and each rank
keeps its piece (``remote_device="cpu"`` keeps it in host memory; ``"nvme"``, or a config whose
``offload_param.device`` is ``nvme``, writes it at once to the rank's swap file under
``offload_param.nvme_path``, so host memory never holds the partition: stage3_init_swap.py); the
parameter's data becomes an empty tensor. At most one module's parameters are ever whole at once.

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
a time) into its own ``FlatLayout`` partitions; with stages 0-2 they are materialised whole
(stage3_shards.py holds the pieces; stage3_gather.py has ``GatheredParameters``).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..comm import Comm
from ..errors import UserError
from .nvme_params import NvmeParamSettings
from .stage3_init_swap import InitSwap
from .stage3_hooks import tensors_in
from .stage3_shards import (InitStats, full_from_shards, full_shape_view, is_partitioned_at_init, keep_piece,
                            partition_param, shard_of)

__all__ = ["Init", "InitConfigError", "remote_home"]


class InitConfigError(UserError, ValueError):
    """``engine.zero.Init``'s ``remote_device`` and ds_config disagree, or nvme lacks its settings."""


class Init:
    """Partition parameters as modules are built (see the module docstring). DeepSpeed's arguments;
    ``module`` partitions an already built model, ``data_parallel_group`` picks the group,
    ``remote_device`` ("cpu") keeps the pieces in host memory, ("nvme") writes them to swap files
    under the config's ``offload_param.nvme_path`` (stage3_init_swap.py), ``dtype`` casts them, and
    ``config_dict_or_path``/``config`` read ``offload_param`` and the precision from a ds_config
    (``offload_param.device`` is the remote device when ``remote_device`` is not given, as in DeepSpeed)."""

    def __init__(self, module: Optional[nn.Module] = None, data_parallel_group: Any = None,
                 mem_efficient_linear: bool = True, remote_device: Optional[str] = None, pin_memory: bool = False,
                 config_dict_or_path: Any = None, config: Any = None, enabled: bool = True,
                 dtype: Optional[torch.dtype] = None, mpu: Any = None, **_ignored: Any) -> None:
        self.enabled = enabled
        self.comm = Comm(data_parallel_group)
        source = config_dict_or_path if config_dict_or_path is not None else config
        self.dtype = dtype
        cfg = self._load_config(source) if source is not None else None
        where = remote_home(remote_device, cfg)
        self.remote = torch.device(where) if where not in (None, "nvme") else None
        self.swap: Optional[InitSwap] = None
        if where == "nvme" and enabled:
            self.remote = torch.device("cpu")          # a piece is cast on the host on its way to the file
            self.swap = InitSwap(NvmeParamSettings.from_config(cfg.zero_optimization, cfg.aio), self.comm.rank)
        self.stats = InitStats()
        self._patched: list[tuple[type, Callable[..., None]]] = []
        self._mode: Optional[_PartitionedTensorMode] = None
        self._subclass_hook: Any = None
        if module is not None and enabled:
            for sub in module.modules():
                self._partition_module(sub)

    def _load_config(self, source: Any) -> Any:
        from ..config import load_config

        cfg = load_config(source, world_size=self.comm.world_size) if not hasattr(source, "zero_optimization") \
            else source
        if self.dtype is None and cfg.precision in ("fp16", "bf16"):
            self.dtype = torch.float16 if cfg.precision == "fp16" else torch.bfloat16
        return cfg

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
                partition_param(p, self.comm, self.remote, self.dtype, self.stats, self.swap)


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
        parts = [t for t in tensors_in((args, kwargs)) if is_partitioned_at_init(t)]
        if not parts:
            return func(*args, **kwargs)
        name = _func_name(func)
        if name in self._PASS:
            return func(*args, **kwargs)
        if name in self._SHAPE:
            stand_ins = {id(t): full_shape_view(t) for t in parts}
            return func(*_replace((args, kwargs), stand_ins)[0], **_replace((args, kwargs), stand_ins)[1])
        if name in self._CONVERT and args and args[0] is parts[0] and len(parts) == 1:
            return self._convert(parts[0], name, args[1:], kwargs)
        return self._on_whole(func, name, parts, args, kwargs)

    def _convert(self, p: torch.Tensor, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
        info = shard_of(p)
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
                if in_place:   # rank 0's result, in case ranks drew different random numbers
                    keep_piece(t, whole, comm, src=0)
                t.data = empty
        return out


# -- helpers ----------------------------------------------------------------------------------------
_KEY = "zero_optimization.offload_param.device"


def remote_home(remote_device: Optional[str], cfg: Any) -> Optional[str]:
    """Where ``Init`` keeps the pieces: ``remote_device``, or the config's ``offload_param.device``
    when that is not given (DeepSpeed's rule); "nvme" needs that section's ``nvme_path``, and a
    ``remote_device`` the config's device contradicts is an error naming the key."""
    asked = None if remote_device in (None, "none") else str(remote_device)
    configured = cfg.zero_optimization.offload_param.device if cfg is not None else "none"
    if asked == "nvme" and cfg is None:
        raise InitConfigError(f"{_KEY}: engine.zero.Init(remote_device=\"nvme\") writes the pieces under the "
                              "ds_config's offload_param.nvme_path; pass config_dict_or_path=<ds_config> with "
                              "zero_optimization.offload_param {\"device\": \"nvme\", \"nvme_path\": ...}")
    if asked in ("cpu", "nvme") and configured != "none" and configured != asked:
        raise InitConfigError(f"{_KEY}: the ds_config says \"{configured}\" but engine.zero.Init was given "
                              f"remote_device=\"{asked}\"; make them agree (or leave remote_device out to use "
                              "the config's)")
    if asked == "nvme" and configured == "none":
        raise InitConfigError(f"{_KEY}: engine.zero.Init(remote_device=\"nvme\") needs offload_param "
                              "{\"device\": \"nvme\", \"nvme_path\": ...} in the ds_config (training reads the "
                              "partition from the same swap files)")
    where = asked if asked is not None else (None if configured == "none" else configured)
    if where not in (None, "cpu", "nvme"):
        try:
            torch.device(where)
        except RuntimeError:
            raise InitConfigError(f"remote_device: {where!r} is not a device; use \"cpu\", \"nvme\" or a "
                                  "torch device such as \"cuda\" (or leave it out)") from None
    return where


def _subclasses(cls: type) -> Iterator[type]:
    seen: set[type] = set()
    stack = list(cls.__subclasses__())
    while stack:
        sub = stack.pop()
        if sub not in seen:
            seen.add(sub)
            yield sub
            stack.extend(sub.__subclasses__())


def _func_name(func: Any) -> str:
    owner = getattr(func, "__self__", None)
    if type(owner).__name__ == "getset_descriptor":
        return owner.__name__
    return getattr(func, "__name__", "")


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
