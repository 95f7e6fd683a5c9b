"""Stopping an answer while it streams.

In a private chat the preview is a Telegram draft shown with its stop control (`can_stop`);
pressing it sends a `stopped_message_generation` update naming the draft. In a group the preview
is a message with a Stop button that only the asker may press. Either sets the running turn's
stop event: the model stream is closed, what came is kept as a partial answer, and only the
tokens used are charged (graph/model.py, graph/nodes.py).

Stop updates skip the chat's queue (handlers/delivery.py): the answer they stop is what the
queue is waiting on. In a fleet the answer may be streaming in another process, so a stop this
process cannot find is published on Redis and every process looks among its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from aiogram import Router
from aiogram.filters.callback_data import CallbackData
from aiogram.types import CallbackQuery, InlineKeyboardMarkup, MessageGenerationStopped, Update
from aiogram.utils.keyboard import InlineKeyboardBuilder

from handlers.i18n import Catalog

log = logging.getLogger(__name__)

CHANNEL = "desktop:stop"
Kind = Literal["draft", "question"]


class StopAnswer(CallbackData, prefix="stop"):
    question: int  # the asker's message id in the chat


def stop_keyboard(question_message_id: int, catalog: Catalog, lang: str | None) -> InlineKeyboardMarkup:
    builder = InlineKeyboardBuilder()
    builder.button(text=catalog.plain(lang, "chat.stop"),
                   callback_data=StopAnswer(question=question_message_id))
    return builder.as_markup()


def jumps_the_queue(update: Update) -> bool:
    """A stop: handled at once, not after the answer it stops."""
    if update.stopped_message_generation is not None:
        return True
    query = update.callback_query
    return query is not None and (query.data or "").startswith(f"{StopAnswer.__prefix__}:")


@dataclass
class _Running:
    asker: int
    event: asyncio.Event


class Stoppable:
    """The answers streaming in this process, found by chat and draft id or question message."""

    def __init__(self, redis: Any = None) -> None:
        self._running: dict[tuple[int, Kind, int], _Running] = {}
        self._redis = redis

    @contextlib.contextmanager
    def running(self, chat_id: int, asker: int, *, draft: int, question: int) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        entry = _Running(asker, event)
        keys: list[tuple[int, Kind, int]] = [(chat_id, "draft", draft), (chat_id, "question", question)]
        for key in keys:
            self._running[key] = entry
        try:
            yield event
        finally:
            for key in keys:
                if self._running.get(key) is entry:
                    del self._running[key]

    async def stop(self, chat_id: int, kind: Kind, key: int, user_id: int | None) -> bool:
        """Stop the answer if it is streaming here (True), else ask the fleet. `user_id`: who
        pressed Stop (only the asker may); None for Telegram's own stop control, which only
        the private chat's user has."""
        if self.stop_here(chat_id, kind, key, user_id):
            return True
        if self._redis is not None:
            message = {"chat": chat_id, "kind": kind, "key": key, "user": user_id}
            await self._redis.publish(CHANNEL, json.dumps(message))
        return False

    def stop_here(self, chat_id: int, kind: Kind, key: int, user_id: int | None) -> bool:
        entry = self._running.get((chat_id, kind, key))
        if entry is None or (user_id is not None and user_id != entry.asker):
            return False
        entry.event.set()
        return True

    async def listen(self) -> None:
        """Stops published by other processes, for the answers streaming here (runs until
        cancelled; only with Redis)."""
        if self._redis is None:
            return
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(CHANNEL)
        try:
            async for message in pubsub.listen():
                try:
                    data = json.loads(message["data"])
                    self.stop_here(int(data["chat"]), data["kind"], int(data["key"]), data["user"])
                except (ValueError, KeyError, TypeError):
                    log.warning("malformed stop message ignored")
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()


async def draft_stopped(event: MessageGenerationStopped, stoppable: Stoppable) -> None:
    await stoppable.stop(event.chat.id, "draft", event.draft_id, None)


async def stop_pressed(
    query: CallbackQuery, callback_data: StopAnswer, stoppable: Stoppable, catalog: Catalog,
    lang: str | None,
) -> None:
    chat = query.message.chat.id if query.message is not None else query.from_user.id
    stopped = await stoppable.stop(chat, "question", callback_data.question, query.from_user.id)
    # Elsewhere in a fleet, or already finished: said the same way, the answer shows which.
    await query.answer(catalog.plain(lang, "chat.stopping" if stopped else "chat.stop_sent"))


def build_router() -> Router:
    """A fresh router each time: a router can belong to only one dispatcher."""
    router = Router(name=__name__)
    router.stopped_message_generation()(draft_stopped)
    router.callback_query(StopAnswer.filter())(stop_pressed)
    return router
