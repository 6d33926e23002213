"""The optimizers' pure logic on one process: code maps, AdamW8bit against a per-block loop, Muon's exchange
plan against brute force, the Muon / AdamW split, and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import scalestack as ss
from scalestack.models.gpt import GPT, GPTConfig
from scalestack.optim import AdamW8bit, Muon, muon_param_groups
from scalestack.optim.muon_exchange import Matrix, plan_exchange
from scalestack.optim.quantization import code_map, dequantize, max_relative_gap, quantize

# --- code maps ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["signed", "unsigned_nonzero"])
def test_quantize_picks_the_nearest_code(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g) * torch.logspace(-6, 0, 32)  # magnitudes over six decades
    if kind == "unsigned_nonzero":
        x = x.abs()
    codes, scales = quantize(x, kind)
    assert codes.dtype == torch.uint8 and torch.equal(scales, x.abs().amax(dim=1))
    table = code_map(kind)
    brute = (x[..., None] / scales[:, None, None] - table).abs().argmin(dim=-1)  # nearest, brute force
    got = codes.long()
    # ties (a value exactly between two codes) may go either way; nothing else may differ
    normalized = x / scales[:, None]
    same_distance = (normalized - table[got]).abs() == (normalized - table[brute]).abs()
    assert bool(same_distance.all())


@pytest.mark.parametrize("kind, bound", [("signed", 0.0704), ("unsigned_nonzero", 0.0352)])
def test_quantization_error_within_documented_bound(kind, bound):
    """Values within a decade of their block's largest magnitude keep their value to 7.0% (signed) and
    3.5% (unsigned); the largest is exact."""
    assert max_relative_gap(kind) <= bound
    g = torch.Generator().manual_seed(1)
    x = torch.rand(100, 256, generator=g) * 0.9 + 0.1
    if kind == "signed":
        x = x * torch.randint(0, 2, x.shape, generator=g).mul(2).sub(1)
    back = dequantize(*quantize(x, kind), kind)
    assert float(((back - x).abs() / x.abs()).max()) <= bound
    big = x.abs().argmax(dim=1)
    assert torch.equal(back.gather(1, big[:, None]), x.gather(1, big[:, None]))


def test_second_moment_never_rounds_to_zero():
    v = torch.tensor([[1.0, 1e-12, 0.0, 3e-9]])
    back = dequantize(*quantize(v, "unsigned_nonzero"), "unsigned_nonzero")
    assert bool((back > 0).all())


# --- AdamW8bit against a straightforward per-block loop ------------------------------------------------------


def reference_adamw8bit(p, grads, lr, betas, eps, wd, B):
    """Per block, one at a time: dequantize, AdamW in fp32, quantize again (the documented algorithm)."""
    p = p.detach().clone().reshape(-1)
    blocks = math.ceil(p.numel() / B)
    state = [dict(m=(torch.zeros(1, B, dtype=torch.uint8), torch.zeros(1)),
                  v=(torch.zeros(1, B, dtype=torch.uint8), torch.zeros(1))) for _ in range(blocks)]  # fmt: skip
    for step, grad in enumerate(grads, 1):
        bc1 = 1 - torch.pow(betas[0], torch.tensor(float(step), dtype=torch.float64))
        bc2 = 1 - torch.pow(betas[1], torch.tensor(float(step), dtype=torch.float64))
        step_size, bc2_sqrt = (lr / bc1).float(), bc2.sqrt().float()
        g_flat = grad.reshape(-1)
        p.mul_(1 - lr * wd)
        for b in range(blocks):
            lo, hi = b * B, min((b + 1) * B, p.numel())
            g = torch.zeros(1, B)
            g[0, : hi - lo] = g_flat[lo:hi]
            m = dequantize(*state[b]["m"], "signed")
            v = dequantize(*state[b]["v"], "unsigned_nonzero")
            m = m * betas[0] + g * (1 - betas[0])
            v = v * betas[1] + g * g * (1 - betas[1])
            update = m / (v.sqrt() / bc2_sqrt + eps) * -step_size
            p[lo:hi] += update[0, : hi - lo]
            state[b] = dict(m=quantize(m, "signed"), v=quantize(v, "unsigned_nonzero"))
    return p, state


def test_adamw8bit_matches_per_block_loop():
    torch.manual_seed(0)
    B = 32
    w = nn.Parameter(torch.randn(7, 45))  # 315 elements: 9 full blocks and a short one
    grads = [torch.randn(7, 45) for _ in range(6)]
    opt = AdamW8bit([w], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, block_size=B)
    expected, state = reference_adamw8bit(w, grads, 1e-2, (0.9, 0.99), 1e-8, 0.1, B)
    for g in grads:
        w.grad = g
        opt.step()
    assert torch.equal(w.detach().reshape(-1), expected)
    s = opt.state[w]
    assert torch.equal(s["exp_avg_codes"].reshape(-1), torch.cat([b["m"][0].reshape(-1) for b in state])[:315])
    assert torch.equal(s["exp_avg_sq_scales"], torch.cat([b["v"][1] for b in state]))


def test_adamw8bit_close_to_adamw_and_two_bytes_per_parameter():
    torch.manual_seed(0)
    a = nn.Linear(256, 256)
    b = copy.deepcopy(a)
    start = [p.detach().clone() for p in a.parameters()]
    opt8 = AdamW8bit(a.parameters(), lr=1e-3)
    opt32 = torch.optim.AdamW(b.parameters(), lr=1e-3)
    for _ in range(20):
        g = [torch.randn_like(p) for p in a.parameters()]
        for p, q, gi in zip(a.parameters(), b.parameters(), g):
            p.grad, q.grad = gi.clone(), gi.clone()
        opt8.step()
        opt32.step()
    # The 8-bit moments' rounding (<= 7% for the first, 3.5% for the second moment near their block's
    # largest value) leaves the total movement of 20 steps within 3% of AdamW's (seen: 1.6%).
    for p, q, p0 in zip(a.parameters(), b.parameters(), start):
        ours, theirs = p.detach() - p0, q.detach() - p0
        assert ((ours - theirs).norm() / theirs.norm()).item() < 0.03
    blocks = opt8._blocks[0]  # what is allocated, padding included (opt.state holds views without it)
    arrays = (blocks.m_codes, blocks.v_codes, blocks.m_scales, blocks.v_scales)
    state_bytes = sum(t.numel() * t.element_size() for t in arrays)
    n = sum(p.numel() for p in a.parameters())
    assert state_bytes <= n * (2 + 8 / 256) + 2 * 256  # codes, scales, the bias's padded last block


def test_adamw8bit_skips_parameters_without_gradients():
    a, b = nn.Parameter(torch.ones(10)), nn.Parameter(torch.ones(10))
    opt = AdamW8bit([a, b], lr=0.1, block_size=4)
    a.grad = torch.ones(10)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(10)) and float(opt.state[b]["step"]) == 0
    assert float(opt.state[a]["step"]) == 1 and bool((a.detach() < 1).all())


# --- bad input ----------------------------------------------------------------------------------------------


def test_bad_input_errors():
    with pytest.raises(ValueError, match="block_size"):
        AdamW8bit([nn.Parameter(torch.ones(3))], block_size=0)
    with pytest.raises(ValueError, match="betas"):
        AdamW8bit([nn.Parameter(torch.ones(3))], betas=(0.9, 1.5))
    with pytest.raises(ValueError, match=r"'bias'.*shape \[4\].*AdamW"):
        Muon(nn.Linear(3, 4).named_parameters())
    with pytest.raises(ValueError, match="ns_steps"):
        Muon([nn.Parameter(torch.ones(3, 3))], ns_steps=0)
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        Muon([nn.Parameter(torch.ones(3, 3))], adjust_lr_fn="bogus")


def test_refused_param_groups_leave_the_optimizer_as_it_was():
    good, bad = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4, dtype=torch.int64), requires_grad=False)
    opt = AdamW8bit([good], block_size=4)
    with pytest.raises(TypeError, match="real floats"):
        opt.add_param_group({"params": [bad]})
    with pytest.raises(ValueError, match="betas"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3))], "betas": (0.9, 1.0)})
    later = nn.Parameter(torch.ones(4))
    opt.add_param_group({"params": [later], "lr": 0.1})
    assert len(opt.param_groups) == len(opt._blocks) == 2
    good.grad, later.grad = torch.ones(4), torch.ones(4)
    opt.step()
    assert float(opt.state[later]["step"]) == 1 and bool((later.detach() < 1).all())
    muon = Muon([nn.Parameter(torch.ones(3, 3))])
    with pytest.raises(ValueError, match="lr"):
        muon.add_param_group({"params": [nn.Parameter(torch.ones(3, 3))], "lr": -1.0})
    assert len(muon.param_groups) == 1


def test_mismatched_state_dicts_are_refused_before_any_change():
    small, big = nn.Parameter(torch.ones(4, 8)), nn.Parameter(torch.ones(4, 9))
    saved = AdamW8bit([small], block_size=8).state_dict()
    target = AdamW8bit([big], block_size=8)
    before = {k: v.clone() for k, v in target.state[big].items()}
    with pytest.raises(ValueError, match="exp_avg_codes of parameter #0.*expected \\[4, 9\\]"):
        target.load_state_dict(saved)
    assert all(torch.equal(before[k], target.state[big][k]) for k in before)
    wrong_dtype = copy.deepcopy(saved)
    wrong_dtype["state"][0]["exp_avg_codes"] = wrong_dtype["state"][0]["exp_avg_codes"].float()
    with pytest.raises(ValueError, match="exp_avg_codes .* torch.float32, expected torch.uint8"):
        AdamW8bit([small], block_size=8).load_state_dict(wrong_dtype)
    with pytest.raises(ValueError, match="block_size 8 .* uses 16"):
        AdamW8bit([small], block_size=16).load_state_dict(saved)
    with pytest.raises(ValueError, match="lacks"):
        AdamW8bit([small], block_size=8).load_state_dict({"state": {0: {"step": torch.tensor(1.0)}},
                                                          "param_groups": saved["param_groups"]})  # fmt: skip
    m = Muon([small])
    small.grad = torch.ones(4, 8)
    m.step()
    with pytest.raises(ValueError, match="momentum_buffer .* expected \\[4, 9\\]"):
        Muon([big]).load_state_dict(m.state_dict())
    with pytest.raises(ValueError, match="2 parameters"):
        Muon([small]).load_state_dict(Muon([small, big]).state_dict())


# --- Muon's exchange plan ------------------------------------------------------------------------------------


def brute_force_exchange(matrices, ranges, world):
    """Simulate every rank's two all-to-alls with the plans and check each owner sees its matrices whole."""
    plans = [plan_exchange(matrices, ranges, r, world) for r in range(world)]
    numel = {p: max(e for _, e in rs) for p, rs in enumerate(ranges)}
    globals_ = {p: torch.arange(n, dtype=torch.float64) + 1000 * p for p, n in numel.items()}
    pieces = [{p: globals_[p][ranges[p][r][0] : ranges[p][r][1]] for p in numel} for r in range(world)]
    sends = [torch.cat([pieces[r][s.param][s.lo : s.hi] for s in plans[r].send_segments] or [torch.zeros(0)])
             for r in range(world)]  # fmt: skip
    chunks = [list(sends[r].split(plans[r].send_splits)) for r in range(world)]
    for me, plan in enumerate(plans):
        received = torch.cat([chunks[src][me] for src in range(world)])
        parts = received.split(plan.recv_sizes)
        owned = torch.cat([parts[i] for i in plan.assemble]) if plan.assemble else torch.zeros(0)
        expected = [globals_[m.param][m.first : m.first + m.numel]
                    for j, m in enumerate(matrices) if plan.owners[j] == me]  # fmt: skip
        assert sorted(owned.tolist()) == sorted(torch.cat(expected).tolist() if expected else [])
    return plans


