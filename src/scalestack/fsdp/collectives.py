"""Every collective and every copy the engine makes goes through here, so they can be counted and logged.

``traffic()`` reports bytes all-gathered (output size), bytes reduce-scattered (input size), the small
all-reduces of "which parameters got a gradient" flags, bytes copied outside collectives (casts for mixed
precision, accumulation into an existing sharded gradient) and the gradient path's own work: bytes zeroed
(a fresh grad buffer) and bytes added into in place (autograd accumulating each gradient into its view),
the optimizers' all-to-alls (bytes sent to other ranks: Muon moving pieces to their matrix's owner) and
HSDP's all-reduces of sharded gradients across replicas.
``record_collectives()`` logs the sequence of collectives, which must be the same on every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, Work


class Collective(NamedTuple):
    """One logged collective: its kind, its size in elements (output of an all-gather, input otherwise) and
    how many ranks it spans."""

    kind: str
    elements: int
    ranks: int


@dataclass
class Traffic:
    all_gather_bytes: int = 0
    reduce_scatter_bytes: int = 0
    all_gathers: int = 0
    reduce_scatters: int = 0
    flag_all_reduces: int = 0
    copy_bytes: int = 0
    zero_bytes: int = 0
    add_bytes: int = 0
    all_to_alls: int = 0
    all_to_all_bytes: int = 0  # sent to other ranks (the part a rank keeps for itself moves no bytes)
    all_reduces: int = 0  # HSDP: the sharded gradients averaged across replicas
    all_reduce_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


_traffic = Traffic()
_log: list[Collective] | None = None


@contextlib.contextmanager
def record_collectives() -> Iterator[list[Collective]]:
    """Log every collective issued inside the block as ``Collective(kind, elements, ranks)``, in issue order."""
    global _log
    previous, _log = _log, []
    try:
        yield _log
    finally:
        _log = previous


def _record(kind: str, t: torch.Tensor, group: ProcessGroup | None) -> None:
    if _log is not None:
        _log.append(Collective(kind, t.numel(), dist.get_world_size(group)))


def _all_gather_single(*args, **kwargs):
    # torch 2.13 renamed the single-tensor collectives; releases before it (>= 2.6) have only the old names.
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(*args, **kwargs)


def _reduce_scatter_single(*args, **kwargs):
    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(*args, **kwargs)


def traffic() -> Traffic:
    """A snapshot of the counters since the last ``reset_traffic()`` (this process only)."""
    return Traffic(**asdict(_traffic))


def reset_traffic() -> None:
    global _traffic
    _traffic = Traffic()


def count_add(t: torch.Tensor) -> None:
    """Record that ``t`` was added into in place (autograd accumulating a gradient into its view)."""
    _traffic.add_bytes += t.numel() * t.element_size()


def count_zero(t: torch.Tensor) -> None:
    """Record that ``t`` was zeroed (a new grad buffer that autograd will add into)."""
    _traffic.zero_bytes += t.numel() * t.element_size()


def count_copy(t: torch.Tensor) -> None:
    """Record that ``t`` was written by a copy outside any collective."""
    _traffic.copy_bytes += t.numel() * t.element_size()


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; a counted copy when the dtype differs, the same tensor otherwise."""
    if t.dtype == dtype:
        return t
    out = t.to(dtype)
    count_copy(out)
    return out


class PendingGather:
    """An in-flight all-gather. Its completion bumps the output's version counter (gloo writes the output
    on its own thread), which would make autograd reject the tensors it saved from views of that output;
    ``wait()`` restores the counter, since the data is the same parameters gathered again."""

    def __init__(self, work: Work | None, output: torch.Tensor, version: int):
        self._work, self._output, self._version = work, output, version

    def wait(self) -> None:
        if self._work is not None:
            with torch.profiler.record_function("scalestack::wait_all_gather"):
                self._work.wait()
            self._work = None
        torch._C._autograd._unsafe_set_version_counter((self._output,), (self._version,))


def all_gather(output: torch.Tensor, shard: torch.Tensor, group: ProcessGroup) -> PendingGather:
    """Issue the all-gather of every rank's ``shard`` into ``output`` (rank r's at ``[r*S, (r+1)*S)``)."""
    _traffic.all_gather_bytes += output.numel() * output.element_size()
    _traffic.all_gathers += 1
    _record("all_gather", output, group)
    version = output._version
    with torch.no_grad(), torch.profiler.record_function("scalestack::all_gather"):
        work = _all_gather_single(output, shard, group=group, async_op=True)
    return PendingGather(work, output, version)


