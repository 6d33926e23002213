"""The training loop of ``scalestack train``: build, shard, resume, train, checkpoint. Held in one's head
like nanoGPT's: everything else (config, data, sharding) is a small function elsewhere.

Every rank runs the same loop on its share of each global batch. The data order depends on the seed and
the step only, and a checkpoint stores the step, so a resumed run (at any W) continues the same curve.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import checkpoint
from ..checkpoint.contents import Optimizers
from ..checkpoint.directory import CheckpointError, complete_checkpoints
from ..fsdp import MixedPrecisionPolicy, materialize
from ..models.gpt import GPT, GPTConfig
from ..optim import AdamW8bit, Muon, clip_grad_norm_, muon_param_groups
from .apply_fsdp import apply_fsdp, decoder_blocks
from .config import GPT_SIZES, LLAMA_SIZES, Config, TrainConfigError, check_world
from .data import global_batch, load_tokens, rank_micro_batches, vocab_size
from .flops import flops_per_token, peak_flops
from .progress import Progress


def _hf_weights(directory: str | None) -> bool:
    return directory is not None and any(
        any(Path(directory).glob(pattern)) for pattern in ("*.safetensors", "pytorch_model*.bin")
    )


def preflight(config: Config) -> torch.Tensor:
    """What can be checked before any rank starts: the data (returned) and a Hugging Face config."""
    tokens = load_tokens(config.data.path, config.data.tokenizer)
    vocab = vocab_size(config.data.tokenizer)
    if tokens.numel() < config.data.seq_len + 2:
        raise TrainConfigError(f"the training data has {tokens.numel()} tokens, fewer than data.seq_len + 2")
    m = config.model
    if m.name not in GPT_SIZES:
        try:
            import transformers  # noqa: F401
        except ImportError:
            needs = f"model.name = {m.name!r} needs transformers"
            raise TrainConfigError(f"{needs}: pip install 'scalestack[hf]'") from None
    if m.name == "hf":
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(m.hf_dir or m.hf_config, local_files_only=True)
        if getattr(hf, "vocab_size", vocab) < vocab:
            source = "data.tokenizer's" if config.data.tokenizer else "the byte-level"
            raise TrainConfigError(f"the model's vocab_size {hf.vocab_size} is below {source} {vocab} tokens")
        positions = getattr(hf, "max_position_embeddings", None) or getattr(hf, "n_positions", None)
        if positions is not None and positions < config.data.seq_len:
            raise TrainConfigError(f"data.seq_len {config.data.seq_len} exceeds the model's {positions} positions")
        if config.train.meta_init and _hf_weights(m.hf_dir):
            raise TrainConfigError(
                "train.meta_init builds a randomly initialized model, but model.hf_dir holds weights: set "
                "train.meta_init = false to train from them"
            )
    return tokens


def build_model(config: Config) -> nn.Module:
    """The configured model, fp32, in training mode (on the current default device)."""
    m, seq = config.model, config.data.seq_len
    if m.name in GPT_SIZES:
        layers, heads, width = GPT_SIZES[m.name]
        vocab = vocab_size(config.data.tokenizer)
        return GPT(GPTConfig(vocab_size=vocab, block_size=seq, n_layer=layers, n_head=heads, n_embd=width))
    from transformers import AutoConfig, AutoModelForCausalLM

    if m.name in LLAMA_SIZES:
        from transformers import LlamaConfig

        layers, heads, kv_heads, width = LLAMA_SIZES[m.name]
        hf = LlamaConfig(
            vocab_size=vocab_size(config.data.tokenizer),
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=seq,
            intermediate_size=64 * math.ceil(8 * width / 3 / 64),
        )  # SwiGLU's 8/3, rounded up to 64
        return AutoModelForCausalLM.from_config(hf, dtype=torch.float32).train()
    if _hf_weights(m.hf_dir):  # fp32 master weights whatever the checkpoint's dtype (mixed precision computes)
        model = AutoModelForCausalLM.from_pretrained(m.hf_dir, local_files_only=True, dtype=torch.float32)
    else:
        hf = AutoConfig.from_pretrained(m.hf_dir or m.hf_config, local_files_only=True)
        model = AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
    return model.train()


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if isinstance(model, GPT):
        return model(x, y)
    logits = model(input_ids=x, use_cache=False).logits  # y is already the next token: no shift here
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def make_optimizers(model: nn.Module, config: Config) -> list[torch.optim.Optimizer]:
    t = config.train
    if t.optimizer == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.95))]
    if t.optimizer == "adamw8bit":
        return [AdamW8bit(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.95))]
    matrices, rest = muon_param_groups(model)
    return [
        Muon([p for _, p in matrices], lr=t.lr, weight_decay=t.weight_decay),
        torch.optim.AdamW([p for _, p in rest], lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.95)),
    ]


def lr_at(step: int, config: Config) -> float:
    """Linear warmup, then cosine to min_lr: a factor of the configured lr."""
    t = config.train
    if step < t.warmup:
        return (step + 1) / t.warmup
    progress = (step - t.warmup) / max(1, t.steps - t.warmup)
    return (t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))) / t.lr


def shard(model: nn.Module, config: Config) -> nn.Module:
    t = config.train
    if t.activation_checkpointing:
        for block in decoder_blocks(model):  # in place: the same module (same names), its forward recomputed
            block.forward = _checkpointed(block)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = {"mp_policy": mp} if t.mixed_precision == "bf16" else {}
    if t.optimizer == "adamw8bit":
        kwargs["granularity"] = AdamW8bit.granularity(256)
    return apply_fsdp(model, **kwargs)


def _checkpointed(block: nn.Module):
    forward = block.forward

    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def train(config: Config) -> list[float]:
    """Run (or resume) the configured training; returns the global mean loss of each step run here."""
    launched = "RANK" in os.environ
    device = torch.device("cpu")
    if launched and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if launched:
            _init_launched_group("nccl" if device.type == "cuda" else "gloo")
        else:  # one process without torchrun: a group of one
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # no port needed
    rank, world = dist.get_rank(), dist.get_world_size()
    micro_steps = check_world(config, world)
    t = config.train
    run_dir = Path(config.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    tokens = preflight(config)

    torch.manual_seed(t.seed)  # every rank builds the same model
    with torch.device("meta") if t.meta_init else device:
        model = build_model(config)
    if not t.meta_init:
        model.to(device)  # a Hugging Face checkpoint loads on the CPU
    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = t.global_batch * config.data.seq_len
    step_flops = flops_per_token(model, config.data.seq_len) * tokens_per_step
    shard(model, config)
    if t.meta_init:
        materialize(model, device)
    opts = make_optimizers(model, config)
    saved_opts = opts if len(opts) > 1 else opts[0]  # what checkpoint.save/load take: one, or a list
    start = _resume(ckpt_dir, model, saved_opts, config, rank)
    if start >= t.steps:
        _log(rank, f"already at step {start} of train.steps = {t.steps}: raise train.steps to train further")
    metrics_path = run_dir / "metrics.csv"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_model_card(run_dir / "model.json", model, config)
        _keep_metrics_until(metrics_path, start)  # steps after the checkpoint are run again
    losses = []
    compute_dtype = torch.bfloat16 if t.mixed_precision == "bf16" else torch.float32
    peak = peak_flops(device, compute_dtype, t.peak_tflops) * world  # MFU: the whole job's
    _log(rank, f"{n_params / 1e6:.2f}M parameters, {world} rank(s), {micro_steps} micro-batch(es) per step, "
               f"{tokens_per_step} tokens per step")  # fmt: skip
    board = _tensorboard(run_dir, start) if rank == 0 and t.tensorboard else None
    progress = Progress(t.steps, start, t.log_every) if rank == 0 else None
    try:
        for step in range(start, t.steps):
            t0 = time.perf_counter()
            for o in opts:  # from the config every step: a resumed run takes a changed lr or weight decay
                for g in o.param_groups:
                    g["lr"], g["weight_decay"] = t.lr * lr_at(step, config), t.weight_decay
            x, y = (b.to(device) for b in global_batch(tokens, step, t.global_batch, config.data.seq_len, t.seed))
            loss_value = train_step(model, opts, rank_micro_batches(x, y, rank, world, t.micro_batch), t.grad_clip)
            losses.append(loss_value)
            elapsed = time.perf_counter() - t0
            if rank == 0:
                lr, speed = opts[0].param_groups[0]["lr"], tokens_per_step / elapsed
                row = {"loss": loss_value, "lr": lr, "tokens_per_s": speed, "peak_mib": _peak_mib(device),
                       "mfu": step_flops / elapsed / peak}  # fmt: skip
                _append_metrics(metrics_path, step + 1, row)
                if board is not None:
                    for key, value in row.items():
                        board.add_scalar(f"train/{key}", value, step + 1)
                progress.update(step + 1, loss_value, row["tokens_per_s"], row["peak_mib"], row["mfu"])
            done = step + 1
            if (config.checkpoint.every and done % config.checkpoint.every == 0) or done == t.steps:
                checkpoint.save(ckpt_dir / f"step_{done}", model, saved_opts,
                                extra={"step": done, "data": _data_settings(config)},
                                keep_last=config.checkpoint.keep_last)  # fmt: skip
    finally:
        if board is not None:
            board.close()
        if progress is not None:
            progress.close()
    return losses


def train_step(model: nn.Module, opts: list[torch.optim.Optimizer], micro_batches: list[tuple[torch.Tensor, ...]],
               grad_clip: float) -> float:  # fmt: skip
    """One optimizer step over this rank's micro-batches (gradients reduced after the last); the global mean loss."""
    total = torch.zeros((), device=micro_batches[0][0].device)
    for i, (x, y) in enumerate(micro_batches):
        model.set_requires_gradient_sync(i == len(micro_batches) - 1)
        loss = loss_of(model, x, y) / len(micro_batches)
        loss.backward()
        total += loss.detach().float()
    if grad_clip > 0:
        clip_grad_norm_(model.parameters(), grad_clip)
    for o in opts:
        o.step()
        o.zero_grad(set_to_none=True)
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def _data_settings(config: Config) -> dict:
    """What fixes the data a step sees: a resumed run with other values continues on other data."""
    d, t = config.data, config.train
    return {"path": str(Path(d.path).resolve()) if d.path else "<shipped>",
            "tokenizer": str(Path(d.tokenizer).resolve()) if d.tokenizer else "<bytes>",
            "seq_len": d.seq_len, "global_batch": t.global_batch, "seed": t.seed}  # fmt: skip