def test_exchange_plan_brings_every_matrix_whole_to_its_owner():
    g = torch.Generator().manual_seed(0)
    for world in (2, 3, 5):
        shapes = [(6, 4), (4, 6), (3, 5, 2), (8, 8)]
        sizes = [math.prod(s) for s in shapes]
        total = sum(sizes)
        cuts = sorted(torch.randint(0, total + 1, (world - 1,), generator=g).tolist())
        bounds = [0, *cuts, total]
        ranges, offset = [], 0
        for n in sizes:
            ranges.append([(max(bounds[r] - offset, 0), min(bounds[r + 1] - offset, n)) for r in range(world)])
            ranges[-1] = [(a, b) if a < b else (0, 0) for a, b in ranges[-1]]
            offset += n
        matrices = []
        for p, s in enumerate(shapes):
            rows, cols = s[-2:]
            for e in range(math.prod(s[:-2])):
                matrices.append(Matrix(p, e * rows * cols, rows, cols, (rows, cols, 0)))
        plans = brute_force_exchange(matrices, ranges, world)
        assert len({tuple(p.owners) for p in plans}) == 1  # every rank computes the same owners


def test_whole_matrices_stay_where_they_are():
    matrices = [Matrix(p, 0, 4, 4, (4, 4, 0)) for p in range(4)]
    ranges = [[(0, 16) if r == p % 2 else (0, 0) for r in range(2)] for p in range(4)]
    plan = plan_exchange(matrices, ranges, 0, 2)
    assert plan.owners == [0, 1, 0, 1] and not plan.needs_exchange


