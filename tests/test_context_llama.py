"""A Hugging Face Llama made context-parallel by one call: the loss over valid tokens and every gradient equal
a single-process run on the whole sequence, with packed documents and ignored labels spread unevenly."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_pool import DistPool

pytest.importorskip("transformers")

from scalestack.context import (  # noqa: E402
    apply_context_parallel,
    checkpoint_blocks,
    chunked_cross_entropy,
    document_head_tail_layout,
    document_ids,
    global_mean_loss,
    shard_sequence,
)

N = 32


@pytest.fixture(scope="module")
def pool():
    p = DistPool(4)
    yield p
    p.close()


def tiny_llama(dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=N)  # fmt: skip
    return LlamaForCausalLM(cfg).to(dtype)


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (2, N), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    labels[0, 3:11] = -100  # ignored tokens, more on some ranks than on others
    labels[1, 20:23] = -100
    docs = torch.stack([document_ids(torch.tensor([0, 9, 20, N]), N), document_ids(torch.tensor([0, 13, N]), N)])
    positions = torch.stack([torch.cat([torch.arange(9), torch.arange(11), torch.arange(12)]),
                             torch.cat([torch.arange(13), torch.arange(19)])])  # fmt: skip
    return ids, labels, docs, positions


def _cp_step(rank, world, group, chunk, by_document=False):
    model = apply_context_parallel(tiny_llama(), group)
    ids, labels, docs, positions = batch()
    layout = None
    if by_document:  # both rows packed alike: 8 + 16 + 8 tokens, each a multiple of 2P
        docs = document_ids(torch.tensor([0, 8, 24]), N).expand(2, -1)
        positions = torch.cat([torch.arange(8), torch.arange(16), torch.arange(8)]).expand(2, -1)
        layout = document_head_tail_layout(torch.tensor([0, 8, 24]), N, world)
    local = [shard_sequence(t, world, rank, layout=layout) for t in (ids, labels, positions)]
    hidden = model.model(input_ids=local[0], position_ids=local[2], cp_document_ids=docs,
                         cp_layout=layout).last_hidden_state  # fmt: skip
    loss_sum, count = chunked_cross_entropy(hidden, model.lm_head.weight, local[1], chunk=chunk)
    loss = global_mean_loss(loss_sum, count, group)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g, group=group)
        grads[name] = g / world  # what FSDP or DDP's averaging gives
    mean = loss.detach().clone()
    dist.all_reduce(mean, group=group)
    return mean.item() / world, grads


@pytest.mark.parametrize("world, by_document", [(2, False), (4, False), (4, True)])
def test_llama_loss_and_gradients_match_the_whole_sequence(pool, world, by_document):
    results = pool.run(_cp_step, world, 5, by_document)
    model = tiny_llama()
    ids, labels, docs, positions = batch()
    if by_document:
        docs = document_ids(torch.tensor([0, 8, 24]), N).expand(2, -1)
        positions = torch.cat([torch.arange(8), torch.arange(16), torch.arange(8)]).expand(2, -1)
    # the reference: whole sequences, each document attending only to itself (a block-diagonal causal mask)
    mask = (docs[:, :, None] == docs[:, None, :]) & torch.ones(N, N, dtype=torch.bool).tril()
    bias = torch.zeros(2, 1, N, N, dtype=torch.float64).masked_fill(~mask[:, None], float("-inf"))
    logits = model(input_ids=ids, position_ids=positions, attention_mask=bias).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    for mean, grads in results:
        assert mean == pytest.approx(loss.item(), rel=1e-10)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, atol=1e-10, rtol=1e-8, msg=name)


class ChunkedLossLM(torch.nn.Module):
    """The model's body and a chunked loss on its output projection: logits never exist for the whole shard."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, positions, labels, docs, count, group):
        hidden = self.lm.model(input_ids=ids, position_ids=positions, cp_document_ids=docs).last_hidden_state
        loss_sum, _ = chunked_cross_entropy(hidden, self.lm.lm_head.weight, labels, chunk=6)
        return global_mean_loss(loss_sum, count, group)


def dp_batches():
    """Four packed sequences: data-parallel rank d takes sequences d and 2 + d, one per micro-batch."""
    ids, labels, docs, positions = batch()
    return tuple(torch.cat([t, t.flip(1) if t is ids else t]) for t in (ids, labels, docs, positions))


