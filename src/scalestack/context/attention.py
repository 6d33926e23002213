"""Attention over a sequence sharded head-tail across a context-parallel group: all-gather K/V (Llama 3's
design), with its own backward.

Forward: one all-gather of this rank's K and V (the KV heads, never the repeated query heads), then each of
the rank's two query chunks attends to the key prefix it can see (under a causal mask, keys up to the chunk's
end; all keys otherwise), masked by global positions and document ids. Only the local Q, K, V, the output and
the log-sum-exp are saved. Backward: the same all-gather again, the local kernel's backward per chunk, and
one reduce-scatter that sums every rank's part of dK/dV onto the ranks that own those keys.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from ..fsdp.collectives import all_gather, reduce_scatter_sum
from .checkpointing import stash_mode
from .kernel import Mask, attention_backward, attention_forward
from .sharding import Layout, head_tail_layout

Kernel = tuple[Callable[..., tuple[torch.Tensor, torch.Tensor]], Callable[..., tuple[torch.Tensor, ...]]]


def _gather_kv(k: torch.Tensor, v: torch.Tensor, group: ProcessGroup, order: torch.Tensor) -> torch.Tensor:
    """(2, B, Hkv, N, D), a view of (N, 2, B, Hkv, D): every rank's K and V in global order. The shards are
    sent token-major, so the gathered buffer is already the rank-major sequence and one index_select puts it in
    global order: two buffers of the gathered size at the peak, one after."""
    p = dist.get_world_size(group)
    local = torch.stack([k, v]).permute(3, 0, 1, 2, 4).contiguous()  # (L, 2, B, H, D)
    gathered = torch.empty((p * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
    all_gather(gathered, local, group).wait()
    return gathered.index_select(0, torch.argsort(order).to(k.device)).permute(1, 2, 3, 0, 4)


def _runs(layout: Layout, rank: int, causal: bool, first: torch.Tensor | None) -> list[tuple[slice, int, int, int]]:
    """(local rows, first global position, first key, end of keys) of each run of the rank's queries: keys
    before the run's first document (when documents are sorted) or after it (causal) are never seen."""
    out, local = [], 0
    for start, length in layout.runs[rank]:
        lo = 0 if first is None else int(first[:, start : start + length].min())
        out.append((slice(local, local + length), start, lo, start + length if causal else layout.n))
        local += length
    return out


def _first_of_document(docs: torch.Tensor | None) -> torch.Tensor | None:
    """Per position, where its document starts, when every row's ids are sorted (packed documents)."""
    if docs is None or bool((docs[:, 1:] < docs[:, :-1]).any()):
        return None
    return torch.stack([torch.searchsorted(row.contiguous(), row.contiguous()) for row in docs])


def _mask(start: int, length: int, lo: int, hi: int, causal: bool, docs: torch.Tensor | None) -> Mask:
    """The run's mask, built one block of query rows at a time (never run length x keys at once)."""
    if not causal and docs is None:
        return None

    def rows_mask(rows: slice) -> torch.Tensor:
        a, b = start + rows.start, start + min(rows.stop, length)
        device = None if docs is None else docs.device
        mask = None
        if causal:
            mask = (torch.arange(lo, hi, device=device)[None] <= torch.arange(a, b, device=device)[:, None])[None]
        if docs is not None:
            same = docs[:, a:b, None] == docs[:, None, lo:hi]
            mask = same if mask is None else mask & same
        return mask

    return rows_mask


class _AllGatherKVAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, docs, scale, block, kept, layout, kernel):  # noqa: ANN001
        rank = dist.get_rank(group)
        order = layout.order()
        runs = _runs(layout, rank, causal, _first_of_document(docs))
        if kept is not None:  # recomputed under activation checkpointing: the first forward's results
            out, lse = kept
        else:
            kv = _gather_kv(k, v, group, order)
            out = torch.empty_like(q)
            lse = torch.empty(q.shape[:3], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                              device=q.device)  # fmt: skip
            for rows, start, lo, hi in runs:
                mask = _mask(start, rows.stop - rows.start, lo, hi, causal, docs)
                keys_kv = kv[:, :, :, lo:hi]
                out[:, :, rows], lse[:, :, rows] = kernel[0](q[:, :, rows], keys_kv[0], keys_kv[1], mask, scale,
                                                             block)  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal, ctx.docs, ctx.scale, ctx.block = group, causal, docs, scale, block
        ctx.order, ctx.runs, ctx.kernel = order, runs, kernel
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # noqa: ANN001
        q, k, v, out, lse = ctx.saved_tensors
        group, p = ctx.group, dist.get_world_size(ctx.group)
        n = k.shape[2] * p
        kv = _gather_kv(k, v, group, ctx.order)
        dq = torch.empty(q.shape, dtype=lse.dtype, device=q.device)
        dkv = torch.zeros((kv.shape[3], *kv.shape[:3], kv.shape[4]), dtype=lse.dtype, device=q.device)  # token-major
        dkv_view = dkv.permute(1, 2, 3, 0, 4)
        for rows, start, lo, hi in ctx.runs:
            mask = _mask(start, rows.stop - rows.start, lo, hi, ctx.causal, ctx.docs)
            dq[:, :, rows], dk, dv = ctx.kernel[1](q[:, :, rows], kv[0, :, :, lo:hi], kv[1, :, :, lo:hi],
                                                   out[:, :, rows], lse[:, :, rows], dout[:, :, rows], mask,
                                                   ctx.scale, ctx.block)  # fmt: skip
            dkv_view[0, :, :, lo:hi] += dk
            dkv_view[1, :, :, lo:hi] += dv
        del kv
        send = dkv.index_select(0, ctx.order.to(q.device))  # rank-major, each rank's tokens contiguous
        del dkv, dkv_view
        mine = torch.empty((n // p, *send.shape[1:]), dtype=send.dtype, device=send.device)
        reduce_scatter_sum(mine, send, group)  # in fp32: dK/dV sums over every rank's queries
        mine = mine.permute(1, 2, 3, 0, 4)
        grads = dq.to(q.dtype), mine[0].to(k.dtype), mine[1].to(v.dtype)
        return *grads, None, None, None, None, None, None, None, None


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
    (out, lse); backward(q, k, v, out, lse, dout, mask, scale, block) -> (dq, dk, dv)), default the matmul
    kernel of ``kernel.py``; ``mask`` is None or a function of a slice of query rows."""
    group = group if group is not None else dist.group.WORLD
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
    kernel = kernel or (attention_forward, attention_backward)
    out, lse = _AllGatherKVAttention.apply(q, k, v, group, causal, docs, scale, block, kept, layout, kernel)
    if mode == "record":
        stash.append((out.detach(), lse))
    return out, lse
