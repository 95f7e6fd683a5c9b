"""Several processes on shared state: per-chat locks in Redis, inbox drained chat by chat."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator

from aiogram.types import Update
from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError

from handlers.delivery import Delivery, chat_key
from handlers.stopping import jumps_the_queue
from storage.models import utcnow
from storage.repositories import Inbox

log = logging.getLogger(__name__)


class ChatLocks:
    """One holder per chat across the fleet: redis-py's token lock, renewed while held."""

    def __init__(self, redis: Redis, ttl: float, prefix: str = "desktop:chat-lock:") -> None:
        self.redis = redis
        self.ttl = ttl  # a holder that died frees its chats after this long
        self.prefix = prefix

    @contextlib.asynccontextmanager
    async def hold(self, chat_id: int) -> AsyncIterator[bool]:
        lock = self.redis.lock(f"{self.prefix}{chat_id}", timeout=self.ttl, blocking=False)
        if not await lock.acquire():
            yield False
            return
        renewer = asyncio.create_task(self._renew(lock))
        try:
            yield True
        finally:
            renewer.cancel()
            # Lost to expiry (this process stalled past the ttl): another holder may have it now.
            with contextlib.suppress(LockError):
                await lock.release()

    async def _renew(self, lock: Lock) -> None:
        with contextlib.suppress(LockError):  # lost to expiry: nothing left to renew
            while True:
                await asyncio.sleep(self.ttl / 3)
                await lock.extend(self.ttl, replace_ttl=True)


class SharedPacer:
    """The last visible update per chat, in Redis: any process answering a chat sees the others."""

    def __init__(self, redis: Redis, prefix: str = "desktop:chat-pace:") -> None:
        self.redis = redis
        self.prefix = prefix
        self._local: dict[int, float] = {}

    def wait_time(self, chat_id: int, interval: float) -> float:
        return max(0.0, self._local.get(chat_id, 0.0) + interval - time.time())

    def mark(self, chat_id: int) -> None:
        now = time.time()
        self._local[chat_id] = now
        # Fire and forget: pacing is advisory, and a Redis hiccup must not stall an answer.
        task = asyncio.get_running_loop().create_task(self._publish(chat_id, now))
        task.add_done_callback(lambda t: t.exception())

    async def _publish(self, chat_id: int, when: float) -> None:
        await self.redis.set(f"{self.prefix}{chat_id}", when, px=5_000)

    async def forget(self, chat_id: int) -> None:
        """The chat's pacing entry, here and in Redis (its key names the chat: a user, if private)."""
        self._local.pop(chat_id, None)
        await self.redis.delete(f"{self.prefix}{chat_id}")

    async def refresh(self, chat_id: int) -> None:
        """Learn when another process last wrote to this chat (called before an answer starts)."""
        value = await self.redis.get(f"{self.prefix}{chat_id}")
        if value is not None:
            self._local[chat_id] = max(self._local.get(chat_id, 0.0), float(value))


class FleetDelivery(Delivery):
    """Webhook delivery for several processes: whoever holds a chat's lock works its inbox in order."""

    def __init__(self, *args: object, locks: ChatLocks, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.locks = locks
        # An update waiting longer than a third of the lock's life has no live holder working on it.
        self.stranded_after = dt.timedelta(seconds=locks.ttl / 3)
        self.sweep_every = max(0.5, locks.ttl / 6)
        self._sweeper: asyncio.Task[None] | None = None

    def dispatch(self, update: Update) -> asyncio.Task[None]:
        if jumps_the_queue(update):  # not behind the chat's lock: it stops what holds it
            return self.run_now(update)
        return self._spawn(chat_key(update))

    def _spawn(self, chat_id: int) -> asyncio.Task[None]:
        task = asyncio.create_task(self.drain_chat(chat_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain_chat(self, chat_id: int) -> None:
        """Process the chat's waiting updates oldest first, then look once more after letting go."""
        while True:
            async with self.locks.hold(chat_id) as mine:
                if not mine:
                    return  # another process holds the chat; it will see this update too
                while (update := await self._next(chat_id)) is not None:
                    if not await self._process(update):
                        return  # Telegram refused a reply: tried again later, order kept
            # Something stored while we held the lock, by a process that then failed to take it?
            if await self._next(chat_id) is None:
                return

    async def _next(self, chat_id: int) -> Update | None:
        async with self.sessions() as db:
            row = await Inbox(db).next_for_chat(chat_id)
        if row is None or row.payload is None:
            return None
        return Update.model_validate_json(row.payload, context={"bot": self.bot})

    async def recover(self) -> int:
        """Too-old updates are answered with "please resend"; the rest wait for the sweeper."""
        self._sweeper = asyncio.create_task(self._sweep())
        return 0

    async def _sweep(self) -> None:
        """Chats whose holder died (or whose update slipped through) are picked up here."""
        while not self._stopping.is_set():
            try:
                cutoff = utcnow() - self.recovery_window
                async with self.sessions() as db:
                    for row in await Inbox(db).unprocessed():
                        if row.received_at < cutoff and row.payload is not None:
                            update = Update.model_validate_json(row.payload, context={"bot": self.bot})
                            async with self.locks.hold(chat_key(update)) as mine:
                                if mine:
                                    await self._too_late(update)
                    stranded = await Inbox(db).chats_waiting(utcnow() - self.stranded_after)
                for chat_id in stranded:
                    self._spawn(chat_id)
            except Exception as exc:
                log.warning("inbox sweep failed: %s", type(exc).__name__)
            await self._sleep(self.sweep_every)

    async def drain(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await super().drain()
