"""The first sign of life comes before the model's first token: Telegram's "Thinking…" draft in a
private chat (with its stop control), "typing…" in a group; never after the answer has begun."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import handlers.chat
from tests.fakes.openai import FakeOpenAI
from tests.fakes.telegram import Call
from tests.harness import Harness, running_bot

ALICE, BOB, GROUP = 6001, 6002, -100666


@pytest.fixture
async def h(
    tmp_path: Path, db_url: str, sessions: async_sessionmaker[AsyncSession], prompts_dir: Path,
    fake_openai: FakeOpenAI,
) -> AsyncIterator[Harness]:
    async with running_bot(tmp_path, db_url, sessions, prompts_dir, fake_openai) as harness:
        yield harness


def to_chat(h: Harness, chat_id: int, start: int) -> list[Call]:
    return [c for c in h.tg.calls[start:] if c.params.get("chat_id") in (chat_id, str(chat_id))]


async def test_a_private_chat_sees_thinking_with_a_stop_control_before_the_first_token(
    h: Harness,
) -> None:
    h.ai.reply = "here is the answer"
    h.ai.first_token_delay = 1.0
    start = len(h.tg.calls)
    update = h.tg.send_text(ALICE, "a question that takes the model a while")
    await h.reply_to(update, lambda m: m.text == "here is the answer")

    calls = to_chat(h, ALICE, start)
    first = calls[0]
    assert first.method == "sendMessageDraft" and first.params.get("text", "") == ""
    assert first.params.get("can_stop") is True
    # It came while the model was still silent: before the request's first token was due.
    (request,) = [r for r in h.ai.requests if r.path.endswith("/chat/completions")]
    assert first.at < request.at + 1.0
    # One draft id for the whole answer: the content replaces "Thinking…".
    drafts = [c for c in calls if c.method == "sendMessageDraft"]
    assert {c.params["draft_id"] for c in drafts} == {first.params["draft_id"]}


async def test_a_group_sees_typing_before_the_preview(h: Harness) -> None:
    h.ai.reply = "group answer"
    h.ai.first_token_delay = 0.4  # before "typing…" would once have been sent (after 0.5 s)
    start = len(h.tg.calls)
    update = h.tg.send_text(BOB, "@desktop_test_bot a question", chat_id=GROUP, chat_type="group")
    await h.reply_to(update, lambda m: m.text == "group answer")

    calls = to_chat(h, GROUP, start)
    assert calls[0].method == "sendChatAction" and calls[0].params.get("action") == "typing"
    (request,) = [r for r in h.ai.requests if r.path.endswith("/chat/completions")]
    assert calls[0].at < request.at + 0.4
    assert not [c for c in calls if c.method == "sendMessageDraft"]  # drafts are private-only


async def test_stopping_while_thinking_stops_before_any_text(h: Harness) -> None:
    h.ai.reply = "an answer nobody will read"
    h.ai.first_token_delay = 3.0
    start = len(h.tg.calls)
    update = h.tg.send_text(ALICE, "never mind")
    thinking = await h.tg.wait_for(lambda c: c.method == "sendMessageDraft", start=start)
    h.tg.enqueue({"update_id": 980_001, "stopped_message_generation": {
        "chat": {"id": ALICE, "type": "private", "first_name": "A"},
        "draft_id": thinking.params["draft_id"],
    }})
    stopped = await h.reply_to(update, lambda m: "Stopped" in (m.text or ""), timeout=5)
    assert "before the answer began" in (stopped.text or "")
    assert not [m for m in h.tg.chat_messages(ALICE) if "nobody will read" in (m.text or "")]


async def test_no_thinking_draft_arrives_after_a_quick_answer(h: Harness) -> None:
    """A model that answers at once: the answer is not followed by a stale "Thinking…"."""
    h.ai.reply = "instant"
    for n in range(5):
        start = len(h.tg.calls)
        update = h.tg.send_text(ALICE, f"quick {n}")
        await h.reply_to(update, lambda m: m.text == "instant")
        calls = to_chat(h, ALICE, start)
        final = max(i for i, c in enumerate(calls) if c.method == "sendMessage")
        assert not [c for c in calls[final:] if c.method == "sendMessageDraft"]


async def test_a_long_wait_renews_typing_after_thinking(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tool or a consulted role can keep the model silent for long: after "Thinking…",
    "typing…" is renewed while the wait goes on (every 4 s; 0.5 s here)."""
    monkeypatch.setattr(handlers.chat, "TYPING_EVERY", 0.5)
    h.ai.reply, h.ai.first_token_delay = "slow", 1.2
    start = len(h.tg.calls)
    update = h.tg.send_text(BOB, "hello")
    await h.reply_to(update, lambda m: m.text == "slow")
    calls = to_chat(h, BOB, start)
    assert calls[0].method == "sendMessageDraft"  # "Thinking…" first
    assert [c for c in calls if c.method == "sendChatAction" and c.params.get("action") == "typing"]
