"""Attention over a sequence sharded head-tail across a context-parallel group: all-gather K/V (Llama 3's
design), with its own backward.

Forward: one all-gather of this rank's K and V (the KV heads, never the repeated query heads). The gathered
buffer stays as it arrives, rank by rank: every run of positions a rank holds is one contiguous *segment* of
keys in it, so nothing is copied into global order. Each of the rank's query runs attends to the segments it
can see (under a causal mask, keys up to the run's end; before its first document, none), one kernel call per
segment, and the partial outputs merge by their log-sum-exp in fp32 (flash attention's merge). Only the
local Q, K, V, the output and the log-sum-exp are saved. Backward: the same all-gather again, the kernel's
backward per (query run, segment), dK/dV added straight into the reduce-scatter's input (laid out like the
gathered buffer), and one reduce-scatter that sums every rank's part onto the ranks that own those keys.
Per rank, the memory that grows with the whole sequence is the gathered K/V and, in backward, its gradient
buffer: 2 x 2 h_kv values per token of the sequence.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from ..fsdp.collectives import all_gather, reduce_scatter_sum
from .checkpointing import stash_mode
from .flash import FLASH
from .kernel import SegmentMask, compute_dtype
from .sharding import Layout, head_tail_layout

Kernel = tuple[Callable[..., tuple[torch.Tensor, torch.Tensor]], Callable[..., tuple[torch.Tensor, ...]]]


@dataclass(frozen=True, order=True)
class _Segment:
    """Keys at global positions [start, stop), held by ``rank`` from its local position ``offset``."""

    start: int
    stop: int
    rank: int
    offset: int


@dataclass(frozen=True)
class _QueryRun:
    """Local query rows ``rows`` (global positions from ``start``) and the key segments they attend to."""

    rows: slice
    start: int
    segments: tuple[_Segment, ...]


def _gather_kv(k: torch.Tensor, v: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """(P, 2, B, Hkv, L, D): every rank's K and V as it holds them."""
    local = torch.stack([k, v])
    p = dist.get_world_size(group)
    gathered = torch.empty((p * 2, *local.shape[1:]), dtype=local.dtype, device=local.device)  # gloo: dim 0
    all_gather(gathered, local, group).wait()
    return gathered.view(p, *local.shape)


@functools.lru_cache(maxsize=64)
def _held_segments(layout: Layout) -> tuple[_Segment, ...]:
    """Every run of every rank as a key segment, in global order: the same for every layer, computed once."""
    held = []
    for r, runs in enumerate(layout.runs):
        offset = 0
        for start, length in runs:
            held.append(_Segment(start, start + length, r, offset))
            offset += length
    return tuple(sorted(held))


def _query_runs(layout: Layout, rank: int, causal: bool, docs: torch.Tensor | None) -> list[_QueryRun]:
    """The rank's query runs and the key segments each sees: keys before the run's first document (when every
    row's documents are sorted, as packing makes them) or after its last position (causal) are never seen."""
    held = _held_segments(layout)
    first = _first_of_document(docs)
    out, local = [], 0
    for start, length in layout.runs[rank]:
        lo = 0 if first is None else int(first[:, start : start + length].min())
        hi = start + length if causal else layout.n
        segments = tuple(
            _Segment(max(s.start, lo), min(s.stop, hi), s.rank, s.offset + max(s.start, lo) - s.start)
            for s in held
            if max(s.start, lo) < min(s.stop, hi)
        )
        out.append(_QueryRun(slice(local, local + length), start, segments))
        local += length
    return out


def _first_of_document(docs: torch.Tensor | None) -> torch.Tensor | None:
    """Per position, where its document starts, when every row's ids are sorted (packed documents)."""
    if docs is None or bool((docs[:, 1:] < docs[:, :-1]).any()):
        return None
    return torch.stack([torch.searchsorted(row.contiguous(), row.contiguous()) for row in docs])


