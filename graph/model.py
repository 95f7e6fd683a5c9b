"""The model provider: streamed chat, summaries and embeddings, with the one retry policy."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import numpy as np
import openai
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

if TYPE_CHECKING:
    from settings import Settings

log = logging.getLogger(__name__)

# busy: rate limited; unavailable: 5xx or connection; timeout: no answer in time (may be billed);
# quota: the provider account is out of credit; auth: bad key; error: anything else.
# stopped: the user stopped the answer while it streamed (not an error: what came is kept).
FaultKind = Literal["busy", "unavailable", "timeout", "quota", "auth", "error", "stopped"]
# Not "timeout": the provider may already bill the attempt that timed out, and a second would
# be charged once only; the user gets the timeout message, the attempt its reservation.
RETRYABLE: frozenset[str] = frozenset({"busy", "unavailable"})
MAX_RETRY_AFTER = 20.0


@dataclass(frozen=True)
class ToolRequest:
    """A tool call the model asked for: its arguments as the JSON text it sent."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ModelResult:
    text: str
    input_tokens: int | None
    output_tokens: int | None
    fault: FaultKind | None = None
    attempts: int = 1
    error: str | None = None  # the exception class name: never its message (it may quote input)
    truncated: bool = False  # the model stopped at max_tokens, mid-answer
    tool_calls: tuple[ToolRequest, ...] = ()

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
    """Owns every call to the provider: one OpenAI SDK client, one retry policy (`_retrying`).

    Answers, summaries and embeddings are posted with the SDK's own `post` and read as plain
    dicts: not ChatOpenAI's pydantic chunk models, message chunks and callback dispatch on every
    token, nor the SDK's request transform and response models (measured in bench/README.md).
    The SDK's own retries are off (max_retries=0): the retries are ours, so quota and auth
    errors are never retried and a streamed answer is never retried after its first token.

    The transport is the SDK's aiohttp one (openai.DefaultAioHttpClient): a streamed answer is
    one read per token, and aiohttp's C parser reads each for about half of httpx's CPU.
    """

    def __init__(
        self, *, api_key: str, base_url: str | None, embedding_model: str, timeout: float,
        max_attempts: int, retry_base_delay: float, transcription_base_url: str | None = None,
    ) -> None:
        self._max_attempts = max_attempts
        self._retry_base_delay = retry_base_delay
        self._embedding_model = embedding_model
        # One connection pool for every model, owned here so it is closed on this event loop.
        self._http = openai.DefaultAioHttpClient()
        self.client = openai.AsyncOpenAI(
            api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout,
            http_client=self._http,
        )
        # Speech may go to a local engine of its own (faster-whisper-server, whisper.cpp's
        # server, LocalAI...): the same OpenAI protocol at another address, on the same pool.
        self.speech_client = self.client if not transcription_base_url else openai.AsyncOpenAI(
            api_key=api_key, base_url=transcription_base_url, max_retries=0, timeout=timeout,
            http_client=self._http,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelGateway:
        return cls(
            api_key=settings.openai_api_key.get_secret_value(), base_url=settings.openai_base_url,
            embedding_model=settings.embedding_model, timeout=settings.model_timeout,
            max_attempts=settings.model_max_attempts,
            retry_base_delay=settings.model_retry_base_delay,
            transcription_base_url=settings.transcription_base_url,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def stream_chat(
        self, messages: list[BaseMessage], *, model: str, temperature: float, max_tokens: int,
        on_delta: Callable[[str], None] | None = None, tools: list[dict[str, Any]] | None = None,
        stop: asyncio.Event | None = None,
    ) -> ModelResult:
        """Stream an answer (or tool calls); retry only before the first token (a retry after
        it would repeat text). When `stop` is set the stream is closed at the next chunk (the
        provider stops generating) and what came so far is the result, as "stopped"."""
        request: dict[str, Any] = {
            "model": model, "messages": [_as_openai(m) for m in messages],
            "temperature": temperature, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True},
        }
        if tools:
            request["tools"] = tools
        answer = _StreamedAnswer(on_delta)

        async def attempt() -> None:
            nonlocal answer
            answer = _StreamedAnswer(on_delta)
            # The SDK's stream reads past [DONE] (a response left unread could not give its
            # connection back to the pool) and raises an error event as APIError.
            stream = await self.client.post(
                "/chat/completions", body=request, cast_to=object, stream=True,
                stream_cls=openai.AsyncStream[object],
            )
            async with stream:
                async for chunk in stream:
                    if stop is not None and stop.is_set():
                        break  # leaving the block closes the response: generation stops
                    answer.feed(chunk)

        retrying = self._retrying(lambda: not answer.parts and not answer.calls)
        try:
            await retrying(attempt)
        except Exception as exc:
            kind, error, attempts = _failed(exc, retrying)
            return answer.result(attempts, kind, error)
        if stop is not None and stop.is_set():
            return answer.result(_attempts(retrying), "stopped")
        return answer.result(_attempts(retrying))

    async def complete(
        self, messages: list[BaseMessage], *, model: str, temperature: float, max_tokens: int
    ) -> ModelResult:
        """A whole answer at once (summaries)."""
        request = {
            "model": model, "messages": [_as_openai(m) for m in messages],
            "temperature": temperature, "max_tokens": max_tokens,
        }
        retrying = self._retrying()
        try:
            reply: Any = await retrying(self.client.post, "/chat/completions", body=request, cast_to=object)
        except Exception as exc:
            kind, error, attempts = _failed(exc, retrying)
            return ModelResult("", None, None, kind, attempts, error)
        choice = (reply.get("choices") or [{}])[0]
        text = str((choice.get("message") or {}).get("content") or "")
        truncated = choice.get("finish_reason") == "length"
        usage = reply.get("usage")
        if not usage:
            return ModelResult(text, None, None, None, _attempts(retrying), truncated=truncated)
        return ModelResult(
            text, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)), None,
            _attempts(retrying), truncated=truncated,
        )

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """One embedding per text, in one request. As the SDK itself asks by default, vectors come
        base64-encoded (a quarter of the JSON, decoded by numpy); a provider that answers with
        JSON lists of floats is read too."""
        body = {"model": self._embedding_model, "input": texts, "encoding_format": "base64"}
        retrying = self._retrying()
        try:
            reply: Any = await retrying(self.client.post, "/embeddings", body=body, cast_to=object)
        except Exception as exc:
            raise ModelFault(*_failed(exc, retrying)) from None
        rows = sorted(reply["data"], key=lambda row: row.get("index", 0))
        return [_vector(row["embedding"]) for row in rows]

    async def transcribe(self, audio: bytes, filename: str, model: str) -> str:
        """The text of speech, by the provider's OpenAI-compatible transcription endpoint
        (multipart, through the SDK); raises ModelFault."""
        async def call() -> Any:  # the SDK method is not a coroutine function: wrapped, it is
            return await self.speech_client.audio.transcriptions.create(
                model=model, file=(filename, audio)
            )

        retrying = self._retrying()
        try:
            reply: Any = await retrying(call)
        except Exception as exc:
            raise ModelFault(*_failed(exc, retrying)) from None
        return str(getattr(reply, "text", "") or "").strip()

    async def reachable(self) -> None:
        """One cheap authenticated request (the readiness probe); raises what the provider says."""
        await self.client.models.list()

    def _retrying(self, still_retryable: Callable[[], bool] = lambda: True) -> AsyncRetrying:
        """The one retry policy: busy and unavailable faults only, up to max_attempts, the
        provider's Retry-After honoured, otherwise exponential backoff with full jitter (so
        users who failed together do not retry together). Re-raises the last error."""

        def worth_retrying(exc: BaseException) -> bool:
            return classify(exc) in RETRYABLE and still_retryable()

        jitter = wait_random_exponential(multiplier=self._retry_base_delay, max=MAX_RETRY_AFTER)

        def wait(state: RetryCallState) -> float:
            failed = state.outcome.exception() if state.outcome is not None else None
            hinted = _retry_after(failed) if failed is not None else None
            return hinted if hinted is not None else jitter(state)

        return AsyncRetrying(
            stop=stop_after_attempt(self._max_attempts), wait=wait,
            retry=retry_if_exception(worth_retrying), reraise=True,
        )


