"""Constrained decoding step: scalestack's TrieIndex against the usual alternatives, side by side.

    python benchmarks/decode.py [--sizes 100000,1000000,10000000] [--vocab 2048] [--length 8]

Every method runs the same beam search (batch 2, 70 beams, the same random log-probs per level) and the
same top-k selection; only the constraint differs:

* ``trie index``: scalestack.decode.TrieIndex, fixed-shape gathers.
* ``dict trie``: nested Python dicts walked per beam on the CPU (pointer chasing, one index_put per step).
* ``binary search``: the sorted ID array, every (beam, token) checked by a vectorized bisection (PPV, exact).
* ``hash bitmap``: a 2^30-bit bitmap of prefix hashes, every (beam, token) probed (false positives possible).
* ``unconstrained``: no constraint at all, the floor.

Trie index rows: dense_levels=2 (the default) and 1, eager and torch.compile (inductor; its compile time
is added to the build time). Prints, per N: build time, memory (bytes of the structure; for the dict trie
the process RSS growth), the mean time of one decoding step, the ratio to the trie index (dense_levels=2,
eager), and the share of final beams that are in C.
The dict trie is skipped above 10^6 IDs (tens of GB of Python objects).
"""

from __future__ import annotations

import argparse
import gc
import math
import time

import torch
import torch._dynamo

from scalestack.decode import LevelCandidates, TrieIndex, beam_step

DICT_TRIE_MAX = 1_000_000
torch._dynamo.config.cache_size_limit = 64  # a compiled graph per level and per method
torch._dynamo.config.recompile_limit = 64


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def dense(mask: torch.Tensor) -> LevelCandidates:
    n, vocab = mask.shape
    tokens = torch.arange(vocab).expand(n, vocab)
    return LevelCandidates(tokens, mask, torch.zeros_like(tokens), dense=True)


class TrieMethod:
    name = "trie index"
    dense_levels = 2
    compiled = False

    def __init__(self, ids: torch.Tensor, vocab: int):
        self.index = TrieIndex.build(ids, vocab, dense_levels=self.dense_levels)
        self.nbytes = self.index.nbytes
        if self.compiled:  # one graph per level (levels are constants); first calls compile
            self.step = torch.compile(self._step, fullgraph=True, dynamic=False)

    def _step(self, level, scores, logprobs, state, beams):
        return beam_step(scores, logprobs, self.index.candidates(level, state), beams)

    def start(self, n: int):
        return self.index.root_state(n)

    def candidates(self, level: int, state) -> LevelCandidates:
        return self.index.candidates(level, state)

    def advance(self, state, rows, token, next_state):
        return next_state.flatten()


class Trie1Method(TrieMethod):
    name = "trie index, dense_levels=1"
    dense_levels = 1


class CompiledTrieMethod(TrieMethod):
    name = "trie index, torch.compile"
    compiled = True


class CompiledTrie1Method(Trie1Method):
    name = "trie index, dense_levels=1, torch.compile"
    compiled = True


class DictTrieMethod:
    name = "dict trie"

    def __init__(self, ids: torch.Tensor, vocab: int):
        before = rss_bytes()
        self.root: dict = {}
        for row in ids.tolist():
            node = self.root
            for t in row:
                node = node.setdefault(t, {})
        self.vocab = vocab
        self.nbytes = rss_bytes() - before

    def start(self, n: int):
        return [self.root] * n

    def candidates(self, level: int, nodes) -> LevelCandidates:
        rows, cols = [], []
        for i, node in enumerate(nodes):
            cols.extend(node)
            rows.extend([i] * len(node))
        mask = torch.zeros(len(nodes), self.vocab, dtype=torch.bool)
        mask[rows, cols] = True
        return dense(mask)

    def advance(self, nodes, rows, token, next_state):
        return [nodes[r].get(t, self.root) for r, t in zip(rows.tolist(), token.flatten().tolist())]


class BinarySearchMethod:
    name = "binary search"

    def __init__(self, ids: torch.Tensor, vocab: int):
        order = torch.unique(ids, dim=0)  # lexicographic and deduplicated
        self.cols = [order[:, c].contiguous().to(torch.int32) for c in range(order.shape[1])]
        self.n = order.shape[0]
        self.steps = max(1, math.ceil(math.log2(self.n + 1)))
        self.vocab = vocab
        self.nbytes = sum(c.nbytes for c in self.cols)

    def start(self, n: int):
        return torch.zeros(n, dtype=torch.int64), torch.full((n,), self.n, dtype=torch.int64)

    def lower_bound(self, col, lo, hi, value):
        a, b = lo.clone(), hi.clone()
        for _ in range(self.steps):
            mid = (a + b) // 2
            go = (mid < b) & (col[mid.clamp(max=self.n - 1)] < value)
            a, b = torch.where(go, mid + 1, a), torch.where(go, b, mid)
        return a

    def candidates(self, level: int, state) -> LevelCandidates:
        lo, hi = state
        tokens = torch.arange(self.vocab).expand(lo.shape[0], self.vocab)
        first = self.lower_bound(self.cols[level], lo.unsqueeze(1), hi.unsqueeze(1), tokens)
        ok = (first < hi.unsqueeze(1)) & (self.cols[level][first.clamp(max=self.n - 1)] == tokens)
        return dense(ok)

    def advance(self, state, rows, token, next_state):
        lo, hi = (s[rows] for s in state)
        token = token.flatten()
        col = self.cols[self.level]
        return self.lower_bound(col, lo, hi, token), self.lower_bound(col, lo, hi, token + 1)


