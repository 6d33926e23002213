"""Muon and AdamW8bit on sharded models at W = 1..4, against references written here.

The model has the shapes the optimizers care about: an embedding and a head (AdamW's), norms and biases,
square and rectangular matrices (tall and wide) and a 3-D expert stack ``[E, hidden, d]``. Gradients are
set directly from a seeded generator, so every W sees the same ones; "trained" tests run real backwards.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import scalestack as ss
from scalestack.fsdp import collectives as comm
from scalestack.optim import AdamW8bit, Muon, muon_param_groups

pytestmark = pytest.mark.timeout(300)

D, HIDDEN, EXPERTS, VOCAB = 24, 40, 3, 50
NS = dict(coefficients=(3.4445, -4.7750, 2.0315), steps=5, eps=1e-7)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)  # [72, 24]: tall
        self.proj = nn.Linear(D, D, bias=False)  # square
        self.experts = nn.Parameter(torch.randn(EXPERTS, HIDDEN, D) / math.sqrt(D))  # a stack of tall matrices
        self.out = nn.Linear(HIDDEN, D)  # [24, 40]: wide

    def forward(self, h):
        a = self.proj(torch.tanh(self.qkv(self.norm(h))[..., :D]))
        e = torch.einsum("btd,ehd->bteh", h, self.experts)
        return h + a + self.out(F.gelu(e).mean(dim=2))


class Net(nn.Module):
    def __init__(self, n_blocks: int = 2):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(Block() for _ in range(n_blocks))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, x, y):
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)
        return F.cross_entropy(self.head(h).view(-1, VOCAB), y.view(-1))


def build(group, granularity="element", n_blocks: int = 2, seed: int = 0) -> tuple[Net, Net]:
    """(sharded model, unsharded reference), equal at the start."""
    torch.manual_seed(seed)
    ref = Net(n_blocks)
    torch.manual_seed(seed)
    model = Net(n_blocks)
    if group is not None:
        for b in model.blocks:
            ss.fully_shard(b, mesh=group, granularity=granularity)
        ss.fully_shard(model, mesh=group, granularity=granularity)
    return model, ref


def global_grads(ref: nn.Module, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {name: torch.randn(p.shape, generator=g) for name, p in ref.named_parameters()}


def set_grads(model: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        full = grads[name]
        if isinstance(model, ss.FSDPModule):
            info = ss.shard_info(p)
            p.grad = full.reshape(-1)[info.start : info.end].view(p.shape).clone()
        else:
            p.grad = full.clone()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# --- the references ---------------------------------------------------------------------------------------


def ns_reference(G: torch.Tensor, coefficients, steps: int, eps: float) -> torch.Tensor:
    """torch.optim.Muon's Newton-Schulz for one matrix, written as torch writes it (addmm), in fp32.

    fp32 Newton-Schulz is itself ~1e-6 from the exact result, so a 1e-6 comparison needs the same
    formulation: ``a X + (b A + c A^2) X`` spelled with other operations already differs by ~8e-7."""
    a, b, c = coefficients
    X = G.float()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / X.norm().clamp(min=eps)
    for _ in range(steps):
        A = X @ X.T
        X = torch.addmm(X, torch.addmm(A, A, A, beta=b, alpha=c), X, beta=a)
    return X.T if tall else X


class ReferenceMuon:
    """torch.optim.Muon's update, one matrix at a time in fp32; 3-D stacks as their matrices."""

    def __init__(self, params: list[nn.Parameter], lr: float, weight_decay: float, momentum: float = 0.95):
        self.params, self.lr, self.wd, self.mu = params, lr, weight_decay, momentum
        self.bufs = [torch.zeros_like(p) for p in params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p, buf in zip(self.params, self.bufs):
            g = p.grad
            buf.lerp_(g, 1 - self.mu)  # as torch.optim.Muon: NS amplifies even rounding differences ~450x
            u = g.lerp(buf, self.mu)
            rows, cols = p.shape[-2:]
            o = torch.stack([ns_reference(m, **NS) for m in u.reshape(-1, rows, cols)]).view(p.shape)
            p.mul_(1 - self.lr * self.wd)
            p.add_(o, alpha=-self.lr * math.sqrt(max(1, rows / cols)))


def muon_names(model: nn.Module) -> set[str]:
    return {n for n, _ in muon_param_groups(model)[0]}


# --- Muon -------------------------------------------------------------------------------------------------


def update_errors(model, ref, opt, ref_opt, names, steps=3):
    """Per step and parameter: relative error of the sharded update against the reference's, given the
    same gradients; and the all-to-alls (count, bytes sent) of each sharded step."""
    errors, counts = [], []
    for step in range(steps):
        before = {k: v.clone() for k, v in ss.full_state_dict(model).items()}
        ref_before = {k: v.clone() for k, v in ref.state_dict().items()}
        grads = global_grads(ref, step)
        set_grads(model, grads)
        set_grads(ref, grads)
        ss.reset_traffic()
        opt.step()
        t = ss.traffic()
        counts.append((t.all_to_alls, t.all_to_all_bytes))
        ref_opt.step()
        after, ref_after = ss.full_state_dict(model), ref.state_dict()
        errors.append({k: rel(after[k] - before[k], ref_after[k] - ref_before[k]) for k in names})
    return errors, counts


def muon_given_grads_case(rank, world, group, granularity):
    model, ref = build(group, granularity)
    names = muon_names(ref)
    opt = Muon([p for n, p in model.named_parameters() if n in names], lr=0.02, weight_decay=0.1)
    ref_opt = ReferenceMuon([p for n, p in ref.named_parameters() if n in names], lr=0.02, weight_decay=0.1)
    return update_errors(model, ref, opt, ref_opt, names)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_muon_update_matches_fp32_reference(pool, world):
    errors, counts = pool.run(muon_given_grads_case, world, "element")[0]
    worst = max((e for step in errors for e in step.items()), key=lambda kv: kv[1])
    assert worst[1] < 1e-6, worst
    expected = 0 if world == 1 else 2  # one all-to-all to the owners, one back; none alone
    assert all(n == expected for n, _ in counts), counts
    assert (world == 1) == all(b == 0 for _, b in counts), counts


def test_muon_whole_matrix_layout_moves_nothing(pool):
    errors, counts = pool.run(muon_given_grads_case, 3, "matrix")[0]
    worst = max((e for step in errors for e in step.items()), key=lambda kv: kv[1])
    assert worst[1] < 1e-6, worst
    assert counts == [(0, 0)] * 3


def collectives_case(rank, world, group, n_blocks):
    model, ref = build(group, "element", n_blocks=n_blocks)
    names = muon_names(ref)
    opt = Muon([p for n, p in model.named_parameters() if n in names])
    set_grads(model, global_grads(ref, 0))
    with comm.record_collectives() as log:
        opt.step()
    return len(names) + 2 * n_blocks, [c.kind for c in log]  # matrices: experts count 3 each (2 + 3 per block)


def test_muon_collectives_do_not_grow_with_matrices(pool):
    few_matrices, few = pool.run(collectives_case, 3, 1)[0]
    many_matrices, many = pool.run(collectives_case, 3, 10)[0]
    assert (few_matrices, many_matrices) == (6, 60)  # 4 and 40 parameters (an expert stack holds 3 matrices)
    assert few == many == ["all_to_all", "all_to_all"]


def muon_bf16_case(rank, world, group):
    """bf16 Newton-Schulz against torch.optim.Muon on the unsharded model (2-D matrices: torch's domain)."""
    model, ref = build(group, "element")
    names = {n for n in muon_names(ref) if not n.endswith("experts")}
    opt = Muon([p for n, p in model.named_parameters() if n in names], lr=0.02, ns_dtype=torch.bfloat16)
    ref_opt = torch.optim.Muon([p for n, p in ref.named_parameters() if n in names], lr=0.02)
    errors, _ = update_errors(model, ref, opt, ref_opt, names)
    return [max(step.values()) for step in errors]


@pytest.mark.parametrize("world", [2, 3])
def test_muon_bf16_matches_torch_muon(pool, world):
    errors = pool.run(muon_bf16_case, world)[0]
    # bf16 has 8 bits of mantissa (relative rounding 2^-9 = 2e-3); after five iterations the updates of
    # the two implementations (same algorithm, batched vs one matrix) agree within 1e-2 (seen: ~3e-3).
    assert max(errors) < 1e-2, errors


def train_case(rank, world, group, which, steps=10):
    """``which`` in {"muon", "adamw8bit"}: trained on the same global batches at every W."""
    model, ref = build(group, AdamW8bit.granularity(16) if which == "adamw8bit" else "element")
    if which == "muon":
        names = muon_names(ref)
        opts = [
            Muon([p for n, p in model.named_parameters() if n in names], lr=0.02, weight_decay=0.1),
            torch.optim.AdamW([p for n, p in model.named_parameters() if n not in names], lr=3e-3),
        ]
        ref_opts = [
            ReferenceMuon([p for n, p in ref.named_parameters() if n in names], lr=0.02, weight_decay=0.1),
            torch.optim.AdamW([p for n, p in ref.named_parameters() if n not in names], lr=3e-3),
        ]
    else:
        opts, ref_opts = [AdamW8bit(model.parameters(), lr=3e-3, block_size=16)], []
    g = torch.Generator().manual_seed(7)
    losses, ref_losses = [], []
    batch = 12  # divides by every W in 1..4
    for _ in range(steps):
        x = torch.randint(VOCAB, (batch, 8), generator=g)
        y = torch.randint(VOCAB, (batch, 8), generator=g)
        n = batch // world
        loss = model(x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n])
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad()
        reduced = loss.detach().clone()
        dist.all_reduce(reduced, group=group)
        losses.append(reduced.item() / world)
        if ref_opts:
            ref_loss = ref(x, y)
            ref_loss.backward()
            for o in ref_opts:
                o.step()
                o.zero_grad()
            ref_losses.append(ref_loss.item())
    full = ss.full_state_dict(model)
    errors = {k: rel(full[k], v) for k, v in ref.state_dict().items()} if ref_opts else {}
    return losses, ref_losses, errors


