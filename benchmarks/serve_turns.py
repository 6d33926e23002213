"""Agent loops against ``scalestack serve``: per-turn time to first token and end-to-end latency against
the turn index, for HTTP full resend, HTTP with previous_response_id, and WebSocket mode with KV reuse (with
and without a generate=false warmup), at concurrency 1 and 8.

The workload: fixed instructions and three function tools (~1.8k tokens), a task message, then each turn a
200-token tool output; the model answers 32 tokens per turn (sampled with a seed: an untrained byte model's
greedy answer is whitespace, which a tool-calling server holds back, so time to first token would not
show). The model is a byte-level GPT
(4 layers x 128, 16k positions) written by ``scalestack train`` (one step: the weights do not matter for
timing), served by ``scalestack serve`` in its own process. A chain of 40 turns is run once per arm and
concurrency; its first 8 and 20 turns are the 8- and 20-turn chains (the same requests). Eight concurrent
chains run 20 turns (40 would take most of an hour of full-resend prefill on 2 cores).

    python benchmarks/serve_turns.py --out runs/serve-bench          # ~12 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "data" / "public_domain.txt").read_text(encoding="utf-8")
ARMS = ("http-full-resend", "http-previous-id", "ws-kv-reuse", "ws-kv-reuse+warmup")
OUTPUT_TOKENS = 32
THREADS = 1  # torch threads in the server: the client shares the 2 cores (spinning OpenMP threads starve it)
TOOLS = [
    {"type": "function", "name": name, "description": description,
     "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": description}},
                    "required": ["query"]}}
    for name, description in (("search_files", "Search the repository for files whose text matches a query."),
                              ("read_file", "Read a file of the repository; returns its text."),
                              ("run_tests", "Run the test suite and return a summary of failures."))
]  # fmt: skip


def excerpt(index: int, size: int) -> str:
    start = (index * 7919) % (len(TEXT) - size)
    return TEXT[start : start + size]


INSTRUCTIONS = "You are a coding agent. Follow the repository's rules.\n" + excerpt(1, 700)
TASK = "Fix the failing test in the trainer and explain the change."


def train_model(model_dir: Path) -> None:
    if (model_dir / "model.json").is_file():
        return
    config = model_dir.parent / "model.toml"
    config.write_text(f'run_dir = "{model_dir}"\n[model]\nname = "gpt-small"\n[data]\nseq_len = 16384\n'
                      "[train]\nsteps = 1\nglobal_batch = 1\nmicro_batch = 1\ntensorboard = false\n")  # fmt: skip
    subprocess.run([sys.executable, "-m", "scalestack.cli.main", "train", str(config)], check=True)


def start_server(model_dir: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "scalestack.cli.main", "serve", str(model_dir), "--port", str(port),
               "--model-name", "agent", "--kv-budget", "4GiB", "--threads", str(THREADS)]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return server
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not start") from None
            time.sleep(0.3)


def turn_input(turn: int) -> list[dict]:
    if turn == 0:
        return [{"role": "user", "content": TASK}]
    return [{"type": "function_call_output", "call_id": f"call_{turn}", "output": excerpt(100 + turn, 200)}]


async def chain(client: openai.AsyncOpenAI, arm: str, turns: int, seed: int) -> list[dict]:
    """One agent loop; per turn: ttft and e2e seconds, input and cached tokens."""
    common = dict(model="agent", instructions=INSTRUCTIONS, tools=TOOLS, max_output_tokens=OUTPUT_TOKENS,
                  temperature=1.0)  # fmt: skip
    rows, history, previous = [], [], None
    if arm.startswith("ws"):
        async with client.responses.connect() as conn:
            create = {"type": "response.create", **common, "seed": seed, "store": False}  # raw: seed is ours
            if arm.endswith("warmup"):  # instructions and tools prefilled before the task arrives
                await conn.send({**create, "input": [], "generate": False})
                previous = (await _terminal(conn))[0].response.id
            for turn in range(turns):
                t0 = time.perf_counter()
                await conn.send({**create, "input": turn_input(turn), "previous_response_id": previous})
                event, ttft = await _terminal(conn, t0)
                rows.append(_row(event.response, ttft, time.perf_counter() - t0))
                previous = event.response.id
        return rows
    for turn in range(turns):
        history += turn_input(turn)
        t0 = time.perf_counter()
        if arm == "http-full-resend":
            stream = await client.responses.create(**common, input=history, stream=True, extra_body={"seed": seed})
        else:
            stream = await client.responses.create(**common, input=turn_input(turn), previous_response_id=previous,
                                                   stream=True, extra_body={"seed": seed})  # fmt: skip
        ttft = None
        async for event in stream:
            if ttft is None and event.type == "response.output_text.delta":
                ttft = time.perf_counter() - t0
            if event.type in ("response.completed", "response.incomplete", "response.failed"):
                response = event.response
        rows.append(_row(response, ttft, time.perf_counter() - t0))
        previous = response.id
        history.append({"role": "assistant", "content": response.output_text})
    return rows


async def _terminal(conn, t0: float | None = None):
    ttft = None
    async for event in conn:
        if ttft is None and t0 is not None and event.type == "response.output_text.delta":
            ttft = time.perf_counter() - t0
        if event.type in ("response.completed", "response.incomplete", "response.failed", "error"):
            if event.type == "error":
                raise RuntimeError(event.error.message)
            return event, ttft


def _row(response, ttft: float | None, e2e: float) -> dict:
    usage = response.usage
    return {"ttft": ttft if ttft is not None else e2e, "e2e": e2e, "input_tokens": usage.input_tokens,
            "cached_tokens": usage.input_tokens_details.cached_tokens}  # fmt: skip


async def run_arm(url: str, arm: str, concurrency: int, turns: int) -> list[list[dict]]:
    async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600) as client:
        return await asyncio.gather(*(chain(client, arm, turns, seed) for seed in range(concurrency)))


def _chain_s(chains: list[list[dict]], n: int) -> float:
    return statistics.median(sum(r["e2e"] for r in ch[:n]) for ch in chains)


def _median_by_turn(chains: list[list[dict]], key: str) -> list[float]:
    return [statistics.median(ch[t][key] for ch in chains) for t in range(len(chains[0]))]


def summarize(results: dict) -> list[str]:
    lines = ["| arm | chains | turns | TTFT turn 1 | TTFT turn 2 | TTFT last | last / turn 1 | last / turn 2 | "
             "chain 8 | chain 20 | chain 40 | chain vs full resend (8 / 20 / 40 turns) | cache hit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (arm, concurrency), chains in results.items():
        turns = len(chains[0])
        lengths = [n for n in (8, 20, 40) if n <= turns]
        base = results[("http-full-resend", concurrency)]
        ttft = _median_by_turn(chains, "ttft")
        hit = sum(r["cached_tokens"] for ch in chains for r in ch) / sum(r["input_tokens"] for ch in chains for r in ch)
        cells = [f"{_chain_s(chains, n):.1f} s" if n in lengths else "" for n in (8, 20, 40)]
        versus = " / ".join(f"{_chain_s(chains, n) / _chain_s(base, n):.2f}x" for n in lengths)
        lines.append(f"| {arm} | {concurrency} | {turns} | {ttft[0] * 1e3:.0f} ms | {ttft[1] * 1e3:.0f} ms | "
                     f"{ttft[-1] * 1e3:.0f} ms | {ttft[-1] / ttft[0]:.2f}x | {ttft[-1] / ttft[1]:.2f}x | "
                     f"{' | '.join(cells)} | {versus} | {hit:.1%} |")  # fmt: skip
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrencies = sorted({c for _, c in results})
    fig, axes = plt.subplots(2, len(concurrencies), figsize=(6 * len(concurrencies), 7.5), squeeze=False)
    for column, concurrency in enumerate(concurrencies):
        for row, (key, label) in enumerate((("ttft", "time to first token"), ("e2e", "end-to-end latency"))):
            ax = axes[row][column]
            for arm in ARMS:
                chains = results[(arm, concurrency)]
                values = [v * 1e3 for v in _median_by_turn(chains, key)]
                ax.plot(range(1, len(values) + 1), values, label=arm, marker=".")
            ax.set(title=f"{label}, {concurrency} concurrent chain(s)", xlabel="turn", ylabel=f"median {label} (ms)")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "serve-bench")
    parser.add_argument("--runs", default="1x40,8x20", help="concurrency x turns, comma-separated")
    parser.add_argument("--port", type=int, default=18777)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train_model(args.out / "model")
    server = start_server(args.out / "model", args.port)
    url = f"http://127.0.0.1:{args.port}/v1"
    results = {}
    try:
        for run in args.runs.split(","):
            concurrency, turns = (int(x) for x in run.split("x"))
            for arm in ARMS:
                t0 = time.perf_counter()
                results[(arm, concurrency)] = asyncio.run(run_arm(url, arm, concurrency, turns))
                print(f"{arm}, {concurrency} chain(s) of {turns} turns: {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=120)
    table = summarize(results)
    print("\n".join(table))
    (args.out / "serve_turns.md").write_text("\n".join(table) + "\n")
    (args.out / "serve_turns.json").write_text(json.dumps({f"{a}@{c}": r for (a, c), r in results.items()}))
    plot(results, args.out / "serve_turns.png")


if __name__ == "__main__":
    main()