def test_owners_balance_newton_schulz_cost():
    matrices = [Matrix(p, 0, 8, 8, (8, 8, 0)) for p in range(8)]
    ranges = [[(0, 32), (32, 64)] for _ in range(8)]  # every matrix split over both ranks
    plan = plan_exchange(matrices, ranges, 0, 2)
    assert sorted(plan.owners) == [0, 0, 0, 0, 1, 1, 1, 1]


# --- the Muon / AdamW split -----------------------------------------------------------------------------------


def test_muon_param_groups_on_gpt():
    model = GPT(GPTConfig(n_layer=2))
    muon, adamw = muon_param_groups(model)
    muon_names = {n for n, _ in muon}
    assert muon_names == {f"layers.{i}.{m}.weight" for i in range(2)
                          for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}  # fmt: skip
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "layers.0.ln_1.bias"} <= {n for n, _ in adamw}
    assert len(muon) + len(adamw) == len(list(model.parameters()))


def test_muon_param_groups_keeps_inner_output_layers_and_leaves_convolutions():
    class Layer(nn.Module):  # BERT's names: a block's "output" sub-module is not the model's head
        def __init__(self):
            super().__init__()
            self.output = nn.Linear(8, 8)
            self.conv = nn.Conv1d(8, 8, 3)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.ModuleList([Layer()])
            self.classifier = nn.Linear(8, 2)

    muon, adamw = muon_param_groups(Model())
    assert [n for n, _ in muon] == ["encoder.0.output.weight"]
    assert {"classifier.weight", "encoder.0.conv.weight"} <= {n for n, _ in adamw}


