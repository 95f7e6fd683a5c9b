"""Outgoing flood control: wait exactly retry_after on 429 and send the same request again."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiogram import Bot, methods
from aiogram.client.session.middlewares.base import BaseRequestMiddleware, NextRequestMiddlewareType
from aiogram.exceptions import TelegramRetryAfter
from aiogram.methods import TelegramMethod
from aiogram.methods.base import Response, TelegramType

log = logging.getLogger(__name__)


class RetryAfterMiddleware(BaseRequestMiddleware):
    """Telegram says how long to wait; waiting less gets another 429, more wastes the user's time.

    403 (blocked by the user) and other errors pass straight through: they do not heal by waiting.
    """

    def __init__(self, max_waits: int = 5, max_total_wait: float = 120.0) -> None:
        self.max_waits = max_waits
        self.max_total_wait = max_total_wait

    async def __call__(
        self,
        make_request: NextRequestMiddlewareType[TelegramType],
        bot: Bot,
        method: TelegramMethod[TelegramType],
    ) -> Response[TelegramType]:
        waited = 0.0
        for attempt in range(self.max_waits + 1):
            try:
                return await make_request(bot, method)
            except TelegramRetryAfter as exc:
                if attempt == self.max_waits or waited + exc.retry_after > self.max_total_wait:
                    raise
                log.warning(
                    "flood control on %s: waiting %s s", type(method).__name__, exc.retry_after
                )
                waited += exc.retry_after
                await asyncio.sleep(exc.retry_after)
        raise AssertionError("unreachable")


def install(bot: Bot, **options: Any) -> None:
    bot.session.middleware(RetryAfterMiddleware(**options))
    pin_response_types()


# aiogram builds Response[<return type>] for every call, and pydantic caches those generic
# classes only weakly: under load the garbage collector frees them and each call rebuilds one
# (milliseconds of CPU each time). Holding the ones the bot uses keeps them cached.
_PINNED: list[type] = []
_USED_METHODS = (
    methods.SendMessage, methods.EditMessageText, methods.SendMessageDraft, methods.SendChatAction,
    methods.GetUpdates, methods.AnswerCallbackQuery, methods.DeleteMessage, methods.SendDocument,
    methods.SetMyCommands, methods.GetMe, methods.SetWebhook, methods.DeleteWebhook,
)


def pin_response_types() -> None:
    if not _PINNED:
        # Parametrised with values, as aiogram's own call does (a static checker sees no type here).
        response: Any = Response
        _PINNED.extend(response[m.__returning__] for m in _USED_METHODS)
