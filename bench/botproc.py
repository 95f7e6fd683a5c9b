"""The bot exactly as `python bot.py` runs it (polling), plus two opt-in probes.

Environment (besides the bot's own settings):
  BENCH_SQL  output path: SQL statements and commits counted over the measured phase (JSON);
             bench.overhead --sql
  BENCH_GC   output path: the cyclic collector's runs, total and longest pause per generation
             over the measured phase (JSON); bench.overhead and bench.throughput always set it
The driver marks the measured phase with SIGUSR1 (start) and SIGUSR2 (end); the bot itself
never sees these signals unless a probe is on.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_on_start: list[Callable[[], None]] = []
_on_end: list[Callable[[], None]] = []


def _phase_signals() -> None:
    def start(_sig: int, _frame: FrameType | None) -> None:
        for hook in _on_start:
            hook()

    def end(_sig: int, _frame: FrameType | None) -> None:
        for hook in _on_end:
            hook()

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, end)


def install_sql_counter(path: str) -> None:
    """Count every SQL statement (by verb and table) and every COMMIT the bot sends."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    state: dict[str, Any] = {"on": False, "statements": Counter(), "commits": 0,
                             "savepoints": 0}

    def before_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if state["on"]:
            state["statements"][_statement_kind(statement)] += 1

    def on_commit(conn: Any) -> None:
        if state["on"]:
            state["commits"] += 1

    def on_savepoint(conn: Any, name: Any) -> None:
        if state["on"]:
            state["savepoints"] += 1

    event.listen(Engine, "before_cursor_execute", before_execute)
    event.listen(Engine, "commit", on_commit)
    event.listen(Engine, "savepoint", on_savepoint)

    def start() -> None:
        state.update(on=True, statements=Counter(), commits=0, savepoints=0)

    def end() -> None:
        state["on"] = False
        Path(path).write_text(json.dumps({
            "statements": dict(state["statements"].most_common()),
            "total_statements": sum(state["statements"].values()),
            "commits": state["commits"], "savepoints": state["savepoints"],
        }, indent=2))

    _on_start.append(start)
    _on_end.append(end)


def install_gc_probe(path: str) -> None:
    """Time every cyclic-GC run (gc.callbacks): count, total and longest pause per generation."""
    state: dict[str, Any] = {"on": False, "began": 0.0, "runs": {}}

    def callback(phase: str, info: dict[str, int]) -> None:
        if not state["on"]:
            return
        if phase == "start":
            state["began"] = time.perf_counter()
            return
        took = time.perf_counter() - state["began"]
        runs = state["runs"].setdefault(str(info["generation"]), [0, 0.0, 0.0])
        runs[0] += 1
        runs[1] += took
        runs[2] = max(runs[2], took)

    gc.callbacks.append(callback)

    def start() -> None:
        state.update(on=True, runs={})

    def end() -> None:
        state["on"] = False
        Path(path).write_text(json.dumps({
            "thresholds": gc.get_threshold(),
            "generations": {gen: {"runs": n, "total_s": total, "max_s": longest}
                            for gen, (n, total, longest) in sorted(state["runs"].items())},
        }, indent=2))

    _on_start.append(start)
    _on_end.append(end)


def _statement_kind(statement: str) -> str:
    """The verb and the first table a statement names, e.g. 'SELECT messages'."""
    words = statement.split()
    upper = [w.upper() for w in words]
    verb = upper[0] if upper else "?"
    # An UPDATE names its table right after the verb; the others after FROM or INTO.
    keywords = ("UPDATE",) if verb == "UPDATE" else ("FROM", "INTO", "UPDATE")
    for keyword in keywords:
        if keyword in upper:
            index = upper.index(keyword) + 1
            if index < len(words):
                table = words[index].strip('"(').split("(")[0]
                return f"{verb} {table}"
            break
    return f"{verb} ?"


def main() -> int:
    if path := os.environ.get("BENCH_SQL"):
        install_sql_counter(path)
    if path := os.environ.get("BENCH_GC"):
        install_gc_probe(path)
    if _on_start or _on_end:
        _phase_signals()
    import bot

    return bot.main(["polling"])


if __name__ == "__main__":
    sys.exit(main())
