"""Agents against the server: ``openai-agents`` running a function-tool agent over WebSocket mode, and a
bounded load of 64 concurrent sessions x 10 turns (no lost or mixed-up replies, KV memory within budget)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("starlette")
agents = pytest.importorskip("agents")
openai = pytest.importorskip("openai")

from serve_helpers import served_script, start  # noqa: E402

from scalestack.serve import Limits  # noqa: E402


def test_openai_agents_runs_a_tool_calling_agent_over_websocket():
    from agents import Agent, RunConfig, Runner, function_tool, set_tracing_disabled
    from agents.models.openai_provider import OpenAIProvider
    from agents.models.openai_responses import OpenAIResponsesWSModel

    set_tracing_disabled(True)  # nothing leaves the machine
    calls = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny in {city}, 21 C"

    with start(served_script()) as server:
        ws_url = server.url.replace("http", "ws")
        provider = OpenAIProvider(api_key="unused", base_url=server.url, websocket_base_url=ws_url,
                                  use_responses=True, use_responses_websocket=True)  # fmt: skip
        assert isinstance(provider.get_model("scripted"), OpenAIResponsesWSModel)
        agent = Agent(name="weather", instructions="Answer with the tools.", tools=[get_weather], model="scripted")

        async def run():
            config = RunConfig(model_provider=provider)
            first = await Runner.run(agent, "What is the weather in Paris?", run_config=config)
            second = await Runner.run(agent, "What is the weather in Oslo?", run_config=config,
                                      auto_previous_response_id=True)  # fmt: skip
            return first, second

        first, second = asyncio.run(run())
        assert calls == ["Paris", "Oslo"]
        assert first.final_output == "The weather: sunny in Paris, 21 C."
        assert second.final_output == "The weather: sunny in Oslo, 21 C."
        assert server.service.websockets_opened >= 1
        # with chaining, the tool output's turn continued the tool call's cache
        assert second.raw_responses[-1].usage.input_tokens_details.cached_tokens > 0


@pytest.mark.slow
def test_64_sessions_of_10_turns_under_kv_churn():
    """Half the sessions chain over WebSocket (store=false), half over HTTP (stored); the echo model's reply
    names its session and turn, so a mixed-up or lost reply shows."""
    budget = 160 * 1024
    limits = Limits(max_output_tokens=128, default_output_tokens=128)
    with start(served_script(), kv_budget=budget, limits=limits) as server:
        client = openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)

        async def over_websocket(session: int) -> list[str]:
            replies, previous = [], None
            async with client.responses.connect() as conn:
                for turn in range(10):
                    await conn.response.create(model="scripted", input=f"s{session}t{turn}", store=False,
                                               previous_response_id=previous)  # fmt: skip
                    async for event in conn:
                        if event.type in ("response.completed", "response.incomplete", "response.failed", "error"):
                            break
                    assert event.type == "response.completed", event
                    replies.append(event.response.output_text)
                    previous = event.response.id
            return replies

        async def over_http(session: int) -> list[str]:
            replies, previous = [], None
            for turn in range(10):
                r = await client.responses.create(model="scripted", input=f"s{session}t{turn}",
                                                  previous_response_id=previous)  # fmt: skip
                replies.append(r.output_text)
                previous = r.id
            return replies

        async def main():
            return await asyncio.wait_for(asyncio.gather(
                *(over_websocket(s) if s % 2 else over_http(s) for s in range(64))), timeout=300)  # fmt: skip

        results = asyncio.run(main())
        for s, replies in enumerate(results):
            assert replies == [f"s{s}t{t}|{t + 1}|s{s}t0" for t in range(10)]
        pool = server.service.pool
        assert pool.peak_bytes <= budget and pool.evictions > 0
        assert len(server.service.store) == 32 * 10  # the HTTP sessions' stored responses
