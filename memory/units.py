"""What a finished session leaves in long-term memory: its summary, its facts, its exchanges.

One summary per session loses what recall needs (on LoCoMo the evidence session was in the
top 3 for 56 % of questions with summaries alone, 87 % with these units; bench/README.md). So
the summariser's facts are each their own unit, and each question with its answer is kept as a
short searchable exchange. All carry the session's date and the chat they were made in.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from memory.base import MemoryItem

EXCHANGE_SIDE_CHARS = 600  # each side of an exchange; a long answer is cut, its gist is elsewhere
MOST_FACTS = 32  # the summariser is asked for at most 6; this bounds a runaway list
FACT_MAX_CHARS = 300

_SECTION = re.compile(r"^\s*(Title|Summary|Facts|Open questions)\s*:", re.MULTILINE)


@dataclass(frozen=True)
class FinishedSession:
    user_id: int
    session_id: int
    chat_id: int | None  # the group it was held in; None: the user's private chat
    role: str | None
    title: str | None
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    summary: str  # the summariser's note, normalised (Title/Summary/Facts/Open questions)
    transcript: list[tuple[str, str]]  # (user | assistant, text), in order


def session_units(session: FinishedSession) -> list[MemoryItem]:
    """The summary without its facts, each fact, each exchange: every unit of one session."""
    gist, facts = split_facts(session.summary)

    def unit(kind: str, seq: int, text: str) -> MemoryItem:
        return MemoryItem(
            user_id=session.user_id, session_id=session.session_id, title=session.title,
            text=text, role=session.role, started_at=session.started_at,
            ended_at=session.ended_at, chat_id=session.chat_id, kind=kind, seq=seq,  # type: ignore[arg-type]
        )

    units = [unit("summary", 0, gist)]
    units += [unit("fact", i, fact) for i, fact in enumerate(facts, 1)]
    units += [unit("exchange", i, text) for i, text in enumerate(exchanges(session.transcript), 1)]
    return units


def split_facts(summary: str) -> tuple[str, list[str]]:
    """The summary with its Facts section taken out, and the facts (bullets) it held."""
    sections = list(_SECTION.finditer(summary))
    facts: list[str] = []
    kept: list[str] = [summary[: sections[0].start()]] if sections else [summary]
    for i, found in enumerate(sections):
        end = sections[i + 1].start() if i + 1 < len(sections) else len(summary)
        body = summary[found.start():end]
        if found.group(1) != "Facts":
            kept.append(body)
            continue
        for line in body[found.end() - found.start():].splitlines():
            fact = line.strip().lstrip("-*•").strip()
            if fact:
                facts.append(fact[:FACT_MAX_CHARS])
    gist = "\n".join(part.strip() for part in kept if part.strip())
    return gist, facts[:MOST_FACTS]


def exchanges(transcript: list[tuple[str, str]]) -> list[str]:
    """Each question with the answer that followed it, both cut to EXCHANGE_SIDE_CHARS."""
    found: list[str] = []
    question: str | None = None
    for role, text in transcript:
        if role == "user":
            if question is not None:
                found.append(f"User: {_cut(question)}")
            question = text
        elif question is not None:
            found.append(f"User: {_cut(question)}\nAssistant: {_cut(text)}")
            question = None
    if question is not None:
        found.append(f"User: {_cut(question)}")
    return found


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= EXCHANGE_SIDE_CHARS else text[:EXCHANGE_SIDE_CHARS].rstrip() + "…"
