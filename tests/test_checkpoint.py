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
    """Load into a model of other initial values (group None: the plain model, no fully_shard), train on."""
    model = build(group, GRANULARITY[kind][1], seed=1)
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
    return load_case(0, 1, None, path, kind, stock)


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


# --- pieces as chunks ------------------------------------------------------------------------------------------


def test_boxes_cover_exactly_the_range_in_memory_order():
    from scalestack.fsdp.piece_tensor import boxes

    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        ndim = int(torch.randint(0, 5, (1,), generator=g))
        shape = tuple(int(s) for s in torch.randint(1, 6, (ndim,), generator=g))
        numel = math.prod(shape)
        start, end = sorted(int(v) for v in torch.randint(0, numel + 1, (2,), generator=g))
        got = boxes(shape, start, end)
        assert len(got) <= max(2 * ndim - 1, 1)
        index = torch.arange(numel).view(shape)
        covered = [index[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].reshape(-1) for offsets, sizes in got]
        flat = torch.cat(covered) if covered else torch.empty(0, dtype=torch.long)
        assert flat.tolist() == list(range(start, end)), (shape, start, end, got)  # whole, disjoint, in order


def whole(v: torch.Tensor) -> torch.Tensor:
    return v.full_tensor() if hasattr(v, "full_tensor") else v


def piece_case(rank, world, group):
    model = build(group, "element", seed=0)
    ref = build(None, None, seed=0).state_dict()
    sd = model.state_dict()
    piece = sd["blocks.0.experts"]
    out = {"type": type(piece).__name__, "shape": list(piece.shape), "repr": repr(piece)}
    whole_sd = {k: whole(v) for k, v in sd.items()}  # every rank gathers every tensor, then compares
    out["full_equal"] = all(torch.equal(v, ref[k]) for k, v in whole_sd.items())
    try:
        piece + 1
        out["compute"] = "no error"
    except RuntimeError as e:
        out["compute"] = str(e)
    # load_state_dict takes full tensors on a sharded model (each rank copies its piece out)
    fresh = build(group, "row", seed=5)
    fresh.load_state_dict(ref)
    fresh_sd = {k: whole(v) for k, v in fresh.state_dict().items()}
    out["full_loaded"] = all(torch.equal(v, ref[k]) for k, v in fresh_sd.items())
    try:  # a piece of another layout is refused, not silently misplaced
        fresh.load_state_dict(sd)
        out["other_layout"] = "no error"
    except RuntimeError as e:
        out["other_layout"] = str(e)
    out["assign"] = []
    for module in (fresh.blocks[0], fresh.blocks[0].qkv):  # a unit, and a plain module inside one
        try:  # assign=True would detach the pieces from the shard
            module.load_state_dict(module.state_dict(), assign=True)
            out["assign"].append("no error")
        except (RuntimeError, ValueError) as e:
            out["assign"].append(str(e))
    return out


def test_state_dict_values_are_pieces_of_the_global_tensors(pool):
    outs = pool.run(piece_case, 3)
    for out in outs:
        assert out["type"] == "PieceTensor" and out["shape"] == [EXPERTS, HIDDEN, D]
        assert "global_shape=[3, 40, 24]" in out["repr"]
        assert out["full_equal"] and out["full_loaded"]
        assert "to_local()" in out["compute"]
        assert all("assign=False" in message for message in out["assign"])
    assert any("sharded differently" in out["other_layout"] for out in outs)  # ranks whose pieces differ


def gathered_case(rank, world, group, path):
    """A unit kept gathered between steps takes what is loaded: its next forward uses the loaded values."""
    model = build(group, "element", seed=0)
    opt, _ = make_optimizers(model, "adamw")
    train_step(model, opt, None, 0, rank, world, group)
    checkpoint.save(path, model, opt)
    x, y = batch(9)
    expected = model(x, y).item()
    kept = build(group, "element", seed=1)
    kept.set_reshard_after_backward(False)
    kept_opt, _ = make_optimizers(kept, "adamw")
    train_step(kept, kept_opt, None, 0, rank, world, group)  # its units stay gathered
    if rank == 0:  # a state dict taken on one rank changes nothing the next collectives depend on
        kept.state_dict()
        checkpoint.optimizer_state_dict(kept, kept_opt)
    train_step(kept, kept_opt, None, 1, rank, world, group)
    stock = build(group, "element", seed=2)
    stock.unshard()
    checkpoint.load(path, kept, kept_opt)
    sd = {"model": stock.state_dict()}
    dcp.load(sd, checkpoint_id=path, process_group=group)  # the stock flow: dcp.load, then load_state_dict
    stock.load_state_dict(sd["model"])
    return expected, kept(x, y).item(), stock(x, y).item()


