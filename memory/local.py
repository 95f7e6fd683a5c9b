"""The default memory backend: units in the SQL database, found by lexical and dense scores fused.

The SQL `memories` table is where every unit lives (text and vector encrypted), whichever
backend searches the vectors: PineconeMemory asks Pinecone for the dense half and this class
for the rest, so both backends rank the same way.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from memory.base import PRIVATE, MemoryHit, MemoryItem, MemoryQuery, MemoryScope
from memory.lexical import LexicalIndex
from storage.models import MemoryRecord
from storage.repositories import IndexRow, Memories

# The dense score's share of the fused score; the lexical score has the rest. Each is first
# scaled to 0..1 over the user's memories (relative score fusion). On LoCoMo this found the
# evidence session more often than reciprocal-rank fusion and than either score alone
# (bench/README.md, "Memory").
DENSE_WEIGHT = 0.5


@dataclass
class _UserIndex:
    """One user's memories, ready to score without touching SQL or Fernet."""

    ids: list[str]
    chats: list[int | None]  # the chat each memory was made in (None: private)
    roles: list[str | None]  # the role each was made in
    lexical: LexicalIndex
    vectors: np.ndarray  # (n, dims) float32, L2-normalised; zero rows: no vector in this space


class LocalMemory:
    """Hybrid search within one user's own units; a small LRU of per-user indexes."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], space: str, cache_users: int = 1024,
        dense_weight: float = DENSE_WEIGHT,  # 0: words alone, 1: vectors alone (bench memory)
    ) -> None:
        self._sessions = sessions
        self.space = space
        self._dense_weight = dense_weight
        self._cache: OrderedDict[int, _UserIndex] = OrderedDict()
        self._cache_users = cache_users
        self._locks: dict[int, asyncio.Lock] = {}

    async def has_any(self, user_id: int) -> bool:
        index = await self._index(user_id)
        return bool(index.ids)

    async def search(
        self, user_id: int, query: MemoryQuery, scope: MemoryScope = PRIVATE
    ) -> list[MemoryHit]:
        return await self.rank(user_id, query, scope)

    async def rank(
        self, user_id: int, query: MemoryQuery, scope: MemoryScope = PRIVATE,
        dense: Mapping[str, float] | None = None,
    ) -> list[MemoryHit]:
        """The user's units best first. `dense`: scores from another vector index (Pinecone),
        by id, instead of this one's vectors."""
        index = await self._index(user_id)
        admitted = np.flatnonzero([
            scope.admits(chat, role) for chat, role in zip(index.chats, index.roles, strict=True)
        ])
        words = index.lexical.scores(query.text)
        if query.words_must_match:
            admitted = admitted[words[admitted] > 0]
        if not admitted.size or query.limit <= 0:
            return []
        lexical = words[admitted]
        if dense is not None:
            floor = min(dense.values(), default=0.0)
            semantic = np.array([dense.get(index.ids[i], floor) for i in admitted], np.float32)
        elif query.vector is not None and len(query.vector) == index.vectors.shape[1]:
            semantic = index.vectors[admitted] @ _normalise(np.asarray(query.vector, np.float32))
        else:
            semantic = np.zeros(admitted.size, dtype=np.float32)
        fused = fuse(lexical, semantic, self._dense_weight)
        best = admitted[np.argsort(-fused, kind="stable")[:query.limit]]
        score = dict(zip((index.ids[i] for i in admitted), fused.tolist(), strict=True))
        async with self._sessions() as db:
            records = await Memories(db).by_ids(user_id, [index.ids[i] for i in best])
        hits = [_hit(record, score[record.id]) for record in records]
        return sorted(hits, key=lambda hit: -hit.score)

    async def add_many(
        self, items: Sequence[MemoryItem], vectors: Sequence[list[float] | None]
    ) -> None:
        records = [self.record(item, vector) for item, vector in zip(items, vectors, strict=True)]
        async with self._sessions() as db:
            for record in records:
                await Memories(db).upsert(record)
            await db.commit()
        for user_id in {item.user_id for item in items}:
            self._cache.pop(user_id, None)

    def record(self, item: MemoryItem, vector: list[float] | None) -> MemoryRecord:
        return MemoryRecord(
            id=item.id, user_id=item.user_id, session_id=item.session_id, chat_id=item.chat_id,
            title=item.title, text=item.text, role=item.role, kind=item.kind, seq=item.seq,
            embedding=None if vector is None else np.asarray(vector, dtype=np.float32).tobytes(),
            space=None if vector is None else self.space,
            started_at=item.started_at, ended_at=item.ended_at,
        )

    async def forget(self, user_id: int, ids: Sequence[str]) -> int:
        async with self._sessions() as db:
            removed = await Memories(db).delete_ids(user_id, ids)
            await db.commit()
        self._cache.pop(user_id, None)
        return removed

    async def export_user(self, user_id: int) -> list[dict[str, Any]]:
        # The units live in the SQL memories table, which the SQL export already covers.
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
            rows = await Memories(db).index_rows_for(user_id)
        return _UserIndex(
            ids=[row.id for row in rows], chats=[row.chat_id for row in rows],
            roles=[row.role for row in rows],
            lexical=LexicalIndex([with_date(row.text, row.started_at) for row in rows]),
            vectors=self._vectors(rows),
        )

    def _vectors(self, rows: Sequence[IndexRow]) -> np.ndarray:
        comparable = [
            np.frombuffer(row.embedding, dtype=np.float32)
            if row.embedding and same_space(row.space, self.space) else None
            for row in rows
        ]
        dims = next((v.shape[0] for v in reversed(comparable) if v is not None), 0)
        matrix = np.zeros((len(rows), dims), dtype=np.float32)
        for i, vector in enumerate(comparable):
            if vector is not None and vector.shape[0] == dims:
                matrix[i] = _normalise(vector)
        return matrix


def with_date(text: str, when: dt.datetime | None) -> str:
    """The unit's words and its session's date ("May 2023", "2023-05-08"), so a question that
    names a month or a day finds what was said then."""
    return text if when is None else f"{text}\n{when:%B %Y %Y-%m-%d}"


def same_space(stored: str | None, current: str) -> bool:
    """Whether a stored vector may be compared with the current embedder's.

    A vector stored before spaces were recorded came from the provider's endpoint."""
    if stored is None:
        return current.startswith("openai:")
    return stored == current


def fuse(lexical: np.ndarray, dense: np.ndarray, weight: float = DENSE_WEIGHT) -> np.ndarray:
    """Relative score fusion: each score scaled to 0..1 over the candidates, then mixed."""
    return (1 - weight) * _scaled(lexical) + weight * _scaled(dense)


def _scaled(scores: np.ndarray) -> np.ndarray:
    low, high = float(scores.min()), float(scores.max())
    if high - low < 1e-9:
        return np.zeros_like(scores)
    return (scores - low) / (high - low)


def _hit(record: MemoryRecord, score: float) -> MemoryHit:
    return MemoryHit(
        id=record.id, text=record.text, title=record.title, role=record.role,
        started_at=record.started_at, score=score, kind=record.kind,  # type: ignore[arg-type]
        session_id=record.session_id,
    )


def _normalise(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector
