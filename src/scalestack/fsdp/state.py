"""The hooks: per-module ``FSDPState`` and the root's ``StepContext``. Thin: they decide *when*, the unit does it.

Forward: the unit gathers (usually prefetched by the unit before it), the inputs get a post-backward
trigger and the outputs a pre-backward hook. Backward: the pre-backward hook gathers the unit again and
prefetches the unit that ran before it; the trigger on its inputs runs after every autograd node that
produces the inputs' gradients, i.e. after every node that can read the unit's full parameters, and then
the unit reduces and frees. That point is the same on every rank whatever gradients a rank received, so
every rank issues the same collectives in the same order (counting gradient arrivals would not be). Units
whose inputs need no gradient (the root) are finished at the end of backward, in a fixed order.

A forward that runs while the unit is in backward is activation checkpointing recomputing it: it only
makes sure the parameters are gathered (no prefetch, no reshard, no trigger).
"""

from __future__ import annotations

import dataclasses
from enum import Enum, auto
from typing import Any

import torch
import torch.nn as nn
from torch.distributed import ProcessGroup
from torch.utils._pytree import tree_flatten, tree_unflatten

from .mixed_precision import MixedPrecisionPolicy
from .unit import ShardedUnit, ShardState, TrainingState

_dynamo_disable = torch._dynamo.disable  # hooks stay eager under torch.compile (Dynamo graph-breaks around them)


STATE_ATTR = "_scalestack_state"  # the FSDPState of a module passed to fully_shard


def state_of(module: nn.Module) -> FSDPState | None:
    return module.__dict__.get(STATE_ATTR)


