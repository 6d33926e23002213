"""One sharded unit: its flat buffers and the two state machines that move between them.

A unit holds one or more flat buffers (``FlatBuffer``; several when the planner splits the unit to cut
padding), each with its own layout, shard size S and collectives:

shard buffer  (S, master dtype, persistent)    -- the registered parameters are views of it
gather buffer (W*S, compute dtype, transient)  -- the full parameters used in compute are views of it
grad buffer   (W*S, compute dtype, transient)  -- autograd accumulates full gradients into views of it
accumulator   (W*S, reduce dtype, optional)    -- no-sync micro-batches when reduce and compute differ

The gather and grad buffers keep their tensor objects for the unit's lifetime and only their storage is
allocated and freed, so the parameter views (and the tensors autograd saved for backward) stay valid.

``ShardState`` says where the parameters are (sharded, gathering, unsharded); ``TrainingState`` says where
the unit is in a step, which is what lets a forward that activation checkpointing re-runs inside backward
neither prefetch nor reshard. The unit does the work; the hooks in ``state.py`` decide when.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from enum import Enum, auto

import torch
import torch.nn as nn
from torch.distributed import ProcessGroup, Work

from ..planner.layout import Layout
from ..planner.search import Plan
from . import collectives as comm
from .mesh import ShardGroups
from .param import ManagedParam


class ShardState(Enum):
    SHARDED = auto()  # only the shard buffers exist; the module shows the sharded pieces
    PARTLY_SHARDED = auto()  # after forward with reshard_after_forward=n: each rank keeps 1/n of the gather
    GATHERING = auto()  # the all-gathers into the gather buffers are in flight
    UNSHARDED = auto()  # the module shows full parameters, views of the gather buffers


class TrainingState(Enum):
    IDLE = auto()  # between steps, or after its forward
    FORWARD = auto()  # inside its forward
    PRE_BACKWARD = auto()  # its backward has begun: gathered, gradients land in the grad buffers
    POST_BACKWARD = auto()  # its gradients of this backward are reduced (or kept for accumulation)


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


def _allocated(t: torch.Tensor) -> bool:
    return t.untyped_storage().size() > 0


class FlatBuffer:
    """One flat buffer of a unit: its layout and its shard / gather / grad tensors (see the module doc)."""

    def __init__(self, layout: Layout, shard: torch.Tensor, compute: torch.dtype) -> None:
        self.layout = layout
        self.shard = shard
        self.gather = torch.empty(layout.total_size, dtype=compute, device=shard.device)
        self.grad = torch.empty(layout.total_size, dtype=compute, device=shard.device)
        self.accum: torch.Tensor | None = None
        self.partial: torch.Tensor | None = None  # PARTLY_SHARDED: this rank's 1/n of the gather buffer

    def __repr__(self) -> str:  # never prints tensors: their storage may be freed
        return (
            f"FlatBuffer(W={self.layout.world_size}, S={self.layout.shard_size}, {self.shard.dtype}->"
            f"{self.gather.dtype}, gathered={_allocated(self.gather)}, grad={_allocated(self.grad)})"
        )


class _PendingReduce:
    """One buffer's gradient reduction in flight: the reduce-scatter, then (HSDP) the all-reduce across
    replicas of its output, issued once the reduce-scatter is done."""

    def __init__(self, work: Work | None, buffer: FlatBuffer, output: torch.Tensor, source: torch.Tensor) -> None:
        self.work, self.buffer, self.output, self.source = work, buffer, output, source  # source: alive till done
        self.replicas: Work | None = None


class _GradientHook:
    """The full parameter's post-accumulate-grad hook. It holds the unit and the parameter weakly: the hook
    lives in autograd's C++ node of the tensor, which Python's gc cannot see, so a strong reference back to the
    unit would keep the whole model alive forever."""

    def __init__(self, unit: ShardedUnit, param: ManagedParam) -> None:
        self.unit, self.param = weakref.ref(unit), weakref.ref(param)

    def __call__(self, _tensor: torch.Tensor) -> None:
        unit, param = self.unit(), self.param()
        if unit is not None and param is not None:
            unit._on_gradient(param)


class ShardedUnit:
    """The parameters of one ``fully_shard`` call; gathered, reduced and freed together."""

    def __init__(self, name: str, plan: Plan, buffers: list[FlatBuffer], params: list[ManagedParam],
                 groups: ShardGroups, reduce_dtype: torch.dtype) -> None:  # fmt: skip
        self.name = name
        self.plan = plan
        self.buffers = buffers
        self.params = params
        self.group = groups.shard
        self.replicate_group = groups.replicate  # HSDP: gradients are averaged across it after the reduce-scatter
        self.mesh_group = groups.everyone
        self._post_forward_group: ProcessGroup | None = None  # the group the partial copies gather over
        self.reduce_dtype = reduce_dtype
        self.reshard_after_backward = True
        self.requires_gradient_sync = True
        self.state = ShardState.SHARDED
        self.training_state = TrainingState.IDLE
        self.ran_forward_with_grad = False  # since its last post-backward: it owes a post-backward
        self.triggers_pending = 0  # post-backward triggers registered on its inputs and not yet fired
        # set by the root at lazy init: between gradient arrivals, finished reduce-scatters free their buffers
        # (local bookkeeping only, no collective: safe at a point that differs across ranks)
        self.on_gradient: Callable[[], None] | None = None
        self._gathers: list[comm.PendingGather] = []
        self._received: set[ManagedParam] = set()  # params with a local gradient in this accumulation window
        self._hooked: set[ManagedParam] = set()  # full tensors that report gradients (hooks need requires_grad)
        self._pending: list[_PendingReduce] = []
        # the flags all-reduce, its tensor, the reduced params and which of them got a gradient here
        self._pending_flags: tuple[Work | None, torch.Tensor, list[ManagedParam], list[bool]] | None = None
        self._replicas_issued = False  # HSDP: the all-reduces across replicas of the pending reduce are issued
        # set by the root at lazy init: issue the replicas' all-reduces of every pending reduce, oldest first
        self.advance_reduces: Callable[[], None] | None = None
        for b in buffers:  # the parameter views exist now: their storage can go until the first gather
            _free(b.gather)
            _free(b.grad)

    @property
    def device(self) -> torch.device:
        return self.buffers[0].shard.device

    @property
    def dtype(self) -> torch.dtype:
        """The master (shard) dtype."""
        return self.buffers[0].shard.dtype

    def __repr__(self) -> str:
        return (
            f"ShardedUnit({self.name!r}, {len(self.params)} params, {len(self.buffers)} buffer(s), "
            f"{self.state.name}, {self.training_state.name})"
        )

    @property
    def on_meta(self) -> bool:
        """Built from a module on the meta device and not given real storage yet (``materialize``, ``to_empty``)."""
        return self.device.type == "meta"

    def allocate(self, device: torch.device) -> None:
        """Give a unit built on the meta device shards on ``device`` (zeros: no values yet). The parameter
        objects stay the same (their contents are swapped), so optimizers and references taken before keep
        working."""
        for b in self.buffers:  # zeros: the padding between pieces must not hold garbage
            b.shard = torch.zeros(b.layout.shard_size, dtype=b.shard.dtype, device=device)
            b.gather = torch.empty(b.layout.total_size, dtype=b.gather.dtype, device=device)
            b.grad = torch.empty_like(b.gather)
        for p in self.params:
            b = self.buffers[p.buffer_index]
            info, grad = p.info, p.sharded.requires_grad
            torch.utils.swap_tensors(p.sharded, nn.Parameter(p.in_shard(b.shard), requires_grad=grad))
            torch.utils.swap_tensors(p.unsharded, nn.Parameter(p.in_full(b.gather), requires_grad=grad))
            p.attach(p.sharded, p.unsharded, info)
        for b in self.buffers:
            _free(b.gather)
            _free(b.grad)

    def trainable(self) -> list[ManagedParam]:
        """Parameters that train now: ``requires_grad`` is read live, so freezing after fully_shard works."""
        return [p for p in self.params if p.sharded.requires_grad]

    # ---------------------------------------------------------------- all-gather / free
    def profile_range(self, phase: str) -> torch.profiler.record_function:
        """A profiler range named by phase and unit in FSDP2's style: ``scalestack::pre_forward (layers.0)``
        (nothing, not even the name, while no profiler runs: these wrap hooks of every step)."""
        if not torch.autograd._profiler_enabled():
            return contextlib.nullcontext()
        return torch.profiler.record_function(f"scalestack::{phase} ({self.name})")

    def unshard(self, async_op: bool = False) -> None:
        if self.state in (ShardState.SHARDED, ShardState.PARTLY_SHARDED):
            with self.profile_range("unshard"):
                self._issue_gathers()
        if not async_op:
            self.wait_for_unshard()

    def _issue_gathers(self) -> None:
        if self.state is ShardState.SHARDED:
            for b in self.buffers:  # issue every buffer's all-gather before waiting on any
                _alloc(b.gather)
                self._gathers.append(comm.all_gather(b.gather, comm.cast(b.shard, b.gather.dtype), self.group))
            self.state = ShardState.GATHERING
        elif self.state is ShardState.PARTLY_SHARDED:  # backward: gather the n copies of one block only
            for b in self.buffers:
                _alloc(b.gather)
                self._gathers.append(comm.all_gather(b.gather, b.partial, self._post_forward_group))
            self.state = ShardState.GATHERING

    def wait_for_unshard(self) -> None:
        if self.state in (ShardState.SHARDED, ShardState.PARTLY_SHARDED):
            self.unshard(async_op=True)
        if self.state is ShardState.GATHERING:
            self._wait_gathers()
            self.state = ShardState.UNSHARDED
            self._to_unsharded()

    def reshard(self) -> None:
        if self.state is ShardState.SHARDED:
            return
        self._wait_gathers()
        self._to_sharded()
        for b in self.buffers:
            _free(b.gather)
            b.partial = None
        self.state = ShardState.SHARDED

    def reshard_to(self, group: ProcessGroup) -> None:
        """Free the gathered parameters but keep this rank's 1/n of them (n = the size of ``group``, a block
        of consecutive ranks): backward gathers them back within the block."""
        if self.state is not ShardState.UNSHARDED:
            self.reshard()
            return
        n, i = group.size(), group.rank()
        self._to_sharded()
        for b in self.buffers:
            part = b.layout.total_size // n
            b.partial = b.gather[i * part : (i + 1) * part].clone()
            comm.count_copy(b.partial)
            _free(b.gather)
        self._post_forward_group = group
        self.state = ShardState.PARTLY_SHARDED

    def _wait_gathers(self) -> None:
        gathers, self._gathers = self._gathers, []
        for g in gathers:
            g.wait()
        for b in self.buffers:
            b.partial = None

    def _to_unsharded(self) -> None:
        self._sync_requires_grad()
        for p in self.params:
            for module, attr in p.uses:
                module._parameters[attr] = p.unsharded

    def _sync_requires_grad(self) -> None:
        """Freezing or unfreezing after fully_shard sets the flag on whichever tensor the module showed: the
        sharded piece, or the full tensor while gathered. The side that changed since the last sync wins."""
        for p in self.params:
            full = p.unsharded.requires_grad
            wanted = full if full != p.synced_requires_grad else p.sharded.requires_grad
            if p.sharded.requires_grad != wanted:
                p.sharded.requires_grad_(wanted)
            if full != wanted:
                p.unsharded.requires_grad_(wanted)
            p.synced_requires_grad = wanted
            if wanted and p not in self._hooked:
                p.unsharded.register_post_accumulate_grad_hook(_GradientHook(self, p))
                self._hooked.add(p)

    def _on_gradient(self, p: ManagedParam) -> None:
        self._received.add(p)
        if self.on_gradient is not None:
            self.on_gradient()

    def _to_sharded(self) -> None:
        self._sync_requires_grad()
        for p in self.params:
            for module, attr in p.uses:
                module._parameters[attr] = p.sharded

    # ---------------------------------------------------------------- forward
    def pre_forward(self, grad_enabled: bool) -> None:
        if self.state is ShardState.UNSHARDED:  # kept gathered (reshard_after_backward=False)
            self._sync_requires_grad()
        self.wait_for_unshard()
        self.training_state = TrainingState.FORWARD
        self.ran_forward_with_grad |= grad_enabled

    def post_forward(self, reshard: bool, to_group: ProcessGroup | None = None) -> None:
        self.training_state = TrainingState.IDLE
        if reshard and to_group is not None:
            self.reshard_to(to_group)
        elif reshard:
            self.reshard()

    # ---------------------------------------------------------------- backward
    def _grad_buffers(self, params: list[ManagedParam]) -> list[FlatBuffer]:
        """The grad buffers that ``params`` live in, allocated (zeroed when new): a frozen buffer gets none."""
        used = sorted({p.buffer_index for p in params})
        out = []
        for i in used:
            b = self.buffers[i]
            if _alloc(b.grad):
                b.grad.zero_()
                comm.count_zero(b.grad)
            out.append(b)
        return out

    def pre_backward(self) -> None:
        """Gather (the prefetch usually did) and point every trainable full parameter's ``.grad`` at its view."""
        self.wait_for_unshard()
        if self.training_state is TrainingState.PRE_BACKWARD:
            return
        self.finish_reduce()  # an earlier reduce of this unit reads the grad buffer: land it before reuse
        self.training_state = TrainingState.PRE_BACKWARD
        trainable = self.trainable()
        self._grad_buffers(trainable)
        for p in trainable:
            p.unsharded.grad = p.in_full(self.buffers[p.buffer_index].grad)

    def post_backward(self) -> None:
        """This backward's gradients are all in: reduce-scatter them (or keep them for accumulation), free."""
        with self.profile_range("post_backward"):
            self._post_backward()

    def _post_backward(self) -> None:
        views_set = self.training_state is TrainingState.PRE_BACKWARD  # .grad are views of the grad buffers
        self.triggers_pending = 0
        self.ran_forward_with_grad = False
        self.finish_reduce()  # an earlier reduce of this unit still reading the grad buffer lands first
        trainable = self.trainable()
        buffers = self._grad_buffers(trainable) if trainable else []
        training = {id(p) for p in trainable}
        for p in self.params:
            g, p.unsharded.grad = p.unsharded.grad, None
            if g is None or id(p) not in training:
                continue
            view = p.in_full(self.buffers[p.buffer_index].grad)
            if g.data_ptr() != view.data_ptr():  # autograd made a new tensor instead of adding into the view
                view.copy_(g) if views_set else view.add_(g)  # the new tensor already holds the view
                comm.count_copy(view)
        for p in self._received:
            comm.count_add(p.unsharded)
        self.training_state = TrainingState.POST_BACKWARD
        if buffers:
            if self.requires_gradient_sync:
                self._reduce_scatter(buffers, trainable)
            elif self.reduce_dtype != buffers[0].grad.dtype:  # accumulate micro-batches in the reduce dtype
                for b in buffers:
                    self._accumulate(b)
        if self.reshard_after_backward:
            self.reshard()

    def _accumulate(self, b: FlatBuffer) -> None:
        if b.accum is None:
            b.accum = comm.cast(b.grad, self.reduce_dtype)
        else:
            b.accum.add_(b.grad)
            comm.count_copy(b.accum)
        _free(b.grad)

    def _reduce_scatter(self, buffers: list[FlatBuffer], trainable: list[ManagedParam]) -> None:
        for b in buffers:  # one reduce-scatter per buffer, all in flight together
            if b.accum is not None:  # the last micro-batch joins the ones accumulated in the reduce dtype
                self._accumulate(b)
                full, b.accum = b.accum, None
            else:
                full = comm.cast(b.grad, self.reduce_dtype)
            output = torch.empty(b.layout.shard_size, dtype=self.reduce_dtype, device=full.device)
            self._pending.append(_PendingReduce(comm.reduce_scatter_avg(output, full, self.group), b, output, full))
            if full is not b.grad:  # the cast holds the data: the grad buffer can go now
                _free(b.grad)
        # Which trainable parameters got a gradient on any rank: those are handed out (zeros where a rank
        # had none), the rest keep .grad None as in the unsharded model. The same on every rank.
        here = [p in self._received for p in trainable]
        flags = torch.tensor(here, dtype=torch.int32, device=self.device)
        self._pending_flags = (comm.all_reduce_flags(flags, self.group), flags, trainable, here)
        self._received.clear()

    @property
    def reduce_pending(self) -> bool:
        return bool(self._pending)

    def reduce_completed(self) -> bool:
        """Nothing of the pending reduce is in flight (under HSDP: its all-reduces were issued and are done)."""
        if not self._pending or (self.replicate_group is not None and not self._replicas_issued):
            return False
        return all((w := r.replicas or r.work) is None or w.is_completed() for r in self._pending)

    def issue_replica_reduce(self) -> None:
        """HSDP: once the reduce-scatters are done, issue the all-reduces of their outputs (and of the flags)
        across replicas. Every rank must call this for its units in the same order (the root does, oldest first)."""
        if self.replicate_group is None or not self._pending or self._replicas_issued:
            return
        self._wait_reduce_scatters()
        _, flags, params, here = self._pending_flags
        for r in self._pending:
            r.replicas = comm.all_reduce_avg(r.output, self.replicate_group)
        self._pending_flags = (comm.all_reduce_flags(flags, self.replicate_group), flags, params, here)
        self._replicas_issued = True

    def _wait_in_flight(self) -> None:
        """Wait for every collective of the pending reduce issued so far (nothing new is issued)."""
        self._wait_reduce_scatters()
        with torch.profiler.record_function("scalestack::wait_all_reduce"):
            for r in self._pending:
                if r.replicas is not None:
                    r.replicas.wait()
                    r.replicas = None

    def _wait_reduce_scatters(self) -> None:
        with torch.profiler.record_function("scalestack::wait_reduce_scatter"):
            for r in self._pending:
                if r.work is not None:
                    r.work.wait()
                    r.work = None
            work, *rest = self._pending_flags
            if work is not None:
                work.wait()
                self._pending_flags = (None, *rest)

    def finish_reduce(self) -> None:
        """Wait for the in-flight reduce-scatters (and all-reduces across replicas) and hand out the sharded
        gradients (views of their output)."""
        if not self._pending:
            return
        if self.replicate_group is not None and not self._replicas_issued:
            self.advance_reduces()  # issues this unit's all-reduces, after those of older units
        self._wait_in_flight()
        pending, self._pending = self._pending, []
        _, flags, params, here = self._pending_flags
        self._pending_flags = None
        self._replicas_issued = False
        grads = {}
        for r in pending:
            if r.source is r.buffer.grad:
                _free(r.buffer.grad)
            grads[id(r.buffer)] = comm.cast(r.output, r.buffer.shard.dtype)
        # read the flags (a device-to-host sync) only when some parameter got no gradient on this rank
        for p, got in zip(params, here if all(here) else flags.tolist()):
            if not got:
                continue
            view = p.in_shard(grads[id(self.buffers[p.buffer_index])])
            if p.sharded.grad is None:
                p.sharded.grad = view
            else:
                p.sharded.grad += view
                comm.count_add(view)

    # ---------------------------------------------------------------- recovery
    def reset(self) -> None:
        """Back to sharded and idle after a step that failed half-way (``FSDPModule.reset_iter_state``): waits
        for what is in flight, issues nothing new (the failure may have hit one rank only)."""
        if self._pending:
            self._wait_in_flight()
        self._pending, self._pending_flags, self._replicas_issued = [], None, False
        for p in self.params:
            p.unsharded.grad = None
        for b in self.buffers:
            _free(b.grad)
            b.accum = None
        self._received.clear()
        self.triggers_pending = 0
        self.ran_forward_with_grad = False
        self.reshard()
        self.training_state = TrainingState.IDLE