def _resume(ckpt_dir: Path, model: nn.Module, opts: Optimizers, config: Config, rank: int) -> int:
    """Load the newest complete checkpoint that loads (a damaged one is skipped, on every rank alike: load
    raises any rank's error on all); its step, or 0 when there is none."""
    for ckpt in reversed(complete_checkpoints(ckpt_dir)):  # a save a killed rank left unfinished is not one
        try:
            extra = checkpoint.load(ckpt.path, model, opts)
        except CheckpointError as e:
            _log(rank, f"skipping checkpoint {ckpt.path}: {e}")
            continue
        saved, now = extra.get("data", {}), _data_settings(config)
        changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]
        if changed:
            _log(rank, f"warning: data settings changed since the checkpoint ({', '.join(changed)}): the steps "
                       "from here see other data than the original run would have")  # fmt: skip
        _log(rank, f"resumed from step {extra['step']} ({ckpt.path})")
        return int(extra["step"])
    return 0


def _init_launched_group(backend: str) -> None:
    """The default group from torchrun's environment, its keys under this attempt's prefix: after a restart
    (``--max-restarts``) the launcher's store still holds the dead attempt's peer addresses, and a rank that
    read one would connect to a process that no longer exists. The attempt is counted in the store itself:
    each node's TORCHELASTIC_RESTART_COUNT differs once a healthy node is restarted for a membership change."""
    store, rank, world = next(dist.rendezvous("env://"))
    attempt = (store.add("scalestack/ranks_joined", 1) - 1) // world  # every rank joins once per attempt
    if store.add(f"scalestack/attempt_{attempt}/arrived", 1) == world:
        store.set(f"scalestack/attempt_{attempt}/complete", "1")
    try:
        store.wait([f"scalestack/attempt_{attempt}/complete"], datetime.timedelta(minutes=5))
    except Exception:  # DistStoreError on a timeout
        raise RuntimeError(
            f"rank {rank}: not all {world} ranks joined attempt {attempt} within 5 minutes. A rank that died "
            "before joining in an earlier attempt shifts the count: start the job again (a new torchrun)"
        ) from None
    dist.init_process_group(backend, store=dist.PrefixStore(f"attempt_{attempt}", store), rank=rank, world_size=world)


