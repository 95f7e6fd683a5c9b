"""Test data written through the entry points production uses (storage/turns.py, repositories)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from storage import turns
from storage.core import OverBudget, Reserved, TurnRecord
from storage.models import ChatSession


async def reserve(
    db: AsyncSession, user_id: int, amount: int, limit: int, *, ttl_seconds: int,
    now: dt.datetime | None = None, question_id: int = 0,
) -> Reserved | OverBudget:
    """Admit `amount` tokens for the user or refuse, as reserve_budget does (committed)."""
    ask = turns.BudgetAsk(user_id, question_id, limit, ttl_seconds)
    outcome, _ = await turns.reserve(db, ask, lambda _remaining: (amount, 0), now=now)
    return outcome


async def ask(
    db: AsyncSession, user_id: int, text: str, *, update_id: int | None, chat_id: int | None = None,
    tokens: int = 5, role: str = "coder",
) -> turns.StoredQuestion | None:
    """A question stored as a message arriving stores it (user and session made if new)."""
    new = turns.NewQuestion(
        user_id=user_id, chat_id=user_id if chat_id is None else chat_id, text=text,
        update_id=update_id, tokens=tokens, language="en", history_limit=20,
    )
    return await turns.store_question(db, new, lambda _role: role)


async def answer(
    db: AsyncSession, question: turns.StoredQuestion, user_id: int, text: str, *,
    chat_id: int | None = None, prompt_tokens: int = 10, completion_tokens: int = 4,
) -> None:
    """The question answered as a finished turn writes it (reservation settled)."""
    held = await reserve(db, user_id, prompt_tokens + completion_tokens, 10**9, ttl_seconds=600)
    assert isinstance(held, Reserved)
    assert await turns.persist(db, TurnRecord(
        user_id=user_id, chat_id=user_id if chat_id is None else chat_id,
        session_id=question.session_id, question_id=question.question_id,
        reservation_id=held.id, charged=prompt_tokens + completion_tokens, text=text,
        complete=True, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
    ))


async def last_active(db: AsyncSession, session_id: int, when: dt.datetime) -> None:
    """Pretend the session's last message came at `when` (committed)."""
    await db.execute(
        update(ChatSession).where(ChatSession.id == session_id).values(last_activity_at=when)
    )
    await db.commit()
