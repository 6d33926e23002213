"""FSDP2 parity in everyday use, each case on W gloo ranks against an unsharded single-process reference.

Partially frozen units (LoRA, a frozen scale), freezing and unfreezing mid-run, parameters that get a
gradient on some ranks only (an expert one rank routes to, a branch only rank 0 takes: every rank must issue
the same collectives), activation checkpointing in every form, dataclass and ``ModelOutput`` outputs, and
the review's smaller findings (C5, C7, C9-C12, C18).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from test_engine import global_mean, local, param_errors, rel

import scalestack as ss
from scalestack.fsdp.api import units
from scalestack.fsdp.unit import ShardState

pytestmark = pytest.mark.timeout(240)

VOCAB, D, T, BATCH, EXPERTS = 37, 16, 6, 12, 5  # the global batch divides by every W in 1..4


@dataclasses.dataclass
class BlockOut:
    hidden: torch.Tensor
    aux: int = 0


class Block(nn.Module):
    """A residual MLP block; ``kind`` adds the structure a case needs."""

    def __init__(self, kind: str = "plain"):
        super().__init__()
        self.kind = kind
        self.ln = nn.LayerNorm(D)
        self.fc = nn.Linear(D, 2 * D)
        self.proj = nn.Linear(2 * D, D)
        if kind == "lora":  # frozen base weight, trainable low-rank adapter
            self.fc.weight.requires_grad_(False)
            self.lora_a = nn.Parameter(torch.randn(4, D) * 0.1)
            self.lora_b = nn.Parameter(torch.randn(2 * D, 4) * 0.1)
        if kind == "scale":
            self.scale = nn.Parameter(torch.linspace(0.5, 1.5, D), requires_grad=False)
        if kind == "moe":
            self.router = nn.Linear(D, EXPERTS)
            self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(EXPERTS))
        if kind == "branch":
            self.branch = nn.Linear(D, D)

    def forward(self, h: torch.Tensor, route: torch.Tensor):
        x = self.ln(h)
        if self.kind == "scale":
            x = x * self.scale
        y = self.fc(x)
        if self.kind == "lora":
            y = y + x @ self.lora_a.t() @ self.lora_b.t()
        out = h + self.proj(F.gelu(y))
        if self.kind == "moe":  # hard routing per sample: an expert no local sample picks never runs here
            gate = self.router(x).softmax(-1)
            for e, expert in enumerate(self.experts):
                picked = (route == e).nonzero().flatten()
                if picked.numel():
                    out = out.index_add(0, picked, expert(x[picked]) * gate[picked][..., e : e + 1])
        if self.kind == "branch":  # only samples flagged 1 (all on rank 0) take the branch
            picked = (route == 1).nonzero().flatten()
            if picked.numel():
                out = out.index_add(0, picked, self.branch(x[picked]))
        if self.kind == "dataclass":
            return BlockOut(out)
        if self.kind == "modeloutput":
            from transformers.modeling_outputs import BaseModelOutput

            return BaseModelOutput(last_hidden_state=out)
        return out


class Net(nn.Module):
    def __init__(self, kind: str = "plain", n_blocks: int = 3):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(Block(kind) for _ in range(n_blocks))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        for block in self.blocks:
            h = block(h, route)
            h = h.hidden if isinstance(h, BlockOut) else getattr(h, "last_hidden_state", h)
        return F.cross_entropy(self.head(h).view(-1, VOCAB), targets.view(-1))


def batches(steps: int, seed: int = 1):
    """Token batches, and per-sample routes: experts 0-2 by sample, expert 3 for sample 0 only (always on
    rank 0), expert 4 never (its gradient stays None everywhere). For the branch, route 1 is rank 0's."""
    g = torch.Generator().manual_seed(seed)
    route = torch.arange(BATCH) % 3
    route[0] = 3
    for _ in range(steps):
        yield torch.randint(0, VOCAB, (BATCH, T), generator=g), torch.randint(0, VOCAB, (BATCH, T), generator=g), route


def branch_route() -> torch.Tensor:
    route = torch.zeros(BATCH, dtype=torch.long)
    route[:2] = 1
    return route


def make(kind: str, seed: int = 0) -> tuple[Net, Net]:
    torch.manual_seed(seed)
    ref = Net(kind)
    return ref, copy.deepcopy(ref)


