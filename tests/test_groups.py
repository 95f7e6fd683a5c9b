"""Groups: a member's private data (memory, instructions, sessions, summaries) stays private.

Two users, one group, the whole bot on the fakes: what the group's messages show, and what the
group answers' prompts hold, are checked for canaries planted in Alice's private data.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiogram.fsm.storage.base import StorageKey
from aiogram.fsm.storage.memory import MemoryStorage
from aiogram.fsm.storage.redis import RedisStorage
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from handlers.data_rights import forget_chat_states
from handlers.personalize import Personalize
from storage.models import User
from tests.fakes.openai import FakeOpenAI
from tests.harness import TOKEN, Harness, running_bot

ALICE, BOB, GROUP = 1001, 2002, -100777
BOT = "@desktop_test_bot"
MEMORY_CANARY = "alice-private-memory-canary"
INSTRUCTIONS_CANARY = "alice-private-instructions-canary"
# Said by Alice, never in a summary: it is remembered only as an exchange (memory/units.py).
EXCHANGE_CANARY = "alice-private-exchange-canary"
SUMMARY = f"Title: Secret plans\nSummary: {MEMORY_CANARY}.\nFacts:\n- {MEMORY_CANARY}\n"


def reply_by_model(body: dict) -> str:
    return SUMMARY if body["model"] == "gpt-4o-mini" else "An answer."


@pytest.fixture
async def h(
    tmp_path: Path, db_url: str, sessions: async_sessionmaker[AsyncSession], prompts_dir: Path,
    fake_openai: FakeOpenAI,
) -> AsyncIterator[Harness]:
    async with running_bot(tmp_path, db_url, sessions, prompts_dir, fake_openai) as harness:
        harness.ai.reply = reply_by_model
        yield harness


async def say(h: Harness, user: int, text: str, chat: int | None = None) -> str:
    """Send text and return the bot's reply in that chat (not the "new session" note)."""
    update = h.tg.send_text(user, text, chat_id=chat, chat_type="private" if chat is None else "group")
    reply = await h.reply_to(update, lambda m: "New session" not in (m.text or ""))
    return reply.text or ""


async def alice_has_private_data(h: Harness) -> int:
    """Alice's instructions set, and a private session summarised into memory; its session id."""
    await h.agent.set_instructions(ALICE, INSTRUCTIONS_CANARY)
    await say(h, ALICE, f"my secret plans {EXCHANGE_CANARY}")
    ended = await say(h, ALICE, "/end_session")
    assert MEMORY_CANARY in ended  # shown to Alice, in her private chat
    sessions, _ = await h.agent.list_sessions(ALICE, 0, 5)
    return sessions[0].id


def group_texts(h: Harness) -> str:
    return json.dumps([m.text for m in h.tg.chat_messages(GROUP)], ensure_ascii=False)


def prompt_of(body: dict) -> str:
    return json.dumps(body["messages"], ensure_ascii=False)


async def test_a_members_private_data_never_reaches_the_group(h: Harness) -> None:
    session_id = await alice_has_private_data(h)

    before = len(h.ai.chat_requests)
    await say(h, ALICE, f"{BOT} what do you know about me?", chat=GROUP)
    await say(h, BOB, f"{BOT} and about me?", chat=GROUP)
    answers = h.ai.chat_requests[before:]
    assert len(answers) == 2
    for body in answers:
        assert MEMORY_CANARY not in prompt_of(body) and INSTRUCTIONS_CANARY not in prompt_of(body)
        assert EXCHANGE_CANARY not in prompt_of(body)

    # commands that show private data point to the private chat and show nothing
    listed = await say(h, ALICE, "/list_sessions", chat=GROUP)
    personalized = await say(h, ALICE, "/personalize", chat=GROUP)
    for reply in (listed, personalized):
        assert "private chat" in reply
    ended = await say(h, ALICE, "/end_session", chat=GROUP)
    assert "/list_sessions" in ended

    # a session button forged into the group (or pressed there) opens nothing
    pointer = h.tg.chat_messages(GROUP)[-1]
    h.tg._open_queries.add("forged-1")
    h.tg.enqueue({"update_id": 900_001, "callback_query": {
        "id": "forged-1", "from": {"id": ALICE, "is_bot": False, "first_name": "A"},
        "chat_instance": "g", "data": f"so:{session_id}:0",
        "message": {"message_id": pointer.message_id, "date": pointer.date,
                    "chat": {"id": GROUP, "type": "group", "title": "Test group"},
                    "from": pointer.from_user, "text": pointer.text},
    }})
    answered = await h.tg.wait_for(
        lambda c: c.method == "answerCallbackQuery" and c.params.get("callback_query_id") == "forged-1"
    )
    assert "expired" in str(answered.params.get("text"))
    await asyncio.sleep(0.2)  # anything the press would have edited or sent would be there by now
    assert MEMORY_CANARY not in group_texts(h) and INSTRUCTIONS_CANARY not in group_texts(h)
    assert "Secret plans" not in group_texts(h)


