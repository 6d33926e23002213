"""One sharded unit: its layout, its three buffers and the state machine that moves between them.

shard buffer (S, master dtype, persistent)   -- the registered parameters are 1-D views of it
gather buffer (W*S, compute dtype, transient) -- the full parameters used in compute are views of it
grad buffer   (W*S, compute dtype, transient) -- autograd accumulates full gradients into views of it

The gather and grad buffers keep their tensor objects for the unit's lifetime and only their storage is
allocated and freed, so the parameter views (and the tensors autograd saved for backward) stay valid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto

import torch
import torch.nn as nn
from torch.distributed import ProcessGroup, Work

from . import collectives as comm
from .layout import Layout, Piece

# The next unit's all-gather is issued once this fraction of this unit's gradients has arrived: it still
# overlaps most of the backward, but not the activation-gradient peak at its start (in a transformer block
# the MLP's). Measured on the benchmark GPT: issuing it at the unit's pre-backward peaks 4% higher.
BACKWARD_PREFETCH_AFTER = 0.25


class ShardState(Enum):
    SHARDED = auto()  # only the shard buffer exists; the module shows the sharded pieces
    GATHERING = auto()  # an all-gather into the gather buffer is in flight
    UNSHARDED = auto()  # the module shows full parameters, views of the gather buffer


@dataclass(eq=False)
class ManagedParam:
    """A parameter of the unit: where it is registered, its sharded piece and its full (unsharded) view."""

    fqn: str  # first name under the unit's module
    uses: list[tuple[nn.Module, str]]  # every (module, attribute) that registers it (tied weights)
    slot_index: int
    piece: Piece
    sharded: nn.Parameter
    unsharded: nn.Parameter

    @property
    def requires_grad(self) -> bool:
        return self.sharded.requires_grad


@dataclass
class _PendingReduce:
    work: Work
    output: torch.Tensor
    source: torch.Tensor  # kept alive until the collective is done
    received: set[int]  # leaves that got a gradient: the others keep grad None, as unsharded


def _alloc(t: torch.Tensor) -> bool:
    """Give ``t`` its storage back; True when it was freed before."""
    storage = t.untyped_storage()
    nbytes = t.numel() * t.element_size()
    if storage.size() == nbytes:
        return False
    storage.resize_(nbytes)
    return True


def _free(t: torch.Tensor) -> None:
    t.untyped_storage().resize_(0)


@dataclass(eq=False)
class ShardedUnit:
    """The parameters of one ``fully_shard(module)`` call; gathered and freed together."""

    name: str
    layout: Layout
    group: ProcessGroup
    rank: int
    shard_buffer: torch.Tensor
    gather_buffer: torch.Tensor
    grad_buffer: torch.Tensor
    params: list[ManagedParam]
    reduce_dtype: torch.dtype
    reshard_after_forward: bool = True
    requires_gradient_sync: bool = True
    state: ShardState = ShardState.SHARDED
    _gather: comm.PendingGather | None = None
    _gather_source: torch.Tensor | None = None
    _grads_arrived: int = 0
    _backward_done: bool = True
    _pending: _PendingReduce | None = None
    on_reduce_issued: Callable[[ShardedUnit], None] | None = None  # lets the root bound in-flight reduces
    on_grad_ready: Callable[[], None] | None = None  # lets the root free finished reduces early
    _received: set[int] = field(default_factory=set)  # leaves with a gradient in this accumulation window
    _backward_prefetch: list[ShardedUnit] = field(default_factory=list)
    _hooks: list = field(default_factory=list)

    def __post_init__(self) -> None:
        _free(self.gather_buffer)
        _free(self.grad_buffer)
        self._grad_params = [p for p in self.params if p.requires_grad]
        self._by_leaf = {id(p.unsharded): p for p in self._grad_params}
        for p in self._grad_params:
            self._hooks.append(p.unsharded.register_post_accumulate_grad_hook(self._on_grad_ready))

    # ---------------------------------------------------------------- all-gather / free
    def unshard(self, async_op: bool = False) -> None:
        if self.state is ShardState.SHARDED:
            _alloc(self.gather_buffer)
            source = comm.cast(self.shard_buffer, self.gather_buffer.dtype)
            self._gather = comm.all_gather(self.gather_buffer, source, self.group)
            self._gather_source = source
            self.state = ShardState.GATHERING
        if not async_op:
            self.wait_for_unshard()

    def wait_for_unshard(self) -> None:
        if self.state is ShardState.SHARDED:
            self.unshard(async_op=True)
        if self.state is ShardState.GATHERING:
            self._gather.wait()
            self._gather = self._gather_source = None
            self.state = ShardState.UNSHARDED
            self.show(unsharded=True)

    def reshard(self) -> None:
        if self.state is ShardState.SHARDED:
            return
        if self.state is ShardState.GATHERING:
            self._gather.wait()
            self._gather = self._gather_source = None
        self.show(unsharded=False)
        _free(self.gather_buffer)
        self.state = ShardState.SHARDED

    def show(self, unsharded: bool) -> None:
        for p in self.params:
            tensor = p.unsharded if unsharded else p.sharded
            for module, attr in p.uses:
                module._parameters[attr] = tensor

    # ---------------------------------------------------------------- gradients
    def begin_backward(self) -> None:
        """Point every full parameter's ``.grad`` at its view of the grad buffer (zeroed when new)."""
        if not self._backward_done:
            return
        self._backward_done = False
        self._grads_arrived = 0
        if _alloc(self.grad_buffer):
            self.grad_buffer.zero_()
            self._received.clear()
        for p in self._grad_params:
            p.unsharded.grad = self._grad_view(p)

    def prefetch_during_backward(self, units: list[ShardedUnit]) -> None:
        """Gather ``units`` once enough of this unit's gradients are in (see BACKWARD_PREFETCH_AFTER)."""
        self._backward_prefetch = list(units)
        self._maybe_prefetch()

    def _maybe_prefetch(self) -> None:
        if self._backward_prefetch and self._grads_arrived >= BACKWARD_PREFETCH_AFTER * len(self._grad_params):
            units, self._backward_prefetch = self._backward_prefetch, []
            for unit in units:
                unit.unshard(async_op=True)

    def _grad_view(self, p: ManagedParam) -> torch.Tensor:
        slot = self.layout.slots[p.slot_index]
        return self.grad_buffer[slot.offset : slot.end].view(slot.shape)

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        if self._backward_done:  # a gradient before the unit's pre-backward (used outside its forward)
            early = param.grad
            self.begin_backward()
            param.grad = early
        view = self._grad_view(self._by_leaf[id(param)])
        if param.grad is not None and param.grad.data_ptr() != view.data_ptr():
            # autograd made a new tensor instead of accumulating into the view: fold it in.
            view.add_(param.grad)
            comm.count_copy(view)
            param.grad = view
        self._received.add(id(param))
        self._grads_arrived += 1
        self._maybe_prefetch()
        if self._grads_arrived == len(self._grad_params):
            self.end_backward()
        if self.on_grad_ready is not None:
            self.on_grad_ready()

    def end_backward(self) -> None:
        """All gradients of this backward are in: reduce-scatter (unless accumulating) and free."""
        if self._backward_done:
            return
        self._backward_done = True
        self._backward_prefetch = []  # not reached: the unit's own pre-backward will gather it
        if self.requires_gradient_sync and self._grad_params:
            self._reduce_scatter()
        self.reshard()

    def _reduce_scatter(self) -> None:
        full = comm.cast(self.grad_buffer, self.reduce_dtype)
        output = torch.empty(self.layout.shard_size, dtype=self.reduce_dtype, device=full.device)
        work = comm.reduce_scatter_avg(output, full, self.group)
        for p in self._grad_params:
            p.unsharded.grad = None
        if full is not self.grad_buffer:
            _free(self.grad_buffer)
        self._pending = _PendingReduce(work, output, full, self._received.copy())
        if self.on_reduce_issued is not None:
            self.on_reduce_issued(self)

    @property
    def in_backward(self) -> bool:
        return not self._backward_done

    def reduce_completed(self) -> bool:
        return self._pending is not None and self._pending.work.is_completed()

    def finish_reduce(self) -> None:
        """Wait for the in-flight reduce-scatter and hand out the sharded gradients (views of its output)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        with torch.profiler.record_function("scalestack::wait_reduce_scatter"):
            pending.work.wait()
        if pending.source is self.grad_buffer:
            _free(self.grad_buffer)
        grads = comm.cast(pending.output, self.shard_buffer.dtype)
        for p in self._grad_params:
            if id(p.unsharded) not in pending.received:
                continue
            view = grads[p.piece.local_offset : p.piece.local_offset + p.piece.numel]
            if p.sharded.grad is None:
                p.sharded.grad = view
            else:
                p.sharded.grad += view
                comm.count_copy(view)
