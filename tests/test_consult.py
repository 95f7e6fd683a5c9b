"""Consult: the Product manager asks the Coder for an estimate inside one turn."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.models import Trace
from storage.repositories import Budget
from tests.fakes.openai import FakeOpenAI, ToolCall, ToolCalls

PM = "You are an experienced product manager"
CODER = "You are a senior software engineer"


def model(body: dict[str, Any]) -> str | ToolCalls:
    system = str(body["messages"][0]["content"])
    last = body["messages"][-1]
    if system.startswith(CODER):
        assert "tools" not in body  # a consulted role cannot consult in turn
        return "About three days, most of it on the sync."
    if last["role"] == "tool":
        return f"The Coder estimates: {last['content']}"
    if system.startswith(PM) and "tools" in body:
        return ToolCalls((ToolCall("ask_coder", {"question": "How long to build offline sync?"}),))
    return "no consult"


async def test_a_consult_is_two_model_calls_nested_in_one_trace_and_both_are_charged(
    start_bot: Any, fake_openai: FakeOpenAI, sessions: async_sessionmaker[AsyncSession],
) -> None:
    fake_openai.reply = model
    async with start_bot() as h:
        await h.agent.set_role(401, "product_manager")
        asked = h.tg.send_text(401, "Should we ship offline sync this quarter?")
        answer = await h.reply_to(asked, lambda m: "Coder estimates" in (m.text or ""))
        await h.agent.traces.flush()
    assert "About three days" in (answer.text or "")
    systems = [str(b["messages"][0]["content"])[:40] for b in fake_openai.chat_requests]
    assert [s.startswith(PM) for s in systems] == [True, False, True]
    assert systems[1].startswith(CODER)
    async with sessions() as db:
        trace = (await db.execute(
            select(Trace).where(Trace.user_id == 401, Trace.kind == "turn")
        )).scalars().one()
        day = await Budget(db).day(401)
    consults = [n for n in trace.nodes if n["node"] == "consult:coder"]
    assert len(consults) == 1 and consults[0]["parent"] == "run_tools" and consults[0]["tokens"] > 0
    # Three calls, each reserved and settled: the day holds what all three cost, nothing held.
    assert day is not None and day.reserved == 0 and day.used > consults[0]["tokens"]
