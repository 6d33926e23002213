"""Context-parallel attention against full attention in one process: output, log-sum-exp and dq/dk/dv, for
P = 2, 3, 4, grouped-query attention, documents crossing shard boundaries, causal and not."""

from __future__ import annotations

import pytest
import torch
from dist_pool import DistPool

from scalestack.context import (
    FLASH,
    MATMUL,
    Layout,
    SegmentMask,
    context_parallel_attention,
    document_head_tail_layout,
    document_ids,
    head_tail_layout,
    pad_to_multiple,
    shard_sequence,
    unshard,
    zigzag_order,
    zigzag_positions,
)
from scalestack.fsdp.collectives import record_collectives


@pytest.fixture(scope="module")
def pool():
    p = DistPool(4)
    yield p
    p.close()


def reference(q, k, v, causal, docs):
    """Full attention, written out: repeated KV heads, a dense mask, softmax; lse by logsumexp."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    n = q.shape[2]
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    mask = torch.ones(n, n, dtype=torch.bool)
    if causal:
        mask = mask.tril()
    mask = mask[None, None].expand(q.shape[0], 1, n, n)
    if docs is not None:
        mask = mask & (docs[:, None, :, None] == docs[:, None, None, :])
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v, torch.logsumexp(s, dim=-1)


def case(dtype, n=24, heads=4, kv_heads=2, docs=True, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, 8, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, n, 8, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, n, 8, generator=g, dtype=dtype)
    dout = torch.randn(batch, heads, n, 8, generator=g, dtype=dtype)
    ids = None
    if docs:  # boundaries that cross the shards: 7, 5, 9 and the rest (different per row)
        ids = torch.stack([document_ids(torch.tensor([0, 7, 12, 21, n]), n),
                           document_ids(torch.tensor([0, 3, 17]), n)])  # fmt: skip
    return q, k, v, dout, ids


def _run(rank, world, group, dtype, causal, docs, kv_heads, n, cu=None, block=None, kernel="matmul"):
    q, k, v, dout, ids = case(dtype, n=n, kv_heads=kv_heads, docs=docs)
    layout = None
    if cu is not None:  # one document layout for the whole batch: both rows packed alike
        layout = document_head_tail_layout(torch.tensor(cu), n, world)
        ids = document_ids(torch.tensor(cu), n)
    local = [shard_sequence(t, world, rank, dim=2, layout=layout).requires_grad_() for t in (q, k, v)]
    with record_collectives() as log:
        kernel = {"flash": FLASH, "matmul": MATMUL}[kernel]
        out, lse = context_parallel_attention(*local, group, causal=causal, document_ids=ids, layout=layout,
                                              block=block, kernel=kernel)  # fmt: skip
        forward_log = list(log)
        out.backward(shard_sequence(dout, world, rank, dim=2, layout=layout))
    return out.detach(), lse, [t.grad for t in local], [c.kind for c in forward_log], [c.kind for c in log]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_matches_full_attention_in_fp64(pool, world):
    for causal, docs, kv_heads in ((True, False, 2), (True, True, 1), (False, True, 4), (False, False, 2)):
        n = 24
        results = pool.run(_run, world, torch.float64, causal, docs, kv_heads, n, None, 1 + world)  # small blocks
        q, k, v, dout, ids = case(torch.float64, n=n, kv_heads=kv_heads, docs=docs)
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out, lse = reference(q, k, v, causal, ids)
        out.backward(dout)
        torch.testing.assert_close(unshard([r[0] for r in results], dim=2), out.detach(), atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(unshard([r[1] for r in results], dim=2), lse.detach(), atol=1e-10, rtol=1e-10)
        for j, t in enumerate((q, k, v)):
            torch.testing.assert_close(unshard([r[2][j] for r in results], dim=2), t.grad, atol=1e-10, rtol=1e-10)
        # one all-gather forward; the backward adds one all-gather and one reduce-scatter
        assert results[0][3] == ["all_gather"]
        assert results[0][4] == ["all_gather", "all_gather", "reduce_scatter"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flash_kernel_matches_full_attention(pool, dtype):
    """torch's CPU flash kernel as the local step: the diagonal chunks causal, the rest unmasked; document
    masks fall back to the matmul kernel inside the same call."""
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)
    for world in (2, 3):
        for causal, docs, kv_heads in ((True, False, 2), (False, False, 1), (True, True, 4)):
            n = 12 * world
            results = pool.run(_run, world, dtype, causal, docs, kv_heads, n, None, None, "flash")
            q, k, v, dout, ids = case(dtype, n=n, kv_heads=kv_heads, docs=docs)
            q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
            out, lse = reference(q, k, v, causal, ids)
            out.backward(dout)
            torch.testing.assert_close(unshard([r[0] for r in results], dim=2), out.detach(), **tol)
            torch.testing.assert_close(unshard([r[1] for r in results], dim=2), lse.detach(), **tol)
            for j, t in enumerate((q, k, v)):
                torch.testing.assert_close(unshard([r[2][j] for r in results], dim=2), t.grad, **tol)


def test_flash_kernel_takes_the_masks_it_can():
    from scalestack.context.flash import _flash_causal

    q, k = torch.zeros(1, 4, 8, 16), torch.zeros(1, 2, 8, 16)
    assert _flash_causal(q, k, None) is False  # a segment wholly before the queries
    assert _flash_causal(q, k, SegmentMask(16, 16, 24, causal=True)) is True  # the queries' own chunk
    assert _flash_causal(q, k[:, :, :4], SegmentMask(16, 16, 20, causal=True)) is None  # not square
    assert _flash_causal(q, k, SegmentMask(16, 8, 16, causal=True)) is None  # another offset
    assert _flash_causal(q, k, SegmentMask(16, 16, 24, True, torch.zeros(1, 32, dtype=torch.long))) is None


@pytest.mark.parametrize("world", [2, 3, 4])
def test_matches_full_attention_in_fp32(pool, world):
    n = 16 * world
    results = pool.run(_run, world, torch.float32, True, True, 2, n)
    q, k, v, dout, ids = case(torch.float32, n=n, kv_heads=2, docs=True)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = reference(q, k, v, True, ids)
    out.backward(dout)
    tol = dict(atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(unshard([r[0] for r in results], dim=2), out.detach(), **tol)
    torch.testing.assert_close(unshard([r[1] for r in results], dim=2), lse.detach(), **tol)
    for j, t in enumerate((q, k, v)):
        torch.testing.assert_close(unshard([r[2][j] for r in results], dim=2), t.grad, **tol)


def test_head_tail_permutation_round_trips_and_balances_causal_work():
    for world in (1, 2, 3, 4, 8):
        n = 2 * world * 5
        x = torch.arange(n)[None].repeat(3, 1) * 10 + torch.arange(3)[:, None]
        shards = [shard_sequence(x, world, r) for r in range(world)]
        assert torch.equal(unshard(shards), x)
        assert sorted(zigzag_order(n, world).tolist()) == list(range(n))
        # causal query-key pairs per rank: a query at position i sees i + 1 keys
        pairs = [int((zigzag_positions(n, world, r) + 1).sum()) for r in range(world)]
        assert len(set(pairs)) == 1, pairs
    assert zigzag_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert zigzag_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="pad it to a multiple of 4"):
        zigzag_positions(10, 2, 0)
    assert pad_to_multiple(torch.ones(2, 5), 4, 0).shape == (2, 8)
    assert document_ids(torch.tensor([0, 2, 5]), 7).tolist() == [0, 0, 1, 1, 1, 2, 3]
    with pytest.raises(ValueError, match="increase strictly"):
        document_ids(torch.tensor([0, 3, 3]), 7)


@pytest.mark.parametrize("world", [2, 4])
def test_the_document_layout_matches_full_attention_and_balances_every_document(pool, world):
    n, cu = 48, [0, 16, 24, 40]  # three documents of 16, 8 and 16 tokens, and 8 of padding: multiples of 2P
    layout = document_head_tail_layout(torch.tensor(cu), n, world)
    docs = document_ids(torch.tensor(cu), n)
    k_pos = torch.arange(n)
    pairs = []
    for r in range(world):
        q_pos = layout.positions(r)
        pairs.append(int(((k_pos[None] <= q_pos[:, None]) & (docs[q_pos][:, None] == docs[None])).sum()))
    assert len(set(pairs)) == 1, pairs  # the same unmasked query-key pairs on every rank
    for causal in (True, False):
        results = pool.run(_run, world, torch.float64, causal, True, 2, n, cu)
        q, k, v, dout, _ = case(torch.float64, n=n, kv_heads=2, docs=True)
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out, lse = reference(q, k, v, causal, docs.expand(2, -1))
        out.backward(dout)
        tol = dict(atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(unshard([r[0] for r in results], dim=2, layout=layout), out.detach(), **tol)
        torch.testing.assert_close(unshard([r[1] for r in results], dim=2, layout=layout), lse.detach(), **tol)
        for j, t in enumerate((q, k, v)):
            torch.testing.assert_close(unshard([r[2][j] for r in results], dim=2, layout=layout), t.grad, **tol)


def _bf16_errors(rank, world, group):
    """Max |error| against fp32 full attention of our bf16 sharded attention (FLASH) and of bf16 SDPA."""
    import torch.nn.functional as F

    q, k, v, dout, _ = case(torch.float32, n=64, kv_heads=2, docs=False, batch=1)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*full, is_causal=True, enable_gqa=True)
    out.backward(dout)
    wanted = [out.detach()] + [t.grad for t in full]
    half = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out_h = F.scaled_dot_product_attention(*half, is_causal=True, enable_gqa=True)
    out_h.backward(dout.bfloat16())
    sdpa = [out_h.detach()] + [t.grad for t in half]
    local = [shard_sequence(t.bfloat16(), world, rank, dim=2).requires_grad_() for t in (q, k, v)]
    mine, _ = context_parallel_attention(*local, group)
    mine.backward(shard_sequence(dout.bfloat16(), world, rank, dim=2))
    ours = [mine.detach()] + [t.grad for t in local]
    return [(shard_sequence(w, world, rank, dim=2), o.float(), shard_sequence(x.float(), world, rank, dim=2))
            for w, o, x in zip(wanted, ours, sdpa)]  # fmt: skip


def test_bf16_error_is_within_twice_sdpa_own(pool):
    """The flash attention tests' criterion: against fp32, no worse than twice bf16 SDPA's own error."""
    for rank_rows in zip(*pool.run(_bf16_errors, 2)):
        wanted, ours, sdpa = (torch.cat([r[i] for r in rank_rows]) for i in range(3))
        ours_error, sdpa_error = (ours - wanted).abs().max(), (sdpa - wanted).abs().max()
        assert ours_error <= 2 * sdpa_error + 1e-3, (ours_error, sdpa_error)


def _bad_inputs(rank, world, group):
    q, k, v, _, _ = case(torch.float32, n=8, kv_heads=2, docs=False, batch=1)
    local = [shard_sequence(t, world, rank, dim=2) for t in (q, k, v)]
    messages = []
    for kwargs, args in (
        ({}, (local[0], local[1].double(), local[2])),
        ({}, (local[0].long(), local[1].long(), local[2].long())),
        ({"block": 0}, local),
        ({"document_ids": torch.zeros(8, dtype=torch.bool)}, local),
        ({"layout": head_tail_layout(16, 2)}, local),
    ):
        try:
            context_parallel_attention(*args, group, **kwargs)
        except (TypeError, ValueError) as e:
            messages.append(str(e))
    nan_q = local[0].clone()
    nan_q[0, 0, 1] = float("nan")  # a NaN must come out as NaN, never as a quiet 0
    out, _ = context_parallel_attention(nan_q, local[1], local[2], group)
    return messages, bool(out[0, 0, 1].isnan().all()), bool(out[0, 0, 0].isfinite().all())


def test_bad_inputs_are_named_and_nan_propagates(pool):
    for messages, nan_row, clean_row in pool.run(_bad_inputs, 2):
        assert len(messages) == 5, messages
        assert "one floating dtype" in messages[0] and "one floating dtype" in messages[1]
        assert "block" in messages[2] and "integer ids" in messages[3] and "the layout is for 16" in messages[4]
        assert nan_row and clean_row
    with pytest.raises(ValueError, match="exactly once"):
        Layout(8, (((0, 4), (0, 4)),))
    with pytest.raises(ValueError, match="same number of positions"):
        Layout(8, (((0, 2),), ((2, 6),)))
    with pytest.raises(ValueError, match="size >= 1"):
        document_head_tail_layout(torch.tensor([0, 8]), 8, 0)


def test_the_cuda_flash_calls_take_their_arguments():
    """The CUDA branch of FLASH on meta tensors (no GPU here): the fused ops accept the arguments, shapes and
    dtypes come out right, and dK/dV are summed over each group of query heads in fp32."""
    from scalestack.context.flash import flash_backward, flash_forward

    q = torch.empty(1, 4, 8, 16, device="meta", dtype=torch.bfloat16)
    k = torch.empty(1, 2, 8, 16, device="meta", dtype=torch.bfloat16)
    mask = SegmentMask(0, 0, 8, causal=True)
    out, lse = flash_forward(q, k, k, mask, 0.25)
    assert out.shape == q.shape and lse.shape == (1, 4, 8) and lse.dtype == torch.float32
    dq, dk, dv = flash_backward(q, k, k, out, lse, out, mask, 0.25)
    assert dq.shape == q.shape and dk.shape == dv.shape == k.shape and dk.dtype == torch.float32
