"""Pure parts of the server: chat-template tails, tool-call parsing, stop strings, the KV pool, sampling and
the engine against a brute-force (no cache, one sequence at a time) greedy decode of the same model."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

pytest.importorskip("starlette")

from serve_helpers import sharpen, tiny_gpt  # noqa: E402

from scalestack.cli.serve import byte_size  # noqa: E402
from scalestack.serve.chat import CHATML_TEMPLATE, ChatTemplate, TemplateError, parse_tool_calls  # noqa: E402
from scalestack.serve.engine import Engine, Generation  # noqa: E402
from scalestack.serve.errors import ServeError  # noqa: E402
from scalestack.serve.items import to_messages, to_tools  # noqa: E402
from scalestack.serve.kv_cache import KVCache, KVPool  # noqa: E402
from scalestack.serve.runners import GPTRunner, HFRunner  # noqa: E402
from scalestack.serve.sampling import SamplingParams, sample  # noqa: E402
from scalestack.serve.text_stream import TextStream  # noqa: E402

CHATML = ChatTemplate(CHATML_TEMPLATE)
SYSTEM = {"role": "system", "content": "Be brief."}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_tail_continues_the_exact_prefix_of_the_full_rendering():
    first = [SYSTEM, user("hi")]
    answer = {"role": "assistant", "content": "hello there"}
    new = [user("and then?")]
    chained = CHATML.prompt(first, None) + "hello there" + CHATML.tail([*first, answer], new, None)
    assert chained == CHATML.prompt([*first, answer, *new], None)
    tool_history = [*first, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "id": "c1", "function": {"name": "f", "arguments": {"x": 1}}}]}]  # fmt: skip
    tail = CHATML.tail(tool_history, [{"role": "tool", "content": "42", "tool_call_id": "c1"}], None)
    assert tail == "<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"


def test_prefill_only_text_and_the_next_tail_give_the_full_rendering():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    first = [SYSTEM]  # a warmup of the instructions and tools alone
    text, closing = CHATML.prefill_text([], first, tools)
    assert text == CHATML.render(first, tools, add_generation_prompt=False) and "# Tools" in closing
    tail = CHATML.tail(first, [user("go")], tools)
    assert tail.startswith(closing)
    assert text + tail[len(closing) :] == CHATML.prompt([*first, user("go")], tools)
    more, closing = CHATML.prefill_text(first, [user("more")], tools)  # a warmup continuing a chain
    assert more.endswith("<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n") and closing == "<|im_end|>\n"
    assert CHATML.prefill_text(first, [], tools) == ("", "")


def test_a_template_that_raises_or_drops_content_is_a_clear_error():
    with pytest.raises(TemplateError, match="refused"):
        ChatTemplate("{{ raise_exception('no system role') }}").prompt([user("x")], None)
    with pytest.raises(TemplateError, match="drops the content"):
        ChatTemplate("{% for m in messages %}{{ m.role }}{% endfor %}").tail([user("a")], [user("b")], None)


def test_tool_calls_are_parsed_and_bad_blocks_stay_text():
    text = 'Let me check.<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>' \
           '<tool_call>{"name": "g", "parameters": {}}</tool_call><tool_call>not json</tool_call>'  # fmt: skip
    plain, calls = parse_tool_calls(text)
    assert calls == [{"name": "f", "arguments": '{"a": 1}'}, {"name": "g", "arguments": "{}"}]
    assert plain == "Let me check.<tool_call>not json</tool_call>"
    assert parse_tool_calls("no calls") == ("no calls", [])


def test_items_become_chat_messages_and_bad_items_are_named():
    names: dict[str, str] = {}
    messages = to_messages([
        {"role": "developer", "content": "rules"},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"x": 1}'},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        {"type": "reasoning", "summary": []},
        {"type": "function_call_output", "call_id": "c2", "output": "ok"},
    ], names)  # fmt: skip
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[1]["content"] == "ab"
    assert [c["function"]["name"] for c in messages[2]["tool_calls"]] == ["f", "g"]
    assert messages[3] == {"role": "tool", "tool_call_id": "c2", "name": "g", "content": "ok"}
    for bad, where in ((["x"], "input[0]"), ([{"role": "robot", "content": "x"}], "input[0].role"),
                       ([{"type": "computer_call"}], "input[0].type"),
                       ([{"role": "user", "content": [{"type": "input_image"}]}], "input[0].content[0]")):  # fmt: skip
        with pytest.raises(ServeError) as e:
            to_messages(bad, {})
        assert e.value.status == 400 and e.value.param == where
    with pytest.raises(ServeError, match="only function tools"):
        to_tools([{"type": "web_search"}])


def test_text_stream_holds_back_stop_strings_and_split_characters():
    stream = TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"), ["<|im_end|>"])
    out = "".join(stream.push(b) for b in "héllo <|im".encode())
    assert out == "héllo "  # "<|im" may start the stop string: held back
    out += "".join(stream.push(b) for b in b"_end|>tail")
    assert out == "héllo " and stream.stopped_by == "<|im_end|>"
    stream = TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"), ["STOP"])
    assert "".join(stream.push(b) for b in b"ab ST") == "ab "
    assert stream.finish() == "ST"  # ran out of tokens: what was held back is text after all


def test_kv_pool_evicts_idle_caches_least_recently_used_first_within_its_budget():
    def cache(pool: KVPool) -> KVCache:
        c = KVCache(2, 2, 4, torch.float32, torch.device("cpu"))
        c.reserve(256)  # 2 * 2 layers * 2 heads * 4 dim * 256 positions * 4 bytes = 32 KiB
        pool.add(c)
        return c

    pool = KVPool(budget=3 * 32 * 1024, ttl=60)
    a, b, c = cache(pool), cache(pool), cache(pool)
    b.users = 1  # a generation extends it: never evicted
    pool.touch(a)  # order now b, c, a
    assert pool.fit(2 * 32 * 1024)  # room for two more: c then a go (b is in use)
    assert c.evicted and a.evicted and not b.evicted and pool.evictions == 2
    assert not pool.fit(4 * 32 * 1024)  # cannot make room: b is in use
    b.users = 0
    pool.ttl = 0.0
    time.sleep(0.01)
    pool.fit()
    assert b.evicted and len(pool) == 0


def test_kv_cache_grows_and_copies_prefixes_without_changing_them():
    c = KVCache(1, 2, 3, torch.float64, torch.device("cpu"))
    c.reserve(4)
    c.keys[0][0, :, :4] = torch.arange(24.0).view(2, 4, 3)
    c.length = 4
    before = c.keys[0][0, :, :4].clone()
    c.reserve(1000)
    assert c.capacity >= 1000 and torch.equal(c.keys[0][0, :, :4], before)
    copy = c.prefix_copy(3)
    assert copy.length == 3 and torch.equal(copy.keys[0][0, :, :3], before[:, :3])


def test_sampling_is_greedy_at_zero_and_repeatable_with_a_seed():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    assert sample(logits, SamplingParams(temperature=0), torch.Generator()) == 1
    assert sample(logits, SamplingParams(temperature=1, top_p=1e-6), torch.Generator()) == 1
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    draws = [[sample(logits, params, g) for _ in range(50)] for g in (params.generator(), params.generator())]
    assert draws[0] == draws[1] and set(draws[0]) <= {1, 2, 0}
    assert 3 not in draws[0]  # outside the top-p nucleus


def test_byte_sizes():
    assert byte_size("2GiB") == 2 * 2**30 and byte_size("512MiB") == 512 * 2**20 and byte_size("1e6") == 10**6
    with pytest.raises(Exception, match="not a size"):
        byte_size("lots")


# --- the engine against a brute force ---


def brute_force_greedy(forward, ids: list[int], n: int) -> list[int]:
    """Greedy tokens by a full forward of the whole sequence for every token (no cache, batch of one)."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(forward(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