def test_loading_into_units_kept_gathered_reaches_their_forward(pool, tmp_path):
    for expected, kept, stock in pool.run(gathered_case, 2, str(tmp_path / "ckpt")):
        assert kept == expected and stock == expected


def failing_rank_case(rank, world, group, path):
    """A rank that fails while publishing still takes part in the collectives: every rank raises, none hangs,
    and the group works afterwards."""
    from scalestack.checkpoint import directory

    model = build(group, "element", seed=0)
    sums = directory.file_sums
    if rank == 1:
        directory.file_sums = lambda *a: (_ for _ in ()).throw(OSError("disk on fire"))
    try:
        checkpoint.save(os.path.join(path, "a"), model)
        first = "no error"
    except checkpoint.CheckpointError as e:
        first = str(e)
    finally:
        directory.file_sums = sums
    checkpoint.save(os.path.join(path, "b"), model)
    return first, sorted(n for n in os.listdir(path) if not n.startswith("."))


def test_a_rank_failing_to_publish_fails_every_rank(pool, tmp_path):
    for first, visible in pool.run(failing_rank_case, 2, str(tmp_path)):
        assert "disk on fire" in first
        assert visible == ["b"]


# --- atomic saves, newest complete, keep_last, async ---------------------------------------------------------


def series_case(rank, world, group, root):
    model = build(group, "element", seed=0)
    opt, _ = make_optimizers(model, "adamw")
    snaps = {}
    for step, name in enumerate(["step_1", "step_2", "step_3"]):
        train_step(model, opt, None, step, rank, world, group)
        checkpoint.save(os.path.join(root, name), model, opt, extra={"step": step}, keep_last=2)
        snaps[name] = snapshot(model, opt, group)
    visible = sorted(n for n in os.listdir(root) if not n.startswith("."))
    fresh = build(group, "row", seed=1)
    fresh_opt, _ = make_optimizers(fresh, "adamw")
    extra = checkpoint.load(root, fresh, fresh_opt)  # the directory: its newest complete checkpoint
    newest_equal = snapshot(fresh, fresh_opt, group)
    # async: training goes on while the checkpoint is written; it holds the values at the save
    handle = checkpoint.save(os.path.join(root, "d"), model, opt, async_save=True, extra={"step": 3})
    at_save = snapshot(model, opt, group)
    for step in range(3, 5):
        train_step(model, opt, None, step, rank, world, group)
    handle.wait()
    checkpoint.load(os.path.join(root, "d"), fresh, fresh_opt)
    async_loaded = snapshot(fresh, fresh_opt, group)
    # the same name again replaces it
    checkpoint.save(os.path.join(root, "d"), model, opt, extra={"step": 5})
    replaced = checkpoint.load(root, fresh, fresh_opt)
    return visible, extra, newest_equal, snaps["step_3"], async_loaded, at_save, replaced


def test_newest_complete_keep_last_async_and_replace(pool, tmp_path):
    root = str(tmp_path / "run")
    # W=4: all the pool's ranks (the asynchronous save creates a process group, which every rank must join)
    visible, extra, newest, saved_c, async_loaded, at_save, replaced = pool.run(series_case, 4, root)[0]
    assert visible == ["step_2", "step_3"]  # keep_last=2 deleted step_1 once step_3 was complete
    assert extra == {"step": 2}
    assert_bitwise(newest, saved_c)
    assert_bitwise(async_loaded, at_save)
    assert replaced == {"step": 5}
    assert sorted(os.listdir(root)) == ["d", "step_2", "step_3"]  # no temporary or replaced directory left


