"""``scalestack diffusion``: the DiT trained with scalestack FSDP at W=2 follows the unsharded run, and the
three commands work end to end."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

if importlib.util.find_spec("sklearn") is None:  # not imported: it would set KMP_* for every later subprocess
    pytest.skip("the digits ship with scikit-learn", allow_module_level=True)

from dist_pool import DistPool  # noqa: E402

from scalestack.cli.main import main  # noqa: E402
from scalestack.diffusion.data import load_digits  # noqa: E402
from scalestack.diffusion.flow import flow_matching_loss  # noqa: E402
from scalestack.models.dit import DiT, DiTConfig  # noqa: E402
from scalestack.train.diffusion import DiffusionTrainConfig, global_batch, load_dit, lr_factor, train_dit  # noqa: E402

TINY = dict(width=32, depth=2, heads=2)


@pytest.fixture(scope="module")
def pool():
    p = DistPool(2)
    yield p
    p.close()


def _train(rank, world, group, run_dir):
    config = DiffusionTrainConfig(run_dir=run_dir, steps=4, batch=8, warmup=2, model=DiTConfig(**TINY))
    return train_dit(config)


def unsharded_reference(config: DiffusionTrainConfig) -> tuple[list[float], DiT]:
    images, labels = load_digits("train")
    torch.manual_seed(config.seed)
    model = DiT(config.model)
    initial = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    losses = []
    for step in range(config.steps):
        for g in opt.param_groups:
            g["lr"] = config.lr * lr_factor(step, config)
        x0, y, noise, t = global_batch(images, labels, step, config, model.null_class)
        loss = flow_matching_loss(model, x0, y, noise, t)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, model, initial


def test_fsdp_training_at_w2_matches_the_unsharded_run(pool, tmp_path):
    run_dir = str(tmp_path / "run")
    losses = pool.run(_train, 2, run_dir)[0]
    config = DiffusionTrainConfig(run_dir=run_dir, steps=4, batch=8, warmup=2, model=DiTConfig(**TINY))
    expected, model, initial = unsharded_reference(config)
    assert losses == pytest.approx(expected, rel=1e-5)
    trained = load_dit(run_dir)
    for (name, p), q in zip(model.named_parameters(), trained.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5, msg=name)
    assert any(not torch.equal(p, p0) for p, p0 in zip(trained.parameters(), initial.parameters()))


@pytest.mark.slow
def test_train_calibrate_sample_from_the_command_line(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert main(["diffusion", "train", run_dir, "--steps", "30", "--batch", "16", "--width", "32", "--depth", "2",
                 "--heads", "2", "--nproc", "2"]) == 0  # fmt: skip
    assert main(["diffusion", "calibrate", run_dir, "--steps", "10", "--samples", "8"]) == 0
    assert "calibrated 10 timesteps on 8 held-out digits" in capsys.readouterr().out
    png = tmp_path / "grid.png"
    assert main(["diffusion", "sample", run_dir, "--out", str(png), "--steps", "10", "--per-class", "2",
                 "--cache", "sencache", "--threshold", "0.5"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "20 digits, 10 euler steps" in out and "PSNR" in out and png.stat().st_size > 0
    from PIL import Image

    assert Image.open(png).size == ((2 * 17 + 1) * 4, (10 * 17 + 1) * 4)


def test_command_line_errors_name_the_fix(tmp_path, capsys):
    assert main(["diffusion", "sample", str(tmp_path)]) == 2
    assert "no dit.json" in capsys.readouterr().err
    assert main(["diffusion", "train", str(tmp_path / "r"), "--batch", "3", "--nproc", "2"]) == 2
    assert "divide --batch 3" in capsys.readouterr().err
