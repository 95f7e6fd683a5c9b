"""Tools a role agent may call: the built-in reminders.

Least privilege (OWASP LLM06): a tool acts only for the user being answered. The user and the
chat come from the run's context, bound when a turn's tools are made (`tools_for`), never from
the model's arguments; every argument is validated here, in code, whatever the prompt says.
What a tool returns enters the prompt as data, fenced like memories (graph/nodes.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from dataclasses import dataclass
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from langchain_core.tools import BaseTool, StructuredTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from graph.tokens import count_tokens
from storage.models import utcnow
from storage.repositories import Reminders, Users

log = logging.getLogger(__name__)

MAX_TOOL_ROUNDS = 4  # model calls that may ask for tools in one turn; the next one must answer
TOOL_TIMEOUT = 10.0  # seconds one tool call may take before the model is told it failed
MAX_PENDING_REMINDERS = 20
MAX_REMINDER_TEXT = 500
EARLIEST_REMINDER = dt.timedelta(seconds=30)
LATEST_REMINDER = dt.timedelta(days=366)


@dataclass(frozen=True)
class ToolScope:
    """Whom the tools of one turn act for: set by the agent, never by the model."""

    user_id: int
    chat_id: int
    sessions: async_sessionmaker[AsyncSession]


@dataclass(frozen=True)
class ToolOutcome:
    name: str
    call_id: str
    result: str  # what the model reads (plain words; errors say what to do instead)
    ok: bool


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateReminderArgs(_Args):
    text: str = Field(min_length=1, max_length=MAX_REMINDER_TEXT,
                      description="What to remind the user of, in the user's own words.")
    when: str = Field(max_length=40, description=(
        "The local date and time in the user's time zone, ISO 8601 without an offset, "
        "e.g. 2026-12-04T09:00."
    ))


class CancelReminderArgs(_Args):
    reminder_id: int = Field(description="The id list_reminders gave.")


class SetTimezoneArgs(_Args):
    timezone: str = Field(max_length=64, description="An IANA time zone name, e.g. Europe/Berlin.")


class NoArgs(_Args):
    pass


class ToolRefused(Exception):
    """A call the tool will not carry out; the message tells the model why, plainly."""


def reminder_tools(scope: ToolScope) -> list[BaseTool]:
    """create / list / cancel reminders and set the time zone, bound to `scope`'s user."""

    async def create_reminder(text: str, when: str) -> str:
        async with scope.sessions() as db:
            user = await Users(db).get(scope.user_id)
            zone = _zone(user.timezone if user is not None else None)
            due = _due_at(when, zone, utcnow())
            made = await Reminders(db).add(
                scope.user_id, scope.chat_id, text.strip(), due, most_pending=MAX_PENDING_REMINDERS
            )
            if made is None:
                raise ToolRefused(
                    f"the user already has {MAX_PENDING_REMINDERS} reminders waiting; "
                    "ask them to cancel one first"
                )
            await db.commit()
            return json.dumps({"created": made.id, "due_local": _local(due, zone)})

    async def list_reminders() -> str:
        async with scope.sessions() as db:
            user = await Users(db).get(scope.user_id)
            zone = _zone_or_utc(user.timezone if user is not None else None)
            waiting = await Reminders(db).pending_for(scope.user_id)
        return json.dumps({"reminders": [
            {"id": r.id, "due_local": _local(r.due_at, zone), "text": r.text} for r in waiting
        ]}, ensure_ascii=False)

    async def cancel_reminder(reminder_id: int) -> str:
        async with scope.sessions() as db:
            # By id AND user: another user's reminder is "not found", whatever id is named.
            if not await Reminders(db).cancel(scope.user_id, reminder_id):
                raise ToolRefused(f"no waiting reminder {reminder_id} of this user")
            await db.commit()
        return json.dumps({"cancelled": reminder_id})

    async def set_timezone(timezone: str) -> str:
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ToolRefused(f"{timezone!r} is not an IANA time zone name") from None
        async with scope.sessions() as db:
            await Users(db).ensure(scope.user_id, None)
            await Users(db).set_timezone(scope.user_id, timezone)
            await db.commit()
        return json.dumps({"timezone": timezone})

    return [
        StructuredTool.from_function(
            coroutine=create_reminder, name="create_reminder", args_schema=CreateReminderArgs,
            description="Remind the user of something at a time. Needs the user's time zone "
            "(set_timezone) first.",
        ),
        StructuredTool.from_function(
            coroutine=list_reminders, name="list_reminders", args_schema=NoArgs,
            description="The user's waiting reminders, with their ids.",
        ),
        StructuredTool.from_function(
            coroutine=cancel_reminder, name="cancel_reminder", args_schema=CancelReminderArgs,
            description="Cancel one of the user's waiting reminders by its id.",
        ),
        StructuredTool.from_function(
            coroutine=set_timezone, name="set_timezone", args_schema=SetTimezoneArgs,
            description="Store the user's time zone, once they said where they are.",
        ),
    ]


