"""MCP tools through langchain-mcp-adapters, against a real MCP server (the `mcp` SDK) over stdio."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

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


async def test_an_mcp_tool_cut_off_while_its_server_starts_is_reported_as_too_slow() -> None:
    mcp = McpServers(json.loads(servers()), timeout=1.0)
    tools = await mcp.tools("calc")
    # 50 ms ends the call while the SDK is still starting the server's process for it.
    outcome = await run_tool(tools, "calc_slow", "call-1", "{}", timeout=0.05)
    assert not outcome.ok and outcome.result == "error: the tool did not answer in 0.05 s"
