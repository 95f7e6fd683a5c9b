"""Fault injection: the bot as a real process (python bot.py) against the fakes, killed and restarted."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage import crypto
from storage.models import Message, UsageDay
from tests.fakes.openai import FakeOpenAI
from tests.fakes.telegram import FakeTelegram

PROJECT = Path(__file__).resolve().parent.parent
TOKEN = "123456:FAULT-injection-token"
pytestmark = pytest.mark.slow


class BotProcess:
    """`python bot.py` in polling mode, pointed at the fakes by its environment."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self, tg: FakeTelegram, timeout: float = 30.0) -> None:
        mark = len(tg.calls)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "bot.py"], cwd=PROJECT, env=self.env, stdout=log, stderr=log,
        )
        try:
            await tg.wait_for(lambda c: c.method == "getUpdates", timeout=timeout, start=mark)
        except TimeoutError:
            raise AssertionError(f"bot did not start:\n{self.log_path.read_text()[-3000:]}") from None

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.process.wait, 10)

    async def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait without blocking the loop: the fakes it talks to run on it."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, timeout)


@pytest.fixture
def bot_env(
    tmp_path: Path, db_url: str, cipher: crypto.Cipher, sessions: async_sessionmaker[AsyncSession]
) -> Callable[..., dict[str, str]]:
    """The bot's environment; depends on `sessions` so the database starts empty."""
    key = Fernet.generate_key().decode()
    crypto.configure(crypto.Cipher([key]))  # the test reads what the bot process writes

    def make(tg: FakeTelegram, ai: FakeOpenAI, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "TELEGRAM", "DB_"))}
        env.update(
            TELEGRAM_TOKEN=TOKEN, TELEGRAM_API_URL=tg.base_url, OPENAI_API_KEY="sk-test",
            OPENAI_BASE_URL=ai.base_url, DATABASE_URL=db_url, DATA_DIR=str(tmp_path / "data"),
            ENCRYPTION_KEY=key, MODEL_RETRY_BASE_DELAY="0.01", MODEL_TIMEOUT="3",
            LOG_LEVEL="INFO", LANGSMITH_TRACING="false", SHUTDOWN_GRACE_SECONDS="2",
        )
        env.update(extra)
        return env

    return make


@asynccontextmanager
async def fakes() -> AsyncIterator[tuple[FakeTelegram, FakeOpenAI]]:
    async with FakeTelegram(token=TOKEN) as tg, FakeOpenAI() as ai:
        yield tg, ai


async def ledger(sessions: async_sessionmaker[AsyncSession], user_id: int) -> tuple[int, int]:
    async with sessions() as db:
        row = (await db.execute(select(UsageDay).where(UsageDay.user_id == user_id))).scalar_one()
        return row.used, row.reserved


