"""The loss of a sequence sharded over ranks: a sum over this rank's valid tokens, divided by the count of
valid tokens over all ranks (not a mean of per-rank means, which weighs ranks with fewer valid tokens more),
with logits computed a chunk at a time so they never exist for the whole local sequence."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    logits = hidden @ weight.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits: the loss in fp32
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=ignore_index, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk: int = 1024,
                          ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(sum of the cross-entropy over valid tokens, their count) of ``hidden`` (B, L, H) through the output
    projection ``weight`` (V, H) against ``labels`` (B, L). Each chunk of ``chunk`` tokens computes its logits
    (B, chunk, V) and is recomputed in backward, so at most one chunk's logits are alive."""
    if hidden.shape[:-1] != labels.shape or weight.shape[-1] != hidden.shape[-1] or chunk < 1:
        shapes = f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}"
        raise ValueError(f"need hidden (B, L, H), weight (V, H), labels (B, L) and chunk >= 1, got {shapes}, {chunk}")
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[1], chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(_chunk_loss_sum, hidden[:, part], weight, labels[:, part], ignore_index,
                                   use_reentrant=False)  # fmt: skip
    return total, (labels != ignore_index).sum()


def global_mean_loss(loss_sum: torch.Tensor, count: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """This rank's loss to backpropagate: loss_sum / (valid tokens over ``group``) x size of ``group``.

    Gradients averaged over the group's ranks (as FSDP and DDP average them) are then exactly the gradients of
    the global mean over valid tokens, and so is the loss's own average over ranks. ``group`` spans every rank
    that holds part of the batch: data parallel x context parallel."""
    total = count.detach().to(torch.float64).clone()
    dist.all_reduce(total, group=group)
    if float(total) == 0:
        raise ValueError("no valid token on any rank: every label is ignore_index")
    return loss_sum * (dist.get_world_size(group) / total.to(loss_sum.dtype))
