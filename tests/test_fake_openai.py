"""The real ChatOpenAI / OpenAIEmbeddings / openai SDK against tests.fakes.openai.FakeOpenAI."""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from langchain_core.messages import AIMessageChunk
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

from graph.tokens import count_messages
from tests.fakes.openai import FakeOpenAI


@pytest.fixture
async def ai() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as fake:
        yield fake


def chat(ai: FakeOpenAI, timeout: float = 5, **kwargs: Any) -> ChatOpenAI:
    return ChatOpenAI(
        model="gpt-4o-mini",
        base_url=ai.base_url,
        api_key="sk-test",
        max_retries=0,
        stream_usage=True,
        use_responses_api=False,
        timeout=timeout,
        **kwargs,
    )


def embeddings(ai: FakeOpenAI) -> OpenAIEmbeddings:
    return OpenAIEmbeddings(
        model="text-embedding-3-small",
        base_url=ai.base_url,
        api_key="sk-test",
        check_embedding_ctx_length=False,
        max_retries=0,
    )


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (
        math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    )


async def collect(model: ChatOpenAI, prompt: Any) -> list[AIMessageChunk]:
    return [chunk async for chunk in model.astream(prompt)]


# ------------------------------------------------------------------ chat


async def test_ainvoke_returns_reply_with_usage(ai: FakeOpenAI) -> None:
    assert ai.prompt_token_counter == "tiktoken"
    message = await chat(ai).ainvoke([("system", "Be brief."), ("user", "hello there")])
    assert message.content == "Answer #1"
    expected_prompt = count_messages(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}],
        "gpt-4o-mini",
    )
    assert message.usage_metadata is not None
    assert message.usage_metadata["input_tokens"] == expected_prompt
    assert message.usage_metadata["output_tokens"] == 2  # "Answer", " #1"
    assert message.usage_metadata["total_tokens"] == expected_prompt + 2
    assert message.response_metadata["finish_reason"] == "stop"
    body = ai.chat_requests[0]
    assert body["model"] == "gpt-4o-mini" and not body.get("stream")
    assert ai.last_system_prompt() == "Be brief."
    request = ai.requests[0]
    assert request.path == "/v1/chat/completions"
    assert request.headers["Authorization"] == "Bearer sk-test"


async def test_astream_yields_several_chunks_and_final_usage(ai: FakeOpenAI) -> None:
    ai.reply = "The quick brown fox jumps"
    chunks = await collect(chat(ai), "hi")
    texts = [c.content for c in chunks if c.content]
    assert texts == ["The", " quick", " brown", " fox", " jumps"]
    with_usage = [c for c in chunks if c.usage_metadata]
    assert len(with_usage) == 1  # only the trailing usage chunk (choices: [])
    assert with_usage[0].usage_metadata["output_tokens"] == 5
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert total.content == "The quick brown fox jumps"
    assert total.usage_metadata is not None and total.usage_metadata["output_tokens"] == 5
    assert ai.chat_requests[0]["stream"] is True
    assert ai.chat_requests[0]["stream_options"] == {"include_usage": True}


async def test_reply_callable_and_usage_override(ai: FakeOpenAI) -> None:
    ai.reply = lambda body: "echo: " + body["messages"][-1]["content"]
    ai.usage_override = {"prompt_tokens": 1000, "completion_tokens": 7}
    message = await chat(ai).ainvoke("ping")
    assert message.content == "echo: ping"
    assert message.usage_metadata is not None
    assert (message.usage_metadata["input_tokens"], message.usage_metadata["output_tokens"]) == (
        1000,
        7,
    )
    assert message.usage_metadata["total_tokens"] == 1007
    chunks = await collect(chat(ai), "pong")
    assert sum(c.usage_metadata["input_tokens"] for c in chunks if c.usage_metadata) == 1000


async def test_max_tokens_truncates_with_finish_reason_length(ai: FakeOpenAI) -> None:
    ai.reply = "one two three four"
    message = await chat(ai, max_tokens=2).ainvoke("x")
    assert message.content == "one two"
    assert message.response_metadata["finish_reason"] == "length"


async def test_delays(ai: FakeOpenAI) -> None:
    ai.reply = "a b c"
    ai.first_token_delay = 0.2
    ai.chunk_delay = 0.05
    started = time.monotonic()
    arrivals: list[float] = []
    async for chunk in chat(ai).astream("x"):
        if chunk.content:
            arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 3
    assert arrivals[0] >= 0.2
    assert arrivals[2] - arrivals[0] >= 0.09


async def test_hold_release_and_wait_for_requests(ai: FakeOpenAI) -> None:
    ai.hold()
    tasks = [asyncio.create_task(chat(ai).ainvoke(f"q{i}")) for i in range(3)]
    bodies = await ai.wait_for_requests(3, timeout=5)
    assert len(bodies) == 3
    await asyncio.sleep(0.05)
    assert not any(t.done() for t in tasks)  # recorded, but held
    ai.release()
    results = await asyncio.gather(*tasks)
    assert sorted(m.content for m in results) == ["Answer #1", "Answer #2", "Answer #3"]
    with pytest.raises(TimeoutError, match="3 of 4"):
        await ai.wait_for_requests(4, timeout=0.1)


