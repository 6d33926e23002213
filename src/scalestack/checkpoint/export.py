"""Weights out of a checkpoint, in one process: consolidated safetensors, or a Hugging Face model directory.

The model's tensors are read with stock ``dcp.load`` into full tensors allocated from the checkpoint's
metadata (global shapes and dtypes), so no model code and no process group is needed for the safetensors
file; the Hugging Face directory builds the model from its config on the meta device and writes it with
``save_pretrained``, which ``from_pretrained`` loads.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from . import contents, directory
from .ranks import dcp_call

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")  # fmt: skip


def read_model_state(path: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's full tensors (keys as in the unsharded model's ``state_dict()``), from the checkpoint at
    ``path`` or the newest complete one under it; its files are verified first. ``dtype`` casts floats."""
    ckpt = directory.resolve(Path(path).absolute())
    directory.verify(ckpt)
    metadata = dcp.FileSystemReader(ckpt.path).read_metadata()
    prefix = f"{contents.MODEL}."
    tensors = {
        key[len(prefix) :]: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for key, md in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)
    }
    if not tensors:
        raise directory.CheckpointError(f"checkpoint {ckpt.path} holds no model tensors")
    dcp_call(dcp.load, {contents.MODEL: tensors}, storage_reader=dcp.FileSystemReader(ckpt.path), group=None)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return tensors


def export_safetensors(path: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """One consolidated ``.safetensors`` file of the model's tensors (tied weights under each of their names,
    so ``model.load_state_dict(safetensors.torch.load_file(out), strict=True)`` works)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"the output file must end in .safetensors, got {out.name!r}")
    tensors = read_model_state(path, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata={"format": "pt"})
    return out


def export_hf(path: str | os.PathLike, out_dir: str | os.PathLike, config: Any,
              dtype: torch.dtype | None = None) -> Path:  # fmt: skip
    """A directory that ``AutoModelForCausalLM.from_pretrained`` loads: the model built from ``config`` (a
    ``transformers`` config, or a directory or ``config.json`` holding one) with the checkpoint's weights,
    loaded strictly; tokenizer files next to the config are copied along."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    source = None
    if not isinstance(config, PretrainedConfig):
        source = Path(config)
        if not source.exists():
            raise FileNotFoundError(f"no Hugging Face config at {source} (a directory with config.json, or the file)")
        config = AutoConfig.from_pretrained(str(source.parent if source.is_file() else source))
    tensors = read_model_state(path, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"the checkpoint's weights do not fit the {type(model).__name__} of this config: {e}") from e
    model.tie_weights()
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    if source is not None:
        folder = source.parent if source.is_file() else source
        for name in TOKENIZER_FILES:
            if (folder / name).exists():
                shutil.copy2(folder / name, out_dir / name)
    return out_dir
