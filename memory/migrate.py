"""Copy long-term memories between backends (local SQL <-> Pinecone), vectors included."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from memory.base import MemoryItem
from memory.local import LocalMemory
from storage.repositories import Memories

log = logging.getLogger(__name__)


class MemorySource(Protocol):
    async def user_ids(self) -> list[int]: ...

    async def dump_user(self, user_id: int) -> list[tuple[MemoryItem, list[float]]]: ...


@dataclass(frozen=True)
class CopyReport:
    users: int
    copied: int
    skipped: int  # records whose user no longer exists on the target side


class LocalSource:
    """Reads the local backend's rows with their (decrypted) embeddings."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def user_ids(self) -> list[int]:
        async with self._sessions() as db:
            return await Memories(db).user_ids()

    async def dump_user(self, user_id: int) -> list[tuple[MemoryItem, list[float]]]:
        async with self._sessions() as db:
            records = await Memories(db).for_user(user_id)
        return [
            (
                MemoryItem(
                    user_id=r.user_id, session_id=r.session_id, title=r.title, text=r.text,
                    role=r.role, started_at=r.started_at, ended_at=r.ended_at, chat_id=r.chat_id,
                ),
                np.frombuffer(r.embedding, dtype=np.float32).astype(float).tolist(),
            )
            for r in records
            if r.embedding  # a record without its vector cannot be searched anywhere
        ]


def as_source(store: Any) -> MemorySource:
    if hasattr(store, "dump_user") and hasattr(store, "user_ids"):
        return store
    if isinstance(store, LocalMemory):
        return LocalSource(store._sessions)
    raise TypeError(f"cannot read memories from {type(store).__name__}")


async def copy_memories(
    source: Any, target: Any, user_ids: Iterable[int] | None = None
) -> CopyReport:
    """Copy every memory (or those of `user_ids`) from source to target; safe to re-run.

    Writes are idempotent by memory id, so an interrupted copy is finished by running it again.
    A target with `put_many` (Pinecone) gets writes that raise on failure rather than queue.
    """
    reader = as_source(source)
    users = list(user_ids) if user_ids is not None else await reader.user_ids()
    copied = skipped = 0
    for user_id in users:
        records = await reader.dump_user(user_id)
        if not records:
            continue
        if hasattr(target, "put_many"):
            await target.put_many(records)
            copied += len(records)
            continue
        for item, vector in records:
            try:
                await target.add(item, vector)
            except IntegrityError:
                skipped += 1  # the user was deleted from SQL; their vectors are orphans
                continue
            copied += 1
    log.info("memories copied: %d users, %d records, %d skipped", len(users), copied, skipped)
    return CopyReport(len(users), copied, skipped)
