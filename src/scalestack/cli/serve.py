"""``scalestack serve``: the Responses API for a trained run or a local Hugging Face model, on loopback."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def byte_size(text: str) -> int:
    """``2GiB``, ``512MiB``, ``1e9`` or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    unit = match and UNITS.get(match.group(2).lower())
    try:
        if unit is None:
            raise ValueError
        value = int(float(match.group(1)) * unit)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write bytes, or e.g. 512MiB, 2GiB") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be >= 0")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over the OpenAI Responses API (HTTP, SSE and WebSocket) with KV reuse across turns",
        description="Serve MODEL (a `scalestack train` run directory, or a local Hugging Face model directory "
        "with config, weights, tokenizer.json and chat template) at http://HOST:PORT/v1: POST/GET/DELETE "
        "/v1/responses, WebSocket mode at /v1/responses, GET /v1/models. Point the openai SDK's base_url at it.",
    )
    p.add_argument("model", type=Path, help="run directory or Hugging Face model directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every request and WebSocket")
    p.add_argument("--kv-budget", type=byte_size, default=2 * 2**30,
                   help="bytes of KV cache for all sessions; idle ones are evicted LRU (default 2GiB)")  # fmt: skip
    p.add_argument("--kv-ttl", type=float, default=600.0, help="seconds an idle session's KV cache is kept")
    p.add_argument("--model-name", help="the model id clients send (default: the directory's name)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], help="cast the weights")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together")
    p.add_argument("--max-output-tokens", type=int, default=4096, help="the most a request may ask for")
    p.add_argument("--max-connection-age", type=float, default=3600.0, help="seconds a WebSocket may stay open")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in ("port", "max_batch", "max_output_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.api_key is not None and not args.api_key:
        raise ValueError("--api-key must not be empty")
    import torch

    from ..serve import Limits, build_service, load_model, run_server

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = load_model(args.model, dtype=args.dtype, name=args.model_name)
    limits = Limits(max_output_tokens=args.max_output_tokens,
                    default_output_tokens=min(512, args.max_output_tokens))  # fmt: skip
    service = build_service(model, args.kv_budget, args.kv_ttl, args.max_batch, limits=limits)
    print(f"serving {model.name!r} at http://{args.host}:{args.port}/v1 (WebSocket ws://{args.host}:{args.port}"
          f"/v1/responses); KV budget {args.kv_budget / 2**20:.0f} MiB", flush=True)  # fmt: skip
    run_server(service, args.host, args.port, args.api_key, args.max_connection_age)
    return 0
