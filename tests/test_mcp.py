"""MCP tools through langchain-mcp-adapters, against a real MCP server (the `mcp` SDK) over stdio."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from graph.tools import McpServers, run_tool
from tests.fakes.openai import FakeOpenAI, ToolCall, ToolCalls

SERVER = Path(__file__).parent / "mcp" / "calc_server.py"
CALCULATOR = """---
title: Calculator
tools: [mcp:calc, mcp:broken]
---
You add numbers with the calc tools. Always answer in the language the user writes in.
"""


def servers() -> str:
    return json.dumps({
        "calc": {"transport": "stdio", "command": sys.executable, "args": [str(SERVER)]},
        # A server that cannot start: it takes only its own tools away.
        "broken": {"transport": "stdio", "command": sys.executable, "args": ["-c", "raise SystemExit(3)"]},
    })


def calculator(prompts_dir: Path) -> None:
    (prompts_dir / "calculator.md").write_text(CALCULATOR, encoding="utf-8")


def model_calling(tool: str, arguments: dict[str, Any]) -> Any:
    def reply(body: dict[str, Any]) -> str | ToolCalls:
        last = body["messages"][-1]
        if last["role"] == "tool":
            return f"Tool said: {last['content']}"
        if "tools" in body:
            return ToolCalls((ToolCall(tool, arguments),))
        return "no tools offered"

    return reply


async def test_an_mcp_tool_is_called_and_its_result_reaches_the_answer(
    start_bot: Any, fake_openai: FakeOpenAI, prompts_dir: Path,
) -> None:
    calculator(prompts_dir)
    fake_openai.reply = model_calling("calc_add", {"a": 2, "b": 3})
    async with start_bot(mcp_servers=servers()) as h:
        await h.agent.set_role(91, "calculator")
        asked = h.tg.send_text(91, "what is 2 + 3?")
        answer = await h.reply_to(asked, lambda m: "Tool said" in (m.text or ""), timeout=60)
    offered = {t["function"]["name"] for t in fake_openai.chat_requests[0]["tools"]}
    assert {"calc_add", "calc_slow"} <= offered and not any(n.startswith("broken") for n in offered)
    result = fake_openai.chat_requests[1]["messages"][-1]
    assert result["role"] == "tool" and "5" in result["content"]
    assert "5" in (answer.text or "")


async def test_a_hanging_mcp_tool_costs_the_user_the_timeout_and_no_more(
    start_bot: Any, fake_openai: FakeOpenAI, prompts_dir: Path,
) -> None:
    calculator(prompts_dir)
    fake_openai.reply = model_calling("calc_slow", {})
    async with start_bot(mcp_servers=servers(), tool_timeout=1.0) as h:
        await h.agent.set_role(92, "calculator")
        asked = h.tg.send_text(92, "run the slow one")
        answer = await h.reply_to(asked, lambda m: "Tool said" in (m.text or ""), timeout=60)
    assert "did not answer in 1 s" in (answer.text or "")


async def test_a_server_is_started_once_and_again_after_it_died_and_ends_at_shutdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(McpServers, "PING_EVERY", 0.2)
    mcp = McpServers(json.loads(servers()))

    async def server_pid() -> int | None:
        outcome = await run_tool(await mcp.tools("calc"), "calc_pid", "call", "{}", timeout=5.0)
        return int(re.findall(r"'text': '(\d+)'", outcome.result)[0]) if outcome.ok else None

    try:
        first = await server_pid()
        assert first is not None and await server_pid() == first  # one process answers every call
        os.kill(first, signal.SIGKILL)
        # Calls fail until a ping finds the server gone; then the next turn starts a new one.
        deadline = time.monotonic() + 20
        while (again := await server_pid()) in (None, first):
            assert time.monotonic() < deadline, "the dead server was not started again"
            await asyncio.sleep(0.1)
    finally:
        await mcp.aclose()
    with pytest.raises(ProcessLookupError):  # ended and reaped, not left running
        os.kill(again, 0)


async def test_an_mcp_tool_cut_off_at_its_deadline_is_reported_as_too_slow() -> None:
    mcp = McpServers(json.loads(servers()))
    try:
        outcome = await run_tool(await mcp.tools("calc"), "calc_slow", "call", "{}", timeout=0.05)
    finally:
        await mcp.aclose()
    assert not outcome.ok and outcome.result == "error: the tool did not answer in 0.05 s"
