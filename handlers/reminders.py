"""/reminders with cancel buttons, and the sending of reminders when they are due."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiogram import Bot, Router
from aiogram.exceptions import TelegramBadRequest, TelegramForbiddenError
from aiogram.filters import Command
from aiogram.filters.callback_data import CallbackData
from aiogram.types import CallbackQuery, InlineKeyboardMarkup, Message
from aiogram.utils.keyboard import InlineKeyboardBuilder

from graph.events import ReminderView
from handlers.filters import HasText, InOwnersPrivateChat
from handlers.i18n import Catalog

if TYPE_CHECKING:
    from graph.agent import Agent

log = logging.getLogger(__name__)

MAX_ID = 2**62  # callback data can be forged: a number beyond any id is a stale button


class ReminderCancel(CallbackData, prefix="rc"):
    id: int


def listing(
    reminders: list[ReminderView], catalog: Catalog, lang: str | None
) -> tuple[str, InlineKeyboardMarkup | None]:
    if not reminders:
        return catalog.text(lang, "reminders.none"), None
    lines = [catalog.text(lang, "reminders.header", count=len(reminders))]
    builder = InlineKeyboardBuilder()
    for index, reminder in enumerate(reminders, start=1):
        lines.append(catalog.text(
            lang, "reminders.item", index=index, when=reminder.local_due(), text=reminder.text
        ))
        builder.button(
            text=catalog.plain(lang, "reminders.buttons.cancel", index=index),
            callback_data=ReminderCancel(id=reminder.id),
        )
    builder.adjust(3)
    return "\n".join(lines), builder.as_markup()


async def list_reminders(message: Message, agent: Agent, catalog: Catalog, lang: str | None) -> None:
    assert message.from_user is not None
    text, markup = listing(await agent.reminders(message.from_user.id), catalog, lang)
    await message.answer(text, reply_markup=markup)


async def cancel_reminder(
    query: CallbackQuery, callback_data: ReminderCancel, agent: Agent, catalog: Catalog,
    lang: str | None,
) -> None:
    # Cancelled only if it is the pressing user's own waiting reminder.
    in_range = 0 < callback_data.id < MAX_ID
    cancelled = in_range and await agent.cancel_reminder(query.from_user.id, callback_data.id)
    await query.answer(catalog.plain(lang, "reminders.cancelled" if cancelled else "reminders.gone"))
    if isinstance(query.message, Message):
        text, markup = listing(await agent.reminders(query.from_user.id), catalog, lang)
        await query.message.edit_text(text, reply_markup=markup)


class ReminderNotifier:
    """Sends a due reminder to the chat it was asked for in (ops/jobs.py send_due_reminders)."""

    def __init__(self, bot: Bot, catalog: Catalog) -> None:
        self.bot = bot
        self.catalog = catalog

    async def __call__(self, reminder: ReminderView) -> bool:
        text = self.catalog.text(reminder.language, "reminders.due", text=reminder.text)
        try:
            await self.bot.send_message(reminder.chat_id, text)
        except (TelegramForbiddenError, TelegramBadRequest) as exc:
            # Blocked, or the chat is gone: it can never be delivered; do not try forever.
            log.info("reminder %s undeliverable: %s", reminder.id, type(exc).__name__)
        return True


def build_router() -> Router:
    """A fresh router each time: a router can belong to only one dispatcher."""
    router = Router(name=__name__)
    router.message.filter(HasText())
    # Reminders are private: their buttons work in the owner's private chat.
    router.callback_query.filter(InOwnersPrivateChat())
    router.message(Command("reminders"))(list_reminders)
    router.callback_query(ReminderCancel.filter())(cancel_reminder)
    return router
