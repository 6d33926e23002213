"""Checkpoints that reshard: save at W=3, load at W=2, W=4 and into the unsharded model (one process, no
fully_shard), by ``scalestack.checkpoint`` and by stock ``torch.distributed.checkpoint``.

The reference for "the same state" is gathered here, independently of the checkpoint code: every rank's
piece of each parameter and optimizer state, placed by its ``shard_info`` range. The reference for "training
continues" is the saving run itself, which trains on after the save as if it never stopped.
"""

from __future__ import annotations

import math
import os
import signal
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from dist_pool import DistPool
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import scalestack as ss
from scalestack import checkpoint
from scalestack.optim import AdamW8bit, Muon, muon_param_groups

pytestmark = pytest.mark.timeout(300)

D, HIDDEN, EXPERTS, VOCAB, T, BATCH = 24, 40, 3, 50, 6, 12  # BATCH splits evenly at W = 1, 2, 3, 4
BLOCK = 32  # AdamW8bit's block size in these tests


@pytest.fixture(scope="module")
def pool():
    p = DistPool(4)
    yield p
    p.close()


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D, bias=False)
        self.experts = nn.Parameter(torch.randn(EXPERTS, HIDDEN, D) / math.sqrt(D))
        self.out = nn.Linear(HIDDEN, D)

    def forward(self, h):
        a = self.proj(torch.tanh(self.qkv(self.norm(h))[..., :D]))
        e = torch.einsum("btd,ehd->bteh", h, self.experts)
        return h + a + self.out(F.gelu(e).mean(dim=2))


class Net(nn.Module):
    """Tied embedding and head, a persistent buffer, square, tall, wide and 3-D tensors."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.register_buffer("pos", torch.randn(T, D) * 0.1)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x, y):
        h = self.emb(x) + self.pos
        for b in self.blocks:
            h = b(h)
        return F.cross_entropy(self.head(self.norm(h)).view(-1, VOCAB), y.view(-1))


def build(group, granularity, seed: int) -> Net:
    torch.manual_seed(seed)
    model = Net()
    if group is not None:
        for b in model.blocks:
            ss.fully_shard(b, mesh=group, granularity=granularity)
        ss.fully_shard(model, mesh=group, granularity=granularity)
    return model


def make_optimizers(model: nn.Module, kind: str):
    """(optimizer or list, scheduler or None)."""
    if kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), None
    if kind == "sgd_plain":  # no state: the weights alone continue a run
        return torch.optim.SGD(model.parameters(), lr=0.1), None
    if kind == "adamw8bit":
        return AdamW8bit(model.parameters(), lr=1e-2, block_size=BLOCK), None
    if kind == "muon":
        muon, rest = muon_param_groups(model)
        return [Muon([p for _, p in muon], lr=2e-2), torch.optim.AdamW([p for _, p in rest], lr=1e-2)], None
    raise ValueError(kind)


GRANULARITY = {"adamw": ("element", "row"), "sgd": ("element", "row"), "sgd_plain": ("element", "row"),
               "muon": ("element", "row"),
               "adamw8bit": (AdamW8bit.granularity(BLOCK), AdamW8bit.granularity(BLOCK))}  # fmt: skip


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (BATCH, T), generator=g), torch.randint(0, VOCAB, (BATCH, T), generator=g)


def train_step(model, opts, scheduler, step: int, rank: int, world: int, group) -> float:
    x, y = batch(step)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    loss = model(x[rows], y[rows])
    loss.backward()
    for o in opts if isinstance(opts, list) else [opts]:
        o.step()
        o.zero_grad()
    if scheduler is not None:
        scheduler.step()
    total = loss.detach().clone()
    if group is not None:
        dist.all_reduce(total, group=group)
    return total.item() / world


# --- the independent reference: every rank's pieces gathered and placed by shard_info ----------------------


def gather_full(t: torch.Tensor, p: torch.Tensor, block: int, group) -> torch.Tensor:
    """The global tensor of which ``t`` is this rank's piece (``p``'s piece, or its blocks)."""
    if not ss.fsdp.param.is_sharded(p) or t.dim() == 0:
        return t.detach().clone()
    info = ss.shard_info(p)
    pieces: list = [None] * info.world_size
    dist.all_gather_object(pieces, ((info.start, info.end), t.detach().reshape(-1).clone()), group=group)
    numel = math.prod(info.global_shape)
    full = torch.zeros(-(-numel // block), dtype=t.dtype)
    for (lo, hi), data in pieces:
        if hi > lo:
            full[lo // block : lo // block + data.numel()] = data
    return full.view(info.global_shape) if block == 1 else full


def snapshot(model: nn.Module, opts, group) -> dict[str, torch.Tensor]:
    """Model parameters and buffers, and every optimizer state tensor by (optimizer, parameter name, key)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for name, p in model.named_parameters():
        out[f"param {name}"] = gather_full(p, p, 1, group)
    for name, b in model.named_buffers():
        out[f"buffer {name}"] = b.detach().clone()
    for i, opt in enumerate(opts if isinstance(opts, list) else [opts]):
        blocks = set(getattr(opt, "block_state_keys", ()))
        for g in opt.param_groups:
            for p in g["params"]:
                for key, value in opt.state.get(p, {}).items():
                    if torch.is_tensor(value):
                        block = g["block_size"] if key in blocks else 1
                        out[f"opt{i} {names[id(p)]} {key}"] = gather_full(value, p, block, group)
        out[f"opt{i} lr"] = torch.tensor([g["lr"] for g in opt.param_groups])
    return out