class HashBitmapMethod:
    name = "hash bitmap"
    BITS = 30
    PRIME = 2**31 - 1

    def __init__(self, ids: torch.Tensor, vocab: int):
        bits = torch.zeros(2**self.BITS, dtype=torch.bool)
        h = torch.zeros(ids.shape[0], dtype=torch.int64)
        for level in range(ids.shape[1]):
            h = self.mix(h, ids[:, level].long(), level)
            bits[h & (2**self.BITS - 1)] = True
        weights = 2 ** torch.arange(8, dtype=torch.uint8)
        self.bitmap = (bits.view(-1, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8)
        del bits
        self.vocab = vocab
        self.nbytes = self.bitmap.nbytes

    def mix(self, h, token, level):
        return ((h * 48271 + token + 1) % self.PRIME * 16807 + level) % self.PRIME

    def start(self, n: int):
        return torch.zeros(n, dtype=torch.int64)

    def candidates(self, level: int, h) -> LevelCandidates:
        tokens = torch.arange(self.vocab).expand(h.shape[0], self.vocab)
        key = self.mix(h.unsqueeze(1), tokens, level) & (2**self.BITS - 1)
        ok = ((self.bitmap[key >> 3] >> (key & 7).to(torch.uint8)) & 1).bool()
        return dense(ok)

    def advance(self, h, rows, token, next_state):
        return self.mix(h[rows], token.flatten(), self.level)


class UnconstrainedMethod:
    name = "unconstrained"
    nbytes = 0

    def __init__(self, ids: torch.Tensor, vocab: int):
        self.vocab = vocab

    def start(self, n: int):
        return n

    def candidates(self, level: int, n) -> LevelCandidates:
        return dense(torch.ones(n, self.vocab, dtype=torch.bool))

    def advance(self, n, rows, token, next_state):
        return rows.shape[0]


def decode(method, logprobs: list[torch.Tensor], batch: int, beams: int, vocab: int) -> tuple[torch.Tensor, float]:
    """One constrained beam search over precomputed log-probs; returns the IDs and seconds per step."""
    t0 = time.perf_counter()
    scores = torch.zeros(batch, 1)
    state = method.start(batch)
    ids = torch.zeros(batch, 1, 0, dtype=torch.int64)
    for level, lp in enumerate(logprobs):
        method.level = level
        m = scores.shape[1]
        if hasattr(method, "step"):
            scores, parent, token, nxt, _ = method.step(level, scores, lp, state, beams)
        else:
            scores, parent, token, nxt, _ = beam_step(scores, lp, method.candidates(level, state), beams)
        rows = (parent + torch.arange(batch).unsqueeze(1) * m).flatten()
        state = method.advance(state, rows, token, nxt)
        ids = torch.cat([ids.gather(1, parent.unsqueeze(-1).expand(-1, -1, ids.shape[2])), token.unsqueeze(-1)], 2)
    return ids, (time.perf_counter() - t0) / len(logprobs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000,10000000")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--length", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--beams", type=int, default=70)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", default="trie,trie1,trie-compiled,trie1-compiled,dict,bsearch,hash,free")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steady timings on a shared CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    classes = {
        "trie": TrieMethod,
        "trie1": Trie1Method,
        "trie-compiled": CompiledTrieMethod,
        "trie1-compiled": CompiledTrie1Method,
        "dict": DictTrieMethod,
        "bsearch": BinarySearchMethod,
        "hash": HashBitmapMethod,
        "free": UnconstrainedMethod,
    }
    torch.manual_seed(0)
    logprobs = [
        torch.log_softmax(torch.randn(args.batch * (1 if level == 0 else args.beams), args.vocab) * 3, -1)
        for level in range(args.length)
    ]
    print(
        f"L={args.length}, V={args.vocab}, batch {args.batch}, beams {args.beams}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; step = mean over the {args.length} levels, best of {args.repeats}"
    )
    print("| N | method | build | memory | MB per 1M IDs | step | vs trie index | beams in C |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        ids = torch.randint(0, args.vocab, (n, args.length), generator=torch.Generator().manual_seed(n))
        check = None
        trie_step = None
        for key in args.methods.split(","):
            cls = classes[key]
            if cls is DictTrieMethod and n > DICT_TRIE_MAX:
                print(f"| {n:.0e} | {cls.name} | skipped: Python objects for this many IDs need tens of GB |||||")
                continue
            gc.collect()
            t0 = time.perf_counter()
            method = cls(ids, args.vocab)
            build = time.perf_counter() - t0
            if hasattr(method, "step"):
                t0 = time.perf_counter()
                decode(method, logprobs, args.batch, args.beams, args.vocab)  # compiles
                build += time.perf_counter() - t0
            best = math.inf
            for _ in range(args.repeats):
                out, step = decode(method, logprobs, args.batch, args.beams, args.vocab)
                best = min(best, step)
            if cls is TrieMethod:
                check, trie_step = method.index, best
            in_c = (
                float(check.contains(out.view(-1, args.length)).float().mean()) if check is not None else float("nan")
            )
            ratio = f"{best / trie_step:.1f}x" if trie_step else ""
            mb = f"{method.nbytes / n:.1f}" if method.nbytes else "-"
            print(
                f"| {n:.0e} | {cls.name} | {build:.2f} s | {method.nbytes / 2**20:.1f} MiB | {mb} | "
                f"{best * 1e3:.3f} ms | {ratio} | {100 * in_c:.1f}% |",
                flush=True,
            )
            del method
        del ids


if __name__ == "__main__":
    main()
