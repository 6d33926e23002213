"""Head-tail ("zigzag") sharding of a sequence over a context-parallel group.

The (padded) sequence of N tokens is cut into 2P chunks of c = N / 2P; rank r holds chunks r and 2P-1-r, in
that order. Under a causal mask chunk i attends to i+1 chunks' worth of keys, so every rank gets
(r + 1) + (2P - r) = 2P + 1 of them: the same work on every rank. Ids, labels and positions are cut with the
same permutation, so RoPE and the loss see global positions, and ``unshard`` puts any per-token tensor back.

Packed documents break that balance (a rank whose chunks fall in a short document sees few keys), so
``document_head_tail_layout`` cuts every document into 2P chunks and deals them out the same way: each rank
then has the same number of unmasked query-key pairs in every document.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    """Which global positions each rank holds: per rank, runs of consecutive positions (start, length), in
    the rank's local order. Every rank holds the same number of tokens (one all-gather of equal shards)."""

    n: int
    runs: tuple[tuple[tuple[int, int], ...], ...]

    def __post_init__(self) -> None:
        if not self.runs or any(length < 1 for rank in self.runs for _, length in rank):
            raise ValueError("a Layout needs at least one rank, and runs of at least one position")
        covered = sorted((start, start + length) for rank in self.runs for start, length in rank)
        if covered[0][0] != 0 or covered[-1][1] != self.n or any(a[1] != b[0] for a, b in zip(covered, covered[1:])):
            raise ValueError(f"the runs must hold every position of [0, {self.n}) exactly once, got {self.runs}")
        totals = {sum(length for _, length in rank) for rank in self.runs}
        if len(totals) != 1:
            raise ValueError(f"every rank must hold the same number of positions (one all-gather of equal shards), "
                             f"got {sorted(totals)}")  # fmt: skip

    @property
    def cp_size(self) -> int:
        return len(self.runs)

    def positions(self, rank: int) -> torch.Tensor:
        if not 0 <= rank < self.cp_size:
            raise ValueError(f"rank {rank} is not in a context-parallel group of {self.cp_size}")
        return torch.cat([torch.arange(start, start + length) for start, length in self.runs[rank]])

    def order(self) -> torch.Tensor:
        """The global position of each token in rank-major order: what an all-gather of the shards holds."""
        return torch.cat([self.positions(r) for r in range(self.cp_size)])


def head_tail_layout(seq_len: int, cp_size: int) -> Layout:
    c = check_layout(seq_len, cp_size)
    return Layout(seq_len, tuple(((r * c, c), ((2 * cp_size - 1 - r) * c, c)) for r in range(cp_size)))


def document_head_tail_layout(cu_seqlens: torch.Tensor, seq_len: int, cp_size: int) -> Layout:
    """Head-tail within every document of a packed sequence (``cu_seqlens`` boundaries; tokens past the last
    boundary count as one more document). Every document's length must be a multiple of 2P."""
    if cp_size < 1:
        raise ValueError(f"need a context-parallel size >= 1, got {cp_size}")
    cu = [int(x) for x in torch.as_tensor(cu_seqlens).tolist()]
    document_ids(torch.tensor(cu), seq_len)  # validates the boundaries
    bounds = cu + ([seq_len] if cu[-1] < seq_len else [])
    runs: list[list[tuple[int, int]]] = [[] for _ in range(cp_size)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if (b - a) % (2 * cp_size):
            raise ValueError(f"the document at [{a}, {b}) has {b - a} tokens, not a multiple of 2 x {cp_size}: pad "
                             f"each document (or use the global head_tail_layout)")  # fmt: skip
        c = (b - a) // (2 * cp_size)
        for r in range(cp_size):
            runs[r] += [(a + r * c, c), (a + (2 * cp_size - 1 - r) * c, c)]
    return Layout(seq_len, tuple(tuple(r) for r in runs))


def check_layout(seq_len: int, cp_size: int) -> int:
    """The chunk length c, after checking that the sequence splits into 2P chunks."""
    if cp_size < 1 or seq_len < 1:
        raise ValueError(f"need a sequence length >= 1 and a context-parallel size >= 1, got {seq_len} and {cp_size}")
    if seq_len % (2 * cp_size):
        raise ValueError(f"a sequence of {seq_len} tokens does not split into 2 x {cp_size} chunks: pad it to a "
                         f"multiple of {2 * cp_size} (pad_to_multiple)")  # fmt: skip
    return seq_len // (2 * cp_size)


def zigzag_positions(seq_len: int, cp_size: int, rank: int) -> torch.Tensor:
    """The global positions (2c,) of the tokens rank ``rank`` holds under the head-tail layout."""
    return head_tail_layout(seq_len, cp_size).positions(rank)


def zigzag_order(seq_len: int, cp_size: int) -> torch.Tensor:
    """The head-tail layout's global positions in rank-major order (``Layout.order``)."""
    return head_tail_layout(seq_len, cp_size).order()


def shard_sequence(x: torch.Tensor, cp_size: int, rank: int, dim: int = 1,
                   layout: Layout | None = None) -> torch.Tensor:  # fmt: skip
    """This rank's tokens of ``x`` along ``dim`` (ids, labels, positions, document ids: one permutation);
    ``layout`` defaults to the global head-tail one."""
    layout = layout or head_tail_layout(x.shape[dim], cp_size)
    if layout.n != x.shape[dim] or layout.cp_size != cp_size:
        raise ValueError(f"the layout is for {layout.n} tokens over {layout.cp_size} ranks, not {x.shape[dim]} over "
                         f"{cp_size}")  # fmt: skip
    return x.index_select(dim, layout.positions(rank).to(x.device))


def unshard(shards: list[torch.Tensor], dim: int = 1, layout: Layout | None = None) -> torch.Tensor:
    """The full sequence from every rank's shard (in rank order): the inverse of ``shard_sequence``."""
    gathered = torch.cat(shards, dim=dim)
    layout = layout or head_tail_layout(gathered.shape[dim], len(shards))
    return gathered.index_select(dim, torch.argsort(layout.order()).to(gathered.device))


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
