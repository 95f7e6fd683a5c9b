"""The state one graph run carries from node to node."""

from __future__ import annotations

from typing import TypedDict

from langchain_core.messages import BaseMessage

from graph.model import ModelResult
from memory.base import MemoryHit
from storage.core import OverBudget, Reserved


class TurnState(TypedDict, total=False):
    """One user message on its way to an answer."""

    text: str
    memories: list[MemoryHit]
    memory_failed: bool
    prompt: list[BaseMessage]
    prompt_tokens: int
    max_tokens: int
    reservation: Reserved | None
    refusal: OverBudget | None
    left_before: int  # tokens the day had left before the turn's first reservation
    result: ModelResult | None
    tool_rounds: int  # model calls so far that asked for tools
    earlier_text: str  # what the model said before its tool calls, shown with the answer
    earlier_charge: int  # what those calls were charged
    charged: int
    answer_text: str  # the answer as stored and shown (with what came before tool calls)
    outcome: str  # answered | partial | refused | failed | deleted


class SummaryState(TypedDict, total=False):
    """A session on its way to long-term memory."""

    transcript: list[tuple[str, str]]  # (role, text), oldest first
    summary: str | None
    title: str | None
    result: ModelResult | None
    remembered: bool
    deferred: str  # budget | provider: the memory is made later (the session closes all the same)
    outcome: str  # summarised | empty | deferred_budget | deferred_provider | already_closed