# ------------------------------------------------------------------ faults


async def test_cut_stream_raises_connection_error_without_usage(ai: FakeOpenAI) -> None:
    ai.reply = "one two three four five six"
    ai.fail_next("cut_stream", chunks=3)
    received: list[AIMessageChunk] = []
    # What actually happens: the SDK sees an incomplete chunked body
    # (httpx2.RemoteProtocolError "incomplete chunked read") and re-raises it as
    # openai.APIConnectionError; langchain-openai wraps it as OpenAIConnectionError. The chunks
    # before the cut were already yielded, and no chunk ever carries usage.
    with pytest.raises(openai.APIConnectionError) as excinfo:
        async for chunk in chat(ai).astream("x"):
            received.append(chunk)
    assert not isinstance(excinfo.value, openai.APITimeoutError)
    assert "incomplete chunked read" in repr(excinfo.value.__cause__.__cause__)
    assert [c.content for c in received if c.content] == ["one", " two", " three"]
    assert all(c.usage_metadata is None for c in received)
    # The next request is fine again (faults are one-shot).
    assert (await chat(ai).ainvoke("x")).content == "one two three four five six"


async def test_no_usage_stream_completes_without_usage(ai: FakeOpenAI) -> None:
    ai.reply = "a b"
    ai.fail_next("no_usage")
    chunks = await collect(chat(ai), "x")
    assert "".join(str(c.content) for c in chunks) == "a b"
    assert all(c.usage_metadata is None for c in chunks)
    assert any(c.response_metadata.get("finish_reason") == "stop" for c in chunks)


async def test_stream_faults_on_non_streaming_requests(ai: FakeOpenAI) -> None:
    ai.fail_next("cut_stream")
    ai.fail_next("no_usage")
    with pytest.raises(openai.APIConnectionError):  # connection dropped, no response
        await chat(ai).ainvoke("x")
    message = await chat(ai).ainvoke("x")  # JSON response without a "usage" field
    assert message.content == "Answer #2" and message.usage_metadata is None


async def test_async_reply_function(ai: FakeOpenAI) -> None:
    async def reply(body: dict[str, Any]) -> str:
        await asyncio.sleep(0)
        return f"{len(body['messages'])} messages"

    ai.reply = reply
    assert (await chat(ai).ainvoke([("system", "s"), ("user", "u")])).content == "2 messages"


async def test_rate_limit_vs_insufficient_quota(ai: FakeOpenAI) -> None:
    ai.fail_next("rate_limit", retry_after="7")
    ai.fail_next("insufficient_quota")
    with pytest.raises(openai.RateLimitError) as rate:
        await chat(ai).ainvoke("x")
    with pytest.raises(openai.RateLimitError) as quota:
        await chat(ai).ainvoke("x")
    # Both are HTTP 429 RateLimitError; only `.code` (== body["code"]) or `.type` tells a
    # transient rate limit from an exhausted account.
    assert rate.value.status_code == quota.value.status_code == 429
    assert rate.value.code == "rate_limit_exceeded"
    assert rate.value.type == "requests"
    assert rate.value.response.headers["retry-after"] == "7"
    assert quota.value.code == "insufficient_quota"
    assert quota.value.type == "insufficient_quota"
    assert quota.value.body["code"] == "insufficient_quota"
    assert (await chat(ai).ainvoke("x")).content == "Answer #3"


async def test_server_error_and_auth(ai: FakeOpenAI) -> None:
    ai.fail_next("server_error", status=503)
    ai.fail_next("server_error")
    ai.fail_next("auth")
    with pytest.raises(openai.InternalServerError) as unavailable:
        await chat(ai).ainvoke("x")
    assert unavailable.value.status_code == 503
    with pytest.raises(openai.InternalServerError) as internal:
        await chat(ai).ainvoke("x")
    assert internal.value.status_code == 500
    with pytest.raises(openai.AuthenticationError) as auth:
        await chat(ai).ainvoke("x")
    assert auth.value.status_code == 401 and auth.value.code == "invalid_api_key"


async def test_times_repeats_a_fault(ai: FakeOpenAI) -> None:
    ai.fail_next("server_error", times=2)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            await chat(ai).ainvoke("x")
    assert (await chat(ai).ainvoke("x")).content == "Answer #3"


async def test_hang_times_out(ai: FakeOpenAI) -> None:
    ai.fail_next("hang", times=2)
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        await chat(ai, timeout=0.5).ainvoke("x")
    with pytest.raises(openai.APITimeoutError):
        await collect(chat(ai, timeout=0.5), "x")
    assert time.monotonic() - started < 3


async def test_stop_does_not_wait_for_hanging_or_held_requests() -> None:
    fake = await FakeOpenAI().start()
    fake.fail_next("hang")
    hanging = asyncio.create_task(chat(fake, timeout=30).ainvoke("x"))
    await fake.wait_for_requests(1)
    fake.hold()
    held = asyncio.create_task(chat(fake, timeout=30).ainvoke("y"))
    await fake.wait_for_requests(2)
    port = fake.port
    started = time.monotonic()
    await fake.stop()
    assert time.monotonic() - started < 1
    for task in (hanging, held):
        with pytest.raises(openai.APIConnectionError):
            await asyncio.wait_for(task, 5)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# ------------------------------------------------------------------ embeddings & models


async def test_embeddings_are_deterministic_and_similar_texts_score_higher(
    ai: FakeOpenAI,
) -> None:
    emb = embeddings(ai)
    texts = ["the cat sat on the mat", "a cat on the mat", "quarterly tax report for 2024"]
    first = await emb.aembed_documents(texts)
    again = await emb.aembed_documents(texts)
    assert first == again
    assert len(first[0]) == 256
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-5 for v in first)
    assert cosine(first[0], first[1]) > 0.5
    assert cosine(first[0], first[1]) > cosine(first[0], first[2]) + 0.3
    query = await emb.aembed_query("Cat on a MAT")  # case-insensitive words
    assert cosine(query, first[1]) > cosine(query, first[2])
    body = ai.embedding_requests[0]
    assert body["encoding_format"] == "base64"  # the SDK's default
    assert body["input"] == texts


async def test_embeddings_float_format_tokens_input_and_dimensions(ai: FakeOpenAI) -> None:
    client = openai.AsyncOpenAI(base_url=ai.base_url, api_key="sk-test", max_retries=0)
    try:
        floats = await client.embeddings.create(
            model="text-embedding-3-small", input="hello world", encoding_format="float"
        )
        b64 = await client.embeddings.create(model="text-embedding-3-small", input="hello world")
        small = await client.embeddings.create(
            model="text-embedding-3-small", input=["hello world"], dimensions=64
        )
        models = await client.models.list()
    finally:
        await client.close()
    assert floats.usage.prompt_tokens == 2
    assert max(
        abs(a - b) for a, b in zip(floats.data[0].embedding, b64.data[0].embedding, strict=True)
    ) < 1e-6
    assert len(small.data[0].embedding) == 64
    assert "gpt-4o-mini" in [m.id for m in models.data]
    # With the ctx-length check on, langchain sends token ids; they embed like the text.
    checked = OpenAIEmbeddings(
        model="text-embedding-3-small", base_url=ai.base_url, api_key="sk-test", max_retries=0
    )
    by_ids = await checked.aembed_query("hello world")
    assert isinstance(ai.embedding_requests[-1]["input"][0], list)
    assert cosine(by_ids, floats.data[0].embedding) > 0.9999


async def test_embedding_faults(ai: FakeOpenAI) -> None:
    ai.fail_next_embeddings("insufficient_quota")
    with pytest.raises(openai.RateLimitError) as quota:
        await embeddings(ai).aembed_query("x")
    assert quota.value.code == "insufficient_quota"
    assert len(await embeddings(ai).aembed_query("x")) == 256
    with pytest.raises(ValueError):
        ai.fail_next_embeddings("cut_stream")
    with pytest.raises(ValueError):
        ai.fail_next("nonsense")


async def test_the_gateway_reads_embeddings_as_the_sdk_does_in_either_encoding(
    ai: FakeOpenAI,
) -> None:
    """graph/model.py ModelGateway.embed posts the request itself and decodes the vector."""
    import openai

    from graph.model import ModelGateway

    gateway = ModelGateway(api_key="sk-test", base_url=ai.base_url,
                           embedding_model="text-embedding-3-small", timeout=5,
                           max_attempts=1, retry_base_delay=0.01)
    sdk = openai.AsyncOpenAI(api_key="sk-test", base_url=ai.base_url, max_retries=0)
    texts = ["the launch window opens on tuesday", "a second text, in the same request"]
    try:
        expected = await sdk.embeddings.create(model="text-embedding-3-small", input=texts)
        expected_vectors = [row.embedding for row in expected.data]  # decoded by the SDK itself
        as_base64 = await gateway.embed(texts)
        ai.embeddings_as_floats = True
        as_floats = await gateway.embed(texts)
    finally:
        await gateway.aclose()
        await sdk.close()
    assert [len(v) for v in expected_vectors] == [ai.dims, ai.dims]
    assert expected_vectors[0] != pytest.approx(expected_vectors[1], abs=1e-3)
    for got in (as_base64, as_floats):
        assert len(got) == 2
        for vector, wanted in zip(got, expected_vectors, strict=True):
            assert vector == pytest.approx(wanted, abs=1e-6)
    assert [r["encoding_format"] for r in ai.embedding_requests] == ["base64"] * 3