def reduce_scatter_avg(output: torch.Tensor, full: torch.Tensor, group: ProcessGroup) -> Work | None:
    """Average ``full`` over ranks and leave rank r's window of the result in ``output`` (async)."""
    _traffic.reduce_scatter_bytes += full.numel() * full.element_size()
    _traffic.reduce_scatters += 1
    _record("reduce_scatter", full, group)
    with torch.no_grad(), torch.profiler.record_function("scalestack::reduce_scatter"):
        return _reduce_scatter_single(output, full, op=dist.ReduceOp.AVG, group=group, async_op=True)


def reduce_scatter_sum(output: torch.Tensor, full: torch.Tensor, group: ProcessGroup) -> None:
    """Sum ``full`` over ranks and leave rank r's window of the result in ``output`` (blocking): context
    parallelism's dK/dV, each rank holding a part of every key's gradient."""
    _traffic.reduce_scatter_bytes += full.numel() * full.element_size()
    _traffic.reduce_scatters += 1
    _record("reduce_scatter", full, group)
    with torch.no_grad(), torch.profiler.record_function("scalestack::reduce_scatter"):
        _reduce_scatter_single(output, full, op=dist.ReduceOp.SUM, group=group)


def all_reduce_avg(tensor: torch.Tensor, group: ProcessGroup) -> Work | None:
    """Average ``tensor`` in place over ``group`` (async): HSDP's sharded gradients across replicas."""
    _traffic.all_reduces += 1
    _traffic.all_reduce_bytes += tensor.numel() * tensor.element_size()
    _record("all_reduce", tensor, group)
    with torch.no_grad(), torch.profiler.record_function("scalestack::all_reduce"):
        return dist.all_reduce(tensor, op=dist.ReduceOp.AVG, group=group, async_op=True)


def all_reduce_flags(flags: torch.Tensor, group: ProcessGroup) -> Work | None:
    """Sum small integer flags over ranks (async): which parameters got a gradient on any rank."""
    _traffic.flag_all_reduces += 1
    _record("all_reduce_flags", flags, group)
    with torch.no_grad(), torch.profiler.record_function("scalestack::all_reduce_flags"):
        return dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=group, async_op=True)


def all_to_all(output: torch.Tensor, input: torch.Tensor, output_splits: list[int], input_splits: list[int],
               group: ProcessGroup) -> Work:  # fmt: skip
    """Send ``input_splits[r]`` elements of ``input`` to rank r, receive ``output_splits[r]`` from it (async)."""
    rank = dist.get_rank(group)
    _traffic.all_to_alls += 1
    _traffic.all_to_all_bytes += (sum(input_splits) - input_splits[rank]) * input.element_size()
    _record("all_to_all", input, group)
    with torch.no_grad(), torch.profiler.record_function("scalestack::all_to_all"):
        return dist.all_to_all_single(output, input, output_splits, input_splits, group=group, async_op=True)


def all_gather_blocking(output: torch.Tensor, shard: torch.Tensor, group: ProcessGroup) -> None:
    """A synchronous, uncounted all-gather for bookkeeping (state dicts, checks), not for training."""
    with torch.no_grad():
        _all_gather_single(output, shard, group=group)


def single_process(group: ProcessGroup | None) -> bool:
    """``group=None`` without an initialized process group: one process, no collectives."""
    return group is None and not dist.is_initialized()


def gather_objects(obj: object, group: ProcessGroup | None) -> list[object] | None:
    """Every rank's ``obj`` on rank 0 of ``group`` (None elsewhere), for bookkeeping (checkpoint file sums);
    ``group=None`` without an initialized process group means a single process."""
    if single_process(group):
        return [obj]
    world = dist.get_world_size(group)
    out: list[object] | None = [None] * world if dist.get_rank(group) == 0 else None
    dist.gather_object(obj, out, group=group, group_dst=0)
    return out


def broadcast_object(obj: object, group: ProcessGroup | None) -> object:
    """Rank 0's ``obj`` on every rank of ``group`` (a barrier that also carries rank 0's outcome)."""
    if single_process(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, group=group, group_src=0)
    return box[0]


def all_gather_objects(obj: object, group: ProcessGroup | None) -> list[object]:
    """Every rank's ``obj`` on every rank of ``group`` (bookkeeping: agreeing on an error)."""
    if single_process(group):
        return [obj]
    out: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
