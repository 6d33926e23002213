"""The server on a loopback port, driven by the official ``openai`` SDK over HTTP and WebSocket: chained
greedy turns equal a brute-force decode of the whole conversation (no cache), on both paths and after
evictions; errors are the documented ones and leave the connection and the server usable."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import ExitStack

import pytest
import torch

pytest.importorskip("starlette")
openai = pytest.importorskip("openai")

from serve_helpers import ScriptedRunner, make_hf_dir, served_gpt, served_script, start, tiny_gpt  # noqa: E402

from scalestack.serve import Limits, load_model  # noqa: E402

SYSTEM = "You are terse."
TERMINAL = ("response.completed", "response.incomplete", "response.failed", "error")


def user_turns(n: int) -> list[str]:
    return [f"turn {i}: what comes after {i * 7}?" for i in range(n)]


def chatml(role: str, text: str) -> str:
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


def reference_outputs(forward, encode, decode, turns: list[str], n: int, eos: int | None = None) -> list[str]:
    """Each turn's greedy output by full forwards over the whole token sequence (the earlier outputs'
    exact tokens, then the next turn's ChatML text): no cache, no server, no template engine."""
    ids = encode(chatml("system", SYSTEM) + chatml("user", turns[0]) + "<|im_start|>assistant\n")
    outputs = []
    for i in range(len(turns)):
        if i:
            closing = "" if ids[-1] == eos else "<|im_end|>"
            ids += encode(closing + "\n" + chatml("user", turns[i]) + "<|im_start|>assistant\n")
        out = []
        with torch.no_grad():
            while len(out) < n:
                token = int(forward(torch.tensor([ids + out]))[0, -1].argmax())
                out.append(token)
                if token == eos:
                    break
        ids += out
        outputs.append(decode([t for t in out if t != eos]))
    return outputs


def ws_turn(conn, **fields):
    conn.response.create(**fields)
    for event in conn:
        if event.type in TERMINAL:
            return event


@pytest.fixture(scope="module")
def gpt():
    model = tiny_gpt()
    with start(served_gpt(model), kv_budget=2**30) as server:
        yield server, model


@pytest.fixture(scope="module")
def gpt_reference(gpt):
    _, model = gpt
    byte_decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    return reference_outputs(model, lambda s: list(s.encode()), byte_decode, user_turns(20), 12)


def client(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)


def test_http_chain_of_20_greedy_turns_equals_the_full_context_decode(gpt, gpt_reference):
    server, _ = gpt
    c, previous, cached = client(server), None, []
    for i, text in enumerate(user_turns(20)):
        r = c.responses.create(model="tiny-gpt", input=text, instructions=SYSTEM, previous_response_id=previous,
                               max_output_tokens=12, temperature=0)  # fmt: skip
        assert r.output_text == gpt_reference[i], f"turn {i}"
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
        previous = r.id
        cached.append(r.usage.input_tokens_details.cached_tokens)
    assert cached[0] == 0 and all(c > 0 for c in cached[1:])  # every continuation reused the chain's cache
    assert c.responses.retrieve(previous).output_text == gpt_reference[-1]


def test_websocket_chain_of_20_greedy_turns_equals_the_full_context_decode(gpt, gpt_reference):
    server, _ = gpt
    with client(server).responses.connect() as conn:
        previous, usage = None, []
        for i, text in enumerate(user_turns(20)):
            event = ws_turn(conn, model="tiny-gpt", input=text, instructions=SYSTEM, previous_response_id=previous,
                            max_output_tokens=12, temperature=0, store=False)  # fmt: skip
            assert event.type == "response.incomplete", event
            assert event.response.output_text == gpt_reference[i], f"turn {i}"
            previous = event.response.id
            usage.append(event.response.usage)
    # the context grows each turn; only the new turn's tokens are prefilled
    for before, now in zip(usage, usage[1:]):
        assert now.input_tokens_details.cached_tokens == before.input_tokens + before.output_tokens - 1
    with pytest.raises(openai.NotFoundError):
        client(server).responses.retrieve(previous)  # store=false: connection-local only


