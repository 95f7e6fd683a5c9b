"""What the user sees and steers of their memory, through the real aiogram client: /memory with
Forget, the review of a summary at /end_session (keep, edit, don't remember), /find; forged
buttons open nothing; forgetting reaches Pinecone too."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from graph.agent import Agent
from memory.embedders import LocalEmbedder
from memory.pinecone import PineconeMemory
from storage.models import MemoryOutbox, MemoryRecord
from tests.fakes.openai import FakeOpenAI
from tests.fakes.pinecone import FakePinecone
from tests.fakes.telegram import SentMessage
from tests.harness import Harness, running_bot
from tests.test_graph import say as agent_say

ALICE, BOB = 3001, 3002
FACT = "The user grows chili peppers on the balcony"


def summary_of(fact: str) -> str:
    return f"Title: Balcony garden\nSummary: The user talked about gardening.\nFacts:\n- {fact}\n"


@pytest.fixture
async def h(
    tmp_path: Path, db_url: str, sessions: async_sessionmaker[AsyncSession], prompts_dir: Path,
    fake_openai: FakeOpenAI,
) -> AsyncIterator[Harness]:
    async with running_bot(tmp_path, db_url, sessions, prompts_dir, fake_openai) as harness:
        harness.ai.reply = lambda body: summary_of(FACT) if body["model"] == "gpt-4o-mini" else "Noted."
        yield harness


async def send(h: Harness, user: int, text: str, predicate: Any = None) -> SentMessage:
    update = h.tg.send_text(user, text)
    return await h.reply_to(update, predicate or (lambda m: "New session" not in (m.text or "")))


async def press(h: Harness, user: int, message: SentMessage, data: str) -> None:
    start = len(h.tg.calls)
    h.tg.press_button(user, message.message_id, data)
    await h.tg.wait_for(lambda c: c.method == "answerCallbackQuery", start=start)
    await asyncio.sleep(0.1)  # the edit that follows the answer


def buttons(message: SentMessage) -> list[str]:
    rows = (message.reply_markup or {}).get("inline_keyboard", [])
    return [b["callback_data"] for row in rows for b in row if "callback_data" in b]


async def units_of(sessions: async_sessionmaker[AsyncSession], user: int) -> dict[str, str]:
    async with sessions() as db:
        rows = (await db.execute(select(MemoryRecord).where(MemoryRecord.user_id == user))).scalars()
        return {row.id: row.text for row in rows}


async def remembered_session(h: Harness, user: int) -> tuple[SentMessage, int]:
    await send(h, user, "I grow chili peppers on my balcony")
    ended = await send(h, user, "/end_session")
    sessions, _ = await h.agent.list_sessions(user, 0, 5)
    return ended, sessions[0].id


async def test_memory_lists_facts_and_summaries_and_forgets_one_for_good(
    h: Harness, sessions: async_sessionmaker[AsyncSession],
) -> None:
    _, session_id = await remembered_session(h, ALICE)

    listing = await send(h, ALICE, "/memory")

    assert FACT in (listing.text or "") and "Balcony garden" in (listing.text or "")
    fact_button = f"mf:{session_id}:f:1:0"
    assert fact_button in buttons(listing) and f"mf:{session_id}:s:0:0" in buttons(listing)
    await press(h, ALICE, listing, fact_button)

    assert f"{ALICE}:{session_id}:fact:1" not in await units_of(sessions, ALICE)
    shown = h.tg._bot_message(ALICE, listing.message_id)
    assert FACT not in (shown.text or "")  # the list is redrawn without it
    await send(h, ALICE, "what do I grow on the balcony?")
    assert FACT not in (h.ai.last_system_prompt() or "")  # never recalled again

    # Forgetting the summary forgets everything the session left.
    listing = await send(h, ALICE, "/memory")
    await press(h, ALICE, listing, f"mf:{session_id}:s:0:0")
    assert await units_of(sessions, ALICE) == {}


async def test_a_forged_button_naming_another_users_memory_forgets_nothing(
    h: Harness, sessions: async_sessionmaker[AsyncSession],
) -> None:
    _, alice_session = await remembered_session(h, ALICE)
    before = await units_of(sessions, ALICE)
    bobs_view = await send(h, BOB, "/memory")  # Bob has nothing: an empty list, no buttons

    h.tg._open_queries.add("forged-memory")
    h.tg.enqueue({"update_id": 950_001, "callback_query": {
        "id": "forged-memory", "from": {"id": BOB, "is_bot": False, "first_name": "B"},
        "chat_instance": "b", "data": f"mf:{alice_session}:s:0:0",
        "message": {"message_id": bobs_view.message_id, "date": bobs_view.date,
                    "chat": {"id": BOB, "type": "private", "first_name": "B"},
                    "from": bobs_view.from_user, "text": bobs_view.text},
    }})
    answered = await h.tg.wait_for(
        lambda c: c.method == "answerCallbackQuery" and c.params.get("callback_query_id") == "forged-memory"
    )
    assert "expired" in str(answered.params.get("text"))
    assert await units_of(sessions, ALICE) == before and before


async def test_a_summary_can_be_left_out_of_memory_when_the_session_ends(
    h: Harness, sessions: async_sessionmaker[AsyncSession],
) -> None:
    ended, session_id = await remembered_session(h, ALICE)
    assert FACT in (ended.text or "")
    assert buttons(ended) == [f"sr:{action}:{session_id}" for action in ("keep", "edit", "drop")]
    assert await units_of(sessions, ALICE)

    await press(h, ALICE, ended, f"sr:drop:{session_id}")

    assert await units_of(sessions, ALICE) == {}
    assert "nothing of this session" in (h.tg._bot_message(ALICE, ended.message_id).text or "")
    view = await h.agent.get_session(ALICE, session_id)
    assert view is not None and view.summary is None  # not in /list_sessions either


async def test_an_edited_summary_is_what_gets_remembered(
    h: Harness, sessions: async_sessionmaker[AsyncSession],
) -> None:
    ended, session_id = await remembered_session(h, ALICE)
    await press(h, ALICE, ended, f"sr:edit:{session_id}")
    prompt = h.tg.chat_messages(ALICE)[-1]
    assert "Send what I should remember" in (prompt.text or "")

    saved = await send(
        h, ALICE, "Title: Balcony\nSummary: Grows habaneros.\nFacts:\n- The user grows habaneros",
        predicate=lambda m: "Saved" in (m.text or ""),
    )

    assert "habaneros" in (saved.text or "")
    units = await units_of(sessions, ALICE)
    assert sorted(units) == [f"{ALICE}:{session_id}", f"{ALICE}:{session_id}:fact:1"]
    assert all("chili" not in text for text in units.values())  # exchanges went with the old
    view = await h.agent.get_session(ALICE, session_id)
    assert view is not None and "habaneros" in (view.summary or "")


async def test_find_lists_the_sessions_that_match_opens_and_resumes_one(
    h: Harness, sessions: async_sessionmaker[AsyncSession],
) -> None:
    _, session_id = await remembered_session(h, ALICE)
    h.ai.reply = lambda body: (
        summary_of("The user is planning a trip to Porto") if body["model"] == "gpt-4o-mini" else "Noted."
    )
    await send(h, ALICE, "Help me plan a trip to Porto")
    await send(h, ALICE, "/end_session")

    found = await send(h, ALICE, "/find chili balcony")

    assert "Balcony garden" in (found.text or "")
    assert buttons(found)[0] == f"so:{session_id}:0"
    await press(h, ALICE, found, f"so:{session_id}:0")
    opened = h.tg._bot_message(ALICE, found.message_id)
    assert "gardening" in (opened.text or "")
    nothing = await send(h, ALICE, "/find submarine")
    assert "Nothing" in (nothing.text or "")

    # Resumed: the conversation goes on with its history; its memory is made again at its end.
    assert f"sres:{session_id}" in buttons(opened)
    await press(h, ALICE, opened, f"sres:{session_id}")
    assert "Back in session" in (h.tg.chat_messages(ALICE)[-1].text or "")
    assert not any(unit.split(":")[1] == str(session_id) for unit in await units_of(sessions, ALICE))
    await send(h, ALICE, "and what about watering them?")
    history = str(h.ai.chat_requests[-1]["messages"][1:])
    assert "I grow chili peppers on my balcony" in history
    sessions_now, _ = await h.agent.list_sessions(ALICE, 0, 5)
    assert [s.id for s in sessions_now if s.status == "open"] == [session_id]


async def test_forgetting_reaches_pinecone_now_or_through_the_outbox(
    agent_factory: Callable[..., Agent], fake_openai: FakeOpenAI,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    with FakePinecone() as fake:
        memory = PineconeMemory(
            sessions, LocalEmbedder.space, api_key="k", host=fake.host, attempts=1
        )
        agent = Agent(dataclasses.replace(agent_factory().services, memory=memory))
        try:
            fake_openai.reply = lambda body: (
                summary_of(FACT) if body["model"] == "gpt-4o-mini" else "Noted."
            )
            for _ in range(2):
                await agent_say(agent, 9, "I grow chili peppers")
                await agent.end_session(9, 9)
            first, second = sorted({int(key.split(":")[1]) for key in fake.namespaces()["user-9"]})
            assert await agent.forget_memory(9, first, "fact", 1) == 1
            assert f"9:{first}:fact:1" not in fake.namespaces()["user-9"]

            fake.fail_next("delete", 503)
            assert await agent.forget_session_memory(9, second) == 3
            assert f"9:{second}" in fake.namespaces()["user-9"]  # Pinecone did not take it...
            async with sessions() as db:
                queued = (await db.execute(select(MemoryOutbox))).scalars().all()
            assert {row.memory_id for row in queued} == {
                f"9:{second}", f"9:{second}:fact:1", f"9:{second}:exchange:1"
            }
            hits = await memory.rows.rank(9, _query("chili peppers"))
            assert all(f":{second}" not in hit.id for hit in hits)  # ...but it is never recalled
            await memory.retry_outbox(now=_later())
            assert not any(key.startswith(f"9:{second}") for key in fake.namespaces()["user-9"])
        finally:
            await memory.close()


def _query(text: str) -> Any:
    from memory.base import MemoryQuery

    return MemoryQuery(text, None, 20)


def _later() -> Any:
    import datetime as dt

    return dt.datetime(2100, 1, 1, tzinfo=dt.UTC)


async def test_an_answer_shows_what_it_remembered_and_a_wrong_memory_is_corrected(
    h: Harness, sessions: async_sessionmaker[AsyncSession],
) -> None:
    _, session_id = await remembered_session(h, ALICE)

    answer = await send(h, ALICE, "what do I grow on my balcony?")

    (used,) = [b for b in buttons(answer) if b.startswith("mu:")]
    await press(h, ALICE, answer, used)
    view = h.tg.chat_messages(ALICE)[-1]
    assert "drew on" in (view.text or "") and FACT in (view.text or "")
    fact_unit = f"{ALICE}:{session_id}:fact:1"
    (wrong,) = [b for b in buttons(view) if b.startswith("uf:") and f":{session_id}:f:1:" in b
                and not b.endswith(":0")]
    await press(h, ALICE, view, wrong)

    assert fact_unit not in await units_of(sessions, ALICE)
    assert "What is right?" in (h.tg.chat_messages(ALICE)[-1].text or "")
    await send(h, ALICE, "I grow habaneros now, not chili",
               predicate=lambda m: "remember that" in (m.text or ""))
    units = await units_of(sessions, ALICE)
    assert "Correction from the user: I grow habaneros now, not chili" in units.values()

    await send(h, ALICE, "what do I grow on my balcony these days?")
    recalled = h.ai.last_system_prompt() or ""
    assert "I grow habaneros now" in recalled and FACT not in recalled

    # Bob cannot open what Alice's answer used, even with her question's id.
    bobs = await send(h, BOB, "/memory")
    h.tg._open_queries.add("forged-used")
    h.tg.enqueue({"update_id": 950_101, "callback_query": {
        "id": "forged-used", "from": {"id": BOB, "is_bot": False, "first_name": "B"},
        "chat_instance": "b", "data": used,
        "message": {"message_id": bobs.message_id, "date": bobs.date,
                    "chat": {"id": BOB, "type": "private", "first_name": "B"},
                    "from": bobs.from_user, "text": bobs.text},
    }})
    refused = await h.tg.wait_for(
        lambda c: c.method == "answerCallbackQuery" and c.params.get("callback_query_id") == "forged-used"
    )
    assert "no longer kept" in str(refused.params.get("text"))
    assert not any(FACT in (m.text or "") for m in h.tg.chat_messages(BOB))