async def test_a_member_may_let_their_private_data_into_their_own_group_answers(h: Harness) -> None:
    await alice_has_private_data(h)
    menu_update = h.tg.send_text(ALICE, "/personalize")
    menu = await h.reply_to(menu_update)
    h.tg.press_button(ALICE, menu.message_id, "share:1")
    await h.tg.wait_for(lambda c: c.method == "answerCallbackQuery")

    before = len(h.ai.chat_requests)
    await say(h, ALICE, f"{BOT} remind me of my plans", chat=GROUP)
    await say(h, BOB, f"{BOT} what are Alice's plans?", chat=GROUP)
    alice_prompt, bob_prompt = (prompt_of(b) for b in h.ai.chat_requests[before:])
    assert MEMORY_CANARY in alice_prompt and INSTRUCTIONS_CANARY in alice_prompt
    assert EXCHANGE_CANARY in alice_prompt  # asked about her plans: her own exchange is recalled
    assert MEMORY_CANARY not in bob_prompt and INSTRUCTIONS_CANARY not in bob_prompt
    assert EXCHANGE_CANARY not in bob_prompt


async def test_a_group_remembers_what_was_said_there_for_the_same_member_only(h: Harness) -> None:
    group_words = "group-exchange-canary"
    await say(h, ALICE, f"{BOT} plans for the group {group_words}", chat=GROUP)
    await say(h, ALICE, "/end_session", chat=GROUP)  # the summary becomes Alice's group memory
    before = len(h.ai.chat_requests)
    await say(h, ALICE, f"{BOT} what did we say?", chat=GROUP)
    await say(h, ALICE, "and privately?")
    await say(h, BOB, f"{BOT} what did Alice say?", chat=GROUP)
    group_alice, private_alice, group_bob = (prompt_of(b) for b in h.ai.chat_requests[before:])
    assert MEMORY_CANARY in group_alice  # the group's own memory, in that group
    assert group_words in group_alice.split("<memory>", 1)[1]  # ...with what was said there
    assert MEMORY_CANARY not in private_alice  # not carried out of the group
    assert group_words not in private_alice
    assert MEMORY_CANARY not in group_bob and group_words not in group_bob  # never another member's


async def test_a_command_in_a_caption_is_not_a_command(h: Harness, fake_openai: FakeOpenAI) -> None:
    await say(h, ALICE, "hello")
    update = h.tg.send_document_from_user(ALICE, caption="/end_session")
    await h.reply_to(update)  # the document is answered as a document, its caption the question
    # No summary was made: the session goes on.
    assert not any(body["model"] == "gpt-4o-mini" for body in fake_openai.chat_requests)
    sessions, _ = await h.agent.list_sessions(ALICE, 0, 5)
    assert sessions[0].status == "open"


async def test_deleting_data_forgets_a_groups_waiting_state(
    h: Harness, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """A "waiting for your instructions" state left in a group must not outlive the user."""
    await say(h, ALICE, "hello")
    storage = h.dispatcher.storage
    bot_id = int(TOKEN.split(":")[0])
    await storage.set_state(StorageKey(bot_id, GROUP, ALICE), Personalize.waiting_for_instructions)
    menu = await h.reply_to(h.tg.send_text(ALICE, "/delete_my_data"))
    data = next(b["callback_data"] for row in menu.reply_markup["inline_keyboard"] for b in row
                if b["callback_data"].startswith("del:yes"))
    h.tg.press_button(ALICE, menu.message_id, data)
    await h.tg.wait_for(lambda c: c.method == "editMessageText" and "deleted" in c.params["text"])

    assert isinstance(storage, MemoryStorage)
    assert not [k for k in storage.storage if k.user_id == ALICE]
    await say(h, ALICE, f"{BOT} call me Sir from now on", chat=GROUP)
    async with sessions() as db:
        user = await db.get(User, ALICE)
    assert user is None or user.instructions is None


async def test_forgetting_states_in_redis_leaves_no_key_naming_the_user() -> None:
    import os

    redis = Redis.from_url(os.environ.get("DESKTOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
    try:
        await redis.ping()
    except Exception as exc:
        pytest.fail(f"Redis is required: {exc!r}")
    await redis.flushdb()
    storage = RedisStorage(redis)
    for chat in (ALICE, GROUP, -100999):
        await storage.set_state(StorageKey(1, chat, ALICE), Personalize.waiting_for_instructions)
        await storage.set_data(StorageKey(1, chat, ALICE), {"x": 1})
    await storage.set_state(StorageKey(1, GROUP, BOB), Personalize.waiting_for_instructions)
    await storage.set_state(StorageKey(1, GROUP, ALICE, thread_id=BOB), "topic")
    try:
        assert await forget_chat_states(storage, ALICE) == 7
        left = [k.decode() async for k in redis.scan_iter()]
        assert left == [f"fsm:{GROUP}:{BOB}:state"]
    finally:
        await redis.flushdb()
        await redis.aclose()
