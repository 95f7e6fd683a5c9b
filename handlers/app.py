"""The Telegram front end composed: bot, dispatcher, routers in order, polling."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import signal
from typing import TYPE_CHECKING, TypedDict

from aiogram import Bot, Dispatcher, Router
from aiogram.client.default import DefaultBotProperties
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.enums import ParseMode
from aiogram.fsm.storage.base import BaseStorage
from aiogram.fsm.storage.memory import MemoryStorage
from aiogram.fsm.storage.redis import RedisStorage
from redis.asyncio import Redis

from handlers import (
    chat,
    commands,
    data_rights,
    flood,
    media,
    memory,
    personalize,
    reminders,
    sessions,
    stopping,
    usage,
)
from handlers.delivery import Delivery
from handlers.fleet import ChatLocks, SharedPacer
from handlers.i18n import Catalog
from handlers.middlewares import UpdateMiddleware
from handlers.stopping import Stoppable
from handlers.streaming import ChatPacer
from settings import Settings

if TYPE_CHECKING:
    from graph.agent import Agent

log = logging.getLogger(__name__)


class Deps(TypedDict):
    """What handlers may ask for by name, besides aiogram's own (bot, state, event_update...)."""

    agent: Agent
    catalog: Catalog
    pacer: ChatPacer | SharedPacer
    settings: Settings
    stoppable: Stoppable


def build_bot(settings: Settings) -> Bot:
    assert settings.telegram_token is not None
    if settings.telegram_api_url:
        session = AiohttpSession(api=TelegramAPIServer.from_base(settings.telegram_api_url))
    else:
        session = AiohttpSession()
    bot = Bot(
        settings.telegram_token.get_secret_value(), session=session,
        default=DefaultBotProperties(parse_mode=ParseMode.HTML),
    )
    flood.install(bot)
    return bot


def root_router() -> Router:
    """Routers in the order they must match: commands first, the catch-all chat router last."""
    root = Router(name="root")
    root.include_routers(
        stopping.build_router(),  # first: a stop must reach the answer it stops at once
        commands.build_router(),
        personalize.build_router(),
        sessions.build_router(),
        memory.build_router(),
        usage.build_router(),
        data_rights.build_router(),
        reminders.build_router(),
        media.build_router(),
        chat.build_router(),  # last: it takes whatever the others did not
    )
    return root


def build_dispatcher(
    agent: Agent, catalog: Catalog, storage: BaseStorage | None = None,
    pacer: ChatPacer | SharedPacer | None = None, stoppable: Stoppable | None = None,
) -> Dispatcher:
    settings = agent.services.settings
    deps = Deps(
        agent=agent, catalog=catalog, pacer=pacer or ChatPacer(), settings=settings,
        stoppable=stoppable or Stoppable(),
    )
    dispatcher = Dispatcher(storage=storage or MemoryStorage(), **deps)
    dispatcher.update.outer_middleware(UpdateMiddleware(settings, catalog))
    dispatcher.include_router(root_router())

    async def on_startup(bot: Bot) -> None:
        await commands.register_menu(bot, catalog)

    dispatcher.startup.register(on_startup)
    return dispatcher


def fleet_parts(
    settings: Settings,
) -> tuple[Redis | None, BaseStorage, ChatLocks | None, ChatPacer | SharedPacer]:
    """With REDIS_URL: FSM data, chat locks and pacing shared by every process; else in memory."""
    if not settings.redis_url:
        return None, MemoryStorage(), None, ChatPacer()
    redis = Redis.from_url(settings.redis_url)
    storage = RedisStorage(redis, state_ttl=86_400, data_ttl=86_400)
    return redis, storage, ChatLocks(redis, settings.chat_lock_seconds), SharedPacer(redis)


def build_delivery(bot: Bot, dispatcher: Dispatcher, agent: Agent) -> Delivery:
    settings = agent.services.settings
    return Delivery(
        bot, dispatcher, agent.services.sessions,
        recovery_window=dt.timedelta(minutes=settings.recovery_window_minutes),
        shutdown_grace=settings.shutdown_grace_seconds,
    )


async def serve_polling(agent: Agent, bot: Bot, dispatcher: Dispatcher, delivery: Delivery) -> None:
    """Start-up (menu, crash recovery), polling until stopped, then a graceful drain."""
    # A webhook left from another deployment would make getUpdates fail with 409.
    # Pending updates are kept: they are messages users are waiting on.
    await bot.delete_webhook(drop_pending_updates=False)
    await dispatcher.emit_startup(bot=bot, **dispatcher.workflow_data)
    try:
        # Only one process can poll a token, so any reservation already present is an orphan.
        settled = await agent.settle_orphaned_reservations()
        if settled:
            log.warning("settled %d reservation(s) left by the last run", settled)
        await delivery.recover()
        await delivery.poll(allowed_updates=dispatcher.resolve_used_update_types())
    finally:
        await delivery.drain()
        await dispatcher.emit_shutdown(bot=bot, **dispatcher.workflow_data)


async def run_polling(agent: Agent) -> None:
    bot = build_bot(agent.services.settings)
    dispatcher = build_dispatcher(agent, Catalog.load())
    delivery = build_delivery(bot, dispatcher, agent)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, delivery.stop)
    try:
        await serve_polling(agent, bot, dispatcher, delivery)
    finally:
        await bot.session.close()
