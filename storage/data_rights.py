"""Everything stored about one user: exported as documented JSON, or deleted from every table."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import (
    ChatSession,
    MemoryOutbox,
    MemoryRecord,
    Message,
    InboxUpdate,
    Reservation,
    Trace,
    UsageDay,
    User,
)

EXPORT_SCHEMA_VERSION = 1


def _iso(value: dt.datetime | dt.date | None) -> str | None:
    return None if value is None else value.isoformat()


async def export_user(db: AsyncSession, user_id: int) -> dict[str, Any]:
    """The user's data, decrypted, as the JSON document described in the README."""
    user = await db.get(User, user_id)
    sessions = (await db.execute(
        select(ChatSession).where(ChatSession.user_id == user_id).order_by(ChatSession.id)
    )).scalars().all()
    messages = (await db.execute(
        select(Message).where(Message.user_id == user_id).order_by(Message.id)
    )).scalars().all()
    by_session: dict[int, list[dict[str, Any]]] = {}
    for message in messages:
        by_session.setdefault(message.session_id, []).append({
            "id": message.id,
            "role": message.role,
            "text": message.text,
            "status": message.status,
            "created_at": _iso(message.created_at),
            "prompt_tokens": message.prompt_tokens,
            "completion_tokens": message.completion_tokens,
        })
    memories = (await db.execute(
        select(MemoryRecord).where(MemoryRecord.user_id == user_id).order_by(MemoryRecord.created_at)
    )).scalars().all()
    usage = (await db.execute(
        select(UsageDay).where(UsageDay.user_id == user_id).order_by(UsageDay.day)
    )).scalars().all()
    traces = (await db.execute(
        select(Trace).where(Trace.user_id == user_id).order_by(Trace.started_at)
    )).scalars().all()
    return {
        "schema": "desktop.export",
        "version": EXPORT_SCHEMA_VERSION,
        "exported_at": _iso(dt.datetime.now(dt.UTC)),
        "user": None if user is None else {
            "telegram_id": user.id,
            "language": user.language,
            "role": user.role,
            "custom_instructions": user.instructions,
            "created_at": _iso(user.created_at),
        },
        "sessions": [
            {
                "id": session.id,
                "chat_id": session.chat_id,
                "title": session.title,
                "role": session.role,
                "status": session.status,
                "started_at": _iso(session.started_at),
                "ended_at": _iso(session.ended_at),
                "end_reason": session.end_reason,
                "summary": session.summary,
                "messages": by_session.get(session.id, []),
            }
            for session in sessions
        ],
        "memories": [
            {
                "id": memory.id,
                "session_id": memory.session_id,
                "title": memory.title,
                "text": memory.text,
                "role": memory.role,
                "started_at": _iso(memory.started_at),
                "ended_at": _iso(memory.ended_at),
                "created_at": _iso(memory.created_at),
            }
            for memory in memories
        ],
        "usage": [
            {"day": _iso(day.day), "used_tokens": day.used, "reserved_tokens": day.reserved}
            for day in usage
        ],
        "traces": [
            {
                "id": trace.id,
                "session_id": trace.session_id,
                "kind": trace.kind,
                "started_at": _iso(trace.started_at),
                "duration_ms": trace.duration_ms,
                "outcome": trace.outcome,
                "model": trace.model,
                "input_tokens": trace.input_tokens,
                "output_tokens": trace.output_tokens,
            }
            for trace in traces
        ],
    }


@dataclass(frozen=True)
class DeletionReceipt:
    messages: int
    sessions: int
    memories: int
    usage_days: int
    traces: int


async def delete_user(db: AsyncSession, user_id: int) -> DeletionReceipt:
    """Delete every row tied to the user; the caller commits (one transaction)."""

    async def count(model: Any) -> int:
        return int(await db.scalar(
            select(func.count()).select_from(model).where(model.user_id == user_id)
        ) or 0)

    receipt = DeletionReceipt(
        messages=await count(Message),
        sessions=await count(ChatSession),
        memories=await count(MemoryRecord),
        usage_days=await count(UsageDay),
        traces=await count(Trace),
    )
    # Children first: correctness must not depend on the database enforcing ON DELETE CASCADE.
    for model in (
        Message, Trace, MemoryRecord, MemoryOutbox, Reservation, UsageDay, ChatSession, InboxUpdate,
    ):
        await db.execute(delete(model).where(model.user_id == user_id))
    await db.execute(delete(User).where(User.id == user_id))
    return receipt