def _die_mid_save(rank, world, port, root, out):
    """Saves "good", then rank 1 is SIGKILLed after writing part of "bad"."""
    import datetime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20))
    model = build(dist.group.WORLD, "element", seed=0)
    opt, _ = make_optimizers(model, "adamw")
    train_step(model, opt, None, 0, rank, world, dist.group.WORLD)
    checkpoint.save(os.path.join(root, "good"), model, opt)
    snap = snapshot(model, opt, dist.group.WORLD)
    if rank == 0:
        torch.save(snap, out)
    train_step(model, opt, None, 1, rank, world, dist.group.WORLD)
    if rank == 1:
        import torch.distributed.checkpoint.filesystem as fs

        write, written = fs._write_item, []

        def write_then_die(*args, **kwargs):
            if written:
                os.kill(os.getpid(), signal.SIGKILL)
            written.append(write(*args, **kwargs))
            return written[-1]

        fs._write_item = write_then_die
    checkpoint.save(os.path.join(root, "bad"), model, opt)


def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint_whole(tmp_path):
    import torch.multiprocessing as mp
    from dist_pool import free_port

    root, out = tmp_path / "run", tmp_path / "good.pt"
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_die_mid_save, args=(r, 2, port, str(root), str(out))) for r in range(2)]
    for p in procs:
        p.start()
    procs[1].join(timeout=120)
    assert procs[1].exitcode == -signal.SIGKILL
    procs[0].join(timeout=5)
    if procs[0].is_alive():  # waiting for its dead peer
        procs[0].kill()
        procs[0].join()
    assert sorted(os.listdir(root)) == [".bad.incomplete", "good"]  # the broken save stays invisible
    model = build(None, None, seed=1)
    opt, _ = make_optimizers(model, "adamw")
    checkpoint.load(root, model, opt)  # the newest complete one: "good", whole
    assert_bitwise(snapshot(model, opt, None), torch.load(out))
    checkpoint.save(root / "bad", model, opt)  # a later save of that name clears the leftovers
    assert sorted(os.listdir(root)) == ["bad", "good"]


# --- stock conversion and export ------------------------------------------------------------------------------


def saved_full_case(rank, world, group, path):
    model = build(group, "element", seed=0)
    opt, _ = make_optimizers(model, "adamw")
    train_step(model, opt, None, 0, rank, world, group)
    checkpoint.save(path, model, opt)
    return {k: v.clone() for k, v in ss.full_state_dict(model).items()}


