"""A prefix trie of allowed IDs, flattened so that one decoding step is a fixed-shape gather.

STATIC ("Vectorizing the Trie", arXiv 2602.22647): dense tables for the first ``dense_levels`` levels, a
CSR transition table for the deeper ones. Two changes from the paper make it smaller and cheaper:

* Nodes of each depth are numbered in lexicographic order, so the children of a node are one contiguous
  run of the next depth's ids, in the same order as its CSR edges. The next state of an edge is therefore
  its own position: the CSR stores only tokens (int16 when the vocabulary allows), no (token, next) pairs.
* A level where every node has exactly one child (deep levels of sparse ID sets) stores no row pointers.

A beam's state at depth ``k`` is a node id of that depth. For the dense levels (``k < dense_levels``) it is
the prefix code ``t0*V^(k-1) + ... + t(k-1)`` (0 at the root).
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .checks import integer_codes, positive_int

FORMAT = "scalestack.TrieIndex/1"
DENSE_TABLE_LIMIT = 2**31  # entries; V**dense_levels beyond this cannot be indexed with int32 states
PROGRESS_MIN_IDS = 1_000_000


@dataclass
class LevelCandidates:
    """What one beam may emit next: ``tokens[n, K]`` (codes), ``valid[n, K]`` and ``next_state[n, K]``
    (meaningful where valid). ``dense`` says candidate ``j`` is code ``j`` in every row (``K`` = vocabulary),
    so a consumer may read log-probs as they are instead of gathering them."""

    tokens: torch.Tensor
    valid: torch.Tensor
    next_state: torch.Tensor
    dense: bool = False


@dataclass(eq=False)
class TrieIndex:
    """Allowed IDs of ``length`` tokens from a vocabulary of ``vocab_size`` codes; see the module docstring.

    Build with :meth:`build`, persist with :meth:`save` / :meth:`load` (one file, memory-mapped on load).
    """

    vocab_size: int
    length: int
    dense_levels: int
    num_ids: int
    dense_masks: list[torch.Tensor]  # level l < dense_levels-1: bool[V**(l+1)], prefix code -> allowed
    dense_states: torch.Tensor | None  # int32[V**dense_levels]: prefix code -> node id at that depth, -1 if none
    indptr: list[torch.Tensor | None]  # CSR level k (depth k -> k+1): int32/int64[n_k + 1]; None: 1 child each
    tokens: list[torch.Tensor]  # CSR level k: int16/int32[n_{k+1} + max_branches[k]], padded with vocab_size
    level_sizes: list[int]  # n_k: nodes at depth k, k = 0..length
    max_branches: list[int]  # per level: the largest number of children of one node

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        ids: torch.Tensor,
        vocab_size: int,
        dense_levels: int = 2,
        *,
        progress: bool | None = None,
    ) -> TrieIndex:
        """Index the rows of ``ids`` (``LongTensor[N, L]``, codes in ``[0, vocab_size)``).

        Rows are sorted and deduplicated; everything is vectorized over rows (the only Python loops run
        over levels). ``progress=None`` shows a bar for at least a million IDs on a terminal.
        """
        ids, vocab_size, dense_levels = _check_build_args(ids, vocab_size, dense_levels)
        n_rows, length = ids.shape
        if progress is None:
            progress = n_rows >= PROGRESS_MIN_IDS and sys.stderr.isatty()
        with _Progress(progress, total=2 + length) as bar:
            ids = _sort_rows(ids, vocab_size)
            bar.advance("sorted")
            first_diff = _first_difference(ids)
            keep = first_diff < length
            ids, first_diff = ids[keep], first_diff[keep]
            bar.advance("deduplicated")
            n = ids.shape[0]
            level_sizes = [1]
            prev_node = torch.zeros(n, dtype=torch.int64)  # node id at depth k of each row's prefix
            dense_masks: list[torch.Tensor] = []
            dense_states = None
            indptr: list[torch.Tensor | None] = []
            tokens: list[torch.Tensor] = []
            max_branches: list[int] = []
            code = torch.zeros(n, dtype=torch.int64)
            token_dtype = torch.int16 if vocab_size < 2**15 else torch.int32
            for k in range(length):
                starts = first_diff <= k  # rows that open a new node at depth k+1
                node = torch.cumsum(starts, 0) - 1
                n_next = int(node[-1]) + 1
                parents = prev_node[starts]
                branching = torch.bincount(parents, minlength=level_sizes[k])
                max_branches.append(int(branching.max()))
                if k < dense_levels:
                    code = code * vocab_size + ids[:, k]
                if k < dense_levels - 1:
                    mask = torch.zeros(vocab_size ** (k + 1), dtype=torch.bool)
                    mask[code[starts]] = True
                    dense_masks.append(mask)
                elif k == dense_levels - 1:
                    dense_states = torch.full((vocab_size**dense_levels,), -1, dtype=torch.int32)
                    dense_states[code[starts]] = node[starts].to(torch.int32)
                else:
                    ptr_dtype = torch.int32 if n_next < 2**31 else torch.int64
                    if n_next == level_sizes[k]:
                        indptr.append(None)
                    else:
                        ptr = torch.zeros(level_sizes[k] + 1, dtype=ptr_dtype)
                        ptr[1:] = torch.cumsum(branching, 0)
                        indptr.append(ptr)
                    pad = torch.full((max_branches[k],), vocab_size, dtype=token_dtype)
                    tokens.append(torch.cat([ids[starts, k].to(token_dtype), pad]))
                level_sizes.append(n_next)
                prev_node = node
                bar.advance(f"level {k + 1}/{length}")
        return cls(
            vocab_size=vocab_size,
            length=length,
            dense_levels=dense_levels,
            num_ids=n,
            dense_masks=dense_masks,
            dense_states=dense_states,
            indptr=indptr,
            tokens=tokens,
            level_sizes=level_sizes,
            max_branches=max_branches,
        )

    # ------------------------------------------------------------------ size and persistence
    @property
    def nbytes(self) -> int:
        """Bytes held by the index's tensors."""
        return sum(t.nbytes for t in self._tensors())

    def _tensors(self) -> list[torch.Tensor]:
        out = [*self.dense_masks, *self.tokens, *(p for p in self.indptr if p is not None)]
        return out + ([self.dense_states] if self.dense_states is not None else [])

    @property
    def device(self) -> torch.device:
        return self.tokens[0].device if self.tokens else self.dense_states.device

    def _fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to(self, device: torch.device | str) -> TrieIndex:
        """A copy of the index on ``device`` (decode where the model runs: the step is gathers only)."""

        def move(v):
            if isinstance(v, list):
                return [move(t) for t in v]
            return v.to(device) if isinstance(v, torch.Tensor) else v

        return TrieIndex(**{name: move(v) for name, v in self._fields().items()})

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to one file that :meth:`load` memory-maps.

        The file is written beside ``path`` and renamed over it, so an index still mapped from an older
        file at ``path`` (a server between two rule updates) keeps reading its own bytes.
        """
        if self.device.type != "cpu":
            return self.to("cpu").save(path)
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"format": FORMAT, **self._fields()}, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True) -> TrieIndex:
        """Read an index written by :meth:`save`; with ``mmap`` its tables stay on disk until touched."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no trie index at {path}")
        try:
            data = torch.load(path, mmap=mmap, weights_only=True)
        except Exception as e:  # torch raises several types for a file that is not a torch archive
            raise ValueError(f"{path} is not a scalestack TrieIndex file ({e.__class__.__name__}: {e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a scalestack TrieIndex file (expected format {FORMAT!r})")
        data.pop("format")
        return cls(**data)

    def __repr__(self) -> str:  # not the dataclass one: that would print every table
        return (
            f"TrieIndex(num_ids={self.num_ids}, length={self.length}, vocab_size={self.vocab_size}, "
            f"dense_levels={self.dense_levels}, max_branches={self.max_branches}, nbytes={self.nbytes})"
        )

    # ------------------------------------------------------------------ decoding
    def root_state(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The state of ``n`` empty prefixes."""
        return torch.zeros(n, dtype=torch.int64, device=device)

    def width(self, level: int) -> int:
        """Candidates per beam at ``level``: the vocabulary on dense levels, the max branching on CSR ones."""
        return self.vocab_size if level < self.dense_levels else self.max_branches[level]

    def candidates(self, level: int, state: torch.Tensor) -> LevelCandidates:
        """The tokens each state may emit at ``level`` and the states they lead to, in fixed shape
        ``[n, width(level)]``. Gathers only: no host sync, no branch on data."""
        if not 0 <= level < self.length:
            raise ValueError(f"level must be in [0, {self.length}), got {level}")
        if state.dim() != 1:
            raise ValueError(f"state must be 1-D [n] (one state per beam), got shape {tuple(state.shape)}")
        V = self.vocab_size
        if level < self.dense_levels:  # the state is the prefix code: one table row per beam
            slots = torch.arange(V, device=state.device).expand(state.shape[0], V)
            if level < self.dense_levels - 1:
                valid = self.dense_masks[level].view(-1, V).index_select(0, state)
                next_state = state.unsqueeze(1) * V + slots
            else:
                next_state = self.dense_states.view(-1, V).index_select(0, state)  # int32, -1: not allowed
                valid = next_state >= 0
            return LevelCandidates(slots, valid, next_state, dense=True)
        k = level - self.dense_levels
        width = self.max_branches[level]
        slots = torch.arange(width, device=state.device)
        ptr = self.indptr[k]
        if ptr is None:
            start = state
            count = torch.ones_like(state)
        else:
            start = ptr[state].long()
            count = ptr[state + 1].long() - start
        edges = start.unsqueeze(1) + slots
        valid = slots < count.unsqueeze(1)
        tokens = self.tokens[k][edges].long()
        return LevelCandidates(tokens, valid, torch.where(valid, edges, 0))

    def walk(self, prefixes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """States reached by ``prefixes[n, l]`` and whether each prefix is in the trie (``found[n]``)."""
        prefixes = integer_codes(prefixes, "prefixes")
        if prefixes.dim() != 2 or prefixes.shape[1] > self.length:
            raise ValueError(f"prefixes must be [n, l] with l <= {self.length}, got shape {tuple(prefixes.shape)}")
        n, V = prefixes.shape[0], self.vocab_size
        found = ((prefixes >= 0) & (prefixes < V)).all(1)
        prefixes = prefixes.clamp(0, V - 1)
        state = self.root_state(n, prefixes.device)
        for level in range(prefixes.shape[1]):
            token = prefixes[:, level]
            if level < self.dense_levels:  # one table entry per prefix, not a row of V candidates
                code = state * V + token
                if level < self.dense_levels - 1:
                    found &= self.dense_masks[level][code]
                    state = code
                else:
                    nxt = self.dense_states[code].long()
                    found &= nxt >= 0
                    state = nxt.clamp_min(0)
            else:
                cand = self.candidates(level, state)
                match = (cand.tokens == token.unsqueeze(1)) & cand.valid
                found &= match.any(1)
                state = cand.next_state.gather(1, match.long().argmax(1, keepdim=True)).squeeze(1).long()
            state = torch.where(found, state, 0)
        return state, found

    def contains(self, ids: torch.Tensor) -> torch.Tensor:
        """``bool[n]``: which rows of ``ids[n, length]`` are allowed IDs."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] != self.length:
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"ids must be [n, {self.length}], got {shape}")
        return self.walk(ids)[1]


