"""``scalestack.checkpoint.save``: one DCP checkpoint of model, optimizer, scheduler and ``extra``, atomic.

Every rank writes its own pieces (no gather, no copy: DCP's file writer serializes each chunk straight from
the shard) into the hidden temporary directory; then each rank sums its own files while another thread
flushes them to disk (DCP writes them without fsync, so the two overlap), rank 0 collects the sums,
writes the marker and renames the directory to its final name (``directory.py``), prunes to ``keep_last``
and tells every rank, which is the barrier that makes ``save`` return only once the checkpoint is visible.

``async_save=True`` copies the state to CPU memory (the only copy, so training may change the parameters
at once), writes it through DCP's ``async_save`` in a background thread on a process group of its own, and
publishes it when every rank is done; ``save`` returns an ``AsyncSave`` at once. The next ``save`` or
``load`` waits for it; call ``wait()`` before the process exits.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.staging import AsyncStager

from ..fsdp import collectives as comm
from ..fsdp.piece_tensor import PieceTensor
from . import contents, directory, ranks

_pending: AsyncSave | None = None
_async_groups: dict[int, dist.ProcessGroup] = {}


class AsyncSave:
    """A save in flight: ``wait()`` returns once the checkpoint is published (a collective: every rank calls
    it, or the next ``save``/``load`` does), raising what went wrong on any rank."""

    def __init__(self, upload: Future, finish: Callable[[], None], path: Path) -> None:
        self.path = path
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(upload, finish), name="scalestack-save", daemon=True)
        self._thread.start()

    def _run(self, upload: Future, finish: Callable[[], None]) -> None:
        try:
            upload.result()
            finish()
        except BaseException as e:  # DCP reports rank failures as a CheckpointException (a BaseException)
            self._error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> None:
        global _pending
        self._thread.join()
        if _pending is self:
            _pending = None
        if self._error is not None:
            error, self._error = self._error, None
            raise directory.CheckpointError(f"the asynchronous save to {self.path} failed: {error}") from error

    def __repr__(self) -> str:
        return f"AsyncSave({str(self.path)!r}, {'done' if self.done() else 'writing'})"


def wait_pending() -> None:
    """Wait for an asynchronous save still in flight (``save`` and ``load`` call it first)."""
    if _pending is not None:
        _pending.wait()


def _wait_at_exit() -> None:
    pending = _pending
    if pending is None:
        return
    try:  # a single process needs no collective; with a process group it must still be alive
        pending.wait()
    except Exception as e:  # noqa: BLE001 -- going down: say so; the save stays invisible, never half-visible
        warnings.warn(
            f"the asynchronous save to {pending.path} did not finish before exit ({e}) and stays invisible; call "
            ".wait() on what save() returned before torch.distributed.destroy_process_group()",
            stacklevel=1,
        )


atexit.register(_wait_at_exit)


def save(path: str | os.PathLike, model: nn.Module, optimizer: contents.Optimizers = None,
         extra: Any = None, keep_last: int | None = None, async_save: bool = False, *, scheduler: Any = None,
         process_group: dist.ProcessGroup | None = None) -> AsyncSave | None:  # fmt: skip
    """Save ``model`` (and ``optimizer``, ``scheduler``, ``extra``) as a DCP checkpoint at ``path``.

    ``optimizer`` is one optimizer or a list of them (Muon for the matrices and AdamW for the rest).
    A collective: every rank of the model's process group calls it. The checkpoint loads at any world
    size, granularity or layout, or into the unsharded model (``load``, or stock ``dcp.load``). ``extra`` is
    any picklable object per rank (data position, RNG states); ``load`` returns it. ``keep_last=N`` deletes
    all but the newest N complete checkpoints in ``path``'s parent directory once this one is complete.
    """
    global _pending
    final = ranks.check_arguments(path, model, optimizer)
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be None (keep every checkpoint) or an int >= 1, got {keep_last!r}")
    if not isinstance(async_save, bool):
        raise TypeError(f"async_save must be a bool, got {async_save!r}")
    wait_pending()
    group = ranks.group_of(model, process_group)
    rank, world = ranks.rank_world(group)
    if async_save and group is not None and world != dist.get_world_size():
        raise ValueError(
            f"async_save=True writes from a background thread on a process group of its own, which every rank of "
            f"the job must create together, but this model's group holds {world} of {dist.get_world_size()} ranks; "
            "pass process_group= spanning all ranks (e.g. torch.distributed.group.WORLD), or save synchronously"
        )
    tmp = directory.temporary_path(final)
    classes = {prefix: contents.class_name(opt) for prefix, opt in contents.optimizers(optimizer)}
    error = None
    try:
        state = contents.build(model, optimizer, scheduler, None if extra is None else contents.blob(extra), rank)
        if rank == 0:
            directory.check_target(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # a save that died earlier
                shutil.rmtree(tmp)
    except Exception as e:  # noqa: BLE001 -- every rank must learn of it before the collectives
        error = f"save to {final} failed on rank {rank}: {type(e).__name__}: {e}"
    ranks.agree(error, group)
    if not async_save:
        ranks.dcp_call(dcp.save, state, storage_writer=dcp.FileSystemWriter(tmp, sync_files=False), group=group)
        _publish(tmp, final, rank, world, group, keep_last, classes)
        return None
    background = _async_group(group)  # the background thread's collectives run on a group of their own
    upload = ranks.dcp_call(dcp.async_save, state, storage_writer=dcp.FileSystemWriter(tmp, sync_files=False),
                            async_stager=_CopyToCPU(), group=background)  # fmt: skip
    finish = functools.partial(_publish, tmp, final, rank, world, background, keep_last, classes)
    _pending = AsyncSave(upload, finish, final)
    return _pending


def _publish(tmp: Path, final: Path, rank: int, world: int, group: dist.ProcessGroup | None,
             keep_last: int | None, classes: dict[str, str]) -> None:  # fmt: skip
    """Sum this rank's files, and on rank 0 publish and prune; every rank learns the outcome (a rank that
    fails still takes part in both collectives, so none waits for it)."""
    try:
        mine = sorted(n for n in os.listdir(tmp) if n.startswith(f"__{rank}_") or (rank == 0 and n == ".metadata"))
        report: object = directory.file_sums(tmp, mine)
    except Exception as e:  # noqa: BLE001 -- sent to rank 0 instead of the sums
        report = f"summing rank {rank}'s files of {final} failed: {type(e).__name__}: {e}"
    gathered = comm.gather_objects(report, group)
    outcome = None
    if rank == 0:
        failed = [r for r in gathered if isinstance(r, str)]
        try:
            if failed:
                raise directory.CheckpointError(failed[0])
            files = {name: s for sums in gathered for name, s in sums.items()}
            directory.publish(tmp, final, world, files, classes)
        except Exception as e:  # noqa: BLE001 -- reported to every rank below
            outcome = f"publishing the checkpoint {final} failed: {e}"
        if outcome is None and keep_last is not None:
            try:
                directory.prune(final.parent, keep_last, keep=final)
            except OSError as e:  # published all the same: a failed clean-up must not read as a failed save
                warnings.warn(f"{final} is saved, but deleting older checkpoints failed: {e}", stacklevel=3)
    outcome = comm.broadcast_object(outcome, group)
    if outcome:
        raise directory.CheckpointError(outcome)


def _async_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """A gloo group of the same ranks for the background save (two threads must not share one group)."""
    if comm.single_process(group):
        return None
    key = id(group)
    if key not in _async_groups:  # every rank of the job creates it: the group checked to span them all
        _async_groups[key] = dist.new_group(dist.get_process_group_ranks(group or dist.group.WORLD), backend="gloo")
    return _async_groups[key]


class _CopyToCPU(AsyncStager):
    """Stages a state dict for an asynchronous save: every tensor copied to CPU, pieces kept as pieces."""

    _synchronize_after_execute = False

    def stage(self, state_dict: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return _copy(state_dict)

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, PieceTensor):
        return PieceTensor(value.to_local().to("cpu", copy=True), value.info, value.block)
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    return value