@pytest.mark.parametrize("transport", ["http", "websocket"])
def test_chains_stay_exact_when_their_caches_are_evicted(gpt_reference, transport):
    """Two chains interleaved under a budget that holds about one: a turn may evict the other chain's idle
    cache, which then falls back to a full prefill of its token ids, transparently."""
    model = tiny_gpt()
    bytes_per_token = 2 * 2 * 4 * 16 * 8
    with start(served_gpt(model), kv_budget=3000 * bytes_per_token) as server, ExitStack() as stack:
        c, previous, cached = client(server), [None, None], []
        conns = [stack.enter_context(c.responses.connect()) for _ in range(2)] if transport == "websocket" else []
        for i, text in enumerate(user_turns(20)):
            for chain in (0, 1):
                fields = dict(model="tiny-gpt", input=text, instructions=SYSTEM, max_output_tokens=12,
                              previous_response_id=previous[chain], temperature=0)  # fmt: skip
                r = ws_turn(conns[chain], **fields, store=False).response if conns else c.responses.create(**fields)
                assert r.output_text == gpt_reference[i], f"chain {chain} turn {i}"
                previous[chain] = r.id
                cached.append(r.usage.input_tokens_details.cached_tokens)
        pool = server.service.pool
        assert pool.evictions > 0 and 0 in cached[2:]  # some continuations found their cache evicted
        assert pool.peak_bytes <= pool.budget


def test_one_chain_within_the_budget_keeps_its_cache_and_idle_caches_expire(gpt_reference):
    bytes_per_token = 2 * 2 * 4 * 16 * 8
    with start(served_gpt(tiny_gpt()), kv_budget=7000 * bytes_per_token, kv_ttl=0.5) as server:
        c, previous = client(server), None
        for i, text in enumerate(user_turns(8)):
            r = c.responses.create(model="tiny-gpt", input=text, instructions=SYSTEM, max_output_tokens=12,
                                   previous_response_id=previous, temperature=0)  # fmt: skip
            assert r.output_text == gpt_reference[i]
            assert (r.usage.input_tokens_details.cached_tokens > 0) == (i > 0)  # never evicted by its own turn
            previous = r.id
        time.sleep(2.0)  # past the TTL: the idle server sweeps it
        assert len(server.service.pool) == 0
        r = c.responses.create(model="tiny-gpt", input=user_turns(9)[8], instructions=SYSTEM, max_output_tokens=12,
                               previous_response_id=previous, temperature=0)  # fmt: skip
        assert r.usage.input_tokens_details.cached_tokens == 0 and r.output_text == gpt_reference[8]


def test_prefill_only_warmup_then_generation_equals_the_full_context_decode(gpt, gpt_reference):
    server, _ = gpt
    with client(server).responses.connect() as conn:
        warm = ws_turn(conn, model="tiny-gpt", input=user_turns(1)[0], instructions=SYSTEM, generate=False,
                       store=False)  # fmt: skip
        assert warm.type == "response.completed" and warm.response.output == []
        # an empty continuation of the warmed prefix: the generation prompt only
        event = ws_turn(conn, model="tiny-gpt", input=[], instructions=SYSTEM, previous_response_id=warm.response.id,
                        max_output_tokens=12, temperature=0, store=False)  # fmt: skip
        assert event.response.output_text == gpt_reference[0]
        assert event.response.usage.input_tokens_details.cached_tokens == warm.response.usage.input_tokens


def test_hugging_face_model_directory_chain_over_websocket(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    directory = make_hf_dir(tmp_path_factory.mktemp("hf") / "tiny-llama")
    served = load_model(directory, dtype="float64")
    assert served.name == "tiny-llama" and served.stop_token_ids  # <|im_end|> is the model's eos token
    reference_model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float64).eval()
    tok = served.tokenizer
    expected = reference_outputs(lambda x: reference_model(input_ids=x).logits, tok.encode, tok.decode,
                                 user_turns(8), 10, eos=next(iter(served.stop_token_ids)))  # fmt: skip
    with start(served) as server, client(server).responses.connect() as conn:
        previous = None
        for i, text in enumerate(user_turns(8)):
            event = ws_turn(conn, model="tiny-llama", input=text, instructions=SYSTEM, max_output_tokens=10,
                            previous_response_id=previous, temperature=0, store=False)  # fmt: skip
            assert event.response.output_text == expected[i], f"turn {i}"
            previous = event.response.id


def test_streaming_function_calls_and_their_outputs(tmp_path):
    """The SDK's stream accumulator rebuilds the tool call from the SSE events; the tool output continues
    the chain."""
    tools = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]  # fmt: skip
    with start(served_script()) as server:
        c = client(server)
        with c.responses.stream(model="scripted", input="What is the weather in Paris?", tools=tools) as stream:
            kinds = [event.type for event in stream]
            first = stream.get_final_response()
        assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
        assert "response.function_call_arguments.done" in kinds and "response.output_text.delta" not in kinds
        (call,) = first.output
        assert call.type == "function_call" and call.name == "get_weather"
        assert json.loads(call.arguments) == {"city": "Paris"}
        second = c.responses.create(model="scripted", previous_response_id=first.id, tools=tools, input=[
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}])  # fmt: skip
        assert second.output_text == "The weather: sunny, 21 C." and second.status == "completed"