# ---------------------------------------------------------------------- helpers
def _check_build_args(ids: torch.Tensor, vocab_size: int, dense_levels: int) -> tuple[torch.Tensor, int, int]:
    ids = integer_codes(ids, "ids")
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"ids must be a 2-D tensor [N, L] with L >= 1, got shape {tuple(ids.shape)}")
    if ids.shape[0] == 0:
        raise ValueError("the constraint set is empty: pass at least one allowed ID (an empty set allows nothing)")
    vocab_size = positive_int(vocab_size, "vocab_size")
    length = ids.shape[1]
    if isinstance(dense_levels, bool) or not isinstance(dense_levels, int) or not 0 <= dense_levels <= length:
        raise ValueError(f"dense_levels must be an int in [0, {length}] (the ID length), got {dense_levels!r}")
    if vocab_size**dense_levels > DENSE_TABLE_LIMIT:
        raise ValueError(
            f"dense_levels={dense_levels} needs a table of vocab_size**{dense_levels} = {vocab_size**dense_levels} "
            f"entries (limit {DENSE_TABLE_LIMIT}); use fewer dense levels"
        )
    ids = ids.detach().cpu()
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        row = int(((ids == bad).any(1)).nonzero()[0])
        raise ValueError(
            f"ID codes must lie in [0, vocab_size={vocab_size}); row {row} holds {bad}. Map model tokens to "
            "per-level codes first, or raise vocab_size"
        )
    return ids.to(torch.int32 if vocab_size < 2**31 else torch.int64), vocab_size, dense_levels


