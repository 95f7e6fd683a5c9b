"""An answer stored is an answer delivered: Telegram failing or the bot dying before the final
sendMessage costs the user nothing, and the answer arrives exactly once without a new model call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from handlers import delivery, streaming
from storage.models import InboxUpdate
from tests.fakes.telegram import FakeTelegram

ANSWER = "The stored answer."
USER = 4242


def final_answer(params: dict[str, Any]) -> bool:
    return params.get("text") == ANSWER


def delivered(tg: FakeTelegram) -> list[str]:
    return [m.text for m in tg.chat_messages(USER) if m.text == ANSWER]


async def inbox_state(sessions: async_sessionmaker[AsyncSession]) -> list[str]:
    async with sessions() as db:
        return list((await db.execute(select(InboxUpdate.state))).scalars())


async def final_sends(tg: FakeTelegram) -> int:
    """Tries at the final message, taken or refused."""
    return len([c for c in tg.calls_of("sendMessage") if final_answer(c.params)])


async def eventually(probe: Callable[[], Awaitable[Any]], expected: Any, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (found := await probe()) != expected:
        assert asyncio.get_running_loop().time() < deadline, f"still {found!r}, not {expected!r}"
        await asyncio.sleep(0.05)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery, "DELIVERY_RETRY_FIRST", 0.05)


async def test_a_telegram_5xx_on_the_final_message_delays_the_answer_never_loses_it(
    start_bot: Any, sessions: async_sessionmaker[AsyncSession]
) -> None:
    async with start_bot() as h:
        h.ai.reply = ANSWER
        # the streaming retries and the first redelivery all fail: Telegram is down a while
        h.tg.fail_next("sendMessage", error_code=500, times=4, when=final_answer)
        update = h.tg.send_text(USER, "question")
        await h.reply_to(update, lambda m: m.text == ANSWER, timeout=15)
        assert delivered(h.tg) == [ANSWER]
        assert len(h.ai.chat_requests) == 1  # the stored answer went out again, no new call
        assert not [m for m in h.tg.chat_messages(USER) if "went wrong" in (m.text or "")]
        await eventually(lambda: inbox_state(sessions), ["done"])


async def test_an_answer_cut_off_by_a_crash_is_delivered_once_after_the_restart(
    start_bot: Any, sessions: async_sessionmaker[AsyncSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The process dies after the answer's commit and before Telegram took it: here, Telegram
    # refuses every send until the bot stops, so nothing was delivered and the row stays new.
    monkeypatch.setattr(delivery, "DELIVERY_RETRY_FIRST", 3600.0)
    async with start_bot() as h:
        h.ai.reply = ANSWER
        h.tg.fail_next("sendMessage", error_code=502, times=100, when=final_answer)
        h.tg.send_text(USER, "question")
        await eventually(lambda: final_sends(h.tg), streaming.SEND_ATTEMPTS)
        assert delivered(h.tg) == []
        first_ai = h.ai
    assert await inbox_state(sessions) == ["new"]

    async with start_bot() as again:  # the restart: recovery finds the update in the inbox
        await again.tg.wait_for_message(USER, lambda m: m.text == ANSWER, timeout=10)
        assert delivered(again.tg) == [ANSWER]
        assert len(first_ai.chat_requests) == 1  # answered once, by the model, before the crash
    assert await inbox_state(sessions) == ["done"]


async def test_a_user_who_blocked_the_bot_is_not_retried(
    start_bot: Any, sessions: async_sessionmaker[AsyncSession]
) -> None:
    async with start_bot() as h:
        h.ai.reply = ANSWER
        h.tg.fail_next("sendMessage", error_code=403, times=100, when=final_answer)
        h.tg.send_text(USER, "question")
        await eventually(lambda: inbox_state(sessions), ["done"])
        assert await final_sends(h.tg) == 1
