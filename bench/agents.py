"""What acting costs per message: a tool round, Auto routing, a consult, next to a plain answer."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, install_cipher, new_key, table, workspace, write_result

EXPLAIN = """\
What is measured
  The agent (storage, graph, model gateway; no Telegram) in this process, on SQLite, against
  the fake model answering at once, N messages per scenario, each from a fresh user:
  plain      a pinned role without tools answers (one model call)
  tool       the Personal assistant calls list_reminders once, then answers (two calls)
  auto       a user on Auto: the session's first message is routed, then answered (two calls)
  consult    the Product manager asks the Coder, then answers (three calls)
  mcp        a role with an MCP server's tools (tests/mcp/calc_server.py, a real stdio server
             of the `mcp` SDK) calls calc_add once, then answers (two calls)
  Per message: wall time (p50, includes the fake model's own work in this process), model
  calls, and the tokens charged to the user's daily allowance. A real model call takes seconds:
  the extra calls, not the bot's milliseconds, are what a user waits for.
"""

ROUTER_MARK = "You choose which assistant answers"


def scripted(body: dict[str, Any]) -> Any:
    from tests.fakes.openai import ToolCall, ToolCalls

    system = str(body["messages"][0]["content"])
    last = body["messages"][-1]
    if system.startswith(ROUTER_MARK):
        return "coder"
    if last["role"] == "tool":
        return "Done, with what the tool said."
    if "tools" in body and "[tool]" in str(last.get("content")):
        return ToolCalls((ToolCall("list_reminders", {}),))
    if "tools" in body and "[mcp]" in str(last.get("content")):
        return ToolCalls((ToolCall("calc_add", {"a": 2, "b": 3}),))
    if "tools" in body and "[consult]" in str(last.get("content")):
        return ToolCalls((ToolCall("ask_coder", {"question": "How long would it take?"}),))
    return "A plain answer of a few words."


SCENARIOS = (
    ("plain", "coder", "[plain] how do I sort a list?"),
    ("tool", "personal_assistant", "[tool] what reminders do I have?"),
    ("auto", "auto", "[plain] how do I sort a list?"),
    ("consult", "product_manager", "[consult] should we build it?"),
    ("mcp", "calculator", "[mcp] what is 2 + 3?"),
)
CALCULATOR = """---
title: Calculator
tools: [mcp:calc]
---
You add numbers with the calc tools.
"""
CALC_SERVER = Path(__file__).resolve().parent.parent / "tests" / "mcp" / "calc_server.py"


async def run(messages: int) -> list[dict[str, Any]]:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from storage.db import create_engine, migrate, session_maker
    from storage.repositories import Budget
    from tests.conftest import PROJECT_PROMPTS, make_agent, make_settings
    from tests.fakes.openai import FakeOpenAI

    results = []
    async with workspace("agents") as work, FakeOpenAI(reply=scripted) as ai:
        install_cipher(new_key())
        url = f"sqlite+aiosqlite:///{work / 'agents.db'}"
        engine = create_engine(url)
        await migrate(engine)
        sessions: async_sessionmaker[AsyncSession] = session_maker(engine)
        prompts = work / "prompts"
        shutil.copytree(PROJECT_PROMPTS, prompts)
        (prompts / "calculator.md").write_text(CALCULATOR, encoding="utf-8")
        calc = {"calc": {"transport": "stdio", "command": sys.executable, "args": [str(CALC_SERVER)]}}
        settings = make_settings(work, ai.base_url, url, prompts, mcp_servers=json.dumps(calc))
        agent = make_agent(settings, sessions)
        try:
            for offset, (name, role, text) in enumerate(SCENARIOS):
                walls, calls, tokens = [], [], []
                for i in range(messages + 5):  # the first 5 warm up
                    user = 10_000 * (offset + 1) + i
                    await agent.set_role(user, role)
                    before = len(ai.chat_requests)
                    began = time.perf_counter()
                    async for _ in agent.handle_message(
                        user_id=user, chat_id=user, text=text, update_id=None
                    ):
                        pass
                    wall = time.perf_counter() - began
                    async with sessions() as db:
                        day = await Budget(db).day(user)
                    if i >= 5:
                        walls.append(wall * 1000)
                        calls.append(len(ai.chat_requests) - before)
                        tokens.append(0 if day is None else day.used)
                results.append({
                    "scenario": name, "messages": messages,
                    "wall_ms_p50": statistics.median(walls),
                    "model_calls": statistics.mean(calls), "tokens": statistics.mean(tokens),
                })
        finally:
            await agent.aclose()
            await engine.dispose()
    return results


def report(results: list[dict[str, Any]]) -> None:
    print(EXPLAIN)
    plain = next(r for r in results if r["scenario"] == "plain")
    rows = [
        [r["scenario"], r["messages"], f"{r['wall_ms_p50']:.1f}",
         f"{r['wall_ms_p50'] - plain['wall_ms_p50']:+.1f}", f"{r['model_calls']:.1f}",
         f"{r['tokens']:.0f}", f"{r['tokens'] - plain['tokens']:+.0f}"]
        for r in results
    ]
    print(table(["scenario", "messages", "wall p50 (ms)", "vs plain", "model calls", "tokens",
                 "vs plain"], rows, title="Per message, zero-latency model"))


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agents", description=__doc__)
    parser.add_argument("--messages", type=int, default=50, help="messages per scenario")
    args = parser.parse_args(argv)
    results = await run(args.messages)
    report(results)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    print(f"\nwritten: {write_result('agents', {'explain': EXPLAIN, 'results': results})}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