def test_sampling_with_a_seed_and_stop_sequences(gpt):
    server, _ = gpt
    c = client(server)

    def ask(seed: int) -> str:
        return c.responses.create(model="tiny-gpt", input="hello", temperature=1.0, top_p=0.95, max_output_tokens=24,
                                  extra_body={"seed": seed}).output_text  # fmt: skip

    assert ask(5) == ask(5) != ask(6)
    full = c.responses.create(model="tiny-gpt", input="hello", max_output_tokens=24, temperature=0).output_text
    stop = next(ch for ch in full[3:] if ch.isascii() and ch.isprintable())  # a whole character of the output
    cut = c.responses.create(model="tiny-gpt", input="hello", max_output_tokens=24, temperature=0,
                             extra_body={"stop": [stop]})  # fmt: skip
    assert cut.status == "completed" and cut.output_text == full[: full.index(stop)]


def test_stored_responses_get_delete_and_cancel(gpt):
    server, _ = gpt
    c = client(server)
    r = c.responses.create(model="tiny-gpt", input="keep me", max_output_tokens=8, temperature=0)
    assert c.responses.retrieve(r.id).output_text == r.output_text
    c.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="tiny-gpt", input="more", previous_response_id=r.id)
    assert e.value.code == "previous_response_not_found"
    long = c.responses.create(model="tiny-gpt", input="go on", max_output_tokens=4000, temperature=0, background=True)
    assert long.status == "in_progress"
    cancelled = c.responses.cancel(long.id)
    assert cancelled.status == "cancelled" and cancelled.usage.output_tokens < 4000
    with pytest.raises(openai.BadRequestError, match="not a background response in progress"):
        c.responses.cancel(cancelled.id)