async def test_kill_9_mid_answer_then_restart_gives_one_answer(
    bot_env: Callable[..., dict[str, str]], tmp_path: Path, sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with fakes() as (tg, ai):
        ai.reply = "the answer that survived"
        bot = BotProcess(bot_env(tg, ai), tmp_path / "bot.log")
        await bot.start(tg)
        ai.hold()
        tg.send_text(31, "please answer")
        await ai.wait_for_requests(1, timeout=15)
        await bot.kill()  # SIGKILL while the model call is in flight
        ai.release()
        await bot.start(tg)
        try:
            await tg.wait_for_message(31, lambda m: m.text == "the answer that survived", timeout=20)
            await asyncio.sleep(0.5)
        finally:
            assert await bot.terminate() == 0
    answers = [m for m in tg.chat_messages(31) if m.text == "the answer that survived"]
    assert len(answers) == 1
    used, reserved = await ledger(sessions, 31)
    assert reserved == 0 and used > 0
    async with sessions() as db:
        rows = await db.execute(select(Message).where(Message.user_id == 31).order_by(Message.id))
        statuses = [m.status for m in rows.scalars()]
    assert statuses == ["answered", "complete"]


async def test_sigterm_finishes_the_answer_in_flight(
    bot_env: Callable[..., dict[str, str]], tmp_path: Path, sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with fakes() as (tg, ai):
        ai.reply = "finished before exit"
        ai.first_token_delay = 0.5
        bot = BotProcess(bot_env(tg, ai), tmp_path / "bot.log")
        await bot.start(tg)
        tg.send_text(32, "a question")
        await ai.wait_for_requests(1, timeout=15)
        assert await bot.terminate() == 0  # graceful: the answer in flight is finished first
        assert [m.text for m in tg.chat_messages(32) if m.text == "finished before exit"]
    used, reserved = await ledger(sessions, 32)
    assert reserved == 0 and used > 0


async def test_telegram_429_storm_while_streaming_delivers_once(
    bot_env: Callable[..., dict[str, str]], tmp_path: Path,
) -> None:
    async with fakes() as (tg, ai):
        ai.reply = " ".join(f"word{i}" for i in range(60))
        ai.chunk_delay = 0.03
        tg.fail_next("sendMessageDraft", error_code=429, retry_after=1, times=3)
        tg.fail_next("sendMessage", error_code=429, retry_after=1, times=2,
                     when=lambda p: "word59" in str(p.get("text")))
        bot = BotProcess(bot_env(tg, ai), tmp_path / "bot.log")
        await bot.start(tg)
        tg.send_text(33, "stream me something long")
        try:
            await tg.wait_for_message(33, lambda m: "word59" in (m.text or ""), timeout=20)
            await asyncio.sleep(1.0)
        finally:
            assert await bot.terminate() == 0
    finals = [m for m in tg.chat_messages(33) if "word59" in (m.text or "")]
    assert len(finals) == 1 and "word0 " in (finals[0].text or "")


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # a server to restart
async def test_postgresql_restart_mid_conversation_recovers(
    bot_env: Callable[..., dict[str, str]], tmp_path: Path, db_url: str,
) -> None:
    cluster = sorted(os.listdir("/etc/postgresql"))[0]
    if not cluster or shutil.which("pg_ctlcluster") is None:
        pytest.fail("pg_ctlcluster is needed to restart PostgreSQL")
    async with fakes() as (tg, ai):
        ai.reply = lambda body: f"re: {body['messages'][-1]['content']}"
        bot = BotProcess(bot_env(tg, ai), tmp_path / "bot.log")
        await bot.start(tg)
        try:
            tg.send_text(34, "before")
            await tg.wait_for_message(34, lambda m: m.text == "re: before", timeout=20)
            subprocess.run(
                ["pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main", "restart", "-m", "fast"],
                check=True, capture_output=True,
            )
            tg.send_text(34, "after")
            await tg.wait_for_message(34, lambda m: m.text == "re: after", timeout=40)
        finally:
            assert await bot.terminate() == 0


async def test_kill_9_between_the_answers_commit_and_its_delivery_delivers_it_once(
    bot_env: Callable[..., dict[str, str]], tmp_path: Path, sessions: async_sessionmaker[AsyncSession],
) -> None:
    """The answer is stored and charged, then the process dies before Telegram took it."""
    answer = "the answer stored before the crash"
    async with fakes() as (tg, ai):
        ai.reply = answer
        bot = BotProcess(bot_env(tg, ai), tmp_path / "bot.log")
        await bot.start(tg)
        tg.fail_next("sendMessage", error_code=500, times=1000, when=lambda p: p.get("text") == answer)
        tg.send_text(35, "please answer")
        await tg.wait_for(lambda c: c.method == "sendMessage" and c.params.get("text") == answer, 20)
        await bot.kill()  # SIGKILL: the answer is committed, Telegram never took it
        tg._failures.clear()
        assert [m for m in tg.chat_messages(35) if m.text == answer] == []
        await bot.start(tg)
        try:
            await tg.wait_for_message(35, lambda m: m.text == answer, timeout=20)
            await asyncio.sleep(0.5)
        finally:
            assert await bot.terminate() == 0
    assert len([m for m in tg.chat_messages(35) if m.text == answer]) == 1
    assert len(ai.chat_requests) == 1  # the restart delivered the stored answer: no new call
