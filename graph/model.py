"""The model provider: streamed chat, summaries and embeddings, with the one retry loop."""

from __future__ import annotations

import asyncio
import base64
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import numpy as np
import openai
from langchain_core.messages import BaseMessage
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

log = logging.getLogger(__name__)

# busy: rate limited; unavailable: 5xx or connection; timeout: no answer in time (may be billed);
# quota: the provider account is out of credit; auth: bad key; error: anything else.
FaultKind = Literal["busy", "unavailable", "timeout", "quota", "auth", "error"]
# Not "timeout": the provider may already bill the attempt that timed out, and a second would
# be charged once only; the user gets the timeout message, the attempt its reservation.
RETRYABLE: frozenset[str] = frozenset({"busy", "unavailable"})
MAX_RETRY_AFTER = 20.0


@dataclass(frozen=True)
class ModelResult:
    text: str
    input_tokens: int | None
    output_tokens: int | None
    fault: FaultKind | None = None
    attempts: int = 1
    error: str | None = None  # the exception class name: never its message (it may quote input)
    truncated: bool = False  # the model stopped at max_tokens, mid-answer

    @property
    def usage_known(self) -> bool:
        return self.input_tokens is not None and self.output_tokens is not None

    @property
    def complete(self) -> bool:
        return self.fault is None and self.usage_known


class ModelFault(Exception):
    def __init__(self, kind: FaultKind, error: str, attempts: int) -> None:
        super().__init__(f"{kind}: {error}")
        self.kind = kind
        self.error = error
        self.attempts = attempts


def classify(exc: BaseException) -> FaultKind:
    if isinstance(exc, openai.RateLimitError):
        return "quota" if _error_code(exc) == "insufficient_quota" else "busy"
    if isinstance(exc, (openai.APITimeoutError, asyncio.TimeoutError, TimeoutError)):
        return "unavailable" if _connection_failed(exc) else "timeout"
    if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return "auth"
    if isinstance(exc, openai.APIConnectionError):
        return "unavailable"
    if isinstance(exc, openai.APIStatusError):
        return "unavailable" if exc.status_code >= 500 or exc.status_code == 408 else "error"
    if type(exc).__module__.startswith(("httpx", "httpcore", "aiohttp")):
        return "unavailable"  # transport errors raised while reading a stream
    return "error"


def _connection_failed(exc: BaseException) -> bool:
    """A refused or dropped connection, which the aiohttp transport reports as a timeout.

    It is not one: nothing ran long, and a "timeout" would charge the user the reservation.
    """
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, aiohttp.ClientConnectionError) and not isinstance(
            cause, (asyncio.TimeoutError, TimeoutError)
        ):
            return True
        cause = cause.__cause__
    return False


def _error_code(exc: openai.APIStatusError) -> str | None:
    code = getattr(exc, "code", None)
    if code:
        return str(code)
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    return error.get("code") or error.get("type") if isinstance(error, dict) else None


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return min(float(value) * scale, MAX_RETRY_AFTER)
            except ValueError:
                return None
    return None