def shard(model: Net, group, wrap=None, **kwargs) -> Net:
    for i, block in enumerate(model.blocks):
        block = wrap(block) if wrap is not None else block
        model.blocks[i] = block
        ss.fully_shard(block, mesh=group, **kwargs)
    return ss.fully_shard(model, mesh=group, **kwargs)


def step_both(model, ref, opt, ref_opt, batch, rank, world, group, inspect=None) -> tuple[float, float]:
    """One step of the sharded model on this rank's part of ``batch`` and of the reference on all of it;
    ``inspect()`` runs after both backwards. Returns (global mean loss, reference loss)."""
    x, y, route = batch
    loss = model(local(x, rank, world), local(y, rank, world), local(route, rank, world))
    loss.backward()
    ref_loss = ref(x, y, route)
    ref_loss.backward()
    if inspect is not None:
        inspect()
    for o in (opt, ref_opt):
        o.step(), o.zero_grad()
    return global_mean(loss, group, world), ref_loss.item()


def _none_grads(model: nn.Module) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.grad is None)


def train(rank, world, group, kind, steps=5, wrap=None, after=None, schedule=None, shard_kwargs=None):
    """AdamW on both models; returns losses, parameter errors and each rank's collective sequence."""
    ref, model = make(kind)
    if wrap is not None:  # the reference checkpoints too (same names; the arithmetic is the same)
        ref.blocks = nn.ModuleList(wrap(b) for b in ref.blocks)
    shard(model, group, wrap, **(shard_kwargs or {}))
    if after is not None:
        after(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    losses, grads_none = [], []  # grads_none: the sharded model's, then the reference's, every step
    inspect = lambda: grads_none.extend([_none_grads(model), _none_grads(ref)])
    with ss.record_collectives() as log:
        for step, (x, y, route) in enumerate(batches(steps)):
            route = branch_route() if kind == "branch" else route
            if schedule is not None:
                schedule(step, model, ref)
            losses.append(step_both(model, ref, opt, ref_opt, (x, y, route), rank, world, group, inspect))
    return {"losses": losses, "errors": param_errors(model, ref), "log": list(log), "grads_none": grads_none}


def check_matches(out: dict) -> None:
    for step, (loss, ref_loss) in enumerate(out["losses"]):
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (step, loss, ref_loss)
    worst = max(out["errors"].items(), key=lambda kv: kv[1])
    assert worst[1] < 2e-3, worst


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("kind", ["lora", "scale"])
def test_partially_frozen_units(pool, kind, world):
    """C1: a frozen parameter read in backward (LoRA base weight, frozen scale) must outlive the last
    trainable gradient; before the fix one rank segfaulted and the others hung."""
    check_matches(pool.run(train, world, kind)[0])


def _freeze_schedule(step, model, ref):
    if step in (2, 4):  # freeze block 1 after step 2, unfreeze it at step 4, on both models alike
        for m in (model, ref):
            m.blocks[1].requires_grad_(step == 4)


@pytest.mark.parametrize("world", [2, 3])
def test_freeze_and_unfreeze_after_fully_shard(pool, world):
    """C6: requires_grad changes after fully_shard take effect (frozen: no gradient, no update)."""
    out = pool.run(train, world, "plain", 6, None, None, _freeze_schedule)[0]
    check_matches(out)
    ours, theirs = out["grads_none"][0::2], out["grads_none"][1::2]
    assert ours == theirs and any("blocks.1.fc.weight" in step for step in ours)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("kind", ["moe", "branch"])
def test_rank_dependent_unused_parameters(pool, kind, world):
    """C3: gradients on some ranks only. Every rank issues the same collectives in the same order, every
    parameter some rank trained gets its averaged gradient, one no rank used keeps .grad None."""
    outs = pool.run(train, world, kind)
    check_matches(outs[0])
    assert all(o["log"] == outs[0]["log"] for o in outs), "ranks issued different collective sequences"
    ours, theirs = outs[0]["grads_none"][0::2], outs[0]["grads_none"][1::2]
    assert ours == theirs
    if kind == "moe":
        assert all("blocks.0.experts.4.weight" in s and "blocks.0.experts.3.weight" not in s for s in ours)


# ------------------------------------------------------------------------ activation checkpointing
def _inner_checkpoint(block: Block) -> Block:
    """torch.utils.checkpoint inside the block, around its first linear layer."""
    block.fc = _Checkpointed(block.fc)
    return block


class _Checkpointed(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False)


def _wrapper(reentrant: bool):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    impl = CheckpointImpl.REENTRANT if reentrant else CheckpointImpl.NO_REENTRANT
    return lambda block: checkpoint_wrapper(block, checkpoint_impl=impl)


def _composable(block: Block) -> Block:
    from torch.distributed._composable import checkpoint

    return checkpoint(block)


def ac_case(rank, world, group, variant):
    wrap, after = {
        "inner": (_inner_checkpoint, None),
        "wrapper": (_wrapper(False), None),
        "wrapper_reentrant": (_wrapper(True), None),
        "composable_before": (_composable, None),
        "composable_after": (None, lambda m: [_composable(b) for b in m.blocks]),
    }[variant]
    out = train(rank, world, group, "plain", 3, wrap, after)
    # one more step, counting: one all-gather per unit in forward and one per block in backward
    ref, model = make("plain")
    shard(model, group, wrap)
    if after is not None:
        after(model)
    x, y, route = next(batches(1))
    ss.reset_traffic()
    model(local(x, rank, world), local(y, rank, world), local(route, rank, world)).backward()
    out["all_gathers"] = ss.traffic().all_gathers
    out["gathered_after_backward"] = [u.name for u in units(model) if u.state is not ShardState.SHARDED]
    return out


@pytest.mark.parametrize("variant", ["inner", "wrapper", "wrapper_reentrant", "composable_before", "composable_after"])
def test_activation_checkpointing(pool, variant):
    """C2: a recompute in backward neither prefetches nor reshards: 2 all-gathers per block + 1 for the
    root, and nothing stays gathered after backward."""
    out = pool.run(ac_case, 2, variant)[0]
    check_matches(out)
    assert out["all_gathers"] == 2 * 3 + 1
    assert out["gathered_after_backward"] == []


@pytest.mark.parametrize("kind", ["dataclass", "modeloutput"])
def test_dataclass_and_model_outputs(pool, kind):
    """C4: tensors inside a dataclass or a Hugging Face ModelOutput get their pre-backward hook."""
    check_matches(pool.run(train, 2, kind, 3)[0])


# ------------------------------------------------------------------------ compile
def compile_case(rank, world, group, whole):
    torch._dynamo.reset()
    ref, model = make("plain")
    shard(model, group)
    if whole:
        model = torch.compile(model, backend="aot_eager")
    else:
        for block in model.blocks:
            block.compile(backend="aot_eager")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    losses = [step_both(model, ref, opt, ref_opt, batch, rank, world, group) for batch in batches(3)]
    inner = model._orig_mod if whole else model
    return {"losses": losses, "errors": param_errors(inner, ref)}


@pytest.mark.parametrize("whole", [False, True])
def test_torch_compile_matches_eager(pool, whole):
    """C5: torch.compile (aot_eager) of each block or of the whole sharded model trains like the reference."""
    check_matches(pool.run(compile_case, 2, whole)[0])


# ------------------------------------------------------------------------ smaller findings
def misc_case(rank, world, group):
    out = {}
    _, model = make("plain")
    shard(model, group, mp_policy=ss.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    # C5: reprs never touch freed storage
    unit = units(model)[1]
    out["reprs"] = [
        repr(unit),
        repr(unit.buffers[0]),
        repr(unit.params[0]),
        repr(ss.shard_info(unit.params[0].sharded)),
    ]
    # C12: every bf16 compute view is 16-byte aligned
    unit.unshard()
    out["misaligned"] = [p.fqn for p in unit.params if p.unsharded.data_ptr() % 16]
    unit.reshard()
    # C9: a dtype change after fully_shard raises, a no-op .to() works, assign=True raises
    for name, fn in {"double": lambda: model.double(), "assign": lambda: model.load_state_dict(
            model.state_dict(), assign=True)}.items():  # fmt: skip
        try:
            fn()
            out[name] = "no error"
        except (RuntimeError, ValueError) as e:
            out[name] = str(e)
    model.to(torch.float32)
    model.load_state_dict(model.state_dict())
    # C10: no-sync micro-batches accumulate in the fp32 reduce dtype, not in bf16
    x, y, route = next(batches(1))
    model.set_requires_gradient_sync(False)
    model(local(x, rank, world), local(y, rank, world), local(route, rank, world)).backward()
    out["accum"] = str(unit.buffers[0].accum.dtype)
    model.set_requires_gradient_sync(True)
    model(local(x, rank, world), local(y, rank, world), local(route, rank, world)).backward()
    out["accum_after_sync"] = unit.buffers[0].accum is None and all(p.grad is not None for p in model.parameters())
    return out


def test_smaller_findings(pool):
    out = pool.run(misc_case, 2)[0]
    assert all("ShardedUnit" in r or "FlatBuffer" in r or "ManagedParam" in r or "ShardInfo" in r for r in out["reprs"])
    assert out["misaligned"] == []
    assert "before fully_shard" in out["double"] and "torch.float64" in out["double"]
    assert "assign=False" in out["assign"]
    assert out["accum"] == "torch.float32" and out["accum_after_sync"]


def frozen_unit_case(rank, world, group):
    """C11: a fully frozen unit that gradients flow through holds no grad buffer and reduces nothing."""
    ref, model = make("plain")
    for m in (ref, model):
        m.blocks[1].requires_grad_(False)
    shard(model, group)
    x, y, route = next(batches(1))
    ss.reset_traffic()
    for _ in range(2):
        model(local(x, rank, world), local(y, rank, world), local(route, rank, world)).backward()
    frozen = units(model.blocks[1])[0]
    return ss.traffic().reduce_scatters, [b.grad.untyped_storage().size() for b in frozen.buffers]


def test_frozen_unit_holds_no_grad_buffer(pool):
    reduces, grad_bytes = pool.run(frozen_unit_case, 2)[0]
    assert reduces == 2 * 3  # the root and two trainable blocks, twice
    assert grad_bytes == [0]


def reset_case(rank, world, group):
    """C18: an exception mid-forward, then reset_iter_state(): the next steps train like the reference."""
    ref, model = make("plain")
    shard(model, group)
    x, y, route = next(batches(1))
    try:
        model(local(x, rank, world), local(y, rank, world)[:, :1], local(route, rank, world))  # wrong targets
    except (RuntimeError, ValueError):
        model.reset_iter_state()
    states = [u.state.name for u in units(model)]
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    for x, y, route in batches(2):
        model(local(x, rank, world), local(y, rank, world), local(route, rank, world)).backward()
        opt.step(), opt.zero_grad()
        ref(x, y, route).backward()
        ref_opt.step(), ref_opt.zero_grad()
    return states, param_errors(model, ref)


def test_reset_iter_state_after_an_exception(pool):
    states, errors = pool.run(reset_case, 2)[0]
    assert set(states) == {"SHARDED"}
    assert max(errors.values()) < 1e-5


def api_case(rank, world, group):
    """A list of modules as one unit, ignored_params, register_fsdp_forward_method."""
    ref, model = make("plain")
    ignored = {model.head.bias}
    ss.fully_shard([model.blocks[0], model.blocks[1]], mesh=group)  # one unit, two modules
    ss.fully_shard(model, mesh=group, ignored_params=ignored)
    one_unit = units(model.blocks[0])[0] is units(model.blocks[1])[0]

    def logits(idx):  # reads weights outside forward
        return model.head(model.emb(idx))

    model.logits = logits
    ss.register_fsdp_forward_method(model, "logits")
    x, y, route = next(batches(1))
    with torch.no_grad():
        got = rel(model.logits(x), ref.head(ref.emb(x)))
    loss = model(local(x, rank, world), local(y, rank, world), local(route, rank, world))
    loss.backward()
    ref(x, y, route).backward()
    g = model.blocks[0].fc.weight.grad
    piece = ss.shard_info(model.blocks[0].fc.weight)
    expected = ref.blocks[0].fc.weight.grad.reshape(-1)[piece.start : piece.end].view(g.shape)
    local_bias_grad = model.head.bias.grad.clone()
    dist.all_reduce(local_bias_grad, group=group)  # ignored: each rank keeps its own gradient
    return one_unit, got, rel(g, expected), rel(local_bias_grad / world, ref.head.bias.grad), model.head.bias.shape


def test_module_list_ignored_params_and_forward_methods(pool):
    one_unit, logits_err, grad_err, bias_err, bias_shape = pool.run(api_case, 2)[0]
    assert one_unit and logits_err < 1e-6 and grad_err < 1e-5 and bias_err < 1e-5
    assert tuple(bias_shape) == (VOCAB,)  # an ignored parameter stays whole


# ------------------------------------------------------------------------ shard_info
def shard_info_case(rank, world, group, granularity):
    ref, model = make("moe")
    shard(model, group, granularity=granularity)
    full = dict(ref.named_parameters())
    out = []
    for name, p in model.named_parameters():
        info = ss.shard_info(p)
        expected = full[name].detach().reshape(-1)[info.start : info.end]
        out.append((name, tuple(info.global_shape), info.start, info.end, tuple(p.shape), p.ndim == full[name].ndim,
                    torch.equal(p.detach().reshape(-1), expected), info.rank, info.world_size))  # fmt: skip
    return out


@pytest.mark.parametrize("granularity", [None, "element", "row", 4, "matrix", "tensor"])
def test_shard_info_on_every_granularity(pool, granularity):
    world = 3
    per_rank = pool.run(shard_info_case, world, granularity)
    for i, (name, shape, *_) in enumerate(per_rank[0]):
        ranges = sorted((r[i][2], r[i][3]) for r in per_rank if r[i][3] > r[i][2])
        numel = torch.Size(shape).numel()
        assert ranges[0][0] == 0 and ranges[-1][1] == numel, (name, ranges)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), (name, ranges)  # disjoint, no gap
        for rank, r in enumerate(per_rank):
            _, _, start, end, local_shape, same_ndim, equal, info_rank, info_world = r[i]
            assert torch.Size(local_shape).numel() == end - start and equal and info_rank == rank
            assert info_world == world
            assert same_ndim, (name, local_shape, shape)


# ------------------------------------------------------------------------ paths the review traced by hand
def micro_batches(rank, world, n=2):
    x, y, route = next(batches(1))
    xl, yl, rl = (local(t, rank, world) for t in (x, y, route))
    k = xl.shape[0] // n
    assert k * n == xl.shape[0], "micro-batches must cover the local batch"
    parts = [tuple(t[i * k : (i + 1) * k] for t in (xl, yl, rl)) for i in range(n)]
    return parts, (x, y, route)


def last_backward_case(rank, world, group):
    """set_is_last_backward(False) (set before the first forward) with a reduce every micro-batch: each
    unit's earlier reduce-scatter must land before its grad buffer takes the next micro-batch's gradients."""
    ref, model = make("plain")
    shard(model, group)
    parts, full = micro_batches(rank, world)
    for i, part in enumerate(parts):
        model.set_is_last_backward(i == len(parts) - 1)
        (model(*part) / len(parts)).backward()
    ref(*full).backward()
    return _grad_errors(model, ref)


def _grad_errors(model: nn.Module | list[nn.Parameter], ref: nn.Module) -> float:
    """Worst relative error of the sharded gradients (the pieces, as the optimizer sees them)."""
    worst = 0.0
    pieces = list(model.parameters()) if isinstance(model, nn.Module) else model
    for p, q in zip(pieces, ref.parameters()):
        info = ss.shard_info(p)
        if info.end > info.start:
            expected = q.grad.reshape(-1)[info.start : info.end].view(p.grad.shape)
            worst = max(worst, rel(p.grad, expected))
    return worst


def test_reduce_every_micro_batch_without_waiting(pool):
    assert max(pool.run(last_backward_case, 3)) < 1e-5


def nested_ac_case(rank, world, group):
    """A sub-unit inside a checkpointed block (torchtitan's experts-in-a-block pattern): its recompute must
    not register a trigger that never fires."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    ref, model = make("plain")
    for i, block in enumerate(model.blocks):
        ss.fully_shard(block.fc, mesh=group)
        model.blocks[i] = checkpoint_wrapper(block)
        ss.fully_shard(model.blocks[i], mesh=group)
    ss.fully_shard(model, mesh=group)
    ref.blocks = nn.ModuleList(checkpoint_wrapper(b) for b in ref.blocks)
    x, y, route = next(batches(1))
    with ss.record_collectives() as log:
        model(local(x, rank, world), local(y, rank, world), local(route, rank, world)).backward()
    ref(x, y, route).backward()
    kinds = [c.kind for c in log]
    # every unit reduces during backward, before the root's end-of-backward reduce (one per trained buffer)
    return _grad_errors(model, ref), kinds.count("all_gather"), kinds.count("reduce_scatter"), kinds[-2]


def test_sub_unit_inside_a_checkpointed_block(pool):
    err, gathers, reduces, second_last = pool.run(nested_ac_case, 2)[0]
    assert err < 1e-5
    assert gathers == 2 * 6 + 1 and reduces == 6 + 1  # 3 blocks + 3 sub-units, gathered twice; the root once
    assert second_last == "reduce_scatter"  # the root's, last: nothing waited for the flush


def eval_with_grad_case(rank, world, group):
    """Forwards with grad enabled and no backward (an evaluation without no_grad) leave no trigger behind: the
    next training step issues its collectives exactly as a step without them."""
    ref, model = make("plain")
    shard(model, group)
    x, y, route = (local(t, rank, world) for t in next(batches(1)))
    logs = []
    for evals in (0, 2):
        for _ in range(evals):
            model(x, y, route)  # discarded: its graph is freed at once
        with ss.record_collectives() as log:
            model(x, y, route).backward()
        logs.append([c.kind for c in log])
        model.zero_grad()
    return logs


def test_forward_without_backward_leaves_no_trigger(pool):
    clean, after_evals = pool.run(eval_with_grad_case, 2)[0]
    # the same backward: blocks reduce during it (a leaked trigger would hold every reduce to the end);
    # the root's all-gather is missing after the evaluations, which left it gathered (reshard_after_forward)
    assert after_evals == clean[1:]


def list_unit_case(rank, world, group):
    """A list of modules as one unit whose second module one forward skips, then a normal step."""
    ref, model = make("plain")
    ss.fully_shard([model.blocks[0], model.blocks[1]], mesh=group)
    ss.fully_shard(model, mesh=group)
    x, y, route = (local(t, rank, world) for t in next(batches(1)))
    skipped = model.blocks[1]
    model.blocks[1] = _Skip()
    with torch.no_grad():
        model(x, y, route)
    model.blocks[1] = skipped
    xs, ys, routes = next(batches(1))
    model(x, y, route).backward()
    ref(xs, ys, routes).backward()
    return _grad_errors(model, ref), [u.state.name for u in units(model)]


class _Skip(nn.Module):
    def forward(self, h, route):
        return h


def test_list_unit_after_a_forward_that_skipped_a_module(pool):
    err, states = pool.run(list_unit_case, 2)[0]
    assert err < 1e-5 and set(states) == {"SHARDED"}


def kept_gathered_case(rank, world, group):
    """Unfreeze a block while it stays gathered (reshard_after_backward=False): its gradient appears."""
    ref, model = make("plain")
    for m in (ref, model):
        m.blocks[1].requires_grad_(False)
    shard(model, group)
    pieces = list(model.parameters())  # what an optimizer holds; the module shows full tensors while gathered
    model.set_reshard_after_backward(False)
    x, y, route = next(batches(1))
    xl, yl, rl = (local(t, rank, world) for t in (x, y, route))
    model(xl, yl, rl).backward()
    torch.optim.SGD(pieces, lr=0.0).zero_grad()  # the optimizer's view: model.zero_grad() sees full tensors here
    ref.zero_grad()
    for m in (ref, model):
        m.blocks[1].requires_grad_(True)  # on the full tensors the gathered module shows
    model(xl, yl, rl).backward()
    ref(x, y, route).backward()
    fc_weight = pieces[[n for n, _ in ref.named_parameters()].index("blocks.1.fc.weight")]
    return fc_weight.grad is not None, _grad_errors(pieces, ref)


def test_unfreeze_while_kept_gathered(pool):
    has_grad, err = pool.run(kept_gathered_case, 2)[0]
    assert has_grad and err < 1e-5


def rebind_case(rank, world, group, path):
    import io

    _, model = make("plain")
    shard(model, group)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)  # per-rank pieces, plain tensors in the file
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    model.load_state_dict(loaded)
    try:
        model.to_empty(device="cpu")  # same dtype and device, new storage
        return "no error", sorted(loaded)[:1]
    except RuntimeError as e:
        return str(e), sorted(loaded)[:1]


def test_per_rank_save_load_and_rebinding_transforms(pool, tmp_path):
    message, keys = pool.run(rebind_case, 2, str(tmp_path))[0]
    assert keys == ["blocks.0.fc.bias"]
    assert "detaching them from their shards" in message
