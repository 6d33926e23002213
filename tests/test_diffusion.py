"""Step caches around a DiT's block stack: the properties SenCache and its baselines must keep, each against
an independent reference (the uncached model, the DiT's own embed/head, analytic flows, brute-force metrics)."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

if importlib.util.find_spec("sklearn") is None:  # not imported: it would set KMP_* for every later subprocess
    pytest.skip("the digits ship with scikit-learn", allow_module_level=True)

from scalestack.diffusion import (  # noqa: E402
    Calibration,
    FixedInterval,
    MagCache,
    NoCache,
    SenCache,
    StepCache,
    TeaCache,
    apply_step_cache,
    apply_step_cache_diffusers,
    calibrate,
    calibrate_diffusers,
    frechet_distance,
    psnr,
    sample,
    ssim,
    timesteps,
)
from scalestack.diffusion.data import load_digits  # noqa: E402
from scalestack.models.dit import DiT, DiTConfig  # noqa: E402

SHAPE = (1, 16, 16)
LABELS = torch.arange(6) % 10


def perturbed_dit(seed: int = 0) -> DiT:
    """A small DiT whose gates are not zero (adaLN-Zero starts as the identity), so every block matters."""
    torch.manual_seed(seed)
    model = DiT(DiTConfig(width=32, depth=3, heads=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def dit():
    return perturbed_dit()


@pytest.fixture(scope="module")
def calibration(dit):
    images, labels = load_digits("held_out")
    return calibrate(dit, images, labels, null_class=dit.null_class, num_steps=20, samples=8, seed=0)


def generate(model, steps=10, solver="euler", seed=1, labels=LABELS):
    return sample(model, labels, steps, shape=SHAPE, guidance=2.0, null_class=10, solver=solver, seed=seed)


def with_cache(model, cache, **kwargs):
    stack = apply_step_cache(model, cache)
    try:
        return generate(model, **kwargs), stack.last
    finally:
        stack.remove()


def all_caches(calibration, knob: float, k: int = 3) -> list[StepCache]:
    return [TeaCache(knob, calibration.teacache_coefficients), MagCache(knob, calibration, max_skips=k),
            SenCache(knob, calibration, max_skips=k)]  # fmt: skip


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_no_skip_settings_reproduce_the_uncached_output_bitwise(dit, calibration, solver):
    reference = generate(dit, solver=solver)  # no hooks at all
    never = [NoCache(), FixedInterval(1), *all_caches(calibration, 0.0),
             MagCache(1e9, calibration, max_skips=0), SenCache(1e9, calibration, max_skips=0)]  # fmt: skip
    for cache in never:
        out, stats = with_cache(dit, cache, solver=solver)
        assert torch.equal(out, reference), type(cache).__name__
        assert stats.compute_fraction == 1.0
    out, stats = with_cache(dit, SenCache(0.5, calibration), solver=solver)
    assert stats.compute_fraction < 1 and not torch.equal(out, reference)  # the knob does something


def test_a_larger_threshold_never_skips_fewer_steps(dit, calibration):
    for make in (lambda e: TeaCache(e, calibration.teacache_coefficients), lambda e: MagCache(e, calibration),
                 lambda e: SenCache(e, calibration)):  # fmt: skip
        costs = [with_cache(dit, make(e), steps=16)[1].computed_rows for e in (0, 0.03, 0.1, 0.3, 1, 10)]
        assert costs == sorted(costs, reverse=True) and costs[-1] < costs[0], costs


def longest_skip_run(decisions: list[torch.Tensor]) -> int:
    computed = torch.stack(decisions)  # (calls, rows)
    longest = 0
    for row in computed.T.tolist():
        run = 0
        for c in row:
            run = 0 if c else run + 1
            longest = max(longest, run)
    return longest


@pytest.mark.parametrize("k", [1, 2, 4])
def test_the_k_cap_holds(dit, calibration, k):
    for cache in (MagCache(1e9, calibration, max_skips=k, retention=0), SenCache(1e9, calibration, max_skips=k)):
        _, stats = with_cache(dit, cache, steps=25)
        assert longest_skip_run(stats.decisions) == k, type(cache).__name__


def test_the_conditional_branch_decides_for_both(dit, calibration):
    split = False
    for eps in (0.05, 0.1, 0.2, 0.4):
        _, stats = with_cache(dit, SenCache(eps, calibration, max_skips=5), steps=16)
        computed = torch.stack(stats.decisions)  # rows: 6 conditional, then their 6 unconditional mirrors
        assert torch.equal(computed[:, :6], computed[:, 6:])
        split |= bool((computed[:, :6] != computed[:, :1]).any())
    assert split, "each sample decides alone: some call computes some rows and skips others"


class Recorder(StepCache):
    def __init__(self):
        self.seen = []

    def decide(self, s):
        self.seen.append(s)
        return torch.ones(s.t.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("layout", ["cond_first", "uncond_first"])
def test_the_deciding_rows_are_the_conditional_ones(dit, layout):
    torch.manual_seed(0)
    x, t, y = torch.randn(6, *SHAPE), torch.rand(6), torch.tensor([1, 2, 3, 10, 10, 10])
    recorder = Recorder()
    stack = apply_step_cache(dit, recorder, guidance=layout)
    try:
        with torch.no_grad():
            dit(x, t, y)
    finally:
        stack.remove()
    rows = slice(0, 3) if layout == "cond_first" else slice(3, 6)
    assert torch.equal(recorder.seen[0].latent, x[rows]) and torch.equal(recorder.seen[0].t, t[rows])


def test_the_stricter_early_eps_covers_the_first_fifth_of_the_calls(dit, calibration):
    _, stats = with_cache(dit, SenCache(1e9, calibration, max_skips=100, eps_start=0.0), steps=25)
    computed = torch.stack(stats.decisions)[:, 0].tolist()
    assert computed[:5] == [True] * 5 and not any(computed[5:])  # calls 0-4 of 25 are the first 20%
    _, stats = with_cache(dit, TeaCache(1e9), steps=25)
    computed = torch.stack(stats.decisions)[:, 0].tolist()
    assert computed[0] and computed[-1] and not any(computed[1:-1])  # TeaCache: the first and last always


def test_state_does_not_leak_between_generations_or_step_counts(dit, calibration):
    for cache in (FixedInterval(3), *all_caches(calibration, 0.3)):
        fresh = [with_cache(dit, cache, steps=steps, seed=seed)[0] for steps, seed in ((8, 1), (16, 2))]
        stack = apply_step_cache(dit, cache)
        try:
            runs = [generate(dit, steps=s, seed=seed) for s, seed in ((8, 1), (16, 2), (8, 1), (5, 3), (16, 2))]
        finally:
            stack.remove()
        assert torch.equal(runs[0], fresh[0]) and torch.equal(runs[2], fresh[0]), type(cache).__name__
        assert torch.equal(runs[1], fresh[1]) and torch.equal(runs[4], fresh[1]), type(cache).__name__


def manual_euler(model, steps, seed):
    """A sampler that knows nothing of caches (no reset): the stack must see the new generation itself."""
    x = torch.randn((len(LABELS), *SHAPE), generator=torch.Generator().manual_seed(seed))
    ts = timesteps(steps).tolist()
    with torch.no_grad():
        for t, t_next in zip(ts[:-1], ts[1:]):
            x = x + (t_next - t) * model(x, torch.full((len(LABELS),), t), LABELS)
    return x


def test_an_unannounced_new_generation_starts_fresh(dit, calibration):
    fresh = {}
    for steps in (12, 7):
        stack = apply_step_cache(dit, SenCache(0.3, calibration), guidance=None)
        fresh[steps] = manual_euler(dit, steps, 5)
        stack.remove()
    stack = apply_step_cache(dit, SenCache(0.3, calibration), guidance=None)
    try:
        runs = [manual_euler(dit, steps, 5) for steps in (12, 7, 12)]
        assert stack.last.compute_fraction < 1
    finally:
        stack.remove()
    assert torch.equal(runs[0], fresh[12]) and torch.equal(runs[1], fresh[7]) and torch.equal(runs[2], fresh[12])


class EveryOtherRow(StepCache):
    def decide(self, s):
        return torch.arange(s.t.shape[0]) % 2 == 0


def test_rows_that_compute_run_the_blocks_and_rows_that_skip_add_their_residual(dit):
    torch.manual_seed(3)
    x1, x2 = torch.randn(4, *SHAPE), torch.randn(4, *SHAPE)
    t1, t2, y = torch.full((4,), 0.9), torch.full((4,), 0.8), torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        h1, c1 = dit.embed(x1, t1, y)
        blocks_h1 = h1
        for block in dit.blocks:
            blocks_h1 = block(blocks_h1, c1)
        expected_full = dit(x2, t2, y)
        h2, c2 = dit.embed(x2, t2, y)
        expected_skip = dit.head(h2 + (blocks_h1 - h1), c2)
        stack = apply_step_cache(dit, EveryOtherRow(), guidance=None)
        try:
            dit(x1, t1, y)
            out = dit(x2, t2, y)
        finally:
            stack.remove()
    torch.testing.assert_close(out[0::2], expected_full[0::2], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[1::2], expected_skip[1::2], atol=1e-6, rtol=1e-5)


def test_calibration_is_deterministic_for_a_seed_and_round_trips(dit, calibration, tmp_path):
    images, labels = load_digits("held_out")
    again = calibrate(dit, images, labels, null_class=10, num_steps=20, samples=8, seed=0)
    other = calibrate(dit, images, labels, null_class=10, num_steps=20, samples=8, seed=1)
    calibration.save(tmp_path / "a.json")
    again.save(tmp_path / "b.json")
    other.save(tmp_path / "c.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert (tmp_path / "a.json").read_bytes() != (tmp_path / "c.json").read_bytes()
    loaded = Calibration.load(tmp_path / "a.json")
    assert torch.equal(loaded.jx, calibration.jx) and loaded.teacache_coefficients == calibration.teacache_coefficients
    assert (calibration.jx > 0).all() and (calibration.jt > 0).all() and len(calibration.t) == 20
    with pytest.raises(FileNotFoundError, match="scalestack diffusion calibrate"):
        Calibration.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a calibration file"):
        Calibration.load(tmp_path / "bad.json")


def test_bad_settings_are_named(dit, calibration):
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        SenCache(-1, calibration)
    with pytest.raises(ValueError, match="max_skips"):
        MagCache(0.1, calibration, max_skips=-1)
    with pytest.raises(ValueError, match="interval"):
        FixedInterval(0)
    with pytest.raises(ValueError, match="guidance must be one of"):
        apply_step_cache(dit, NoCache(), guidance="both")
    stack = apply_step_cache(dit, NoCache())
    try:
        with pytest.raises(ValueError, match="already has a step cache"):
            apply_step_cache(dit, NoCache())
        with pytest.raises(ValueError, match="even batch"):
            dit(torch.zeros(3, *SHAPE), torch.ones(3), torch.zeros(3, dtype=torch.long))
    finally:
        stack.remove()
    with pytest.raises(ValueError, match="solver"):
        sample(dit, LABELS, 5, shape=SHAPE, solver="rk4")
    with pytest.raises(ValueError, match="images of shape"):
        dit(torch.zeros(2, 3, 16, 16), torch.ones(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="needs a Calibration"):
        SenCache(0.1, None)
    with pytest.raises(ValueError, match="start_fraction must be a fraction"):
        SenCache(0.1, calibration, start_fraction="x")
    for cache, x, t, error, words in (
        (EveryOtherRow(), torch.zeros(4, *SHAPE), torch.ones(3), ValueError, "3 values for a batch of 4"),
        (WrongShape(), torch.zeros(4, *SHAPE), torch.ones(4), TypeError, "bool tensor of shape"),
    ):
        stack = apply_step_cache(dit, cache, guidance=None)
        try:
            with pytest.raises(error, match=words):
                dit(x, t, torch.zeros(4, dtype=torch.long))
        finally:
            stack.remove()


class WrongShape(StepCache):
    def decide(self, s):
        return torch.ones(1, dtype=torch.bool)


def test_calibration_follows_the_models_dtype_and_refuses_an_untrained_model():
    images, labels = load_digits("held_out")
    double = perturbed_dit().double()
    result = calibrate(double, images, labels, null_class=10, num_steps=4, samples=3)
    assert torch.isfinite(result.jx).all() and result.jx.dtype == torch.float32
    with pytest.raises(ValueError, match="untrained"):
        calibrate(DiT(DiTConfig(width=32, depth=2, heads=2)), images, labels, null_class=10, num_steps=4, samples=3)


# -- the diffusers adapter ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diffusers_dit():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=1,
                                            num_layers=3, sample_size=16, patch_size=2, num_embeds_ada_norm=11,
                                            norm_num_groups=1).eval()  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def diffusers_velocity(model):
    return lambda x, t, y: model(hidden_states=x, timestep=t * 1000, class_labels=y).sample


def uncond_first_sample(model, steps, seed):
    """Euler with guidance batched as most diffusers pipelines do: unconditional rows first."""
    x = torch.randn((len(LABELS), *SHAPE), generator=torch.Generator().manual_seed(seed))
    ts = timesteps(steps).tolist()
    null = torch.full_like(LABELS, 10)
    with torch.no_grad():
        for t, t_next in zip(ts[:-1], ts[1:]):
            tt = torch.full((2 * len(LABELS),), t * 1000)
            v_u, v_c = model(
                hidden_states=torch.cat([x, x]), timestep=tt, class_labels=torch.cat([null, LABELS])
            ).sample.chunk(2)
            x = x + (t_next - t) * (v_u + 2.0 * (v_c - v_u))
    return x


def test_the_diffusers_adapter_reproduces_uncached_output_bitwise_and_skips(diffusers_dit):
    images, labels = load_digits("held_out")
    calibration = calibrate_diffusers(diffusers_dit, images, labels, null_class=10, num_steps=12, samples=6)
    runs = {
        "cond_first": lambda: sample(diffusers_velocity(diffusers_dit), LABELS, 12, shape=SHAPE, guidance=2.0,
                                     null_class=10, seed=4),
        "uncond_first": lambda: uncond_first_sample(diffusers_dit, 12, 4),
    }  # fmt: skip
    for layout, run in runs.items():
        reference = run()
        for cache, skips in ((TeaCache(0.0), False), (SenCache(0.0, calibration), False), (FixedInterval(1), False),
                             (FixedInterval(3), True), (TeaCache(0.5, calibration.teacache_coefficients), True),
                             (SenCache(1.0, calibration), True), (MagCache(0.5, calibration), True)):  # fmt: skip
            stack = apply_step_cache_diffusers(diffusers_dit, cache, guidance=layout)
            try:
                out = run()
            finally:
                stack.remove()
            assert torch.equal(out, reference) != skips, (layout, type(cache).__name__)
            assert (stack.last.compute_fraction < 1) == skips, (layout, type(cache).__name__)
            computed = torch.stack(stack.last.decisions)
            assert torch.equal(computed[:, :6], computed[:, 6:])
            if skips:
                assert psnr(out, reference) > 15, (layout, type(cache).__name__)
        assert torch.equal(run(), reference)  # removed: the model is as it was


# -- the sampler against analytic flows -----------------------------------------------------------------------
def test_euler_and_heun_converge_at_their_orders_on_a_gaussian_flow():
    """Data N(0, s^2): the exact velocity is x (t - (1 - t) s^2) / sigma_t^2 and the flow maps noise z to s z."""
    s = 0.5

    def velocity(x, t, y):
        tt = t.view(-1, 1, 1, 1).double()
        return x * (tt - (1 - tt) * s**2) / ((1 - tt) ** 2 * s**2 + tt**2)

    z = torch.randn((4, *SHAPE), generator=torch.Generator().manual_seed(0)).double()
    errors = {}
    for solver in ("euler", "heun"):
        for n in (16, 32):
            out = sample(velocity, LABELS[:4], n, shape=SHAPE, solver=solver, seed=0).double()
            errors[solver, n] = (out - s * z).abs().max().item()
    assert 1.6 < errors["euler", 16] / errors["euler", 32] < 2.4
    assert errors["heun", 32] < errors["euler", 32] / 10
    assert errors["heun", 16] / errors["heun", 32] > 3


# -- metrics against brute force ------------------------------------------------------------------------------
def test_psnr_and_ssim_match_brute_force():
    g = torch.Generator().manual_seed(0)
    a = torch.rand((3, 1, 12, 12), generator=g) * 2 - 1
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    mse = [float(((a[i].double() - b[i].double()) ** 2).mean()) for i in range(3)]
    assert psnr(a, b) == pytest.approx(np.mean([10 * math.log10(4 / m) for m in mse]), rel=1e-9)
    assert psnr(a, a) == 100.0
    win = np.exp(-((np.arange(7) - 3) ** 2) / (2 * 1.5**2))
    win = np.outer(win, win) / np.outer(win, win).sum()
    values = []
    for i in range(3):
        x, y = a[i, 0].double().numpy(), b[i, 0].double().numpy()
        for r in range(6):
            for c in range(6):
                px, py = x[r : r + 7, c : c + 7], y[r : r + 7, c : c + 7]
                mx, my = (win * px).sum(), (win * py).sum()
                vx, vy = (win * (px - mx) ** 2).sum(), (win * (py - my) ** 2).sum()
                cov = (win * (px - mx) * (py - my)).sum()
                c1, c2 = 0.02**2, 0.06**2
                values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    assert ssim(a, b) == pytest.approx(np.mean(values), rel=1e-9)
    assert ssim(a, a) == pytest.approx(1.0)


def test_frechet_distance_matches_fids_matrix_square_root():
    from scipy import linalg

    g = torch.Generator().manual_seed(0)
    fa = torch.randn((500, 5), generator=g) @ torch.randn((5, 5), generator=g)
    fb = torch.randn((400, 5), generator=g) * 2 + 1
    a, b = fa.double().numpy(), fb.double().numpy()
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(sa @ sb).real  # FID's formula, on well-conditioned covariances
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.trace(root)
    assert frechet_distance(fa, fb) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-6)
    dead = torch.cat([fa, torch.zeros(500, 3)], dim=1)  # dead features: singular covariances stay finite
    assert frechet_distance(dead, dead) == pytest.approx(0.0, abs=1e-6)
