"""``scalestack.apply_fsdp`` on Hugging Face causal LMs built from tiny configs and on our GPT: training at
W=2 matches the unsharded model; an architecture it does not recognize gets the manual alternative."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from test_engine import global_mean, local, param_errors

import scalestack as ss
from scalestack.fsdp.api import units
from scalestack.models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.timeout(240)

VOCAB, BATCH, T = 64, 4, 12


def build(kind: str) -> nn.Module:
    import transformers as tf

    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**small))
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**small))
    if kind == "mixtral":  # a mixture of experts: some experts get tokens on one rank only
        return tf.MixtralForCausalLM(tf.MixtralConfig(**small, num_local_experts=4, num_experts_per_tok=2))
    if kind == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=T,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
        return tf.GPT2LMHeadModel(config)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=T, n_layer=2, n_head=4, n_embd=32))


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(model, GPT):
        return model(ids[:, :-1], ids[:, 1:])
    return model(input_ids=ids, labels=ids).loss


def train_case(rank, world, group, kind):
    torch.manual_seed(0)
    ref = build(kind)
    model = copy.deepcopy(ref)
    ss.apply_fsdp(model, mesh=group)
    n_units = len(units(model))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(5):
        ids = torch.randint(0, VOCAB, (BATCH, T), generator=g)
        loss = loss_of(model, local(ids, rank, world))
        loss.backward()
        ref_loss = loss_of(ref, ids)
        ref_loss.backward()
        for o in (opt, ref_opt):
            o.step(), o.zero_grad()
        losses.append((global_mean(loss, group, world), ref_loss.item()))
    return losses, max(param_errors(model, ref).values()), n_units


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "mixtral", "gpt"])
def test_apply_fsdp_trains_like_the_unsharded_model(pool, kind):
    losses, worst, n_units = pool.run(train_case, 2, kind)[0]
    assert n_units == 3  # two blocks and the root
    for loss, ref_loss in losses:
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (kind, loss, ref_loss)
    assert worst < 2e-3, worst


def test_unknown_architecture_gets_the_manual_alternative():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

    with pytest.raises(
        ValueError, match=r"does not recognize Odd(.|\n)*fully_shard\(block\)(.|\n)*fully_shard\(model\)"
    ):
        ss.apply_fsdp(Odd())
    with pytest.raises(TypeError, match="takes an nn.Module"):
        ss.apply_fsdp("model")


def summary_case(rank, world, group):
    import logging

    torch.manual_seed(0)
    model = ss.apply_fsdp(build("llama"), mesh=group)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("scalestack")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        ids = torch.randint(0, VOCAB, (2, T))
        before = ss.memory_summary(model)
        loss_of(model, ids).backward()
    finally:
        logger.removeHandler(handler)
    full = sum(p.numel() for p in build("llama").parameters())
    shards = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss_of(model, ids).backward()
    ranges = {e.key for e in prof.key_averages() if e.key.startswith("scalestack::")}
    return before, [r.getMessage() for r in records], full, shards, ranges


def test_memory_summary_layout_log_and_profiler_ranges(pool):
    summary, logs, full, shard_bytes, ranges = pool.run(summary_case, 2)[0]
    for phase in ("unshard", "pre_forward", "pre_backward", "post_backward"):  # per unit, named as in the model
        assert f"scalestack::{phase} (model.layers.1)" in ranges, (phase, sorted(ranges))
    assert {"scalestack::all_gather", "scalestack::reduce_scatter", "scalestack::pre_forward (<root>)"} <= ranges
    lines = summary.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert set(rows) == {"<root>", "model.layers.0", "model.layers.1", "total"}
    assert int(rows["total"][1].replace(",", "")) == full  # every parameter, once
    assert float(rows["total"][3]) == pytest.approx(shard_bytes / 2**20, abs=0.01)  # padding only beyond pieces
    assert all(r[-1] == "SHARDED" for name, r in rows.items() if name != "total")
    assert len(logs) == 3 and all(m.startswith("unit ") and "padding" in m for m in logs)
    with pytest.raises(ValueError, match="holds no unit"):
        ss.memory_summary(nn.Linear(2, 2))
