"""Delivery guarantees in process: dedupe, crash recovery, graceful shutdown, per-chat order, budget."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.models import InboxUpdate, Message, Reservation, UsageDay, utcnow
from storage.repositories import Inbox, Sessions, Users
from tests.fakes.openai import FakeOpenAI
from tests.seeding import ask, reserve


def text_update(update_id: int, user_id: int, text: str, message_id: int = 1) -> dict[str, Any]:
    return {"update_id": update_id, "message": {
        "message_id": message_id, "date": 0, "text": text,
        "chat": {"id": user_id, "type": "private"},
        "from": {"id": user_id, "is_bot": False, "first_name": "T", "language_code": "en"},
    }}


async def ledger(sessions: async_sessionmaker[AsyncSession], user_id: int) -> tuple[int, int]:
    async with sessions() as db:
        row = (await db.execute(select(UsageDay).where(UsageDay.user_id == user_id))).scalar_one()
        return row.used, row.reserved


async def test_an_update_delivered_three_times_is_answered_once(
    start_bot: Callable[..., Any], fake_openai: FakeOpenAI, sessions: async_sessionmaker[AsyncSession],
) -> None:
    fake_openai.reply = "only once"
    async with start_bot() as h:
        update = text_update(500, 21, "hello")
        for _ in range(3):  # at once: all three in one getUpdates batch
            h.tg.enqueue(update)
        await h.tg.wait_for_message(21, lambda m: m.text == "only once")
        for _ in range(3):  # in sequence: redelivered after it was answered
            h.tg.enqueue(update)
            await asyncio.sleep(0.3)
        await asyncio.sleep(0.3)
        answers = [m for m in h.tg.chat_messages(21) if m.text == "only once"]
    assert len(answers) == 1
    assert len(fake_openai.chat_requests) == 1
    used, reserved = await ledger(sessions, 21)
    async with sessions() as db:
        answer = (await db.execute(select(Message).where(Message.role == "assistant"))).scalar_one()
    assert reserved == 0 and used == answer.prompt_tokens + answer.completion_tokens  # one charge


async def test_a_message_left_unanswered_by_a_crash_is_answered_after_restart(
    start_bot: Callable[..., Any], fake_openai: FakeOpenAI, sessions: async_sessionmaker[AsyncSession],
) -> None:
    """The state a kill -9 mid-answer leaves (the real kill is in test_faults.py)."""
    update = text_update(800, 22, "answer me despite the crash")
    async with sessions() as db:
        await Users(db).ensure(22, "en")
        await Sessions(db).open(22, 22, "personal_assistant", None)
        await ask(db, 22, "answer me despite the crash", update_id=800, tokens=8)
        await Inbox(db).store_each([(800, 22, 22, json.dumps(update))])
        await reserve(db, 22, 1500, 100_000, ttl_seconds=600)
        await db.commit()
    fake_openai.reply = "recovered answer"
    async with start_bot() as h:  # the restart
        await h.tg.wait_for_message(22, lambda m: m.text == "recovered answer")
        notes = [m.text for m in h.tg.chat_messages(22) if "restarted" in (m.text or "")]
    assert len(notes) == 1
    answers = [m for m in h.tg.chat_messages(22) if m.text == "recovered answer"]
    assert len(answers) == 1 and len(fake_openai.chat_requests) == 1
    used, reserved = await ledger(sessions, 22)
    assert reserved == 0 and used > 1500  # the orphan charged in full, plus the real answer
    async with sessions() as db:
        statuses = [m.status for m in (await db.execute(select(Message).order_by(Message.id))).scalars()]
        assert statuses == ["answered", "complete"]
        assert [u.state for u in (await db.execute(select(InboxUpdate))).scalars()] == ["done"]


async def test_too_old_unprocessed_messages_are_not_dropped_silently(
    start_bot: Callable[..., Any], fake_openai: FakeOpenAI, sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as db:
        await Inbox(db).store_each([(900, 23, 23, json.dumps(text_update(900, 23, "an old message")))])
        await db.execute(
            InboxUpdate.__table__.update().values(received_at=utcnow() - dt.timedelta(hours=5))
        )
        await db.commit()
    async with start_bot(recovery_window_minutes=60) as h:
        reply = await h.tg.wait_for_message(23)
    assert "send it again" in (reply.text or "")
    assert fake_openai.chat_requests == []


async def test_graceful_shutdown_hands_work_back_and_releases_the_budget(
    start_bot: Callable[..., Any], fake_openai: FakeOpenAI, sessions: async_sessionmaker[AsyncSession],
) -> None:
    fake_openai.reply = "after the restart"
    async with start_bot(shutdown_grace_seconds=0.3) as h:
        fake_openai.hold()
        h.tg.send_text(24, "a slow question")
        await fake_openai.wait_for_requests(1)
        _, reserved = await ledger(sessions, 24)
        assert reserved > 0
    # the harness exit is the SIGTERM path: stop polling, drain for 0.3 s, hand back the rest
    used, reserved = await ledger(sessions, 24)
    assert reserved == 0 and used > 0  # the model had started: charged, never silently 0
    async with sessions() as db:
        assert await db.scalar(select(func.count()).select_from(Reservation)) == 0
    fake_openai.release()
    async with start_bot() as h:
        await h.tg.wait_for_message(24, lambda m: m.text == "after the restart")


async def test_one_users_burst_keeps_order_and_many_users_keep_their_limits(
    start_bot: Callable[..., Any], fake_openai: FakeOpenAI, sessions: async_sessionmaker[AsyncSession],
) -> None:
    fake_openai.reply = lambda body: f"re: {body['messages'][-1]['content']}"
    async with start_bot(daily_token_limit=4000) as h:
        for i in range(20):
            h.tg.send_text(25, f"q{i:02d}")
        for user in range(100, 150):
            h.tg.send_text(user, "hello from the crowd")
        await h.tg.wait_for_message(25, lambda m: (m.text or "").startswith(("re: q19", "⏳")), timeout=30)
        for user in range(100, 150):
            await h.tg.wait_for_message(user, lambda m: "re:" in (m.text or ""), timeout=30)
        await asyncio.sleep(0.3)
        answered = [m.text for m in h.tg.chat_messages(25) if (m.text or "").startswith("re: q")]
    numbers = [int(re.search(r"q(\d+)", t).group(1)) for t in answered]
    assert numbers == sorted(numbers) and numbers[0] == 0
    for user in [25, *range(100, 150)]:
        used, reserved = await ledger(sessions, user)
        assert reserved == 0 and used <= 4000
