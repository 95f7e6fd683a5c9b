"""Auto: each new session is answered by the best-suited role, chosen once from its first
message by a small model call that the user's allowance pays for."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from graph.routing import ROUTER_PROMPT
from storage.repositories import Budget
from tests.fakes.openai import FakeOpenAI

ROUTER_MARK = ROUTER_PROMPT.split("{", 1)[0][:40]


def is_router(body: dict[str, Any]) -> bool:
    return ROUTER_MARK in str(body["messages"][0]["content"])


def model(body: dict[str, Any]) -> str:
    if is_router(body):
        asked = str(body["messages"][-1]["content"]).lower()
        return "coder" if "python" in asked else "product_manager"
    return "Here you go."


async def test_auto_sends_code_to_the_coder_and_planning_to_the_product_manager(
    start_bot: Any, fake_openai: FakeOpenAI, sessions: async_sessionmaker[AsyncSession],
) -> None:
    fake_openai.reply = model
    async with start_bot() as h:
        for user in (301, 302):
            assert (await h.agent.set_role(user, "auto")) is not None
        code = h.tg.send_text(301, "How do I reverse a list in Python?")
        routed = await h.reply_to(code, lambda m: "answers in this session" in (m.text or ""))
        assert "Coder" in (routed.text or "")
        await h.reply_to(code, lambda m: m.text == "Here you go.")
        plan = h.tg.send_text(302, "Help me plan the roadmap for next quarter")
        routed = await h.reply_to(plan, lambda m: "answers in this session" in (m.text or ""))
        assert "Product manager" in (routed.text or "")
        # The session keeps its role: a second message is not routed again.
        again = h.tg.send_text(301, "and in reverse order without a copy?")
        await h.reply_to(again, lambda m: m.text == "Here you go.")
        coder_sessions, _ = await h.agent.list_sessions(301, 0, 5)
        pm_sessions, _ = await h.agent.list_sessions(302, 0, 5)
    assert [s.role for s in coder_sessions] == ["coder"]
    assert [s.role for s in pm_sessions] == ["product_manager"]
    routers = [b for b in fake_openai.chat_requests if is_router(b)]
    assert len(routers) == 2  # one per session, none per message
    # The answers were made with the chosen roles' prompts.
    answers = [str(b["messages"][0]["content"]) for b in fake_openai.chat_requests if not is_router(b)]
    assert answers[0].startswith("You are a senior software engineer")
    assert answers[1].startswith("You are an experienced product manager")


async def test_routing_is_charged_to_the_user_once_per_session(
    start_bot: Any, fake_openai: FakeOpenAI, sessions: async_sessionmaker[AsyncSession],
) -> None:
    """The same message from a user on Auto and from one with the role pinned: the difference
    in their allowance is what routing cost."""
    fake_openai.reply = model
    text = "Help me plan the roadmap for next quarter"
    async with start_bot() as h:
        await h.agent.set_role(304, "auto")
        await h.agent.set_role(305, "product_manager")
        for user in (304, 305):
            await h.reply_to(h.tg.send_text(user, text), lambda m: m.text == "Here you go.")
    async with sessions() as db:
        auto, pinned = await Budget(db).day(304), await Budget(db).day(305)
    assert auto is not None and pinned is not None
    routing = auto.used - pinned.used
    router_call = next(b for b in fake_openai.chat_requests if is_router(b))
    assert 0 < routing <= router_call["max_tokens"] + 400  # one small call, in the allowance
    print(f"routing cost: {routing} tokens for the session's first message, 0 after it")


async def test_a_pinned_role_is_never_routed(start_bot: Any, fake_openai: FakeOpenAI) -> None:
    fake_openai.reply = model
    async with start_bot() as h:
        await h.agent.set_role(303, "coder")
        await h.reply_to(h.tg.send_text(303, "plan my week"), lambda m: m.text == "Here you go.")
    assert not any(is_router(b) for b in fake_openai.chat_requests)
