"""The local attention step: output and log-sum-exp for a block of queries against a block of keys, and its
backward from the saved log-sum-exp (flash attention's recurrences, in plain matmuls).

Computed in fp32 (fp64 for fp64 inputs) on any device, in blocks of query rows so a block's scores hold at
most ``SCORE_ELEMENTS`` values (or ``block`` rows), whatever the sequence length. Grouped-query attention runs
on the KV heads as they are: queries are viewed as (kv_heads, group) and never repeated. ``mask`` is a bool
(B or 1, Lq, Lk), True where a query sees a key, or a ``SegmentMask`` (causal and document rules in global
positions) that builds one block of rows at a time (so no mask of Lq x Lk ever exists); a row that sees
nothing gets output 0 and log-sum-exp -inf. ``flash.py`` puts torch's fused kernels in this place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SegmentMask:
    """Queries from global position ``query_start`` against keys at [key_start, key_stop): a query sees a key
    at or before it (when ``causal``) of its own document (when ``documents``, (B, N) ids, is given)."""

    query_start: int
    key_start: int
    key_stop: int
    causal: bool
    documents: torch.Tensor | None = None

    def rows(self, rows: slice, device: torch.device | None = None) -> torch.Tensor:
        """(B or 1, rows, keys) bool for the query rows ``rows`` (local to the query block), on ``device``."""
        a, b = self.query_start + rows.start, self.query_start + rows.stop
        device = device if self.documents is None else self.documents.device
        same = None
        if self.documents is not None:
            docs = self.documents
            same = docs[:, a:b, None] == docs[:, None, self.key_start : self.key_stop]
        if not self.causal:
            return same if same is not None else torch.ones(1, b - a, self.key_stop - self.key_start,
                                                            dtype=torch.bool, device=device)  # fmt: skip
        keys = torch.arange(self.key_start, self.key_stop, device=device)
        before = (keys[None] <= torch.arange(a, b, device=device)[:, None])[None]
        return before if same is None else before & same


Mask = torch.Tensor | SegmentMask | None

SCORE_ELEMENTS = 2**21  # 8 MiB of fp32 scores per block


def _rows(block: int | None, q: torch.Tensor, keys: int) -> int:
    if block is not None:
        return max(1, block)
    return max(1, SCORE_ELEMENTS // max(1, q.shape[0] * q.shape[1] * keys))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What attention accumulates in for inputs of ``dtype``: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    b, h, lq, d = q.shape
    if h % kv_heads:
        raise ValueError(f"{h} query heads do not group over {kv_heads} key/value heads")
    return q.reshape(b, kv_heads, h // kv_heads, lq, d)


def _scores(qg: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    s = torch.einsum("bhgqd,bhkd->bhgqk", qg, k).mul_(scale)  # in place: one block of scores alive, not three
    if mask is not None:
        s.masked_fill_(~mask[:, None, None], float("-inf"))
    return s


def _rows_of(mask: Mask, rows: slice, device: torch.device) -> torch.Tensor | None:
    if mask is None:
        return None
    return mask.rows(rows, device) if isinstance(mask, SegmentMask) else mask[:, rows].to(device)


def _probabilities(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(s - lse), in s's memory; 0 in rows that see no key (-inf - -inf), while a NaN in the inputs stays."""
    return s.sub_(lse[..., None]).exp_().masked_fill_(torch.isneginf(lse)[..., None], 0.0)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, scale: float,
                      block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(out (B, Hq, Lq, D), lse (B, Hq, Lq)) of q against k, v, both in the compute dtype (fp32, fp64 for fp64):
    partial outputs merge without a rounding to q's dtype in between."""
    ct = compute_dtype(q.dtype)
    b, h, lq, d = q.shape
    qg, k, v = _grouped(q, k.shape[1]).to(ct), k.to(ct), v.to(ct)
    out = torch.empty(b, h, lq, v.shape[-1], dtype=ct, device=q.device)
    lse = torch.empty(b, h, lq, dtype=ct, device=q.device)
    step = _rows(block, q, k.shape[2])
    for start in range(0, lq, step):
        rows = slice(start, min(start + step, lq))
        s = _scores(qg[:, :, :, rows], k, _rows_of(mask, rows, q.device), scale)
        block_lse = torch.logsumexp(s, dim=-1)
        o = torch.einsum("bhgqk,bhkd->bhgqd", _probabilities(s, block_lse), v)
        out[:, :, rows] = o.reshape(b, h, -1, v.shape[-1])
        lse[:, :, rows] = block_lse.reshape(b, h, -1)
    return out, lse


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                       dout: torch.Tensor, mask: Mask, scale: float,
                       block: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dq, dk, dv) in the compute dtype, from the forward's saved out and lse (scores recomputed per block)."""
    ct = compute_dtype(q.dtype)
    hk = k.shape[1]
    qg, k, v = _grouped(q, hk).to(ct), k.to(ct), v.to(ct)
    og, dog = _grouped(out, hk).to(ct), _grouped(dout, hk).to(ct)
    lseg = lse.reshape(*qg.shape[:-1])
    dq = torch.empty_like(qg)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    step = _rows(block, q, k.shape[2])
    for start in range(0, q.shape[2], step):
        rows = slice(start, min(start + step, q.shape[2]))
        p = _probabilities(_scores(qg[:, :, :, rows], k, _rows_of(mask, rows, q.device), scale),
                           lseg[:, :, :, rows])  # fmt: skip
        do = dog[:, :, :, rows]
        dv += torch.einsum("bhgqk,bhgqd->bhkd", p, do)
        dp = torch.einsum("bhgqd,bhkd->bhgqk", do, v)
        delta = (do * og[:, :, :, rows]).sum(-1, keepdim=True)
        ds = dp.sub_(delta).mul_(p).mul_(scale)
        dq[:, :, :, rows] = torch.einsum("bhgqk,bhkd->bhgqd", ds, k)
        dk += torch.einsum("bhgqk,bhgqd->bhkd", ds, qg[:, :, :, rows])
    return dq.reshape(q.shape), dk, dv


MATMUL = (attention_forward, attention_backward)