class StepState(Enum):
    IDLE = auto()
    FORWARD = auto()
    BACKWARD = auto()


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor in ``obj``: nested tuples, lists, dicts, dataclasses (pytree misses dataclasses)."""
    out: list[torch.Tensor] = []
    stack, seen = [obj], set()
    while stack:
        x = stack.pop()
        if torch.is_tensor(x):
            out.append(x)
        elif id(x) in seen:
            continue
        elif isinstance(x, (list, tuple)):
            seen.add(id(x))
            stack.extend(x)
        elif isinstance(x, dict):  # Hugging Face ModelOutput is an OrderedDict
            seen.add(id(x))
            stack.extend(x.values())
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            seen.add(id(x))
            stack.extend(getattr(x, f.name) for f in dataclasses.fields(x))
    return out


def _in_backward() -> bool:
    """True inside an autograd backward pass (e.g. a reentrant checkpoint recomputing a forward)."""
    return torch._C._current_graph_task_id() != -1


class _Trigger:
    """One pending post-backward trigger of a unit. A graph freed without a backward (a grad-enabled
    evaluation forward, a skipped step) frees its trigger too, which takes back its count."""

    def __init__(self, state: FSDPState) -> None:
        self.state, self.fired = state, False
        state.unit.triggers_pending += 1

    def fire(self) -> None:
        self.fired = True
        self.state.on_trigger()

    def __del__(self) -> None:
        if not self.fired:
            self.state.unit.triggers_pending -= 1


class _PostBackward(torch.autograd.Function):
    """Identity on a unit's inputs; its backward runs once the inputs' gradients are complete."""

    @staticmethod
    def forward(ctx, trigger: _Trigger, *tensors: torch.Tensor):
        ctx.trigger = trigger
        return tensors

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        ctx.trigger.fire()
        return (None, *grads)


class StepContext:
    """What the root knows of one step: unit order (for prefetch), reduces in flight and the end of backward."""

    def __init__(self, states: list[FSDPState]) -> None:
        self.states = states  # module-tree order, the same on every rank
        self.state = StepState.IDLE
        self.is_last_backward = True
        self.forward_order: list[FSDPState] = []
        self.post_forward_order: list[FSDPState] = []  # with multiplicity: a unit run twice appears twice
        self.in_flight: list[ShardedUnit] = []
        self._forward_next: dict[FSDPState, FSDPState] = {}  # from the previous step

    def __repr__(self) -> str:
        return f"StepContext({len(self.states)} states, {self.state.name}, {len(self.in_flight)} reduces in flight)"

    def begin_forward(self) -> None:
        if self.state is StepState.BACKWARD:  # a backward that never reached its end
            self.end_backward()
        for s in self.states:  # partial copies of a forward no backward followed may be stale (a step since)
            if s.unit is not None and s.unit.state is ShardState.PARTLY_SHARDED:
                s.unit.reshard()
        if self.forward_order:
            order = list(dict.fromkeys(self.forward_order))
            self._forward_next = dict(zip(order, order[1:]))
        self._clear_orders()
        self.state = StepState.FORWARD

    def _clear_orders(self) -> None:
        self.forward_order, self.post_forward_order = [], []
        for s in self.states:
            s.post_forward_indices.clear()
            s.to_run.clear()

    def end_forward(self) -> None:
        """Units the implicit prefetch gathered but this forward did not run (early exit): free them now."""
        ran = set(self.forward_order)
        for s in self.states:
            if s not in ran and s.unit is not None and s.unit.training_state is TrainingState.IDLE:
                s.unit.reshard()

    def forward_prefetch(self, state: FSDPState) -> list[FSDPState]:
        if state.forward_prefetch is not None:
            return state.forward_prefetch
        nxt = self._forward_next.get(state)
        return [nxt] if nxt is not None else []

    def backward_prefetch(self, state: FSDPState) -> list[FSDPState]:
        if state.backward_prefetch is not None:
            return state.backward_prefetch
        if not state.post_forward_indices:
            return []
        i = state.post_forward_indices.pop()
        return [self.post_forward_order[i - 1]] if i > 0 else []

    def begin_backward(self) -> None:
        if self.state is not StepState.BACKWARD:
            self.state = StepState.BACKWARD
            torch.autograd.Variable._execution_engine.queue_callback(self.end_backward)

    def reduce_issued(self, unit: ShardedUnit) -> None:
        """Keep one reduce-scatter in flight behind the newest: finishing it frees its grad buffer. Under HSDP
        the older ones' all-reduces across replicas are issued now, and one more unit stays in flight."""
        self.issue_replica_reduces()
        self.in_flight.append(unit)
        while len(self.in_flight) > (2 if unit.replicate_group is not None else 1):
            self.in_flight.pop(0).finish_reduce()

    def issue_replica_reduces(self) -> None:
        """HSDP: issue the all-reduces across replicas of every reduce in flight, oldest first, so that every
        rank issues them in the same order (never in the order that reduce-scatters happen to finish)."""
        for u in self.in_flight:
            u.issue_replica_reduce()

    def free_finished_reduces(self) -> None:
        while self.in_flight and self.in_flight[0].reduce_completed():
            self.in_flight.pop(0).finish_reduce()

    @_dynamo_disable
    def end_backward(self) -> None:
        """Finish units no trigger reached (the root, units whose inputs need no gradient), in tree order,
        then wait for every reduce-scatter (unless ``set_is_last_backward(False)``) and free all."""
        if self.state is not StepState.BACKWARD:
            return
        for s in self.states:
            u = s.unit
            if u is not None and (u.ran_forward_with_grad or u.training_state is TrainingState.PRE_BACKWARD):
                s.post_backward()
        if self.is_last_backward:
            self.issue_replica_reduces()
            for s in self.states:
                if s.unit is not None:
                    s.unit.finish_reduce()
            self.in_flight.clear()
        for s in self.states:
            if s.unit is not None:
                if s.unit.reshard_after_backward:
                    s.unit.reshard()
                s.unit.training_state = TrainingState.IDLE
        self.state = StepState.IDLE

    def reset(self) -> None:
        for s in self.states:
            if s.unit is not None:
                s.unit.reset()
        self._clear_orders()
        self.in_flight.clear()
        self.state = StepState.IDLE


