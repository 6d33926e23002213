"""``scalestack train`` end to end: a few steps at W=2 through torchrun, resuming from its checkpoint with
the same following losses (also after a rank is SIGKILLed under ``torchrun --max-restarts=1``), the same
losses at W=1 (the data order does not depend on W), and bad configs as one clear error."""

from __future__ import annotations

import csv
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

CONFIG = """
run_dir = "{run_dir}"
[model]
name = "gpt-tiny"
[data]
seq_len = 32
[train]
steps = {steps}
global_batch = 8
micro_batch = 2
warmup = 2
[checkpoint]
every = 3
"""


DYING = """
import os, signal, sys
import torch.distributed.checkpoint as dcp
import scalestack.train.trainer as trainer
from scalestack.cli.main import main

batch, save, write = trainer.global_batch, trainer.checkpoint.save, dcp.save
where = sys.argv.pop(1)  # "batch": before step 6; "save": while saving step 6 (checkpoints: every 3)
victim = os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"
saving_step_6 = False


def dying_batch(tokens, step, *args):
    if where == "batch" and step == 5 and victim:
        os.kill(os.getpid(), signal.SIGKILL)
    return batch(tokens, step, *args)


def flagged_save(path, *args, **kwargs):
    global saving_step_6
    saving_step_6 = path.name == "step_6"
    return save(path, *args, **kwargs)


def dying_write(*args, **kwargs):  # rank 1 dies after writing its files, before the checkpoint is published
    out = write(*args, **kwargs)
    if where == "save" and saving_step_6 and victim:
        os.kill(os.getpid(), signal.SIGKILL)
    return out


trainer.global_batch, trainer.checkpoint.save, dcp.save = dying_batch, flagged_save, dying_write
sys.exit(main(sys.argv[1:]))
"""


