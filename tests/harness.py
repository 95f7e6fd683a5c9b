"""The whole bot wired to the fakes: real aiogram polling the fake Telegram, real OpenAI client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiogram import Bot, Dispatcher
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from graph.agent import Agent
from handlers.app import build_bot, build_delivery, build_dispatcher, serve_polling
from handlers.delivery import Delivery
from handlers.i18n import Catalog
from tests.conftest import make_agent, make_settings
from tests.fakes.openai import FakeOpenAI
from tests.fakes.telegram import FakeTelegram, SentMessage

TOKEN = "123456:TEST-token_for-e2e"


@dataclass
class Harness:
    tg: FakeTelegram
    ai: FakeOpenAI
    agent: Agent
    bot: Bot
    dispatcher: Dispatcher
    delivery: Delivery

    async def reply_to(
        self, update: dict[str, Any], predicate: Any = None, timeout: float = 10.0
    ) -> SentMessage:
        """The first bot message in that chat after the user's message (matching predicate)."""
        message = update.get("message") or update["callback_query"]["message"]
        return await self.tg.wait_for_message(
            message["chat"]["id"], predicate, timeout=timeout, after=message["message_id"]
        )


@asynccontextmanager
async def running_bot(
    tmp_path: Path, db_url: str, sessions: async_sessionmaker[AsyncSession], prompts_dir: Path,
    ai: FakeOpenAI, **overrides: object,
) -> AsyncIterator[Harness]:
    async with FakeTelegram() as tg:
        settings = make_settings(
            tmp_path, ai.base_url, db_url, prompts_dir,
            telegram_token=TOKEN, telegram_api_url=tg.base_url, **overrides,
        )
        agent = make_agent(settings, sessions)
        bot = build_bot(settings)
        dispatcher = build_dispatcher(agent, Catalog.load())
        delivery = build_delivery(bot, dispatcher, agent)
        # The production loop itself: durable inbox, recovery, per-chat order, drain.
        serving = asyncio.create_task(serve_polling(agent, bot, dispatcher, delivery))
        try:
            yield Harness(tg, ai, agent, bot, dispatcher, delivery)
        finally:
            delivery.stop()
            await serving
            await bot.session.close()
            await agent.aclose()