@pytest.mark.parametrize("world", [2, 4])
def test_muon_trained_matches_unsharded_reference(pool, world):
    losses, ref_losses, errors = pool.run(train_case, world, "muon")[0]
    worst = max(errors.items(), key=lambda kv: kv[1])
    assert worst[1] < 1e-4, worst
    assert all(abs(a - b) < 1e-4 * abs(b) for a, b in zip(losses, ref_losses)), (losses, ref_losses)
    assert losses[-1] < losses[0]


def test_adamw8bit_trained_losses_match_one_rank(pool):
    one = pool.run(train_case, 1, "adamw8bit")[0][0]
    for world in (2, 4):
        losses = pool.run(train_case, world, "adamw8bit")[0][0]
        assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(losses, one)), (world, losses, one)
    assert one[-1] < one[0]


# --- AdamW8bit: bitwise the same at every W -----------------------------------------------------------------


def adamw8bit_state_case(rank, world, group, steps=10):
    """Every rank's pieces of parameters, codes and scales after ``steps`` steps of the same gradients."""
    model, ref = build(group, AdamW8bit.granularity(16))
    opt = AdamW8bit(model.named_parameters(), lr=1e-2, weight_decay=0.1, block_size=16)
    for step in range(steps):
        set_grads(model, global_grads(ref, step))
        opt.step()
    out = {}
    for name, p in model.named_parameters():
        info, state = ss.shard_info(p), opt.state[p]
        out[name] = (info.start, info.end, p.detach().clone(), {k: v.clone() for k, v in state.items()})
    return out


