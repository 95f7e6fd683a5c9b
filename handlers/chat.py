"""The catch-all: text goes to the agent and streams back; anything else gets a clear answer."""

from __future__ import annotations

import logging
import re
import time
import unicodedata
from typing import TYPE_CHECKING

from aiogram import Bot, Router
from aiogram.types import CallbackQuery, Message, Update
from aiogram.utils.chat_action import ChatActionSender

from graph.events import (
    Answer,
    BudgetWarning,
    Delta,
    Duplicate,
    Failure,
    ImageInput,
    Refusal,
    Resumed,
    Routed,
    SessionStarted,
)
from handlers.delivery import UNDELIVERED
from handlers.filters import HasText
from handlers.i18n import Catalog
from handlers.memory import used_memories_button
from handlers.stopping import Stoppable, stop_keyboard
from handlers.streaming import AnswerStream, ChatPacer
from handlers.usage import usage_text
from storage.crypto import DecryptionError

if TYPE_CHECKING:
    from graph.agent import Agent

log = logging.getLogger(__name__)

FAILURE_TEXTS = {
    "busy": "errors.model_busy",
    "unavailable": "errors.model_busy",
    "timeout": "errors.model_timeout",
    "quota": "errors.quota_exhausted",
    "auth": "errors.generic",
    "error": "errors.generic",
    "stopped": "chat.stopped_before_any",
}
ADMIN_ALERT_INTERVAL = 600.0
# After the first reaction (AnswerStream.react), "typing…" again while a long wait goes on (a
# tool, a consulted role): Telegram shows the action for ~5 s.
TYPING_EVERY = 4.0
_last_alert: dict[str, float] = {}


def addressed_text(
    message: Message, bot_username: str | None, bot_id: int, text: str | None = None
) -> str | None:
    """The text meant for the bot: all of it in private; in groups only when mentioned or replied to.
    `text`: what to read instead of the message's text (a file's caption)."""
    text = message.text or "" if text is None else text
    if message.chat.type == "private":
        return text
    replied = message.reply_to_message
    if replied is not None and replied.from_user is not None and replied.from_user.id == bot_id:
        return text
    if bot_username:
        # Search the original text: lower() may change its length ("İ" becomes two characters).
        found = re.search(rf"@{re.escape(bot_username)}\b", text, flags=re.IGNORECASE)
        if found:
            return (text[:found.start()] + text[found.end():]).strip()
    return None


def has_visible_text(text: str) -> bool:
    """False for whitespace and invisible format characters only (zero-width spaces, BOM...)."""
    return any(not ch.isspace() and unicodedata.category(ch) != "Cf" for ch in text)


async def chat(
    message: Message, event_update: Update, bot: Bot, agent: Agent, catalog: Catalog,
    pacer: ChatPacer, stoppable: Stoppable, lang: str | None, expired: bool = False,
) -> None:
    assert message.from_user is not None and message.text is not None
    if expired:  # left unanswered by a crash longer ago than the recovery window
        await message.answer(catalog.text(lang, "recovery.resend"))
        return None
    me = await bot.me()
    text = addressed_text(message, me.username, me.id)
    if text is None:
        return None  # group chatter not meant for the bot
    text = text.strip()
    if not has_visible_text(text):
        await message.reply(catalog.text(lang, "input.empty_text"))
        return None
    limit = agent.services.settings.max_message_chars
    if len(text) > limit:
        await message.reply(catalog.text(lang, "input.text_too_long", length=len(text), max=limit))
        return None
    await respond(message, text, event_update, bot, agent, catalog, pacer, stoppable, lang)