def _sort_rows(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Lexicographic row order: stable sorts on int64 keys packing as many columns as fit, last group first."""
    bits = max(1, (vocab_size - 1).bit_length())
    per_key = max(1, 63 // bits)
    order = torch.arange(ids.shape[0])
    length = ids.shape[1]
    for hi in range(length, 0, -per_key):
        lo = max(0, hi - per_key)
        key = torch.zeros(ids.shape[0], dtype=torch.int64)
        for c in range(lo, hi):
            key = (key << bits) | ids[order, c].long()
        perm = torch.sort(key, stable=True).indices
        order = order[perm]
    return ids[order]


def _first_difference(ids: torch.Tensor) -> torch.Tensor:
    """For each sorted row, the first column where it differs from the previous row (L for a duplicate)."""
    n, length = ids.shape
    out = torch.zeros(n, dtype=torch.int64)
    if n > 1:
        differs = ids[1:] != ids[:-1]
        first = differs.to(torch.uint8).argmax(1)
        out[1:] = torch.where(differs.any(1), first, length)
    return out


class _Progress:
    """A rich progress bar over build stages when asked for and rich is installed; silent otherwise."""

    def __init__(self, enabled: bool, total: int):
        self.bar = None
        if enabled:
            try:
                from rich.progress import Progress
            except ImportError:
                return
            self.bar = Progress(transient=True)
            self.task = self.bar.add_task("building trie index", total=total)

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def advance(self, what: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=f"building trie index: {what}")

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
