"""When stage 3 gathers and releases parameters: module hooks, the fetch trace, prefetch and budgets.

Hooks (registered on every module that owns parameters in a non-persistent fetch unit):

* forward pre-hook: gather the module's units (waiting for a prefetch if one is in flight);
* forward hook: release them, unless the trace says they are needed again soon
  (``stage3_max_reuse_distance``) and the live budget allows; and register a gradient hook on the
  module's outputs (``register_multi_grad_hook``, "any") that gathers the units again just
  before autograd runs the module's backward;
* post-accumulate-grad hook on every trainable parameter: hand the gradient to the reducer
  (reduce-scatter to its owner) and, once a unit's last gradient is in, release the unit;
* a unit is also released once the backward of every call that read it is done: the forward
  hook registers a multi-grad hook ("all") on the call's inputs that require grad and have a
  ``grad_fn``. Autograd's ready queue runs the most recently created ready node first, so a
  node runs only when no node of this backward created after it is still to run (on one device);
  every node of the module's forward was created after its inputs, so when the inputs' gradient
  functions run, nothing of this call's backward (which reads the gathered weights,
  saved by autograd as views of ``unit.full``) is left. A unit used by several calls (a module
  applied twice, a tied weight) waits for all of them (``backward_calls``); a call without such
  an input (its inputs are leaves or need no gradient, but its output does) keeps the unit until
  its gradients are in, or for a frozen unit (no gradients to wait for) to the end of backward
  (``pinned``). Activation checkpointing's recomputation (inside backward) gathers the units again
  and the original call's hook releases them.
* a module whose backward reads none of its parameters is not gathered for its backward and
  does not hold its units there: ``nn.Embedding`` (torch's embedding backward needs the indices,
  the output gradient and the number of rows, never the weight's values).

Inside backward the forward hooks still gather (activation checkpointing recomputes modules
there) but never release: the recomputed tensors are about to be used by backward. torch's
non-reentrant checkpoint normally stops a recomputation as soon as it has rebuilt the tensors
backward needs, so the last module of a checkpointed region never reaches its forward hook and
its unit would stay "in use" (gathered) until the end of backward: a third of a GPT's weights.
The root module's forward therefore runs under ``set_checkpoint_early_stop(False)`` (the flag is
read when a checkpoint is created), and every recomputation runs to its end.

A module called several times per forward (a tied embedding and lm_head share one parameter,
hence one unit) is gathered on each call that reads it. Its gradient, which autograd accumulates
over all uses, is final only after the last use's backward (the embedding's, at the very end);
the unit is released as soon as the last *reader's* backward (the head's) is done, and until the
gradient arrives the parameter keeps its shape (zero-stride stand-ins, stage3_params.py) because
autograd's AccumulateGrad lays the gradient out like the parameter. So a tied embedding is
gathered twice a step (embedding forward; head forward and backward) and is never held beside
the blocks' units. Trainable units released during a forward with gradients enabled keep their
shape the same way, so a module whose backward reads no parameters can skip the gather.

With ``stage3_hold_tied_params`` (orch's key, off by default) a unit that the last training
micro-step read in more than one forward call (the tied embedding and head, a module applied
twice) is instead *held*: gathered at its first forward read and kept through the forward, then
released as above once its last reader's backward is done. It is gathered once a step, as FSDP2
gathers its root group (torch's ``fully_shard`` never reshards the root after forward); the
price is the unit sitting beside every block's unit and the prefetch for the whole forward.
``stage3_max_reuse_distance`` cannot express this: a distance long enough to span the forward
from the embedding to the head also keeps the last blocks from their forward to their backward.

The **trace** is the order in which units were fetched during the last complete training
micro-step (forward, recomputation and backward). While the current micro-step follows it, the
coordinator prefetches: after each fetch it issues asynchronous gathers for the next units of the
trace, up to ``stage3_prefetch_bucket_size`` elements in flight and ``stage3_max_live_parameters``
gathered in total, so communication overlaps the current module's compute. A micro-step that
departs from the trace stops prefetching and becomes the new trace. Every decision depends only on
the trace and the budgets, which are the same on every rank, so every rank issues the same
collectives in the same order.
"""
from __future__ import annotations

