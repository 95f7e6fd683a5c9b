"""Several instances: two bot processes in webhook mode on PostgreSQL and Redis, on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.fernet import Fernet
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage import crypto
from storage.models import InboxUpdate, Message, UsageDay
from tests.fakes.openai import FakeOpenAI
from tests.fakes.telegram import FakeTelegram

PROJECT = Path(__file__).resolve().parent.parent
TOKEN = "123456:FLEET-test-token"
SECRET = "fleet-secret_42"
REDIS_URL = os.environ.get("DESKTOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.postgres,
    pytest.mark.parametrize("db_url", ["postgresql"], indirect=True),  # the fleet's shared state
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Instance:
    """One `python bot.py webhook` process listening on its own loopback port."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.env = {**env, "WEBHOOK_PORT": str(self.port), "WEBHOOK_LISTEN_HOST": "127.0.0.1"}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, http: aiohttp.ClientSession) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "bot.py", "webhook"], cwd=PROJECT, env=self.env,
                                        stdout=log, stderr=log)
        for _ in range(300):
            try:
                async with http.get(f"{self.url}/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if self.process.poll() is not None:
                break
            await asyncio.sleep(0.1)
        raise AssertionError(f"instance did not become ready:\n{self.log_path.read_text()[-3000:]}")

    async def push(self, http: aiohttp.ClientSession, update: dict[str, Any], secret: str = SECRET) -> int:
        async with http.post(f"{self.url}/telegram", json=update,
                             headers={"X-Telegram-Bot-Api-Secret-Token": secret}) as response:
            return response.status

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return await asyncio.to_thread(self.process.wait, 30)


@pytest.fixture
async def redis_db() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:
        pytest.fail(f"Redis is required at {REDIS_URL}: {exc!r}")
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


@pytest.fixture
def fleet_env(
    tmp_path: Path, db_url: str, sessions: async_sessionmaker[AsyncSession], redis_db: Redis,
) -> Callable[..., dict[str, str]]:
    key = Fernet.generate_key().decode()
    crypto.configure(crypto.Cipher([key]))

    def make(tg: FakeTelegram, ai: FakeOpenAI, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "TELEGRAM", "DB_"))}
        env.update(
            TELEGRAM_TOKEN=TOKEN, TELEGRAM_API_URL=tg.base_url, OPENAI_API_KEY="sk-test",
            OPENAI_BASE_URL=ai.base_url, DATABASE_URL=db_url, DATA_DIR=str(tmp_path / "data"),
            ENCRYPTION_KEY=key, REDIS_URL=REDIS_URL, WEBHOOK_URL="https://bot.example.test/telegram",
            WEBHOOK_SECRET=SECRET, WEBHOOK_DELETE_ON_STOP="false", MODEL_RETRY_BASE_DELAY="0.01",
            LANGSMITH_TRACING="false", CHAT_LOCK_SECONDS="3", SHUTDOWN_GRACE_SECONDS="2",
        )
        env.update(extra)
        return env

    return make


