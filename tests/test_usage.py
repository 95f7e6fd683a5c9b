"""The allowance the user can see: a warning before it stops, /usage in the user's time zone,
an operator's view and per-user limit; memory limited to the answering role on request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from graph.agent import Agent, Answer, BudgetWarning, Refusal
from tests.fakes.openai import FakeOpenAI
from tests.harness import Harness, running_bot
from tests.test_graph import say

USER, ADMIN, GROUP = 4001, 4999, -100444
WARNING = "of today's allowance is used"


@pytest.fixture
async def h(
    tmp_path: Path, db_url: str, sessions: async_sessionmaker[AsyncSession], prompts_dir: Path,
    fake_openai: FakeOpenAI,
) -> AsyncIterator[Harness]:
    async with running_bot(
        tmp_path, db_url, sessions, prompts_dir, fake_openai, daily_token_limit=8_000,
        admin_user_ids=frozenset({ADMIN}),
    ) as harness:
        harness.ai.reply = "Sure."
        yield harness


async def ask(h: Harness, user: int, text: str, chat: int | None = None) -> str:
    update = h.tg.send_text(user, text, chat_id=chat, chat_type="private" if chat is None else "group")
    reply = await h.reply_to(update, lambda m: "New session" not in (m.text or ""))
    return reply.text or ""


def warnings(h: Harness, chat: int) -> list[str]:
    return [m.text or "" for m in h.tg.chat_messages(chat) if WARNING in (m.text or "")]


async def test_the_user_is_warned_once_when_most_of_the_day_is_used(h: Harness) -> None:
    h.ai.usage_override = {"prompt_tokens": 1_500}  # each answer charges about 1,500 tokens
    for _ in range(8):
        await ask(h, USER, "tell me more")
        await asyncio.sleep(0.1)  # a warning follows its answer
        if warnings(h, USER):
            break
    usage = await h.agent.usage(USER)
    (warning,) = warnings(h, USER)
    assert usage.used >= 0.8 * usage.limit and f"{usage.percent} %" in warning
    assert usage.used < usage.limit  # warned before it stops

    await ask(h, USER, "one more")
    await asyncio.sleep(0.2)
    assert len(warnings(h, USER)) == 1  # once a day


async def test_usage_is_shown_in_the_users_time_zone_and_private_only(h: Harness) -> None:
    await ask(h, USER, "hello")
    await h.agent.set_timezone(USER, "Asia/Tokyo")

    shown = await ask(h, USER, "/usage")

    usage = await h.agent.usage(USER)
    assert f"Used {usage.used:,}".replace(",", " ") in shown
    assert "Asia/Tokyo" in shown and "09:00" in shown  # midnight UTC, in Tokyo
    in_group = await ask(h, USER, "/usage", chat=GROUP)
    assert "private chat" in in_group and "Used" not in in_group


async def test_an_operator_sees_everyones_use_and_sets_a_users_limit(h: Harness) -> None:
    await ask(h, USER, "hello")

    everyone = await ask(h, ADMIN, "/usage all")
    assert str(USER) in everyone and "8 000" in everyone

    assert "now 500" in await ask(h, ADMIN, f"/usage limit {USER} 500")
    refused = await ask(h, USER, "and now?")
    assert "limit" in refused.lower()
    assert "There's no user" in await ask(h, ADMIN, "/usage limit 777 100")

    # Another user cannot: their arguments are ignored and they see their own use.
    own = await ask(h, USER, f"/usage limit {USER} 99999")
    assert "Used" in own
    assert (await h.agent.usage(USER)).limit == 500
    assert "now the default" in await ask(h, ADMIN, f"/usage limit {USER} default")
    assert (await h.agent.usage(USER)).limit == 8_000


async def test_memory_can_be_limited_to_the_answering_role(
    agent_factory: Callable[..., Agent], fake_openai: FakeOpenAI,
) -> None:
    agent = agent_factory()
    fake_openai.reply = lambda body: (
        "Title: Go service\nSummary: A Go service.\nFacts:\n- The user's service is written in Go\n"
        if body["model"] == "gpt-4o-mini" else "Noted."
    )
    await agent.set_role(5, "coder")
    await say(agent, 5, "My service is written in Go")
    await agent.end_session(5, 5)
    await agent.set_role(5, "personal_assistant")

    await say(agent, 5, "what is my service written in?")
    assert "written in Go" in (fake_openai.last_system_prompt() or "")  # shared by default

    await agent.set_memory_per_role(5, True)  # read with each message: it applies at once
    await say(agent, 5, "what is my service written in?")
    assert "written in Go" not in (fake_openai.last_system_prompt() or "")

    fake_openai.reply = lambda body: (
        "Title: Small talk\nSummary: Small talk.\nFacts:\n" if body["model"] == "gpt-4o-mini"
        else "Noted."
    )
    await agent.end_session(5, 5)
    await agent.set_role(5, "coder")
    await say(agent, 5, "what is my service written in?")
    assert "written in Go" in (fake_openai.last_system_prompt() or "")  # the coder's own memory


async def test_the_warning_comes_after_the_answer_as_an_event(
    agent_factory: Callable[..., Agent], fake_openai: FakeOpenAI,
) -> None:
    agent = agent_factory(daily_token_limit=2_000)
    fake_openai.reply = "Sure."
    fake_openai.usage_override = {"prompt_tokens": 2_600}  # charged up to what was reserved
    events = await say(agent, 6, "hello")
    answer, warning = events[-2:]
    assert isinstance(answer, Answer) and isinstance(warning, BudgetWarning)
    assert warning.usage.used >= 1_600 and warning.usage.limit == 2_000
    later = await say(agent, 6, "more")
    assert not any(isinstance(e, BudgetWarning) for e in later)
    assert isinstance(later[-1], Refusal | Answer)


async def test_memory_per_role_is_chosen_in_personalize(h: Harness) -> None:
    update = h.tg.send_text(USER, "/personalize")
    menu = await h.reply_to(update)
    assert "All my roles share" in (menu.text or "")
    start = len(h.tg.calls)
    h.tg.press_button(USER, menu.message_id, "mrole:1")
    await h.tg.wait_for(lambda c: c.method == "answerCallbackQuery", start=start)
    assert (await h.agent.profile(USER, "en")).user.memory_per_role
