"""Storage on SQLite and PostgreSQL: schema, repositories, encryption at rest, rotation."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import subprocess
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from storage import crypto, turns
from storage.core import TurnRecord
from storage.data_rights import delete_user, export_user
from storage.repositories import Budget, Inbox, Messages, OverBudget, Reserved, Sessions, Users
from storage.rotation import rotate_all
from tests.seeding import answer, ask, reserve

CANARY = "canary-7f3a the launch code is tangerine"


async def _seed_conversation(sessions: async_sessionmaker[AsyncSession], user_id: int) -> int:
    async with sessions() as db:
        await Users(db).ensure(user_id, "en")
        chat = await Sessions(db).open(user_id, user_id, "coder", title=f"{CANARY} title")
        await db.commit()
        question = await ask(db, user_id, CANARY, update_id=user_id * 10)
        assert question is not None
        await answer(db, question, user_id, f"answer to {CANARY}")
        return chat.id


async def test_user_created_once_with_bigint_id(sessions: async_sessionmaker[AsyncSession]) -> None:
    big_id = 2**52 + 7  # Telegram ids can exceed 32 bits
    async with sessions() as db:
        first = await Users(db).ensure(big_id, "ru")
        second = await Users(db).ensure(big_id, "en")
        await db.commit()
    assert first.id == second.id == big_id
    assert second.language == "ru"  # the first contact's language is kept


async def test_one_open_session_per_chat_even_when_racing(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as db:
        await Users(db).ensure(1, "en")
        await db.commit()

    async def open_one() -> int:
        async with sessions() as db:
            chat = await Sessions(db).open(1, 1, "coder", None)
            await db.commit()
            return chat.id

    ids = await asyncio.gather(*(open_one() for _ in range(5)), return_exceptions=True)
    opened = {i for i in ids if isinstance(i, int)}
    assert len(opened) == 1, ids


async def test_redelivered_update_is_not_stored_twice(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await _seed_conversation(sessions, 5)
    async with sessions() as db:
        chat = await Sessions(db).open_for(5, 5)
        assert chat is not None
        assert await ask(db, 5, "dup", update_id=50) is None
        assert len(await Messages(db).for_session(chat.id)) == 2


async def test_inbox_is_first_wins_and_forgets_the_text(
    sessions: async_sessionmaker[AsyncSession], engine: AsyncEngine
) -> None:
    async with sessions() as db:
        assert await Inbox(db).store_each([(2**40, 1, 1, f'{{"text": "{CANARY}"}}')]) == [True]
        assert await Inbox(db).store_each([(2**40, 1, 1, "again")]) == [False]
        assert await Inbox(db).store_each([(17, 1, 1, "{}")]) == [True]  # a lower, reseeded id is still new
        await db.commit()
        assert [u.update_id for u in await Inbox(db).unprocessed()] == [2**40, 17]
        assert CANARY in ((await Inbox(db).unprocessed())[0].payload or "")
    async with engine.connect() as conn:
        raw = (await conn.execute(text("SELECT payload FROM inbox"))).all()
    assert b"tangerine" not in b"".join(bytes(r[0]) for r in raw)
    async with sessions() as db:
        await Inbox(db).mark_done(2**40)
        await db.commit()
        assert [u.update_id for u in await Inbox(db).unprocessed()] == [17]
        assert await Inbox(db).store_each([(2**40, 1, 1, "redelivered")]) == [False]


async def test_message_text_is_not_stored_in_plain_form(
    sessions: async_sessionmaker[AsyncSession], engine: AsyncEngine
) -> None:
    await _seed_conversation(sessions, 7)
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT text FROM messages"))).all()
        titles = (await conn.execute(text("SELECT title FROM chat_sessions"))).all()
    raw = b"".join(bytes(r[0]) for r in rows + titles)
    assert rows and CANARY.encode() not in raw
    assert b"tangerine" not in raw
    async with sessions() as db:
        chat = await Sessions(db).open_for(7, 7)
        assert chat is not None and chat.title == f"{CANARY} title"
        texts = [m.text for m in await Messages(db).for_session(chat.id)]
    assert texts == [CANARY, f"answer to {CANARY}"]


@pytest.mark.postgres
async def test_pg_dump_holds_no_plaintext(pg_url: str, cipher: crypto.Cipher) -> None:
    from storage.db import create_engine, session_maker

    if shutil.which("pg_dump") is None:
        pytest.fail("pg_dump is not installed")
    engine = create_engine(pg_url)
    try:
        await _seed_conversation(session_maker(engine), 11)
    finally:
        await engine.dispose()
    dbname = pg_url.rsplit("/", 1)[1]
    dump = subprocess.run(
        ["pg_dump", "-h", "127.0.0.1", "-U", "postgres", "--data-only", dbname],
        capture_output=True, check=True, env={**os.environ, "PGCONNECT_TIMEOUT": "5"},
    ).stdout
    assert b"INSERT" in dump or b"COPY" in dump
    assert b"tangerine" not in dump


async def test_wrong_key_fails_loudly(sessions: async_sessionmaker[AsyncSession]) -> None:
    await _seed_conversation(sessions, 9)
    crypto.configure(crypto.Cipher([Fernet.generate_key().decode()]))
    with pytest.raises(crypto.DecryptionError):
        async with sessions() as db:
            await Sessions(db).open_for(9, 9)


async def test_rotation_keeps_everything_readable(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    old_key = Fernet.generate_key().decode()
    new_key = Fernet.generate_key().decode()
    crypto.configure(crypto.Cipher([old_key]))
    chat_id = await _seed_conversation(sessions, 21)
    async with sessions() as db:
        await Users(db).set_instructions(21, f"call me {CANARY}")
        await db.commit()

    crypto.configure(crypto.Cipher([new_key, old_key]))
    async with sessions() as db:  # both keys: old rows still read
        assert next(m.text for m in await Messages(db).for_session(chat_id)) == CANARY
    rewritten = await rotate_all(sessions)
    assert rewritten["messages.text"] == 2
    assert rewritten["users.instructions"] == 1
    assert await rotate_all(sessions) == {k: 0 for k in rewritten}  # idempotent

    crypto.configure(crypto.Cipher([new_key]))  # old key removed
    async with sessions() as db:
        assert [m.text for m in await Messages(db).for_session(chat_id)] == [
            CANARY, f"answer to {CANARY}"
        ]
        user = await Users(db).get(21)
        assert user is not None and user.instructions == f"call me {CANARY}"
        chat = await Sessions(db).get(21, chat_id)
        assert chat is not None and chat.title == f"{CANARY} title"


async def test_budget_reservations_never_exceed_limit_under_concurrency(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as db:
        await Users(db).ensure(3, "en")
        await db.commit()

    async def one() -> Reserved | OverBudget:
        async with sessions() as db:
            return await reserve(db, 3, 300, 1000, ttl_seconds=60)

    outcomes = await asyncio.gather(*(one() for _ in range(12)))
    admitted = [o for o in outcomes if isinstance(o, Reserved)]
    assert len(admitted) == 3
    async with sessions() as db:
        day = await Budget(db).day(3)
        assert day is not None and day.used + day.reserved == 900

        # settle: the real usage replaces the reservation; a second settle charges nothing
        assert await Budget(db).settle(admitted[0].id, 120) == 120
        assert await Budget(db).settle(admitted[0].id, 120) is None
        # usage never arrived: the whole reservation is charged
        assert await Budget(db).settle(admitted[1].id, None) == 300
        await db.commit()
        day = await Budget(db).day(3)
        assert day is not None and (day.used, day.reserved) == (420, 300)


async def test_expired_reservations_are_found(sessions: async_sessionmaker[AsyncSession]) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    async with sessions() as db:
        await Users(db).ensure(4, "en")
        outcome = await reserve(db, 4, 10, 100, ttl_seconds=60, now=past)
        await db.commit()
        assert isinstance(outcome, Reserved)
        assert await Budget(db).expired() == [outcome.id]


async def test_export_and_delete_cover_one_user_only(
    sessions: async_sessionmaker[AsyncSession], engine: AsyncEngine
) -> None:
    await _seed_conversation(sessions, 31)
    await _seed_conversation(sessions, 32)
    async with sessions() as db:
        exported = await export_user(db, 31)
    assert exported["version"] == 1
    texts = [m["text"] for s in exported["sessions"] for m in s["messages"]]
    assert texts == [CANARY, f"answer to {CANARY}"]
    assert all(s["chat_id"] == 31 for s in exported["sessions"])

    async with sessions() as db:
        receipt = await delete_user(db, 31)
        await db.commit()
    assert (receipt.messages, receipt.sessions) == (2, 1)
    async with engine.connect() as conn:
        for table in ("users", "chat_sessions", "messages", "usage_days", "memories"):
            column = "id" if table == "users" else "user_id"
            left = await conn.scalar(text(f"SELECT count(*) FROM {table} WHERE {column} = 31"))
            assert left == 0, table
        assert await conn.scalar(text("SELECT count(*) FROM messages WHERE user_id = 32")) == 2


@pytest.mark.postgres
async def test_a_pooled_connection_killed_while_idle_is_replaced_not_raised(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a PostgreSQL restart does to the pool; storage/db.py pings connections that sat idle."""
    from storage import db

    monkeypatch.setattr(db, "PING_IF_IDLE_SECONDS", 0.05)
    engine = db.create_engine(pg_url)
    try:
        async with engine.connect() as conn:  # back to the pool when the block ends
            pooled_pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar()
        killer = db.create_engine(pg_url)
        try:
            async with killer.connect() as conn:
                await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pooled_pid})
        finally:
            await killer.dispose()
        await asyncio.sleep(0.2)  # idle for longer than the threshold
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT pg_backend_pid()"))).scalar() != pooled_pid
    finally:
        await engine.dispose()


