"""Export and delete walk every table that holds a user's rows, checked against the schema."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import BigInteger, Column, ForeignKey, MetaData, String, Table, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.data_rights import USER_TABLES, delete_user, export_user, uncovered_tables
from storage.models import Base, InboxUpdate, utcnow
from storage.repositories import Inbox, Reminders, Sessions, Users
from tests.seeding import ask, reserve


def test_every_table_naming_a_user_is_exported_and_deleted() -> None:
    assert uncovered_tables() == set()


def test_a_new_user_table_left_out_would_be_found() -> None:
    """The check above is not vacuous: a table added to the schema and not to USER_TABLES fails it."""
    metadata = MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(metadata)
    Table(
        "notes", metadata,
        Column("id", BigInteger, primary_key=True),
        Column("user_id", BigInteger, ForeignKey("users.id")),
        Column("text", String(100)),
    )
    Table("owned_by_fk", metadata, Column("id", BigInteger, primary_key=True),
          Column("owner", BigInteger, ForeignKey("users.id")))
    assert uncovered_tables(metadata) == {"notes", "owned_by_fk"}


async def _seed(sessions: async_sessionmaker[AsyncSession], user_id: int) -> None:
    """A row of the user in every table, through the repositories the bot uses."""
    now = utcnow()
    async with sessions() as db:
        await Users(db).ensure(user_id, "en")
        session = await Sessions(db).open(user_id, user_id, "coder", f"title {user_id}")
        await db.commit()
        question = await ask(db, user_id, f"question {user_id}", update_id=user_id * 10, tokens=3)
        assert question is not None
        await reserve(db, user_id, 50, 1_000, ttl_seconds=600, now=now)
        waiting = f'{{"text": "waiting {user_id}"}}'
        await Inbox(db).store_each([(user_id * 10 + 1, user_id, user_id, waiting)])
        await Reminders(db).add(
            user_id, user_id, f"reminder {user_id}", now + dt.timedelta(days=1), most_pending=5
        )
        await db.commit()
    from memory.base import MemoryItem
    from memory.local import LocalMemory
    from storage.models import Trace
    from storage.outbox import Outbox

    memory = LocalMemory(sessions, "test:3")
    await memory.add_many([MemoryItem(
        user_id=user_id, session_id=session.id, title="t", text=f"memory {user_id}", role="coder",
        started_at=now, ended_at=None, kind=kind, seq=seq,
    ) for kind, seq in (("summary", 0), ("fact", 1), ("exchange", 1))], [[0.1, 0.2, 0.3]] * 3)
    async with sessions() as db:
        await Outbox(db).enqueue(user_id=user_id, memory_id=f"{user_id}:9", payload="{}", error=None)
        db.add(Trace(
            id=f"trace-{user_id}", user_id=user_id, session_id=session.id, kind="turn",
            started_at=now, duration_ms=1.0, outcome="answered", nodes=[],
        ))
        await db.commit()


async def test_export_holds_a_row_of_every_kind_that_delete_removes(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await _seed(sessions, 41)
    await _seed(sessions, 42)
    async with sessions() as db:
        document = await export_user(db, 41)
    for spec in USER_TABLES:
        if spec.section == "user":
            assert document["user"]["telegram_id"] == 41
        elif spec.section == "messages":
            assert [m["text"] for s in document["sessions"] for m in s["messages"]] == ["question 41"]
        else:
            assert document[spec.section], f"the export has no {spec.section}"
    assert [u["update_id"] for u in document["telegram_updates"]] == [411]
    assert document["telegram_updates"][0]["update"] == '{"text": "waiting 41"}'
    assert [r["tokens"] for r in document["reservations"]] == [50]
    assert [r["text"] for r in document["reminders"]] == ["reminder 41"]
    assert "memory 42" not in str(document) and "waiting 42" not in str(document)

    async with sessions() as db:
        await delete_user(db, 41)
        await db.commit()
    async with sessions() as db:
        after = await export_user(db, 41)
        for spec in USER_TABLES:
            left = (await db.execute(select(spec.model).where(spec.owner == 41))).all()
            assert left == [], spec.table.name
        # the other user keeps everything
        kept = (await db.execute(select(InboxUpdate).where(InboxUpdate.user_id == 42))).all()
        assert kept
    assert after["user"] is None and after["sessions"] == []


async def test_a_deleted_users_rows_leave_no_trace_in_the_sqlite_file(tmp_path: Path) -> None:
    """secure_delete is set by the bot, so erasure does not hang on how SQLite was built."""
    from storage.db import create_engine, migrate, session_maker

    path = tmp_path / "erase.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    await migrate(engine)
    sessions = session_maker(engine)
    marker = "zz-erase-canary"  # the language column is not encrypted: findable if left behind
    async with sessions() as db:
        await Users(db).ensure(77, marker)
        await Users(db).ensure(78, "en")
        await db.commit()
    async with sessions() as db:
        await delete_user(db, 77)
        await db.commit()
    async with engine.connect() as conn:
        assert (await conn.exec_driver_sql("PRAGMA secure_delete")).scalar() == 1
        await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    await engine.dispose()
    assert marker.encode() not in path.read_bytes()
