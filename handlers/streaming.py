"""Show an answer while it is generated (drafts, or throttled edits) and always deliver it whole."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from aiogram import Bot
from aiogram.exceptions import (
    TelegramAPIError,
    TelegramBadRequest,
    TelegramForbiddenError,
    TelegramNetworkError,
    TelegramServerError,
)
from aiogram.types import InlineKeyboardMarkup, Message, MessageEntity, ReplyParameters
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from handlers.formatting import TELEGRAM_LIMIT, Part, render_parts

log = logging.getLogger(__name__)

SEND_ATTEMPTS = 3  # a final part, on Telegram 5xx or a dropped connection

DRAFT_INTERVAL = 0.3  # ~3 drafts a second: smooth, and well below Telegram's flood threshold
EDIT_INTERVAL = 1.0  # edits count as messages: at most one a second per chat
PREVIEW_LIMIT = 4000  # a preview shows the tail of a long answer within one message
CURSOR = " ▍"
REACTION_GRACE = 2.0  # seconds the answer waits for its own "Thinking…" to reach Telegram


class ChatPacer:
    """The last visible update per chat, shared by every answer in that chat."""

    def __init__(self) -> None:
        self._last: dict[int, float] = {}

    def wait_time(self, chat_id: int, interval: float) -> float:
        return max(0.0, self._last.get(chat_id, 0.0) + interval - time.monotonic())

    async def refresh(self, chat_id: int) -> None:
        """Nothing to learn: in one process every send to a chat goes through this pacer."""

    async def forget(self, chat_id: int) -> None:
        self._last.pop(chat_id, None)

    def mark(self, chat_id: int) -> None:
        self._last[chat_id] = time.monotonic()
        if len(self._last) > 10_000:  # forget chats that went quiet long ago
            cutoff = time.monotonic() - 60
            self._last = {c: t for c, t in self._last.items() if t > cutoff}


class AnswerStream:
    """Collects deltas; a painter task shows previews so a slow or flooded chat never stalls the model."""

    def __init__(
        self, bot: Bot, chat_id: int, *, private: bool, pacer: ChatPacer,
        reply_to: int | None = None, stop_markup: InlineKeyboardMarkup | None = None,
    ) -> None:
        self.bot = bot
        self.chat_id = chat_id
        self.pacer = pacer
        self.reply_to = reply_to
        self.use_drafts = private
        # A group's preview carries a Stop button (a draft has Telegram's own stop control).
        self.stop_markup = stop_markup
        self.draft_id = random.randint(1, 2**31 - 1)
        self.placeholder: Message | None = None
        self._text = ""
        self._shown: Part | None = None
        self._changed = asyncio.Event()
        self._closed = False
        self._finished = asyncio.Event()
        self._painter: asyncio.Task[None] | None = None
        self._reaction: asyncio.Task[None] | None = None
        self._reacting = False  # its request is on its way

    def react(self) -> None:
        """The first sign of life, without waiting for the model: Telegram's "Thinking…" draft
        in a private chat (it carries the stop control from the start), "typing…" in a group.
        Sent in the background, paced like a preview, and never after the answer has begun."""
        self._reaction = asyncio.create_task(self._react())

    def add(self, delta: str) -> None:
        self._text += delta
        self._changed.set()
        if self._painter is None:
            self._painter = asyncio.create_task(self._paint())

    @property
    def text(self) -> str:
        return self._text

    async def finish(
        self, final_text: str | None = None, note: str | None = None,
        markup: InlineKeyboardMarkup | None = None,
    ) -> list[Message]:
        """Stop previews and deliver the whole answer (split, formatted, plain as a fallback);
        `markup` goes under its last part."""
        await self._stop_painter()
        text = self._text if final_text is None else final_text
        if note:
            text = f"{text}\n\n{note}" if text else note
        if not text.strip():
            await self._drop_placeholder()
            return []
        parts = render_parts(text)
        return [
            await self._deliver_part(index, part, markup if index == len(parts) - 1 else None)
            for index, part in enumerate(parts)
        ]

    async def abandon(self) -> None:
        await self._stop_painter()
        await self._drop_placeholder()

    async def _deliver_part(
        self, index: int, part: Part, markup: InlineKeyboardMarkup | None = None
    ) -> Message:
        """One part with its entities; if Telegram rejects them, the same text plain (once).

        A Telegram 5xx or a dropped connection is tried again a few times here, seconds apart;
        past that the update stays in the inbox and delivery comes back to it later.
        """
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((TelegramServerError, TelegramNetworkError)),
            stop=stop_after_attempt(SEND_ATTEMPTS), wait=wait_random_exponential(0.5, 4.0),
            reraise=True,
        ):
            with attempt:
                return await self._deliver_formatted(index, part, markup)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _deliver_formatted(
        self, index: int, part: Part, markup: InlineKeyboardMarkup | None
    ) -> Message:
        try:
            return await self._send_part(index, part.text, part.telegram_entities(), markup)
        except TelegramBadRequest as exc:
            if not any(word in str(exc).lower() for word in ("parse", "entit", "url")):
                raise
            log.warning("formatting rejected by Telegram: part %d sent as plain text", index)
            return await self._send_part(index, part.text, None, markup)

    async def _send_part(
        self, index: int, text: str, entities: list[MessageEntity] | None,
        markup: InlineKeyboardMarkup | None = None,
    ) -> Message:
        # parse_mode=None always: the bot's default is HTML, which would read the text as markup.
        if index == 0 and self.placeholder is not None:
            return await self._edit_placeholder(text, entities, markup)
        sent = await self.bot.send_message(
            self.chat_id, text, parse_mode=None, entities=entities,
            reply_parameters=self._reply() if index == 0 else None, reply_markup=markup,
        )
        self.pacer.mark(self.chat_id)
        return sent

    def _reply(self) -> ReplyParameters | None:
        if self.reply_to is None:
            return None
        return ReplyParameters(message_id=self.reply_to, allow_sending_without_reply=True)

    async def _edit_placeholder(
        self, text: str, entities: list[MessageEntity] | None, markup: InlineKeyboardMarkup | None
    ) -> Message:
        assert self.placeholder is not None
        try:
            edited = await self.bot.edit_message_text(
                text, chat_id=self.chat_id, message_id=self.placeholder.message_id,
                parse_mode=None, entities=entities, reply_markup=markup,
            )
        except TelegramBadRequest as exc:
            if "not modified" not in str(exc):
                raise
            return self.placeholder
        self.pacer.mark(self.chat_id)
        return edited if isinstance(edited, Message) else self.placeholder

    async def _react(self) -> None:
        interval = DRAFT_INTERVAL if self.use_drafts else EDIT_INTERVAL
        # A chat shown something a moment ago (the answer before this one) waits its turn.
        if delay := self.pacer.wait_time(self.chat_id, interval):
            await asyncio.sleep(delay)
        self.pacer.mark(self.chat_id)
        self._reacting = True
        try:
            if self.use_drafts:
                await self.bot.send_message_draft(
                    chat_id=self.chat_id, draft_id=self.draft_id, text="", parse_mode=None,
                    can_stop=True, keep_on_stop=True,
                )
            else:
                await self.bot.send_chat_action(self.chat_id, "typing")
        except TelegramAPIError as exc:  # the answer does not depend on it
            log.info("first reaction not shown: %s", type(exc).__name__)

    async def _settle_reaction(self) -> None:
        """What the chat shows next must not be overtaken by a late "Thinking…": a reaction on
        its way is waited for (briefly: flood control may hold it), one still waiting for its
        turn is dropped."""
        if self._reaction is None:
            return
        if not self._reacting:
            self._reaction.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(self._reaction, REACTION_GRACE)
        self._reaction = None

    async def _stop_painter(self) -> None:
        self._closed = True
        self._finished.set()
        self._changed.set()
        await self._settle_reaction()
        if self._painter is not None:
            try:
                await self._painter
            except Exception as exc:
                log.warning("preview failed: %s", type(exc).__name__)
            self._painter = None

    async def _drop_placeholder(self) -> None:
        if self.placeholder is not None:
            with contextlib.suppress(TelegramAPIError):
                await self.bot.delete_message(self.chat_id, self.placeholder.message_id)
            self.placeholder = None

    async def _paint(self) -> None:
        await self._settle_reaction()
        await self.pacer.refresh(self.chat_id)
        while not self._closed:
            await self._changed.wait()
            self._changed.clear()
            if self._closed:
                return
            interval = DRAFT_INTERVAL if self.use_drafts else EDIT_INTERVAL
            delay = self.pacer.wait_time(self.chat_id, interval)
            if delay:
                await self._pause(delay)
                if self._closed:
                    return  # the answer is complete: the final message replaces any preview
            preview = self._preview()
            if preview is None or preview == self._shown:
                continue
            try:
                await self._show(preview)
            except TelegramForbiddenError:
                return  # the user blocked the bot: nothing more will be shown
            except TelegramBadRequest as exc:
                if self.use_drafts:
                    log.info("drafts refused (%s): falling back to edits", type(exc).__name__)
                    self.use_drafts = False
                    self._changed.set()
                    continue
                if "not modified" not in str(exc):
                    log.info("preview edit refused: %s", type(exc).__name__)
            self._shown = preview
            self.pacer.mark(self.chat_id)

    async def _pause(self, seconds: float) -> None:
        """Wait for the pacing interval, but not a moment longer once the answer is complete."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._finished.wait(), seconds)

    def _preview(self) -> Part | None:
        """The last message's worth of the answer so far, with a cursor; None while blank."""
        parts = render_parts(self._text[-PREVIEW_LIMIT:], TELEGRAM_LIMIT - len(CURSOR))
        return Part(parts[-1].text + CURSOR, parts[-1].entities) if parts else None

    async def _show(self, preview: Part) -> None:
        text, entities = preview.text, preview.telegram_entities()
        if self.use_drafts:
            # The stop control sends stopped_message_generation (handlers/stopping.py); the
            # draft stays until the partial answer replaces it.
            await self.bot.send_message_draft(
                chat_id=self.chat_id, draft_id=self.draft_id, text=text, parse_mode=None,
                entities=entities, can_stop=True, keep_on_stop=True,
            )
        elif self.placeholder is None:
            self.placeholder = await self.bot.send_message(
                self.chat_id, text, parse_mode=None, entities=entities,
                reply_parameters=self._reply(), reply_markup=self.stop_markup,
            )
        else:
            await self.bot.edit_message_text(
                text, chat_id=self.chat_id, message_id=self.placeholder.message_id,
                parse_mode=None, entities=entities, reply_markup=self.stop_markup,
            )