def assert_bitwise(loaded: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    assert loaded.keys() == saved.keys(), sorted(loaded.keys() ^ saved.keys())
    differ = [k for k in saved if loaded[k].shape != saved[k].shape or not torch.equal(loaded[k], saved[k])]
    assert not differ, differ


def assert_losses_close(losses: list[float], reference: list[float]) -> None:
    assert len(losses) == len(reference) == 5
    for a, b in zip(losses, reference):
        assert abs(a - b) <= 1e-5 * abs(b), (losses, reference)


# --- save at W=3, load anywhere ------------------------------------------------------------------------------


def save_case(rank, world, group, path, kind, stock):
    model = build(group, GRANULARITY[kind][0], seed=0)
    opts, scheduler = make_optimizers(model, kind)
    for step in range(2):
        train_step(model, opts, scheduler, step, rank, world, group)
    if stock:
        dcp.save(model.state_dict(), checkpoint_id=path, process_group=group)
    else:
        checkpoint.save(path, model, opts, extra={"step": 2, "rank": rank}, scheduler=scheduler)
    saved = snapshot(model, opts, group)
    losses = [train_step(model, opts, scheduler, step, rank, world, group) for step in range(2, 7)]
    return saved, losses


def load_case(rank, world, group, path, kind, stock):
    model = build(group, GRANULARITY[kind][1], seed=1)  # other initial values: the load must replace them all
    opts, scheduler = make_optimizers(model, kind)
    if stock:
        sd = model.state_dict()
        dcp.load(sd, checkpoint_id=path, process_group=group)
        model.load_state_dict(sd)
        extra = None
    else:
        extra = checkpoint.load(path, model, opts, scheduler=scheduler)
    loaded = snapshot(model, opts, group)
    losses = [train_step(model, opts, scheduler, step, rank, world, group) for step in range(2, 7)]
    return loaded, losses, extra


def load_unsharded(path, kind, stock):
    """W = 1 without fully_shard or a process group, in the test process itself."""
    model = build(None, None, seed=1)
    opts, scheduler = make_optimizers(model, kind)
    if stock:
        sd = model.state_dict()
        dcp.load(sd, checkpoint_id=path, no_dist=True)
        model.load_state_dict(sd, strict=True)
        extra = None
    else:
        extra = checkpoint.load(path, model, opts, scheduler=scheduler)
    loaded = snapshot(model, opts, None)
    losses = [train_step(model, opts, scheduler, step, 0, 1, None) for step in range(2, 7)]
    return loaded, losses, extra


@pytest.mark.parametrize("kind", ["adamw", "sgd", "adamw8bit", "muon"])
def test_save_at_3_loads_at_2_4_and_unsharded(pool, tmp_path, kind):
    path = str(tmp_path / "ckpt")
    saved, reference = pool.run(save_case, 3, path, kind, False)[0]
    assert any(k.endswith(("exp_avg", "exp_avg_codes", "momentum_buffer")) for k in saved)
    for world in (2, 4):
        results = pool.run(load_case, world, path, kind, False)
        loaded, losses, _ = results[0]
        assert_bitwise(loaded, saved)
        assert_losses_close(losses, reference)
        # extra round-trips per rank; a rank that did not exist at save time gets rank 0's
        assert [r[2] for r in results] == [{"step": 2, "rank": min(r, 0) if r >= 3 else r} for r in range(world)]
    loaded, losses, extra = load_unsharded(path, kind, False)
    assert_bitwise(loaded, saved)
    assert_losses_close(losses, reference)
    assert extra == {"step": 2, "rank": 0}


def test_stock_dcp_save_and_load_reshard(pool, tmp_path):
    """``dcp.save(model.state_dict())`` / ``dcp.load`` + ``load_state_dict``, with SGD without state, so the
    weights alone continue the run."""
    path = str(tmp_path / "stock")
    saved, reference = pool.run(save_case, 3, path, "sgd_plain", True)[0]
    for world in (2, 4):
        loaded, losses, _ = pool.run(load_case, world, path, "sgd_plain", True)[0]
        assert_bitwise(loaded, saved)
        assert_losses_close(losses, reference)
    loaded, losses, _ = load_unsharded(path, "sgd_plain", True)
    assert_bitwise(loaded, saved)
    assert_losses_close(losses, reference)