TOOL_SETS = {"reminders": reminder_tools}


def tools_for(names: tuple[str, ...], scope: ToolScope) -> list[BaseTool]:
    return [tool for name in names for tool in TOOL_SETS[name](scope)]


@cache
def schemas_for(names: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
    """The tool sets as the provider's `tools` parameter (JSON Schema from the argument models),
    built once: they do not depend on whom the tools act for, and a turn that calls no tool
    builds no tool at all (graph/nodes.py run_tools binds them to the user when called)."""
    unbound = ToolScope(0, 0, async_sessionmaker())
    return tuple(convert_to_openai_tool(tool) for tool in tools_for(names, unbound))


@cache
def schema_tokens(names: tuple[str, ...], model: str) -> int:
    """What the schemas add to every prompt that offers them."""
    return count_tokens(json.dumps(schemas_for(names)), model) if names else 0


async def run_tool(tools: list[BaseTool], name: str, call_id: str, arguments: str) -> ToolOutcome:
    """One call the model asked for, validated and bounded in time; never raises."""
    tool = next((t for t in tools if t.name == name), None)
    if tool is None:
        return ToolOutcome(name, call_id, f"error: there is no tool named {name[:64]!r}", False)
    try:
        args = json.loads(arguments or "{}")
        if not isinstance(args, dict):
            raise ValueError("not an object")
    except ValueError:
        return ToolOutcome(name, call_id, "error: the arguments were not a JSON object", False)
    try:
        result = await asyncio.wait_for(tool.ainvoke(args), TOOL_TIMEOUT)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)
        )
        return ToolOutcome(name, call_id, f"error: invalid arguments ({problems})", False)
    except ToolRefused as exc:
        return ToolOutcome(name, call_id, f"error: {exc}", False)
    except TimeoutError:
        return ToolOutcome(name, call_id, f"error: the tool did not answer in {TOOL_TIMEOUT:.0f} s", False)
    except Exception as exc:
        log.warning("tool %s failed: %s", name, type(exc).__name__)
        failed = "error: the tool failed; tell the user it is not available now"
        return ToolOutcome(name, call_id, failed, False)
    return ToolOutcome(name, call_id, str(result), True)


def _zone(name: str | None) -> ZoneInfo:
    if not name:
        raise ToolRefused(
            "the user's time zone is not known: ask where they are, then call set_timezone"
        )
    return ZoneInfo(name)


def _zone_or_utc(name: str | None) -> ZoneInfo:
    return ZoneInfo(name) if name else ZoneInfo("UTC")


def _due_at(when: str, zone: ZoneInfo, now: dt.datetime) -> dt.datetime:
    """`when` read in the user's zone (an explicit offset wins), checked against now."""
    try:
        local = dt.datetime.fromisoformat(when.strip())
    except ValueError:
        raise ToolRefused(f"{when[:40]!r} is not a date and time like 2026-12-04T09:00") from None
    due = (local if local.tzinfo else local.replace(tzinfo=zone)).astimezone(dt.UTC)
    if due < now + EARLIEST_REMINDER:
        raise ToolRefused(
            f"that time is in the past (it is now {_local(now, zone)} for the user)"
        )
    if due > now + LATEST_REMINDER:
        raise ToolRefused("reminders can be set at most a year ahead")
    return due


def _local(moment: dt.datetime, zone: ZoneInfo) -> str:
    return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M")
