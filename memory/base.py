"""The long-term memory interface: a user's memory units, scoped to the chat they were made in.

A finished session is remembered as several units (memory/units.py): its summary, each fact the
summariser drew from it, and its exchanges (a question with its answer). Each is found on its
own, and what enters a prompt is grouped back by session, with the session's date.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Kind = Literal["summary", "fact", "exchange"]
KINDS: tuple[Kind, ...] = ("summary", "fact", "exchange")


@dataclass(frozen=True)
class MemoryItem:
    """One unit as it is remembered; the id makes a retried write idempotent."""

    user_id: int
    session_id: int | None
    title: str | None
    text: str
    role: str | None
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    chat_id: int | None = None  # the group chat it was made in; None: the user's private chat
    kind: Kind = "summary"
    seq: int = 0  # the fact's or exchange's place in its session

    @property
    def id(self) -> str:
        return memory_id(self.user_id, self.session_id, self.kind, self.seq)


def memory_id(user_id: int, session_id: int | None, kind: Kind = "summary", seq: int = 0) -> str:
    # A summary keeps the id summaries always had, so memories stored before units stay valid.
    if kind == "summary":
        return f"{user_id}:{session_id}"
    return f"{user_id}:{session_id}:{kind}:{seq}"


@dataclass(frozen=True)
class MemoryQuery:
    """What recall searches with: the words (lexical) and, when there is one, the vector."""

    text: str
    vector: list[float] | None
    limit: int  # units returned, best first
    words_must_match: bool = False  # a search (/find): only units sharing a word with the text


@dataclass(frozen=True)
class MemoryHit:
    id: str
    text: str
    title: str | None
    role: str | None
    started_at: dt.datetime | None
    score: float
    kind: Kind = "summary"
    session_id: int | None = None


@dataclass(frozen=True)
class MemoryScope:
    """Which of a user's memories a conversation may draw on.

    A private chat draws on the user's private memories. A group draws on what the user said in
    that group, and on their private memories only when the user allowed it (README, "Groups").
    """

    group_id: int | None = None  # None: the user's private chat
    with_private: bool = True
    every_chat: bool = False  # the owner looking through all of their own memories (/find)
    role: str | None = None  # only memories made in this role (the user's choice); None: any

    @classmethod
    def for_chat(
        cls, user_id: int, chat_id: int, private_in_groups: bool, role: str | None = None
    ) -> MemoryScope:
        # Telegram gives a private chat the id of the user it is with.
        if chat_id == user_id:
            return cls(role=role)
        return cls(group_id=chat_id, with_private=private_in_groups, role=role)

    def admits(self, chat_id: int | None, role: str | None = None) -> bool:
        """Whether a memory made in `chat_id` (None: private), in `role`, may be drawn on here."""
        if self.role is not None and role != self.role:
            return False
        if self.every_chat:
            return True
        if chat_id is None:
            return self.with_private
        return chat_id == self.group_id


PRIVATE = MemoryScope()
EVERY_CHAT = MemoryScope(every_chat=True)


def chat_scope(user_id: int, chat_id: int) -> int | None:
    """What a memory made in this chat is scoped to: None for the user's private chat."""
    return None if chat_id == user_id else chat_id


class MemoryStore(Protocol):
    """Every method is scoped to one user: no call can reach another user's memories."""

    space: str  # the embedder's vector space this store compares against

    async def search(
        self, user_id: int, query: MemoryQuery, scope: MemoryScope = PRIVATE
    ) -> list[MemoryHit]: ...

    async def add_many(
        self, items: Sequence[MemoryItem], vectors: Sequence[list[float] | None]
    ) -> None: ...

    async def has_any(self, user_id: int) -> bool: ...

    async def forget(self, user_id: int, ids: Sequence[str]) -> int:
        """Remove these units of the user from every index at once; how many there were."""
        ...

    async def export_user(self, user_id: int) -> list[dict[str, Any]]: ...

    async def delete_user(self, user_id: int) -> int: ...
