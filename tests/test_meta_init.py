"""Meta-device initialization: ``scalestack.materialize`` against plain construction (bitwise), FSDP2's
``to_empty`` flow, a checkpoint loaded straight into a meta-built model, the memory bound, and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from test_engine import local

import scalestack as ss
from scalestack.fsdp.api import units
from scalestack.models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.timeout(240)


def tiny_llama(tied: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)  # fmt: skip
    return LlamaForCausalLM(config)


class TiedBeforeInit(nn.Module):
    """nanoGPT's order: the tie is made before ``self.apply(self._init_weights)``, so the last module that
    initializes the shared weight wins (materialize(..., tied="last"))."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(96, 48)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(48), nn.Linear(48, 48)) for _ in range(2))
        self.lm_head = nn.Linear(48, 96, bias=False)
        self.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx):
        x = self.wte(idx)
        for block in self.blocks:
            x = x + block(x)
        return self.lm_head(x)


BUILDERS = {  # name: (build, the blocks to shard, materialize's tied=)
    "gpt": (lambda: GPT(GPTConfig(vocab_size=96, n_embd=48, n_head=4, n_layer=3)), lambda m: m.layers, "first"),
    "llama": (tiny_llama, lambda m: m.model.layers, "first"),
    "llama-tied": (lambda: tiny_llama(tied=True), lambda m: m.model.layers, "first"),
    "tied-before-init": (TiedBeforeInit, lambda m: m.blocks, "last"),
}


def shard(model: nn.Module, blocks, group, **kwargs) -> nn.Module:
    for block in blocks:
        ss.fully_shard(block, mesh=group, **kwargs)
    return ss.fully_shard(model, mesh=group, **kwargs)


def meta_case(rank, world, group, kind):
    build, blocks, tied = BUILDERS[kind]
    torch.manual_seed(1234)
    with torch.device("meta"):
        model = build()
    shard(model, blocks(model), group)
    assert all(u.on_meta for u in units(model))
    ss.materialize(model, tied=tied)
    full = ss.full_state_dict(model)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    out = model(torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(5)))
    logits = out if torch.is_tensor(out) else out.logits
    return full, buffers, logits.detach()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_materialize_equals_plain_construction_bitwise(pool, kind, world):
    """Built on meta, sharded, materialized unit by unit: every parameter and buffer is bitwise what plain
    construction with the same seed gives, and so is the forward."""
    build, _, _ = BUILDERS[kind]
    torch.manual_seed(1234)
    ref = build()
    full, buffers, logits = pool.run(meta_case, world, kind)[0]
    expected = ref.state_dict()
    assert full.keys() == {k for k in expected if k not in dict(ref.named_buffers())}
    for key, value in full.items():
        assert torch.equal(value, expected[key]), key
    for key, value in ref.named_buffers():
        assert torch.equal(buffers[key], value), key
    out = ref(torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(5)))
    assert torch.equal(logits, out if torch.is_tensor(out) else out.logits)


def to_empty_case(rank, world, group, path):
    """FSDP2's flow: meta build, fully_shard, to_empty, the user's init on the local pieces, train a step;
    then a checkpoint of a plainly built model loads straight into a meta-built one (never materialized)."""
    cfg = GPTConfig(vocab_size=96, n_embd=48, n_head=4, n_layer=3)
    with torch.device("meta"):
        model = GPT(cfg)
    shard(model, model.layers, group)
    params_before = [id(p) for p in model.parameters()]
    model.to_empty(device="cpu")
    assert [id(p) for p in model.parameters()] == params_before  # optimizers built earlier stay valid
    torch.manual_seed(7 + rank)  # seeded per rank: one seed everywhere would repeat the numbers in every piece
    for p in model.parameters():
        nn.init.normal_(p, std=0.02)  # an elementwise init: correct on pieces
    sample = model.layers[0].mlp.c_fc.weight.detach().flatten()[:64].clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 96, (4, 16))
    model(local(x, rank, world), local(x, rank, world)).backward()
    opt.step()
    trained = all(torch.isfinite(p).all() for p in model.parameters())

    torch.manual_seed(3)
    source = GPT(cfg)
    shard(source, source.layers, group)
    ss.checkpoint.save(path, source)
    with torch.device("meta"):
        target = GPT(cfg)
    shard(target, target.layers, group)
    ss.checkpoint.load(path, target)
    assert not any(u.on_meta for u in units(target))
    out = [sample, trained, ss.full_state_dict(source), ss.full_state_dict(target)]

    torch.manual_seed(4)  # Hugging Face: its rotary buffers are not in the checkpoint; load recomputes them
    hf_source = tiny_llama()
    shard(hf_source, hf_source.model.layers, group)
    ss.checkpoint.save(path + "-hf", hf_source)
    with torch.device("meta"):
        hf_target = tiny_llama()
    shard(hf_target, hf_target.model.layers, group)
    ss.checkpoint.load(path + "-hf", hf_target)
    x = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    same_logits = torch.equal(hf_source(x).logits, hf_target(x).logits)
    same_buffers = all(torch.equal(a, b) for a, b in zip(hf_source.buffers(), hf_target.buffers()))
    return [*out, same_logits, same_buffers]


