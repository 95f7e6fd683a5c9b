"""Everything stored about one user: exported as documented JSON, or deleted from every table.

USER_TABLES is the one list of tables that hold a user's rows; export and delete both walk it,
and tests/test_data_rights.py checks it against the schema, so a new table cannot be forgotten.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import (
    Base,
    ChatSession,
    InboxUpdate,
    MemoryOutbox,
    MemoryRecord,
    Message,
    Reminder,
    Reservation,
    Trace,
    UsageDay,
    User,
)

EXPORT_SCHEMA_VERSION = 1


def _iso(value: dt.datetime | dt.date | None) -> str | None:
    return None if value is None else value.isoformat()


def _message(row: Message) -> dict[str, Any]:
    return {
        "id": row.id, "session_id": row.session_id, "role": row.role, "text": row.text,
        "status": row.status,
        "created_at": _iso(row.created_at), "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "memories_used": json.loads(row.memory_ids) if row.memory_ids else [],
    }


def _session(row: ChatSession) -> dict[str, Any]:
    return {
        "id": row.id, "chat_id": row.chat_id, "title": row.title, "role": row.role,
        "status": row.status, "started_at": _iso(row.started_at), "ended_at": _iso(row.ended_at),
        "end_reason": row.end_reason, "summary": row.summary, "incognito": row.incognito,
        "messages": [],
    }


def _memory(row: MemoryRecord) -> dict[str, Any]:
    return {
        "id": row.id, "kind": row.kind, "session_id": row.session_id, "chat_id": row.chat_id,
        "title": row.title, "text": row.text, "role": row.role,
        "started_at": _iso(row.started_at), "ended_at": _iso(row.ended_at),
        "created_at": _iso(row.created_at), "embedded_with": row.space,
        "store": "database",
    }


def _usage(row: UsageDay) -> dict[str, Any]:
    return {"day": _iso(row.day), "used_tokens": row.used, "reserved_tokens": row.reserved}


def _reservation(row: Reservation) -> dict[str, Any]:
    return {
        "id": row.id, "day": _iso(row.day), "tokens": row.amount,
        "created_at": _iso(row.created_at), "expires_at": _iso(row.expires_at),
    }


def _trace(row: Trace) -> dict[str, Any]:
    return {
        "id": row.id, "session_id": row.session_id, "kind": row.kind,
        "started_at": _iso(row.started_at), "duration_ms": row.duration_ms,
        "outcome": row.outcome, "model": row.model, "input_tokens": row.input_tokens,
        "output_tokens": row.output_tokens,
    }


def _inbox(row: InboxUpdate) -> dict[str, Any]:
    # The payload is the Telegram update itself while it waits to be processed, then NULL.
    return {
        "update_id": row.update_id, "chat_id": row.chat_id, "state": row.state,
        "received_at": _iso(row.received_at), "update": row.payload,
    }


def _memory_write(row: MemoryOutbox) -> dict[str, Any]:
    # The queued unit itself is exported with the memories (its row in the memories table).
    return {
        "memory_id": row.memory_id, "attempts": row.attempts,
        "created_at": _iso(row.created_at), "next_attempt_at": _iso(row.next_attempt_at),
    }


def _reminder(row: Reminder) -> dict[str, Any]:
    return {
        "id": row.id, "chat_id": row.chat_id, "text": row.text, "due_at": _iso(row.due_at),
        "status": row.status, "created_at": _iso(row.created_at), "sent_at": _iso(row.sent_at),
    }


@dataclass(frozen=True)
class UserTable:
    """A table holding a user's rows: where they go in the export, and how each row reads."""

    model: type[Base]
    section: str  # the export document's key
    present: Callable[[Any], dict[str, Any]]
    order_by: str

    @property
    def table(self) -> Table:
        return Base.metadata.tables[self.model.__tablename__]

    @property
    def owner(self) -> Any:
        """The column that names the user."""
        return getattr(self.model, "id" if self.model is User else "user_id")


# Children before parents: delete walks this order, so correctness does not depend on the
# database enforcing ON DELETE CASCADE. `users` is last and is exported on its own (below).
USER_TABLES: tuple[UserTable, ...] = (
    UserTable(Message, "messages", _message, "id"),
    UserTable(Trace, "traces", _trace, "started_at"),
    UserTable(MemoryRecord, "memories", _memory, "created_at"),
    UserTable(MemoryOutbox, "pending_memory_writes", _memory_write, "id"),
    UserTable(Reservation, "reservations", _reservation, "created_at"),
    UserTable(UsageDay, "usage", _usage, "day"),
    UserTable(InboxUpdate, "telegram_updates", _inbox, "received_at"),
    UserTable(Reminder, "reminders", _reminder, "due_at"),
    UserTable(ChatSession, "sessions", _session, "id"),
    UserTable(User, "user", lambda row: {}, "id"),
)


async def _rows(db: AsyncSession, spec: UserTable, user_id: int) -> list[Any]:
    order = getattr(spec.model, spec.order_by)
    return list((await db.execute(
        select(spec.model).where(spec.owner == user_id).order_by(order)
    )).scalars())


async def export_user(db: AsyncSession, user_id: int) -> dict[str, Any]:
    """The user's data, decrypted, as the JSON document described in the README."""
    sections: dict[str, list[dict[str, Any]]] = {}
    for spec in USER_TABLES:
        if spec.model is not User:
            sections[spec.section] = [spec.present(row) for row in await _rows(db, spec, user_id)]
    # Messages are shown inside their session, as the conversation they belong to.
    sessions = {session["id"]: session for session in sections["sessions"]}
    for message in sections.pop("messages"):
        sessions[message.pop("session_id")]["messages"].append(message)
    user = await db.get(User, user_id)
    return {
        "schema": "desktop.export",
        "version": EXPORT_SCHEMA_VERSION,
        "exported_at": _iso(dt.datetime.now(dt.UTC)),
        "user": None if user is None else {
            "telegram_id": user.id, "language": user.language, "role": user.role,
            "custom_instructions": user.instructions,
            "private_data_in_groups": user.private_data_in_groups,
            "timezone": user.timezone, "memory_per_role": user.memory_per_role,
            "daily_limit": user.daily_limit, "warned_on": _iso(user.warned_on),
            "created_at": _iso(user.created_at),
        },
        **sections,
    }


@dataclass(frozen=True)
class DeletionReceipt:
    messages: int
    sessions: int
    memories: int
    usage_days: int
    traces: int


async def delete_user(db: AsyncSession, user_id: int) -> DeletionReceipt:
    """Delete every row tied to the user, in every table of USER_TABLES; the caller commits."""
    removed: dict[type[Base], int] = {}
    for spec in USER_TABLES:
        removed[spec.model] = int(await db.scalar(
            select(func.count()).select_from(spec.model).where(spec.owner == user_id)
        ) or 0)
        await db.execute(delete(spec.model).where(spec.owner == user_id))
    return DeletionReceipt(
        messages=removed[Message], sessions=removed[ChatSession], memories=removed[MemoryRecord],
        usage_days=removed[UsageDay], traces=removed[Trace],
    )


def tables_naming_a_user(metadata: Any = Base.metadata) -> set[str]:
    """Every table of the schema with a column that holds a user id."""
    return {
        table.name for table in metadata.tables.values()
        if "user_id" in table.c
        or any(fk.column.table.name == "users" for fk in table.foreign_keys)
        or table.name == "users"
    }


def uncovered_tables(metadata: Any = Base.metadata) -> set[str]:
    """Tables naming a user that export and delete do not walk: must be empty."""
    return tables_naming_a_user(metadata) - {spec.table.name for spec in USER_TABLES}
