"""The local attention step on torch's fused flash-attention kernels (SDPA's own): the CPU flash kernel, and
the CUDA one on GPUs (bf16/fp16).

They take no arbitrary mask, only none or causal, and that is what head-tail sharding asks of almost every
(query run, key segment) pair: a segment wholly before the run (no mask) or the run's own chunk (causal and
square). Any other pair (documents, a partial segment) falls back to the matmul kernel, so the result is the
same either way. The backward takes the merged output and log-sum-exp of all segments, as flash attention's
backward does per key block. Grouped-query attention repeats K/V for the kernel, one segment at a time, and
sums dK/dV back over each group.
"""

from __future__ import annotations

import torch

from .kernel import Mask, SegmentMask, attention_backward, attention_forward, compute_dtype

_aten = torch.ops.aten
_CUDA_DTYPES = (torch.float16, torch.bfloat16)


def _flash_causal(q: torch.Tensor, k: torch.Tensor, mask: Mask) -> bool | None:
    """is_causal for the fused kernel, or None when it cannot take this mask or dtype."""
    if q.device.type != "cpu" and q.dtype not in _CUDA_DTYPES:
        return None
    if mask is None:
        return False
    square = isinstance(mask, SegmentMask) and mask.query_start == mask.key_start and q.shape[2] == k.shape[2]
    if square and mask.causal and mask.documents is None:
        return True
    return None


def _repeated(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _poison(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, Hq, Lq): 0, or NaN where a query row or the segment's K/V holds a NaN or an infinity. torch's CPU
    flash kernel returns 0 for a NaN row; a diverging run must see NaN instead (a NaN key poisons the whole
    segment's rows here, more than a masked kernel would, never fewer)."""
    keys = (k.sum((2, 3), dtype=torch.float32) + v.sum((2, 3), dtype=torch.float32)).mul_(0)  # (B, Hq)
    return q.sum(-1, dtype=torch.float32).mul_(0).add_(keys[..., None])


def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, scale: float,
                  block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(out in q's dtype, lse (B, Hq, Lq) in fp32, fp64 for fp64) of q against k, v."""
    causal = _flash_causal(q, k, mask)
    if causal is None:
        return attention_forward(q, k, v, mask, scale, block)
    k, v = _repeated(k, q.shape[1]), _repeated(v, q.shape[1])
    if q.device.type != "cpu":
        out, lse = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, scale=scale)[:2]
    else:
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    poison = _poison(q, k, v)
    return out + poison[..., None], lse + poison


def flash_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                   dout: torch.Tensor, mask: Mask, scale: float,
                   block: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dq, dk, dv) from the merged out and lse, dk/dv summed over each group of query heads."""
    causal = _flash_causal(q, k, mask)
    if causal is None:
        return attention_backward(q, k, v, out, lse, dout, mask, scale, block)
    b, kv_heads, keys, d = k.shape
    kr, vr = _repeated(k, q.shape[1]), _repeated(v, q.shape[1])
    q, out, dout, lse = q.contiguous(), out.contiguous(), dout.contiguous(), lse.contiguous()
    if q.device.type != "cpu":  # not the variable-length form, no dropout: no sequence offsets, no random state
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
            dout, q, kr, vr, out, lse, None, None, q.shape[2], keys, 0.0, causal, None, None, scale=scale
        )
    else:
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, kr, vr, out, lse, 0.0, causal, scale=scale
        )
    group = q.shape[1] // kv_heads  # each group's gradients summed in fp32, not in the kernel's bf16
    ct = compute_dtype(q.dtype)
    return (
        dq,
        dk.view(b, kv_heads, group, keys, d).sum(2, dtype=ct),
        dv.view(b, kv_heads, group, keys, d).sum(2, dtype=ct),
    )


FLASH = (flash_forward, flash_backward)
