"""The memory outbox: vector-store writes that failed, kept until a retry lands them."""

from __future__ import annotations

import datetime as dt
import random

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import MemoryOutbox, utcnow

RETRY_BASE_SECONDS = 30.0
RETRY_MAX_SECONDS = 3600.0


def retry_delay(attempts: int) -> dt.timedelta:
    """Exponential backoff with jitter, capped: a long outage costs one try an hour per write."""
    seconds = min(RETRY_BASE_SECONDS * 2 ** max(attempts - 1, 0), RETRY_MAX_SECONDS)
    return dt.timedelta(seconds=seconds * random.uniform(0.8, 1.2))


class Outbox:
    def __init__(self, db: AsyncSession) -> None:
        self.db = db

    async def enqueue(
        self, *, user_id: int, memory_id: str, payload: str, error: str | None,
        now: dt.datetime | None = None,
    ) -> MemoryOutbox:
        """Queue a write; an older queued write of the same memory is replaced, not kept too."""
        now = now or utcnow()
        await self.discard(memory_id)
        row = MemoryOutbox(
            user_id=user_id, memory_id=memory_id, payload=payload, attempts=1,
            last_error=error[:100] if error else None, created_at=now,
            next_attempt_at=now + retry_delay(1),
        )
        self.db.add(row)
        await self.db.flush()
        return row

    async def due(self, now: dt.datetime | None = None, limit: int = 100) -> list[MemoryOutbox]:
        stmt = (
            select(MemoryOutbox)
            .where(MemoryOutbox.next_attempt_at <= (now or utcnow()))
            .order_by(MemoryOutbox.next_attempt_at, MemoryOutbox.id)
            .limit(limit)
        )
        return list((await self.db.execute(stmt)).scalars())

    async def failed(self, row_id: int, error: str, now: dt.datetime | None = None) -> None:
        row = await self.db.get(MemoryOutbox, row_id)
        if row is None:
            return  # delivered or deleted meanwhile
        attempts = row.attempts + 1
        await self.db.execute(
            update(MemoryOutbox)
            .where(MemoryOutbox.id == row_id)
            .values(
                attempts=attempts, last_error=error[:100],
                next_attempt_at=(now or utcnow()) + retry_delay(attempts),
            )
        )

    async def done(self, row_id: int) -> bool:
        """Remove a delivered row; by id, so a newer write queued meanwhile stays queued."""
        result = await self.db.execute(delete(MemoryOutbox).where(MemoryOutbox.id == row_id))
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def discard(self, memory_id: str) -> int:
        """Drop queued writes of a memory that has just been written directly (they are older)."""
        result = await self.db.execute(
            delete(MemoryOutbox).where(MemoryOutbox.memory_id == memory_id)
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    async def for_user(self, user_id: int) -> list[MemoryOutbox]:
        stmt = (
            select(MemoryOutbox).where(MemoryOutbox.user_id == user_id).order_by(MemoryOutbox.id)
        )
        return list((await self.db.execute(stmt)).scalars())

    async def delete_for(self, user_id: int) -> int:
        result = await self.db.execute(delete(MemoryOutbox).where(MemoryOutbox.user_id == user_id))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    async def count(self, user_id: int | None = None) -> int:
        stmt = select(func.count()).select_from(MemoryOutbox)
        if user_id is not None:
            stmt = stmt.where(MemoryOutbox.user_id == user_id)
        return int(await self.db.scalar(stmt) or 0)
