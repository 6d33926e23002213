"""``scalestack retrieve``: serve a generative retriever with an allowed-ID set that may change while it runs."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..decode.retriever import Retriever

BATCH = 64


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrieve",
        help="decode semantic IDs for queries, constrained to an allowed set",
        description="Decode the best semantic IDs for each query with constrained beam search. Queries come "
        "from --queries (one per line; a TSV's first column; a header line 'query...' is skipped) or stdin.",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="retriever checkpoint (retrieval_demo writes one)")
    p.add_argument("--allowed", type=Path, help="allowed IDs: .ids text (one ID per line) or a saved .trie index")
    p.add_argument("--queries", type=Path, help="query file (default: stdin)")
    p.add_argument("--beams", type=int, default=10)
    p.add_argument("--top", type=int, default=3, help="IDs printed per query")
    p.add_argument("--unconstrained", action="store_true", help="ignore --allowed (for comparison)")
    p.add_argument("--watch", action="store_true", help="rebuild the index when the --allowed file changes")
    p.add_argument("--save-index", type=Path, help="also write the built index to this .trie file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.beams < 1 or args.top < 1:
        raise ValueError("--beams and --top must be positive")
    if args.allowed is None and not args.unconstrained:
        raise ValueError("pass --allowed FILE (the allowed IDs) or --unconstrained")
    retriever = Retriever(args.checkpoint)
    seen_mtime = None

    def refresh() -> None:
        nonlocal seen_mtime
        if args.unconstrained:
            return
        try:
            mtime = args.allowed.stat().st_mtime_ns
            if mtime == seen_mtime:
                return
            seen_mtime = mtime  # a bad update is retried at the file's next change, not at every query
            t0 = time.perf_counter()
            index = retriever.set_allowed(args.allowed)
        except (OSError, ValueError) as e:
            if retriever.index is None:
                raise
            # e.g. a file caught mid-write: keep serving the last good set
            print(f"scalestack retrieve: keeping the previous allowed set: {e}", file=sys.stderr, flush=True)
            return
        if args.save_index:
            index.save(args.save_index)
        print(
            f"# allowed: {index.num_ids} IDs from {args.allowed} (index {_size(index.nbytes)}, "
            f"built in {1e3 * (time.perf_counter() - t0):.0f} ms)",
            flush=True,
        )

    refresh()
    # A file is answered in batches; stdin line by line (a client waits for each answer).
    batch = 1 if args.queries is None or args.watch else BATCH
    source = args.queries.open() if args.queries else sys.stdin
    try:
        pending: list[str] = []
        for line in source:
            query = line.rstrip("\n").split("\t")[0].strip()
            if not query or query.startswith("#") or query.lower().startswith("query"):
                continue
            pending.append(query)
            if len(pending) == batch:
                answer(retriever, pending, args, refresh)
                pending = []
        if pending:
            answer(retriever, pending, args, refresh)
    finally:
        if source is not sys.stdin:
            source.close()
    return 0


def answer(retriever: Retriever, queries: list[str], args: argparse.Namespace, refresh) -> None:
    if args.watch:
        refresh()
    res = retriever.retrieve(queries, beams=args.beams, constrained=not args.unconstrained)
    for query, ids, scores, valid in zip(queries, res.ids.tolist(), res.scores.tolist(), res.valid.tolist()):
        shown = [f"{' '.join(map(str, i))} ({s:.2f})" for i, s, ok in zip(ids, scores, valid) if ok][: args.top]
        print(f"{query}\t" + ("\t".join(shown) if shown else "(no allowed ID)"), flush=True)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"