async def respond(
    message: Message, text: str, event_update: Update, bot: Bot, agent: Agent, catalog: Catalog,
    pacer: ChatPacer, stoppable: Stoppable, lang: str | None, images: tuple[ImageInput, ...] = (),
) -> None:
    """Answer `text` as the message's question (typed, transcribed or read from a file),
    streamed into the chat, stoppable while it streams."""
    assert message.from_user is not None
    private = message.chat.type == "private"
    stream = AnswerStream(
        bot, message.chat.id, private=private, pacer=pacer,
        reply_to=None if private else message.message_id,
        stop_markup=None if private else stop_keyboard(message.message_id, catalog, lang),
    )
    running = stoppable.running(
        message.chat.id, message.from_user.id, draft=stream.draft_id, question=message.message_id
    )
    stream.react()
    try:
        async with ChatActionSender.typing(
            bot=bot, chat_id=message.chat.id, interval=TYPING_EVERY, initial_sleep=TYPING_EVERY
        ):
            with running as stop:
                async for event in agent.handle_message(
                    user_id=message.from_user.id, chat_id=message.chat.id, text=text,
                    update_id=event_update.update_id, language=lang, stop=stop, images=images,
                ):
                    await _show(event, stream, message, bot, agent, catalog, lang)
    except UNDELIVERED:
        await stream.abandon()
        raise  # the answer is stored: delivery tries again (handlers/delivery.py)
    except DecryptionError:
        await stream.abandon()
        await message.answer(catalog.text(lang, "errors.decrypt_failed"))
        await alert_admins(bot, agent, catalog, "decrypt_failed", user_id=message.from_user.id)
    except Exception:
        await stream.abandon()
        await message.answer(catalog.text(lang, "errors.generic"))
        raise  # logged by aiogram (class and traceback; never the message text) and sent to Sentry


async def _show(
    event: object, stream: AnswerStream, message: Message, bot: Bot, agent: Agent,
    catalog: Catalog, lang: str | None,
) -> None:
    if isinstance(event, SessionStarted):
        await message.answer(catalog.text(lang, "session.auto_started", role=event.role.label(lang)))
    elif isinstance(event, Routed):
        await message.answer(catalog.text(lang, "chat.routed", role=event.role.label(lang)))
    elif isinstance(event, Resumed):
        await message.answer(catalog.text(lang, "recovery.answered"))
    elif isinstance(event, Delta):
        stream.add(event.text)
    elif isinstance(event, Answer):
        note = None if event.complete else catalog.text(
            lang, "chat.answer_stopped" if event.stopped else "chat.answer_cut"
        )
        # What shaped the answer, one press away (memories are private: private chats only).
        markup = (
            used_memories_button(event.question_id, event.memories_used, catalog, lang)
            if event.memories_used and message.chat.type == "private" else None
        )
        await stream.finish(event.text, note=note, markup=markup)
    elif isinstance(event, Refusal):
        await stream.abandon()
        await message.answer(catalog.text(
            lang, "budget.limit_reached", used=event.used, limit=event.limit,
            resets_at=f"{event.resets_at:%Y-%m-%d %H:%M}",
        ))
    elif isinstance(event, Failure):
        await stream.abandon()
        if event.kind == "deleted":
            return  # the user erased their data meanwhile: nothing more to say or keep
        await message.answer(catalog.text(lang, FAILURE_TEXTS[event.kind]))
        if event.kind in ("quota", "auth"):
            await alert_admins(bot, agent, catalog, "quota_exhausted")
    elif isinstance(event, Duplicate):
        await stream.abandon()
    elif isinstance(event, BudgetWarning):
        await message.answer(usage_text(event.usage, catalog, lang, "usage.warning"))


async def alert_admins(bot: Bot, agent: Agent, catalog: Catalog, kind: str, **params: object) -> None:
    """Tell the operator once per interval, not once per failing message."""
    now = time.monotonic()
    if now - _last_alert.get(kind, -ADMIN_ALERT_INTERVAL) < ADMIN_ALERT_INTERVAL:
        return
    _last_alert[kind] = now
    log.error("operator alert: %s", kind)
    for admin in agent.services.settings.admin_user_ids:
        try:
            await bot.send_message(admin, catalog.text(None, f"admin.{kind}", **params))
        except Exception as exc:
            log.warning("admin alert not delivered: %s", type(exc).__name__)


async def unsupported(message: Message, bot: Bot, catalog: Catalog, lang: str | None) -> None:
    """Stickers, photos, voice, files...: a clear answer, no model call, no charge."""
    me = await bot.me()
    replied = message.reply_to_message
    to_bot = replied is not None and replied.from_user is not None and replied.from_user.id == me.id
    if message.chat.type == "private" or to_bot:
        await message.reply(catalog.text(lang, "input.unsupported_type"))


async def stale_button(query: CallbackQuery, catalog: Catalog, lang: str | None) -> None:
    """Buttons from old menus, or forged callback data: answered, never acted on."""
    await query.answer(catalog.plain(lang, "errors.stale_button"), show_alert=True)


def build_router() -> Router:
    """A fresh router each time: a router can belong to only one dispatcher."""
    router = Router(name=__name__)
    router.message(HasText())(chat)
    router.message()(unsupported)
    router.callback_query()(stale_button)
    return router
