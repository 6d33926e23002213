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
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils._pytree import tree_flatten

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
    managed = {id(p.sharded) for u in units for p in u.params}
    out = []
    for prefix, m in model.named_modules(remove_duplicate=True):
        for kind, table in ((True, m._parameters), (False, m._buffers)):
            for name, t in table.items():
                if t is not None and t.is_meta and id(t) not in managed:
                    out.append((f"{prefix}.{name}" if prefix else name, m, name, kind))
    return out


def allocate_meta(model: nn.Module, device: torch.device, units: list[ShardedUnit]) -> list[tuple[str, torch.Tensor]]:
    """Give every meta tensor of ``model`` uninitialized storage on ``device`` (NaN for floats); return the
    tensors outside units that got it, with their names."""
    for unit in units:
        if unit.on_meta:
            unit.allocate(device)
            for b in unit.buffers:
                _fill_missing(b.shard)
    out = []
    for fqn, module, name, is_param in _loose_meta(model, units):
        t = getattr(module, name)
        real = _fill_missing(torch.empty_like(t, device=device))
        if is_param:  # the same object, so a parameter tied across modules stays tied
            torch.utils.swap_tensors(t, nn.Parameter(real, requires_grad=t.requires_grad))
            real = t
        else:
            module._buffers[name] = real
        out.append((fqn, real))
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
    transient = [fqn for fqn, m, name, is_param in loose if not is_param and name in m._non_persistent_buffers_set]
    if transient:
        raise ValueError(
            f"buffers {transient[:3]} of this meta-device model are not saved in checkpoints (non-persistent), so "
            "a load cannot fill them: call scalestack.materialize(model) first (init recomputes them), then load"
        )
    allocate_meta(model, default_device(units), units)


def default_device(units: list[ShardedUnit]) -> torch.device:
    """The current CUDA device for units on an NCCL group, else the CPU."""
    group = units[0].group if units else None
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_written(units: list[ShardedUnit], loose: list[tuple[str, torch.Tensor]]) -> None:
    for unit in units:
        for p in unit.params:
            if torch.isnan(p.sharded).any():
                raise RuntimeError(
                    f"materialize: parameter {p.fqn!r} was not initialized: its module has no reset_parameters() "
                    "and init did not write it. Pass init=fn that initializes it (fn(module) is called on every "
                    "module)"
                )
    for fqn, t in loose:
        if t.is_floating_point() and torch.isnan(t).any():
            raise RuntimeError(
                f"materialize: {fqn!r} was not initialized by reset_parameters() or init. A buffer computed in "
                "the constructor must be computed again by init(module) (it was never computed on the meta device)"
            )


def materialize(model: nn.Module, device: torch.device | str | None = None, init: InitFn | None = None) -> nn.Module:
    """Give a model built under ``torch.device("meta")`` and passed to ``fully_shard`` its real parameters,
    bitwise those of plain construction with the same seed, holding at most one unit in full at a time.

    Replays plain construction: every module's ``reset_parameters()``, then ``init(module)`` (default: the
    model's ``_init_weights`` when it has one, as nanoGPT and Hugging Face models do), each pass over all
    modules in ``model.apply`` order. ``device``: default the current CUDA device under NCCL, else the CPU.
    Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"materialize takes an nn.Module, got {type(model).__name__}")
    if init is not None and not callable(init):
        raise TypeError(f"init must be a callable init(module), got {init!r:.80}")
    from .api import units as units_of  # the api module imports this one

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
    for name, m in model.named_modules():  # errors name units by their place in the model
        if (s := state_of(m)) is not None and s.unit is not None:
            s.unit.name = name or "<root>"
    loose = allocate_meta(model, device, units)
    owners = _owners(model)
    key = {(id(m), attr): id(p) for u in units for p in u.params for m, attr in p.uses}  # stable across reopening
    opened = _OpenUnit(device)
    for unit in units:
        opened.show_unavailable(unit)
    try:
        with torch.no_grad():
            first_writer: dict[int, nn.Module] = {}  # tied parameters keep their first module's values
            for name, module, fn in _construction(model, init):
                opened.open(owners[module])
                _Unavailable.current_module = name
                own = [(key.get((id(module), a), id(t)), t) for a, t in module._parameters.items() if t is not None]
                tied = [(t, t.clone()) for k, t in own if first_writer.setdefault(k, module) is not module]
                fn(module)
                for t, before in tied:
                    t.copy_(before)
    finally:
        _Unavailable.current_module = ""
        opened.close()
        for unit in units:
            unit._to_sharded()
    _check_written(units, loose)
    return model


__all__ = ["materialize"]