def _question(user_id: int, update_id: int | None, text: str) -> turns.NewQuestion:
    return turns.NewQuestion(user_id=user_id, chat_id=user_id, text=text, update_id=update_id,
                             tokens=3, language="en", history_limit=4)


async def _answer(sessions: async_sessionmaker[AsyncSession], stored: turns.StoredQuestion,
                  user_id: int, update_id: int, text: str) -> None:
    async with sessions() as db:
        outcome, _ = await turns.reserve(
            db, turns.BudgetAsk(user_id, stored.question_id, 10_000, 60), lambda left: (100, 50)
        )
        assert isinstance(outcome, Reserved)
    async with sessions() as db:
        assert await turns.persist(db, TurnRecord(
            user_id=user_id, chat_id=user_id, session_id=stored.session_id,
            question_id=stored.question_id, reservation_id=outcome.id,
            charged=40, text=text, complete=True, prompt_tokens=30, completion_tokens=10,
        ))


async def test_the_message_path_stores_a_conversation_and_reads_its_history(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """storage/turns.py, which on PostgreSQL runs each step as one statement without a
    transaction: the same rows, history and ledger as step by step."""
    def store(update_id: int | None, text: str) -> Any:
        async def run() -> turns.StoredQuestion | None:
            async with sessions() as db:
                return await turns.store_question(db, _question(5, update_id, text), lambda r: "coder")
        return run()

    first = await store(501, "first question")
    assert first is not None and first.started and first.history == []
    await _answer(sessions, first, 5, 501, "first answer")
    second = await store(502, "second question")
    assert second is not None and not second.started and second.session_id == first.session_id
    assert [(h.role, h.text) for h in second.history] == [
        ("user", "first question"), ("assistant", "first answer")
    ]
    assert await store(502, "second question") is None  # a redelivery: nothing written
    await _answer(sessions, second, 5, 502, "second answer")
    third = await store(503, "third question")
    assert third is not None
    assert [h.text for h in third.history] == [  # the latest 4, oldest first, not itself
        "first question", "first answer", "second question", "second answer"
    ][-4:]
    console = [await store(None, "typed in the console") for _ in range(2)]  # no update id
    assert all(c is not None for c in console) and console[0].question_id != console[1].question_id
    async with sessions() as db:
        rows = [(m.text, m.status) for m in await Messages(db).for_session(first.session_id)]
        day = await Budget(db).day(5)
    assert rows == [
        ("first question", "answered"), ("first answer", "complete"),
        ("second question", "answered"), ("second answer", "complete"),
        ("third question", "pending"), ("typed in the console", "pending"),
        ("typed in the console", "pending"),
    ]
    assert day is not None and (day.used, day.reserved) == (80, 0)