class FSDPState:
    """The hooks of one ``fully_shard`` call (shared by every module of a list passed as one unit)."""

    def __init__(self, modules: list[nn.Module], unit: ShardedUnit | None, group: ProcessGroup,
                 mp_policy: MixedPrecisionPolicy, reshard_after_forward: bool | None,
                 post_forward_group: ProcessGroup | None = None) -> None:  # fmt: skip
        self.modules = modules
        self.unit = unit
        self.group = group
        self.mp_policy = mp_policy
        self.reshard_after_forward = reshard_after_forward  # None: True, except for the root
        self.post_forward_group = post_forward_group  # reshard_after_forward=n: keep 1/n over this block
        self.forward_prefetch: list[FSDPState] | None = None
        self.backward_prefetch: list[FSDPState] | None = None
        self.ctx: StepContext | None = None  # set at lazy init, shared by every state under one root
        self.is_root = False
        self.is_last_backward = True  # set before the first forward; copied to the step context at lazy init
        self.post_forward_indices: list[int] = []  # where its forwards sit in ctx.post_forward_order
        self.to_run: set[int] = set()  # modules of this unit not yet through their forward in this round
        self.expects_backward = False  # an output of this round needs a gradient (its pre-backward will run)

    def __repr__(self) -> str:
        name = self.unit.name if self.unit is not None else type(self.modules[0]).__name__
        return f"FSDPState({name!r}, root={self.is_root}, {len(self.modules)} module(s))"

    # ------------------------------------------------------------------ forward
    @_dynamo_disable
    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.ctx is None:
            from .init import lazy_init  # init knows the states of the whole tree; it imports this module

            lazy_init(self)
        unit = self.unit
        if unit is not None and unit.training_state is TrainingState.PRE_BACKWARD:
            unit.wait_for_unshard()  # a recompute (non-reentrant checkpoint): the parameters are all it needs
            return self._cast_inputs(args, kwargs)
        grad = torch.is_grad_enabled()
        if grad and _in_backward():  # a forward run by backward (reentrant checkpoint): its backward begins
            self.pre_backward()
            if unit is not None and not unit.ran_forward_with_grad:  # reentrant: the first forward had no graph
                args, kwargs = self._register_trigger(args, kwargs)
            return self._cast_inputs(args, kwargs)
        first = not self.to_run
        if first:
            ctx = self.ctx
            if self.is_root:
                ctx.begin_forward()  # clears every unit's to_run: a forward that skipped a list unit's module
            self.to_run = {id(m) for m in self.modules}
            self.expects_backward = False
            ctx.forward_order.append(self)
            if unit is not None:
                with unit.profile_range("pre_forward"):
                    unit.pre_forward(grad)
            for target in ctx.forward_prefetch(self):
                if target.unit is not None:
                    target.unit.unshard(async_op=True)
        if grad:
            args, kwargs = self._register_trigger(args, kwargs)
        return self._cast_inputs(args, kwargs)

    @_dynamo_disable
    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        unit = self.unit
        if unit is not None and unit.training_state is TrainingState.PRE_BACKWARD:
            return self._cast_output(output)  # a recompute in backward: keep everything for the backward
        grad = torch.is_grad_enabled()
        if grad:
            tensors = [t for t in tensors_in(output) if t.requires_grad]
            if tensors:
                torch.autograd.graph.register_multi_grad_hook(tensors, self._on_output_grad, mode="any")
                self.expects_backward = True
        self.to_run.discard(id(module))
        if self.to_run:
            return self._cast_output(output)  # other modules of this unit still have to run
        ctx = self.ctx
        if self.expects_backward:  # the backward prefetch follows only units whose backward will run
            ctx.post_forward_order.append(self)
            self.post_forward_indices.append(len(ctx.post_forward_order) - 1)
        if unit is not None:
            keep = self.is_root if self.reshard_after_forward is None else not self.reshard_after_forward
            to_group = self.post_forward_group if grad and self.reshard_after_forward else None
            unit.post_forward(reshard=not keep or (not grad and not self.is_root), to_group=to_group)
        if self.is_root:
            if grad:
                ctx.end_forward()
            else:  # evaluation: nothing will come back for the full parameters
                for s in ctx.states:
                    if s.unit is not None:
                        s.unit.reshard()
                ctx.state = StepState.IDLE
        return self._cast_output(output)

    def _register_trigger(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.unit is None:
            return args, kwargs
        flat, spec = tree_flatten((args, kwargs))
        index = [i for i, t in enumerate(flat) if torch.is_tensor(t) and t.requires_grad]
        if not index:
            return args, kwargs
        outs = _PostBackward.apply(_Trigger(self), *(flat[i] for i in index))
        for i, t in zip(index, outs):
            flat[i] = t
        return tree_unflatten(flat, spec)

    def _cast_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        mp = self.mp_policy
        if not mp.cast_forward_inputs or mp.param_dtype is None:
            return args, kwargs
        return _cast((args, kwargs), mp.param_dtype)

    def _cast_output(self, output: Any) -> Any:
        dtype = self.mp_policy.output_dtype
        return output if dtype is None else _cast(output, dtype)

    # ------------------------------------------------------------------ backward
    @_dynamo_disable
    def _on_output_grad(self, grads: Any) -> None:
        self.pre_backward()

    def pre_backward(self) -> None:
        ctx = self.ctx
        ctx.begin_backward()
        ctx.free_finished_reduces()
        unit = self.unit
        if unit is not None:
            with unit.profile_range("pre_backward"):
                unit.pre_backward()
        for target in ctx.backward_prefetch(self):
            u = target.unit
            if u is not None and u.training_state is not TrainingState.POST_BACKWARD:
                u.unshard(async_op=True)

    def on_trigger(self) -> None:
        self.ctx.begin_backward()  # in case no output hook of any unit fired (outputs in an unknown container)
        unit = self.unit
        unit.triggers_pending -= 1
        if unit.triggers_pending <= 0:
            self.post_backward()

    def post_backward(self) -> None:
        unit = self.unit
        unit.post_backward()
        if unit.reduce_pending:
            self.ctx.reduce_issued(unit)


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    flat, spec = tree_flatten(obj)
    flat = [t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t for t in flat]
    return tree_unflatten(flat, spec)
