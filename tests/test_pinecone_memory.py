"""Pinecone memory over real HTTP to the fake data plane: recall, isolation, erasure, outbox."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable, Iterator

import numpy as np
import pytest
from pinecone import Pinecone
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from graph.agent import Agent, Answer
from memory.base import MemoryItem, MemoryQuery
from memory.embedders import LocalEmbedder
from memory.local import LocalMemory
from memory.migrate import LocalSource, copy_memories, reembed
from memory.pinecone import MemoryUnavailable, OutboxRun, PineconeMemory, namespace_for
from storage.models import MemoryOutbox, MemoryRecord
from tests.fakes.openai import FakeOpenAI, fake_embedding
from tests.fakes.pinecone import FakePinecone
from tests.test_graph import say

SPACE = LocalEmbedder.space  # the agents' embedder in these tests
LATER = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)  # every queued write is due by then
EVEN_LATER = LATER + dt.timedelta(days=1)


def summary_of(fact: str) -> str:
    return (
        f"Title: {fact}\nSummary: The user talked about {fact}.\nFacts:\n- {fact}\n"
        "Open questions:\n"
    )


def reply_with_summary(fake_openai: FakeOpenAI, fact: str) -> None:
    fake_openai.reply = lambda body: (
        summary_of(fact) if body["model"] == "gpt-4o-mini" else "Noted."
    )


@pytest.fixture
def fake_pinecone() -> Iterator[FakePinecone]:
    with FakePinecone() as fake:
        yield fake


@pytest.fixture
async def pinecone_memory(
    fake_pinecone: FakePinecone, sessions: async_sessionmaker[AsyncSession]
) -> AsyncIterator[PineconeMemory]:
    memory = PineconeMemory(
        sessions, SPACE, api_key="pc-test", host=fake_pinecone.host, timeout=2.0, attempts=1
    )
    yield memory
    await memory.close()


@pytest.fixture
def pc_agent(agent_factory: Callable[..., Agent], pinecone_memory: PineconeMemory) -> Agent:
    agent = agent_factory()
    return Agent(dataclasses.replace(agent.services, memory=pinecone_memory))


async def outbox_rows(sessions: async_sessionmaker[AsyncSession]) -> list[MemoryOutbox]:
    async with sessions() as db:
        return list((await db.execute(select(MemoryOutbox))).scalars())


# --- the agent with Pinecone memory ---------------------------------------------------------


async def test_memory_of_an_ended_session_is_recalled_later(
    pc_agent: Agent, fake_openai: FakeOpenAI, fake_pinecone: FakePinecone,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    reply_with_summary(fake_openai, "The user has a cat named Ptolemy")
    await say(pc_agent, 3, "My cat Ptolemy likes boxes.")
    ended = await pc_agent.end_session(3, 3)
    assert ended is not None and ended.outcome == "summarised"

    stored = fake_pinecone.namespaces()
    assert list(stored) == ["user-3"]
    session = ended.session_id
    assert set(stored["user-3"]) == {f"3:{session}", f"3:{session}:fact:1", f"3:{session}:exchange:1"}
    for vector in stored["user-3"].values():
        assert vector["metadata"]["user_id"] == 3 and None not in vector["metadata"].values()
        assert "Ptolemy" not in str(vector["metadata"])  # no text leaves the database
    assert await outbox_rows(sessions) == []

    await say(pc_agent, 3, "Tell me about my cat Ptolemy")
    system = fake_openai.last_system_prompt() or ""
    memory_block = system.split("<memory>", 1)[1].split("</memory>", 1)[0]
    assert "The user has a cat named Ptolemy" in memory_block
    query = fake_pinecone.requests_for("query")[-1].json
    assert query["namespace"] == "user-3" and query["includeMetadata"] is True
    assert query["filter"] == {
        "$and": [{"user_id": {"$eq": 3}}, {"$or": [{"chat_id": {"$exists": False}}]}]
    }  # the user, and their private memories only (a private chat)


async def test_two_users_never_share_a_namespace(
    pc_agent: Agent, fake_openai: FakeOpenAI, fake_pinecone: FakePinecone,
) -> None:
    reply_with_summary(fake_openai, "secret-alpha pancake recipe")
    await say(pc_agent, 10, "my pancakes recipe secret-alpha")
    await pc_agent.end_session(10, 10)
    reply_with_summary(fake_openai, "beta waffle plans")
    await say(pc_agent, 11, "my waffle plans")
    await pc_agent.end_session(11, 11)

    stored = fake_pinecone.namespaces()
    assert sorted(stored) == ["user-10", "user-11"]
    assert all(v["metadata"]["user_id"] == 10 for v in stored["user-10"].values())
    assert all(v["metadata"]["user_id"] == 11 for v in stored["user-11"].values())

    before = len(fake_openai.chat_requests)
    await say(pc_agent, 11, "pancake recipe secret-alpha please")
    user_b = fake_openai.chat_requests[before:]
    assert user_b and all("secret-alpha" not in str(b["messages"][0]) for b in user_b)
    assert "beta waffle plans" in str(user_b[0]["messages"][0])  # B's own memory is there
    queried = {r.json["namespace"] for r in fake_pinecone.requests_for("query")}
    assert queried == {"user-11"}


async def test_delete_data_removes_the_namespace_and_queued_writes(
    pc_agent: Agent, fake_openai: FakeOpenAI, fake_pinecone: FakePinecone,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    reply_with_summary(fake_openai, "first topic")
    await say(pc_agent, 20, "first")
    await pc_agent.end_session(20, 20)
    await say(pc_agent, 21, "other user's session")
    await pc_agent.end_session(21, 21)
    fake_pinecone.fail_next("upsert", 503)  # the second session of user 20 is only queued
    reply_with_summary(fake_openai, "second topic")
    await say(pc_agent, 20, "second")
    await pc_agent.end_session(20, 20)
    # each session: its summary, one fact, one exchange
    assert fake_pinecone.vector_count("user-20") == 3 and len(await outbox_rows(sessions)) == 3
    assert await pc_agent.services.memory.has_any(20)

    receipt = await pc_agent.delete_data(20)

    assert receipt.memories == 6  # three in Pinecone, three queued
    assert "user-20" not in fake_pinecone.namespaces()
    assert fake_pinecone.vector_count("user-21") == 3  # the other user's memories stay
    assert await outbox_rows(sessions) == []
    async with sessions() as db:
        assert (await db.execute(select(MemoryRecord).where(MemoryRecord.user_id == 20))).all() == []
    assert not await pc_agent.services.memory.has_any(20)  # the cached "yes" is gone
    assert await pc_agent.services.memory.export_user(20) == []
    assert (await pc_agent.services.memory.retry_outbox(now=LATER)).sent == 0
    assert "user-20" not in fake_pinecone.namespaces()  # nothing re-created


async def test_delete_user_itself_drops_queued_writes_so_no_retry_recreates_them(
    pinecone_memory: PineconeMemory, fake_pinecone: FakePinecone,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    from storage.repositories import Users

    async with sessions() as db:
        await Users(db).ensure(22, "en")  # the SQL user row stays: no cascade helps here
        await db.commit()
    await pinecone_memory.add_many([MemoryItem(22, 1, None, "stored", None, None, None)], [[1.0, 0.0]])
    fake_pinecone.fail_next("upsert", 500)
    await pinecone_memory.add_many([MemoryItem(22, 2, None, "queued", None, None, None)], [[0.0, 1.0]])
    assert len(await outbox_rows(sessions)) == 1

    assert await pinecone_memory.delete_user(22) == 2
    assert await outbox_rows(sessions) == []
    assert await pinecone_memory.retry_outbox(now=LATER) == OutboxRun(0, 0)
    assert fake_pinecone.namespaces() == {}
    assert await pinecone_memory.delete_user(22) == 0  # again: an empty namespace's 404 is fine


async def test_a_failed_upsert_is_queued_and_retried_into_exactly_one_vector_each(
    pc_agent: Agent, fake_openai: FakeOpenAI, fake_pinecone: FakePinecone,
    pinecone_memory: PineconeMemory, sessions: async_sessionmaker[AsyncSession],
) -> None:
    reply_with_summary(fake_openai, "outbox-canary holiday plans")
    await say(pc_agent, 30, "holiday plans")
    fake_pinecone.fail_next("upsert", 500)
    ended = await pc_agent.end_session(30, 30)
    assert ended is not None and ended.outcome == "summarised"
    assert fake_pinecone.vector_count() == 0
    summary_id = f"30:{ended.session_id}"
    units = {summary_id, f"{summary_id}:fact:1", f"{summary_id}:exchange:1"}
    rows = await outbox_rows(sessions)
    assert {row.memory_id for row in rows} == units
    assert {row.last_error for row in rows} == {"ServiceException"}
    async with sessions() as db:  # the queued units are encrypted at rest
        payloads = (await db.execute(text("SELECT payload FROM memory_outbox"))).scalars().all()
    assert all(b"outbox-canary" not in bytes(raw) for raw in payloads)

    assert await pinecone_memory.retry_outbox() == OutboxRun(0, 0)  # not due yet: backoff holds
    fake_pinecone.fail_next("upsert", 500)
    assert await pinecone_memory.retry_outbox(now=LATER) == OutboxRun(0, 1)  # an outage: stop
    assert max(row.attempts for row in await outbox_rows(sessions)) == 2

    assert await pinecone_memory.retry_outbox(now=EVEN_LATER) == OutboxRun(3, 0)
    assert await outbox_rows(sessions) == []
    assert await pinecone_memory.retry_outbox(now=EVEN_LATER) == OutboxRun(0, 0)
    stored = fake_pinecone.namespaces()["user-30"]
    assert set(stored) == units
    # Each vector came from its payload: the one stored with the unit in the database.
    async with sessions() as db:
        records = {r.id: r for r in (await db.execute(select(MemoryRecord))).scalars()}
    for unit in units:
        expected = np.frombuffer(records[unit].embedding or b"", dtype=np.float32)
        assert stored[unit]["values"] == pytest.approx(expected.tolist(), abs=1e-6)

    # The same units written again (a retried summarise) still leave one vector each.
    again = await LocalSource(sessions, SPACE).dump_user(30)
    await pinecone_memory.add_many([item for item, _ in again], [vector for _, vector in again])
    assert fake_pinecone.vector_count("user-30") == 3


async def test_an_older_queued_write_never_overwrites_a_newer_direct_one(
    pinecone_memory: PineconeMemory, fake_pinecone: FakePinecone,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    from storage.repositories import Users

    async with sessions() as db:
        await Users(db).ensure(31, "en")
        await db.commit()
    old = MemoryItem(31, 1, "t", "old summary", "coder", None, None)
    new = dataclasses.replace(old, text="new summary")
    fake_pinecone.fail_next("upsert", 500)
    await pinecone_memory.add_many([old], [fake_embedding("old", 8)])
    await pinecone_memory.add_many([new], [fake_embedding("new", 8)])
    assert await outbox_rows(sessions) == []
    await pinecone_memory.retry_outbox(now=LATER)
    stored = fake_pinecone.namespaces()["user-31"]["31:1"]["values"]
    assert stored == pytest.approx(fake_embedding("new", 8), abs=1e-6)


async def test_the_clients_own_retries_are_bounded(
    sessions: async_sessionmaker[AsyncSession], fake_pinecone: FakePinecone,
) -> None:
    memory = PineconeMemory(sessions, SPACE, api_key="k", host=fake_pinecone.host, attempts=2)
    try:
        item = MemoryItem(1, 1, None, "canary-summary", None, None, None)
        fake_pinecone.fail_next("upsert", 500, times=5, message="bad request canary-summary")
        with pytest.raises(MemoryUnavailable) as raised:
            await memory.put_many([(item, [1.0, 0.0])])
        assert len(fake_pinecone.requests_for("upsert")) == 2
        assert raised.value.status == 500 and raised.value.cause == "ServiceException"
        assert "canary" not in str(raised.value) and raised.value.__cause__ is None
        fake_pinecone.clear_faults()
        fake_pinecone.fail_next("upsert", 503, times=1)  # one retry lands it
        await memory.put_many([(item, [1.0, 0.0])])
        assert fake_pinecone.vector_count("user-1") == 1
    finally:
        await memory.close()


async def test_a_failing_query_falls_back_to_words_and_the_answer_still_arrives(
    pc_agent: Agent, fake_openai: FakeOpenAI, fake_pinecone: FakePinecone,
) -> None:
    reply_with_summary(fake_openai, "the user likes jazz")
    await say(pc_agent, 40, "I like jazz")
    await pc_agent.end_session(40, 40)
    fake_openai.reply = "Here is an answer."
    fake_pinecone.fail_next("query", 500)

    events = await say(pc_agent, 40, "which jazz records should I buy?")

    answer = events[-1]
    assert isinstance(answer, Answer) and answer.complete and answer.text == "Here is an answer."
    assert len(fake_pinecone.requests_for("query")) == 1  # asked, and failed
    memory_block = (fake_openai.last_system_prompt() or "").split("<memory>", 1)[1]
    assert "the user likes jazz" in memory_block  # recalled by its words alone


async def test_a_hanging_pinecone_costs_at_most_the_timeout(
    agent_factory: Callable[..., Agent], fake_openai: FakeOpenAI, fake_pinecone: FakePinecone,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    memory = PineconeMemory(
        sessions, SPACE, api_key="k", host=fake_pinecone.host, timeout=0.5, attempts=1
    )
    agent = Agent(dataclasses.replace(agent_factory().services, memory=memory))
    try:
        reply_with_summary(fake_openai, "the user collects stamps")
        await say(agent, 41, "I collect stamps")
        await agent.end_session(41, 41)
        fake_pinecone.fail_next("query", 500, delay=5)
        began = time.monotonic()
        events = await say(agent, 41, "hello")
        assert isinstance(events[-1], Answer)
        assert time.monotonic() - began < 3.0
    finally:
        await memory.close()


async def test_whether_a_user_has_memories_is_answered_without_pinecone(
    pinecone_memory: PineconeMemory, fake_pinecone: FakePinecone,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    from storage.repositories import Users

    async with sessions() as db:
        await Users(db).ensure(50, "en")
        await db.commit()
    assert not await pinecone_memory.has_any(50)
    await pinecone_memory.add_many([MemoryItem(50, 1, None, "x", None, None, None)], [[0.5, 0.5]])
    assert await pinecone_memory.has_any(50)
    await pinecone_memory.delete_user(50)
    assert not await pinecone_memory.has_any(50)
    assert fake_pinecone.requests_for("list")  # the delete listed the namespace...
    assert not fake_pinecone.requests_for("query")  # ...but nothing was searched


def _legacy_summary(fake_pinecone: FakePinecone, user_id: int, session_id: int, words: str) -> None:
    """A summary as Pinecone held it before units lived in SQL: its text in the metadata."""
    index = Pinecone(api_key="k").Index(host=fake_pinecone.host)
    index.upsert(vectors=[{
        "id": f"{user_id}:{session_id}", "values": fake_embedding(words, 256),  # the index's size
        "metadata": {"schema": 1, "kind": "session_summary", "user_id": user_id, "text": words,
                     "session_id": session_id, "started_at": "2026-01-02T03:04:05+00:00"},
    }], namespace=namespace_for(user_id))


async def test_export_holds_every_unit_and_what_only_pinecone_holds(
    pc_agent: Agent, fake_openai: FakeOpenAI, fake_pinecone: FakePinecone,
) -> None:
    reply_with_summary(fake_openai, "gardening tomatoes")
    await say(pc_agent, 60, "tomatoes")
    first = await pc_agent.end_session(60, 60)
    fake_pinecone.fail_next("upsert", 500)
    reply_with_summary(fake_openai, "gardening peppers")
    await say(pc_agent, 60, "peppers")
    second = await pc_agent.end_session(60, 60)
    assert first is not None and second is not None
    _legacy_summary(fake_pinecone, 60, 77, "legacy gardening notes")

    document = await pc_agent.export_data(60)

    memories = {m["id"]: m for m in document["memories"]}
    assert len(memories) == len(document["memories"]) == 7  # 2 sessions x 3 units, 1 legacy
    assert "tomatoes" in memories[f"60:{first.session_id}"]["text"]
    assert "peppers" in memories[f"60:{second.session_id}:fact:1"]["text"]  # queued for Pinecone
    assert memories[f"60:{second.session_id}:exchange:1"]["kind"] == "exchange"
    assert memories["60:77"]["store"] == "pinecone"
    assert memories["60:77"]["text"] == "legacy gardening notes"
    assert {m["store"] for m in document["memories"]} == {"database", "pinecone"}


async def test_host_is_resolved_from_the_index_name(
    fake_pinecone: FakePinecone, sessions: async_sessionmaker[AsyncSession],
) -> None:
    from storage.repositories import Users

    memory = PineconeMemory(
        sessions, SPACE, api_key="k", index_name="desktop-memory", control_host=fake_pinecone.host
    )
    try:
        async with sessions() as db:
            await Users(db).ensure(70, "en")
            await db.commit()
        await memory.start()
        await memory.add_many([MemoryItem(70, 1, None, "hello", None, None, None)], [[1.0, 0.0]])
        hits = await memory.search(70, MemoryQuery("greetings", [1.0, 0.0], 3))
        assert [h.text for h in hits] == ["hello"]
        assert len(fake_pinecone.requests_for("describe_index")) == 1
        assert len(fake_pinecone.requests_for("query")) == 1
        wrong = PineconeMemory(
            sessions, SPACE, api_key="k", index_name="nope", control_host=fake_pinecone.host
        )
        with pytest.raises(MemoryUnavailable):
            await wrong.start()
    finally:
        await memory.close()


# --- migration ------------------------------------------------------------------------------


async def test_vectors_go_to_pinecone_and_old_summaries_come_back(
    agent: Agent, fake_openai: FakeOpenAI, pinecone_memory: PineconeMemory,
    fake_pinecone: FakePinecone, sessions: async_sessionmaker[AsyncSession],
) -> None:
    for user_id, facts in ((80, ["violin lessons", "chess openings"]), (81, ["rust lifetimes"])):
        for fact in facts:
            reply_with_summary(fake_openai, fact)
            await say(agent, user_id, fact)
            await agent.end_session(user_id, user_id)
    async with sessions() as db:
        records = {r.id: r for r in (await db.execute(select(MemoryRecord))).scalars()}
    assert len(records) == 9  # three sessions, three units each

    report = await copy_memories(LocalSource(sessions, SPACE), pinecone_memory)

    assert (report.users, report.copied) == (2, 9)
    stored = fake_pinecone.namespaces()
    copied = {vid: v for space in stored.values() for vid, v in space.items()}
    assert set(copied) == set(records)
    for memory_id, record in records.items():
        assert "text" not in copied[memory_id]["metadata"]
        assert memory_id in stored[namespace_for(record.user_id)]
        expected = np.frombuffer(record.embedding or b"", dtype=np.float32).tolist()
        assert copied[memory_id]["values"] == pytest.approx(expected, abs=1e-6)
    assert (await copy_memories(LocalSource(sessions, SPACE), pinecone_memory)).copied == 9
    assert fake_pinecone.vector_count() == 9  # re-run: still one vector per unit

    # Back: only summaries Pinecone held with their text; the units already in SQL stay as
    # they are (their metadata has no text to overwrite them with).
    _legacy_summary(fake_pinecone, 80, 999, "the user restores old pianos")
    provider_space = "openai:text-embedding-3-small"
    back = await copy_memories(pinecone_memory, LocalMemory(sessions, provider_space))
    assert (back.users, back.copied, back.skipped) == (2, 1, 0)
    async with sessions() as db:
        restored = {r.id: r for r in (await db.execute(select(MemoryRecord))).scalars()}
    assert {k: r.text for k, r in restored.items() if k in records} == {
        k: r.text for k, r in records.items()
    }
    assert restored["80:999"].text == "the user restores old pianos"
    assert restored["80:999"].space == provider_space

    # Its vector came from another embedder: reembed brings it into this one's space.
    assert await reembed(sessions, pinecone_memory, LocalEmbedder()) == 1
    async with sessions() as db:
        again = await db.get(MemoryRecord, "80:999")
    assert again is not None and again.space == SPACE
    hits = await pinecone_memory.search(80, MemoryQuery("pianos restoration", None, 3))
    assert hits[0].id == "80:999"


# --- the fake itself, through the sync client ----------------------------------------------


def test_fake_filters_pagination_and_fetch_with_the_sync_client() -> None:
    with FakePinecone() as fake:
        index = Pinecone(api_key="k").Index(host=fake.host)
        index.upsert(vectors=[
            {"id": "a", "values": [1.0, 0.0], "metadata": {"n": 1, "tag": "x", "tags": ["p", "q"]}},
            {"id": "b", "values": [0.9, 0.1], "metadata": {"n": 5, "tag": "y"}},
            {"id": "c", "values": [0.0, 1.0], "metadata": {"n": 9, "flag": True}},
        ], namespace="ns")

        def ids(flt: dict[str, object]) -> list[str]:
            found = index.query(vector=[1.0, 0.0], top_k=10, namespace="ns", filter=flt)
            return sorted(m.id for m in found.matches)

        assert ids({"tag": "x"}) == ["a"]
        assert ids({"n": {"$gt": 1, "$lte": 9}}) == ["b", "c"]
        assert ids({"n": {"$gte": 1, "$lt": 5}}) == ["a"]
        assert ids({"tag": {"$ne": "x"}}) == ["b", "c"]
        assert ids({"tag": {"$in": ["x", "y"]}}) == ["a", "b"]
        assert ids({"tag": {"$nin": ["x"]}}) == ["b", "c"]
        assert ids({"flag": {"$exists": True}}) == ["c"]
        assert ids({"tags": "q"}) == ["a"]
        assert ids({"$or": [{"n": 9}, {"tag": "y"}]}) == ["b", "c"]
        assert ids({"$and": [{"n": {"$gt": 0}}, {"tag": {"$exists": False}}]}) == ["c"]

        ranked = index.query(vector=[1.0, 0.0], top_k=2, namespace="ns", include_values=True)
        assert [m.id for m in ranked.matches] == ["a", "b"]
        assert ranked.matches[0].score == pytest.approx(1.0)
        assert ranked.matches[0].values == [1.0, 0.0]
        assert index.query(vector=[1.0, 0.0], top_k=5, namespace="other").matches == []

        pages = list(index.list(namespace="ns", limit=2))
        assert pages == [["a", "b"], ["c"]]
        assert list(index.list(namespace="ns", prefix="b")) == [["b"]]
        fetched = index.fetch(ids=["a", "zz"], namespace="ns")
        assert list(fetched.vectors) == ["a"] and fetched.vectors["a"].metadata["tag"] == "x"

        index.delete(filter={"n": {"$gte": 5}}, namespace="ns")
        assert sorted(fake.namespaces()["ns"]) == ["a"]
        stats = index.describe_index_stats()
        assert stats.namespaces["ns"].vector_count == 1 and stats.dimension == 2
        with pytest.raises(Exception) as bad:
            index.upsert(vectors=[{"id": "d", "values": [1.0, 0.0, 0.0]}], namespace="ns")
        assert getattr(bad.value, "status", None) == 400
        index.delete(delete_all=True, namespace="ns")
        assert fake.namespaces() == {}
        assert [r.op for r in fake.requests].count("query") == 12
