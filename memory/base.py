"""The long-term memory interface: per-user summaries, searched by meaning."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class MemoryItem:
    """A session's summary as it is remembered; the id makes a retried write idempotent."""

    user_id: int
    session_id: int | None
    title: str | None
    text: str
    role: str | None
    started_at: dt.datetime | None
    ended_at: dt.datetime | None

    @property
    def id(self) -> str:
        return memory_id(self.user_id, self.session_id)


def memory_id(user_id: int, session_id: int | None) -> str:
    return f"{user_id}:{session_id}"


@dataclass(frozen=True)
class MemoryHit:
    id: str
    text: str
    title: str | None
    role: str | None
    started_at: dt.datetime | None
    score: float


class MemoryStore(Protocol):
    """Every method is scoped to one user: no call can reach another user's memories."""

    async def search(self, user_id: int, vector: list[float], k: int) -> list[MemoryHit]: ...

    async def add(self, item: MemoryItem, vector: list[float]) -> None: ...

    async def has_any(self, user_id: int) -> bool: ...

    async def export_user(self, user_id: int) -> list[dict[str, Any]]: ...

    async def delete_user(self, user_id: int) -> int: ...
