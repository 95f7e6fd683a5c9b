"""Stopping an answer while it streams, through the real aiogram client: Telegram's draft stop
control in a private chat, a Stop button only the asker may press in a group, a stop reaching
another process of a fleet through Redis. A stopped answer is kept as partial and charged less."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from handlers.stopping import Stoppable
from tests.fakes.openai import FakeOpenAI
from tests.harness import Harness, running_bot

ALICE, BOB, GROUP = 5001, 5002, -100555
LONG = " ".join(f"word{i}" for i in range(300))


@pytest.fixture
async def h(
    tmp_path: Path, db_url: str, sessions: async_sessionmaker[AsyncSession], prompts_dir: Path,
    fake_openai: FakeOpenAI,
) -> AsyncIterator[Harness]:
    async with running_bot(tmp_path, db_url, sessions, prompts_dir, fake_openai) as harness:
        harness.ai.reply = LONG
        yield harness


async def full_answer_cost(h: Harness) -> int:
    """What the same question costs when nobody stops it (another user, same prompt size).
    Both ask the Coder, which has no tools: the fake counts no tool schemas in a prompt."""
    for user in (ALICE, BOB):
        await h.agent.set_role(user, "coder")
    h.ai.chunk_delay = 0.0
    update = h.tg.send_text(BOB, "tell me a long story")
    await h.reply_to(update, lambda m: "word299" in (m.text or ""))
    return (await h.agent.usage(BOB)).used


async def test_the_draft_stop_control_stops_the_answer_and_keeps_what_came(h: Harness) -> None:
    full = await full_answer_cost(h)
    h.ai.chunk_delay = 0.02  # six seconds of answer
    start = len(h.tg.calls)
    update = h.tg.send_text(ALICE, "tell me a long story")
    draft = await h.tg.wait_for(  # past "Thinking…": the answer has begun
        lambda c: c.method == "sendMessageDraft" and bool(c.params.get("text")), timeout=10,
        start=start,
    )
    assert draft.params.get("can_stop") is True

    h.tg.enqueue({"update_id": 970_001, "stopped_message_generation": {
        "chat": {"id": ALICE, "type": "private", "first_name": "A"},
        "draft_id": draft.params["draft_id"],
    }})
    stopped = await h.reply_to(update, lambda m: "Stopped" in (m.text or ""), timeout=10)

    assert "word0" in (stopped.text or "") and "word299" not in (stopped.text or "")
    document = await h.agent.export_data(ALICE)
    (answer,) = [m for s in document["sessions"] for m in s["messages"] if m["role"] == "assistant"]
    assert answer["status"] == "partial" and answer["text"] in (stopped.text or "")
    assert 0 < (await h.agent.usage(ALICE)).used < full  # only what was used


async def test_in_a_group_only_the_asker_can_stop_the_answer(h: Harness) -> None:
    h.ai.chunk_delay = 0.03
    start = len(h.tg.calls)
    update = h.tg.send_text(ALICE, "@desktop_test_bot a long story please", chat_id=GROUP,
                            chat_type="group")
    preview = await h.tg.wait_for_message(
        GROUP, lambda m: bool(m.reply_markup) and "word" in (m.text or ""), timeout=10,
        after=update["message"]["message_id"],
    )
    (stop_button,) = [b["callback_data"] for row in preview.reply_markup["inline_keyboard"] for b in row]
    assert stop_button == f"stop:{update['message']['message_id']}"

    h.tg.press_button(BOB, preview.message_id, stop_button, chat_id=GROUP)
    refused = await h.tg.wait_for(lambda c: c.method == "answerCallbackQuery", start=start)
    assert "Only the person who asked" in str(refused.params.get("text"))
    await asyncio.sleep(0.3)
    assert "Stopped" not in (h.tg._bot_message(GROUP, preview.message_id).text or "")

    h.tg.press_button(ALICE, preview.message_id, stop_button, chat_id=GROUP)
    final = await h.tg.wait_for_message(
        GROUP, lambda m: "Stopped" in (m.text or ""), timeout=10, after=update["message"]["message_id"]
    )
    assert "word299" not in (final.text or "") and not final.reply_markup  # the button is gone


async def test_a_stop_reaches_the_process_streaming_the_answer() -> None:
    """Two processes of a fleet: the answer streams in one, the stop lands in the other."""
    redis = Redis.from_url("redis://127.0.0.1:6379/0")
    here, there = Stoppable(redis), Stoppable(redis)
    listening = asyncio.create_task(there.listen())
    try:
        await asyncio.sleep(0.2)  # subscribed
        with there.running(GROUP, ALICE, draft=11, question=22) as stop:
            assert not await here.stop(GROUP, "question", 22, BOB)  # not the asker: ignored
            await asyncio.sleep(0.2)
            assert not stop.is_set()
            assert not await here.stop(GROUP, "question", 22, ALICE)  # not streaming here...
            await asyncio.wait_for(stop.wait(), 2)  # ...but where it streams, it stops
        published = json.dumps({"chat": GROUP, "kind": "draft", "key": 11, "user": None})
        await redis.publish("desktop:stop", published)  # finished by now: nothing to stop
    finally:
        listening.cancel()
        await redis.aclose()
