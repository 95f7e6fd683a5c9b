"""End to end: the real aiogram client polling the fake Telegram, the real OpenAI client on the fake."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from handlers.formatting import utf16_len
from storage import crypto
from storage.models import ENCRYPTED_COLUMNS, Base
from tests.fakes.openai import FakeOpenAI
from tests.harness import Harness, running_bot
from tests.telegram_html import check_entities

SUMMARY = (
    "Title: Reversing lists\nSummary: The user asked how to reverse a list in Python.\n"
    "Facts:\n- The user writes Python\nOpen questions:\n"
)


@pytest.fixture
async def harness(
    tmp_path: Path, db_url: str, sessions: async_sessionmaker[AsyncSession], prompts_dir: Path,
    fake_openai: FakeOpenAI,
) -> AsyncIterator[Harness]:
    async with running_bot(tmp_path, db_url, sessions, prompts_dir, fake_openai) as h:
        yield h


def reply_by_model(body: dict) -> str:
    return SUMMARY if body["model"] == "gpt-4o-mini" else "Use `reversed(items)` or `items[::-1]`."


async def user_says(h: Harness, user_id: int, words: str, **kwargs: object) -> dict:
    return h.tg.send_text(user_id, words, **kwargs)


async def next_reply(h: Harness, chat_id: int, update: dict, predicate=None, timeout: float = 10.0):
    return await h.tg.wait_for_message(
        chat_id, predicate, timeout=timeout, after=update["message"]["message_id"]
    )


async def scan_for(engine: AsyncEngine, user_id: int, canaries: list[str]) -> list[str]:
    """Every table: rows tied to the user, and any decrypted value holding a canary."""
    found = []
    async with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            for column in ("user_id", "id"):
                if column in table.c and (column == "user_id" or table.name == "users"):
                    count = await conn.scalar(
                        text(f"SELECT count(*) FROM {table.name} WHERE {column} = :u"), {"u": user_id}
                    )
                    if count:
                        found.append(f"{table.name}: {count} rows")
        cipher = crypto.current()
        for model, column in ENCRYPTED_COLUMNS:
            rows = await conn.execute(text(f"SELECT {column} FROM {model.__tablename__}"))
            for (value,) in rows:
                if value is None:
                    continue
                plain = cipher.decrypt_bytes(bytes(value)).decode("utf-8", "replace")
                found += [f"{model.__tablename__}.{column}: {c}" for c in canaries if c in plain]
    return found


async def test_whole_conversation(harness: Harness, engine: AsyncEngine) -> None:
    h = harness
    h.ai.reply = reply_by_model
    alice, bob = 1001, 2002

    # another user, whose data must survive Alice's deletion
    update = await user_says(h, bob, "bob-canary: hello")
    await next_reply(h, bob, update, lambda m: "reversed" in (m.text or ""))

    update = await user_says(h, alice, "/start")
    greeting = await next_reply(h, alice, update)
    assert "DESK TOP" in (greeting.text or "")
    assert h.tg.commands("ru", {"type": "all_private_chats"}) is not None

    update = await user_says(h, alice, "/personalize")
    menu = await next_reply(h, alice, update, lambda m: m.reply_markup is not None)
    h.tg.press_button(alice, menu.message_id, "role:coder")
    await h.tg.wait_for_message(alice, lambda m: m.message_id == menu.message_id and m.edited > 0)

    update = await user_says(h, alice, "alice-canary: how do I reverse a list in Python?")
    await next_reply(h, alice, update, lambda m: "items[::-1]" in (m.text or ""))
    assert h.tg.drafts(alice), "the answer streams as drafts first"
    coder = h.agent.services.roles.get("coder")
    assert coder is not None and coder.system_prompt.strip()[:100] in (h.ai.last_system_prompt() or "")

    update = await user_says(h, alice, "/end_session")
    ended = await next_reply(h, alice, update)
    assert "The user writes Python" in (ended.text or "")

    update = await user_says(h, alice, "/start_session Second round")
    await next_reply(h, alice, update, lambda m: "Second round" in (m.text or ""))
    update = await user_says(h, alice, "alice-canary-2: and reversing in Python a dict?")
    await next_reply(h, alice, update, lambda m: "items[::-1]" in (m.text or ""))
    assert "The user writes Python" in (h.ai.last_system_prompt() or "").split("<memory>", 1)[1]

    update = await user_says(h, alice, "/list_sessions")
    listing = await next_reply(h, alice, update, lambda m: "Reversing lists" in (m.text or ""))
    assert "Second round" in (listing.text or "")

    update = await user_says(h, alice, "/export_data")
    exported = await next_reply(h, alice, update, lambda m: m.document_bytes is not None)
    document = json.loads(exported.document_bytes or b"")
    texts = [m["text"] for s in document["sessions"] for m in s["messages"]]
    assert len(document["sessions"]) == 2 and len(texts) == 4
    assert any("alice-canary:" in t for t in texts) and any("alice-canary-2" in t for t in texts)
    assert "bob-canary" not in json.dumps(document)

    update = await user_says(h, alice, "/delete_my_data")
    confirm = await next_reply(h, alice, update, lambda m: m.reply_markup is not None)
    yes = next(b["callback_data"] for row in confirm.reply_markup["inline_keyboard"] for b in row
               if b["callback_data"].startswith("del:yes"))
    h.tg.press_button(alice, confirm.message_id, yes)
    await h.tg.wait_for_message(
        alice, lambda m: m.message_id == confirm.message_id and "4" in (m.text or "") and m.edited > 0
    )

    assert await scan_for(engine, alice, ["alice-canary"]) == []
    assert await scan_for(engine, bob, []) != []  # Bob's rows are all still there
    assert any("bob-canary" in f for f in await scan_for(engine, bob, ["bob-canary"]))


async def test_long_answer_arrives_in_balanced_parts(harness: Harness, prompts_dir: Path) -> None:
    h = harness
    role_file = prompts_dir / "personal_assistant.md"
    role_file.write_text(re.sub(r"max_output_tokens: \d+", "max_output_tokens: 8000", role_file.read_text()))
    code = "\n".join(f"    total += compute_value(item_{i}, factor={i})  # step {i}" for i in range(60))
    prose = " ".join(f"Sentence number {i} explains the **approach** in detail." for i in range(90))
    closing = " ".join(f"Closing remark {i} with _emphasis_." for i in range(90))
    h.ai.reply = f"{prose}\n\n```python\ndef run():\n{code}\n```\n\n{closing}"
    assert len(h.ai.reply) > 9000
    update = await user_says(h, 3003, "write me a long answer")
    await next_reply(h, 3003, update, lambda m: "Closing remark 89" in (m.text or ""), timeout=15)
    parts = [m for m in h.tg.chat_messages(3003) if m.message_id > update["message"]["message_id"]]
    parts = [m for m in parts if "auto" not in (m.raw_text or "") and "🟢" not in (m.raw_text or "")]
    assert len(parts) >= 3
    for part in parts:
        assert part.parse_mode is None  # entities, never markup to parse
        assert utf16_len(part.text or "") <= 4096
        check_entities(part.text or "", part.entities)
    visible = "".join(p.text or "" for p in parts)
    assert "compute_value(item_59, factor=59)" in visible and "Sentence number 0 " in visible
    code_parts = [p for p in parts if "compute_value" in (p.text or "")]
    assert all(any(e["type"] == "pre" and e.get("language") == "python" for e in p.entities)
               for p in code_parts)  # fmt: skip


async def test_flood_control_is_waited_out_and_the_answer_arrives_once(harness: Harness) -> None:
    h = harness
    h.ai.reply = "The one and only answer."
    h.tg.fail_next(
        "sendMessage", error_code=429, retry_after=1, when=lambda p: "only answer" in str(p.get("text"))
    )
    update = await user_says(h, 4004, "hello")
    await next_reply(h, 4004, update, lambda m: "only answer" in (m.text or ""), timeout=10)
    await asyncio.sleep(1.2)
    answers = [m for m in h.tg.chat_messages(4004) if "only answer" in (m.text or "")]
    assert len(answers) == 1
    failed = [c for c in h.tg.calls_of("sendMessage") if c.failed]
    retried = [
        c for c in h.tg.calls_of("sendMessage")
        if "only answer" in str(c.params.get("text")) and not c.failed
    ]
    assert len(failed) == 1 and len(retried) == 1
    assert retried[0].at - failed[0].at >= 1.0  # waited the whole retry_after


async def test_unsupported_message_costs_nothing(harness: Harness) -> None:
    h = harness
    update = h.tg.send_sticker(5005)
    reply = await next_reply(h, 5005, update)
    assert "text" in (reply.text or "").lower()
    update = h.tg.send_voice(5005)
    await next_reply(h, 5005, update)
    assert h.ai.chat_requests == [] and h.ai.embedding_requests == []
