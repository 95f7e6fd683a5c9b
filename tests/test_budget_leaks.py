"""The daily limit holds for everything the provider bills: summaries, embeddings, over-counting.

Through the real Agent and the real openai SDK against the fake provider.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from graph.agent import Agent, Answer, Refusal, SessionStarted, TurnEvent
from storage.models import ChatSession, MemoryRecord, UsageDay, utcnow
from tests.fakes.openai import FakeOpenAI

SUMMARY = "Title: Tea\nSummary: The user likes green tea.\nFacts:\n- The user likes green tea\n"


async def say(agent: Agent, user_id: int, text: str) -> list[TurnEvent]:
    return [e async for e in agent.handle_message(
        user_id=user_id, chat_id=user_id, text=text, update_id=None,
    )]


async def used_today(sessions: async_sessionmaker[AsyncSession], user_id: int) -> int:
    async with sessions() as db:
        day = await db.get(UsageDay, (user_id, utcnow().date()))
    return 0 if day is None else day.used + day.reserved


def by_model(body: dict) -> str:
    return SUMMARY if body["model"] == "gpt-4o-mini" else "Sure."


async def test_a_summary_without_room_waits_instead_of_overspending(
    agent_factory: Callable[..., Agent], fake_openai: FakeOpenAI,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    limit = 1_500
    agent = agent_factory(daily_token_limit=limit)
    fake_openai.reply = "x " * 400  # long answers eat the day
    while isinstance((await say(agent, 7, "tell me a long story"))[-1], Answer):
        pass
    summaries_before = [b for b in fake_openai.chat_requests if b["model"] == "gpt-4o-mini"]
    ended = await agent.end_session(7, 7)
    assert ended is not None and ended.outcome == "deferred_budget"
    assert [b for b in fake_openai.chat_requests if b["model"] == "gpt-4o-mini"] == summaries_before
    assert await used_today(sessions, 7) <= limit
    async with sessions() as db:
        session = (await db.execute(select(ChatSession).where(ChatSession.user_id == 7))).scalar_one()
    assert session.status == "summary_due"
    assert session.summary_due_at is not None and session.summary_due_at > utcnow()
    # the old session is closed for the user: the next message opens a new one
    assert any(isinstance(e, SessionStarted) for e in await say(agent, 7, "hi"))
    assert await used_today(sessions, 7) <= limit


async def test_a_failed_summary_is_made_later_and_remembered(
    agent_factory: Callable[..., Agent], fake_openai: FakeOpenAI,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    agent = agent_factory()
    fake_openai.reply = by_model
    await say(agent, 8, "I like green tea")
    fake_openai.fail_next("server_error", times=10)  # every attempt of this ending fails
    ended = await agent.end_session(8, 8)
    assert ended is not None and ended.outcome == "deferred_provider"
    async with sessions() as db:
        assert (await db.execute(select(MemoryRecord).where(MemoryRecord.user_id == 8))).all() == []

    fake_openai._chat_faults.clear()
    assert await agent.make_due_summaries(utcnow() + dt.timedelta(hours=1)) == 1
    async with sessions() as db:
        units = (await db.execute(select(MemoryRecord).where(MemoryRecord.user_id == 8))).scalars().all()
        session = (await db.execute(select(ChatSession).where(ChatSession.user_id == 8))).scalar_one()
    # every unit of the session: its summary, its fact, its exchange
    assert sorted(unit.kind for unit in units) == ["exchange", "fact", "summary"]
    assert all("green tea" in unit.text for unit in units)
    assert session.status == "closed" and session.ended_at is not None
    # and it is recalled in a later session
    await say(agent, 8, "what do I like to drink?")
    assert "green tea" in (fake_openai.last_system_prompt() or "")


async def test_a_refused_message_costs_no_provider_call(
    agent_factory: Callable[..., Agent], fake_openai: FakeOpenAI,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    agent = agent_factory(daily_token_limit=2_500)
    fake_openai.reply = by_model
    await say(agent, 9, "I like green tea")
    await agent.end_session(9, 9)  # a memory exists: retrieval would embed every question
    fake_openai.reply = "x " * 400
    while isinstance((await say(agent, 9, "more please")).pop(), Answer):
        pass
    calls = len(fake_openai.requests)
    for _ in range(5):
        assert isinstance((await say(agent, 9, "a long question " * 50))[-1], Refusal)
    assert len(fake_openai.requests) == calls  # no embedding, no chat
    assert await used_today(sessions, 9) <= 2_500


async def test_an_over_counting_provider_cannot_push_the_day_past_its_limit(
    agent_factory: Callable[..., Agent], fake_openai: FakeOpenAI,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    limit = 3_000
    agent = agent_factory(daily_token_limit=limit)
    fake_openai.reply = "Sure."
    fake_openai.usage_override = {"prompt_tokens": 5_000}  # far more than the prompt holds
    for _ in range(4):
        await say(agent, 10, "hello there")
    assert await used_today(sessions, 10) <= limit
