"""The trainer's configuration: a TOML file in sections, overridden from the command line with
``--section.key=value``. Unknown sections or keys and impossible values are one clear error each."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib


class TrainConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


@dataclass
class ModelConfig:
    name: str = "gpt-tiny"  # a built-in (GPT_SIZES, LLAMA_SIZES), or "hf" with hf_config / hf_dir
    hf_config: str | None = None  # a Hugging Face config.json: random init
    hf_dir: str | None = None  # a local Hugging Face model directory: its config (and weights, when present)


@dataclass
class DataConfig:
    path: str | None = None  # a text or .jsonl file ({"text": ...} per line); default: the shipped text
    seq_len: int = 128
    tokenizer: str | None = None  # a tokenizer.json; default: model.hf_dir's, else UTF-8 bytes (256 tokens)


@dataclass
class TrainSection:
    steps: int = 200
    global_batch: int = 16  # sequences per optimizer step, over all ranks: the data order does not depend on W
    micro_batch: int = 8  # sequences per rank per forward; the rest is gradient accumulation
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0: off
    optimizer: str = "adamw"  # adamw | adamw8bit | muon (Muon for block matrices, AdamW for the rest)
    mixed_precision: str = "fp32"  # fp32 | bf16 (compute in bf16, fp32 master and reduce)
    activation_checkpointing: bool = False
    meta_init: bool = False  # build on the meta device and materialize unit by unit
    seed: int = 0
    log_every: int = 10  # steps between printed lines when the output is not a terminal (metrics.csv: every step)
    peak_tflops: float = 0.0  # per rank, for MFU; 0: a known GPU's data sheet, else a matmul measured at start
    tensorboard: bool = True  # also write run_dir/tensorboard when the tensorboard package is installed


@dataclass
class CheckpointSection:
    every: int = 100  # steps; 0: only at the end
    keep_last: int = 2


@dataclass
class Config:
    run_dir: str = "runs/train"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)


OPTIMIZERS = ("adamw", "adamw8bit", "muon")
GPT_SIZES = {  # built-in byte-level GPTs: (layers, heads, width)
    "gpt-tiny": (2, 4, 64),
    "gpt-small": (4, 4, 128),
    "gpt-medium": (8, 8, 512),
}
LLAMA_SIZES = {  # built-in Llamas (Hugging Face's LlamaForCausalLM): (layers, heads, kv heads, width)
    "llama-tiny": (2, 4, 2, 64),
    "llama-small": (4, 4, 2, 128),
    "llama-medium": (8, 8, 4, 512),
}
BUILT_IN = (*GPT_SIZES, *LLAMA_SIZES)
PRECISIONS = ("fp32", "bf16")


def _convert(value: Any, kind: Any, key: str) -> Any:
    """A TOML value or a command-line string, as the field's type."""
    text = isinstance(value, str)
    if kind in (bool, "bool"):
        if isinstance(value, bool):
            return value
        if text and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind in (int, "int"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text:
            try:
                return int(value)
            except ValueError:
                pass
    elif kind in (float, "float"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if text:
            try:
                return float(value)
            except ValueError:
                pass
    elif "str" in str(kind) and text:
        return value
    raise TrainConfigError(f"{key} = {value!r}: expected {str(kind).replace(' | None', '')}")


def _section_fields(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _set(config: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    top = _section_fields(config)
    if len(parts) == 1 and parts[0] in top and not dataclasses.is_dataclass(getattr(config, parts[0])):
        setattr(config, parts[0], _convert(value, top[parts[0]].type, key))
        return
    sections = [n for n in top if dataclasses.is_dataclass(getattr(config, n))]
    if len(parts) != 2 or parts[0] not in sections:
        raise TrainConfigError(f"unknown key {key!r}: sections are {', '.join(sections)} (and run_dir)")
    section = getattr(config, parts[0])
    fields = _section_fields(section)
    if parts[1] not in fields:
        raise TrainConfigError(f"unknown key {key!r}: [{parts[0]}] takes {', '.join(fields)}")
    setattr(section, parts[1], _convert(value, fields[parts[1]].type, key))


def _flatten(table: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in table.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((prefix + k, v))
    return out


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """The defaults, then the TOML file, then ``section.key=value`` overrides; checked as a whole."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TrainConfigError(f"config file {str(path)!r} not found")
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise TrainConfigError(f"{path}: not valid TOML: {e}") from None
        for key, value in _flatten(table):
            _set(config, key, value)
    for item in overrides:
        key, sep, value = item.removeprefix("--").partition("=")
        if not sep:
            raise TrainConfigError(f"override {item!r}: write --section.key=value, e.g. --train.steps=50")
        _set(config, key, value)
    m = config.model
    if m.hf_dir is not None and config.data.tokenizer is None and (Path(m.hf_dir) / "tokenizer.json").is_file():
        config.data.tokenizer = str(Path(m.hf_dir) / "tokenizer.json")  # a pretrained model's own tokens
    check(config)
    return config


def check(config: Config) -> None:
    t, d = config.train, config.data
    for key, value in (("train.steps", t.steps), ("train.global_batch", t.global_batch),
                       ("train.micro_batch", t.micro_batch), ("data.seq_len", d.seq_len),
                       ("train.log_every", t.log_every)):  # fmt: skip
        if value < 1:
            raise TrainConfigError(f"{key} must be at least 1, got {value}")
    for key, value in (("train.lr", t.lr), ("train.min_lr", t.min_lr), ("train.weight_decay", t.weight_decay),
                       ("train.grad_clip", t.grad_clip)):  # fmt: skip
        if not math.isfinite(value) or value < 0:
            raise TrainConfigError(f"{key} must be a finite number >= 0, got {value}")
    if not t.lr > 0 or t.min_lr > t.lr:
        raise TrainConfigError(f"need 0 < train.lr and train.min_lr <= train.lr, got lr={t.lr}, min_lr={t.min_lr}")
    if t.warmup < 0 or not 0 <= t.seed < 2**32:
        raise TrainConfigError(f"train.warmup must be >= 0 and train.seed in [0, 2**32), got {t.warmup}, {t.seed}")
    if t.optimizer not in OPTIMIZERS:
        raise TrainConfigError(f"train.optimizer = {t.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if t.mixed_precision not in PRECISIONS:
        raise TrainConfigError(f"train.mixed_precision = {t.mixed_precision!r}: choose {' or '.join(PRECISIONS)}")
    if t.global_batch % t.micro_batch:
        raise TrainConfigError(
            f"train.global_batch {t.global_batch} is not a multiple of train.micro_batch {t.micro_batch}"
        )
    if config.checkpoint.every < 0 or config.checkpoint.keep_last < 1:
        raise TrainConfigError("checkpoint.every must be >= 0 and checkpoint.keep_last >= 1")
    for key, value in (("data.path", d.path), ("data.tokenizer", d.tokenizer)):
        if value is not None and not Path(value).is_file():
            raise TrainConfigError(f"{key} {value!r} not found")
    if not math.isfinite(t.peak_tflops) or t.peak_tflops < 0:
        raise TrainConfigError(f"train.peak_tflops must be >= 0 (0: measured or known), got {t.peak_tflops}")
    m = config.model
    if m.name not in (*BUILT_IN, "hf"):
        raise TrainConfigError(f"model.name = {m.name!r}: choose one of {', '.join(BUILT_IN)}, or hf")
    if m.name == "hf" and m.hf_config is None and m.hf_dir is None:
        raise TrainConfigError("model.name = 'hf' needs model.hf_config (a config.json) or model.hf_dir")
    if m.name != "hf" and (m.hf_config or m.hf_dir):
        raise TrainConfigError("model.hf_config / model.hf_dir are read only with model.name = 'hf'")
    for key in ("hf_config", "hf_dir"):
        value = getattr(m, key)
        if value is not None and not Path(value).exists():
            raise TrainConfigError(f"model.{key} {value!r} not found")


def check_world(config: Config, world: int) -> int:
    """Micro-batches per rank per step: the global batch must split evenly over W ranks."""
    t = config.train
    if t.global_batch % (t.micro_batch * world):
        raise TrainConfigError(
            f"train.global_batch {t.global_batch} does not split into micro-batches of {t.micro_batch} over "
            f"{world} ranks: make it a multiple of micro_batch x W = {t.micro_batch * world}"
        )
    return t.global_batch // (t.micro_batch * world)