def test_bad_requests_are_errors_and_the_server_stays_up(gpt):
    server, _ = gpt
    c = client(server)
    cases = [
        (openai.BadRequestError, dict(input="x", max_output_tokens=0), "max_output_tokens"),
        (openai.BadRequestError, dict(input="x", temperature=5), "temperature"),
        (openai.BadRequestError, dict(input="x", tools=[{"type": "web_search"}]), "only function tools"),
        (openai.BadRequestError, dict(input=[{"type": "computer_call"}]), "not supported"),
        (openai.BadRequestError, dict(input="x", previous_response_id="resp_nope"), "was not found"),
        (openai.BadRequestError, dict(input="x" * 5000), "context"),
        (openai.BadRequestError, dict(input="x", tool_choice="required"), "tool_choice"),
        (openai.BadRequestError, dict(input=[{"type": "item_reference", "id": "x"}]), "not supported"),
        (openai.BadRequestError, dict(input="x", extra_body={"seed": 2**64}), "seed"),
        (openai.BadRequestError, dict(input="x", extra_body={"stop": ["s" * 300]}), "stop"),
        (openai.BadRequestError, dict(input=[{"type": ["x"]}]), "must be a string"),
    ]
    for error, fields, words in cases:
        with pytest.raises(error, match=words):
            c.responses.create(model="tiny-gpt", **fields)
    with pytest.raises(openai.NotFoundError, match="tiny-gpt"):
        c.responses.create(model="gpt-5", input="x")
    request = urllib.request.Request(server.url + "/responses", data=b"{not json", method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 400 and json.loads(e.value.read())["error"]["code"] == "invalid_json"
    # too large, declared or streamed: the client sends no byte the server will not read, so the close is clean
    assert oversized_post(server, declared=2**20 + 1) == 413
    assert oversized_post(server, declared=None) == 413
    assert c.responses.create(model="tiny-gpt", input="still here", max_output_tokens=4).status == "incomplete"
    assert [m.id for m in c.models.list()] == ["tiny-gpt"]


def oversized_post(server, declared: int | None) -> int:
    """POST a body over the 1 MiB cap, by its Content-Length alone or as one unterminated chunk."""
    import http.client

    url = urllib.parse.urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.putrequest("POST", url.path + "/responses")
    conn.putheader("Content-Type", "application/json")
    if declared is not None:
        conn.putheader("Content-Length", str(declared))
        conn.endheaders()
    else:
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        body = b"[" * (2**20 + 1)
        conn.send(b"%x\r\n" % len(body) + body + b"\r\n")
    response = conn.getresponse()
    assert json.loads(response.read())["error"]["code"] == "request_too_large"
    conn.close()
    return response.status


def test_websocket_errors_keep_the_connection_usable(gpt):
    from websockets.sync.client import connect

    server, _ = gpt
    with client(server).responses.connect() as conn:
        conn.send({"type": "response.bogus"})
        error = next(iter(conn))
        assert error.type == "error" and error.status == 400 and error.error.code == "unknown_event_type"
        event = ws_turn(conn, model="tiny-gpt", input="x", previous_response_id="resp_missing", store=False)
        assert event.type == "error" and event.error.code == "previous_response_not_found"
        # a second create while one is in flight: refused, the first one finishes
        conn.response.create(model="tiny-gpt", input="long", max_output_tokens=300, temperature=0, store=False)
        conn.response.create(model="tiny-gpt", input="again", max_output_tokens=4, store=False)
        kinds = []
        for event in conn:
            kinds.append(event.type if event.type != "error" else event.error.code)
            if event.type == "response.incomplete":
                break
        assert "response_already_in_flight" in kinds and kinds[-1] == "response.incomplete"
        assert ws_turn(conn, model="tiny-gpt", input="after", max_output_tokens=4, store=False).type == \
            "response.incomplete"  # fmt: skip
    with connect(server.url.replace("http", "ws") + "/responses", open_timeout=10) as ws:  # raw frames
        ws.send("{not json")
        error = json.loads(ws.recv(timeout=10))
        assert error["type"] == "error" and error["error"]["code"] == "invalid_json"
        ws.send(json.dumps({"type": "response.create", "model": "tiny-gpt", "input": "ok", "max_output_tokens": 3}))
        kinds = [json.loads(ws.recv(timeout=30))["type"]]
        while kinds[-1] not in TERMINAL:
            kinds.append(json.loads(ws.recv(timeout=30))["type"])
        assert kinds[0] == "response.created" and kinds[-1] == "response.incomplete"


def test_api_key_guards_http_and_websocket():
    from websockets.exceptions import InvalidStatus

    with start(served_gpt(), api_key="s3cret") as server:
        with pytest.raises(openai.AuthenticationError):
            client(server, api_key="wrong").responses.create(model="tiny-gpt", input="x")
        request = urllib.request.Request(server.url + "/models")  # no Authorization header at all
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == 401
        with pytest.raises(InvalidStatus), client(server, api_key="wrong").responses.connect() as conn:
            ws_turn(conn, model="tiny-gpt", input="x")
        good = client(server, api_key="s3cret")
        assert good.responses.create(model="tiny-gpt", input="x", max_output_tokens=2).status == "incomplete"
        with good.responses.connect() as conn:
            assert ws_turn(conn, model="tiny-gpt", input="x", max_output_tokens=2).type == "response.incomplete"


def test_websocket_connections_end_at_their_maximum_age():
    with start(served_gpt(), max_connection_age=1.0) as server, client(server).responses.connect() as conn:
        assert ws_turn(conn, model="tiny-gpt", input="x", max_output_tokens=2).type == "response.incomplete"
        events = list(conn)  # iteration ends when the server closes the connection
        assert [e.error.code for e in events] == ["websocket_connection_limit_reached"]


def test_concurrent_requests_are_batched_without_mixing(gpt):
    server, _ = gpt
    c = client(server)
    prompts = [f"question number {i} " * (i + 1) for i in range(8)]
    alone = [c.responses.create(model="tiny-gpt", input=p, max_output_tokens=16, temperature=0).output_text
             for p in prompts]  # fmt: skip
    results = [None] * len(prompts)

    def ask(i):
        results[i] = c.responses.create(model="tiny-gpt", input=prompts[i], max_output_tokens=16,
                                        temperature=0).output_text  # fmt: skip

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == alone
    assert server.service.engine.largest_batch > 1  # they were decoded together


def test_scripted_model_reads_its_context_from_the_cache():
    context = chatml("user", "hi") + "<|im_start|>assistant\n"
    assert ScriptedRunner.reply(context) == "hi|1|hi<|im_end|>"
    limits = Limits(max_output_tokens=64, default_output_tokens=64)
    with start(served_script(), limits=limits) as server:
        c = client(server)
        r = c.responses.create(model="scripted", input="one")
        r = c.responses.create(model="scripted", input="two", previous_response_id=r.id)
        assert r.output_text == "two|2|one"
        assert r.usage.input_tokens_details.cached_tokens > 0