def test_unsharded_muon_equals_torch_muon_in_bf16():
    torch.manual_seed(0)
    a = nn.Linear(16, 24, bias=False)
    b = copy.deepcopy(a)
    ours = Muon(a.parameters(), lr=0.02, ns_dtype=torch.bfloat16)
    theirs = torch.optim.Muon(b.parameters(), lr=0.02)
    for _ in range(3):
        g = torch.randn(24, 16)
        a.weight.grad, b.weight.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert torch.allclose(a.weight, b.weight, atol=1e-6, rtol=0)  # same bf16 arithmetic


def test_granularity_value():
    assert AdamW8bit.granularity(64) == ss.ElementBlocks(64)
    layout = ss.plan([(10, 30), (7,)], 4, ss.ElementBlocks(64))
    layout.check()
    for r in range(4):
        for piece in layout.pieces(r):
            assert piece.numel == 0 or piece.start % 64 == 0


@pytest.mark.parametrize("kind", ["signed", "unsigned_nonzero"])
def test_fast_code_search_equals_binary_search_at_every_boundary(kind):
    """The bit-lookup search against torch.bucketize over the exact boundaries, on each boundary, the floats
    just beside it, every code, and values over nine decades."""
    table = code_map(kind)
    bounds = (table[1:] + table[:-1]) / 2
    g = torch.Generator().manual_seed(2)
    x = torch.randn(500, 256, generator=g) * torch.logspace(-9, 0, 256)
    x = x / x.abs().amax(dim=1, keepdim=True)
    edges = [bounds, torch.nextafter(bounds, torch.tensor(2.0)), torch.nextafter(bounds, torch.tensor(-2.0)), table]
    x = torch.cat([x.reshape(-1), *edges, torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30])])
    if kind == "unsigned_nonzero":
        x = x.abs()
    codes, _ = quantize(x.view(1, -1), kind)
    expected = torch.bucketize(x / x.abs().max(), bounds)
    assert torch.equal(codes.view(-1).long(), expected)
