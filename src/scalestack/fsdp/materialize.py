"""``scalestack.materialize``: real parameters for a model built on the meta device, one unit at a time.

Plain construction initializes a model in a fixed order: each layer's constructor calls its
``reset_parameters()`` (children before their parent), and many models end with ``self.apply(init)``
(nanoGPT, Hugging Face's ``post_init``). ``materialize`` replays exactly these passes in exactly that order,
so it draws the same random numbers as plain construction and its result is bitwise the unsharded model's.
A unit exists in full (one master-dtype buffer of W*S elements) only while its modules initialize; then this
rank keeps its pieces, so peak memory is the shards plus the largest unit.

What this asks of an init function (the docs say it to users):
- ``init(module)`` initializes ``module``'s own parameters and buffers; it may touch other parameters of the
  same unit, never those of another unit (that is detected and named), since that unit is not there now.
- Between passes a unit keeps only this rank's pieces: an init that *reads* a value an earlier pass wrote
  may read it only at the element it writes (``p.mul_(s)`` is fine, normalizing rows is not).
- Generators are the device's default ones, seeded by the caller, and the reference is built on the same
  device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from . import collectives as comm
from .state import state_of
from .unit import ShardedUnit

InitFn = Callable[[nn.Module], Any]


class _Unavailable(torch.Tensor):
    """Shown in place of the parameters of a unit that is not being initialized now: any use names it."""

    current_module = ""  # the module whose init is running (set by the walk)

    @staticmethod
    def __new__(cls, fqn: str, unit: str, shape: torch.Size, dtype: torch.dtype):
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device="meta")
        t.fqn, t.unit = fqn, unit
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        flat, _ = tree_flatten((args, kwargs))
        culprit = next(a for a in flat if isinstance(a, _Unavailable))
        raise RuntimeError(
            f"materialize: the init of module {cls.current_module or '<root>'!r} touched parameter "
            f"{culprit.fqn!r} of unit {culprit.unit!r}, which is not being initialized now ({func}). An init "
            "function may touch only the parameters of its module's unit: initialize each module's own "
            "parameters (materialize calls init on every module, children before parents)"
        )

    def __repr__(self) -> str:
        return f"<parameter {self.fqn!r} of unit {self.unit!r}, not materialized yet>"


def _post_order(module: nn.Module, name: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``Module.apply``'s order: children first, then the module."""
    for child_name, child in module.named_children():
        yield from _post_order(child, f"{name}.{child_name}" if name else child_name)
    yield name, module


def _owners(model: nn.Module) -> dict[nn.Module, ShardedUnit | None]:
    """The unit holding each module's own parameters: that of the nearest ``fully_shard`` module above it."""
    out: dict[nn.Module, ShardedUnit | None] = {}

    def visit(m: nn.Module, inherited: ShardedUnit | None) -> None:
        s = state_of(m)
        out[m] = owner = inherited if s is None else s.unit
        for child in m.children():
            if child not in out:
                visit(child, owner)

    visit(model, None)
    return out


def _fill_missing(t: torch.Tensor) -> torch.Tensor:
    """Float storage starts as NaN, so a value no init wrote is found afterwards."""
    return t.fill_(float("nan")) if t.is_floating_point() else t


