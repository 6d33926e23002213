"""Head-tail ("zigzag") sharding of a sequence over a context-parallel group.

The (padded) sequence of N tokens is cut into 2P chunks of c = N / 2P; rank r holds chunks r and 2P-1-r, in
that order. Under a causal mask chunk i attends to i+1 chunks' worth of keys, so every rank gets
(r + 1) + (2P - r) = 2P + 1 of them: the same work on every rank. Ids, labels and positions are cut with the
same permutation, so RoPE and the loss see global positions, and ``unshard`` puts any per-token tensor back.
"""

from __future__ import annotations

import torch


def check_layout(seq_len: int, cp_size: int) -> int:
    """The chunk length c, after checking that the sequence splits into 2P chunks."""
    if cp_size < 1 or seq_len < 1:
        raise ValueError(f"need a sequence length >= 1 and a context-parallel size >= 1, got {seq_len} and {cp_size}")
    if seq_len % (2 * cp_size):
        raise ValueError(f"a sequence of {seq_len} tokens does not split into 2 x {cp_size} chunks: pad it to a "
                         f"multiple of {2 * cp_size} (pad_to_multiple)")  # fmt: skip
    return seq_len // (2 * cp_size)


def zigzag_positions(seq_len: int, cp_size: int, rank: int) -> torch.Tensor:
    """The global positions (2c,) of the tokens rank ``rank`` holds, in its local order."""
    c = check_layout(seq_len, cp_size)
    if not 0 <= rank < cp_size:
        raise ValueError(f"rank {rank} is not in a context-parallel group of {cp_size}")
    head, tail = rank * c, (2 * cp_size - 1 - rank) * c
    return torch.cat([torch.arange(head, head + c), torch.arange(tail, tail + c)])


def zigzag_order(seq_len: int, cp_size: int) -> torch.Tensor:
    """The global position of each token in rank-major order (rank 0's tokens, then rank 1's, ...): what an
    all-gather of the local shards holds. Its inverse (``argsort``) puts gathered tokens in global order."""
    return torch.cat([zigzag_positions(seq_len, cp_size, r) for r in range(cp_size)])


def shard_sequence(x: torch.Tensor, cp_size: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's tokens of ``x`` along ``dim`` (ids, labels, positions, document ids: one permutation)."""
    index = zigzag_positions(x.shape[dim], cp_size, rank).to(x.device)
    return x.index_select(dim, index)


def unshard(shards: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's shard (in rank order): the inverse of ``shard_sequence``."""
    gathered = torch.cat(shards, dim=dim)
    order = zigzag_order(gathered.shape[dim], len(shards)).to(gathered.device)
    return gathered.index_select(dim, torch.argsort(order))


def pad_to_multiple(x: torch.Tensor, multiple: int, value: int | float, dim: int = 1) -> torch.Tensor:
    """``x`` padded with ``value`` at the end of ``dim`` to a multiple of ``multiple`` (2P for context parallel)."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    extra = -x.shape[dim] % multiple
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, torch.full(shape, value, dtype=x.dtype, device=x.device)], dim=dim)


def document_ids(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Per-token document ids (seq_len,) from packed boundaries ``cu_seqlens`` ([0, l1, l1+l2, ..., total]).
    Tokens past the last boundary (padding) get one id each, so they attend only to themselves."""
    cu = torch.as_tensor(cu_seqlens, dtype=torch.long).cpu()
    if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0 and increase strictly, got {cu.tolist()}")
    total = int(cu[-1])
    if total > seq_len:
        raise ValueError(f"cu_seqlens covers {total} tokens, more than the sequence's {seq_len}")
    ids = torch.empty(seq_len, dtype=torch.long)
    ids[:total] = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu[1:] - cu[:-1])
    ids[total:] = torch.arange(cu.numel() - 1, cu.numel() - 1 + seq_len - total)
    return ids
