"""Webhook mode: an aiohttp server that acknowledges an update only once it is durably stored."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
from collections.abc import Awaitable
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

from aiogram import Bot, Dispatcher
from aiogram.types import Update
from aiohttp import web
from pydantic import ValidationError
from redis.asyncio import Redis

from handlers.delivery import Delivery
from storage.repositories import ping

if TYPE_CHECKING:
    from graph.agent import Agent

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


class WebhookServer:
    """POST <path>: check the secret, store, answer 200, then process; GET /health: readiness."""

    def __init__(
        self, agent: Agent, bot: Bot, dispatcher: Dispatcher, delivery: Delivery,
        redis: Redis | None,
    ) -> None:
        settings = agent.services.settings
        assert settings.webhook_url is not None
        self.agent = agent
        self.bot = bot
        self.dispatcher = dispatcher
        self.delivery = delivery
        self.redis = redis
        assert settings.webhook_secret is not None  # bot.py refuses webhook mode without one
        self.path = urlsplit(settings.webhook_url).path or "/"
        self.secret = settings.webhook_secret.get_secret_value()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_post(self.path, self.receive)
        app.router.add_get("/health", self.health)
        return app

    async def receive(self, request: web.Request) -> web.Response:
        given = request.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.secret.encode()):
            return web.Response(status=401, text="unauthorized")
        try:
            update = Update.model_validate(await request.json(), context={"bot": self.bot})
        except (json.JSONDecodeError, ValidationError, UnicodeDecodeError):
            return web.Response(status=400, text="not a Telegram update")
        try:
            fresh = await self.delivery.accept([update])
        except Exception as exc:
            log.error("inbox unavailable (%s): asking Telegram to retry", type(exc).__name__)
            return web.Response(status=503, text="try again")
        for new in fresh:
            self.delivery.dispatch(new)
        return web.json_response({})

    async def health(self, request: web.Request) -> web.Response:
        checks: dict[str, str] = {}
        try:
            async with self.agent.services.sessions() as db:
                await ping(db)
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = type(exc).__name__
        if self.redis is not None:
            try:
                # redis-py types its commands for the sync and async clients at once.
                await cast(Awaitable[bool], self.redis.ping())
                checks["redis"] = "ok"
            except Exception as exc:
                checks["redis"] = type(exc).__name__
        checks["model_provider"] = await self._provider()
        ready = all(v == "ok" for v in checks.values())
        return web.json_response({"ready": ready, **checks}, status=200 if ready else 503)

    async def _provider(self) -> str:
        try:
            await asyncio.wait_for(self.agent.services.models.reachable(), timeout=3)
        except Exception as exc:
            return type(exc).__name__
        return "ok"


async def run_webhook(agent: Agent) -> None:
    from handlers.app import build_bot, build_dispatcher, fleet_parts
    from handlers.i18n import Catalog
    from handlers.stopping import Stoppable

    settings = agent.services.settings
    redis, storage, locks, pacer = fleet_parts(settings)
    bot = build_bot(settings)
    stoppable = Stoppable(redis)  # with Redis, a stop reaches the process streaming the answer
    dispatcher = build_dispatcher(
        agent, Catalog.load(), storage=storage, pacer=pacer, stoppable=stoppable
    )
    delivery = fleet_delivery(bot, dispatcher, agent, locks)
    server = WebhookServer(agent, bot, dispatcher, delivery, redis)
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.webhook_listen_host, settings.webhook_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await dispatcher.emit_startup(bot=bot, **dispatcher.workflow_data)
    listening = asyncio.create_task(stoppable.listen())
    try:
        await site.start()
        await bot.set_webhook(
            settings.webhook_url or "", secret_token=server.secret,
            allowed_updates=dispatcher.resolve_used_update_types(), drop_pending_updates=False,
        )
        await delivery.recover()
        log.info(
            "webhook mode: listening on %s:%s%s",
            settings.webhook_listen_host, settings.webhook_port, server.path,
        )
        await stop.wait()
    finally:
        listening.cancel()
        delivery.stop()
        await runner.shutdown()  # stop taking requests first
        await delivery.drain()
        if settings.webhook_delete_on_stop:
            await bot.delete_webhook(drop_pending_updates=False)
        await dispatcher.emit_shutdown(bot=bot, **dispatcher.workflow_data)
        await runner.cleanup()
        await bot.session.close()
        if redis is not None:
            await redis.aclose()


def fleet_delivery(bot: Bot, dispatcher: Dispatcher, agent: Agent, locks: object) -> Delivery:
    import datetime as dt

    from handlers.fleet import ChatLocks, FleetDelivery

    settings = agent.services.settings
    options = dict(
        recovery_window=dt.timedelta(minutes=settings.recovery_window_minutes),
        shutdown_grace=settings.shutdown_grace_seconds,
    )
    if isinstance(locks, ChatLocks):
        return FleetDelivery(bot, dispatcher, agent.services.sessions, locks=locks, **options)
    return Delivery(bot, dispatcher, agent.services.sessions, **options)  # type: ignore[arg-type]