class _OpenUnit:
    """At most one unit held in full while its modules initialize; this rank's pieces are its memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.unit: ShardedUnit | None = None
        self.full: list[torch.Tensor] = []

    def show_unavailable(self, unit: ShardedUnit) -> None:
        for p in unit.params:
            stand_in = _Unavailable(p.fqn, unit.name, p.slot.shape, unit.dtype)
            for module, attr in p.uses:
                module._parameters[attr] = stand_in

    def open(self, unit: ShardedUnit | None) -> None:
        if unit is self.unit:
            return
        self.close()
        if unit is None:
            return
        rank = unit.params[0].info.rank
        self.full = []
        for b in unit.buffers:  # what other ranks hold is NaN: only this rank's pieces carry over
            full = torch.full((b.layout.total_size,), float("nan"), dtype=b.shard.dtype, device=self.device)
            full[rank * b.layout.shard_size : (rank + 1) * b.layout.shard_size] = b.shard
            self.full.append(full)
        for p in unit.params:
            shown = nn.Parameter(p.in_full(self.full[p.buffer_index]), requires_grad=p.sharded.requires_grad)
            for module, attr in p.uses:
                module._parameters[attr] = shown
        self.unit = unit

    def close(self) -> None:
        unit, self.unit = self.unit, None
        if unit is None:
            return
        rank = unit.params[0].info.rank
        for b, full in zip(unit.buffers, self.full):
            b.shard.copy_(full[rank * b.layout.shard_size : (rank + 1) * b.layout.shard_size])
        self.full = []
        self.show_unavailable(unit)


def _reset_parameters(module: nn.Module) -> None:
    """What a layer's constructor runs (torch.nn's layers call it in ``__init__``)."""
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()


def _construction(model: nn.Module, init: InitFn | None) -> Iterator[tuple[str, nn.Module, InitFn]]:
    """The init calls of plain construction, in order: a module's children are built first, then its
    ``reset_parameters()`` runs; a model that ends its constructor with ``self.apply(self._init_weights)``
    (nanoGPT; Hugging Face's ``post_init``, which skips modules a nested model already initialized) then
    initializes every module under it not yet done. ``init`` given: it is the root's, and only its."""
    names = {m: n for n, m in model.named_modules(remove_duplicate=False)}
    done: set[nn.Module] = set()

    def build(m: nn.Module) -> Iterator[tuple[str, nn.Module, InitFn]]:
        for child in m.children():
            yield from build(child)
        yield names.get(m, ""), m, _reset_parameters
        scoped = init if m is model and init is not None else None
        if init is None and callable(getattr(m, "_init_weights", None)):
            scoped = m._init_weights
        if scoped is not None:
            for name, x in _post_order(m, names.get(m, "")):
                if x not in done:
                    done.add(x)
                    yield name, x, scoped

    yield from build(model)


def _loose_meta(model: nn.Module, units: list[ShardedUnit]) -> list[tuple[str, nn.Module, str, bool]]:
    """Meta parameters outside every unit (ignored ones) and meta buffers: (fqn, module, name, is_param)."""
    seen = {id(p.sharded) for u in units for p in u.params}
    out = []
    for prefix, m in model.named_modules(remove_duplicate=True):
        for kind, table in ((True, m._parameters), (False, m._buffers)):
            for name, t in table.items():
                if t is not None and t.is_meta and id(t) not in seen:  # a tied tensor once, at its first name
                    seen.add(id(t))
                    out.append((f"{prefix}.{name}" if prefix else name, m, name, kind))
    return out


class _Loose(NamedTuple):
    """A meta tensor outside every unit (an ignored parameter, a buffer) given storage, and the version its
    storage had then: unchanged afterwards means nothing wrote it, whatever its dtype."""

    fqn: str
    module: nn.Module
    name: str
    is_param: bool
    tensor: torch.Tensor
    version: int

    def current(self) -> torch.Tensor | None:
        return (self.module._parameters if self.is_param else self.module._buffers).get(self.name)

    def unwritten(self) -> bool:
        return self.current() is self.tensor and self.tensor._version == self.version


def allocate_meta(model: nn.Module, device: torch.device, units: list[ShardedUnit]) -> list[_Loose]:
    """Give every meta tensor of ``model`` storage on ``device``: units zeroed shards, the others empty
    storage (NaN for floats); return those others."""
    for unit in units:
        if unit.on_meta:
            unit.allocate(device)
    out = []
    for fqn, module, name, is_param in _loose_meta(model, units):
        t = getattr(module, name)
        real = _fill_missing(torch.empty_like(t, device=device))
        if is_param:  # the same object, so a parameter tied across modules stays tied
            torch.utils.swap_tensors(t, nn.Parameter(real, requires_grad=t.requires_grad))
            real = t
        else:
            module._buffers[name] = real
        out.append(_Loose(fqn, module, name, is_param, real, real._version))
    return out


def allocate_for_load(model: nn.Module, strict: bool) -> None:
    """``checkpoint.load`` into a model built on the meta device: uninitialized storage that the load fills,
    so the full model never exists anywhere."""
    from .api import units as units_of

    units = units_of(model)
    loose = _loose_meta(model, units)
    if not loose and not any(u.on_meta for u in units):
        return
    if not strict:
        raise ValueError(
            "this model is on the meta device: load it with strict=True (a tensor the checkpoint lacks would stay "
            "uninitialized), or call scalestack.materialize(model) first"
        )
    transient = {m for _, m, name, is_param in loose if not is_param and name in m._non_persistent_buffers_set}
    if any(p is not None for m in transient for p in m._parameters.values()):
        names = [fqn for fqn, m, _, is_param in loose if m in transient and not is_param]
        raise ValueError(
            f"buffers {names[:3]} of this meta-device model are not saved in checkpoints (non-persistent) and "
            "their modules hold parameters: call scalestack.materialize(model) first, then load"
        )
    allocated = allocate_meta(model, default_device(units), units)
    with torch.no_grad():  # parameter-free modules (rotary embeddings): their init computes these buffers
        for _, module, fn in _construction(model, None):
            if module in transient:
                fn(module)
    unset = [x.fqn for x in allocated if x.module in transient and x.unwritten()]
    if unset:
        raise ValueError(
            f"buffers {unset[:3]} are not saved in checkpoints and their modules' reset_parameters()/_init_weights "
            "did not compute them: call scalestack.materialize(model, init=...) first, then load"
        )


def default_device(units: list[ShardedUnit]) -> torch.device:
    """The current CUDA device for units on an NCCL group, else the CPU."""
    group = units[0].group if units else None
    if torch.cuda.is_available() and dist.is_initialized() and "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _unwritten(units: list[ShardedUnit], loose: list[_Loose]) -> str | None:
    """The first parameter or buffer that nothing initialized (its piece still NaN, or its storage untouched)."""
    for unit in units:
        for p in unit.params:
            if torch.isnan(p.sharded).any():
                return (
                    f"parameter {p.fqn!r} was not initialized (unit {unit.name!r}: no reset_parameters(), and init "
                    "did not write it)"
                )
    for x in loose:
        if x.unwritten():
            return f"{x.fqn!r} was not initialized by reset_parameters() or init"
    return None


def _agree(problem: str | None, units: list[ShardedUnit]) -> str | None:
    """Every rank learns whether any rank failed (one small all-reduce): none goes on alone into its first
    collective. A rank that holds nothing of a broken parameter gets a pointer to the one that does."""
    if not units or comm.single_process(units[0].mesh_group):
        return problem
    flag = torch.tensor([problem is not None], dtype=torch.int32, device=units[0].device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=units[0].mesh_group)
    if problem is None and flag.item():
        return "another rank failed to initialize a parameter (its error names it)"
    return problem


def _init_in_order(model: nn.Module, units: list[ShardedUnit], device: torch.device, init: InitFn | None,
                   tied: str) -> None:  # fmt: skip
    owners = _owners(model)
    key = {(id(m), attr): id(p) for u in units for p in u.params for m, attr in p.uses}  # stable across reopening
    opened = _OpenUnit(device)
    for unit in units:
        opened.show_unavailable(unit)
    first_writer: dict[int, nn.Module] = {}
    try:
        with torch.no_grad():
            for name, module, fn in _construction(model, init):
                opened.open(owners[module])
                _Unavailable.current_module = name
                _init_module(module, fn, key, first_writer if tied == "first" else None)
    finally:
        _Unavailable.current_module = ""
        opened.close()
        for unit in units:
            unit._to_sharded()


def _init_module(module: nn.Module, fn: InitFn, key: dict, first_writer: dict[int, nn.Module] | None) -> None:
    """``fn(module)``; a parameter tied to one an earlier module initialized keeps that module's values
    (``first_writer`` given), though ``fn`` still draws its random numbers. Its own frame, so nothing of
    the open unit outlives the call."""
    if first_writer is None:
        fn(module)
        return
    own = [(key.get((id(module), a), id(t)), t) for a, t in module._parameters.items() if t is not None]
    kept = [(t, t.clone()) for k, t in own if first_writer.setdefault(k, module) is not module]
    fn(module)
    for t, before in kept:
        t.copy_(before)


def _zero_padding(units: list[ShardedUnit]) -> None:
    """The gaps between pieces hold no parameter: zeros, not whatever the storage held."""
    for unit in units:
        for index, b in enumerate(unit.buffers):
            covered = torch.zeros(b.shard.numel(), dtype=torch.bool, device=b.shard.device)
            for p in unit.params:
                if p.buffer_index == index:
                    covered[p.piece.local_offset : p.piece.local_offset + p.piece.numel] = True
            b.shard.masked_fill_(~covered, 0)


def _back_to_meta(units: list[ShardedUnit], loose: list[_Loose]) -> None:
    """After a failed materialize: the model is as before it (on meta), so nothing half-initialized trains
    and a corrected call can run."""
    meta = torch.device("meta")
    for unit in units:
        unit.allocate(meta)
    for x in loose:
        if x.is_param:
            torch.utils.swap_tensors(x.tensor, nn.Parameter(torch.empty_like(x.tensor, device=meta)))
        else:  # by name: an init may have re-bound the buffer
            x.module._buffers[x.name] = torch.empty_like(x.tensor, device=meta)


def materialize(model: nn.Module, device: torch.device | str | None = None, init: InitFn | None = None, *,
                tied: str = "first") -> nn.Module:  # fmt: skip
    """Give a model built under ``torch.device("meta")`` and passed to ``fully_shard`` its real parameters,
    bitwise those of plain construction with the same seed, holding at most one unit in full at a time.

    Replays plain construction: every module's ``reset_parameters()``, then ``init(module)`` (default: the
    model's ``_init_weights`` when it has one, as Hugging Face models do), in construction order (see the
    module doc). ``tied="first"``: a parameter shared by several modules keeps the values of the first one
    that initialized it (the tie was made after initialization: Hugging Face, our GPT); ``"last"``: the
    last one's (tied before the init pass, as nanoGPT does). ``device``: default the current CUDA device
    under NCCL, else the CPU. A collective over the model's ranks at the end (they agree that every
    parameter was initialized). Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"materialize takes an nn.Module, got {type(model).__name__}")
    if init is not None and not callable(init):
        raise TypeError(f"init must be a callable init(module), got {init!r:.80}")
    if tied not in ("first", "last"):
        raise ValueError(f"tied must be 'first' or 'last', got {tied!r}")
    from .api import units as units_of  # the api module imports this one
    from .init import name_units

    units = units_of(model)
    meta_units = [u for u in units if u.on_meta]
    if meta_units and len(meta_units) != len(units):
        raise ValueError(
            "materialize: some units of this model are on the meta device and some are not; build the whole "
            "model under torch.device('meta') and materialize it once"
        )
    if not meta_units and not _loose_meta(model, units):
        raise ValueError(
            "materialize: nothing of this model is on the meta device. Build it under torch.device('meta'), "
            "call fully_shard, then materialize"
        )
    device = torch.device(device) if device is not None else default_device(units)
    if device.type == "meta":
        raise ValueError("materialize: device must be a real device (cpu, cuda, ...), not meta")
    name_units(model)  # errors name units by their place in the model
    loose = allocate_meta(model, device, units)
    for unit in units:  # NaN until written: what no init wrote is found afterwards
        for b in unit.buffers:
            _fill_missing(b.shard)
    error: BaseException | None = None
    try:
        _init_in_order(model, units, device, init, tied)
        _zero_padding(units)
        problem = _unwritten(units, loose)
    except Exception as e:  # still agree with the other ranks before raising, or they would wait forever
        error, problem = e, f"init failed on this rank: {e}"
    problem = _agree(problem, units)
    if problem is not None:
        _back_to_meta(units, loose)
        if error is not None:
            raise error
        raise RuntimeError(
            f"materialize: {problem}. Pass init=fn that initializes it (fn(module) is called on every module); "
            "a buffer the constructor computes must be computed again by init (it never was on the meta device). "
            "The model is back on the meta device"
        )
    return model


__all__ = ["materialize"]
