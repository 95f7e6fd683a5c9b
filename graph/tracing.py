"""Traces of graph runs: node timings, model, usage and outcome; never message text."""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import sentry_sdk

from storage.models import Trace, utcnow

StateT = TypeVar("StateT")


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

    def note(self, **fields: Any) -> None:
        """Attach a fact to the node currently running (e.g. memory degraded)."""
        if self.nodes:
            self.nodes[-1].update(fields)

    def to_row(self) -> Trace:
        return Trace(
            id=self.id, user_id=self.user_id, session_id=self.session_id, kind=self.kind,
            started_at=self.started_at, duration_ms=(time.perf_counter() - self.started) * 1000,
            outcome=self.outcome, model=self.model, input_tokens=self.input_tokens,
            output_tokens=self.output_tokens, error=self.error, nodes=self.nodes,
        )


def traced(name: str, node: Callable[[StateT, Any], Awaitable[dict[str, Any]]]) -> Callable[
    [StateT, Any], Awaitable[dict[str, Any]]
]:
    """Wrap a node so its timing (and the class of any error) lands in the run's trace."""

    @functools.wraps(node)
    async def run(state: StateT, runtime: Any) -> dict[str, Any]:
        trace: RunTrace = runtime.context.trace
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
