"""Move long-term memories: vectors to Pinecone, old Pinecone summaries back, re-embedding."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from memory.base import MemoryItem
from memory.embedders import Embedder
from memory.local import same_space
from storage.models import MemoryRecord
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
    """Reads the SQL rows whose vectors are in `space`, with their (decrypted) embeddings."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], space: str) -> None:
        self._sessions = sessions
        self._space = space

    async def user_ids(self) -> list[int]:
        async with self._sessions() as db:
            return await Memories(db).user_ids()

    async def dump_user(self, user_id: int) -> list[tuple[MemoryItem, list[float]]]:
        async with self._sessions() as db:
            records = await Memories(db).for_user(user_id)
        return [
            (item_of(r), np.frombuffer(r.embedding, dtype=np.float32).astype(float).tolist())
            for r in records
            # a vector from another embedder would not be comparable (reembed first)
            if r.embedding and same_space(r.space, self._space)
        ]


def item_of(record: MemoryRecord) -> MemoryItem:
    return MemoryItem(
        user_id=record.user_id, session_id=record.session_id, title=record.title,
        text=record.text, role=record.role, started_at=record.started_at,
        ended_at=record.ended_at, chat_id=record.chat_id,
        kind=record.kind, seq=record.seq,  # type: ignore[arg-type]
    )


async def reembed(
    sessions: async_sessionmaker[AsyncSession], memory: Any, embedder: Embedder, batch: int = 64
) -> int:
    """Embed again every stored unit whose vector is missing or from another embedder, so one
    vector space is compared (after a change of EMBEDDING_PROVIDER or EMBEDDING_MODEL).

    Safe to interrupt and re-run: each batch is stored with its new space before the next is
    read. With Pinecone the new vectors replace the old ones there too. Re-embedding with the
    provider costs the operator its tokens; no user's daily allowance is charged.
    """
    done = 0
    while True:
        async with sessions() as db:
            records = await Memories(db).outside_space(embedder.space, batch)
        if not records:
            break
        vectors = await embedder.embed([record.text for record in records])
        await memory.add_many([item_of(record) for record in records], vectors)
        done += len(records)
        log.info("memories re-embedded: %d", done)
    return done


async def copy_memories(
    source: MemorySource, target: Any, user_ids: Iterable[int] | None = None
) -> CopyReport:
    """Copy every memory (or those of `user_ids`) from source to target; safe to re-run.

    Writes are idempotent by memory id, so an interrupted copy is finished by running it again.
    A target with `put_many` (Pinecone) gets writes that raise on failure rather than queue.
    """
    reader: MemorySource = source
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
                await target.add_many([item], [vector])
            except IntegrityError:
                skipped += 1  # the user was deleted from SQL; their vectors are orphans
                continue
            copied += 1
    log.info("memories copied: %d users, %d records, %d skipped", len(users), copied, skipped)
    return CopyReport(len(users), copied, skipped)