class ModelGateway:
    """Owns every call to the provider; the SDK's own retries are off (max_retries=0).

    Answers and embeddings are posted with the OpenAI SDK's own `post` and read as plain dicts:
    not the pydantic chunk models, message chunks and callback dispatch that ChatOpenAI's
    `astream` adds to every token (about a third of the bot's CPU per message,
    bench/experiments.py), nor the SDK's request transform, which walks every message of the
    prompt (~1 ms per call with a long history), nor langchain's embeddings wrapper and the
    SDK's response models (~0.6 ms per embedding in py-spy). Summaries, which are not streamed,
    go through ChatOpenAI itself.

    The transport is the SDK's aiohttp one (openai.DefaultAioHttpClient): a streamed answer is
    one read per token, and aiohttp's C parser reads each for about half of httpx's CPU
    (README, Benchmarks).
    """

    def __init__(
        self, *, api_key: str, base_url: str | None, embedding_model: str, timeout: float,
        max_attempts: int, retry_base_delay: float,
    ) -> None:
        self._api_key = api_key
        self._base_url = base_url
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._retry_base_delay = retry_base_delay
        # One connection pool for every model, owned here so it is closed on this event loop
        # (langchain-openai would otherwise share one per base URL across the whole process).
        self._http = openai.DefaultAioHttpClient()
        self._chat_models: dict[tuple[str, float], ChatOpenAI] = {}
        self._embedding_model = embedding_model
        # Streamed answers and embeddings: plain requests on the SDK client (retries are ours).
        self._client = openai.AsyncOpenAI(
            api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout,
            http_client=self._http,
        )

    def chat_model(self, model: str, temperature: float) -> ChatOpenAI:
        key = (model, temperature)
        if key not in self._chat_models:
            self._chat_models[key] = ChatOpenAI(
                model=model, temperature=temperature, api_key=SecretStr(self._api_key),
                base_url=self._base_url, max_retries=0, timeout=self._timeout,
                # Without stream_usage a custom base_url streams no usage: budgets would read 0.
                stream_usage=True, use_responses_api=False, http_async_client=self._http,
            )
        return self._chat_models[key]

    async def aclose(self) -> None:
        await self._http.aclose()

    async def stream_chat(
        self, messages: list[BaseMessage], *, model: str, temperature: float, max_tokens: int,
        on_delta: Callable[[str], None] | None = None,
    ) -> ModelResult:
        """Stream an answer; retry only before the first token (a retry after it would repeat text)."""
        client = self._client
        request = {
            "model": model, "messages": [_as_openai(m) for m in messages],
            "temperature": temperature, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True},
        }
        attempt = 0
        while True:
            attempt += 1
            answer = _StreamedAnswer(on_delta)
            try:
                # The SDK's stream reads past [DONE] (a response left unread could not give its
                # connection back to the pool) and raises an error event as APIError.
                stream = await client.post(
                    "/chat/completions", body=request, cast_to=object, stream=True,
                    stream_cls=openai.AsyncStream[object],
                )
                async with stream:
                    async for chunk in stream:
                        answer.feed(chunk)
            except Exception as exc:
                kind = classify(exc)
                if answer.parts:
                    return answer.result(attempt, kind, type(exc).__name__)
                if kind in RETRYABLE and attempt < self._max_attempts:
                    await asyncio.sleep(self._delay(attempt, exc))
                    continue
                log.warning("model call failed: %s (%s) after %d attempts", kind, type(exc).__name__, attempt)
                return answer.result(attempt, kind, type(exc).__name__)
            return answer.result(attempt)

    async def complete(
        self, messages: list[BaseMessage], *, model: str, temperature: float, max_tokens: int
    ) -> ModelResult:
        """A whole answer at once (summaries), through ChatOpenAI; the same retry policy."""
        llm = self.chat_model(model, temperature)
        attempt = 0
        while True:
            attempt += 1
            try:
                reply = await llm.ainvoke(messages, max_tokens=max_tokens)
            except Exception as exc:
                kind = classify(exc)
                if kind in RETRYABLE and attempt < self._max_attempts:
                    await asyncio.sleep(self._delay(attempt, exc))
                    continue
                log.warning("model call failed: %s (%s) after %d attempts", kind, type(exc).__name__, attempt)
                return ModelResult("", None, None, kind, attempt, type(exc).__name__)
            text = reply.content if isinstance(reply.content, str) else str(reply.content)
            usage = reply.usage_metadata
            truncated = reply.response_metadata.get("finish_reason") == "length"
            if not usage:
                return ModelResult(text, None, None, None, attempt, truncated=truncated)
            return ModelResult(
                text, int(usage["input_tokens"]), int(usage["output_tokens"]), None, attempt,
                truncated=truncated,
            )

    async def embed(self, text: str) -> list[float]:
        """The text's embedding. As the SDK itself asks by default, the vector comes base64-encoded
        (a quarter of the JSON, decoded by numpy); a provider that answers with a JSON list of
        floats is read too."""
        body = {"model": self._embedding_model, "input": text, "encoding_format": "base64"}
        attempt = 0
        while True:
            attempt += 1
            try:
                reply = await self._client.post("/embeddings", body=body, cast_to=object)
                vector = reply["data"][0]["embedding"]  # type: ignore[index]
                if isinstance(vector, str):
                    return np.frombuffer(base64.b64decode(vector), dtype="<f4").tolist()
                return [float(x) for x in vector]
            except Exception as exc:
                kind = classify(exc)
                if kind in RETRYABLE and attempt < self._max_attempts:
                    await asyncio.sleep(self._delay(attempt, exc))
                    continue
                raise ModelFault(kind, type(exc).__name__, attempt) from None

    def _delay(self, attempt: int, exc: BaseException) -> float:
        hinted = _retry_after(exc)
        if hinted is not None:
            return hinted
        # Full jitter keeps many users who failed together from retrying together.
        return self._retry_base_delay * (2 ** (attempt - 1)) * (0.5 + random.random() / 2)


_OPENAI_ROLES = {"system": "system", "human": "user", "ai": "assistant"}


def _as_openai(message: BaseMessage) -> dict[str, str]:
    """Our prompts hold system, user and assistant text only."""
    content = message.content if isinstance(message.content, str) else str(message.content)
    return {"role": _OPENAI_ROLES[message.type], "content": content}


class _StreamedAnswer:
    """What one streamed attempt produced, chunk by chunk."""

    def __init__(self, on_delta: Callable[[str], None] | None) -> None:
        self.on_delta = on_delta
        self.parts: list[str] = []
        self.usage: dict[str, Any] | None = None
        self.truncated = False

    def feed(self, chunk: Any) -> None:
        """Take one chunk of the stream (a chat.completion.chunk, as a dict)."""
        if not isinstance(chunk, dict):
            return
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            text = (choice.get("delta") or {}).get("content")
            if text:
                self.parts.append(text)
                if self.on_delta is not None:
                    self.on_delta(text)
            if choice.get("finish_reason") == "length":
                self.truncated = True

    def result(self, attempt: int, fault: FaultKind | None = None, error: str | None = None) -> ModelResult:
        text = "".join(self.parts)
        if fault is not None or self.usage is None:
            return ModelResult(text, None, None, fault, attempt, error, truncated=self.truncated)
        return ModelResult(
            text, int(self.usage.get("prompt_tokens", 0)), int(self.usage.get("completion_tokens", 0)),
            None, attempt, truncated=self.truncated,
        )
