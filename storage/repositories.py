"""Repositories: the only place that speaks SQL; handlers and graph nodes call these."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import Connection, delete, func, insert, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from storage import core
from storage.core import OverBudget, Reserved
from storage.models import (
    ChatSession,
    InboxUpdate,
    MemoryRecord,
    Message,
    Reminder,
    Reservation,
    Trace,
    UsageDay,
    User,
    utcnow,
)

__all__ = ["Budget", "Inbox", "Memories", "Messages", "OverBudget", "Reminders", "Reserved",
           "Sessions", "Traces", "Users", "next_reset", "utc_day"]

T = TypeVar("T")


async def ping(db: AsyncSession) -> None:
    """One round trip to the database (the readiness probe); raises when it cannot answer."""
    await db.execute(text("SELECT 1"))


def utc_day(now: dt.datetime | None = None) -> dt.date:
    return core.utc_day(now or utcnow())


def next_reset(now: dt.datetime | None = None) -> dt.datetime:
    return core.next_reset(now or utcnow())


async def _on_connection(db: AsyncSession, work: Callable[[Connection], T]) -> T:
    """Run storage/core.py statements on the session's connection, in its transaction."""
    def run(session: Session) -> T:
        return work(session.connection())

    return await db.run_sync(run)


class Users:
    def __init__(self, db: AsyncSession) -> None:
        self.db = db

    async def get(self, user_id: int) -> User | None:
        return await self.db.get(User, user_id)

    async def ensure(self, user_id: int, language: str | None) -> User:
        """The user's row, created race-free on first contact (one SELECT once it exists)."""
        user = await self.db.get(User, user_id)
        if user is not None:
            return user
        await _on_connection(self.db, lambda c: core.ensure_user(c, user_id, language, utcnow()))
        user = await self.db.get(User, user_id, populate_existing=True)
        assert user is not None
        return user

    async def set_role(self, user_id: int, role: str) -> None:
        await self.db.execute(update(User).where(User.id == user_id).values(role=role))

    async def set_private_data_in_groups(self, user_id: int, allowed: bool) -> None:
        await self.db.execute(
            update(User).where(User.id == user_id).values(private_data_in_groups=allowed)
        )

    async def set_timezone(self, user_id: int, timezone: str | None) -> None:
        await self.db.execute(update(User).where(User.id == user_id).values(timezone=timezone))

    async def set_instructions(self, user_id: int, instructions: str | None) -> None:
        await self.db.execute(
            update(User).where(User.id == user_id).values(instructions=instructions)
        )

    async def set_memory_per_role(self, user_id: int, per_role: bool) -> None:
        await self.db.execute(update(User).where(User.id == user_id).values(memory_per_role=per_role))

    async def daily_limit(self, user_id: int) -> int | None:
        """The user's own limit (an operator's choice); None: the deployment's."""
        return await self.db.scalar(select(User.daily_limit).where(User.id == user_id))

    async def set_daily_limit(self, user_id: int, limit: int | None) -> bool:
        """False: no such user."""
        result = await self.db.execute(
            update(User).where(User.id == user_id).values(daily_limit=limit)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def claim_warning(self, user_id: int, day: dt.date) -> bool:
        """True once per day: the caller warns the user that most of the allowance is used."""
        result = await self.db.execute(
            update(User)
            .where(User.id == user_id, or_(User.warned_on.is_(None), User.warned_on != day))
            .values(warned_on=day)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]



# A session whose memory may still be made: open, or closed and waiting for its summary.
SUMMARISABLE = ("open", "summary_due")


class Sessions:
    def __init__(self, db: AsyncSession) -> None:
        self.db = db

    async def open_for(self, user_id: int, chat_id: int) -> ChatSession | None:
        stmt = select(ChatSession).where(
            ChatSession.user_id == user_id,
            ChatSession.chat_id == chat_id,
            ChatSession.status == "open",
        )
        return (await self.db.execute(stmt)).scalar_one_or_none()

    async def get(self, user_id: int, session_id: int) -> ChatSession | None:
        """A session by id, only if it is this user's: ids from buttons are not trusted."""
        stmt = select(ChatSession).where(
            ChatSession.id == session_id, ChatSession.user_id == user_id
        )
        return (await self.db.execute(stmt)).scalar_one_or_none()

    async def open(
        self, user_id: int, chat_id: int, role: str, title: str | None, incognito: bool = False
    ) -> ChatSession:
        """Start a session; when another update opened one first, that one is returned."""
        row = await _on_connection(
            self.db,
            lambda c: core.open_session(c, user_id, chat_id, role, utcnow(), title, incognito),
        )
        session = await self.db.get(ChatSession, row.id)
        assert session is not None
        return session

    async def forget(self, session_id: int) -> None:
        """An incognito session at its end: the session and its messages (which hold no text)
        are deleted; the day's ledger keeps what it cost."""
        await self.db.execute(delete(Message).where(Message.session_id == session_id))
        await self.db.execute(delete(ChatSession).where(ChatSession.id == session_id))

    async def set_summary(self, session_id: int, summary: str | None) -> None:
        await self.db.execute(
            update(ChatSession).where(ChatSession.id == session_id).values(summary=summary)
        )

    async def set_role(self, session_id: int, role: str) -> None:
        await self.db.execute(
            update(ChatSession).where(ChatSession.id == session_id).values(role=role)
        )

    async def close(
        self, session_id: int, *, summary: str | None, reason: str, title: str | None = None,
        due_at: dt.datetime | None = None,
    ) -> bool:
        """Close a session (open, or waiting for its summary); with `due_at` its memory is still
        to be made from then on. False when someone else closed (or deleted) it first."""
        values: dict[str, Any] = {
            "status": "closed" if due_at is None else "summary_due", "summary": summary,
            "summary_due_at": due_at, "summary_attempts": ChatSession.summary_attempts + 1,
        }
        if title is not None:
            values["title"] = title
        result = await self.db.execute(
            update(ChatSession)
            .where(ChatSession.id == session_id, ChatSession.status.in_(SUMMARISABLE))
            .values(**values)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            # The session ended when the user (or the idle timer) ended it, not at a retry.
            await self.db.execute(
                update(ChatSession)
                .where(ChatSession.id == session_id, ChatSession.ended_at.is_(None))
                .values(ended_at=utcnow(), end_reason=reason)
            )
            return True
        return False

    async def reopen(self, session_id: int) -> bool:
        """A closed session open again (resumed); False when it is not closed. The chat's other
        open session must be closed first (one open session per chat: uq_open_session)."""
        result = await self.db.execute(
            update(ChatSession)
            .where(ChatSession.id == session_id, ChatSession.status == "closed")
            .values(status="open", ended_at=None, end_reason=None, summary_attempts=0,
                    last_activity_at=utcnow())
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def summaries_due(self, now: dt.datetime, limit: int = 50) -> list[ChatSession]:
        stmt = (
            select(ChatSession)
            .where(ChatSession.status == "summary_due", ChatSession.summary_due_at <= now)
            .order_by(ChatSession.summary_due_at)
            .limit(limit)
        )
        return list((await self.db.execute(stmt)).scalars())

    async def list_for(self, user_id: int, offset: int, limit: int) -> tuple[list[ChatSession], int]:
        total = await self.db.scalar(
            select(func.count()).select_from(ChatSession).where(ChatSession.user_id == user_id)
        )
        stmt = (
            select(ChatSession)
            .where(ChatSession.user_id == user_id)
            .order_by(ChatSession.started_at.desc(), ChatSession.id.desc())
            .offset(offset)
            .limit(limit)
        )
        return list((await self.db.execute(stmt)).scalars()), int(total or 0)

    async def idle_since(self, cutoff: dt.datetime, limit: int = 100) -> list[ChatSession]:
        stmt = (
            select(ChatSession)
            .where(ChatSession.status == "open", ChatSession.last_activity_at < cutoff)
            .order_by(ChatSession.last_activity_at)
            .limit(limit)
        )
        return list((await self.db.execute(stmt)).scalars())


class Messages:
    def __init__(self, db: AsyncSession) -> None:
        self.db = db

    async def memories_used(self, user_id: int, question_id: int) -> list[str]:
        """The memory ids the user's answer to this question drew on."""
        stored = await self.db.scalar(select(Message.memory_ids).where(
            Message.reply_to == question_id, Message.user_id == user_id,
            Message.role == "assistant",
        ))
        return list(json.loads(stored)) if stored else []

    async def answer_to(self, question_id: int) -> Message | None:
        stmt = select(Message).where(Message.reply_to == question_id, Message.role == "assistant")
        return (await self.db.execute(stmt.order_by(Message.id).limit(1))).scalar_one_or_none()

    async def by_update_id(self, update_id: int) -> Message | None:
        stmt = select(Message).where(Message.update_id == update_id)
        return (await self.db.execute(stmt)).scalar_one_or_none()


    async def history(self, session_id: int, limit: int, before_id: int) -> list[core.HistoryEntry]:
        """The latest answered exchanges of a session before a message, oldest first."""
        return await _on_connection(self.db, lambda c: core.history(c, session_id, limit, before_id))

    async def for_session(self, session_id: int) -> list[Message]:
        stmt = select(Message).where(Message.session_id == session_id).order_by(Message.id)
        return list((await self.db.execute(stmt)).scalars())

    async def count_for_session(self, session_id: int) -> int:
        return int(await self.db.scalar(
            select(func.count()).select_from(Message).where(Message.session_id == session_id)
        ) or 0)

    async def purge_closed_before(self, cutoff: dt.datetime, sessions: int) -> int | None:
        """Delete the messages of up to `sessions` sessions closed before `cutoff`: how many
        messages went, or None when no such session has any left."""
        batch = list((await self.db.execute(
            select(Message.session_id)
            .join(ChatSession, ChatSession.id == Message.session_id)
            .where(ChatSession.status == "closed", ChatSession.ended_at < cutoff)
            .distinct()
            .limit(sessions)
        )).scalars())
        if not batch:
            return None
        result = await self.db.execute(delete(Message).where(Message.session_id.in_(batch)))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


class Budget:
    """The daily ledger: reserve atomically before a call, settle with the real usage after."""

    def __init__(self, db: AsyncSession) -> None:
        self.db = db

    async def reserve(
        self, user_id: int, amount: int, limit: int, *, ttl_seconds: int
    ) -> Reserved | OverBudget:
        """Admit `amount` tokens or refuse (storage/core.py reserve): calls outside a message's
        turn (summaries); a message reserves in its own transaction (storage/turns.py)."""
        return await _on_connection(self.db, lambda c: core.reserve(
            c, user_id, amount, limit, ttl_seconds=ttl_seconds, now=utcnow()
        ))

    async def settle(self, reservation_id: str, actual: int | None) -> int | None:
        """Replace a reservation by the real usage; idempotent (storage/core.py settle)."""
        return await _on_connection(self.db, lambda c: core.settle(c, reservation_id, actual))

    async def charge_if_room(
        self, user_id: int, tokens: int, limit: int, *, keep: int, now: dt.datetime | None = None
    ) -> bool:
        """Charge now if `keep` more tokens still fit today after these (storage/core.py)."""
        return await _on_connection(self.db, lambda c: core.charge_if_room(
            c, user_id, tokens, limit, keep=keep, now=now or utcnow()
        ))

    async def expired(self, now: dt.datetime | None = None) -> list[str]:
        stmt = select(Reservation.id).where(Reservation.expires_at < (now or utcnow()))
        return list((await self.db.execute(stmt)).scalars())

    async def all_ids(self) -> list[str]:
        return list((await self.db.execute(select(Reservation.id))).scalars())

    async def today_for_everyone(
        self, now: dt.datetime | None = None
    ) -> list[tuple[int, int, int, int | None]]:
        """(user, used, reserved, own limit) of every user with a ledger today, most used first."""
        stmt = (
            select(UsageDay.user_id, UsageDay.used, UsageDay.reserved, User.daily_limit)
            .join(User, User.id == UsageDay.user_id)
            .where(UsageDay.day == utc_day(now))
            .order_by((UsageDay.used + UsageDay.reserved).desc())
        )
        return [tuple(row) for row in await self.db.execute(stmt)]  # type: ignore[misc]

    async def day(self, user_id: int, now: dt.datetime | None = None) -> UsageDay | None:
        # Fresh from the database: the ledger is written with Core statements (storage/core.py),
        # which do not refresh a row this session may have loaded before.
        return await self.db.get(UsageDay, (user_id, utc_day(now)), populate_existing=True)


class IndexRow(NamedTuple):
    id: str
    chat_id: int | None
    text: str
    embedding: bytes | None
    space: str | None
    started_at: dt.datetime | None
    role: str | None


class Memories:
    """Long-term memory units as rows: where every backend keeps them (memory/local.py)."""

    def __init__(self, db: AsyncSession) -> None:
        self.db = db

    async def upsert(self, record: MemoryRecord) -> None:
        await self.db.merge(record)

    async def for_user(self, user_id: int) -> Sequence[MemoryRecord]:
        stmt = select(MemoryRecord).where(MemoryRecord.user_id == user_id).order_by(
            MemoryRecord.created_at
        )
        return (await self.db.execute(stmt)).scalars().all()

    async def by_ids(self, user_id: int, ids: Sequence[str]) -> list[MemoryRecord]:
        if not ids:
            return []
        # By primary key alone: with user_id in the WHERE, SQLite walks the user index and
        # reads every one of the user's rows. The user is checked on the rows found instead.
        stmt = select(MemoryRecord).where(MemoryRecord.id.in_(list(ids)))
        return [r for r in (await self.db.execute(stmt)).scalars() if r.user_id == user_id]

    async def page_for(
        self, user_id: int, kinds: Sequence[str], offset: int, limit: int
    ) -> tuple[Sequence[MemoryRecord], int]:
        """The user's memories of these kinds, newest session first, and how many there are."""
        where = (MemoryRecord.user_id == user_id, MemoryRecord.kind.in_(list(kinds)))
        total = int(await self.db.scalar(
            select(func.count()).select_from(MemoryRecord).where(*where)
        ) or 0)
        stmt = (
            select(MemoryRecord).where(*where)
            .order_by(MemoryRecord.started_at.desc(), MemoryRecord.session_id.desc(),
                      MemoryRecord.kind.desc(), MemoryRecord.seq)
            .offset(offset).limit(limit)
        )
        return (await self.db.execute(stmt)).scalars().all(), total

    async def next_seq(self, user_id: int, session_id: int, kind: str) -> int:
        top = await self.db.scalar(select(func.max(MemoryRecord.seq)).where(
            MemoryRecord.user_id == user_id, MemoryRecord.session_id == session_id,
            MemoryRecord.kind == kind,
        ))
        return int(top or 0) + 1

    async def ids_of_session(self, user_id: int, session_id: int) -> list[str]:
        return list(await self.db.scalars(select(MemoryRecord.id).where(
            MemoryRecord.user_id == user_id, MemoryRecord.session_id == session_id
        )))

    async def delete_ids(self, user_id: int, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        result = await self.db.execute(delete(MemoryRecord).where(
            MemoryRecord.user_id == user_id, MemoryRecord.id.in_(list(ids))
        ))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    async def ids_for(self, user_id: int) -> list[str]:
        return list(await self.db.scalars(
            select(MemoryRecord.id).where(MemoryRecord.user_id == user_id)
        ))

    async def index_rows_for(self, user_id: int) -> list[IndexRow]:
        """What a search index needs of every memory of the user, oldest first."""
        stmt = (
            select(MemoryRecord.id, MemoryRecord.chat_id, MemoryRecord.text,
                   MemoryRecord.embedding, MemoryRecord.space, MemoryRecord.started_at,
                   MemoryRecord.role)
            .where(MemoryRecord.user_id == user_id)
            .order_by(MemoryRecord.created_at, MemoryRecord.id)
        )
        return [IndexRow(*row) for row in await self.db.execute(stmt)]

    async def outside_space(self, space: str, limit: int) -> Sequence[MemoryRecord]:
        """Memories whose vector is missing or from another embedder (to re-embed)."""
        stmt = (
            select(MemoryRecord)
            .where(or_(MemoryRecord.space.is_(None), MemoryRecord.space != space))
            .order_by(MemoryRecord.user_id, MemoryRecord.id).limit(limit)
        )
        return (await self.db.execute(stmt)).scalars().all()

    async def user_ids(self) -> list[int]:
        """Every user who has a memory, in id order."""
        rows = await self.db.scalars(select(MemoryRecord.user_id).distinct())
        return sorted(int(user_id) for user_id in rows)

    async def count(self, user_id: int) -> int:
        return int(await self.db.scalar(
            select(func.count()).select_from(MemoryRecord).where(MemoryRecord.user_id == user_id)
        ) or 0)

    async def delete_for(self, user_id: int) -> int:
        result = await self.db.execute(delete(MemoryRecord).where(MemoryRecord.user_id == user_id))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


class Reminders:
    """A user's reminders. Every method that takes a user_id only ever touches that user's rows."""

    def __init__(self, db: AsyncSession) -> None:
        self.db = db

    async def add(
        self, user_id: int, chat_id: int, text: str, due_at: dt.datetime, *, most_pending: int
    ) -> Reminder | None:
        """The new reminder; None when the user already has `most_pending` waiting."""
        waiting = await self.db.scalar(
            select(func.count()).select_from(Reminder)
            .where(Reminder.user_id == user_id, Reminder.status == "pending")
        )
        if int(waiting or 0) >= most_pending:
            return None
        reminder = Reminder(user_id=user_id, chat_id=chat_id, text=text, due_at=due_at)
        self.db.add(reminder)
        await self.db.flush()
        return reminder

    async def pending_for(self, user_id: int) -> list[Reminder]:
        stmt = (
            select(Reminder).where(Reminder.user_id == user_id, Reminder.status == "pending")
            .order_by(Reminder.due_at, Reminder.id)
        )
        return list((await self.db.execute(stmt)).scalars())

    async def cancel(self, user_id: int, reminder_id: int) -> bool:
        """False when there is no such pending reminder of this user (another user's included)."""
        result = await self.db.execute(
            update(Reminder)
            .where(Reminder.id == reminder_id, Reminder.user_id == user_id,
                   Reminder.status == "pending")
            .values(status="cancelled")
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def claim_due(
        self, now: dt.datetime, *, stale_after: dt.timedelta, limit: int = 50
    ) -> list[Reminder]:
        """Due reminders, each claimed by this call alone (a conditional UPDATE per row), so two
        processes never both send one. A claim older than `stale_after` (its process died before
        marking it sent) is taken again."""
        stmt = (
            select(Reminder.id)
            .where(
                ((Reminder.status == "pending") & (Reminder.due_at <= now))
                | ((Reminder.status == "sending") & (Reminder.claimed_at < now - stale_after))
            )
            .order_by(Reminder.due_at)
            .limit(limit)
        )
        claimed = []
        for reminder_id in list((await self.db.execute(stmt)).scalars()):
            result = await self.db.execute(
                update(Reminder)
                .where(
                    Reminder.id == reminder_id,
                    ((Reminder.status == "pending") & (Reminder.due_at <= now))
                    | ((Reminder.status == "sending") & (Reminder.claimed_at < now - stale_after)),
                )
                .values(status="sending", claimed_at=now)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                claimed.append(reminder_id)
        if not claimed:
            return []
        rows = await self.db.execute(
            select(Reminder).where(Reminder.id.in_(claimed)).execution_options(populate_existing=True)
        )
        return sorted(rows.scalars(), key=lambda r: (r.due_at, r.id))

    async def mark_sent(self, reminder_id: int, now: dt.datetime) -> None:
        await self.db.execute(
            update(Reminder).where(Reminder.id == reminder_id)
            .values(status="sent", sent_at=now, claimed_at=None)
        )

    async def release(self, reminder_id: int) -> None:
        """Not sent (Telegram unreachable): pending again, for the next run."""
        await self.db.execute(
            update(Reminder).where(Reminder.id == reminder_id, Reminder.status == "sending")
            .values(status="pending", claimed_at=None)
        )


class Traces:
    def __init__(self, db: AsyncSession) -> None:
        self.db = db

    def add(self, trace: Trace) -> None:
        self.db.add(trace)

    async def add_for_living(self, rows: list[dict[str, Any]]) -> int:
        """Insert trace rows whose user still exists (one deleted meanwhile leaves none behind);
        how many were written."""
        users = {row["user_id"] for row in rows}
        alive = set((await self.db.scalars(select(User.id).where(User.id.in_(users)))).all())
        kept = [row for row in rows if row["user_id"] in alive]
        if kept:
            await self.db.execute(insert(Trace), kept)
        return len(kept)

    async def recent(self, limit: int = 20) -> list[Trace]:
        stmt = select(Trace).order_by(Trace.started_at.desc()).limit(limit)
        return list((await self.db.execute(stmt)).scalars())

    async def get(self, trace_id: str) -> Trace | None:
        stmt = select(Trace).where(Trace.id.startswith(trace_id)).limit(2)
        found = list((await self.db.execute(stmt)).scalars())
        return found[0] if len(found) == 1 else None


class Inbox:
    """The durable inbox: updates stored before they are acknowledged, processed, then kept as ids."""

    def __init__(self, db: AsyncSession) -> None:
        self.db = db

    async def store_each(self, updates: list[tuple[int, int | None, int | None, str]]) -> list[bool]:
        """Store (update id, user, chat, payload) each; True for those seen for the first time."""
        def run(session: Session) -> list[bool]:
            conn = session.connection()
            now = utcnow()
            return [core.store_update(conn, *update, now) for update in updates]

        return await self.db.run_sync(run)

    async def count_attempt(self, update_id: int) -> int:
        """One more failed try at the update's replies; how many there have been."""
        await self.db.execute(
            update(InboxUpdate).where(InboxUpdate.update_id == update_id)
            .values(attempts=InboxUpdate.attempts + 1)
        )
        return int(await self.db.scalar(
            select(InboxUpdate.attempts).where(InboxUpdate.update_id == update_id)
        ) or 0)

    async def mark_done(self, update_id: int) -> None:
        """Processed: the text goes, the id stays (to recognise a redelivery)."""
        await _on_connection(self.db, lambda c: core.mark_update_done(c, update_id))

    async def unprocessed(self) -> list[InboxUpdate]:
        stmt = (
            select(InboxUpdate)
            .where(InboxUpdate.state == "new")
            .order_by(InboxUpdate.received_at, InboxUpdate.update_id)
        )
        return list((await self.db.execute(stmt)).scalars())

    async def next_for_chat(self, chat_id: int) -> InboxUpdate | None:
        """The oldest update of a chat still waiting: chats are worked through in arrival order."""
        stmt = (
            select(InboxUpdate)
            .where(InboxUpdate.chat_id == chat_id, InboxUpdate.state == "new")
            .order_by(InboxUpdate.received_at, InboxUpdate.update_id)
            .limit(1)
        )
        return (await self.db.execute(stmt)).scalar_one_or_none()

    async def chats_waiting(self, received_before: dt.datetime) -> list[int]:
        stmt = (
            select(InboxUpdate.chat_id)
            .where(InboxUpdate.state == "new", InboxUpdate.received_at < received_before)
            .distinct()
        )
        return [c for c in (await self.db.execute(stmt)).scalars() if c is not None]

    async def forget_before(self, cutoff: dt.datetime) -> int:
        result = await self.db.execute(
            delete(InboxUpdate).where(InboxUpdate.state == "done", InboxUpdate.received_at < cutoff)
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]
