"""The message path's SQL as prebuilt Core statements, run on a synchronous Connection.

Why not the ORM here: a message runs ~15 statements, and through the ORM each one costs far
more CPU than the statement (the ORM's bulk-DML layer, one greenlet hop per statement). These
statements are built once per dialect (bench/README.md, "Speed tricks", prices that) and take their values
as parameters; a transaction runs them all inside one `AsyncSession.run_sync` call
(storage/turns.py), so the message path pays one greenlet hop per transaction.

The repositories (storage/repositories.py) call the same functions: one implementation of each
rule, whichever way it is reached. Column types still apply: text is encrypted on the way in
and decrypted on the way out, as with the ORM.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, NamedTuple

from sqlalchemy import (
    Connection,
    Row,
    bindparam,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from storage.models import Base, ChatSession, InboxUpdate, Message, Reservation, UsageDay, User

# As Tables (the declarative attribute is typed as any FromClause).
users = Base.metadata.tables[User.__tablename__]
chat_sessions = Base.metadata.tables[ChatSession.__tablename__]
messages = Base.metadata.tables[Message.__tablename__]
usage_days = Base.metadata.tables[UsageDay.__tablename__]
reservations = Base.metadata.tables[Reservation.__tablename__]
inbox = Base.metadata.tables[InboxUpdate.__tablename__]

AnyRow = Row[*tuple[Any, ...]]

ANSWERED_STATUSES = ("answered", "complete", "partial")


def utc_day(now: dt.datetime) -> dt.date:
    return now.astimezone(dt.UTC).date()


def next_reset(now: dt.datetime) -> dt.datetime:
    return dt.datetime.combine(utc_day(now) + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)


@cache
def _statements(dialect: str) -> _Statements:
    return _Statements(postgresql.insert if dialect == "postgresql" else sqlite.insert)


def _sql(conn: Connection) -> _Statements:
    return _statements(conn.dialect.name)


class _Statements:
    """Every statement of the message path, built once per dialect (ON CONFLICT differs)."""

    def __init__(self, dialect_insert: Any) -> None:
        self.user = select(
            users.c.id, users.c.role, users.c.instructions, users.c.language,
            users.c.private_data_in_groups, users.c.daily_limit, users.c.memory_per_role,
        ).where(
            users.c.id == bindparam("user_id")
        )
        self.add_user = dialect_insert(users).on_conflict_do_nothing(index_elements=["id"])
        # What a message needs of its user and of the open session in its chat, in one read.
        self.user_and_session = (
            select(
                users.c.id, users.c.role, users.c.instructions, users.c.language,
                users.c.private_data_in_groups, users.c.daily_limit, users.c.memory_per_role,
                chat_sessions.c.id.label("session_id"), chat_sessions.c.role.label("session_role"),
                chat_sessions.c.incognito,
            )
            .select_from(users.outerjoin(chat_sessions, (chat_sessions.c.user_id == users.c.id)
                                         & (chat_sessions.c.chat_id == bindparam("chat_id"))
                                         & (chat_sessions.c.status == "open")))
            .where(users.c.id == bindparam("user_id"))
        )

        self.open_session = select(
            chat_sessions.c.id, chat_sessions.c.role, chat_sessions.c.incognito
        ).where(
            chat_sessions.c.user_id == bindparam("user_id"),
            chat_sessions.c.chat_id == bindparam("chat_id"),
            chat_sessions.c.status == "open",
        )
        # No conflict target: the one it may meet is the partial unique index on open sessions.
        self.add_session = dialect_insert(chat_sessions).on_conflict_do_nothing()
        self.touch_session = (
            update(chat_sessions)
            .where(chat_sessions.c.id == bindparam("session_id"))
            .values(last_activity_at=bindparam("now"))
        )

        self.add_question = (
            dialect_insert(messages)
            .on_conflict_do_nothing(index_elements=["update_id"])
            .returning(messages.c.id)
        )
        self.add_message = insert(messages).returning(messages.c.id)
        self.set_status = (
            update(messages)
            .where(messages.c.id == bindparam("message_id"))
            .values(status=bindparam("new_status"))
        )
        self.history = (
            select(
                messages.c.role, messages.c.text, messages.c.prompt_tokens,
                messages.c.completion_tokens,
            )
            .where(
                messages.c.session_id == bindparam("session_id"),
                messages.c.status.in_(ANSWERED_STATUSES),
                messages.c.id < bindparam("before_id"),
            )
            .order_by(messages.c.id.desc())
            .limit(bindparam("limit"))
        )

        self.day = select(usage_days.c.used, usage_days.c.reserved).where(
            usage_days.c.user_id == bindparam("user_id"), usage_days.c.day == bindparam("today")
        )
        self.add_day = dialect_insert(usage_days).on_conflict_do_nothing(
            index_elements=["user_id", "day"]
        )
        # One conditional UPDATE is the whole admission check: concurrent reservations
        # serialise on the row, and the WHERE is re-checked after the wait.
        self.admit = (
            update(usage_days)
            .where(
                usage_days.c.user_id == bindparam("ledger_user"),
                usage_days.c.day == bindparam("today"),
                usage_days.c.used + usage_days.c.reserved + bindparam("amount") <= bindparam("limit"),
            )
            .values(reserved=usage_days.c.reserved + bindparam("amount"))
            .returning(usage_days.c.used)
        )
        self.charge_if_room = (
            update(usage_days)
            .where(
                usage_days.c.user_id == bindparam("ledger_user"),
                usage_days.c.day == bindparam("today"),
                usage_days.c.used + usage_days.c.reserved + bindparam("tokens") + bindparam("keep")
                <= bindparam("limit"),
            )
            .values(used=usage_days.c.used + bindparam("tokens"))
            .returning(usage_days.c.used)
        )
        self.add_reservation = insert(reservations)
        self.claim_reservation = (
            delete(reservations)
            .where(reservations.c.id == bindparam("reservation_id"))
            .returning(reservations.c.user_id, reservations.c.day, reservations.c.amount)
        )
        self.charge_reserved = (
            update(usage_days)
            .where(
                usage_days.c.user_id == bindparam("ledger_user"),
                usage_days.c.day == bindparam("today"),
            )
            .values(
                reserved=usage_days.c.reserved - bindparam("released"),
                used=usage_days.c.used + bindparam("charge"),
            )
        )

        self.store_update = dialect_insert(inbox).on_conflict_do_nothing(index_elements=["update_id"])
        self.update_done = (
            update(inbox)
            .where(inbox.c.update_id == bindparam("done_id"))
            .values(state="done", payload=None, attempts=inbox.c.attempts + 1)
        )


# --- users and sessions -------------------------------------------------------------------


def get_user(conn: Connection, user_id: int) -> AnyRow | None:
    return conn.execute(_sql(conn).user, {"user_id": user_id}).first()


def ensure_user(conn: Connection, user_id: int, language: str | None, now: dt.datetime) -> AnyRow:
    """The user's (id, role, instructions, language), created race-free on first contact."""
    row = get_user(conn, user_id)
    if row is not None:
        return row
    conn.execute(_sql(conn).add_user, {
        "id": user_id, "language": (language or "en")[:16], "created_at": now, "updated_at": now,
    })
    row = get_user(conn, user_id)
    assert row is not None
    return row