import bisect
import functools
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.autograd.graph import register_multi_grad_hook
from torch.utils.checkpoint import set_checkpoint_early_stop

from .reduction import GradientReducer
from .stage3_params import FetchUnit, PartitionedParams, UnitState

__all__ = ["ParamCoordinator", "backward_reads_params", "in_backward", "tensors_in"]

_LOOKAHEAD = 64   # trace entries scanned per prefetch decision


def in_backward() -> bool:
    """Whether the calling thread is running an autograd backward pass."""
    return torch._C._current_graph_task_id() != -1


class ParamCoordinator:
    """Gathers units before modules run and releases them after (see the module docstring)."""

    def __init__(self, module: nn.Module, store: PartitionedParams, reducer: GradientReducer, *,
                 prefetch_numel: int, max_live_numel: int, max_reuse_distance: int,
                 hold_tied: bool = False) -> None:
        self.store, self.reducer = store, reducer
        self.prefetch_numel = int(prefetch_numel)
        self.max_live_numel = int(max_live_numel)
        self.max_reuse_distance = int(max_reuse_distance)
        self.hold_tied = bool(hold_tied)
        self.tied: frozenset[int] = frozenset()    # units read by several forward calls last micro-step
        self._forward_reads: dict[int, int] = {}   # unit -> forward calls that read it, this micro-step
        self.trace: Optional[list[int]] = None
        self._positions: dict[int, list[int]] = {}
        self._prefix: list[int] = [0]
        self.recording: list[int] = []
        self.cursor = 0
        self.on_trace = False
        self._prefetched: dict[int, int] = {}      # unit -> numel, gathered ahead and not yet used
        self.prefetch_hits = 0                     # fetches that found their unit prefetched
        self._hooked: set[int] = set()
        self._backward_end_handles: list[Any] = []   # frozen units' end-of-backward hooks, this micro-step
        self._early_stop: Optional[Any] = None
        self._handles = [module.register_forward_pre_hook(self._root_pre_forward),
                         module.register_forward_hook(self._root_post_forward, always_call=True)]
        for sub in module.modules():
            extra = getattr(sub, "_zero3_external_params", ())
            if extra:
                store.note_module_params(sub, extra)
            self._hook(sub)
        for i, p in enumerate(store.params[:store.trainable]):
            self._handles.append(p.register_post_accumulate_grad_hook(functools.partial(self._grad_ready, i)))
        module.__dict__["_zero3_coordinator"] = self

    def _hook(self, sub: nn.Module) -> None:
        if id(sub) in self._hooked or id(sub) not in self.store.module_units:
            return
        self._hooked.add(id(sub))
        self._handles.append(sub.register_forward_pre_hook(self._pre_forward))
        self._handles.append(sub.register_forward_hook(self._post_forward, with_kwargs=True))

    def add_external(self, sub: nn.Module, params: list[torch.Tensor]) -> None:
        """``sub``'s forward also uses ``params`` (owned by other modules): gather them for it too."""
        self.store.note_module_params(sub, params)
        self._hook(sub)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- iterations -----------------------------------------------------------------------------
    def _root_pre_forward(self, module: nn.Module, args: Any) -> None:
        if not in_backward():
            self.begin_iteration()
            if self._early_stop is None:
                self._early_stop = set_checkpoint_early_stop(False)
                self._early_stop.__enter__()

    def _root_post_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._early_stop is not None and not in_backward():
            early_stop, self._early_stop = self._early_stop, None
            early_stop.__exit__(None, None, None)

    def begin_iteration(self) -> None:
        """A new forward of the whole model: close what the last one left open, rewind the trace."""
        if self.reducer.active and self.reducer._arrived:
            self.finish_backward()   # the user ran loss.backward() without engine.backward()
        for unit in self.store.units:
            if not unit.persistent and unit.users == 0:
                self.store.release(unit)
        self._reset_backward_state()
        self._prefetched.clear()
        self._forward_reads.clear()
        self.recording = []
        self.cursor = 0
        self.on_trace = self.trace is not None
        self.reducer.begin_pass()

    def begin_backward(self) -> None:
        for unit in self.store.units:
            unit.grads_left = unit.expected_grads
        if not self.reducer.active:
            self.reducer.begin_pass()

    def finish_backward(self) -> None:
        """After backward: reduce what is left, release every unit, keep this micro-step's trace."""
        self.reducer.finish_pass()
        for unit in self.store.units:
            unit.users = 0
        self.store.release_all()
        self._reset_backward_state()
        self._prefetched.clear()
        if self.recording and (self.trace is None or not self.on_trace or self.cursor != len(self.trace)):
            self._adopt_trace(self.recording)
        if self._forward_reads:
            self.tied = frozenset(u for u, calls in self._forward_reads.items() if calls > 1)
            self._forward_reads.clear()
        self.recording = []
        self.on_trace = False

    def _reset_backward_state(self) -> None:
        for unit in self.store.units:
            unit.grads_left = unit.expected_grads
            unit.backward_calls, unit.pinned = 0, False
        for handle in self._backward_end_handles:
            handle.remove()
        self._backward_end_handles.clear()

    def _adopt_trace(self, trace: list[int]) -> None:
        self.trace = list(trace)
        self._positions = {}
        self._prefix = [0]
        for pos, u in enumerate(self.trace):
            self._positions.setdefault(u, []).append(pos)
            self._prefix.append(self._prefix[-1] + self.store.units[u].numel)

    # -- hooks ----------------------------------------------------------------------------------
    def _pre_forward(self, sub: nn.Module, args: Any) -> None:
        forward = not in_backward()
        for u in self.store.module_units[id(sub)]:
            self._use(u)
            self.store.units[u].users += 1   # in use: never evicted to make room for the next
            if forward:
                self._forward_reads[u] = self._forward_reads.get(u, 0) + 1
        self._prefetch()

    def _post_forward(self, sub: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        units = self.store.module_units[id(sub)]
        for u in units:
            unit = self.store.units[u]
            unit.users = max(0, unit.users - 1)
        if torch.is_grad_enabled() and backward_reads_params(sub):
            tensors = [t for t in tensors_in(output) if t.requires_grad]
            if tensors:
                register_multi_grad_hook(tensors, functools.partial(self._pre_backward, sub), mode="any")
                if not in_backward():
                    self._watch_backward_end(units, (args, kwargs))
        if not in_backward():
            for u in units:
                if self.store.units[u].users == 0:
                    self._maybe_release(self.store.units[u])

    def _pre_backward(self, sub: nn.Module, grad: Any) -> None:
        for u in self.store.module_units[id(sub)]:
            self._use(u)
        self._prefetch()

    def _watch_backward_end(self, units: Sequence[int], inputs: Any) -> None:
        """Release this call's units when its backward is done (see the module docstring)."""
        units = [u for u in units if not self.store.units[u].persistent]
        if not units:
            return
        watched = list({id(t): t for t in tensors_in(inputs) if t.requires_grad and t.grad_fn is not None}.values())
        for u in units:
            if watched:
                self.store.units[u].backward_calls += 1
            else:
                self.store.units[u].pinned = True
        if watched:
            self._backward_end_handles.append(
                register_multi_grad_hook(watched, functools.partial(self._backward_done, units), mode="all"))

    def _backward_done(self, units: Sequence[int], grads: Any) -> None:
        for u in units:
            unit = self.store.units[u]
            unit.backward_calls = max(0, unit.backward_calls - 1)
            if unit.backward_calls == 0 and not unit.pinned and unit.users == 0:
                self._release(unit)

    def _grad_ready(self, index: int, param: nn.Parameter) -> None:
        self.reducer.grad_ready(index, param)
        unit = self.store.units[self.store.unit_of[index]]
        unit.grads_left -= 1
        if unit.grads_left == 0 and not unit.persistent and unit.users == 0:
            self.store.release(unit)

    def _release(self, unit: FetchUnit) -> None:
        """Release ``unit``; while gradients are still to come into it, its parameters keep their shape."""
        pending = not unit.frozen and unit.grads_left > 0 and (torch.is_grad_enabled() or in_backward())
        self.store.release(unit, keep_shape=pending)

    # -- fetching, prefetching, releasing ---------------------------------------------------------
    def _use(self, u: int) -> None:
        self.recording.append(u)
        if self.on_trace:
            if self.cursor < len(self.trace) and self.trace[self.cursor] == u:
                self.cursor += 1
            else:
                self.on_trace = False   # departed from the trace: no more prefetching this micro-step
        unit = self.store.units[u]
        if self._prefetched.pop(u, None) is not None:
            self.prefetch_hits += 1
        if unit.state is UnitState.RELEASED and not in_backward():
            self._make_room(unit.numel)
        self.store.fetch(unit)

    def _prefetch(self) -> None:
        if not self.on_trace or self.prefetch_numel <= 0:
            return
        inflight = sum(self._prefetched.values())
        end = min(len(self.trace), self.cursor + _LOOKAHEAD)
        for pos in range(self.cursor, end):
            u = self.trace[pos]
            unit = self.store.units[u]
            if unit.state is not UnitState.RELEASED:
                continue
            if inflight + unit.numel > self.prefetch_numel or \
                    self.store.live_numel + unit.numel > self.max_live_numel:
                break
            self.store.gather(unit, async_op=True)
            self._prefetched[u] = unit.numel
            inflight += unit.numel

    def _maybe_release(self, unit: FetchUnit) -> None:
        """Forward: release ``unit`` unless it is used again within the reuse distance."""
        if unit.persistent:
            return
        if self.hold_tied and unit.index in self.tied and torch.is_grad_enabled():
            return   # held until its last reader's backward is done (_backward_done, _grad_ready)
        if self.on_trace and self.store.live_numel <= self.max_live_numel:
            after = self._next_use(unit.index)
            if after is not None and self._prefix[after] - self._prefix[self.cursor] <= self.max_reuse_distance:
                return
        self._release(unit)

    def _next_use(self, u: int) -> Optional[int]:
        positions = self._positions.get(u, [])
        k = bisect.bisect_left(positions, self.cursor)
        return positions[k] if k < len(positions) else None

    def _make_room(self, numel: int) -> None:
        """Forward only: release idle gathered units, farthest next use first, to stay in budget."""
        if self.store.live_numel + numel <= self.max_live_numel:
            return
        idle = [u for u in self.store.units
                if not u.persistent and u.users == 0 and u.state is not UnitState.RELEASED]
        far = len(self.trace or ()) + 1
        idle.sort(key=lambda u: -(self._next_use(u.index) if self.on_trace and self._next_use(u.index) is not None
                                  else far))
        for unit in idle:
            if self.store.live_numel + numel <= self.max_live_numel:
                break
            self._prefetched.pop(unit.index, None)
            self._release(unit)


def backward_reads_params(module: nn.Module) -> bool:
    """Whether ``module``'s backward reads its parameters' values (so they must be gathered for it).

    False only where torch's derivative says so for the module's own, unchanged forward:
    ``nn.Embedding`` (embedding_backward takes the indices, the output gradient and the weight's
    row count). A subclass with its own ``forward`` may read its weight: assumed to."""
    return type(module).forward is not nn.Embedding.forward


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``value`` and the lists, tuples and dicts nested in it (a module's args or output)."""
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v)