def _attempts(retrying: AsyncRetrying) -> int:
    return int(retrying.statistics.get("attempt_number", 1))


def _failed(exc: BaseException, retrying: AsyncRetrying) -> tuple[FaultKind, str, int]:
    """(kind, error class, attempts) of a call that gave up, logged without its message."""
    kind, attempts = classify(exc), _attempts(retrying)
    log.warning("model call failed: %s (%s) after %d attempts", kind, type(exc).__name__, attempts)
    return kind, type(exc).__name__, attempts


_OPENAI_ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool"}


def _as_openai(message: BaseMessage) -> dict[str, Any]:
    """Our prompts hold system, user and assistant text, and tool calls with their results."""
    # A question with a picture is a list of content parts, sent as it is.
    content: Any = message.content
    wire: dict[str, Any] = {"role": _OPENAI_ROLES[message.type], "content": content}
    if isinstance(message, ToolMessage):
        wire["tool_call_id"] = message.tool_call_id
    elif isinstance(message, AIMessage) and message.tool_calls:
        wire["content"] = content or None
        wire["tool_calls"] = [
            {"id": call["id"], "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call["args"])}}
            for call in message.tool_calls
        ]
    return wire


class _StreamedAnswer:
    """What one streamed attempt produced, chunk by chunk."""

    def __init__(self, on_delta: Callable[[str], None] | None) -> None:
        self.on_delta = on_delta
        self.parts: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}  # by index: id, name, argument pieces
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
            for piece in (choice.get("delta") or {}).get("tool_calls") or ():
                call = self.calls.setdefault(
                    int(piece.get("index", 0)), {"id": "", "name": "", "arguments": []}
                )
                function = piece.get("function") or {}
                call["id"] = piece.get("id") or call["id"]
                call["name"] = function.get("name") or call["name"]
                call["arguments"].append(function.get("arguments") or "")
            if choice.get("finish_reason") == "length":
                self.truncated = True

    def result(self, attempt: int, fault: FaultKind | None = None, error: str | None = None) -> ModelResult:
        text = "".join(self.parts)
        if fault is not None or self.usage is None:
            return ModelResult(text, None, None, fault, attempt, error, truncated=self.truncated)
        calls = () if self.truncated else tuple(
            ToolRequest(c["id"], c["name"], "".join(c["arguments"]))
            for _, c in sorted(self.calls.items())
        )
        return ModelResult(
            text, int(self.usage.get("prompt_tokens", 0)), int(self.usage.get("completion_tokens", 0)),
            None, attempt, truncated=self.truncated, tool_calls=calls,
        )


def _vector(embedding: str | list[float]) -> list[float]:
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4").tolist()
    return [float(x) for x in embedding]
