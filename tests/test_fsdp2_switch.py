"""The one-import switch: one training script, run with PyTorch FSDP2's imports and with scalestack's.

The script uses what FSDP2 scripts use: a bf16 ``MixedPrecisionPolicy``, explicit prefetch lists, gradient
accumulation with ``set_requires_gradient_sync``, gradient clipping and ``p.dim()`` weight-decay groups. The
only lines that differ are the imports. Also fp16 loss scaling: every rank agrees on skipping a step.
"""

from __future__ import annotations

import pytest
import torch
from test_engine import CFG, batches, local, param_errors

from scalestack.models.gpt import GPT

pytestmark = pytest.mark.timeout(240)


def training_script(rank, world, group, which, steps=4, micro=2):
    if which == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.nn.utils import clip_grad_norm_
    else:
        from scalestack import MixedPrecisionPolicy, clip_grad_norm_, fully_shard
    from torch.distributed.device_mesh import DeviceMesh

    mesh = DeviceMesh.from_group(group, "cpu")
    torch.manual_seed(0)
    model = GPT(CFG)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    blocks = list(model.layers)
    for i, block in enumerate(blocks):
        block.set_modules_to_forward_prefetch(blocks[i + 1 : i + 2])
        block.set_modules_to_backward_prefetch(blocks[i - 1 : i])
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=3e-3
    )
    losses, norms = [], []
    for x, y in batches(steps):
        x, y = local(x, rank, world), local(y, rank, world)
        n = x.shape[0] // micro
        total = 0.0
        for i in range(micro):
            model.set_requires_gradient_sync(i == micro - 1)
            loss = model(x[i * n : (i + 1) * n], y[i * n : (i + 1) * n]) / micro
            loss.backward()
            total += loss.detach()
        norm = clip_grad_norm_(model.parameters(), 0.5)
        norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        opt.step()
        opt.zero_grad()
        torch.distributed.all_reduce(total, group=group)
        losses.append(total.item() / world)
    return losses, norms, len(decay), len(no_decay)


def test_the_same_script_trains_alike_with_either_import(pool):
    theirs = pool.run(training_script, 2, "fsdp2")[0]
    ours = pool.run(training_script, 2, "scalestack")[0]
    assert ours[2:] == theirs[2:] and ours[2] > 0  # the same weight-decay groups by p.dim()
    # bf16 compute on both sides, rounded differently (FSDP2 pads dim 0, we pack rows): within 1e-2 relative
    for a, b in zip(ours[0], theirs[0]):
        assert abs(a - b) <= 1e-2 * abs(b), (ours[0], theirs[0])
    for a, b in zip(ours[1], theirs[1]):
        assert abs(a - b) <= 2e-2 * abs(b), (ours[1], theirs[1])


def grad_scaler_case(rank, world, group):
    """fp16 compute with a loss scaler; at step 1 rank 0's piece of one gradient overflows, on rank 0 only."""
    import copy

    import scalestack as ss

    torch.manual_seed(0)
    ref = GPT(CFG)
    model = copy.deepcopy(ref)
    mp = ss.MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    for block in model.layers:
        ss.fully_shard(block, mesh=group, mp_policy=mp)
    ss.fully_shard(model, mesh=group, mp_policy=mp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = ss.ShardedGradScaler("cpu", init_scale=2.0**10)
    scales = []
    for step, (x, y) in enumerate(batches(3)):
        scaler.scale(model(local(x, rank, world), local(y, rank, world))).backward()
        if step == 1 and rank == 0:
            next(p for p in model.parameters() if p.grad is not None and p.grad.numel()).grad.view(-1)[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())
    return scales, param_errors(model, ref)["*"] > 0


def test_sharded_grad_scaler_agrees_on_found_inf(pool):
    results = pool.run(grad_scaler_case, 2)
    scales = [r[0] for r in results]
    assert scales[0] == scales[1]  # every rank skipped step 1 and halved its scale
    assert scales[0][1] == scales[0][0] / 2
    assert all(r[1] for r in results)  # training did change the weights (steps 0 and 2)
