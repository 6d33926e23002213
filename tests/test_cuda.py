"""CUDA/NCCL paths that CPU cannot exercise: freed storage under the caching allocator, bf16 alignment of
compute views, a frozen parameter read in backward (an illegal address instead of a segfault on GPU),
training against an unsharded reference, and a checkpoint saved from GPUs that loads on GPUs (another
granularity) and into the unsharded model on the CPU. Skipped without a GPU; ``make gpu-check`` runs them."""

from __future__ import annotations

import copy
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _join(rank: int, world: int, port: int) -> torch.device:
    """Join the NCCL group on the loopback port; this rank's GPU."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    return torch.device("cuda", rank)


def _worker(rank: int, world: int, port: int, case: str, results) -> None:
    import test_parity as kit

    import scalestack as ss
    from scalestack.fsdp.api import units

    device = _join(rank, world, port)
    try:
        torch.manual_seed(0)
        ref = kit.Net("scale").to(device)  # a frozen scale read in backward
        model = copy.deepcopy(ref)
        policy = ss.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if case == "fp32":
            policy = ss.MixedPrecisionPolicy()
        for block in model.blocks:
            ss.fully_shard(block, mp_policy=policy)
        ss.fully_shard(model, mp_policy=policy)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        base = torch.cuda.memory_allocated()
        misaligned = []
        losses = [
            kit.step_both(model, ref, opt, ref_opt, [t.to(device) for t in batch], rank, world, None)
            for batch in kit.batches(4)
        ]
        for u in units(model):
            u.unshard()
            misaligned += [p.fqn for p in u.params if p.unsharded.data_ptr() % 16]
            u.reshard()
        torch.cuda.synchronize()
        freed = all(b.gather.untyped_storage().size() == 0 for u in units(model) for b in u.buffers)
        results.put((rank, {"losses": losses, "misaligned": misaligned, "freed": freed,
                            "held": torch.cuda.memory_allocated() - base}))  # fmt: skip
    finally:
        dist.destroy_process_group()


def _checkpoint_worker(rank: int, world: int, port: int, path: str, results) -> None:
    import test_checkpoint as kit

    from scalestack import checkpoint

    device = _join(rank, world, port)
    try:
        group = dist.group.WORLD
        torch.manual_seed(0)
        model = kit.Net().to(device)
        for block in model.blocks:
            kit.ss.fully_shard(block, mesh=group)
        kit.ss.fully_shard(model, mesh=group)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x, y = (t.to(device) for t in kit.batch(0))
        model(x, y).backward()
        opt.step()
        checkpoint.save(path, model, opt, extra={"rank": rank})
        saved = {k: v.full_tensor().cpu() for k, v in model.state_dict().items() if hasattr(v, "full_tensor")}
        torch.manual_seed(1)
        fresh = kit.Net().to(device)
        for block in fresh.blocks:
            kit.ss.fully_shard(block, mesh=group, granularity="row")
        kit.ss.fully_shard(fresh, mesh=group, granularity="row")
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        extra = checkpoint.load(path, fresh, fresh_opt)
        loaded = {k: v.full_tensor().cpu() for k, v in fresh.state_dict().items() if hasattr(v, "full_tensor")}
        same = saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
        results.put((rank, {"same": same, "extra": extra, "saved": saved if rank == 0 else None}))
    finally:
        dist.destroy_process_group()


def _run(case: str, worker=_worker) -> list[dict]:
    from dist_pool import free_port

    world = torch.cuda.device_count()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, case, results)) for r in range(world)]
    for p in procs:
        p.start()
    out = dict(results.get(timeout=240) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"a rank exited with {p.exitcode}"
    return [out[r] for r in range(world)]


@pytest.mark.parametrize("case", ["fp32", "bf16"])
def test_trains_like_the_reference_on_gpus(case):
    tolerance = 1e-4 if case == "fp32" else 2e-2  # TF32/bf16 kernels on GPU
    for r in _run(case):
        for loss, ref_loss in r["losses"]:
            assert abs(loss - ref_loss) <= tolerance * abs(ref_loss), r["losses"]
        assert r["misaligned"] == [] and r["freed"]


def test_a_checkpoint_from_gpus_loads_on_gpus_and_unsharded(tmp_path):
    import test_checkpoint as kit

    from scalestack import checkpoint

    path = str(tmp_path / "ckpt")
    out = _run(path, _checkpoint_worker)
    assert all(r["same"] for r in out) and [r["extra"] for r in out] == [{"rank": r} for r in range(len(out))]
    plain = kit.build(None, None, seed=2)  # on the CPU, no fully_shard
    checkpoint.load(path, plain)
    state = plain.state_dict()
    assert all(torch.equal(state[k], v) for k, v in out[0]["saved"].items())
