"""Tools a role agent may call: the built-in reminders, and tools of MCP servers.

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
import math
import time
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from langchain_core.tools import BaseTool, StructuredTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from graph.tokens import count_tokens
from storage.models import utcnow
from storage.repositories import Reminders, Users

if TYPE_CHECKING:
    from langchain_mcp_adapters.sessions import Connection

log = logging.getLogger(__name__)

MAX_TOOL_ROUNDS = 4  # model calls that may ask for tools in one turn; the next one must answer
TOOL_TIMEOUT = 10.0  # seconds one tool call may take (TOOL_TIMEOUT setting) before the model is told
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


class ToolArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateReminderArgs(ToolArgs):
    text: str = Field(min_length=1, max_length=MAX_REMINDER_TEXT,
                      description="What to remind the user of, in the user's own words.")
    when: str = Field(max_length=40, description=(
        "The local date and time in the user's time zone, ISO 8601 without an offset, "
        "e.g. 2026-12-04T09:00."
    ))


class CancelReminderArgs(ToolArgs):
    reminder_id: int = Field(description="The id list_reminders gave.")


class SetTimezoneArgs(ToolArgs):
    timezone: str = Field(max_length=64, description="An IANA time zone name, e.g. Europe/Berlin.")


class NoArgs(ToolArgs):
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
MCP_PREFIX = "mcp:"  # a role's `tools: [mcp:NAME]` names a server of MCP_SERVERS


def tools_for(names: tuple[str, ...], scope: ToolScope) -> list[BaseTool]:
    """The built-in tool sets among `names`, bound to `scope`'s user."""
    return [tool for name in names if name in TOOL_SETS for tool in TOOL_SETS[name](scope)]


class McpServers:
    """The tools of the operator's MCP servers (MCP_SERVERS), through langchain-mcp-adapters.

    Each server is started on first use and kept: one MCP session per server for the bot's life,
    which every call shares (a stdio server is a process: started per call, as the adapters do
    without a session, it cost ~0.4 s a call for a small Python server). A session is held by a
    task of its own, because the SDK's task groups must be entered and left in one task; it
    pings the server every PING_EVERY seconds, and when the server is gone (exited, connection
    dropped) its tools go with it and the next turn that names it starts it again. A server that
    cannot be reached only takes its own tools away (the bot answers without them) and is tried
    again at most every RETRY_EVERY seconds. Tool names carry the server's name (`calc_add`), so
    two servers, or a server and a built-in tool, never collide. MCP tools get no user id: they
    act on what the model passes them, within the tool timeout, like every tool call.
    """

    RETRY_EVERY = 60.0
    # Starting a server and listing its tools (a stdio server is a process with its own imports:
    # seconds on a busy machine) gets its own bound; the tool timeout bounds each call.
    LIST_TIMEOUT = 15.0
    PING_EVERY = 30.0

    def __init__(self, connections: dict[str, dict[str, Any]]) -> None:
        self.names = frozenset(connections)
        # Imported here: the MCP SDK and its web stack weigh megabytes a bot without
        # MCP_SERVERS should not carry.
        from langchain_mcp_adapters.client import MultiServerMCPClient

        self._client = MultiServerMCPClient(cast("dict[str, Connection]", connections))
        self._tools: dict[str, list[BaseTool]] = {}
        self._schemas: dict[str, tuple[dict[str, Any], ...]] = {}
        self._failed_at: dict[str, float] = {}
        self._held: dict[str, asyncio.Task[None]] = {}
        self._starting: dict[str, asyncio.Lock] = {}
        self._closing = asyncio.Event()

    async def tools(self, server: str) -> list[BaseTool]:
        if server in self._tools or server not in self.names:
            return self._tools.get(server, [])
        async with self._starting.setdefault(server, asyncio.Lock()):  # one start for many turns
            if server in self._tools:
                return self._tools[server]
            if time.monotonic() - self._failed_at.get(server, -math.inf) < self.RETRY_EVERY:
                return []
            ready: asyncio.Future[list[BaseTool]] = asyncio.get_running_loop().create_future()
            held = asyncio.create_task(self._hold(server, ready), name=f"mcp {server}")
            try:
                tools = await asyncio.wait_for(asyncio.shield(ready), self.LIST_TIMEOUT)
            except Exception as exc:
                held.cancel()
                self._failed_at[server] = time.monotonic()
                log.warning("MCP server %s unavailable: %s", server, type(exc).__name__)
                return []
            self._held[server] = held
            self._tools[server] = tools
            self._schemas[server] = tuple(convert_to_openai_tool(tool) for tool in tools)
        log.info("MCP server %s: %d tool(s)", server, len(tools))
        return tools

    async def schemas(self, server: str) -> tuple[dict[str, Any], ...]:
        await self.tools(server)
        return self._schemas.get(server, ())

    async def _hold(self, server: str, ready: asyncio.Future[list[BaseTool]]) -> None:
        """Start `server`, hand its tools to `ready`, keep the session until shutdown or until
        the server stops answering pings."""
        from langchain_mcp_adapters.tools import load_mcp_tools

        try:
            async with self._client.session(server) as session:
                ready.set_result(
                    await load_mcp_tools(session, server_name=server, tool_name_prefix=True)
                )
                while not self._closing.is_set():
                    try:
                        await asyncio.wait_for(self._closing.wait(), self.PING_EVERY)
                    except TimeoutError:
                        await asyncio.wait_for(session.send_ping(), self.LIST_TIMEOUT)
        except Exception as exc:
            if not ready.done():
                ready.set_exception(exc)
            elif not self._closing.is_set():
                log.warning("MCP server %s stopped answering: %s", server, type(exc).__name__)
        finally:
            # Its tools go: the next turn that names the server starts it again.
            self._tools.pop(server, None)
            self._schemas.pop(server, None)
            self._held.pop(server, None)

    async def aclose(self) -> None:
        """At shutdown: every session closed, every stdio server's process ended."""
        self._closing.set()
        if self._held:
            await asyncio.wait(list(self._held.values()), timeout=self.LIST_TIMEOUT)


