"""``scalestack export``: a checkpoint's weights as consolidated safetensors or a Hugging Face directory."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..checkpoint.export import export_hf, export_safetensors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint's weights as one .safetensors file or a Hugging Face model directory",
        description="Read the model's tensors of a scalestack checkpoint (a checkpoint directory, or a directory "
        "of them: the newest complete one) in one process and write OUT: a .safetensors file, or with "
        "--hf-config a directory that transformers' from_pretrained loads.",
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint directory, or a directory holding checkpoints")
    p.add_argument("out", type=Path, help="OUT.safetensors, or an output directory with --hf-config")
    p.add_argument("--hf-config", type=Path, help="Hugging Face config.json (or its directory) of the model")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating-point tensors (default: as saved)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.hf_config is not None:
        out = export_hf(args.checkpoint, args.out, args.hf_config, dtype)
    elif args.out.suffix == ".safetensors":
        out = export_safetensors(args.checkpoint, args.out, dtype)
    else:
        raise ValueError(f"OUT must end in .safetensors, or pass --hf-config to write a directory (got {args.out})")
    print(f"wrote {out}")
    return 0