def _mask(run: _QueryRun, segment: _Segment, causal: bool, docs: torch.Tensor | None) -> SegmentMask | None:
    """The (query run, key segment) mask; None where every key is visible (a segment wholly before the run,
    without documents)."""
    causal = causal and segment.stop > run.start
    if not causal and docs is None:
        return None
    return SegmentMask(run.start, segment.start, segment.stop, causal, docs)


def _keys(kv: torch.Tensor, segment: _Segment) -> torch.Tensor:
    """(2, B, Hkv, length, D): the segment's K and V, a view of the gathered buffer."""
    return kv[segment.rank, :, :, :, segment.offset : segment.offset + segment.stop - segment.start]


def _merge(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor) -> None:
    """out, lse (in place) <- the attention over both key sets, from each one's output and log-sum-exp."""
    total = torch.logaddexp(lse, part_lse)
    unseen = torch.isneginf(total)[..., None]  # rows that see no key in either set yet: -inf - -inf
    keep = torch.exp(lse - total)[..., None].masked_fill_(unseen, 0.0)
    add = torch.exp(part_lse - total)[..., None].masked_fill_(unseen, 0.0)
    out.mul_(keep).add_(part.to(out.dtype) * add)
    lse.copy_(total)


class _AllGatherKVAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, docs, scale, block, kept, layout, kernel):  # noqa: ANN001
        runs = _query_runs(layout, dist.get_rank(group), causal, docs)
        compute = compute_dtype(q.dtype)
        if kept is not None:  # recomputed under activation checkpointing: the first forward's results
            out, lse = kept
        else:
            kv = _gather_kv(k, v, group)
            out = torch.empty_like(q)
            lse = torch.full(q.shape[:3], float("-inf"), dtype=compute, device=q.device)
            for run in runs:
                q_run, acc = q[:, :, run.rows], None
                for segment in run.segments:
                    keys = _keys(kv, segment)
                    part, part_lse = kernel[0](q_run, keys[0], keys[1], _mask(run, segment, causal, docs), scale,
                                               block)  # fmt: skip
                    if acc is None:
                        acc, acc_lse = part.to(compute), part_lse.to(compute)
                    else:
                        _merge(acc, acc_lse, part, part_lse)
                out[:, :, run.rows], lse[:, :, run.rows] = acc, acc_lse  # every query sees itself at least
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal, ctx.docs, ctx.scale, ctx.block = group, causal, docs, scale, block
        ctx.runs, ctx.kernel = runs, kernel
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # noqa: ANN001
        q, k, v, out, lse = ctx.saved_tensors
        kv = _gather_kv(k, v, ctx.group)
        dq = torch.zeros(q.shape, dtype=lse.dtype, device=q.device)
        dkv = torch.zeros(kv.shape, dtype=lse.dtype, device=q.device)  # the reduce-scatter's input, rank-major
        for run in ctx.runs:
            rows = run.rows
            for segment in run.segments:
                keys = _keys(kv, segment)
                dq_part, dk, dv = ctx.kernel[1](q[:, :, rows], keys[0], keys[1], out[:, :, rows], lse[:, :, rows],
                                                dout[:, :, rows], _mask(run, segment, ctx.causal, ctx.docs),
                                                ctx.scale, ctx.block)  # fmt: skip
                dq[:, :, rows] += dq_part
                grads = _keys(dkv, segment)
                grads[0] += dk
                grads[1] += dv
        del kv
        mine = torch.empty(dkv.shape[1:], dtype=dkv.dtype, device=dkv.device)
        reduce_scatter_sum(mine, dkv.flatten(0, 1), ctx.group)  # in fp32: dK/dV sums over every rank's queries
        return dq.to(q.dtype), mine[0].to(k.dtype), mine[1].to(v.dtype), None, None, None, None, None, None, None, None