class ToolBox:
    """Every tool set a role may name: the built-in ones, and the MCP servers configured."""

    def __init__(self, mcp: McpServers | None = None) -> None:
        self.mcp = mcp

    @classmethod
    def from_settings(cls, connections: dict[str, dict[str, Any]]) -> ToolBox:
        return cls(McpServers(connections) if connections else None)

    async def aclose(self) -> None:
        if self.mcp is not None:
            await self.mcp.aclose()

    async def schemas(self, names: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
        offered = list(schemas_for(tuple(n for n in names if n in TOOL_SETS)))
        for server in self._servers(names):
            offered.extend(await self.mcp.schemas(server) if self.mcp else ())
        return tuple(offered)

    async def bound(self, names: tuple[str, ...], scope: ToolScope) -> list[BaseTool]:
        tools = tools_for(names, scope)
        for server in self._servers(names):
            tools.extend(await self.mcp.tools(server) if self.mcp else ())
        return tools

    @staticmethod
    def _servers(names: tuple[str, ...]) -> list[str]:
        return [n.removeprefix(MCP_PREFIX) for n in names if n.startswith(MCP_PREFIX)]


@cache
def schemas_for(names: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
    """Built-in tool sets as the provider's `tools` parameter (JSON Schema from the argument
    models), built once: they do not depend on whom the tools act for, and a turn that calls no
    tool builds no tool at all (graph/nodes.py run_tools binds them to the user when called)."""
    unbound = ToolScope(0, 0, async_sessionmaker())
    return tuple(convert_to_openai_tool(tool) for tool in tools_for(names, unbound))


@cache
def _tokens_of(schemas_json: str, model: str) -> int:
    return count_tokens(schemas_json, model)


def schema_tokens(schemas: tuple[dict[str, Any], ...], model: str) -> int:
    """What the schemas add to every prompt that offers them."""
    return _tokens_of(json.dumps(schemas), model) if schemas else 0


async def run_tool(
    tools: list[BaseTool], name: str, call_id: str, arguments: str, timeout: float = TOOL_TIMEOUT
) -> ToolOutcome:
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
    timeout = float((tool.metadata or {}).get("timeout", timeout))
    try:
        result = await asyncio.wait_for(tool.ainvoke(args), timeout)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)
        )
        return ToolOutcome(name, call_id, f"error: invalid arguments ({problems})", False)
    except ToolRefused as exc:
        return ToolOutcome(name, call_id, f"error: {exc}", False)
    except TimeoutError:
        return ToolOutcome(name, call_id, f"error: the tool did not answer in {timeout:g} s", False)
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
