"""Bad input, access control, groups and Telegram failures: a clear answer, no crash, no charge."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.models import ChatSession, Message
from tests.harness import Harness

BOT_USERNAME = "desktop_test_bot"


@pytest.fixture
async def h(start_bot: Callable[..., Any]) -> AsyncIterator[Harness]:
    async with start_bot() as harness:
        yield harness


async def message_count(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with sessions() as db:
        return int(await db.scalar(select(func.count()).select_from(Message)) or 0)


async def test_users_off_the_allowlist_are_refused_politely(
    start_bot: Callable[..., Any], sessions: async_sessionmaker[AsyncSession]
) -> None:
    async with start_bot(allowed_user_ids=frozenset({1})) as h:
        update = h.tg.send_text(2, "let me in")
        reply = await h.reply_to(update)
        assert "private bot" in (reply.text or "") and "2" in (reply.text or "")
        allowed = h.tg.send_text(1, "hello")
        await h.reply_to(allowed, lambda m: "Answer" in (m.text or ""))
    assert len(h.ai.chat_requests) == 1
    async with sessions() as db:
        assert await db.scalar(select(func.count()).select_from(Message).where(Message.user_id == 2)) == 0


async def test_whitespace_and_oversized_text_get_clear_answers(
    start_bot: Callable[..., Any], sessions: async_sessionmaker[AsyncSession]
) -> None:
    async with start_bot(max_message_chars=50) as h:
        update = h.tg.send_text(3, "   \u200b ")
        assert "empty" in ((await h.reply_to(update)).text or "").lower()
        update = h.tg.send_text(3, "x" * 51)
        reply = await h.reply_to(update)
        assert "51" in (reply.text or "") and "50" in (reply.text or "")
    assert h.ai.chat_requests == []
    assert await message_count(sessions) == 0


async def test_forged_and_stale_buttons_do_nothing(
    h: Harness, sessions: async_sessionmaker[AsyncSession]
) -> None:
    h.ai.reply = "ok"
    await h.reply_to(h.tg.send_text(7, "my own session"), lambda m: m.text == "ok")
    other_session = h.tg.send_text(8, "another user's session")
    await h.reply_to(other_session, lambda m: m.text == "ok")
    async with sessions() as db:
        foreign = (await db.execute(select(ChatSession).where(ChatSession.user_id == 8))).scalar_one()
    base = {"from": {"id": 7, "is_bot": False, "first_name": "T"}, "chat_instance": "7"}
    message = {"message_id": 1, "date": 0, "chat": {"id": 7, "type": "private"}}
    for i, data in enumerate([f"so:{foreign.id}:0", "garbage!!", "del:yes:0", "role:../../etc"]):
        h.tg.enqueue({"update_id": 10_000 + i, "callback_query": {
            **base, "id": f"q{i}", "data": data, "message": message}})
    for i in range(4):
        call = await h.tg.wait_for(
            lambda c, i=i: c.method == "answerCallbackQuery" and c.params.get("callback_query_id") == f"q{i}"
        )
        assert "expired" in str(call.params.get("text", "")).lower()
    async with sessions() as db:  # "del:yes" with an ancient timestamp deleted nothing
        assert await db.scalar(select(func.count()).select_from(Message).where(Message.user_id == 7)) == 2


async def test_in_groups_only_mentions_and_replies_are_answered(h: Harness) -> None:
    h.ai.reply = "group answer"
    group = -100123
    chatter = h.tg.send_text(9, "just talking among humans", chat_id=group)
    mention = h.tg.send_text(9, f"@{BOT_USERNAME} what is 2+2?", chat_id=group)
    answer = await h.reply_to(mention, lambda m: m.text == "group answer")
    assert answer.reply_to_message_id == mention["message"]["message_id"]
    assert len(h.ai.chat_requests) == 1
    assert h.ai.chat_requests[0]["messages"][-1]["content"] == "what is 2+2?"
    assert h.tg.drafts(group) == []  # drafts are private-chat only: groups get edits
    follow_up = h.tg.send_text(9, "and 3+3?", chat_id=group, reply_to_message_id=answer.message_id)
    await h.reply_to(follow_up, lambda m: m.text == "group answer")
    assert len(h.ai.chat_requests) == 2
    assert chatter["message"]["message_id"] < mention["message"]["message_id"]

    export = h.tg.send_text(9, "/export_data", chat_id=group)
    refusal = await h.reply_to(export)
    assert "private chat" in (refusal.text or "")
    assert h.tg.calls_of("sendDocument") == []


async def test_unparseable_formatting_falls_back_to_plain_text(h: Harness) -> None:
    h.ai.reply = "Here is **bold** text."
    h.tg.fail_next(
        "sendMessage", error_code=400,
        description="Bad Request: can't parse entities: unsupported start tag",
        when=lambda p: bool(p.get("entities")) and "bold" in str(p.get("text")),
    )
    update = h.tg.send_text(11, "format please")
    reply = await h.reply_to(update, lambda m: "bold" in (m.text or ""))
    assert reply.parse_mode is None and reply.raw_text == "Here is bold text."
    assert reply.entities == []
    assert len([m for m in h.tg.chat_messages(11) if "bold" in (m.text or "")]) == 1


async def test_a_blocked_bot_is_not_retried(h: Harness) -> None:
    h.ai.reply = "nobody will read this"
    h.tg.fail_next("sendMessage", error_code=403, when=lambda p: "nobody" in str(p.get("text")))
    h.tg.send_text(12, "hi")
    await h.tg.wait_for(lambda c: c.method == "sendMessage" and c.failed)
    await asyncio.sleep(0.5)
    attempts = [c for c in h.tg.calls_of("sendMessage") if "nobody" in str(c.params.get("text"))]
    assert len(attempts) == 1


async def test_russian_users_get_russian_texts(h: Harness) -> None:
    update = h.tg.send_text(13, "/start", language_code="ru")
    greeting = await h.reply_to(update)
    assert "Привет" in (greeting.text or "") or "DESK TOP" in (greeting.text or "")
    assert any("\u0400" <= ch <= "\u04ff" for ch in greeting.text or "")
    ru_menu = h.tg.commands("ru", {"type": "all_private_chats"})
    assert ru_menu and any(c["command"] == "delete_my_data" for c in ru_menu)
    group_menu = h.tg.commands("", {"type": "default"})
    assert group_menu and all(c["command"] != "delete_my_data" for c in group_menu)


async def test_model_faults_get_distinct_honest_messages(h: Harness) -> None:
    h.ai.fail_next("insufficient_quota")
    quota = await h.reply_to(h.tg.send_text(14, "hi"), lambda m: "credit" in (m.text or ""))
    h.ai.fail_next("rate_limit", times=3)
    busy = await h.reply_to(h.tg.send_text(15, "hi"), lambda m: "overloaded" in (m.text or ""))
    assert quota.text != busy.text


async def test_custom_instructions_reach_the_prompt_and_can_be_cleared(h: Harness) -> None:
    update = h.tg.send_text(16, "/personalize")
    menu = await h.reply_to(update, lambda m: m.reply_markup is not None)
    h.tg.press_button(16, menu.message_id, "instr:edit")
    await h.tg.wait_for_message(
        16, lambda m: "instructions" in (m.text or "").lower() and m.message_id > menu.message_id
    )
    saved = h.tg.send_text(16, "Call me Captain. Answer in haiku.")
    await h.reply_to(saved, lambda m: "Saved" in (m.text or ""))
    await h.reply_to(h.tg.send_text(16, "hello"), lambda m: (m.text or "").startswith("Answer"))
    system = h.ai.last_system_prompt() or ""
    assert "Call me Captain. Answer in haiku." in system
    assert system.index("Captain") > system.index("preferences")  # framed as the user's wishes
    # the instruction text itself was never answered by the model
    assert all("Captain" not in body["messages"][-1]["content"] for body in h.ai.chat_requests)

    update = h.tg.send_text(16, "/personalize")
    menu = await h.reply_to(update, lambda m: m.reply_markup is not None and "Captain" in (m.text or ""))
    h.tg.press_button(16, menu.message_id, "instr:clear")
    await h.tg.wait_for(
        lambda c: c.method == "answerCallbackQuery" and "cleared" in str(c.params.get("text"))
    )
    await h.reply_to(h.tg.send_text(16, "again"), lambda m: (m.text or "").startswith("Answer #2"))
    assert "Captain" not in (h.ai.last_system_prompt() or "")


async def test_session_list_pages_and_opens_a_summary(h: Harness) -> None:
    h.ai.reply = lambda body: (
        "Title: Topic\\nSummary: We discussed topic number X.\\nFacts:\\n- likes topics"
        if body["model"] == "gpt-4o-mini" else "ok"
    )
    for i in range(6):
        await h.reply_to(
            h.tg.send_text(17, f"/start_session Topic {i}"), lambda m, i=i: f"Topic {i}" in (m.text or "")
        )
        await h.reply_to(h.tg.send_text(17, f"talk {i}"), lambda m: m.text == "ok")
    listing = await h.reply_to(
        h.tg.send_text(17, "/list_sessions"), lambda m: "page 1 of 2" in (m.text or "")
    )
    buttons = [b["callback_data"] for row in listing.reply_markup["inline_keyboard"] for b in row]
    assert "sp:1" in buttons and "Topic 5" in (listing.text or "") and "Topic 0" not in (listing.text or "")
    h.tg.press_button(17, listing.message_id, "sp:1")
    page2 = await h.tg.wait_for_message(
        17, lambda m: m.message_id == listing.message_id and "page 2 of 2" in (m.text or "")
    )
    opener = next(
        b for row in page2.reply_markup["inline_keyboard"] for b in row
        if b["callback_data"].startswith("so:")
    )
    h.tg.press_button(17, listing.message_id, opener["callback_data"])
    summary = await h.tg.wait_for_message(
        17, lambda m: m.message_id == listing.message_id and "We discussed" in (m.text or "")
    )
    assert "Topic 0" in (summary.text or "")
    assert "💬 2\n" in (summary.text or "")  # that session's question and answer, counted
