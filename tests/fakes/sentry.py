"""A fake Sentry ingest: receives the SDK's envelopes over HTTP so tests can read what would leave.

DSN: ``fake.dsn`` (``http://publickey@127.0.0.1:PORT/42``). The server runs in its own thread:
``sentry_sdk.flush()`` blocks the caller until the SDK's worker has sent, which a server on
the test's own event loop could never answer.
"""

from __future__ import annotations

import gzip
import json
import threading
import zlib
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.fakes.threaded import ThreadedServer


@dataclass(frozen=True)
class Item:
    headers: dict[str, Any]
    payload: bytes

    @property
    def type(self) -> str:
        return str(self.headers.get("type", ""))

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass(frozen=True)
class Envelope:
    project: str
    headers: dict[str, Any]
    items: list[Item]
    raw: bytes  # the whole body, decompressed
    auth: str | None  # the X-Sentry-Auth header


def parse_envelope(body: bytes) -> tuple[dict[str, Any], list[Item]]:
    """Sentry's envelope format: a header line, then (item header line, payload) pairs."""
    first, _, rest = body.partition(b"\n")
    headers = json.loads(first) if first.strip() else {}
    items = []
    while rest.strip():
        line, _, rest = rest.partition(b"\n")
        if not line.strip():
            continue
        item_headers = json.loads(line)
        length = item_headers.get("length")
        if length is not None:
            payload, rest = rest[:length], rest[length:]
            if rest.startswith(b"\n"):
                rest = rest[1:]
        else:
            payload, _, rest = rest.partition(b"\n")
        items.append(Item(item_headers, payload))
    return headers, items


def decompress(body: bytes, encoding: str | None) -> bytes:
    """aiohttp already inflates gzip/deflate request bodies; this covers a body that is not."""
    encoding = (encoding or "").lower()
    if encoding == "gzip" and body[:2] == b"\x1f\x8b":
        return gzip.decompress(body)
    if encoding == "deflate" and body[:1] == b"\x78":
        return zlib.decompress(body)
    if encoding == "br" and not body.lstrip().startswith(b"{"):
        import brotli  # type: ignore[import-not-found]

        return bytes(brotli.decompress(body))
    return body


class FakeSentry(ThreadedServer):
    def __init__(self, project: str = "42", public_key: str = "publickey") -> None:
        super().__init__()
        self.project = project
        self.public_key = public_key
        self._lock = threading.Lock()
        self._envelopes: list[Envelope] = []

    def start_in_thread(self, timeout: float = 5.0) -> FakeSentry:
        super().start_in_thread(timeout)
        return self

    def __enter__(self) -> FakeSentry:
        return self.start_in_thread()

    @property
    def dsn(self) -> str:
        return f"http://{self.public_key}@127.0.0.1:{self.port}/{self.project}"

    @property
    def envelopes(self) -> list[Envelope]:
        with self._lock:
            return list(self._envelopes)

    def events(self) -> list[dict[str, Any]]:
        """Error events (envelope items of type "event"), parsed."""
        return [item.json() for env in self.envelopes for item in env.items if item.type == "event"]

    def everything(self) -> bytes:
        """Every byte received (decompressed): for asserting that something never left."""
        return b"\n".join(env.raw for env in self.envelopes)

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_post("/api/{project}/envelope/", self._envelope)
        return app

    async def _envelope(self, request: web.Request) -> web.Response:
        body = decompress(await request.read(), request.headers.get("Content-Encoding"))
        headers, items = parse_envelope(body)
        with self._lock:
            self._envelopes.append(Envelope(
                request.match_info["project"], headers, items, body,
                request.headers.get("X-Sentry-Auth"),
            ))
        return web.json_response({"id": headers.get("event_id")})
