"""Update middleware: the user's language, senders the bot ignores, access control."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiogram import BaseMiddleware
from aiogram.types import TelegramObject, Update, User

from handlers.formatting import strip_html
from handlers.i18n import Catalog
from settings import Settings

log = logging.getLogger(__name__)

# Telegram itself: the sender of channel posts automatically forwarded to a linked group.
TELEGRAM_SERVICE_ID = 777000

Handler = Callable[[TelegramObject, dict[str, Any]], Awaitable[Any]]


class UpdateMiddleware(BaseMiddleware):
    """Outer middleware on dp.update: the per-update essentials, in one place and one order."""

    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]) -> Any:
        assert isinstance(event, Update)
        user: User | None = data.get("event_from_user")
        lang = user.language_code if user else None
        data["lang"] = lang
        if user is not None and (user.is_bot or user.id == TELEGRAM_SERVICE_ID):
            return None  # other bots, and channel posts Telegram forwards into groups
        message = event.message
        if message is not None and (message.is_automatic_forward or message.sender_chat is not None):
            return None  # written on behalf of a channel or a group, not by a person
        if user is None and event.message is not None:
            return None  # no sender (Telegram omits it only in channels): nobody to answer or charge
        if user is not None and not self._allowed(user.id):
            await self._refuse(event, lang, user.id)
            return None
        # Redeliveries were already dropped by the inbox (handlers/delivery.py). No database
        # session is opened here: each step that needs one opens its own, briefly.
        return await handler(event, data)

    def _allowed(self, user_id: int) -> bool:
        allowed = self.settings.allowed_user_ids
        return not allowed or user_id in allowed or user_id in self.settings.admin_user_ids

    async def _refuse(self, update: Update, lang: str | None, user_id: int) -> None:
        text = self.catalog.text(lang, "access.not_allowed", user_id=user_id)
        if update.message is not None and update.message.chat.type == "private":
            await update.message.answer(text)
        elif update.callback_query is not None:
            await update.callback_query.answer(strip_html(text), show_alert=True)
