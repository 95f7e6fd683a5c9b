"""Scheduled jobs on SQLite and PostgreSQL: idle sessions, reservations, outbox, purge."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import os
from collections.abc import Callable

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from graph.agent import Agent
from memory.base import MemoryItem
from memory.pinecone import PineconeMemory
from ops.jobs import (
    IDLE_JOB,
    INBOX_JOB,
    OUTBOX_JOB,
    PURGE_JOB,
    SUMMARY_JOB,
    SWEEP_JOB,
    build_scheduler,
    end_idle_sessions,
    purge_old_transcripts,
    register_jobs,
    retry_memory_outbox,
    run_guarded,
    sweep_reservations,
)
from storage.models import ChatSession, MemoryRecord, Message, Reservation, UsageDay, utcnow
from storage.repositories import Sessions, Users
from tests.fakes.openai import FakeOpenAI
from tests.fakes.pinecone import FakePinecone
from tests.seeding import last_active, reserve
from tests.test_graph import say

SUMMARY = (
    "Title: Trip\nSummary: The user planned a trip.\nFacts:\n- trip to Porto\n"
    "Open questions:\n"
)


def summaries_requested(fake_openai: FakeOpenAI) -> int:
    return sum(1 for body in fake_openai.chat_requests if body["model"] == "gpt-4o-mini")


async def session_of(sessions: async_sessionmaker[AsyncSession], user_id: int) -> ChatSession:
    async with sessions() as db:
        return (await db.execute(
            select(ChatSession)
            .where(ChatSession.user_id == user_id)
            .order_by(ChatSession.id.desc())
        )).scalars().first()


async def test_idle_sessions_are_summarised_and_closed_fresh_ones_stay_open(
    agent: Agent, fake_openai: FakeOpenAI, sessions: async_sessionmaker[AsyncSession],
) -> None:
    fake_openai.reply = lambda body: SUMMARY if body["model"] == "gpt-4o-mini" else "ok"
    await say(agent, 1, "planning a trip to Porto")
    await say(agent, 2, "fresh conversation")
    idle = await session_of(sessions, 1)
    async with sessions() as db:  # user 1 went quiet three hours ago
        await last_active(db, idle.id, utcnow() - dt.timedelta(hours=3))

    assert await end_idle_sessions(agent) == 1

    closed, fresh = await session_of(sessions, 1), await session_of(sessions, 2)
    assert closed.status == "closed" and closed.end_reason == "idle"
    assert closed.summary is not None and "Porto" in closed.summary
    async with sessions() as db:
        units = (await db.execute(select(MemoryRecord))).scalars().all()
    assert {unit.id for unit in units} == {
        f"1:{closed.id}", f"1:{closed.id}:fact:1", f"1:{closed.id}:exchange:1"
    }
    assert fresh.status == "open"
    assert summaries_requested(fake_openai) == 1

    # Running it again is harmless: nothing new is idle, nothing is summarised twice.
    assert await end_idle_sessions(agent) == 0
    assert summaries_requested(fake_openai) == 1

    # With the clock moved past the limit, the fresh session is idle too.
    later = utcnow() + dt.timedelta(minutes=agent.services.settings.session_idle_minutes + 1)
    assert await end_idle_sessions(agent, now=later) == 1
    assert (await session_of(sessions, 2)).end_reason == "idle"
    assert summaries_requested(fake_openai) == 2


async def test_a_session_that_woke_up_after_the_query_is_left_open(
    agent: Agent, sessions: async_sessionmaker[AsyncSession], fake_openai: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await say(agent, 3, "hello")
    session = await session_of(sessions, 3)
    now = utcnow() + dt.timedelta(minutes=agent.services.settings.session_idle_minutes + 1)
    query = Sessions.idle_since

    async def then_a_message_arrives(
        self: Sessions, cutoff: dt.datetime, limit: int = 100
    ) -> list[ChatSession]:
        found = await query(self, cutoff, limit)
        async with sessions() as db:  # the user writes again right after the job's query
            await last_active(db, session.id, now)
        return found

    monkeypatch.setattr(Sessions, "idle_since", then_a_message_arrives)
    assert await end_idle_sessions(agent, now=now) == 0
    assert (await session_of(sessions, 3)).status == "open"
    assert summaries_requested(fake_openai) == 0


async def test_the_sweeper_settles_an_expired_reservation_once(
    agent: Agent, sessions: async_sessionmaker[AsyncSession],
) -> None:
    past = utcnow() - dt.timedelta(hours=1)
    async with sessions() as db:
        await Users(db).ensure(4, "en")
        live = await reserve(db, 4, 300, 10_000, ttl_seconds=3600)
        stale = await reserve(db, 4, 500, 10_000, ttl_seconds=60, now=past)
        await db.commit()

    assert await sweep_reservations(agent) == 1
    assert await sweep_reservations(agent) == 0  # twice: nothing charged again

    async with sessions() as db:
        left = list((await db.execute(select(Reservation.id))).scalars())
        days = {d.day: d for d in (await db.execute(select(UsageDay))).scalars()}
    assert left == [live.id]
    stale_day = days[stale.day]
    if stale.day == live.day:
        assert (stale_day.used, stale_day.reserved) == (500, 300)
    else:  # the test ran across midnight UTC
        assert (stale_day.used, stale_day.reserved) == (500, 0)


async def test_purge_deletes_old_transcripts_and_keeps_summaries_and_memories(
    agent: Agent, fake_openai: FakeOpenAI, sessions: async_sessionmaker[AsyncSession],
) -> None:
    fake_openai.reply = lambda body: SUMMARY if body["model"] == "gpt-4o-mini" else "ok"
    await say(agent, 5, "old conversation about Porto")
    old = (await agent.end_session(5, 5))
    await say(agent, 5, "recent conversation")
    recent = (await agent.end_session(5, 5))
    await say(agent, 5, "still open, and old")
    still_open = await session_of(sessions, 5)
    assert old is not None and recent is not None
    long_ago = utcnow() - dt.timedelta(days=40)
    async with sessions() as db:
        await db.execute(update(ChatSession).where(ChatSession.id == old.session_id)
                         .values(ended_at=long_ago, started_at=long_ago))
        await db.execute(update(ChatSession).where(ChatSession.id == still_open.id)
                         .values(started_at=long_ago, last_activity_at=long_ago))
        await db.commit()

    removed = await purge_old_transcripts(agent, 30)

    assert removed == 2  # the old session's question and answer
    assert await purge_old_transcripts(agent, 30) == 0  # twice: harmless
    async with sessions() as db:
        by_session: dict[int, int] = {}
        for message in (await db.execute(select(Message))).scalars():
            by_session[message.session_id] = by_session.get(message.session_id, 0) + 1
        memories = list((await db.execute(select(MemoryRecord.id))).scalars())
    assert old.session_id not in by_session
    assert by_session[recent.session_id] == 2 and by_session[still_open.id] == 2
    assert f"5:{old.session_id}" in memories and f"5:{recent.session_id}" in memories
    exported = await agent.export_data(5)
    old_export = next(s for s in exported["sessions"] if s["id"] == old.session_id)
    assert old_export["messages"] == [] and "Porto" in (old_export["summary"] or "")

    # A clock far enough ahead makes the recent session old as well; the open one never is.
    assert await purge_old_transcripts(agent, 30, now=utcnow() + dt.timedelta(days=31)) == 2
    async with sessions() as db:
        left = {m.session_id for m in (await db.execute(select(Message))).scalars()}
    assert left == {still_open.id}
    with pytest.raises(ValueError):
        await purge_old_transcripts(agent, 0)


async def test_the_outbox_job_lands_queued_writes(
    agent_factory: Callable[..., Agent], sessions: async_sessionmaker[AsyncSession],
) -> None:
    with FakePinecone() as fake:
        memory = PineconeMemory(sessions, "test:2", api_key="k", host=fake.host, attempts=1)
        try:
            async with sessions() as db:
                await Users(db).ensure(6, "en")
                await db.commit()
            fake.fail_next("upsert", 503)
            item = MemoryItem(6, 1, "t", "queued summary", "coder", None, None)
            await memory.add_many([item], [[1.0, 0.5]])
            assert fake.vector_count() == 0
            later = utcnow() + dt.timedelta(hours=2)
            run = await retry_memory_outbox(memory, now=later)
            assert (run.sent, run.failed) == (1, 0)
            assert (await retry_memory_outbox(memory, now=later)).sent == 0
            assert fake.vector_count("user-6") == 1
        finally:
            await memory.close()


async def test_jobs_register_once_under_fixed_ids(
    agent_factory: Callable[..., Agent], sessions: async_sessionmaker[AsyncSession],
) -> None:
    local_agent = agent_factory()
    scheduler = build_scheduler(local_agent)
    register_jobs(scheduler, local_agent)  # a second registration replaces
    scheduler.start(paused=True)
    try:
        expected = sorted([IDLE_JOB, SWEEP_JOB, SUMMARY_JOB, INBOX_JOB])
        assert sorted(job.id for job in scheduler.get_jobs()) == expected
    finally:
        scheduler.shutdown(wait=False)

    memory = PineconeMemory(sessions, "test:2", api_key="k", host="http://127.0.0.1:9")
    pinecone_agent = Agent(dataclasses.replace(local_agent.services, memory=memory))
    scheduler = build_scheduler(pinecone_agent, retention_days=30)
    scheduler.start(paused=True)
    try:
        jobs = {job.id: job for job in scheduler.get_jobs()}
        assert sorted(jobs) == sorted([IDLE_JOB, SWEEP_JOB, SUMMARY_JOB, INBOX_JOB, OUTBOX_JOB, PURGE_JOB])
        assert all(job.max_instances == 1 and job.coalesce for job in jobs.values())
        assert str(scheduler.timezone) == "UTC"
    finally:
        scheduler.shutdown(wait=False)


async def test_a_failing_job_is_logged_by_class_and_the_scheduler_keeps_running(
    agent: Agent, sessions: async_sessionmaker[AsyncSession], caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(user_text: str) -> None:
        raise ValueError(f"could not handle {user_text}")

    with caplog.at_level(logging.INFO):
        assert await run_guarded("broken", broken, "canary-4411 private words") is None
    assert "job broken failed: ValueError" in caplog.text
    assert "canary-4411" not in caplog.text

    async with sessions() as db:
        await Users(db).ensure(7, "en")
        await reserve(db, 7, 400, 10_000, ttl_seconds=60, now=utcnow() - dt.timedelta(hours=1))
        await db.commit()
    scheduler = build_scheduler(agent)
    scheduler.add_job(run_guarded, "interval", seconds=0.05, args=("broken", broken, "canary-4411"),
                      id="broken", next_run_time=dt.datetime.now(dt.UTC))
    scheduler.start()
    try:
        for _ in range(100):  # the sweeper runs at start-up
            async with sessions() as db:
                if not list((await db.execute(select(Reservation.id))).scalars()):
                    break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the sweeper never ran")
        await asyncio.sleep(0.2)
        assert scheduler.running
        assert caplog.text.count("job broken failed: ValueError") >= 2  # it keeps being run
    finally:
        scheduler.shutdown(wait=False)
    async with sessions() as db:
        day = (await db.execute(select(UsageDay).where(UsageDay.user_id == 7))).scalar_one()
    assert (day.used, day.reserved) == (400, 0)


async def test_a_job_runs_once_across_the_fleet() -> None:
    """Two processes' schedulers fire the same job at once: only the claimant runs it."""
    from redis.asyncio import Redis

    from ops.jobs import JobClaims

    redis = Redis.from_url(os.environ.get("DESKTOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/14"))
    try:
        await redis.ping()
    except Exception as exc:
        pytest.fail(f"Redis is required: {exc!r}")
    await redis.delete("desktop:job:fleet-test")
    runs: list[str] = []

    async def job(name: str) -> None:
        runs.append(name)

    every = dt.timedelta(minutes=5)
    await asyncio.gather(*(
        run_guarded("fleet-test", job, f"process-{i}", claims=JobClaims(redis), every=every)
        for i in range(2)
    ))
    await redis.delete("desktop:job:fleet-test")
    await redis.aclose()
    assert len(runs) == 1
