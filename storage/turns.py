"""The message path's three steps, each one transaction in one `run_sync` call: store the
question, reserve the budget, persist the turn.

Each runs storage/core.py statements back to back on one connection and commits, so a message
crosses into SQLAlchemy's greenlet three times in all, not once per statement.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from storage import core
from storage.core import HistoryEntry, OverBudget, Reserved, TurnRecord
from storage.models import utcnow


@dataclass(frozen=True)
class NewQuestion:
    user_id: int
    chat_id: int
    text: str
    update_id: int | None
    tokens: int
    language: str | None
    history_limit: int


@dataclass(frozen=True)
class StoredQuestion:
    session_id: int
    session_role: str
    question_id: int
    instructions: str | None
    history: list[HistoryEntry]  # the session's latest answered exchanges before it, oldest first
    private_in_groups: bool = False  # the user lets their private data into their group answers
    started: bool = False  # the session was opened for this message
    resumed: bool = False  # a crash left it unanswered; it is answered now
    daily_limit: int | None = None  # the user's own limit; None: DAILY_TOKEN_LIMIT
    incognito: bool = False  # stored without its text; the history is the answering process's
    memory_per_role: bool = False  # answers draw on memories made in the answering role only


def _store_question(
    session: Session, new: NewQuestion, choose_role: Callable[[str | None], str]
) -> StoredQuestion | None:
    now = utcnow()
    # The usual case, a known user in an open session: one read, then one write.
    conn = session.connection()
    known = core.user_and_session(conn, new.user_id, new.chat_id)
    if known is not None and known.session_id is not None:
        asked = core.ask_in_session(
            conn, session_id=known.session_id, user_id=new.user_id, chat_id=new.chat_id,
            text="" if known.incognito else new.text, update_id=new.update_id, tokens=new.tokens, now=now,
            history_limit=new.history_limit,
        )
        session.commit()
        if asked is None:
            return None  # a redelivery
        question_id, history = asked
        return StoredQuestion(
            known.session_id, known.session_role, question_id, known.instructions, history,
            known.private_data_in_groups, daily_limit=known.daily_limit,
            memory_per_role=known.memory_per_role, incognito=known.incognito,
        )
    session.commit()  # ends the statement-by-statement connection, if any
    return _store_opening(session, new, choose_role, now)


def _store_opening(
    session: Session, new: NewQuestion, choose_role: Callable[[str | None], str], now: dt.datetime
) -> StoredQuestion | None:
    """A new user or no open session: created with the question, in one transaction."""
    conn = session.connection()
    user = core.ensure_user(conn, new.user_id, new.language, now)
    chat_session = core.open_session_for(conn, new.user_id, new.chat_id)
    started = chat_session is None
    if chat_session is None:
        chat_session = core.open_session(conn, new.user_id, new.chat_id, choose_role(user.role), now)
    incognito = bool(chat_session.incognito)
    asked = core.ask_in_session(
        conn, session_id=chat_session.id, user_id=new.user_id, chat_id=new.chat_id,
        text="" if incognito else new.text, update_id=new.update_id, tokens=new.tokens, now=now,
        history_limit=new.history_limit,
    )
    if asked is None:
        session.rollback()  # a redelivery: a session opened just now is not kept
        return None
    question_id, history = asked
    session.commit()
    return StoredQuestion(
        chat_session.id, chat_session.role, question_id, user.instructions, history,
        user.private_data_in_groups, started, daily_limit=user.daily_limit,
        memory_per_role=user.memory_per_role, incognito=incognito,
    )


async def store_question(
    db: AsyncSession, new: NewQuestion, choose_role: Callable[[str | None], str]
) -> StoredQuestion | None:
    """Store the message (and its user and session, when new) and read the session's history;
    None when the update was stored before. choose_role(the user's role) names the role of a
    session this message opens."""
    return await db.run_sync(_store_question, new, choose_role)


@dataclass(frozen=True)
class BudgetAsk:
    user_id: int
    question_id: int
    limit: int
    ttl_seconds: int


async def reserve(
    db: AsyncSession, ask: BudgetAsk, size: Callable[[int], tuple[int, int]],
    now: dt.datetime | None = None,
) -> tuple[Reserved | OverBudget, int]:
    """Reserve what size(tokens left today) asks for -> (amount, max_tokens); a refusal marks
    the question refused. Returns the outcome and max_tokens. `now`: the clock (tests)."""

    def run(session: Session) -> tuple[Reserved | OverBudget, int]:
        conn = session.connection()
        at = now or utcnow()
        remaining, day_exists = core.left_today(conn, ask.user_id, ask.limit, at)
        amount, max_tokens = size(remaining)
        outcome = core.reserve(
            conn, ask.user_id, amount, ask.limit, ttl_seconds=ask.ttl_seconds, now=at,
            day_exists=day_exists,
        )
        if isinstance(outcome, OverBudget):
            core.set_status(conn, ask.question_id, "refused")
        session.commit()
        return outcome, max_tokens

    return await db.run_sync(run)


async def persist(db: AsyncSession, turn: TurnRecord) -> bool:
    """What a finished turn writes, all or nothing (storage/core.py record_turn). False (nothing
    written) when the question is gone; an answer to a deleted question raises IntegrityError."""

    def run(session: Session) -> bool:
        if not core.record_turn(session.connection(), turn, utcnow()):
            session.rollback()
            return False
        session.commit()
        return True

    return await db.run_sync(run)