async def test_two_instances_keep_order_answer_once_and_share_one_budget(
    fleet_env: Callable[..., dict[str, str]], tmp_path: Path, sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with FakeTelegram(token=TOKEN) as tg, FakeOpenAI() as ai, aiohttp.ClientSession() as http:
        ai.reply = lambda body: f"re: {body['messages'][-1]['content']}"
        ai.chunk_delay = 0.01
        a = Instance(fleet_env(tg, ai), tmp_path / "a.log")
        b = Instance(fleet_env(tg, ai), tmp_path / "b.log")
        await asyncio.gather(a.start(http), b.start(http))
        try:
            assert await a.push(http, {"update_id": 1}, secret="wrong") == 401
            assert tg.calls_of("setWebhook")[-1].params["secret_token"] == SECRET

            async def one_user(user_id: int) -> None:
                for i in range(10):  # alternately to both, each acknowledged before the next
                    update = tg.send_text(user_id, f"u{user_id}-q{i}")
                    assert await (a if i % 2 == 0 else b).push(http, update) == 200

            await asyncio.gather(one_user(41), one_user(42))
            await a.push(http, tg.send_text(41, "u41-q9-dup"))  # a fresh message after the burst
            for user_id in (41, 42):
                prefix = f"re: u{user_id}-q9"
                await tg.wait_for_message(
                    user_id, lambda m, prefix=prefix: (m.text or "").startswith(prefix), timeout=40
                )
            await tg.wait_for_message(41, lambda m: m.text == "re: u41-q9-dup", timeout=20)
        finally:
            assert await a.stop() == 0 and await b.stop() == 0
    for user_id in (41, 42):
        texts = [m.text for m in tg.chat_messages(user_id) if (m.text or "").startswith("re: ")]
        expected = [f"re: u{user_id}-q{i}" for i in range(10)] + (["re: u41-q9-dup"] if user_id == 41 else [])
        assert texts == expected  # in order, exactly one answer per update
    async with sessions() as db:
        for user_id in (41, 42):
            day = (await db.execute(select(UsageDay).where(UsageDay.user_id == user_id))).scalar_one()
            spent = await db.scalar(select(func.sum(Message.prompt_tokens + Message.completion_tokens))
                                    .where(Message.user_id == user_id, Message.role == "assistant"))
            assert day.reserved == 0 and day.used == spent  # the budget is exact


async def test_redelivery_to_the_other_instance_is_answered_once(
    fleet_env: Callable[..., dict[str, str]], tmp_path: Path,
) -> None:
    async with FakeTelegram(token=TOKEN) as tg, FakeOpenAI() as ai, aiohttp.ClientSession() as http:
        ai.reply = "just once"
        a = Instance(fleet_env(tg, ai), tmp_path / "a.log")
        b = Instance(fleet_env(tg, ai), tmp_path / "b.log")
        await asyncio.gather(a.start(http), b.start(http))
        try:
            update = tg.send_text(43, "hello")
            statuses = await asyncio.gather(a.push(http, update), b.push(http, update), a.push(http, update))
            assert statuses == [200, 200, 200]
            await tg.wait_for_message(43, lambda m: m.text == "just once", timeout=20)
            await asyncio.sleep(1.0)
        finally:
            await a.stop()
            await b.stop()
    assert len([m for m in tg.chat_messages(43) if m.text == "just once"]) == 1
    assert len(ai.chat_requests) == 1


async def test_killing_an_instance_mid_answer_loses_nothing(
    fleet_env: Callable[..., dict[str, str]], tmp_path: Path, sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with FakeTelegram(token=TOKEN) as tg, FakeOpenAI() as ai, aiohttp.ClientSession() as http:
        ai.reply = "survived the crash"
        a = Instance(fleet_env(tg, ai), tmp_path / "a.log")
        b = Instance(fleet_env(tg, ai), tmp_path / "b.log")
        await asyncio.gather(a.start(http), b.start(http))
        try:
            ai.hold()
            assert await a.push(http, tg.send_text(44, "important question")) == 200
            await ai.wait_for_requests(1, timeout=15)
            await a.stop(signal.SIGKILL)
            ai.release()
            # b takes the chat over once a's lock has expired (CHAT_LOCK_SECONDS=3)
            await tg.wait_for_message(44, lambda m: m.text == "survived the crash", timeout=30)
            await asyncio.sleep(0.5)
        finally:
            await b.stop()
    assert len([m for m in tg.chat_messages(44) if m.text == "survived the crash"]) == 1
    async with sessions() as db:
        unsettled = select(func.count()).select_from(InboxUpdate).where(InboxUpdate.state == "new")
        assert await db.scalar(unsettled) == 0
        day = (await db.execute(select(UsageDay).where(UsageDay.user_id == 44))).scalar_one()
    assert day.used > 0
