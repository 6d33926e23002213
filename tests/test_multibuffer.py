"""Units split into several flat buffers (``fully_shard(..., max_buffers=k)``) against an unsharded reference.

Each block holds ``up.weight`` [72, 8] (rows of 8) and ``down.weight`` [8, 72] (rows of 72). With row
granularity at W=3 one buffer must pad (64 elements at fp32's 4-element alignment); the planner splits the
block into two or three buffers with at most 16 (also at the 8-element alignment that bf16 compute views
need). At W=4 the planner keeps one buffer (a Plan with one Layout), which must work the same.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_engine import accumulation_case, local, state_dict_case, traffic_case, train_case

import scalestack as ss
from scalestack.fsdp import collectives as comm
from scalestack.fsdp.api import units

pytestmark = pytest.mark.timeout(240)

BLOCK_SHAPES = [(72, 8), (72,), (8, 72), (8,)]
N_BLOCKS, BATCH, STEPS = 3, 12, 10  # the global batch divides by every W in 1..4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 72)
        self.down = nn.Linear(72, 8)

    def forward(self, h):
        return h + self.down(torch.tanh(self.up(h)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.blocks = nn.ModuleList(Block() for _ in range(N_BLOCKS))
        self.head = nn.Linear(8, 4)

    def forward(self, x, y):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return F.mse_loss(self.head(h), y)


def make_models(seed: int = 0) -> tuple[Net, Net]:
    torch.manual_seed(seed)
    ref = Net()
    ref.blocks[1].down.bias.requires_grad_(False)  # frozen, sharing a buffer with a trained weight
    return ref, copy.deepcopy(ref)


def shard(model: Net, group, max_buffers: int = 3, **kwargs) -> Net:
    for block in model.blocks:
        ss.fully_shard(block, mesh=group, granularity="row", max_buffers=max_buffers, **kwargs)
    return ss.fully_shard(model, mesh=group, granularity="row", max_buffers=max_buffers, **kwargs)


def batches(steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 4, generator=g)


def buffer_counts(model: Net) -> tuple[list[int], int]:
    """Flat buffers of each block's unit, and of the root's."""
    return [len(units(b)[0].buffers) for b in model.blocks], len(units(model)[0].buffers)


def test_planner_splits_the_block():
    one = ss.plan(BLOCK_SHAPES, 3, "row")
    split = ss.plan(BLOCK_SHAPES, 3, "row", max_buffers=3)
    assert len(split.buffers) >= 2
    assert split.padding < one.padding
    assert sorted(i for b in split.buffers for i in b.tensor_indices) == list(range(len(BLOCK_SHAPES)))


def report(model: Net) -> dict:
    """What test_engine's cases add to their results for this model (see test_engine.kit)."""
    trained = sum(
        any(p.buffer_index == i and p.sharded.requires_grad for p in u.params)
        for u in units(model)
        for i in range(len(u.buffers))
    )
    return {"buffers": buffer_counts(model), "trained_buffers": trained}


KIT = __name__  # test_engine's cases build, shard and feed this module's model


@pytest.mark.parametrize("world", [1, 3, 4])
def test_sgd_matches_unsharded(pool, world):
    out = pool.run(train_case, world, "sgd", STEPS, None, None, KIT)[0]
    if world == 3:
        assert all(n >= 2 for n in out["buffers"][0]), out["buffers"]
    worst = max(out["errors"].items(), key=lambda kv: kv[1])
    assert worst[1] < 1e-6, worst
    assert out["traffic"]["copy_bytes"] == 0  # fp32: nothing copied outside collectives


@pytest.mark.parametrize("world", [3, 4])
def test_adamw_matches_unsharded(pool, world):
    out = pool.run(train_case, world, "adamw", STEPS, None, None, KIT)[0]
    for step, (loss, ref_loss) in enumerate(out["losses"]):
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (step, loss, ref_loss)
    worst = max(out["errors"].items(), key=lambda kv: kv[1])
    assert worst[1] < 1e-3, worst


def bf16_case(rank, world, group):
    mp = ss.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    split = train_case(rank, world, group, "sgd", STEPS, {"mp_policy": mp}, kit_name=KIT)
    one = train_case(rank, world, group, "sgd", STEPS, {"mp_policy": mp, "max_buffers": 1}, kit_name=KIT)
    return split, one


