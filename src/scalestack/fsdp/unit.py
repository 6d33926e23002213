"""One sharded unit: its flat buffers and the state machine that moves between them.

A unit holds one or more flat buffers (``FlatBuffer``; several when the planner splits the unit to cut
padding, see ``plan_buffers``), each with its own layout, shard size S and collective, and each made of:

shard buffer  (S, master dtype, persistent)    -- the registered parameters are 1-D views of it
gather buffer (W*S, compute dtype, transient)  -- the full parameters used in compute are views of it
grad buffer   (W*S, compute dtype, transient)  -- autograd accumulates full gradients into views of it

The gather and grad buffers keep their tensor objects for the unit's lifetime and only their storage is
allocated and freed, so the parameter views (and the tensors autograd saved for backward) stay valid.
The unit moves all its buffers together: one all-gather per buffer, all issued before any is waited on,
and one reduce-scatter per buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto

import torch
import torch.nn as nn
from torch.distributed import ProcessGroup, Work

from . import collectives as comm
from .layout import Layout, Piece, TensorSlot
from .planner import Plan

# The next unit's all-gather is issued once this fraction of this unit's gradients has arrived: it still
# overlaps most of the backward, but not the activation-gradient peak at its start (in a transformer block
# the MLP's). Measured on the benchmark GPT: issuing it at the unit's pre-backward peaks 4% higher.
BACKWARD_PREFETCH_AFTER = 0.25


class ShardState(Enum):
    SHARDED = auto()  # only the shard buffers exist; the module shows the sharded pieces
    GATHERING = auto()  # the all-gathers into the gather buffers are in flight
    UNSHARDED = auto()  # the module shows full parameters, views of the gather buffers


@dataclass(eq=False)
class FlatBuffer:
    """One flat buffer of a unit: its layout and its shard / gather / grad tensors (see the module doc)."""

    layout: Layout
    shard: torch.Tensor  # S elements, master dtype
    gather: torch.Tensor  # W*S elements, compute dtype; storage freed while sharded
    grad: torch.Tensor  # W*S elements, compute dtype; storage freed outside backward / accumulation


@dataclass(eq=False)
class ManagedParam:
    """A parameter of the unit: where it is registered, its sharded piece and its full (unsharded) view."""

    fqn: str  # first name under the unit's module
    uses: list[tuple[nn.Module, str]]  # every (module, attribute) that registers it (tied weights)
    buffer: FlatBuffer  # the flat buffer that holds it
    slot_index: int  # its slot in ``buffer.layout``
    piece: Piece
    sharded: nn.Parameter
    unsharded: nn.Parameter

    @property
    def requires_grad(self) -> bool:
        return self.sharded.requires_grad

    @property
    def slot(self) -> TensorSlot:
        return self.buffer.layout.slots[self.slot_index]


@dataclass
class _PendingReduce:
    work: Work
    buffer: FlatBuffer
    output: torch.Tensor
    source: torch.Tensor  # kept alive until the collective is done


@dataclass
class _PendingGather:
    gather: comm.PendingGather
    source: torch.Tensor  # kept alive until the collective is done


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
    plan: Layout | Plan  # what the planner returned: a Layout (max_buffers=1) or a Plan, one Layout per buffer
    buffers: list[FlatBuffer]
    group: ProcessGroup
    rank: int
    params: list[ManagedParam]
    reduce_dtype: torch.dtype
    reshard_after_forward: bool = True
    requires_gradient_sync: bool = True
    state: ShardState = ShardState.SHARDED
    _gathers: list[_PendingGather] = field(default_factory=list)
    _grads_arrived: int = 0
    _backward_done: bool = True
    _pending: list[_PendingReduce] = field(default_factory=list)
    _pending_received: set[int] = field(default_factory=set)  # leaves whose reduced gradient is pending
    on_reduce_issued: Callable[[ShardedUnit], None] | None = None  # lets the root bound in-flight reduces
    on_grad_ready: Callable[[], None] | None = None  # lets the root free finished reduces early
    _received: set[int] = field(default_factory=set)  # leaves with a gradient in this accumulation window
    _backward_prefetch: list[ShardedUnit] = field(default_factory=list)
    _hooks: list = field(default_factory=list)

    def __post_init__(self) -> None:
        for b in self.buffers:
            _free(b.gather)
            _free(b.grad)
        self._grad_params = [p for p in self.params if p.requires_grad]
        self._by_leaf = {id(p.unsharded): p for p in self._grad_params}
        for p in self._grad_params:
            self._hooks.append(p.unsharded.register_post_accumulate_grad_hook(self._on_grad_ready))

    @property
    def device(self) -> torch.device:
        return self.buffers[0].shard.device

    @property
    def dtype(self) -> torch.dtype:
        """The master (shard) dtype."""
        return self.buffers[0].shard.dtype

    # ---------------------------------------------------------------- all-gather / free
    def unshard(self, async_op: bool = False) -> None:
        if self.state is ShardState.SHARDED:
            for b in self.buffers:  # issue every buffer's all-gather before waiting on any
                _alloc(b.gather)
                source = comm.cast(b.shard, b.gather.dtype)
                self._gathers.append(_PendingGather(comm.all_gather(b.gather, source, self.group), source))
            self.state = ShardState.GATHERING
        if not async_op:
            self.wait_for_unshard()

    def _wait_gathers(self) -> None:
        for g in self._gathers:
            g.gather.wait()
        self._gathers = []

    def wait_for_unshard(self) -> None:
        if self.state is ShardState.SHARDED:
            self.unshard(async_op=True)
        if self.state is ShardState.GATHERING:
            self._wait_gathers()
            self.state = ShardState.UNSHARDED
            self.show(unsharded=True)

    def reshard(self) -> None:
        if self.state is ShardState.SHARDED:
            return
        if self.state is ShardState.GATHERING:
            self._wait_gathers()
        self.show(unsharded=False)
        for b in self.buffers:
            _free(b.gather)
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
        fresh = False
        for b in self.buffers:
            if _alloc(b.grad):
                b.grad.zero_()
                fresh = True
        if fresh:
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

    @staticmethod
    def _grad_view(p: ManagedParam) -> torch.Tensor:
        slot = p.slot
        return p.buffer.grad[slot.offset : slot.end].view(slot.shape)

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
        self.finish_reduce()  # a previous reduce still in flight (none in a normal step) lands first
        for b in self.buffers:  # one reduce-scatter per buffer, all in flight together
            full = comm.cast(b.grad, self.reduce_dtype)
            output = torch.empty(b.layout.shard_size, dtype=self.reduce_dtype, device=full.device)
            work = comm.reduce_scatter_avg(output, full, self.group)
            self._pending.append(_PendingReduce(work, b, output, full))
        for p in self._grad_params:
            p.unsharded.grad = None
        for r in self._pending:
            if r.source is not r.buffer.grad:  # the cast holds the data: the grad buffer can go now
                _free(r.buffer.grad)
        self._pending_received = self._received.copy()
        if self.on_reduce_issued is not None:
            self.on_reduce_issued(self)

    @property
    def in_backward(self) -> bool:
        return not self._backward_done

    def reduce_completed(self) -> bool:
        return bool(self._pending) and all(r.work.is_completed() for r in self._pending)

    def finish_reduce(self) -> None:
        """Wait for the in-flight reduce-scatters and hand out the sharded gradients (views of their output)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        with torch.profiler.record_function("scalestack::wait_reduce_scatter"):
            for r in pending:
                r.work.wait()
        grads = {}
        for r in pending:
            if r.source is r.buffer.grad:
                _free(r.buffer.grad)
            grads[id(r.buffer)] = comm.cast(r.output, r.buffer.shard.dtype)
        for p in self._grad_params:
            if id(p.unsharded) not in self._pending_received:
                continue
            view = grads[id(p.buffer)][p.piece.local_offset : p.piece.local_offset + p.piece.numel]
            if p.sharded.grad is None:
                p.sharded.grad = view
            else:
                p.sharded.grad += view
                comm.count_copy(view)