def user_and_session(conn: Connection, user_id: int, chat_id: int) -> AnyRow | None:
    """The user's columns the message path needs (`_Statements.user`) and their open session in
    this chat (session_id, session_role: None when there is none); None: no such user."""
    return conn.execute(
        _sql(conn).user_and_session, {"user_id": user_id, "chat_id": chat_id}
    ).first()


def open_session_for(conn: Connection, user_id: int, chat_id: int) -> AnyRow | None:
    """The (id, role, incognito) of the user's open session in this chat."""
    return conn.execute(_sql(conn).open_session, {"user_id": user_id, "chat_id": chat_id}).first()


def open_session(
    conn: Connection, user_id: int, chat_id: int, role: str, now: dt.datetime,
    title: str | None = None, incognito: bool = False,
) -> AnyRow:
    """Start a session; when another update opened one first, that one is returned."""
    conn.execute(_sql(conn).add_session, {
        "user_id": user_id, "chat_id": chat_id, "role": role, "title": title, "status": "open",
        "started_at": now, "last_activity_at": now, "incognito": incognito,
    })
    row = open_session_for(conn, user_id, chat_id)
    assert row is not None
    return row


def touch_session(conn: Connection, session_id: int, now: dt.datetime) -> None:
    conn.execute(_sql(conn).touch_session, {"session_id": session_id, "now": now})