def test_bf16_mixed_precision_close_to_fp32(pool):
    split, one = pool.run(bf16_case, 3)[0]
    assert all(n >= 2 for n in split["buffers"][0])
    # Splitting the unit changes where tensors live, not the arithmetic: bitwise the one-buffer run.
    assert split["losses"] == one["losses"] and split["errors"] == one["errors"]
    # Documented tolerance: bf16 compute with fp32 master weights and fp32 reduction vs an all-fp32
    # reference, 10 SGD steps of this small MLP on an MSE loss (more sensitive to bf16 rounding than
    # test_engine's GPT): losses within 1e-2 relative every step (seen: 3.3e-3), all parameters together
    # within 2e-3 (seen: 4.3e-4).
    for loss, ref_loss in split["losses"]:
        assert abs(loss - ref_loss) <= 1e-2 * abs(ref_loss)
    assert split["errors"]["*"] < 2e-3
    # One cast per buffer: the local shard (S) per all-gather (W*S gathered), the grads for the fp32 reduce.
    t = split["traffic"]
    assert t["copy_bytes"] == t["all_gather_bytes"] // 3 + t["reduce_scatter_bytes"]


def test_traffic_is_one_collective_per_buffer_and_zero_copy(pool):
    t, blocks, root, reduced = pool.run(traffic_case, 3, KIT)[0]
    assert all(len(b) >= 2 for b in blocks)
    block_buffers, block_bytes = sum(len(b) for b in blocks), sum(sum(b) for b in blocks)
    # blocks: gathered in forward and again in backward; root: once (kept for backward)
    assert t["all_gathers"] == 2 * block_buffers + len(root)
    assert t["all_gather_bytes"] == 2 * block_bytes + sum(root)
    # one reduce-scatter per buffer that holds a trainable parameter (blocks.1's frozen bias may sit alone)
    assert t["reduce_scatter_bytes"] == reduced <= block_bytes + sum(root)
    assert t["reduce_scatters"] <= block_buffers + len(root)
    assert t["copy_bytes"] == 0


def issue_order_case(rank, world, group):
    """Record collectives and waits in one unshard: every all-gather is issued before the first wait."""
    _, model = make_models()
    shard(model, group)
    events = []
    issue, wait = comm.all_gather, comm.PendingGather.wait

    def recording_issue(output, shard_, group_):
        events.append("issue")
        return issue(output, shard_, group_)

    def recording_wait(self):
        events.append("wait")
        return wait(self)

    comm.all_gather, comm.PendingGather.wait = recording_issue, recording_wait
    try:
        model.blocks[0].unshard()
    finally:
        comm.all_gather, comm.PendingGather.wait = issue, wait
    model.blocks[0].reshard()
    return events, len(ss.layout(model.blocks[0]).buffers)


def test_all_gathers_issued_before_any_wait(pool):
    events, n = pool.run(issue_order_case, 3)[0]
    assert n >= 2
    assert events == ["issue"] * n + ["wait"] * n


def test_gradient_accumulation_reduces_once_per_buffer(pool):
    reduces, errors, extra = pool.run(accumulation_case, 3, 2, KIT)[0]
    blocks, root = extra["buffers"]
    n_buffers = sum(blocks) + root
    assert n_buffers > N_BLOCKS + 1  # the blocks are split
    # one reduce-scatter per buffer holding a trainable parameter, on the last micro-batch only
    assert reduces == extra["trained_buffers"] >= n_buffers - 1
    assert max(errors.values()) < 1e-6


def test_full_state_dict_round_trip(pool):
    errors_saved, exact, shared, errors_after = pool.run(state_dict_case, 3, KIT)[0]
    assert max(errors_saved.values()) < 1e-6
    assert exact and not shared
    assert max(errors_after.values()) < 1e-6


def clip_case(rank, world, group):
    ref, model = make_models()
    shard(model, group)
    norms = []
    for x, y in batches(2):
        model(local(x, rank, world), local(y, rank, world)).backward()
        ref(x, y).backward()
        norms.append((ss.clip_grad_norm_(model, 0.05).item(), nn.utils.clip_grad_norm_(ref.parameters(), 0.05).item()))
        model.zero_grad(), ref.zero_grad()
    return norms, [u.state.name for u in units(model)]


def test_clip_grad_norm_matches_torch(pool):
    norms, states = pool.run(clip_case, 3)[0]
    for ours, theirs in norms:
        assert abs(ours - theirs) <= 1e-5 * theirs
    assert set(states) == {"SHARDED"}