def train(tmp: Path, name: str, steps: int, nproc: int, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    run_dir = tmp / name
    config = tmp / f"{name}.toml"
    config.write_text(CONFIG.format(run_dir=run_dir, steps=steps))
    command = [sys.executable, "-m", "scalestack.cli.main", "train", str(config), "--nproc", str(nproc), *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=240), run_dir


def losses(run_dir: Path) -> dict[int, float]:
    with (run_dir / "metrics.csv").open() as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def board_losses(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert len(steps) == len(set(steps)), steps
    return {e.step: e.value for e in events.Scalars("train/loss")}


def test_train_resume_and_world_size_independence(tmp_path):
    done, whole = train(tmp_path, "whole", 9, 2)
    assert done.returncode == 0, done.stderr[-2000:]
    a = losses(whole)
    assert sorted(a) == list(range(1, 10)) and a[9] < a[1]  # it learns
    report = subprocess.run([sys.executable, "-m", "scalestack.cli.main", "report", str(whole)], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert report.returncode == 0, report.stderr
    for name in ("loss.png", "throughput.png", "memory.png"):
        assert (whole / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    missing = subprocess.run([sys.executable, "-m", "scalestack.cli.main", "report", str(tmp_path / "none")],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert missing.returncode == 2 and "metrics.csv not found" in missing.stderr
    # as if the job had died after step 6: its last checkpoint and metrics are step 6's
    part = tmp_path / "part"
    shutil.copytree(whole, part)
    data = max((f for f in (part / "checkpoints" / "step_9").iterdir() if f.suffix == ".distcp"),
               key=lambda f: f.stat().st_size)  # fmt: skip
    damaged = bytearray(data.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # one flipped byte: step 9's checkpoint is skipped for step 6's
    data.write_bytes(bytes(damaged))  # metrics.csv keeps its rows 7-9: the resume drops them
    resumed, _ = train(tmp_path, "part", 9, 2)
    assert resumed.returncode == 0 and "resumed from step 6" in resumed.stdout, resumed.stdout + resumed.stderr[-2000:]
    assert "skipping checkpoint" in resumed.stdout and "CRC-32" in resumed.stdout, resumed.stdout
    b = losses(part)
    rows = (part / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(i) for i in range(1, 10)]  # no step twice
    for step in range(7, 10):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    # a rank SIGKILLed under torchrun --max-restarts=1, mid-run or mid-save: all restart from step 3's checkpoint
    (tmp_path / "dying.py").write_text(DYING)
    killed = {}
    for where in ("batch", "save"):
        killed[where] = run_dir = tmp_path / f"killed_{where}"
        (tmp_path / f"{where}.toml").write_text(CONFIG.format(run_dir=run_dir, steps=9))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "--max-restarts=1", str(tmp_path / "dying.py"), where, "train",
                   str(tmp_path / f"{where}.toml")]  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "exitcode: -9" in out.stderr and "resumed from step 3" in out.stdout, out.stdout + out.stderr[-3000:]
        rows = (run_dir / "metrics.csv").read_text().splitlines()
        assert [r.split(",")[0] for r in rows[1:]] == [str(i) for i in range(1, 10)]
        for step, loss in losses(run_dir).items():
            assert loss == pytest.approx(a[step], rel=1e-5), (where, step)
    assert not any(p.name.endswith(".incomplete") for p in (killed["save"] / "checkpoints").iterdir())
    for run in (
        whole,
        part,
        *killed.values(),
    ):  # TensorBoard holds every step once, as metrics.csv does (resumes purge)
        assert board_losses(run) == pytest.approx(losses(run), rel=1e-6)
    changed = tmp_path / "changed"  # resumed with another seed: said, since the data from here differs
    shutil.copytree(whole, changed)
    out, _ = train(tmp_path, "changed", 10, 2, "--train.seed=5")
    assert out.returncode == 0 and "resumed from step 9" in out.stdout, out.stderr[-2000:]
    assert "data settings changed since the checkpoint (seed 0 -> 5)" in out.stdout, out.stdout
    one, single = train(tmp_path, "single", 9, 1, "--checkpoint.every=0")
    assert one.returncode == 0, one.stderr[-2000:]
    for step, loss in losses(single).items():
        assert loss == pytest.approx(a[step], rel=1e-5), step


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--train.stepz=3", "unknown key 'train.stepz': [train] takes steps"),
        ("--train.micro_batch=3", "not a multiple of train.micro_batch 3"),
        ("--train.global_batch=6", "does not split into micro-batches of 2 over 2 ranks"),
        ("--data.path=/nonexistent.txt", "data.path '/nonexistent.txt' not found"),
        ("--train.optimizer=sgd", "choose one of adamw, adamw8bit, muon"),
        ("--train.steps=many", "train.steps = 'many': expected int"),
        ("--model.name=gpt-huge", "model.name = 'gpt-huge': choose one of gpt-tiny"),
        ("--train.lr=0", "need 0 < train.lr"),
        ("--data.seq_len=100000000", "fewer than data.seq_len + 2"),
        ("--data.tokenizer=/nonexistent.json", "data.tokenizer '/nonexistent.json' not found"),
        ("--train.peak_tflops=-1", "train.peak_tflops must be >= 0"),
    ],
)
def test_bad_configs_are_one_clear_error(tmp_path, capsys, override, message):
    """In this process: the checks run before anything is launched."""
    from scalestack.cli.main import main

    config = tmp_path / "bad.toml"
    config.write_text(CONFIG.format(run_dir=tmp_path / "bad", steps=3))
    assert main(["train", str(config), "--nproc", "2", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()  # nothing ran


def test_variants_run(tmp_path):
    """bf16 compute, activation checkpointing, Muon and meta-device init together; then a Hugging Face Llama
    from a config.json with AdamW8bit; then the built-in Llama on a tokenizer.json's tokens. A few steps each
    at W=2: they run and the loss is finite."""
    variants = ["--train.mixed_precision=bf16", "--train.activation_checkpointing=true", "--train.optimizer=muon",
                "--train.meta_init=true"]  # fmt: skip
    out, run_dir = train(tmp_path, "variants", 3, 2, *variants)
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(math.isfinite(v) for v in losses(run_dir).values())
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64).save_pretrained(tmp_path / "llama")  # fmt: skip
    out, run_dir = train(tmp_path, "hf", 3, 2, "--model.name=hf", f"--model.hf_config={tmp_path / 'llama'}",
                         "--train.optimizer=adamw8bit")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(losses(run_dir)) == 3 and all(math.isfinite(v) for v in losses(run_dir).values())
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from scalestack.train.data import SHIPPED_TEXT

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train([str(SHIPPED_TEXT)], trainers.BpeTrainer(vocab_size=600, special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    out, run_dir = train(tmp_path, "tok", 3, 2, f"--data.tokenizer={tmp_path / 'tokenizer.json'}",
                         "--model.name=llama-tiny")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert losses(run_dir)[1] == pytest.approx(math.log(tok.get_vocab_size()), abs=0.3)  # uniform over its vocab
