"""Delivery: a durable inbox in front of the dispatcher, so no update is lost or handled twice.

aiogram's own polling confirms an update (by asking for the next offset) before its handler has
finished, so a crash loses it. Here every update is stored first, in one transaction per batch,
and only then confirmed; it is processed in order within its chat, marked done afterwards, and
whatever a crash or a shutdown left unprocessed is processed again at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import re
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sentry_sdk
from aiogram import Bot, Dispatcher
from aiogram.exceptions import (
    TelegramConflictError,
    TelegramForbiddenError,
    TelegramNetworkError,
    TelegramRetryAfter,
    TelegramServerError,
    TelegramUnauthorizedError,
)
from aiogram.types import Update
from aiogram.types.update import UpdateTypeLookupError
from pydantic_core import PydanticSerializationError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from handlers.stopping import jumps_the_queue
from ops.monitoring import tag_context
from storage.models import utcnow
from storage.repositories import Inbox

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0
# Telegram did not take a reply (5xx, network): the update stays in the inbox and is processed
# again, which delivers the stored answer without a new model call (graph/agent.py _resumable).
UNDELIVERED = (TelegramServerError, TelegramNetworkError, TelegramRetryAfter)
DELIVERY_ATTEMPTS = 6  # then the update is set aside: Telegram has been failing for ~half an hour
DELIVERY_RETRY_FIRST = 5.0
DELIVERY_RETRY_MAX = 600.0


def _event(update: Update) -> object | None:
    try:
        return update.event
    except UpdateTypeLookupError:
        return None  # a type newer than this aiogram: stored, then skipped by the dispatcher


def chat_key(update: Update) -> int:
    """The chat whose order this update belongs to (the user, when there is no chat)."""
    event = _event(update)
    chat = getattr(event, "chat", None)
    if chat is None:  # a callback query: the chat of the message its button is on
        chat = getattr(getattr(event, "message", None), "chat", None)
    if chat is not None:
        return int(chat.id)
    user = getattr(event, "from_user", None)
    return int(user.id) if user is not None else 0


def user_of(update: Update) -> int | None:
    user = getattr(_event(update), "from_user", None)
    return int(user.id) if user is not None else None


# A database that does not answer: the batch is not confirmed, Telegram keeps it for us.
_INFRASTRUCTURE = (OperationalError, InterfaceError, OSError, TimeoutError)
BIGINT = range(-(2**63), 2**63)  # what the inbox's BIGINT columns hold


class UnstorableUpdate(Exception):
    """An update no retry can store: it is set aside instead of holding up the others."""


def set_aside(update_id: int, reason: str) -> None:
    """Log and report an update that will not be processed; never its content."""
    log.error("update %s set aside: %s", update_id, reason)
    sentry_sdk.capture_message(f"update set aside: {reason}", level="error")


@dataclass(frozen=True)
class InboxRow:
    update_id: int
    user_id: int | None
    chat_id: int
    payload: str

    @property
    def values(self) -> tuple[int, int | None, int, str]:
        return self.update_id, self.user_id, self.chat_id, self.payload


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _storable(update: Update, bot: Bot) -> tuple[Update, InboxRow]:
    """The update as it will be processed, and its inbox row; UnstorableUpdate if it cannot be."""
    user, chat = user_of(update), chat_key(update)
    if any(value is not None and value not in BIGINT for value in (update.update_id, user, chat)):
        raise UnstorableUpdate("an id out of range")
    try:
        payload = update.model_dump_json(exclude_none=True)
    except PydanticSerializationError:
        # A lone UTF-16 surrogate (Telegram passes on what a client sent) cannot be encoded as
        # UTF-8, so it could be neither stored nor sent to the model: each becomes U+FFFD.
        data = _replace_lone_surrogates(update.model_dump(mode="json", exclude_none=True))
        payload = json.dumps(data, ensure_ascii=False)
        update = Update.model_validate_json(payload, context={"bot": bot})
    return update, InboxRow(update.update_id, user, chat, payload)


def _replace_lone_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {key: _replace_lone_surrogates(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_replace_lone_surrogates(item) for item in value]
    return value


class Delivery:
    """Takes updates in (from getUpdates or a webhook), stores them, and runs them in chat order."""

    def __init__(
        self, bot: Bot, dispatcher: Dispatcher, sessions: async_sessionmaker[AsyncSession], *,
        recovery_window: dt.timedelta, shutdown_grace: float,
    ) -> None:
        self.bot = bot
        self.dispatcher = dispatcher
        self.sessions = sessions
        self.recovery_window = recovery_window
        self.shutdown_grace = shutdown_grace
        self._tails: dict[int, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()

    # --- taking updates in -----------------------------------------------------------------

    async def accept(self, updates: Iterable[Update]) -> list[Update]:
        """Store each update durably; returns the updates seen for the first time, in order.

        One update never holds up the others: what cannot be stored whatever we retry is set
        aside (a log line and a Sentry event, no content) and the rest go on. A database that
        does not answer raises, so nothing is confirmed to Telegram.
        """
        storable: list[tuple[Update, InboxRow]] = []
        for update in updates:
            try:
                storable.append(_storable(update, self.bot))
            except UnstorableUpdate as exc:
                set_aside(update.update_id, str(exc))
        rows = [row for _, row in storable]
        try:
            stored = await self._store(rows)
        except _INFRASTRUCTURE:
            raise
        except Exception:
            stored = [await self._store_alone(row) for row in rows]
        fresh = []
        for (update, _), first_time in zip(storable, stored, strict=True):
            if first_time:
                fresh.append(update)
            elif first_time is False:
                log.info("update %s redelivered: already taken in", update.update_id)
        return fresh

    async def _store(self, rows: list[InboxRow]) -> list[bool | None]:
        async with self.sessions() as db:
            stored: list[bool | None] = list(await Inbox(db).store_each([r.values for r in rows]))
            await db.commit()
        return stored

    async def _store_alone(self, row: InboxRow) -> bool | None:
        """True/False as store; None when this row is refused on its own (then set aside)."""
        try:
            return (await self._store([row]))[0]
        except _INFRASTRUCTURE:
            raise
        except Exception as exc:
            set_aside(row.update_id, f"the database refused it ({type(exc).__name__})")
            return None

    def dispatch(self, update: Update) -> asyncio.Task[None]:
        """Run the update after the ones before it in the same chat; other chats do not wait.
        A stop runs at once: the chat's queue is waiting on the answer it stops."""
        if jumps_the_queue(update):
            return self.run_now(update)
        key = chat_key(update)
        previous = self._tails.get(key)
        task = asyncio.create_task(self._after(previous, update))
        self._tails[key] = task
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._forget(key, done))
        return task

    def run_now(self, update: Update) -> asyncio.Task[None]:
        task = asyncio.create_task(self._run_now(update))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run_now(self, update: Update) -> None:
        await self._process(update)

    def _forget(self, key: int, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._tails.get(key) is task:
            del self._tails[key]

    async def _after(self, previous: asyncio.Task[None] | None, update: Update) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        await self._process(update)

    async def _process(self, update: Update) -> bool:
        """Run the update; it is done (and its payload dropped) once its replies went out.

        False when Telegram did not take a reply: the update stays in the inbox and is
        processed again later, which delivers what was stored (at least once, never lost).
        """
        try:
            with sentry_sdk.isolation_scope():
                tag_context(user_of(update), None, None)  # hashed: Sentry never sees the id
                await self.dispatcher.feed_update(self.bot, update)
        except asyncio.CancelledError:
            raise  # shutdown: left unprocessed in the inbox, handled again at the next start
        except UNDELIVERED as exc:
            if await self._retry_later(update, exc):
                return False
        except TelegramForbiddenError:
            log.info("update %s: the user blocked the bot", update.update_id)
        except Exception as exc:
            # Frames only: an exception's message may quote the user's text.
            log.error(
                "update %s failed: %s\n%s", update.update_id, type(exc).__name__,
                "".join(traceback.format_tb(exc.__traceback__)),
            )
        async with self.sessions() as db:
            await Inbox(db).mark_done(update.update_id)
            await db.commit()
        return True

    async def _retry_later(self, update: Update, exc: Exception) -> bool:
        """Count a failed delivery; True when the update will be tried again, False: set aside."""
        async with self.sessions() as db:
            attempts = await Inbox(db).count_attempt(update.update_id)
            await db.commit()
        if attempts >= DELIVERY_ATTEMPTS:
            set_aside(update.update_id, f"Telegram refused its replies {attempts} times")
            return False
        delay = min(DELIVERY_RETRY_FIRST * 2 ** (attempts - 1), DELIVERY_RETRY_MAX)
        log.warning(
            "update %s: reply not delivered (%s), again in %.0f s",
            update.update_id, type(exc).__name__, delay,
        )
        self._schedule_retry(update, delay)
        return True

    def _schedule_retry(self, update: Update, delay: float) -> None:
        """In this process; a restart finds the update in the inbox all the same (recover)."""
        loop = asyncio.get_running_loop()
        loop.call_later(delay, lambda: None if self._stopping.is_set() else self.dispatch(update))

    # --- crash recovery ----------------------------------------------------------------------

    async def recover(self) -> int:
        """Dispatch what a crash or a shutdown left unprocessed; too old: drop it, say so in the log."""
        async with self.sessions() as db:
            rows = await Inbox(db).unprocessed()
        cutoff = utcnow() - self.recovery_window
        recovered = 0
        for row in rows:
            if row.payload is None:
                continue
            update = Update.model_validate_json(row.payload, context={"bot": self.bot})
            if row.received_at >= cutoff:
                self.dispatch(update)
                recovered += 1
            else:
                await self._too_late(update)
        if recovered:
            log.warning("recovering %d update(s) left unprocessed by the last run", recovered)
        return recovered

    async def _too_late(self, update: Update) -> None:
        """Older than the recovery window: the user is told to resend, never silently dropped."""
        if update.message is not None and update.message.text:
            await self.dispatcher.feed_update(self.bot, update, expired=True)
        async with self.sessions() as db:
            await Inbox(db).mark_done(update.update_id)
            await db.commit()

    # --- polling -----------------------------------------------------------------------------

    async def poll(self, *, timeout: int = 25, allowed_updates: list[str] | None = None) -> None:
        """Long polling: the offset moves past an update only after the inbox holds it."""
        offset: int | None = None
        backoff = 1.0
        while not self._stopping.is_set():
            request = asyncio.create_task(self.bot.get_updates(
                offset=offset, timeout=timeout, allowed_updates=allowed_updates,
                request_timeout=timeout + 10,
            ))
            stop = asyncio.create_task(self._stopping.wait())
            await asyncio.wait([request, stop], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not request.done():
                request.cancel()  # stopping: whatever Telegram holds stays unconfirmed
                break
            try:
                updates = request.result()
            except TelegramUnauthorizedError:
                raise  # a wrong token does not heal by retrying
            except TelegramConflictError:
                log.error("another process is polling with this token (409): is the bot running twice?")
                await self._sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            except TelegramRetryAfter as exc:
                await self._sleep(exc.retry_after)
                continue
            except (TelegramNetworkError, TelegramServerError, OSError) as exc:
                log.warning("getUpdates failed (%s): retrying in %.0f s", type(exc).__name__, backoff)
                await self._sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            backoff = 1.0
            if not updates:
                continue
            try:
                fresh = await self.accept(updates)
            except Exception as exc:
                log.error("inbox unavailable (%s): updates stay with Telegram", type(exc).__name__)
                await self._sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            offset = updates[-1].update_id + 1
            for update in fresh:
                self.dispatch(update)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # --- shutdown ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop taking updates (SIGTERM); `drain` then finishes or hands back the work in flight."""
        self._stopping.set()

    async def drain(self) -> None:
        if not self._tasks:
            return
        log.info("finishing %d update(s) in flight", len(self._tasks))
        _, pending = await asyncio.wait(set(self._tasks), timeout=self.shutdown_grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
            log.warning("%d update(s) handed back: processed again at the next start", len(pending))
