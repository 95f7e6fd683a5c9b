"""The default memory backend: records and their embeddings in the SQL database."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from memory.base import PRIVATE, MemoryHit, MemoryItem, MemoryScope
from storage.models import MemoryRecord
from storage.repositories import Memories


@dataclass
class _UserIndex:
    """One user's memories as a normalised matrix: searched without touching SQL or Fernet."""

    ids: list[str]
    chats: list[int | None]  # the chat each memory was made in (None: private)
    matrix: np.ndarray  # (n, dims) float32, rows L2-normalised


class LocalMemory:
    """Cosine search within one user's own records; a small LRU of per-user matrices."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], cache_users: int = 1024) -> None:
        self._sessions = sessions
        self._cache: OrderedDict[int, _UserIndex] = OrderedDict()
        self._cache_users = cache_users
        self._locks: dict[int, asyncio.Lock] = {}

    async def has_any(self, user_id: int) -> bool:
        index = await self._index(user_id)
        return bool(index.ids)

    async def search(
        self, user_id: int, vector: list[float], k: int, scope: MemoryScope = PRIVATE
    ) -> list[MemoryHit]:
        index = await self._index(user_id)
        if not index.ids or k <= 0:
            return []
        query = _normalise(np.asarray(vector, dtype=np.float32))
        if query.shape[0] != index.matrix.shape[1]:
            return []  # the embedding model changed; old vectors are not comparable
        scores = index.matrix @ query
        admitted = np.fromiter((scope.admits(chat) for chat in index.chats), dtype=bool)
        scores = np.where(admitted, scores, -np.inf)
        top = [i for i in np.argsort(-scores)[:k] if admitted[i]]
        wanted = {index.ids[i]: float(scores[i]) for i in top}
        async with self._sessions() as db:
            records = await Memories(db).by_ids(user_id, list(wanted))
        hits = [
            MemoryHit(r.id, r.text, r.title, r.role, r.started_at, wanted[r.id]) for r in records
        ]
        return sorted(hits, key=lambda hit: -hit.score)

    async def add(self, item: MemoryItem, vector: list[float]) -> None:
        record = MemoryRecord(
            id=item.id, user_id=item.user_id, session_id=item.session_id, chat_id=item.chat_id,
            title=item.title,
            text=item.text, role=item.role,
            embedding=np.asarray(vector, dtype=np.float32).tobytes(),
            started_at=item.started_at, ended_at=item.ended_at,
        )
        async with self._sessions() as db:
            await Memories(db).upsert(record)
            await db.commit()
        self._cache.pop(item.user_id, None)

    async def export_user(self, user_id: int) -> list[dict[str, Any]]:
        # Local records live in the SQL memories table, which the SQL export already covers.
        return []

    async def delete_user(self, user_id: int) -> int:
        async with self._sessions() as db:
            removed = await Memories(db).delete_for(user_id)
            await db.commit()
        self._cache.pop(user_id, None)
        return removed

    def forget_cached(self, user_id: int) -> None:
        self._cache.pop(user_id, None)

    async def _index(self, user_id: int) -> _UserIndex:
        cached = self._cache.get(user_id)
        if cached is not None:
            self._cache.move_to_end(user_id)
            return cached
        lock = self._locks.setdefault(user_id, asyncio.Lock())
        async with lock:  # one load per user even when many messages arrive at once
            cached = self._cache.get(user_id)
            if cached is None:
                cached = await self._load(user_id)
                self._cache[user_id] = cached
                while len(self._cache) > self._cache_users:
                    self._cache.popitem(last=False)
        self._locks.pop(user_id, None)
        return cached

    async def _load(self, user_id: int) -> _UserIndex:
        async with self._sessions() as db:
            stored = await Memories(db).vectors_for(user_id)
        rows = [
            (memory_id, chat_id, np.frombuffer(vector, dtype=np.float32))
            for memory_id, chat_id, vector in stored
        ]
        if not rows:
            return _UserIndex([], [], np.zeros((0, 0), dtype=np.float32))
        dims = rows[-1][2].shape[0]
        rows = [row for row in rows if row[2].shape[0] == dims]
        matrix = np.stack([_normalise(v) for _, _, v in rows]).astype(np.float32)
        return _UserIndex([i for i, _, _ in rows], [c for _, c, _ in rows], matrix)


def _normalise(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector
