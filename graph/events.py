"""What the agent tells the front ends: a turn's events and read-only views of stored data.

Plain values with no behaviour beyond formatting, importable without the graph, the model
client or the database engine: a front end that only shows them starts without loading those.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo

from graph.roles import Role

if TYPE_CHECKING:
    from storage.models import ChatSession, MemoryRecord, User

AUTO = "auto"  # the user's role choice "Auto"; a session waiting for its first message has it too


@dataclass(frozen=True)
class SessionStarted:
    session_id: int
    automatic: bool
    role: Role


@dataclass(frozen=True)
class Delta:
    text: str  # the newly generated piece, not the whole answer so far


@dataclass(frozen=True)
class Answer:
    text: str
    complete: bool  # False: the stream was cut and this is what arrived
    charged: int
    question_id: int = 0  # the message answered: what the answer used is found by it
    memories_used: int = 0  # remembered units its prompt drew on (shown under the answer)
    stopped: bool = False  # the user stopped it: what came is kept, marked partial


@dataclass(frozen=True)
class Usage:
    """Today's use of the daily allowance, and when it resets in the user's time zone."""

    used: int  # charged, and held for answers being made right now
    limit: int
    resets_at: dt.datetime  # in `timezone`
    timezone: str  # the user's, or UTC

    @property
    def left(self) -> int:
        return max(0, self.limit - self.used)

    @property
    def percent(self) -> int:
        return 100 if self.limit <= 0 else min(100, round(100 * self.used / self.limit))


@dataclass(frozen=True)
class BudgetWarning:
    """Most of the day's allowance is used (WARN_AT): said once a day, in the private chat."""

    usage: Usage


@dataclass(frozen=True)
class Refusal:
    used: int
    limit: int
    resets_at: dt.datetime


@dataclass(frozen=True)
class Failure:
    kind: Literal["busy", "unavailable", "timeout", "quota", "auth", "error", "deleted", "stopped"]


@dataclass(frozen=True)
class Duplicate:
    """The update was taken in before: nothing is answered or charged again."""


@dataclass(frozen=True)
class Routed:
    """Auto chose the role that answers this session (shown to the user with the answer)."""

    role: Role


@dataclass(frozen=True)
class Resumed:
    """A message a crash left unanswered is being answered now."""


TurnEvent = (
    SessionStarted | Routed | Resumed | Delta | Answer | Refusal | Failure | Duplicate | BudgetWarning
)


@dataclass(frozen=True)
class SessionEnd:
    session_id: int
    outcome: str  # summarised | empty | failed | already_closed
    title: str | None
    summary: str | None


@dataclass(frozen=True)
class UserView:
    """What front ends show of a user (a copy: never a live database row)."""

    id: int
    role: str | None
    instructions: str | None
    language: str | None
    private_data_in_groups: bool
    timezone: str | None
    memory_per_role: bool = False

    @classmethod
    def of(cls, user: User) -> UserView:
        return cls(user.id, user.role, user.instructions, user.language, user.private_data_in_groups,
                   user.timezone, user.memory_per_role)


@dataclass(frozen=True)
class SessionView:
    """What front ends show of a session (a copy: never a live database row)."""

    id: int
    role: str
    title: str | None
    summary: str | None
    status: str  # open | closed | summary_due
    started_at: dt.datetime
    incognito: bool = False
    chat_id: int = 0

    @classmethod
    def of(cls, session: ChatSession) -> SessionView:
        return cls(session.id, session.role, session.title, session.summary, session.status,
                   session.started_at, session.incognito, session.chat_id)


@dataclass(frozen=True)
class MemoryView:
    """One remembered unit as /memory shows it (a copy: never a live database row)."""

    session_id: int | None
    kind: str  # summary | fact | exchange
    seq: int
    text: str
    title: str | None
    role: str | None
    started_at: dt.datetime | None

    @classmethod
    def of(cls, record: MemoryRecord) -> MemoryView:
        return cls(record.session_id, record.kind, record.seq, record.text, record.title,
                   record.role, record.started_at)


@dataclass(frozen=True)
class ReminderView:
    """A reminder as front ends show and send it (a copy: never a live database row)."""

    id: int
    user_id: int
    chat_id: int
    text: str
    due_at: dt.datetime
    timezone: str | None  # the user's, to show the time as they read it
    language: str | None

    def local_due(self) -> str:
        zone = ZoneInfo(self.timezone) if self.timezone else dt.UTC
        return f"{self.due_at.astimezone(zone):%Y-%m-%d %H:%M}" + ("" if self.timezone else " UTC")


# "Auto" as the menus show it; never given to the graph (a session is routed to a real role).
AUTO_ROLE = Role(
    id=AUTO, title={"en": "Auto", "ru": "Авто"},
    description={"en": "The best-suited role answers each new session.",
                 "ru": "Каждую новую сессию ведёт самая подходящая роль."},
    button={"en": "🧭 Auto", "ru": "🧭 Авто"}, model=None, temperature=0.0, max_output_tokens=1,
    system_prompt="", path=Path(),
)


@dataclass(frozen=True)
class ImageInput:
    """A picture the user sent with the question (never stored: only its caption is)."""

    data: bytes
    mime: str
    width: int
    height: int

    @property
    def tokens(self) -> int:
        """What the provider bills for it in high detail (OpenAI's rule): fit in 2048 px, the
        short side to 768 px, then 170 tokens per 512 px tile plus 85. An upper bound for
        "auto" detail, so the reservation covers it."""
        width, height = float(max(self.width, 1)), float(max(self.height, 1))
        scale = min(1.0, 2048 / max(width, height))
        width, height = width * scale, height * scale
        scale = min(1.0, 768 / min(width, height))
        width, height = width * scale, height * scale
        return 85 + 170 * math.ceil(width / 512) * math.ceil(height / 512)

    def part(self) -> dict[str, Any]:
        url = f"data:{self.mime};base64,{base64.b64encode(self.data).decode()}"
        return {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}