def assemble(per_rank: list[dict], name: str, key: str | None) -> torch.Tensor:
    """One global flat tensor from every rank's pieces (scales: one per block of the piece)."""
    pieces = sorted((r[name] for r in per_rank), key=lambda t: t[0])
    parts = []
    for start, end, param, state in pieces:
        if end > start:
            parts.append(param.reshape(-1) if key is None else state[key].reshape(-1))
    return torch.cat(parts)


def test_adamw8bit_is_bitwise_the_same_at_every_world_size(pool):
    runs = {w: pool.run(adamw8bit_state_case, w) for w in (1, 2, 3, 4)}
    names = list(runs[1][0])
    for w in (2, 3, 4):
        for name in names:
            for key in (None, "exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales"):
                a, b = assemble(runs[1], name, key), assemble(runs[w], name, key)
                assert torch.equal(a, b), (w, name, key)
        steps = {float(runs[w][r][n][3]["step"]) for r in range(w) for n in names}
        assert steps == {10.0}


def cut_block_case(rank, world, group):
    model, _ = build(group, "element")  # element cuts: some piece starts inside a 256-element block
    try:
        AdamW8bit(model.named_parameters())
    except ValueError as e:
        return str(e)
    return None


def test_adamw8bit_refuses_a_layout_that_cuts_a_block(pool):
    messages = pool.run(cut_block_case, 3)
    assert messages[0] is not None and len(set(messages)) == 1, messages  # every rank raises (none would hang)
    assert "AdamW8bit.granularity(256)" in messages[0] and "'" in messages[0]  # names the parameter and the fix