@pytest.mark.parametrize("world", [2, 3])
def test_to_empty_flow_and_checkpoint_into_a_meta_model(pool, tmp_path, world):
    outs = pool.run(to_empty_case, world, str(tmp_path / "ckpt"))
    assert not torch.equal(outs[0][0], outs[1][0]), "ranks drew the same numbers for different pieces"
    _, trained, source, target, same_logits, same_buffers = outs[0]
    assert trained and same_logits and same_buffers
    assert source.keys() == target.keys()
    for key, value in source.items():
        assert torch.equal(target[key], value), key


def _hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_case(rank, world, group):
    """A ~1.5 GB fp32 GPT built on meta and materialized: the RSS high-water mark grows by less than 0.6 of
    the full model (the shards are half of it; the rest is one unit at a time)."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset this process's RSS high-water mark
    start = _hwm_mib()
    cfg = GPTConfig(vocab_size=8192, block_size=64, n_layer=30, n_head=16, n_embd=1024)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(cfg)
    shard(model, model.layers, group)
    ss.materialize(model)
    peak = _hwm_mib() - start
    numel = sum(math.prod(ss.shard_info(p).global_shape) for p in model.parameters())
    return numel * 4 / 2**20, peak


@pytest.mark.slow
def test_materialize_peak_memory_is_the_shards_plus_one_unit(pool):
    for model_mib, peak_mib in pool.run(memory_case, 2):
        assert model_mib > 1400, model_mib
        assert peak_mib < 0.6 * model_mib, (peak_mib, model_mib)


class IntegerBuffer(nn.Module):
    """A buffer the constructor computes: on meta it never was, and no init here computes it again."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("positions", torch.arange(8), persistent=False)


class NoReset(nn.Module):
    """A parameter that neither reset_parameters() nor an init writes."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.empty(4, 4))


def bad_input_case(rank, world, group):
    errors = {}
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=96, n_embd=48, n_head=4, n_layer=2))
    shard(model, model.layers, group)
    with pytest.raises(RuntimeError, match=r"'wte.weight'.*still on the meta device.*materialize") as e:
        model(torch.zeros(1, 4, dtype=torch.long))
    errors["forward"] = str(e.value)

    def reaches_out(m):  # from the root, writes a block's weight: another unit's
        if m is model:
            nn.init.zeros_(model.layers[1].mlp.c_fc.weight)

    with pytest.raises(RuntimeError, match=r"touched parameter 'mlp.c_fc.weight' of unit 'layers.1'") as e:
        ss.materialize(model, init=reaches_out)
    errors["init"] = str(e.value)
    assert all(u.on_meta for u in units(model)), "a failed materialize leaves the model on meta"
    ss.materialize(model)  # and a corrected call runs
    assert not any(u.on_meta for u in units(model))

    with torch.device("meta"):
        bare = NoReset()
    shard(bare, [bare.a], group)
    with pytest.raises(RuntimeError, match=r"parameter 'w' was not initialized"):
        ss.materialize(bare)
    with torch.device("meta"):
        counted = IntegerBuffer()
    shard(counted, [], group)
    with pytest.raises(RuntimeError, match=r"'positions' was not initialized"):
        ss.materialize(counted)
    assert counted.positions.is_meta and counted.proj.weight.is_meta  # rolled back
    ready = shard(GPT(GPTConfig(vocab_size=96, n_embd=48, n_head=4, n_layer=2)), [], group)
    with pytest.raises(ValueError, match="nothing of this model is on the meta device"):
        ss.materialize(ready)
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=96, n_embd=48, n_head=4, n_layer=2))
    shard(model, model.layers, group)
    with pytest.raises(TypeError, match="init must be a callable"):
        ss.materialize(model, init=3)
    with pytest.raises(ValueError, match="tied must be 'first' or 'last'"):
        ss.materialize(model, tied="both")
    with torch.device("meta"):
        fresh = GPT(GPTConfig(vocab_size=96, n_embd=48, n_head=4, n_layer=2))
    shard(fresh, fresh.layers, group)
    with pytest.raises(NotImplementedError, match="to_empty"):
        fresh.to("cpu")
    return errors


def test_bad_input(pool):
    pool.run(bad_input_case, 2)
