"""Filters shared by the routers: text messages, and where private data may be shown."""

from __future__ import annotations

from aiogram.filters import Filter
from aiogram.types import CallbackQuery, Message


class HasText(Filter):
    """F.text as a coroutine: aiogram runs a plain-function filter in a worker thread, per message.

    Commands match text only: aiogram's Command filter also reads a caption, and a caption is
    the question that comes with a photo or a file, not a command.
    """

    async def __call__(self, message: Message) -> bool:
        return bool(message.text)


class Carries(Filter):
    """A message carrying any of these parts, e.g. Carries("voice", "audio") for F.voice | F.audio,
    as a coroutine for the same reason as HasText: the media router sees every text message."""

    def __init__(self, *parts: str) -> None:
        self.parts = parts

    async def __call__(self, message: Message) -> bool:
        return any(getattr(message, part) for part in self.parts)


def is_private(message: Message) -> bool:
    return message.chat.type == "private"


class InOwnersPrivateChat(Filter):
    """A button pressed in the presser's own private chat: the only place private data is shown.

    Telegram gives a private chat the id of the user it is with, so a press anywhere else (a
    group, or a forwarded menu) fails here and falls through to the stale-button answer.
    """

    async def __call__(self, query: CallbackQuery) -> bool:
        message = query.message
        return (
            message is not None and message.chat.type == "private"
            and message.chat.id == query.from_user.id
        )


class PrivateReply(Filter):
    """Text typed in a private chat that is not a command: the answer to a question the bot
    asked there (with a StateFilter before it)."""

    async def __call__(self, message: Message) -> bool:
        return is_private(message) and not (message.text or "").startswith("/")


class InGroup(Filter):
    async def __call__(self, message: Message) -> bool:
        return not is_private(message)