def _dp_cp(rank, world, group, checkpointing, compiled):
    import scalestack as ss
    from scalestack.fsdp.collectives import record_collectives

    torch._dynamo.reset()
    cp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_rank, cp_rank = divmod(rank, 2)
    lm = apply_context_parallel(tiny_llama(torch.float32), cp_groups[dp_rank])
    initial = {k: v.clone() for k, v in lm.state_dict().items()}
    if checkpointing:
        checkpoint_blocks(lm.model.layers)
    model = ChunkedLossLM(lm)
    for layer in lm.model.layers:
        ss.fully_shard(layer)  # FSDP over all four ranks: gradients reduced over dp x cp
        if compiled:
            layer.compile(backend="aot_eager")
    ss.fully_shard(model)
    mlp_calls = []
    for layer in lm.model.layers:
        layer.mlp.register_forward_pre_hook(lambda *_: mlp_calls.append(1))
    opt = torch.optim.SGD(model.parameters(), lr=1e4)  # the gradient read back as (before - after) / lr
    ids, labels, docs, positions = dp_batches()
    rows = [dp_rank, 2 + dp_rank]
    count = sum((shard_sequence(labels[r : r + 1], 2, cp_rank) != -100).sum() for r in rows)
    total = torch.zeros(())
    with record_collectives() as log:
        for m, r in enumerate(rows):
            local = [shard_sequence(t[r : r + 1], 2, cp_rank) for t in (ids, positions, labels)]
            model.set_requires_gradient_sync(m == len(rows) - 1)
            loss = model(local[0], local[1], local[2], docs[r : r + 1], count, None)
            loss.backward()
            total += loss.detach()
    attention = [c.kind for c in log if c.ranks == 2]  # the context-parallel group's collectives
    opt.step()
    full = {k.removeprefix("lm."): v for k, v in ss.full_state_dict(model).items()}
    dist.all_reduce(total)
    return total.item() / world, {k: (initial[k] - full[k]) / 1e4 for k in initial}, attention, len(mlp_calls)


@pytest.mark.parametrize("checkpointing, compiled", [(False, False), (True, False), (False, True), (True, True)])
def test_dp_by_cp_mesh_with_fsdp_matches_one_process(pool, checkpointing, compiled):
    results = pool.run(_dp_cp, 4, checkpointing, compiled)
    model = tiny_llama(torch.float32)
    ids, labels, docs, positions = dp_batches()
    mask = (docs[:, :, None] == docs[:, None, :]) & torch.ones(N, N, dtype=torch.bool).tril()
    bias = torch.zeros(4, 1, N, N).masked_fill(~mask[:, None], float("-inf"))
    logits = model(input_ids=ids, position_ids=positions, attention_mask=bias).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    for mean, grads, attention, mlp_calls in results:
        assert mlp_calls == 4 * (2 if checkpointing else 1)  # 2 layers x 2 micro-batches, recomputed under AC
        assert mean == pytest.approx(loss.item(), rel=1e-5)
        for name, p in model.named_parameters():
            error = ((grads[name] - p.grad).norm() / p.grad.norm()).item()
            assert error < 1e-5, (name, error)
        # per layer and micro-batch: one all-gather forward, one all-gather and one reduce-scatter backward,
        # with or without activation checkpointing (the recomputation reuses the attention's output)
        assert attention == (["all_gather"] * 2 + ["all_gather", "reduce_scatter"] * 2) * 2  # 2 layers, 2 micro


def _twice_and_padding(rank, world, group):
    lm = apply_context_parallel(tiny_llama(), group)
    checkpoint_blocks(lm.model.layers)
    ids, labels, docs, positions = batch()
    local = [shard_sequence(t, world, rank) for t in (ids, labels, positions)]
    hidden = lm.model(input_ids=local[0], position_ids=local[2]).last_hidden_state
    loss = global_mean_loss(*chunked_cross_entropy(hidden, lm.lm_head.weight, local[1]), group)
    loss.backward(retain_graph=True)
    once = {n: p.grad.clone() for n, p in lm.named_parameters()}
    loss.backward()  # the checkpointed blocks recompute again, replaying the attention outputs again
    twice = {n: p.grad for n, p in lm.named_parameters()}
    padded = torch.ones_like(local[0])
    padded[0, -1] = 0
    with pytest.raises(ValueError, match="no attention_mask with padding"):
        lm.model(input_ids=local[0], position_ids=local[2], attention_mask=padded)
    with pytest.raises(ValueError, match="no attention_mask with padding"):
        lm.model(local[0], padded, local[2])  # positional, as Transformers' signature allows
    with pytest.raises(ValueError, match="pass position_ids"):
        lm.model(input_ids=local[0])  # RoPE would see local positions
    with pytest.raises(ValueError, match="shift labels on the whole sequence"):
        lm(input_ids=local[0], position_ids=local[2], labels=local[1])
    with pytest.raises(TypeError, match="ProcessGroup"):
        apply_context_parallel(tiny_llama(), None)
    return all(torch.allclose(twice[n], 2 * once[n], rtol=1e-12, atol=1e-15) for n in once)


def test_a_second_backward_recomputes_again_and_wrong_inputs_are_refused(pool):
    assert all(pool.run(_twice_and_padding, 2))
