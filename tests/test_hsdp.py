"""Hybrid sharding (HSDP, a 2-D mesh ("replicate", "shard")) and ``reshard_after_forward=n``, on gloo ranks
against the unsharded single-process reference; checkpoints between HSDP and plain FSDP layouts."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_engine import global_mean, local
from test_parity import batches, check_matches, make, param_errors, shard
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

import scalestack as ss
from scalestack.fsdp.api import units
from scalestack.optim import AdamW8bit, Muon, muon_param_groups

pytestmark = pytest.mark.timeout(240)


_local_groups: dict[tuple[int, ...], dist.ProcessGroup] = {}  # per worker: torch names these by their ranks


def local_group(ranks: list[int]) -> dist.ProcessGroup:
    """A group created by its members only (once: a second creation of the same ranks would reuse its name)."""
    if tuple(ranks) not in _local_groups:
        _local_groups[tuple(ranks)] = dist.new_group(ranks, use_local_synchronization=True)
    return _local_groups[tuple(ranks)]


def hsdp_mesh(rank: int, world: int, group, replicas: int) -> DeviceMesh:
    """A ("replicate", "shard") mesh over ranks 0..world-1: rows are shard groups."""
    names = ("replicate", "shard")
    if world == dist.get_world_size():
        return init_device_mesh("cpu", (replicas, world // replicas), mesh_dim_names=names)
    assert replicas == 1, "the pool builds sub-world meshes with one replica only"
    alone = local_group([dist.get_rank()])
    return DeviceMesh.from_group([alone, group], "cpu", mesh=[list(range(world))], mesh_dim_names=names)


def hsdp_case(rank, world, group, replicas, micro):
    ref, model = make("plain")
    mesh = hsdp_mesh(rank, world, group, replicas)
    shard(model, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    with ss.record_collectives() as log:
        for x, y, route in batches(5):
            xs, ys, rs = (local(t, rank, world) for t in (x, y, route))
            n = xs.shape[0] // micro
            total = 0.0
            for i in range(micro):
                model.set_requires_gradient_sync(i == micro - 1)
                part = slice(i * n, (i + 1) * n)
                loss = model(xs[part], ys[part], rs[part]) / micro
                loss.backward()
                total += global_mean(loss, group, world)
            ref_loss = ref(x, y, route)
            ref_loss.backward()
            for o in (opt, ref_opt):
                o.step(), o.zero_grad()
            losses.append((total, ref_loss.item()))
    shard_size = world // replicas
    return {
        "losses": losses,
        "errors": param_errors(model, ref),
        "log": list(log),
        "shard_sizes": {u.plan.buffers[0].world_size for u in units(model)},
        "expected_shard_size": shard_size,
    }


@pytest.mark.parametrize(("world", "replicas", "micro"), [(4, 2, 1), (4, 2, 3), (3, 1, 1)])
def test_hsdp_matches_unsharded(pool, world, replicas, micro):
    """HSDP 2x2 and 1x3 train like the unsharded model (AdamW); the layout is planned for the shard group;
    gradients are reduce-scattered within it and all-reduced across replicas, once per step even with
    micro-batches (accumulation skips both)."""
    outs = pool.run(hsdp_case, world, replicas, micro)
    check_matches(outs[0])
    assert outs[0]["shard_sizes"] == {outs[0]["expected_shard_size"]}
    assert all(o["log"] == outs[0]["log"] for o in outs), "ranks issued different collective sequences"
    log = outs[0]["log"]
    n_units, steps = 4, 5  # three blocks and the root
    reduce_scatters = [c for c in log if c.kind == "reduce_scatter"]
    all_reduces = [c for c in log if c.kind == "all_reduce"]
    assert len(reduce_scatters) == n_units * steps
    assert {c.ranks for c in reduce_scatters} == {world // replicas}
    assert {c.ranks for c in log if c.kind == "all_gather"} == {world // replicas}
    if replicas > 1:
        assert len(all_reduces) == n_units * steps and {c.ranks for c in all_reduces} == {replicas}
        # overlapped: the first all-reduce is issued while later units' reduce-scatters are still to come
        ends = [i for i, c in enumerate(log) if c.kind == "reduce_scatter"]
        first_step = log[: ends[n_units - 1] + 1]
        assert any(c.kind == "all_reduce" for c in first_step)
        # each all-reduce carries the reduce-scatter's output: 1/shard_size of the unit's gradient
        shard_size = world // replicas
        assert sorted(c.elements for c in all_reduces) == sorted(c.elements // shard_size for c in reduce_scatters)
    else:
        assert not all_reduces


def reshard_case(rank, world, group, n):
    ref, model = make("plain")
    shard(model, group, reshard_after_forward=n)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    losses, forward_log, backward_log = [], [], []
    for x, y, route in batches(4):
        with ss.record_collectives() as fwd:
            loss = model(local(x, rank, world), local(y, rank, world), local(route, rank, world))
        with ss.record_collectives() as bwd:
            loss.backward()
        forward_log.append(list(fwd))
        backward_log.append(list(bwd))
        ref_loss = ref(x, y, route)
        ref_loss.backward()
        for o in (opt, ref_opt):
            o.step(), o.zero_grad()
        losses.append((global_mean(loss, group, world), ref_loss.item()))
    return {"losses": losses, "errors": param_errors(model, ref), "fwd": forward_log, "bwd": backward_log}


def test_reshard_after_forward_to_blocks_of_two(pool):
    """reshard_after_forward=2 at W=4: same results; forward gathers over all 4 ranks, backward re-gathers
    each unit (root included: it was given n explicitly) within its pair of ranks."""
    outs = pool.run(reshard_case, 4, 2)
    check_matches(outs[0])
    for fwd, bwd in zip(outs[0]["fwd"], outs[0]["bwd"]):
        assert [c.ranks for c in fwd if c.kind == "all_gather"] == [4] * 4
        gathers = [c for c in bwd if c.kind == "all_gather"]
        assert len(gathers) == 4 and {c.ranks for c in gathers} == {2}
        assert {c.ranks for c in bwd if c.kind == "reduce_scatter"} == {4}


def test_bad_meshes_and_reshard_sizes(pool):
    pool.run(_bad_meshes, 4)


def _bad_meshes(rank, world, group):
    _, model = make("plain")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    with pytest.raises(ValueError, match=r"mesh_dim_names=\('replicate', 'shard'\)"):
        ss.fully_shard(model.blocks[0], mesh=mesh)
    with pytest.raises(ValueError, match="dividing the shard group size 4"):
        ss.fully_shard(model.blocks[0], mesh=group, reshard_after_forward=3)
    with pytest.raises(ValueError, match="dividing the shard group size 2"):
        ss.fully_shard(model.blocks[0], mesh=hsdp_mesh(rank, world, group, 2), reshard_after_forward=4)


def optimizer_case(rank, world, group, hsdp, kind):
    """AdamW8bit or Muon (+ AdamW) under HSDP 2x2 and plain FSDP over a pair: the same shard layout, the
    same global batch."""
    _, model = make("plain")
    blocks = AdamW8bit.granularity(256) if kind == "adamw8bit" else None
    if hsdp:
        shard(model, hsdp_mesh(rank, world, group, 2), granularity=blocks)
        data_rank, data_world = rank, world
    else:
        pair = hsdp_mesh(rank, world, group, 2)["shard"]  # plain FSDP over the same pairs, 1-D
        shard(model, pair, granularity=blocks)
        data_rank, data_world = rank % 2, 2
    if kind == "adamw8bit":
        opts = [AdamW8bit(model.parameters(), lr=1e-2)]
    else:
        matrices, rest = muon_param_groups(model)
        opts = [Muon([p for _, p in matrices], lr=0.02), torch.optim.AdamW([p for _, p in rest], lr=1e-2)]
    losses = []
    for x, y, route in batches(4):
        loss = model(*(local(t, data_rank, data_world) for t in (x, y, route)))
        loss.backward()
        for opt in opts:
            opt.step(), opt.zero_grad()
        losses.append(global_mean(loss, group, world) if hsdp else loss.item())
    return losses, ss.full_state_dict(model)


@pytest.mark.parametrize("kind", ["adamw8bit", "muon"])
def test_optimizers_under_hsdp_equal_fsdp_over_the_shard_group(pool, kind):
    hsdp = pool.run(optimizer_case, 4, True, kind)[0]
    plain = pool.run(optimizer_case, 4, False, kind)[0]  # each pair trains on the whole batch alone
    for key, value in plain[1].items():
        torch.testing.assert_close(hsdp[1][key], value, rtol=1e-5, atol=1e-6)


def checkpoint_case(rank, world, group, path, mode):
    """mode "save-hsdp": train HSDP 2x2 and save; "load-plain": load at W=3 plain FSDP, save again;
    "load-hsdp": load that into HSDP 2x2. Returns the full parameters."""
    _, model = make("plain", seed=100)  # other initial values than the saved ones: the load overwrites them
    mesh = group if mode == "load-plain" else hsdp_mesh(rank, world, group, 2)
    shard(model, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if mode == "save-hsdp":
        for x, y, route in batches(2):
            model(*(local(t, rank, world) for t in (x, y, route))).backward()
            opt.step(), opt.zero_grad()
        ss.checkpoint.save(f"{path}/a", model, opt)
    elif mode == "load-plain":
        ss.checkpoint.load(f"{path}/a", model, opt)
        ss.checkpoint.save(f"{path}/b", model, opt)
    else:
        ss.checkpoint.load(f"{path}/b", model, opt)
    state = {n: ss.shard_info(p) for n, p in model.named_parameters()}
    steps = {int(opt.state[p]["step"]) for p in model.parameters()}
    return ss.full_state_dict(model), steps, {n: i.world_size for n, i in state.items()}


def test_checkpoint_saved_under_hsdp_loads_at_w3_and_back(pool, tmp_path):
    saved = pool.run(checkpoint_case, 4, str(tmp_path), "save-hsdp")[0]
    at_three = pool.run(checkpoint_case, 3, str(tmp_path), "load-plain")[0]
    back = pool.run(checkpoint_case, 4, str(tmp_path), "load-hsdp")[0]
    assert set(at_three[2].values()) == {3} and set(back[2].values()) == {2}
    for key, value in saved[0].items():
        assert torch.equal(at_three[0][key], value) and torch.equal(back[0][key], value), key
    assert at_three[1] == back[1] == {2}


def stale_copy_case(rank, world, group):
    """A grad-enabled forward that no backward follows leaves partial copies; the parameters then change
    (an optimizer step, a load): the next forward must gather the new values, not the copies. And
    set_reshard_after_forward(True) replaces the int: backward gathers over the whole group again."""
    ref, model = make("plain")
    shard(model, group, reshard_after_forward=2)
    x, y, route = next(iter(batches(1)))
    model(local(x, rank, world), local(y, rank, world), local(route, rank, world))  # no backward
    with torch.no_grad():
        for m in (model, ref):
            for p in m.parameters():
                p.mul_(0.5)
    loss = model(local(x, rank, world), local(y, rank, world), local(route, rank, world))
    with ss.record_collectives() as bwd:
        loss.backward()
    model.set_reshard_after_forward(True)
    loss = model(local(x, rank, world), local(y, rank, world), local(route, rank, world))
    with ss.record_collectives() as full_bwd:
        loss.backward()
    return (
        global_mean(loss, group, world),
        ref(x, y, route).item(),
        sorted({c.ranks for c in bwd if c.kind == "all_gather"}),
        sorted({c.ranks for c in full_bwd if c.kind == "all_gather"}),
    )


def test_partial_copies_never_outlive_a_change_of_parameters(pool):
    loss, ref_loss, pairs, whole = pool.run(stale_copy_case, 4)[0]
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
    assert pairs == [2] and whole == [4]
