"""Model FLOPs utilization: the FLOPs a training step needs (PaLM's estimate, appendix B) over what the
hardware could do in the step's time."""

from __future__ import annotations

import re
import time

import torch
import torch.nn as nn

# Dense peak TFLOP/s per GPU from the vendors' data sheets, without sparsity: (bf16, tf32, fp32). Matched
# in this order against the words of the device name ("A10G" is not "A10"; "H100 PCIe" before "H100").
GPU_PEAK_TFLOPS = {
    "H100 PCIe": (756.0, 378.0, 51.2),
    "H200": (989.0, 494.0, 67.0),
    "H100": (989.0, 494.0, 67.0),
    "A100": (312.0, 156.0, 19.5),
    "L40S": (362.0, 183.0, 91.6),
    "L40": (181.0, 90.5, 90.5),
    "L4": (121.0, 60.0, 30.3),
    "A10": (125.0, 62.5, 31.2),
}


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """6 FLOPs per matmul parameter per token (forward 2, backward 4) plus attention's 12 * layers * width *
    seq_len. Embedding lookups are not matmuls; an output head tied to the embedding is one; of a mixture of
    experts only the experts a token is routed to count."""
    params = sum(p.numel() for p in model.parameters())
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    head = getattr(model, "lm_head", None)
    tied = head is not None and any(head.weight is m.weight for m in model.modules() if isinstance(m, nn.Embedding))
    matmul = params - embeddings + (head.weight.numel() if tied else 0)
    config = getattr(model, "cfg", None) or getattr(model, "config", None)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    active = getattr(config, "num_experts_per_tok", None)
    if experts and active:  # mixture of experts: a token passes through `active` of `experts` experts only
        expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        matmul -= expert_params * (1 - active / experts)
    layers = getattr(config, "n_layer", None) or getattr(config, "num_hidden_layers", None)
    width = getattr(config, "n_embd", None) or getattr(config, "hidden_size", None)
    attention = 12 * layers * width * seq_len if layers and width else 0
    return 6.0 * matmul + attention


def peak_flops(device: torch.device, dtype: torch.dtype, configured_tflops: float = 0.0) -> float:
    """Per rank: the configured peak, else a known GPU's data-sheet peak (fp32 counts as TF32 only when torch
    allows TF32 matmuls), else (CPU, unknown GPU) the matmul throughput measured here for a moment: MFU
    against what this rank reaches on one large matmul, not a data sheet."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type == "cuda":
        words = set(re.split(r"[\s-]+", torch.cuda.get_device_name(device)))  # "NVIDIA H100 80GB HBM3"
        for key, (bf16, tf32, fp32) in GPU_PEAK_TFLOPS.items():
            if set(key.split()) <= words and "NVL" not in words:  # NVL boards (other peaks): measured
                if dtype == torch.bfloat16:
                    return bf16 * 1e12
                return (tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32) * 1e12
    return measured_matmul_flops(device, dtype)


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 0.2) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    runs, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or runs < 2:
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        runs += 1
    return 2 * size**3 * runs / elapsed