def _write_model_card(path: Path, model: nn.Module, config: Config) -> None:
    """What ``scalestack serve RUN_DIR`` rebuilds the model from: its architecture, config and tokenizer."""
    if isinstance(model, GPT):
        card = {"architecture": "gpt", "config": dataclasses.asdict(model.cfg)}
    else:
        card = {"architecture": "hf", "config": model.config.to_dict()}
    tokenizer = config.data.tokenizer
    card["tokenizer"] = str(Path(tokenizer).resolve()) if tokenizer else None  # None: UTF-8 bytes
    path.write_text(json.dumps(card, indent=1, default=str))


def _keep_metrics_until(path: Path, step: int) -> None:
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if int(r[0]) <= step]
    if len(kept) != len(rows):
        with path.open("w", newline="") as f:
            csv.writer(f).writerows(kept)


def _peak_mib(device: torch.device) -> float:
    """This process's peak memory: the CUDA allocator's on a GPU, the RSS high-water mark on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


METRICS = ("step", "loss", "lr", "tokens_per_s", "peak_mib", "mfu")


def _append_metrics(path: Path, step: int, row: dict[str, float]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(METRICS)
        writer.writerow([step, f"{row['loss']:.6f}", f"{row['lr']:.6g}", f"{row['tokens_per_s']:.1f}",
                         f"{row['peak_mib']:.1f}", f"{row['mfu']:.5f}"])  # fmt: skip


def _tensorboard(run_dir: Path, start: int):
    """A SummaryWriter on run_dir/tensorboard when tensorboard is installed (events after the step resumed
    from, or all of them on a fresh start, are dropped, as metrics.csv's rows are), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed: metrics go to metrics.csv only (pip install tensorboard)", flush=True)
        return None
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1)


def _log(rank: int, text: str) -> None:
    if rank == 0:
        print(text, flush=True)
