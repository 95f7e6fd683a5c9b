"""/export_data and /delete_my_data: the user's data, taken out or wiped, in the private chat only."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from typing import TYPE_CHECKING

from aiogram import Router
from aiogram.filters import Command
from aiogram.filters.callback_data import CallbackData
from aiogram.fsm.storage.base import BaseStorage, DefaultKeyBuilder
from aiogram.fsm.storage.memory import MemoryStorage
from aiogram.fsm.storage.redis import RedisStorage
from aiogram.types import BufferedInputFile, CallbackQuery, Message
from aiogram.utils.keyboard import InlineKeyboardBuilder

from handlers.filters import HasText, InOwnersPrivateChat
from handlers.fleet import SharedPacer
from handlers.i18n import Catalog
from handlers.streaming import ChatPacer

if TYPE_CHECKING:
    from graph.agent import Agent

log = logging.getLogger(__name__)

CONFIRM_WINDOW_SECONDS = 300  # an old confirmation button must not delete anything


class DeleteChoice(CallbackData, prefix="del"):
    action: str  # yes | no
    issued: int  # unix time the question was asked


async def export_data(message: Message, agent: Agent, catalog: Catalog, lang: str | None) -> None:
    assert message.from_user is not None
    user_id = message.from_user.id
    progress = await message.answer(catalog.text(lang, "export.preparing"))
    try:
        document = await agent.export_data(user_id)
    except Exception as exc:
        log.error("export failed: %s", type(exc).__name__)
        await progress.edit_text(catalog.text(lang, "export.failed"))
        return
    payload = json.dumps(document, ensure_ascii=False, indent=2).encode("utf-8")
    name = f"desktop-export-{user_id}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}.json"
    await message.answer_document(
        BufferedInputFile(payload, filename=name),
        caption=catalog.text(
            lang, "export.ready_caption", sessions=len(document["sessions"]),
            messages=sum(len(s["messages"]) for s in document["sessions"]),
            memories=len(document["memories"]),
        ),
    )
    await progress.delete()


async def ask_delete(message: Message, catalog: Catalog, lang: str | None) -> None:
    issued = int(time.time())
    builder = InlineKeyboardBuilder()
    builder.button(
        text=catalog.plain(lang, "delete.buttons.confirm"),
        callback_data=DeleteChoice(action="yes", issued=issued),
    )
    builder.button(
        text=catalog.plain(lang, "delete.buttons.cancel"),
        callback_data=DeleteChoice(action="no", issued=issued),
    )
    builder.adjust(1)
    await message.answer(catalog.text(lang, "delete.confirm"), reply_markup=builder.as_markup())


async def forget_chat_states(storage: BaseStorage, user_id: int) -> int:
    """Delete the user's FSM state and data in every chat (a group's "waiting for your
    instructions" included), so nothing left behind acts for a deleted user. Returns how many."""
    if isinstance(storage, MemoryStorage):
        keys = [key for key in storage.storage if key.user_id == user_id]
        for key in keys:
            del storage.storage[key]
        return len(keys)
    if isinstance(storage, RedisStorage) and isinstance(storage.key_builder, DefaultKeyBuilder):
        builder = storage.key_builder
        # Keys end "...:<user id>:<state|data|lock>" with this builder (no destiny part).
        found = [
            key async for key in storage.redis.scan_iter(match=f"{builder.prefix}{builder.separator}*")
            if key.decode().split(builder.separator)[-2] == str(user_id)
        ]
        if found:
            await storage.redis.delete(*found)
        return len(found)
    raise TypeError(f"cannot forget states kept by {type(storage).__name__}")


async def confirm_delete(
    query: CallbackQuery, callback_data: DeleteChoice, agent: Agent, catalog: Catalog,
    lang: str | None, fsm_storage: BaseStorage, pacer: ChatPacer | SharedPacer,
) -> None:
    fresh = 0 <= time.time() - callback_data.issued <= CONFIRM_WINDOW_SECONDS
    if not fresh:
        await query.answer(catalog.plain(lang, "errors.stale_button"), show_alert=True)
        return
    await query.answer()
    message = query.message if isinstance(query.message, Message) else None
    if callback_data.action != "yes":
        if message is not None:
            await message.edit_text(catalog.text(lang, "delete.cancelled"))
        return
    try:
        receipt = await agent.delete_data(query.from_user.id)
    except Exception as exc:
        log.error("delete failed: %s", type(exc).__name__)
        if message is not None:
            await message.edit_text(catalog.text(lang, "delete.failed"))
        return
    await forget_chat_states(fsm_storage, query.from_user.id)
    await pacer.forget(query.from_user.id)  # the private chat's id is the user's
    text = catalog.text(
        lang, "delete.done", messages=receipt.messages, sessions=receipt.sessions,
        memories=receipt.memories,
    )
    if message is not None:
        await message.edit_text(text)


def build_router() -> Router:
    """A fresh router each time: a router can belong to only one dispatcher."""
    router = Router(name=__name__)
    # Groups get a pointer to the private chat (handlers/commands.py) before reaching these.
    router.message.filter(HasText())
    router.callback_query.filter(InOwnersPrivateChat())
    router.message(Command("export_data"))(export_data)
    router.message(Command("delete_my_data"))(ask_delete)
    router.callback_query(DeleteChoice.filter())(confirm_delete)
    return router
