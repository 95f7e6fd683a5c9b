"""The model provider: streamed chat, summaries and embeddings, with the one retry loop."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import openai
from langchain_core.messages import BaseMessage
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

log = logging.getLogger(__name__)

# busy: rate limited; unavailable: 5xx or connection; timeout: no answer in time (may be billed);
# quota: the provider account is out of credit; auth: bad key; error: anything else.
FaultKind = Literal["busy", "unavailable", "timeout", "quota", "auth", "error"]
RETRYABLE: frozenset[str] = frozenset({"busy", "unavailable", "timeout"})
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
        return "timeout"
    if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return "auth"
    if isinstance(exc, openai.APIConnectionError):
        return "unavailable"
    if isinstance(exc, openai.APIStatusError):
        return "unavailable" if exc.status_code >= 500 or exc.status_code == 408 else "error"
    if type(exc).__module__.startswith(("httpx", "httpcore", "aiohttp")):
        return "unavailable"  # transport errors raised while reading a stream
    return "error"


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
    """Owns every call to the provider; the SDK's own retries are off (max_retries=0)."""

    def __init__(
        self, *, api_key: str, base_url: str | None, embedding_model: str, timeout: float,
        max_attempts: int, retry_base_delay: float,
    ) -> None:
        self._api_key = api_key
        self._base_url = base_url
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._retry_base_delay = retry_base_delay
        self._chat_models: dict[tuple[str, float], ChatOpenAI] = {}
        self._embeddings = OpenAIEmbeddings(
            model=embedding_model, api_key=api_key, base_url=base_url, max_retries=0,
            timeout=timeout, check_embedding_ctx_length=False,
        )

    def chat_model(self, model: str, temperature: float) -> ChatOpenAI:
        key = (model, temperature)
        if key not in self._chat_models:
            self._chat_models[key] = ChatOpenAI(
                model=model, temperature=temperature, api_key=self._api_key,
                base_url=self._base_url, max_retries=0, timeout=self._timeout,
                # Without stream_usage a custom base_url streams no usage: budgets would read 0.
                stream_usage=True, use_responses_api=False,
            )
        return self._chat_models[key]

    async def stream_chat(
        self, messages: list[BaseMessage], *, model: str, temperature: float, max_tokens: int,
        on_delta: Callable[[str], Awaitable[None] | None] | None = None,
    ) -> ModelResult:
        """Stream an answer; retry only before the first token (a retry after it would repeat text)."""
        llm = self.chat_model(model, temperature)
        attempt = 0
        while True:
            attempt += 1
            parts: list[str] = []
            usage: dict[str, Any] | None = None
            truncated = False
            try:
                async for chunk in llm.astream(messages, max_tokens=max_tokens):
                    if chunk.content:
                        text = chunk.content if isinstance(chunk.content, str) else str(chunk.content)
                        parts.append(text)
                        if on_delta is not None:
                            maybe = on_delta(text)
                            if maybe is not None:
                                await maybe
                    if chunk.usage_metadata:
                        usage = dict(chunk.usage_metadata)
                    if chunk.response_metadata.get("finish_reason") == "length":
                        truncated = True
            except Exception as exc:  # noqa: BLE001 - every provider fault is classified below
                kind = classify(exc)
                if parts:
                    return ModelResult("".join(parts), None, None, kind, attempt, type(exc).__name__)
                if kind in RETRYABLE and attempt < self._max_attempts:
                    await asyncio.sleep(self._delay(attempt, exc))
                    continue
                log.warning("model call failed: %s (%s) after %d attempts", kind, type(exc).__name__, attempt)
                return ModelResult("", None, None, kind, attempt, type(exc).__name__)
            if usage is None:
                return ModelResult("".join(parts), None, None, None, attempt, truncated=truncated)
            return ModelResult(
                "".join(parts), int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0)),
                None, attempt, truncated=truncated,
            )

    async def complete(
        self, messages: list[BaseMessage], *, model: str, temperature: float, max_tokens: int
    ) -> ModelResult:
        """A whole answer at once (summaries): the same retry policy as streaming."""
        return await self.stream_chat(
            messages, model=model, temperature=temperature, max_tokens=max_tokens
        )

    async def embed(self, text: str) -> list[float]:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._embeddings.aembed_query(text)
            except Exception as exc:  # noqa: BLE001 - classified; non-retryable faults propagate
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
