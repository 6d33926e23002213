"""Attention over a sequence sharded head-tail across a context-parallel group: all-gather K/V (Llama 3's
design), with its own backward.

Forward: one all-gather of this rank's K and V (the KV heads, never the repeated query heads), then each of
the rank's two query chunks attends to the key prefix it can see (under a causal mask, keys up to the chunk's
end; all keys otherwise), masked by global positions and document ids. Only the local Q, K, V, the output and
the log-sum-exp are saved. Backward: the same all-gather again, the local kernel's backward per chunk, and
one reduce-scatter that sums every rank's part of dK/dV onto the ranks that own those keys.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from ..fsdp.collectives import all_gather, reduce_scatter_sum
from .checkpointing import stash_mode
from .kernel import Mask, attention_backward, attention_forward
from .sharding import Layout, head_tail_layout


def _gather_kv(k: torch.Tensor, v: torch.Tensor, group: ProcessGroup, order: torch.Tensor) -> torch.Tensor:
    """(2, B, Hkv, N, D): every rank's K and V in global order, from one all-gather."""
    p = dist.get_world_size(group)
    local = torch.stack([k, v]).contiguous()
    gathered = torch.empty(p * local.numel(), dtype=local.dtype, device=local.device)
    all_gather(gathered, local.reshape(-1), group).wait()
    two, b, h, length, d = local.shape
    rank_major = gathered.view(p, two, b, h, length, d).permute(1, 2, 3, 0, 4, 5).reshape(two, b, h, p * length, d)
    return rank_major.index_select(3, torch.argsort(order).to(k.device))


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
    def forward(ctx, q, k, v, group, causal, docs, scale, block, kept, layout):  # noqa: ANN001 (autograd's)
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
                out[:, :, rows], lse[:, :, rows] = attention_forward(q[:, :, rows], keys_kv[0], keys_kv[1], mask,
                                                                     scale, block)  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal, ctx.docs, ctx.scale, ctx.block = group, causal, docs, scale, block
        ctx.order, ctx.runs = order, runs
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # noqa: ANN001
        q, k, v, out, lse = ctx.saved_tensors
        group, p = ctx.group, dist.get_world_size(ctx.group)
        n = k.shape[2] * p
        kv = _gather_kv(k, v, group, ctx.order)
        dq = torch.empty(q.shape, dtype=lse.dtype, device=q.device)
        dkv = torch.zeros(kv.shape, dtype=lse.dtype, device=q.device)
        for rows, start, lo, hi in ctx.runs:
            mask = _mask(start, rows.stop - rows.start, lo, hi, ctx.causal, ctx.docs)
            dq[:, :, rows], dk, dv = attention_backward(q[:, :, rows], kv[0, :, :, lo:hi], kv[1, :, :, lo:hi],
                                                        out[:, :, rows], lse[:, :, rows], dout[:, :, rows], mask,
                                                        ctx.scale, ctx.block)  # fmt: skip
            dkv[0, :, :, lo:hi] += dk
            dkv[1, :, :, lo:hi] += dv
        two, b, h, _, d = dkv.shape
        rank_major = dkv.index_select(3, ctx.order.to(q.device)).view(two, b, h, p, n // p, d)
        send = rank_major.permute(3, 0, 1, 2, 4, 5).contiguous().view(-1)
        mine = torch.empty(send.numel() // p, dtype=send.dtype, device=send.device)
        reduce_scatter_sum(mine, send, group)
        mine = mine.view(two, b, h, n // p, d)
        return dq.to(q.dtype), mine[0].to(k.dtype), mine[1].to(v.dtype), None, None, None, None, None, None, None


@torch._dynamo.disable  # collectives inside a custom backward: compiled models call it eagerly (a graph break)
def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: ProcessGroup | None = None,
                               *, causal: bool = True, document_ids: torch.Tensor | None = None,
                               scale: float | None = None, block: int | None = None,
                               layout: Layout | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Attention output (B, Hq, L, D) and log-sum-exp (B, Hq, L) for this rank's head-tail shard.

    q: (B, Hq, L, D) and k, v: (B, Hkv, L, D), the rank's L = 2c tokens as ``shard_sequence`` lays them out
    (Hq a multiple of Hkv: grouped-query attention gathers only the Hkv heads). document_ids: the whole
    (padded) sequence's ids, (N,) or (B, N), the same on every rank (``document_ids(cu_seqlens, N)``): a
    query sees only keys of its own document. scale: default 1/sqrt(D)."""
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
    out, lse = _AllGatherKVAttention.apply(q, k, v, group, causal, docs, scale, block, kept, layout)
    if mode == "record":
        stash.append((out.detach(), lse))
    return out, lse
