"""What a graph run may use: the long-lived services and this call's identity."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from graph.events import ImageInput
from graph.model import ModelGateway
from graph.roles import Role, RoleRegistry
from graph.tools import ToolBox
from graph.tracing import RunTrace
from memory.base import PRIVATE, MemoryScope, MemoryStore
from memory.embedders import Embedder
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
    embedder: Embedder
    tools: ToolBox = field(default_factory=ToolBox)


def _nowhere(_: Any) -> None:
    return None



@dataclass(frozen=True)
class TurnContext:
    """Passed at invoke time as Runtime[TurnContext]: who is asking, in which session.

    Read-only: what a node produces goes into the state, which the agent reads from the stream.
    """

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
    daily_limit: int = 0  # the user's allowance today (their own, or DAILY_TOKEN_LIMIT)
    incognito: bool = False  # nothing of the turn is stored or remembered, nor recalled
    images: tuple[ImageInput, ...] = ()  # pictures sent with the question
    model: str | None = None  # this turn's model when not the role's (a photo's vision model)
    # The role's tool sets offered in this chat (graph/tools.py), bound to this user when called.
    tool_names: tuple[str, ...] = ()
    # Set by the front end when the user stops the answer (graph/model.py closes the stream).
    stop: asyncio.Event | None = None
    # Where the run reports as it goes (the agent's TurnRun): each reservation as it is made,
    # the model's start, the answer's deltas. By default nowhere.
    report: Callable[[Any], None] = _nowhere


@dataclass(frozen=True)
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