def run_engine(runner, requests: list[tuple[list[int], tuple | None]], n: int, prefill_chunk: int = 7):
    """Run ``requests`` (ids, prefix) concurrently on a fresh engine; their output ids and caches."""
    pool = KVPool(2**30)
    engine = Engine(runner, pool, max_batch=8, prefill_chunk=prefill_chunk)

    async def main():
        loop = asyncio.get_running_loop()
        decode = lambda x: bytes(x).decode("utf-8", "replace")  # noqa: E731
        params = SamplingParams(temperature=0, max_tokens=n)
        gens = [Generation(torch.tensor(ids), params, prefix, True, loop, asyncio.Queue(), decode)
                for ids, prefix in requests]  # fmt: skip
        for g in gens:
            engine.submit(g)
        for g in gens:
            while (await g.events.get())[0] != "done":
                pass
        return gens

    engine.start()
    try:
        return asyncio.run(main())
    finally:
        engine.stop()


@pytest.mark.parametrize("kind", ["gpt", "hf"])
def test_batched_ragged_decoding_and_cached_prefixes_equal_a_brute_force_decode(kind):
    if kind == "gpt":
        model = tiny_gpt()
        runner, forward = GPTRunner(model), model
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
        model = sharpen(LlamaForCausalLM(config).double().eval())
        runner, forward = HFRunner(model), lambda x: model(input_ids=x).logits
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 23, 40)]
    with torch.no_grad():
        expected = [brute_force_greedy(forward, p, 12) for p in prompts]
    gens = run_engine(runner, [(p, None) for p in prompts], 12)  # three lengths decoded in one batch
    assert [gen.output_ids for gen in gens] == expected
    # a continuation from the first one's cache: the prefix is reused, only the new tokens are prefilled
    first = gens[0]
    held = first.cache.length
    assert held == len(prompts[0]) + 11  # the last sampled token is not fed back
    context = prompts[0] + first.output_ids + [65, 66, 67]
    cont = run_engine(runner, [(context, (first.cache, held))], 8)[0]
    assert cont.cached_tokens == held
    with torch.no_grad():
        assert cont.output_ids == brute_force_greedy(forward, context, 8)


def test_a_request_that_fails_ends_alone_and_the_others_finish():
    model = tiny_gpt()
    pool = KVPool(2**30)
    engine = Engine(GPTRunner(model), pool, max_batch=8)

    async def main():
        loop = asyncio.get_running_loop()
        decode = lambda x: bytes(x).decode("utf-8", "replace")  # noqa: E731
        good = Generation(torch.tensor(list(b"hello")), SamplingParams(temperature=1e-30, max_tokens=6), None,
                          True, loop, asyncio.Queue(), decode)  # fmt: skip
        bad = Generation(torch.tensor(list(b"world")), SamplingParams(seed=2**70, max_tokens=6), None, True, loop,
                         asyncio.Queue(), decode)  # fmt: skip
        for g in (bad, good):
            engine.submit(g)
        ends = []
        for g in (bad, good):
            while (event := await asyncio.wait_for(g.events.get(), 30))[0] != "done":
                pass
            ends.append(event[1])
        return ends, good

    engine.start()
    try:
        (bad_end, good_end), good = asyncio.run(main())
    finally:
        engine.stop()
    assert bad_end.startswith("error: ") and good_end == "length"
    with torch.no_grad():  # a temperature of 1e-30 is greedy, not NaN
        assert good.output_ids == brute_force_greedy(model, list(b"hello"), 6)
    assert all(cache.users == 0 for cache, _ in pool._caches.values())
