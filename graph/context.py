"""What a graph run may use: the long-lived services and this call's identity."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from graph.model import ModelGateway
from graph.roles import Role, RoleRegistry
from graph.tracing import RunTrace
from memory.base import PRIVATE, MemoryScope, MemoryStore
from settings import Settings
from storage.core import HistoryEntry


@dataclass(frozen=True)
class Services:
    """Created once at start-up (bot.py) and shared by every run."""

    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    roles: RoleRegistry
    memory: MemoryStore
    models: ModelGateway


@dataclass
class TurnContext:
    """Passed at invoke time as Runtime[TurnContext]: who is asking, in which session."""

    services: Services
    user_id: int
    chat_id: int
    session_id: int
    question_id: int
    role: Role
    instructions: str | None
    history: list[HistoryEntry]  # read with the question (storage/turns.py), oldest first
    trace: RunTrace
    memory_scope: MemoryScope = PRIVATE  # which of the user's memories this chat may draw on
    # Set by the nodes, so a run cancelled midway (shutdown) can settle what it reserved.
    reservation_id: str | None = None
    model_started: bool = False
    # Where the model's deltas go as they arrive (the agent's DeltaFeed); None: nobody watches.
    on_delta: Callable[[str], None] | None = None


@dataclass
class SummaryContext:
    services: Services
    user_id: int
    session_id: int
    role_id: str
    title: str | None
    reason: str  # command | new_session | idle
    trace: RunTrace
    summary: str | None = None  # made at an earlier attempt that could not remember it
    attempts: int = 0  # summary attempts before this one