def state_dict_case(rank, world, group):
    """Save after 3 steps, load into a fresh optimizer, continue: the same as not stopping."""
    results = []
    for which in ("adamw8bit", "muon"):
        model, ref = build(group, AdamW8bit.granularity(16))
        names = muon_names(ref)

        def make(m, which=which, names=names):
            if which == "muon":
                return Muon([p for n, p in m.named_parameters() if n in names], lr=0.02)
            return AdamW8bit(m.parameters(), lr=1e-2, block_size=16)

        opt = make(model)
        for step in range(3):
            set_grads(model, global_grads(ref, step))
            opt.step()
        saved = copy.deepcopy(opt.state_dict())  # as if written to disk: torch.load gives new tensors
        fresh = make(model)
        fresh.load_state_dict(saved)
        same_state = all(torch.equal(fresh.state[p][k], opt.state[p][k]) for p in opt.state for k in opt.state[p])
        set_grads(model, global_grads(ref, 3))
        snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        continued = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(snapshot[n])
        fresh.step()
        resumed = {n: p.detach() for n, p in model.named_parameters()}
        results.append((which, same_state, all(torch.equal(continued[n], resumed[n]) for n in continued)))
    return results


def frozen_and_mismatched_case(rank, world, group):
    """A parameter without a gradient is left alone (its zeros still travel); ranks that pass different
    parameters get a clear error, not a hang."""
    model, ref = build(group, "element")
    names = sorted(muon_names(ref))
    params = dict(model.named_parameters())
    opt = Muon([params[n] for n in names], lr=0.02)
    set_grads(model, global_grads(ref, 0))
    frozen = params[names[0]]
    frozen.grad = None
    before = frozen.detach().clone()
    opt.step()
    untouched = torch.equal(before, frozen.detach()) and "momentum_buffer" not in opt.state[frozen]
    mine = names if rank == 0 else names[1:]
    wrong = Muon([params[n] for n in mine])
    try:
        wrong.step()
        error = None
    except ValueError as e:
        error = str(e)
    return untouched, error


def test_muon_skips_missing_gradients_and_refuses_mismatched_ranks(pool):
    for untouched, error in pool.run(frozen_and_mismatched_case, 3):
        assert untouched
        assert error is not None and "different parameters" in error


def test_state_dict_round_trip_resumes_exactly(pool):
    for rank_results in pool.run(state_dict_case, 2):
        for which, same_state, same_step in rank_results:
            assert same_state and same_step, which
