"""An aiohttp app served from its own thread and event loop, for clients that block their caller."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")


class ThreadedServer:
    """Serves `build_app()` on 127.0.0.1:<random port> from a daemon thread.

    A sync client (pinecone's urllib3 Index, sentry's transport worker waited on by
    `sentry_sdk.flush()`) blocks the test's event loop while it waits for an answer; a
    server on that same loop could never answer. Here the server has a loop of its own.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def build_app(self) -> web.Application:
        raise NotImplementedError

    # ----------------------------------------------------------------- lifecycle

    def start_in_thread(self, timeout: float = 5.0) -> ThreadedServer:
        if self._thread is not None:
            return self
        self._thread = threading.Thread(
            target=self._serve, name=f"{type(self).__name__}-server", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"{type(self).__name__} did not start within {timeout}s")
        if self._error is not None:
            raise RuntimeError(f"{type(self).__name__} failed to start") from self._error
        return self

    def stop(self, timeout: float = 5.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._runner is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop)
            with contextlib.suppress(Exception):
                future.result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = self._loop = self._runner = None
        self._ready.clear()

    def __enter__(self) -> ThreadedServer:
        return self.start_in_thread()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._port

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 5.0) -> T:
        """Run a coroutine on the server's loop (for state that loop owns)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ----------------------------------------------------------------- internals

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._start_site())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _start_site(self) -> None:
        # handler_cancellation: a client that gives up (timeout) ends its handler too.
        self._runner = web.AppRunner(
            self.build_app(), handler_cancellation=True, shutdown_timeout=1.0, access_log=None
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server  # aiohttp exposes the bound port only through the server
        assert server is not None and server.sockets
        self._port = server.sockets[0].getsockname()[1]
