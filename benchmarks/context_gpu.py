"""``make gpu-check`` rows for context parallelism, on every GPU present (P = GPUs, NCCL):

1. bf16 parity: context-parallel attention (head-tail shards, all-gathered KV, causal, GQA, torch's flash kernel
   per segment) against unsharded flash attention (``scaled_dot_product_attention`` on the whole sequence):
   the output's and dq/dk/dv's error against an fp32 reference must stay within twice unsharded bf16 SDPA's
   own error plus 1e-3, flash attention's own test criterion.
2. Training tokens/s per GPU: a Llama (Hugging Face) with activation checkpointing that keeps attention
   outputs and a chunked loss, one sequence split over all GPUs.

    torchrun --nproc_per_node=$GPUS benchmarks/context_gpu.py [--seq-per-gpu 8192]

(``--device cpu`` runs the same code on gloo with tiny sizes, as a smoke test.)
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from scalestack.context import (
    apply_context_parallel,
    checkpoint_blocks,
    chunked_cross_entropy,
    context_parallel_attention,
    global_mean_loss,
    shard_sequence,
    unshard,
)
from scalestack.train import end_worker


def parity(device: torch.device, n: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype) -> dict:
    """Per tensor (out, dq, dk, dv): (our error, unsharded SDPA's error, ok), errors as max |x - fp32 reference|;
    ok when ours is within twice SDPA's own bf16 error plus 1e-3 (flash attention's test criterion)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator(device="cpu").manual_seed(0)
    q, dout = (torch.randn(1, heads, n, dim, generator=g).to(device, dtype) for _ in range(2))
    k, v = (torch.randn(1, kv_heads, n, dim, generator=g).to(device, dtype) for _ in range(2))

    def unsharded(precision: torch.dtype) -> list[torch.Tensor]:
        full = [t.to(precision).clone().requires_grad_() for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*full, is_causal=True, enable_gqa=True)
        out.backward(dout.to(precision))
        return [out.detach().float()] + [t.grad.float() for t in full]

    reference, sdpa = unsharded(torch.float32), unsharded(dtype)
    local = [shard_sequence(t, world, rank, dim=2).detach().requires_grad_() for t in (q, k, v)]
    cp_out, _ = context_parallel_attention(*local)
    cp_out.backward(shard_sequence(dout, world, rank, dim=2))

    def gathered(t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return unshard(parts, dim=2).float()

    ours = [gathered(cp_out.detach())] + [gathered(t.grad) for t in local]
    rows = {}
    for name, mine, theirs, want in zip(("out", "dq", "dk", "dv"), ours, sdpa, reference):
        err, base = (mine - want).abs().max().item(), (theirs - want).abs().max().item()
        rows[name] = (err, base, err <= 2 * base + 1e-3)
    return rows


def throughput(device: torch.device, seq_per_rank: int, hidden: int, layers: int, heads: int, kv_heads: int,
               dtype: torch.dtype, steps: int = 3) -> float:  # fmt: skip
    from transformers import LlamaConfig, LlamaForCausalLM

    rank, world = dist.get_rank(), dist.get_world_size()
    n = seq_per_rank * world
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=int(8 * hidden / 3 / 64 + 1) * 64,
                      max_position_embeddings=n)  # fmt: skip
    model = apply_context_parallel(LlamaForCausalLM(cfg).to(device, dtype), dist.group.WORLD)
    checkpoint_blocks(model.model.layers)
    ids = torch.randint(0, 32000, (1, n), generator=torch.Generator().manual_seed(1)).to(device)
    local = [
        shard_sequence(t, world, rank) for t in (ids, torch.roll(ids, -1, 1), torch.arange(n, device=device)[None])
    ]

    def step() -> None:
        hidden_states = model.model(input_ids=local[0], position_ids=local[2]).last_hidden_state
        global_mean_loss(*chunked_cross_entropy(hidden_states, model.lm_head.weight, local[1])).backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n * steps / (time.perf_counter() - t0) / world


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--seq-per-gpu", type=int, default=8192)
    args = p.parse_args()
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    sizes = dict(heads=32, kv_heads=8, dim=128) if cuda else dict(heads=4, kv_heads=2, dim=16)
    n = 2 * world * (2048 if cuda else 32)
    rows = parity(device, n, dtype=torch.bfloat16, **sizes)
    model = (
        dict(hidden=2048, layers=8, heads=16, kv_heads=4) if cuda else dict(hidden=64, layers=2, heads=4, kv_heads=2)
    )
    speed = throughput(device, args.seq_per_gpu if cuda else 256, dtype=torch.bfloat16, **model)
    if rank == 0:
        print(f"context parallel, P = {world} ({args.device}), bf16")
        for name, (err, base, ok) in rows.items():
            print(f"  parity {name:<3} N = {n}: max |error| vs fp32 {err:.2e}, unsharded bf16 SDPA's {base:.2e}  "
                  f"{'ok' if ok else 'FAILED'} (within 2x + 1e-3)")  # fmt: skip
        print(f"  Llama {model['layers']} x {model['hidden']} ({model['heads']}/{model['kv_heads']} heads), "
              f"{(args.seq_per_gpu if cuda else 256) * world:,} tokens over {world} ranks: {speed:,.0f} tokens/s per "
              f"{'GPU' if cuda else 'rank'} (torchtitan's reference: Llama-3.1-8B at 262,144 tokens on 8 H100s, "
              f"548 tokens/s/GPU)")  # fmt: skip
    failed = not all(ok for *_, ok in rows.values())
    end_worker(1 if failed else 0)  # a barrier, then exit without the interpreter's teardown


if __name__ == "__main__":
    main()
