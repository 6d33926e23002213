"""Bad input gets a clear error that names the problem and the fix: never a hang or a wrong result."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import scalestack as ss
from scalestack.models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.timeout(180)

CFG = GPTConfig(vocab_size=31, block_size=8, n_layer=2, n_head=2, n_embd=8)


def test_no_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ss.fully_shard(nn.Linear(2, 2))


def test_not_a_module_or_bad_options():
    with pytest.raises(TypeError, match="nn.Module"):
        ss.fully_shard(torch.ones(3))
    with pytest.raises(ValueError, match="floating-point"):
        ss.MixedPrecisionPolicy(param_dtype=torch.int8)
    with pytest.raises(ValueError, match="max_buffers must be a positive int"):
        ss.fully_shard(nn.Linear(2, 2), max_buffers=0)
    for bad in ("2", 2.0, True):
        with pytest.raises(TypeError, match="max_buffers must be a positive int"):
            ss.fully_shard(nn.Linear(2, 2), max_buffers=bad)


def expect(exc_type, fn, *args, **kwargs) -> str:
    """Run fn and return the message of the expected exception (so the parent can check it)."""
    try:
        fn(*args, **kwargs)
    except exc_type as e:
        return str(e)
    raise AssertionError(f"{fn.__name__} did not raise {exc_type.__name__}")


def misuse_case(rank, world, group):
    messages = {}
    m = nn.Linear(3, 3)
    ss.fully_shard(m, mesh=group)
    messages["twice"] = expect(ValueError, ss.fully_shard, m, mesh=group)

    tied = GPT(CFG)  # lm_head.weight is wte.weight
    ss.fully_shard(tied.lm_head, mesh=group)
    messages["shared"] = expect(ValueError, ss.fully_shard, tied, mesh=group)

    top_down = GPT(CFG)
    ss.fully_shard(top_down, mesh=group)
    messages["top_down"] = expect(ValueError, ss.fully_shard, top_down.layers[0], mesh=group)

    ints = nn.Module()
    ints.count = nn.Parameter(torch.ones(3, dtype=torch.long), requires_grad=False)
    messages["int"] = expect(TypeError, ss.fully_shard, ints, mesh=group)

    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    messages["dtypes"] = expect(TypeError, ss.fully_shard, mixed, mesh=group)

    messages["granularity"] = expect(ValueError, ss.fully_shard, nn.Linear(2, 2), mesh=group, granularity="rows")
    messages["rule"] = expect(
        ValueError, ss.fully_shard, nn.Linear(2, 2), mesh=group, granularity=lambda n, p: "blocks"
    )
    messages["mesh_type"] = expect(TypeError, ss.fully_shard, nn.Linear(2, 2), mesh="dp")
    messages["layout"] = expect(ValueError, ss.layout, nn.Linear(2, 2))
    messages["prefetch"] = expect(ValueError, m.set_modules_to_forward_prefetch, [nn.Linear(1, 1)])

    model = GPT(CFG)
    for b in model.layers:
        ss.fully_shard(b, mesh=group)
    ss.fully_shard(model, mesh=group)
    sd = {k: v.clone() for k, v in ss.full_state_dict(model).items()}
    sd["ln_f.weight"] = torch.ones(5)
    messages["sd_shape"] = expect(ValueError, ss.load_full_state_dict, model, sd)
    del sd["ln_f.weight"]
    messages["sd_missing"] = expect(KeyError, ss.load_full_state_dict, model, sd)
    return messages


def test_misuse_gets_clear_errors(pool):
    m = pool.run(misuse_case, 2)[0]
    assert "already applied" in m["twice"]
    assert "shared across units" in m["shared"] and "same unit" in m["shared"]
    assert "bottom-up" in m["top_down"]
    assert "'count'" in m["int"] and "floating-point" in m["int"]
    assert "cast the module" in m["dtypes"]
    assert "'rows'" in m["granularity"] and "'row'" in m["granularity"]
    assert "'blocks'" in m["rule"]
    assert "DeviceMesh" in m["mesh_type"]
    assert "not passed to fully_shard" in m["layout"]
    assert "cannot be prefetched" in m["prefetch"]
    assert "ln_f.weight" in m["sd_shape"]
    assert "ln_f.weight" in m["sd_missing"]


def mesh_case(rank, world, group):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))  # not HSDP's names
    message = expect(ValueError, ss.fully_shard, nn.Linear(2, 2), mesh=mesh)
    model = ss.fully_shard(nn.Linear(5, 3), mesh=mesh["dp"])  # a 1-D slice works
    (lay,) = ss.layout(model).buffers
    lay.check()
    return message, lay.world_size


def test_two_dimensional_mesh_without_hsdp_names_is_rejected(pool):
    message, sliced_world = pool.run(mesh_case, 4)[0]
    assert "1-D mesh" in message and "('replicate', 'shard')" in message and "mesh['dp']" in message
    assert sliced_world == 2


def disagree_case(rank, world, group):
    torch.manual_seed(0)
    width = 8 if rank == 0 else 12  # rank 1 built a different model
    model = nn.Sequential(nn.Linear(4, width), nn.Linear(width, 2))
    ss.fully_shard(model, mesh=group)
    return expect(RuntimeError, model, torch.randn(2, 4))


def test_ranks_that_disagree_on_shapes_all_raise(pool):
    messages = pool.run(disagree_case, 2)
    for m in messages:
        assert "ranks disagree" in m and "same model" in m
