"""``scalestack.checkpoint.load``: the newest complete checkpoint into a model of any world size or layout.

The ranks first check the checkpoint's files against their recorded sizes and CRC-32s (each rank a share of
the files), then compare what the checkpoint holds with what the model and optimizer expect, naming every
missing or unexpected tensor and every shape mismatch, before anything is changed. DCP then loads into the
model's and optimizer's own tensors in place (the pieces of this rank's layout, read from whichever chunks
of the saved layout overlap them).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn

from ..fsdp import collectives as comm
from ..fsdp.api import units
from ..fsdp.materialize import allocate_for_load
from ..fsdp.state_dict_hooks import reshard_for_load
from . import contents, directory, ranks
from .optimizer_state import apply_loaded, check_groups, init_optimizer_state, names_in, param_names
from .save import wait_pending


def load(path: str | os.PathLike, model: nn.Module, optimizer: contents.Optimizers = None, strict: bool = True, *,
         scheduler: Any = None, process_group: dist.ProcessGroup | None = None,
         verify: bool = True) -> Any:  # fmt: skip
    """Load the checkpoint at ``path`` (or the newest complete one in the directory ``path``) into ``model``
    and, when given, ``optimizer`` (one or a list, as saved) and ``scheduler``; return the ``extra`` this
    rank saved (rank 0's when this rank did not exist at save time), or None.

    A collective: every rank of the model's process group calls it. ``strict=False`` skips, and reports in a
    warning, tensors missing on either side or with another shape, instead of raising. ``verify=False`` checks
    the files' sizes but not their CRC-32s (which reads every byte once more).
    """
    ranks.check_arguments(path, model, optimizer)
    if not isinstance(strict, bool) or not isinstance(verify, bool):
        raise TypeError(f"strict and verify must be bools, got {strict!r} and {verify!r}")
    wait_pending()
    group = ranks.group_of(model, process_group)
    rank, world = ranks.rank_world(group)
    ckpt, metadata = _open(Path(path).absolute(), rank, world, group, verify)
    saved = metadata.state_dict_metadata
    opts = contents.optimizers(optimizer)
    other_kind = _other_kinds(ckpt, opts, strict)
    allocate_for_load(model, strict)  # a meta-device model gets storage that the load fills, piece by piece
    reshard_for_load(units(model))  # every rank: the loaded pieces reach the next forward
    names = param_names(model)
    for _, opt in opts:
        names_in(opt, names)  # before init_optimizer_state steps it: every parameter is the model's
    created = {prefix: init_optimizer_state(opt, group) for prefix, opt in opts}
    try:
        extra_key = contents.rank_key(rank if f"{contents.EXTRA}.{contents.rank_key(rank)}" in saved else 0)
        target = contents.build(model, optimizer, scheduler, None, 0)
        if f"{contents.EXTRA}.{extra_key}" in saved:
            target[contents.EXTRA] = {extra_key: b""}
        made_to_load = {f"{prefix}.state.{names[i]}" for prefix, ids in created.items() for i in ids}
        flat = _match(contents.flatten(target), saved, [prefix for prefix, _ in opts], made_to_load, strict, ckpt.path)
        small = contents.nest([(path, v) for path, v in flat.values() if not torch.is_tensor(v)])
        _read(small, ckpt.path, group)  # the pickled values first: the param groups are checked before any change
        groups = {prefix: _get(small, f"{prefix}.param_groups") for prefix, _ in opts}
        groups = {p: contents.unblob(g) if g is not None and p not in other_kind else None for p, g in groups.items()}
        for prefix, opt in opts:
            if groups[prefix] is not None:
                check_groups(opt, names, groups[prefix])
        _read(contents.nest([(path, v) for path, v in flat.values() if torch.is_tensor(v)]), ckpt.path, group)
    except BaseException:
        for prefix, opt in opts:  # the state made only to load into goes again
            apply_loaded(opt, names, None, set(), created[prefix])
        raise
    for prefix, opt in opts:
        state = f"{prefix}.state."
        loaded = {k[len(state) :].rsplit(".", 1)[0] for k in flat if k.startswith(state)}
        apply_loaded(opt, names, groups[prefix], loaded, created[prefix])
        by_name = {names[id(p)]: p for g in opt.param_groups for p in g["params"]}
        for name, entry in (_get(small, f"{prefix}.state") or {}).items():  # non-tensor state (an int step)
            opt.state[by_name[name]].update(entry)
    scheduler_state = _get(small, contents.SCHEDULER)
    if scheduler is not None and scheduler_state is not None:
        scheduler.load_state_dict(contents.unblob(scheduler_state))
    extra = _get(small, f"{contents.EXTRA}.{extra_key}")
    return contents.unblob(extra) if extra else None


def _read(state: dict[str, Any], path: Path, group: dist.ProcessGroup | None) -> None:
    ranks.dcp_call(dcp.load, state, storage_reader=dcp.FileSystemReader(path), group=group)


def _other_kinds(ckpt: directory.Checkpoint, opts: list, strict: bool) -> set[str]:
    """Optimizers of another class than the saved one: an error (strict), else their hyperparameters stay."""
    other = set()
    for prefix, opt in opts:
        saved = ckpt.optimizers.get(prefix)
        if saved is not None and saved != contents.class_name(opt):
            message = f"the checkpoint's {prefix} is a {saved}, this one a {contents.class_name(opt)}"
            if strict:
                raise ValueError(
                    f"{message}; build the saved kind of optimizer, or load with strict=False (which loads the "
                    "states whose names and shapes match and keeps this one's hyperparameters)"
                )
            warnings.warn(f"{message}: its hyperparameters are not loaded", stacklevel=3)
            other.add(prefix)
    return other


def _get(nested: dict[str, Any], key: str) -> Any:
    """The value at a flat key whose parts are the top-level keys (no dots inside them), or None."""
    node: Any = nested
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _open(path: Path, rank: int, world: int, group: dist.ProcessGroup | None, verify: bool):
    """The checkpoint (rank 0 resolves "the newest": every rank must load the same one) and its DCP metadata,
    its files verified (each rank a share); any rank's error is raised on every rank."""
    choice: object = None
    if rank == 0:
        try:
            choice = str(directory.resolve(path).path)
        except directory.CheckpointError as e:
            choice = e
        except OSError as e:  # sent as an error, so no rank waits for a broadcast that never comes
            choice = directory.CheckpointError(f"cannot read {path}: {e}")
    choice = comm.broadcast_object(choice, group)
    if isinstance(choice, Exception):
        raise choice
    error, ckpt, metadata = None, None, None
    try:
        ckpt = directory.read(Path(choice))
        directory.verify(ckpt, sorted(ckpt.files)[rank::world], sums=verify)
        metadata = dcp.FileSystemReader(ckpt.path).read_metadata()
    except directory.CheckpointError as e:
        error = str(e)
    except Exception as e:  # noqa: BLE001 -- a verified file that DCP cannot read
        error = f"checkpoint {choice}: its DCP metadata cannot be read ({e})"
    ranks.agree(error, group)
    return ckpt, metadata


def _size(value: Any) -> list[int] | None:
    return list(value.size()) if torch.is_tensor(value) else None


def _match(flat: dict[str, tuple[tuple[str, ...], Any]], saved: dict[str, Any], optimizer_prefixes: list[str],
           made_to_load: set[str], strict: bool, where: Path) -> dict[str, tuple[tuple[str, ...], Any]]:  # fmt: skip
    """Compare the checkpoint's keys and shapes with the flat target; raise (strict) or leave out what does not
    match, and return what to load.

    State that exists only to be loaded into (``made_to_load``: a parameter that had no optimizer state
    when it was saved) is left out quietly: after the load that parameter has no state, as when saved."""
    keep = {}
    missing, mismatched = [], []
    for key, (path, value) in flat.items():
        if key not in saved:
            if ".".join(path[:-1]) not in made_to_load:
                missing.append(key)
            continue
        saved_size = getattr(saved[key], "size", None)  # None: a pickled value
        saved_size, size = (list(saved_size) if saved_size is not None else None), _size(value)
        if size != saved_size:
            got, want = ("a non-tensor value" if s is None else s for s in (saved_size, size))
            mismatched.append(f"{key} (checkpoint {got}, model/optimizer {want})")
            continue
        keep[key] = (path, value)
    spaces = [f"{contents.MODEL}."] + [f"{prefix}.state." for prefix in optimizer_prefixes]
    unexpected = sorted(k for k in saved if any(k.startswith(s) for s in spaces) and k not in flat)
    absent = [p for p in optimizer_prefixes if f"{p}.param_groups" not in saved]
    if missing or unexpected or mismatched:
        report = _report(missing, unexpected, mismatched)
        hint = (f"\nthe checkpoint holds no state for {absent} (saved without it): pass only what was saved, or "
                "strict=False") if absent else ""  # fmt: skip
        if strict:
            raise ValueError(
                f"the checkpoint {where} does not match the model/optimizer:\n{report}{hint}\nload with "
                "strict=False to skip these and load the rest"
            )
        warnings.warn(f"load(strict=False) from {where} skipped:\n{report}", stacklevel=3)
    return keep


def _report(missing: list[str], unexpected: list[str], mismatched: list[str], show: int = 10) -> str:
    lines = []
    for title, keys in (("missing in the checkpoint", missing), ("not in the model/optimizer", unexpected),
                        ("shape mismatch", mismatched)):  # fmt: skip
        if keys:
            more = f" (and {len(keys) - show} more)" if len(keys) > show else ""
            lines.append(f"  {title} ({len(keys)}): " + ", ".join(sorted(keys)[:show]) + more)
    return "\n".join(lines)