# --- messages -----------------------------------------------------------------------------


def add_question(
    conn: Connection, *, session_id: int, user_id: int, chat_id: int, text: str,
    update_id: int | None, tokens: int, now: dt.datetime,
) -> int | None:
    """The question's id; None when this update was stored before (ON CONFLICT on update_id)."""
    values = {
        "session_id": session_id, "user_id": user_id, "chat_id": chat_id, "role": "user",
        "text": text, "status": "pending", "prompt_tokens": tokens, "completion_tokens": 0,
        "update_id": update_id, "created_at": now,
    }
    sql = _sql(conn)
    statement = sql.add_question if update_id is not None else sql.add_message
    return conn.execute(statement, values).scalar_one_or_none()


def ask_in_session(
    conn: Connection, *, session_id: int, user_id: int, chat_id: int, text: str,
    update_id: int | None, tokens: int, now: dt.datetime, history_limit: int,
) -> tuple[int, list[HistoryEntry]] | None:
    """The question stored, the session touched and its history read: (question id, history
    oldest first), or None when this update was stored before (nothing written)."""
    question_id = add_question(
        conn, session_id=session_id, user_id=user_id, chat_id=chat_id, text=text,
        update_id=update_id, tokens=tokens, now=now,
    )
    if question_id is None:
        return None
    touch_session(conn, session_id, now)
    return question_id, history(conn, session_id, history_limit, question_id)


def add_answer(
    conn: Connection, *, question_id: int, session_id: int, user_id: int, chat_id: int,
    text: str, status: str, prompt_tokens: int, completion_tokens: int, now: dt.datetime,
    memory_ids: Sequence[str] = (),
) -> None:
    """The answer, and its question marked answered. A question deleted meanwhile (with its
    user) makes the insert fail on its foreign keys: IntegrityError, nothing written."""
    conn.execute(_sql(conn).add_message, {
        "session_id": session_id, "user_id": user_id, "chat_id": chat_id, "role": "assistant",
        "text": text, "status": status, "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens, "reply_to": question_id, "created_at": now,
        "memory_ids": json.dumps(list(memory_ids)) if memory_ids else None,
    })
    set_status(conn, question_id, "answered")


def set_status(conn: Connection, message_id: int, status: str) -> bool:
    """False when the message is gone (deleted with its user)."""
    done = conn.execute(_sql(conn).set_status, {"message_id": message_id, "new_status": status})
    return bool(done.rowcount)


@dataclass(frozen=True)
class TurnRecord:
    """What a finished turn writes: the answer (if any text came) and the charge.

    Not the inbox row: that is done when the answer has reached the user (handlers/delivery.py).
    """

    user_id: int
    chat_id: int
    session_id: int
    question_id: int
    reservation_id: str
    charged: int
    text: str
    complete: bool
    prompt_tokens: int
    completion_tokens: int
    memory_ids: tuple[str, ...] = ()  # the remembered units the answer's prompt drew on
    incognito: bool = False  # the session keeps no text: the answer is stored without it


def record_turn(conn: Connection, turn: TurnRecord, now: dt.datetime) -> bool:
    """The answer (or the question marked failed), the real charge and the session's activity.
    False when the question is gone: the caller rolls back. An answer
    to a deleted question fails on its foreign keys (IntegrityError)."""
    status = "complete" if turn.complete else "partial"
    if turn.text:
        add_answer(
            conn, question_id=turn.question_id, session_id=turn.session_id,
            user_id=turn.user_id, chat_id=turn.chat_id, status=status,
            text="" if turn.incognito else turn.text,
            prompt_tokens=turn.prompt_tokens, completion_tokens=turn.completion_tokens, now=now,
            memory_ids=turn.memory_ids,
        )
    elif not set_status(conn, turn.question_id, "failed"):
        return False
    settle(conn, turn.reservation_id, turn.charged)
    touch_session(conn, turn.session_id, now)
    return True


class HistoryEntry(NamedTuple):
    role: str  # "user" | "assistant"
    text: str
    prompt_tokens: int
    completion_tokens: int