@torch._dynamo.disable  # collectives inside a custom backward: compiled models call it eagerly (a graph break)
def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: ProcessGroup | None = None,
                               *, causal: bool = True, document_ids: torch.Tensor | None = None,
                               scale: float | None = None, block: int | None = None, layout: Layout | None = None,
                               kernel: Kernel | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Attention output (B, Hq, L, D) and log-sum-exp (B, Hq, L) for this rank's head-tail shard.

    q: (B, Hq, L, D) and k, v: (B, Hkv, L, D), the rank's L = 2c tokens as ``shard_sequence`` lays them out
    (Hq a multiple of Hkv: grouped-query attention gathers only the Hkv heads). document_ids: the whole
    (padded) sequence's ids, (N,) or (B, N), the same on every rank (``document_ids(cu_seqlens, N)``): a
    query sees only keys of its own document. scale: default 1/sqrt(D). layout: how the sequence is sharded
    (default ``head_tail_layout``). kernel: the local step, a pair (forward(q, k, v, mask, scale, block) ->
    (out, lse); backward(q, k, v, out, lse, dout, mask, scale, block) -> (dq, dk, dv)); ``mask`` is None, a
    bool tensor or a ``SegmentMask``. Default ``FLASH``: torch's fused flash kernel (CPU, or CUDA in bf16/fp16)
    where the mask allows, else the fp32 matmul kernel of ``kernel.py`` (``MATMUL``)."""
    group = group if group is not None else dist.group.WORLD
    if not isinstance(group, ProcessGroup) or dist.get_rank(group) < 0:
        raise ValueError(f"group must be a ProcessGroup this rank belongs to (of a DeviceMesh: "
                         f"mesh['cp'].get_group()), got {group!r}")  # fmt: skip
    if not (q.dtype == k.dtype == v.dtype and q.is_floating_point()) or not q.device == k.device == v.device:
        raise TypeError(f"q, k and v must share one floating dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} "
                        f"on {q.device}/{k.device}/{v.device}")  # fmt: skip
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"block (query rows per kernel block) must be an int >= 1 or None, got {block!r}")
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[:1] + q.shape[2:] != k.shape[:1] + k.shape[2:]:
        raise ValueError(f"need q (B, Hq, L, D) and k, v (B, Hkv, L, D) of one B, L and D, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")  # fmt: skip
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    p = dist.get_world_size(group)
    n = q.shape[2] * p
    layout = layout or head_tail_layout(n, p)
    if layout.n != n or layout.cp_size != p:
        raise ValueError(f"the layout is for {layout.n} tokens over {layout.cp_size} ranks, but {p} ranks hold "
                         f"{q.shape[2]} each")  # fmt: skip
    docs = None
    if document_ids is not None:
        docs = torch.as_tensor(document_ids, device=q.device)
        if docs.is_floating_point() or docs.is_complex() or docs.dtype == torch.bool:
            raise TypeError(f"document_ids must be integer ids (document_ids(cu_seqlens, N)), got {docs.dtype}")
        docs = docs.expand(q.shape[0], -1) if docs.dim() == 1 else docs
        if docs.shape != (q.shape[0], n):
            raise ValueError(f"document_ids must cover the whole sequence, (N,) or (B, N) with N = {n}, got "
                             f"{tuple(torch.as_tensor(document_ids).shape)}")  # fmt: skip
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    mode, stash = stash_mode()
    kept = stash.pop(0) if mode == "replay" and stash else None
    if kept is not None and (kept[0].shape != q.shape or kept[0].dtype != q.dtype or kept[0].device != q.device):
        raise RuntimeError("activation checkpointing replayed an attention output of another shape: the block "
                           "must call its attentions in the same order when recomputed")  # fmt: skip
    kernel = kernel or FLASH
    out, lse = _AllGatherKVAttention.apply(q, k, v, group, causal, docs, scale, block, kept, layout, kernel)
    if mode == "record":
        stash.append((out.detach(), lse))
    return out, lse
