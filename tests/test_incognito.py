"""Incognito sessions, through the real aiogram client: the conversation works, its tokens count,
and when it ends a scan of every table, the memory store, the traces and the logs finds none
of its words."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from memory.base import PRIVATE, MemoryQuery
from storage.models import Base
from tests.fakes.openai import FakeOpenAI
from tests.harness import Harness, running_bot

ALICE = 6001
CANARY = "zebra-canary-4417"


@pytest.fixture
async def h(
    tmp_path: Path, db_url: str, sessions: async_sessionmaker[AsyncSession], prompts_dir: Path,
    fake_openai: FakeOpenAI,
) -> AsyncIterator[Harness]:
    async with running_bot(tmp_path, db_url, sessions, prompts_dir, fake_openai) as harness:
        harness.ai.reply = lambda body: (
            f"Title: t\nSummary: {CANARY}\nFacts:\n- {CANARY}\n" if body["model"] == "gpt-4o-mini"
            else f"Noted: {CANARY}."
        )
        yield harness


async def send(h: Harness, text: str, expect: str) -> str:
    update = h.tg.send_text(ALICE, text)
    reply = await h.reply_to(update, lambda m: expect in (m.text or ""))
    return reply.text or ""


async def everything_stored(sessions: async_sessionmaker[AsyncSession]) -> str:
    """Every row of every table, decrypted as the bot reads it."""
    found = []
    async with sessions() as db:
        for mapper in Base.registry.mappers:
            for row in (await db.execute(select(mapper.class_))).scalars():
                found.append(repr({c.key: getattr(row, c.key) for c in mapper.column_attrs}))
    return "\n".join(found)


async def test_an_incognito_session_leaves_nothing_of_its_words(
    h: Harness, sessions: async_sessionmaker[AsyncSession], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    started = await send(h, "/start_session incognito", "Incognito")
    assert "Nothing of it is kept" in started

    await send(h, f"my secret word is {CANARY}", "Noted")
    await send(h, "what is my secret word?", "Noted")
    # The conversation goes on: the second question's prompt holds the first exchange.
    assert CANARY in str(h.ai.chat_requests[-1]["messages"])
    await asyncio.sleep(0.2)  # the inbox drops an update's payload once its answer is out
    while_open = await everything_stored(sessions)
    assert CANARY not in while_open  # not even while it is open

    ended = await send(h, "/end_session", "Incognito session ended")
    assert "Nothing of it was kept" in ended
    await asyncio.sleep(0.2)
    await h.agent.traces.flush()

    assert CANARY not in await everything_stored(sessions)
    assert not any(body["model"] == "gpt-4o-mini" for body in h.ai.chat_requests)  # no summary
    memory = h.agent.services.memory
    assert not await memory.has_any(ALICE)
    assert await memory.search(ALICE, MemoryQuery(CANARY, None, 10), PRIVATE) == []
    assert CANARY not in caplog.text
    sessions_left, _ = await h.agent.list_sessions(ALICE, 0, 10)
    assert sessions_left == []
    assert (await h.agent.usage(ALICE)).used > 0  # the budget still counts
    document = await h.agent.export_data(ALICE)
    assert CANARY not in str(document)


async def test_a_new_session_can_be_made_incognito_with_its_button(
    h: Harness, sessions: async_sessionmaker[AsyncSession],
) -> None:
    update = h.tg.send_text(ALICE, "/start_session")
    note = await h.reply_to(update, lambda m: "New session" in (m.text or ""))
    h.tg.press_button(ALICE, note.message_id, "incog")
    await h.tg.wait_for_message(ALICE, lambda m: "Incognito session" in (m.text or ""), after=note.message_id)

    await send(h, f"remember {CANARY}", "Noted")
    listed = await send(h, "/list_sessions", "Your sessions")
    assert "Incognito session" in listed
    await send(h, "/end_session", "Incognito session ended")
    assert CANARY not in await everything_stored(sessions)