def history(conn: Connection, session_id: int, limit: int, before_id: int) -> list[HistoryEntry]:
    """The latest answered exchanges of a session before a message, oldest first."""
    rows = conn.execute(
        _sql(conn).history, {"session_id": session_id, "before_id": before_id, "limit": limit}
    )
    return [HistoryEntry(*row) for row in reversed(rows.all())]


# --- the daily ledger ---------------------------------------------------------------------


@dataclass(frozen=True)
class Reserved:
    id: str
    amount: int
    day: dt.date


@dataclass(frozen=True)
class OverBudget:
    used: int
    reserved: int
    limit: int
    resets_at: dt.datetime


def left_today(conn: Connection, user_id: int, limit: int, now: dt.datetime) -> tuple[int, bool]:
    """(tokens left today, whether today's row exists). A hint for sizing, not admission."""
    row = conn.execute(_sql(conn).day, {"user_id": user_id, "today": utc_day(now)}).first()
    if row is None:
        return limit, False
    return max(0, limit - row.used - row.reserved), True


def reserve(
    conn: Connection, user_id: int, amount: int, limit: int, *, ttl_seconds: int,
    now: dt.datetime, day_exists: bool = False,
) -> Reserved | OverBudget:
    """Admit `amount` tokens or refuse; day_exists: the caller just saw today's row."""
    sql = _sql(conn)
    today = utc_day(now)
    if not day_exists:
        conn.execute(sql.add_day, {"user_id": user_id, "day": today, "used": 0, "reserved": 0})
    reservation_id = str(uuid.uuid4())
    expires_at = now + dt.timedelta(seconds=ttl_seconds)
    ask = {"ledger_user": user_id, "today": today, "amount": amount, "limit": limit}
    admitted = conn.execute(sql.admit, ask).first()
    if admitted is not None:
        conn.execute(sql.add_reservation, {
            "id": reservation_id, "user_id": user_id, "day": today, "amount": amount,
            "created_at": now, "expires_at": expires_at,
        })
    if admitted is None:
        row = conn.execute(sql.day, {"user_id": user_id, "today": today}).one()
        return OverBudget(row.used, row.reserved, limit, next_reset(now))
    return Reserved(reservation_id, amount, today)


def settle(conn: Connection, reservation_id: str, actual: int | None) -> int | None:
    """Replace a reservation by the real usage (the full reservation when usage is unknown).

    Idempotent: the reservation row is claimed by DELETE ... RETURNING, so a second settle
    (a retry, the sweeper) finds nothing and charges nothing.
    """
    sql = _sql(conn)
    claimed = conn.execute(sql.claim_reservation, {"reservation_id": reservation_id}).first()
    if claimed is None:
        return None
    # Never more than was reserved: the reservation is what admission counted against the limit.
    charge = claimed.amount if actual is None else min(actual, claimed.amount)
    conn.execute(sql.charge_reserved, {
        "ledger_user": claimed.user_id, "today": claimed.day, "released": claimed.amount,
        "charge": charge,
    })
    return charge


def charge_if_room(
    conn: Connection, user_id: int, tokens: int, limit: int, *, keep: int, now: dt.datetime
) -> bool:
    """Charge `tokens` only if `keep` more still fit today after them: one conditional UPDATE,
    like an admission. For calls billed by what is sent (an embedding), charged before them."""
    sql = _sql(conn)
    today = utc_day(now)
    conn.execute(sql.add_day, {"user_id": user_id, "day": today, "used": 0, "reserved": 0})
    return conn.execute(sql.charge_if_room, {
        "ledger_user": user_id, "today": today, "tokens": tokens, "keep": keep, "limit": limit,
    }).first() is not None


# --- the inbox ----------------------------------------------------------------------------


def store_update(
    conn: Connection, update_id: int, user_id: int | None, chat_id: int | None, payload: str,
    now: dt.datetime,
) -> bool:
    """True the first time an update id is seen; a redelivery stores nothing and says False."""
    result = conn.execute(_sql(conn).store_update, {
        "update_id": update_id, "user_id": user_id, "chat_id": chat_id, "payload": payload,
        "state": "new", "attempts": 0, "received_at": now,
    })
    return result.rowcount == 1


def mark_update_done(conn: Connection, update_id: int) -> None:
    """Processed: the text goes, the id stays (to recognise a redelivery)."""
    conn.execute(_sql(conn).update_done, {"done_id": update_id})
