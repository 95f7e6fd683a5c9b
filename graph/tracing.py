"""Traces of graph runs: node timings, model, usage and outcome; never message text."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

import sentry_sdk
from langgraph.runtime import Runtime
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.models import utcnow
from storage.repositories import Traces

log = logging.getLogger(__name__)

StateT = TypeVar("StateT", contravariant=True)


class TracedContext(Protocol):
    """A run context (a dataclass, as LangGraph requires) that carries the run's trace."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def trace(self) -> RunTrace: ...


ContextT = TypeVar("ContextT", bound=TracedContext)


@dataclass
class RunTrace:
    kind: str
    user_id: int
    session_id: int | None
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started_at: Any = field(default_factory=utcnow)
    started: float = field(default_factory=time.perf_counter)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    outcome: str = "unknown"
    error: str | None = None
    ended: float | None = None  # set when the run is over; later work is not the run's time

    def note(self, **fields: Any) -> None:
        """Attach a fact to the node currently running (e.g. memory degraded)."""
        steps = [node for node in self.nodes if "parent" not in node]
        if steps:
            steps[-1].update(fields)

    def child(self, name: str) -> dict[str, Any]:
        """A step inside the running node (a consulted role's call): its own entry in the trace,
        timed by the caller (`ms`), shown under its parent."""
        steps = [node for node in self.nodes if "parent" not in node]
        entry: dict[str, Any] = {
            "node": name, "parent": steps[-1]["node"] if steps else None,
            "start_ms": round((time.perf_counter() - self.started) * 1000, 3),
        }
        self.nodes.append(entry)
        return entry

    def end(self) -> None:
        if self.ended is None:
            self.ended = time.perf_counter()

    def to_row(self) -> dict[str, Any]:
        ended = self.ended if self.ended is not None else time.perf_counter()
        return {
            "id": self.id, "user_id": self.user_id, "session_id": self.session_id,
            "kind": self.kind, "started_at": self.started_at,
            "duration_ms": (ended - self.started) * 1000, "outcome": self.outcome,
            "model": self.model, "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens, "error": self.error, "nodes": self.nodes,
        }


class TraceLog:
    """Writes finished traces in batches, off the message path: one insert for many runs.

    A trace waits at most `delay` seconds; a crash loses at most that much diagnostics, never
    anything a user stored. Traces of a user deleted meanwhile are dropped, not re-created.
    """

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], *, delay: float = 0.5,
        max_batch: int = 200,
    ) -> None:
        self.sessions = sessions
        self.delay = delay
        self.max_batch = max_batch
        self._pending: list[dict[str, Any]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    def add(self, trace: RunTrace) -> None:
        self._pending.append(trace.to_row())
        if len(self._pending) >= self.max_batch:
            self._flush_soon(0)
        elif self._timer is None:
            self._flush_soon(self.delay)

    def forget_user(self, user_id: int) -> None:
        self._pending = [row for row in self._pending if row["user_id"] != user_id]

    async def flush(self) -> None:
        self._cancel_timer()
        if self._flushes:
            await asyncio.wait(set(self._flushes))
        batch, self._pending = self._pending, []
        if batch:
            await self._write(batch)

    async def aclose(self) -> None:
        await self.flush()

    def _flush_soon(self, delay: float) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(delay, self._start_flush)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _start_flush(self) -> None:
        self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.create_task(self._write(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _write(self, batch: list[dict[str, Any]]) -> None:
        for attempt in (1, 2):  # a user deleted between the check and the insert: once more
            try:
                async with self.sessions() as db:
                    if await Traces(db).add_for_living(batch):
                        await db.commit()
                return
            except Exception as exc:
                if attempt == 2 or not isinstance(exc, SQLAlchemyError):
                    log.warning("%d trace(s) not saved: %s", len(batch), type(exc).__name__)
                    return


class Node(Protocol[StateT, ContextT]):
    """A graph step as LangGraph calls it: the state, and the run's context as `runtime=`."""

    def __call__(self, state: StateT, runtime: Runtime[ContextT]) -> Awaitable[dict[str, Any]]: ...


def traced(name: str, node: Node[StateT, ContextT]) -> Node[StateT, ContextT]:
    """Wrap a node so its timing (and the class of any error) lands in the run's trace."""

    @functools.wraps(node)
    async def run(state: StateT, runtime: Runtime[ContextT]) -> dict[str, Any]:
        trace = runtime.context.trace
        entry: dict[str, Any] = {
            "node": name, "start_ms": round((time.perf_counter() - trace.started) * 1000, 3)
        }
        trace.nodes.append(entry)
        began = time.perf_counter()
        try:
            return await node(state, runtime)
        except Exception as exc:
            entry["error"] = type(exc).__name__
            trace.error = f"{name}: {type(exc).__name__}"
            sentry_sdk.set_tag("node", name)  # which step failed, for the report that follows
            raise
        finally:
            entry["ms"] = round((time.perf_counter() - began) * 1000, 3)

    return run
