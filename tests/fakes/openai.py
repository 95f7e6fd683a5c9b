"""In-process fake of the OpenAI HTTP API (chat completions + SSE, embeddings, models) for tests."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import json
import math
import re
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

CHAT_PATH = "/v1/chat/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"



@dataclass(frozen=True)
class ToolCall:
    """One function call the fake model asks for; a str `arguments` is sent as it is."""

    name: str
    arguments: dict[str, Any] | str = field(default_factory=dict)
    id: str = ""


@dataclass(frozen=True)
class ToolCalls:
    """A reply that calls tools (after `text`, if any), with finish_reason "tool_calls"."""

    calls: tuple[ToolCall, ...]
    text: str = ""


Reply = str | ToolCalls
ReplyFn = Callable[[dict[str, Any]], Reply | Awaitable[Reply]]

CHAT_FAULTS = frozenset(
    {"rate_limit", "insufficient_quota", "server_error", "auth", "hang", "cut_stream", "no_usage"}
)
# Stream-shape faults make no sense for a JSON-only endpoint.
EMBEDDING_FAULTS = frozenset({"rate_limit", "insufficient_quota", "server_error", "auth", "hang"})

# Words keep their leading whitespace so joining the chunks gives back the exact reply.
_CHUNK_RE = re.compile(r"\s*\S+|\s+")
_WORD_RE = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Request:
    """One HTTP request as the fake received it."""

    path: str
    json: Any
    headers: dict[str, str]
    at: float  # time.monotonic() at arrival
    peer: Any = None  # the client's (host, port): one per TCP connection


@dataclass
class _Fault:
    kind: str
    opts: dict[str, Any] = field(default_factory=dict)


def _prompt_counter() -> tuple[str, Callable[[list[dict[str, Any]], str], int]]:
    """Pick how prompt_tokens are counted: the project's tiktoken counter, else chars/4."""
    try:
        from graph.tokens import count_messages, encoding_for

        encoding_for("gpt-4o")  # raises if the vendored files are missing or corrupt
        return "tiktoken", count_messages
    except Exception:

        def by_chars(messages: list[dict[str, Any]], model: str) -> int:
            text = "".join(str(m.get("content") or "") for m in messages)
            return max(1, len(text) // 4)

        return "chars/4", by_chars


def _text_counter() -> Callable[[str], int]:
    try:
        from graph.tokens import count_tokens, encoding_for

        encoding_for("text-embedding-3-small")
        return lambda text: count_tokens(text, "text-embedding-3-small")
    except Exception:

        return lambda text: max(1, len(text) // 4)


def _decode_token_ids(ids: list[int]) -> str:
    """Token-id input (sent when OpenAIEmbeddings checks ctx length) back to text, so the same
    text embeds identically whichever form it arrives in."""
    try:
        from graph.tokens import encoding_for

        return encoding_for("text-embedding-3-small").decode(ids)
    except Exception:
        return " ".join(f"tok{i}" for i in ids)


def fake_embedding(text: str, dims: int) -> list[float]:
    """Deterministic unit vector: signed hashed bag of lower-cased words (feature hashing).

    Texts that share words get a high cosine similarity; unrelated texts land near 0.
    """
    vec = [0.0] * dims
    words = _WORD_RE.findall(text.lower()) or [text]
    for word in words:
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        h = int.from_bytes(digest, "little")
        vec[h % dims] += 1.0 if (h >> 63) & 1 else -1.0
    norm = math.sqrt(sum(x * x for x in vec))
    if norm == 0.0:  # only when every word cancelled out; keep it a unit vector
        vec[0], norm = 1.0, 1.0
    return [x / norm for x in vec]


class FakeOpenAI:
    """Fake OpenAI-compatible server on 127.0.0.1:<random port>. Use `async with FakeOpenAI()`.

    Knobs (all plain attributes, change them any time):
      reply             str | ToolCalls | (request_json) -> either (or awaitable); default
                        "Answer #N", N = number of chat requests so far
      usage_override    dict merged into every chat usage, e.g. {"prompt_tokens": 100}
      first_token_delay seconds before the first content chunk (non-stream: before the reply)
      chunk_delay       seconds between content chunks
      dims              embedding dimensions when the request has no `dimensions`
      models            ids listed by GET /v1/models
    """

    def __init__(
        self,
        *,
        reply: Reply | ReplyFn | None = None,
        dims: int = 256,
        first_token_delay: float = 0.0,
        chunk_delay: float = 0.0,
        usage_override: dict[str, int] | None = None,
        models: tuple[str, ...] = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small"),
    ) -> None:
        self.reply: Reply | ReplyFn | None = reply
        self.dims = dims
        # Some OpenAI-compatible servers ignore encoding_format and always send JSON floats.
        self.embeddings_as_floats = False
        self.first_token_delay = first_token_delay
        self.chunk_delay = chunk_delay
        self.usage_override: dict[str, int] | None = usage_override
        self.models = models
        self.requests: list[Request] = []
        # What /audio/transcriptions answers: a fixed text, or a function of the audio bytes.
        self.transcript: str | Callable[[bytes], str] = "transcribed speech"
        self.transcriptions: list[dict[str, Any]] = []  # form fields and the audio's size
        self.prompt_token_counter, self._count_prompt = _prompt_counter()
        self._count_text = _text_counter()
        self._chat_faults: deque[_Fault] = deque()
        self._embedding_faults: deque[_Fault] = deque()
        self._gate = asyncio.Event()
        self._gate.set()
        self._stopping = asyncio.Event()
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> FakeOpenAI:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(CHAT_PATH, self._chat)
        app.router.add_post(EMBEDDINGS_PATH, self._embeddings)
        app.router.add_post(TRANSCRIPTIONS_PATH, self._transcriptions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        # handler_cancellation: a client that disconnects cancels its handler (aiohttp's
        # default leaves it running), so "hang" and held requests end with the client.
        # shutdown_timeout: stop() must not wait 60 s for a handler that is still streaming.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server  # aiohttp exposes the bound port only through the server
        assert server is not None and server.sockets
        self._port = server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._runner is None:
            return
        # Wake every waiting handler (hang, hold, delays) so it aborts its connection now;
        # then aiohttp closes keep-alive sockets and cancels whatever is left.
        self._stopping.set()
        self._gate.set()
        await self._runner.cleanup()
        self._runner = None

    async def __aenter__(self) -> FakeOpenAI:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeOpenAI is not started")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ------------------------------------------------------------- test helpers

    @property
    def chat_requests(self) -> list[dict[str, Any]]:
        """Bodies of the chat completion requests, as sent, in arrival order."""
        return [r.json for r in self.requests if r.path == CHAT_PATH]

    @property
    def embedding_requests(self) -> list[dict[str, Any]]:
        return [r.json for r in self.requests if r.path == EMBEDDINGS_PATH]

    def last_system_prompt(self) -> str | None:
        """Content of the system (or developer) message of the last chat request."""
        if not self.chat_requests:
            return None
        for message in self.chat_requests[-1].get("messages", []):
            if message.get("role") in ("system", "developer"):
                content = message.get("content")
                if isinstance(content, list):  # content parts
                    return "".join(p.get("text", "") for p in content if isinstance(p, dict))
                return content if isinstance(content, str) else None
        return None

    def hold(self) -> None:
        """Make chat requests that arrive from now on wait (after being recorded)."""
        self._gate.clear()

    def release(self) -> None:
        """Let every held chat request proceed."""
        self._gate.set()

    async def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Wait until at least `n` chat requests have arrived; returns their bodies."""
        async with self._arrived:
            try:
                await asyncio.wait_for(
                    self._arrived.wait_for(lambda: len(self.chat_requests) >= n), timeout
                )
            except TimeoutError:
                raise TimeoutError(
                    f"only {len(self.chat_requests)} of {n} chat requests arrived in {timeout}s"
                ) from None
        return self.chat_requests

    def fail_next(self, kind: str, times: int = 1, **opts: Any) -> None:
        """Queue a fault for the next `times` chat requests (faults are used in order).

        kinds: rate_limit (retry_after="0"), insufficient_quota, server_error (status=500),
        auth, hang, cut_stream (chunks=3), no_usage.
        """
        if kind not in CHAT_FAULTS:
            raise ValueError(f"unknown chat fault {kind!r}; known: {sorted(CHAT_FAULTS)}")
        self._chat_faults.extend(_Fault(kind, dict(opts)) for _ in range(times))

    def fail_next_embeddings(self, kind: str, times: int = 1, **opts: Any) -> None:
        """Queue a fault for the next `times` embeddings requests."""
        if kind not in EMBEDDING_FAULTS:
            known = sorted(EMBEDDING_FAULTS)
            raise ValueError(f"unknown embeddings fault {kind!r}; known: {known}")
        self._embedding_faults.extend(_Fault(kind, dict(opts)) for _ in range(times))

    # ----------------------------------------------------------------- handlers

    async def _transcriptions(self, request: web.Request) -> web.Response:
        """POST /v1/audio/transcriptions, multipart: file, model[, response_format, language]."""
        form = await request.post()
        upload = form.get("file")
        if not isinstance(upload, web.FileField) or not form.get("model"):
            return _error(400, "file and model are required", "invalid_request_error", None)
        audio = upload.file.read()
        fields = {key: str(value) for key, value in form.items() if key != "file"}
        self.transcriptions.append({**fields, "filename": upload.filename, "size": len(audio)})
        self.requests.append(Request(request.path, fields, dict(request.headers), time.monotonic()))
        text = self.transcript(audio) if callable(self.transcript) else self.transcript
        return web.json_response({"text": text})

    async def _record(self, request: web.Request) -> Request | web.Response:
        try:
            body = await request.json() if request.can_read_body else None
        except json.JSONDecodeError:
            return _error(400, "We could not parse the JSON body of your request.",
                          "invalid_request_error", None)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        record = Request(request.path, body, dict(request.headers), time.monotonic(), peer)
        self.requests.append(record)
        async with self._arrived:
            self._arrived.notify_all()
        return record

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        record = await self._record(request)
        if isinstance(record, web.Response):
            return record
        body: dict[str, Any] = record.json
        number = len(self.chat_requests)
        # Take the fault at arrival so faults map to requests in arrival order even if held
        # requests are released in a different order.
        fault = self._chat_faults.popleft() if self._chat_faults else None
        if not self._gate.is_set():
            await self._wait_or_abort(request, self._gate.wait())
        if fault is not None and fault.kind not in ("cut_stream", "no_usage"):
            return await self._error_fault(request, fault, body)

        reply = await self._reply(body, number)
        calls = _wire_calls(reply, number) if isinstance(reply, ToolCalls) else []
        text = reply.text if isinstance(reply, ToolCalls) else reply
        chunks = _CHUNK_RE.findall(text)
        finish_reason = "tool_calls" if calls else "stop"
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and len(chunks) > limit:
            chunks, finish_reason, calls = chunks[:limit], "length", []
        call_tokens = sum(len(_CHUNK_RE.findall(c["function"]["arguments"])) + 1 for c in calls)
        usage = self._chat_usage(body, len(chunks) + call_tokens)
        model = body.get("model", "gpt-4o-mini")
        completion_id = f"chatcmpl-fake{number}"

        if not body.get("stream"):
            await self._sleep(
                request, self.first_token_delay + self.chunk_delay * max(0, len(chunks) - 1)
            )
            if fault is not None and fault.kind == "cut_stream":
                # Non-streaming equivalent of a dropped connection: no response at all.
                self._abort(request)
                raise asyncio.CancelledError
            payload: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": "".join(chunks) if chunks or not calls else None,
                            "refusal": None,
                            **({"tool_calls": calls} if calls else {}),
                        },
                        "logprobs": None,
                        "finish_reason": finish_reason,
                    }
                ],
            }
            if not (fault is not None and fault.kind == "no_usage"):
                payload["usage"] = usage
            return web.json_response(payload)
        return await self._stream(request, body, fault, chunks, finish_reason, usage,
                                  completion_id, calls)

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        fault: _Fault | None,
        chunks: list[str],
        finish_reason: str,
        usage: dict[str, Any],
        completion_id: str,
        calls: list[dict[str, Any]],
    ) -> web.StreamResponse:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        created = int(time.time())
        model = body.get("model", "gpt-4o-mini")

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            payload: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": choices,
            }
            if include_usage:
                payload["usage"] = None  # the real API sends usage: null until the last chunk
            payload.update(extra)
            return f"data: {json.dumps(payload)}\n\n".encode()

        def delta(d: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        await response.write(event(delta({"role": "assistant", "content": "", "refusal": None})))
        cut_after: int | None = None
        if fault is not None and fault.kind == "cut_stream":
            cut_after = int(fault.opts.get("chunks", 3))
        for i, chunk in enumerate(chunks):
            if cut_after is not None and i >= cut_after:
                break
            await self._sleep(request, self.first_token_delay if i == 0 else self.chunk_delay)
            await response.write(event(delta({"content": chunk})))
        for index, call in enumerate(calls):
            # As the API streams them: the id and name first, the arguments in pieces.
            await response.write(event(delta({"tool_calls": [{
                "index": index, "id": call["id"], "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""},
            }]})))
            arguments = call["function"]["arguments"]
            for piece in (arguments[: len(arguments) // 2], arguments[len(arguments) // 2 :]):
                await response.write(event(delta({"tool_calls": [{
                    "index": index, "function": {"arguments": piece},
                }]})))
        if cut_after is not None:
            # Mid-body abort: no finish chunk, no usage, no [DONE], and the chunked encoding
            # is left incomplete, like a dropped upstream connection.
            self._abort(request)
            return response
        await response.write(event(delta({}, finish_reason)))
        if include_usage and not (fault and fault.kind == "no_usage"):
            await response.write(event([], usage=usage))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        record = await self._record(request)
        if isinstance(record, web.Response):
            return record
        body: dict[str, Any] = record.json
        if self._embedding_faults:
            return await self._error_fault(request, self._embedding_faults.popleft(), body)
        raw = body.get("input")
        texts: list[str]
        if isinstance(raw, str):
            texts = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
            texts = [_decode_token_ids(raw)]  # a single token-id array
        elif isinstance(raw, list):
            texts = [x if isinstance(x, str) else _decode_token_ids(list(x)) for x in raw]
        else:
            return _error(400, "'input' is a required property", "invalid_request_error", None)
        dims = int(body.get("dimensions") or self.dims)
        as_base64 = body.get("encoding_format") == "base64" and not self.embeddings_as_floats
        data = []
        for index, text in enumerate(texts):
            vector = fake_embedding(text, dims)
            embedding: str | list[float] = (
                base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
                if as_base64 else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(self._count_text(t) for t in texts)
        return web.json_response({
            "object": "list",
            "data": data,
            "model": body.get("model", "text-embedding-3-small"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": "fake"}
                     for m in self.models],
        })

    async def _not_found(self, request: web.Request) -> web.Response:
        await self._record(request)
        return _error(404, f"Invalid URL ({request.method} {request.path})",
                      "invalid_request_error", None)

    # ----------------------------------------------------------------- internals

    async def _reply(self, body: dict[str, Any], number: int) -> Reply:
        if self.reply is None:
            return f"Answer #{number}"
        if callable(self.reply):
            reply = self.reply(body)
            # An async reply function lets a test block or inspect state per request.
            if inspect.isawaitable(reply):
                reply = await reply
            return reply if isinstance(reply, ToolCalls) else str(reply)
        return self.reply

    def _chat_usage(self, body: dict[str, Any], completion_tokens: int) -> dict[str, Any]:
        prompt_tokens = self._count_prompt(body.get("messages", []), body.get("model", ""))
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        }
        if self.usage_override:
            usage.update(self.usage_override)
            if "total_tokens" not in self.usage_override:
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return usage

    async def _error_fault(
        self, request: web.Request, fault: _Fault, body: dict[str, Any]
    ) -> web.StreamResponse:
        if fault.kind == "hang":
            # Never answer; ends when the client disconnects (handler cancelled) or at stop().
            await self._wait_or_abort(request, asyncio.Event().wait())
        if fault.kind == "rate_limit":
            model = body.get("model", "gpt-4o-mini")
            return _error(
                429,
                f"Rate limit reached for {model} in organization org-fake on requests per min "
                "(RPM): Limit 3, Used 3, Requested 1. Please try again in 20s.",
                "requests", "rate_limit_exceeded",
                headers={"retry-after": str(fault.opts.get("retry_after", "0"))},
            )
        if fault.kind == "insufficient_quota":
            return _error(
                429,
                "You exceeded your current quota, please check your plan and billing details.",
                "insufficient_quota", "insufficient_quota",
            )
        if fault.kind == "server_error":
            return _error(
                int(fault.opts.get("status", 500)),
                "The server had an error while processing your request. Sorry about that!",
                "server_error", None,
            )
        if fault.kind == "auth":
            return _error(
                401,
                "Incorrect API key provided: sk-****. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                "invalid_request_error", "invalid_api_key",
            )
        raise AssertionError(f"unhandled fault {fault.kind}")

    async def _sleep(self, request: web.Request, seconds: float) -> None:
        if seconds > 0:
            await self._wait_or_abort(request, asyncio.sleep(seconds))

    async def _wait_or_abort(self, request: web.Request, awaitable: Any) -> None:
        """Await `awaitable`, but if the server is stopping, drop the connection instead."""
        waiter = asyncio.ensure_future(awaitable)
        stopper = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            stopper.cancel()
        if self._stopping.is_set():
            self._abort(request)
            raise asyncio.CancelledError  # ends the handler without writing a response

    @staticmethod
    def _abort(request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            transport.abort()


def _wire_calls(reply: ToolCalls, number: int) -> list[dict[str, Any]]:
    """The calls as the API's message.tool_calls list (ids made up when the test gave none)."""
    return [
        {
            "id": call.id or f"call_{number}_{index}", "type": "function",
            "function": {
                "name": call.name,
                "arguments": call.arguments if isinstance(call.arguments, str)
                else json.dumps(call.arguments),
            },
        }
        for index, call in enumerate(reply.calls)
    ]


def _error(
    status: int,
    message: str,
    type_: str,
    code: str | None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error in the API's shape: {"error": {"message", "type", "param", "code"}}."""
    return web.json_response(
        {"error": {"message": message, "type": type_, "param": None, "code": code}},
        status=status,
        headers=headers,
    )