def test_dcp_to_torch_save_and_export_load_into_the_plain_model(pool, tmp_path):
    from safetensors.torch import load_file

    from scalestack.cli.main import main as cli

    path = tmp_path / "ckpt"
    saved = pool.run(saved_full_case, 2, str(path))[0]
    dcp_to_torch_save(path, tmp_path / "model.pt")
    model = build(None, None, seed=1)
    model.load_state_dict(torch.load(tmp_path / "model.pt")["model"], strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert cli(["export", str(tmp_path), str(tmp_path / "model.safetensors")]) == 0  # the newest under a directory
    model = build(None, None, seed=2)
    model.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


def hf_case(rank, world, group, path, config_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    for layer in model.model.layers:
        ss.fully_shard(layer, mesh=group)
    ss.fully_shard(model, mesh=group)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(rank))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    checkpoint.save(path, model, opt)
    return {k: v.clone() for k, v in ss.full_state_dict(model).items()}


def test_export_writes_a_directory_that_from_pretrained_loads(pool, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from scalestack.cli.main import main as cli

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    config.save_pretrained(tmp_path / "config")
    saved = pool.run(hf_case, 2, str(tmp_path / "ckpt"), str(tmp_path / "config"))[0]
    assert cli(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--hf-config", str(tmp_path / "config")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    state = loaded.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], v) for k, v in saved.items())


# --- bad input ----------------------------------------------------------------------------------------------------


def test_paths_that_are_not_checkpoints_and_damaged_files_are_named(tmp_path):
    model = build(None, None, seed=0)
    opt, _ = make_optimizers(model, "adamw")
    train_step(model, opt, None, 0, 0, 1, None)
    checkpoint.save(tmp_path / "run" / "ok", model, opt)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    dcp.save(model.state_dict(), checkpoint_id=tmp_path / "stock", no_dist=True)
    for name, message in [("nope", "does not exist"), ("empty", "holds no complete"), ("file", "is a file"),
                          ("stock", "torch.distributed.checkpoint.load")]:  # fmt: skip
        path = tmp_path / name
        with pytest.raises(checkpoint.CheckpointError, match=message):
            checkpoint.load(path, model)

    def damage(name: str, how) -> checkpoint.CheckpointError:
        copy = tmp_path / f"damaged_{name}_{how.__name__}"
        import shutil

        shutil.copytree(tmp_path / "run" / "ok", copy)
        how(copy / name)
        with pytest.raises(checkpoint.CheckpointError) as info:
            checkpoint.load(copy, model, opt)
        return str(info.value)

    def truncate(f):
        f.write_bytes(f.read_bytes()[:-100])

    def flip(f):
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))

    def remove(f):
        f.unlink()

    data_file = next(n for n in os.listdir(tmp_path / "run" / "ok") if n.endswith(".distcp"))
    assert "truncated" in damage(data_file, truncate)
    assert "CRC-32" in damage(data_file, flip)
    copy = tmp_path / f"damaged_{data_file}_flip"
    checkpoint.load(copy, model, opt, verify=False)  # sizes only: DCP itself loads a flipped byte silently
    assert "missing" in damage(data_file, remove)
    assert "CRC-32" in damage(".metadata", flip)
    assert "damaged" in damage("scalestack.json", truncate)


def test_a_model_or_optimizer_that_does_not_match_is_named(tmp_path):
    model = build(None, None, seed=0)
    opt, _ = make_optimizers(model, "adamw")
    train_step(model, opt, None, 0, 0, 1, None)
    checkpoint.save(tmp_path / "ckpt", model)  # without the optimizer
    with pytest.raises(ValueError, match=r"holds no state for \['optimizer'\]"):
        checkpoint.load(tmp_path / "ckpt", model, opt)
    with pytest.raises(ValueError, match="not in the model"):
        checkpoint.load(tmp_path / "ckpt", build(None, None, seed=1), opt)
    with pytest.raises(ValueError, match=r"missing in the checkpoint \(2\): model\.bias, model\.weight") as info:
        checkpoint.load(tmp_path / "ckpt", nn.Linear(3, 4))
    assert "not in the model/optimizer" in str(info.value) and "model.blocks.0.experts" in str(info.value)
    wider = build(None, None, seed=1)
    wider.blocks[1].experts = nn.Parameter(torch.zeros(EXPERTS + 1, HIDDEN, D))
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    wider_opt = torch.optim.AdamW(wider.parameters())
    with pytest.raises(ValueError, match=r"shape mismatch \(1\): model\.blocks\.1\.experts \(checkpoint \[3, 40, 24\]"):
        checkpoint.load(tmp_path / "ckpt", wider, wider_opt)
    assert all(torch.equal(v, before[k]) for k, v in wider.state_dict().items())  # nothing changed
    assert not wider_opt.state  # not even the state made to load into
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint.load(tmp_path / "ckpt", wider, strict=False)
    assert any("blocks.1.experts" in str(w.message) for w in caught)
    assert torch.equal(wider.blocks[0].experts, model.blocks[0].experts)  # the rest was loaded
    assert torch.equal(wider.blocks[1].experts, before["blocks.1.experts"])


def test_bad_arguments_are_refused(tmp_path):
    model = build(None, None, seed=0)
    for kwargs, error, message in [
        (dict(keep_last=0), ValueError, "keep_last"),
        (dict(keep_last=True), ValueError, "keep_last"),
        (dict(optimizer="adam"), TypeError, "optimizer must be"),
        (dict(async_save=1), TypeError, "async_save"),
    ]:
        with pytest.raises(error, match=message):
            checkpoint.save(tmp_path / "x", model, **kwargs)
    with pytest.raises(TypeError, match="nn.Module"):
        checkpoint.save(tmp_path / "x", {"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="reserved"):
        checkpoint.save(tmp_path / ".hidden", model)
    assert not (tmp_path / "x").exists()


def corrupt_case(rank, world, group, path):
    model = build(group, "element", seed=0)
    try:
        checkpoint.load(path, model)
        return "no error"
    except checkpoint.CheckpointError as e:
        return str(e)


def test_a_damaged_file_fails_every_rank_without_a_hang(pool, tmp_path):
    path = tmp_path / "ckpt"
    pool.run(saved_full_case, 2, str(path))
    victim = sorted(n for n in os.listdir(path) if n.endswith(".distcp"))[-1]  # verified by one rank only
    data = bytearray((path / victim).read_bytes())
    data[-10] ^= 0xFF
    (path / victim).write_bytes(bytes(data))
    assert all("CRC-32" in message for message in pool.run(corrupt_case, 2, str(path)))


def test_saves_never_replace_what_is_not_a_checkpoint_and_prune_only_their_series(tmp_path):
    model = build(None, None, seed=0)
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "train.py").write_text("print('mine')")
    with pytest.raises(checkpoint.CheckpointError, match="is not a scalestack checkpoint"):
        checkpoint.save(tmp_path / "project", model)
    assert (tmp_path / "project" / "train.py").exists()
    (tmp_path / "made_in_advance").mkdir()  # an empty directory is a free target
    checkpoint.save(tmp_path / "made_in_advance", model)
    checkpoint.load(tmp_path / "made_in_advance", model)
    run = tmp_path / "run"
    checkpoint.save(run / "best", model)
    for step in (1, 2, 3):
        checkpoint.save(run / f"step_{step}", model, keep_last=2)
    assert sorted(os.listdir(run)) == ["best", "step_2", "step_3"]
    for epoch, step in ((1, 100), (2, 200), (3, 300)):  # numbers anywhere in the name make the series
        checkpoint.save(run / f"epoch{epoch}-step{step}", model, keep_last=1)
    assert sorted(os.listdir(run)) == ["best", "epoch3-step300", "step_2", "step_3"]
    for name in ("epoch3-step300", "best"):
        checkpoint.save(run / name, model)  # replaced: the same name again
    with pytest.raises(checkpoint.CheckpointError, match="holds checkpoints"):
        checkpoint.save(run, model)  # the directory of checkpoints itself
    (run / ".step_1.deleting-0").mkdir()  # left by a crash mid-prune
    (run / ".step_1.deleting-0" / "x").write_text("x")
    checkpoint.save(run / "step_4", model, keep_last=2)
    assert sorted(os.listdir(run)) == ["best", "epoch3-step300", "step_3", "step_4"]
    # a crash between moving the old copy aside and renaming the new one: the old copy is still found
    os.rename(run / "step_4", run / ".step_4.replaced")
    checkpoint.load(run / "step_4", model)


class Counting(torch.optim.SGD):
    """Keeps a Python int in its state, as some optimizers keep their step."""

    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["count"] = self.state[p].get("count", 0) + 1


def test_an_optimizer_without_state_loads(tmp_path):
    model = build(None, None, seed=0)
    opt, _ = make_optimizers(model, "sgd_plain")
    train_step(model, opt, None, 0, 0, 1, None)
    checkpoint.save(tmp_path / "ckpt", model, opt)
    fresh = build(None, None, seed=1)
    fresh_opt, _ = make_optimizers(fresh, "sgd_plain")
    checkpoint.load(tmp_path / "ckpt", fresh, fresh_opt)
    assert not fresh_opt.state and torch.equal(fresh.blocks[0].experts, model.blocks[0].experts)


def test_non_tensor_optimizer_state_and_the_optimizer_class_round_trip(tmp_path):
    model = build(None, None, seed=0)
    opt = Counting(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        train_step(model, opt, None, step, 0, 1, None)
    checkpoint.save(tmp_path / "ckpt", model, opt)
    fresh = build(None, None, seed=1)
    fresh_opt = Counting(fresh.parameters(), lr=0.5, momentum=0.9)
    checkpoint.load(tmp_path / "ckpt", fresh, fresh_opt)
    assert {s["count"] for s in fresh_opt.state.values()} == {3}
    assert fresh_opt.param_groups[0]["lr"] == 0.1
    other = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.9)
    with pytest.raises(ValueError, match="is a test_checkpoint.Counting, this one a torch.optim.sgd.SGD"):
        checkpoint.load(tmp_path / "ckpt", fresh, other)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint.load(tmp_path / "ckpt", fresh, other, strict=False)
    assert any("hyperparameters are not loaded" in str(w.message) for w in caught)
    assert other.param_groups[0]["lr"] == 0.5
