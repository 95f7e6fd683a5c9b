"""One bad update never stops the bot: polling and the webhook take in the others and answer them.

Telegram passes on what a client sent, lone UTF-16 surrogates included; an update id beyond a
signed 64-bit integer cannot be stored in the inbox. Both once held up everyone else.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from handlers.app import build_bot, build_delivery, build_dispatcher
from handlers.i18n import Catalog
from handlers.webhook import SECRET_HEADER, WebhookServer
from tests.conftest import make_agent, make_settings
from tests.fakes.openai import FakeOpenAI
from tests.fakes.telegram import FakeTelegram
from tests.harness import TOKEN, Harness

SECRET = "poison-test-secret"
HUGE_ID = 2**63 + 5


def message_update(update_id: int, user_id: int, text: str) -> dict[str, Any]:
    return {"update_id": update_id, "message": {
        "message_id": update_id, "date": 1_700_000_000, "text": text,
        "chat": {"id": user_id, "type": "private", "first_name": "T"},
        "from": {"id": user_id, "is_bot": False, "first_name": "T"},
    }}


def batch() -> list[dict[str, Any]]:
    """Good, lone surrogate, huge id, good: the surrogate one is answered too (as U+FFFD)."""
    return [
        message_update(10, 501, "first good question"),
        message_update(11, 502, "broken \ud800 text"),
        message_update(HUGE_ID, 503, "from the far future"),
        message_update(12, 504, "second good question"),
    ]


async def answered(tg: FakeTelegram, user_id: int) -> str:
    reply = await tg.wait_for_message(user_id, lambda m: "New session" not in (m.text or ""))
    return reply.text or ""


def assert_all_but_the_huge_one_answered(ai: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    asked = [body["messages"][-1]["content"] for body in ai.chat_requests]
    assert sorted(asked) == sorted(["first good question", "broken \ufffd text", "second good question"])
    assert any(f"update {HUGE_ID} set aside" in r.getMessage() for r in caplog.records)


async def test_polling_takes_in_the_others_around_a_bad_update(
    start_bot: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with start_bot() as h:
        h: Harness
        h.ai.reply = "An answer."
        for update in batch():
            h.tg.enqueue(update)
        for user_id in (501, 502, 504):
            assert await answered(h.tg, user_id) == "An answer."
        assert not any("inbox unavailable" in r.getMessage() for r in caplog.records)
        assert_all_but_the_huge_one_answered(h.ai, caplog)
        assert h.tg.chat_messages(503) == []


@pytest.fixture
async def webhook(
    tmp_path: Path, db_url: str, sessions: async_sessionmaker[AsyncSession], prompts_dir: Path,
    fake_openai: FakeOpenAI,
) -> AsyncIterator[tuple[FakeTelegram, str]]:
    async with FakeTelegram() as tg:
        settings = make_settings(
            tmp_path, fake_openai.base_url, db_url, prompts_dir, telegram_token=TOKEN,
            telegram_api_url=tg.base_url, webhook_url="https://bot.example.test/hook",
            webhook_secret=SECRET,
        )
        agent = make_agent(settings, sessions)
        bot = build_bot(settings)
        dispatcher = build_dispatcher(agent, Catalog.load())
        delivery = build_delivery(bot, dispatcher, agent)
        runner = web.AppRunner(WebhookServer(agent, bot, dispatcher, delivery, None).app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            yield tg, f"http://127.0.0.1:{port}/hook"
        finally:
            delivery.stop()
            await runner.cleanup()
            await delivery.drain()
            await bot.session.close()
            await agent.aclose()


async def post(url: str, update: dict[str, Any], secret: str | None = SECRET) -> int:
    headers = {SECRET_HEADER: secret} if secret is not None else {}
    async with aiohttp.ClientSession() as http, http.post(url, json=update, headers=headers) as r:
        return r.status


async def test_the_webhook_acknowledges_a_bad_update_and_answers_the_others(
    webhook: tuple[FakeTelegram, str], fake_openai: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    tg, url = webhook
    fake_openai.reply = "An answer."
    # Every one is acknowledged: a 503 would make Telegram send it again for a day.
    assert [await post(url, update) for update in batch()] == [200, 200, 200, 200]
    for user_id in (501, 502, 504):
        assert await answered(tg, user_id) == "An answer."
    assert_all_but_the_huge_one_answered(fake_openai, caplog)


async def test_the_webhook_refuses_a_post_without_the_secret(
    webhook: tuple[FakeTelegram, str], fake_openai: FakeOpenAI
) -> None:
    tg, url = webhook
    assert await post(url, message_update(20, 601, "forged"), secret=None) == 401
    assert await post(url, message_update(21, 601, "forged"), secret="wrong") == 401
    assert fake_openai.chat_requests == [] and tg.chat_messages(601) == []


def test_webhook_mode_does_not_start_without_a_secret(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin", "TELEGRAM_TOKEN": TOKEN, "DATA_DIR": str(tmp_path),
        "WEBHOOK_URL": "https://bot.example.test/hook", "LANGSMITH_TRACING": "false",
    }
    done = subprocess.run(
        [sys.executable, "bot.py", "webhook"], cwd=Path(__file__).resolve().parent.parent,
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("configuration error: WEBHOOK_SECRET:")
