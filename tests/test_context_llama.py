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
    chunked_cross_entropy,
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


def _cp_step(rank, world, group, chunk):
    model = apply_context_parallel(tiny_llama(), group)
    ids, labels, docs, positions = batch()
    local = [shard_sequence(t, world, rank) for t in (ids, labels, positions)]
    hidden = model.model(input_ids=local[0], position_ids=local[2], cp_document_ids=docs).last_hidden_state
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


@pytest.mark.parametrize("world", [2, 4])
def test_llama_loss_and_gradients_match_the_whole_sequence(pool, world):
    results = pool.run(_cp_step, world, 5)
    model = tiny_llama()
    ids, labels, docs, positions = batch()
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
