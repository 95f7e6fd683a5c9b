"""Scheduled jobs: reminders, idle sessions, stale reservations, the memory outbox, old transcripts."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import sentry_sdk
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from storage.models import utcnow
from storage.repositories import Inbox, Messages, Sessions

if TYPE_CHECKING:
    from graph.agent import Agent, ReminderView

log = logging.getLogger(__name__)

IDLE_JOB = "end-idle-sessions"
SWEEP_JOB = "sweep-reservations"
OUTBOX_JOB = "retry-memory-outbox"
SUMMARY_JOB = "make-due-summaries"
SUMMARY_EVERY = dt.timedelta(minutes=1)
PURGE_JOB = "purge-old-transcripts"

IDLE_CHECK_EVERY = dt.timedelta(minutes=2)
SWEEP_EVERY = dt.timedelta(minutes=5)
OUTBOX_EVERY = dt.timedelta(minutes=1)
PURGE_EVERY = dt.timedelta(hours=6)
PURGE_BATCH = 200  # sessions per transaction: a first purge of a big backlog holds no long lock
INBOX_JOB = "forget-old-updates"
INBOX_EVERY = dt.timedelta(hours=1)
# Telegram keeps an unconfirmed update for 24 h: ids younger than that must still be recognised.
INBOX_KEEP = dt.timedelta(hours=48)
REMINDER_JOB = "send-due-reminders"
REMINDERS_EVERY = dt.timedelta(seconds=15)

# Sends one reminder to its chat; True when it is done with (sent, or the chat is gone for
# good), False to try again at the next run (Telegram unreachable). handlers/reminders.py.
Notify = Callable[["ReminderView"], Awaitable[bool]]


# --- the jobs -------------------------------------------------------------------------------


async def end_idle_sessions(
    agent: Agent, now: dt.datetime | None = None, limit: int = 100
) -> int:
    """Summarise and close sessions quiet for SESSION_IDLE_MINUTES; returns how many ended."""
    services = agent.services
    now = now or utcnow()
    cutoff = now - dt.timedelta(minutes=services.settings.session_idle_minutes)
    async with services.sessions() as db:
        idle = await Sessions(db).idle_since(cutoff, limit)
    ended = 0
    for candidate in idle:
        try:
            result = await agent.end_if_idle(candidate.user_id, candidate.id, cutoff)
        except Exception as exc:
            log.warning("idle session not ended: %s", type(exc).__name__)
            continue
        if result is not None and result.outcome != "already_closed":
            ended += 1
    if ended:
        log.info("idle sessions ended: %d", ended)
    return ended


async def make_due_summaries(agent: Agent) -> int:
    """Summaries that waited for room in the allowance or for the provider, made now."""
    made = await agent.make_due_summaries()
    if made:
        log.info("late session summaries made: %d", made)
    return made


async def sweep_reservations(agent: Agent) -> int:
    """Settle budget reservations a crash left behind (the agent charges them in full)."""
    swept = await agent.sweep_reservations()
    if swept:
        log.info("expired reservations settled: %d", swept)
    return swept


async def retry_memory_outbox(memory: Any, now: dt.datetime | None = None) -> Any:
    """Send memory writes the vector store refused earlier, when they are due."""
    return await memory.retry_outbox(now=now)


async def purge_old_transcripts(
    agent: Agent, retention_days: int, now: dt.datetime | None = None
) -> int:
    """Delete the messages of sessions closed more than `retention_days` ago.

    The session rows (title, summary) and long-term memories stay: what was learnt is kept,
    the raw conversation is not. Open sessions are never touched, however old.
    """
    if retention_days < 1:
        raise ValueError("retention_days must be at least 1")
    cutoff = (now or utcnow()) - dt.timedelta(days=retention_days)
    removed = 0
    while True:
        async with agent.services.sessions() as db:
            purged = await Messages(db).purge_closed_before(cutoff, PURGE_BATCH)
            await db.commit()
        if purged is None:
            break
        removed += purged
    if removed:
        log.info("old transcript messages purged: %d", removed)
    return removed


async def send_due_reminders(agent: Agent, notify: Notify, now: dt.datetime | None = None) -> int:
    """Send the reminders due by `now`, each once: a reminder is claimed in the database before
    it is sent (two processes never both claim it) and marked sent after; one whose sending
    failed waits for the next run. Returns how many were sent."""
    sent = 0
    for reminder in await agent.claim_due_reminders(now):
        try:
            done = await notify(reminder)
        except Exception as exc:
            log.warning("reminder not sent: %s", type(exc).__name__)
            done = False
        await agent.reminder_sent(reminder.id, done, now)
        sent += done
    return sent


async def forget_old_updates(agent: Agent, now: dt.datetime | None = None) -> int:
    """Drop processed update ids older than any redelivery Telegram could still make."""
    async with agent.services.sessions() as db:
        removed = await Inbox(db).forget_before((now or utcnow()) - INBOX_KEEP)
        await db.commit()
    return removed


class JobClaims:
    """Once across the fleet: the first process to claim a job's current interval runs it."""

    def __init__(self, redis: Any, prefix: str = "desktop:job:") -> None:
        self.redis = redis
        self.prefix = prefix

    async def take(self, job_id: str, every: dt.timedelta) -> bool:
        # The claim lives a little shorter than the interval, so the next run can be claimed.
        ttl_ms = max(1000, int(every.total_seconds() * 900))
        return bool(await self.redis.set(f"{self.prefix}{job_id}", "1", nx=True, px=ttl_ms))


# --- the scheduler --------------------------------------------------------------------------


async def run_guarded(
    name: str, job: Callable[..., Awaitable[Any]], *args: Any,
    claims: JobClaims | None = None, every: dt.timedelta | None = None,
) -> Any:
    """Run a job; a failure is logged by class name and reported, never raised to the scheduler.

    APScheduler would log the traceback itself, message included, and that may quote user text.
    With `claims` (several processes), only the process that claims this interval runs it.
    """
    try:
        if claims is not None and every is not None and not await claims.take(name, every):
            return None
        return await job(*args)
    except Exception as exc:
        log.error("job %s failed: %s", name, type(exc).__name__)
        sentry_sdk.capture_exception(exc)  # scrubbed by ops.monitoring.before_send
        return None


def build_scheduler(
    agent: Agent, *, retention_days: int | None = None, claims: JobClaims | None = None,
    notify: Notify | None = None,
) -> AsyncIOScheduler:
    """The upkeep scheduler with every job registered; start it inside the running loop."""
    scheduler = AsyncIOScheduler(
        jobstores={"default": MemoryJobStore()},
        timezone=dt.UTC,
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 60},
    )
    register_jobs(scheduler, agent, retention_days=retention_days, claims=claims, notify=notify)
    return scheduler


def register_jobs(
    scheduler: AsyncIOScheduler, agent: Agent, *, retention_days: int | None = None,
    claims: JobClaims | None = None, notify: Notify | None = None,
) -> list[str]:
    """(Re-)register the jobs under fixed ids: calling it again replaces, never duplicates.

    `retention_days` defaults to settings.transcript_retention_days; None: keep transcripts.
    """
    if retention_days is None:
        retention_days = getattr(agent.services.settings, "transcript_retention_days", None)
    now = dt.datetime.now(dt.UTC)
    jobs: list[tuple[str, dt.timedelta, Callable[..., Awaitable[Any]], tuple[Any, ...], bool]] = [
        # First runs at start-up: a restart finds sessions that idled and reservations a
        # crash left while the process was down.
        (IDLE_JOB, IDLE_CHECK_EVERY, end_idle_sessions, (agent,), True),
        (SWEEP_JOB, SWEEP_EVERY, sweep_reservations, (agent,), True),
        (SUMMARY_JOB, SUMMARY_EVERY, make_due_summaries, (agent,), True),
        (INBOX_JOB, INBOX_EVERY, forget_old_updates, (agent,), False),
    ]
    memory = agent.services.memory
    if getattr(memory, "has_outbox", False):
        jobs.append((OUTBOX_JOB, OUTBOX_EVERY, retry_memory_outbox, (memory,), True))
    if notify is not None:  # a front end that can reach users (not the console)
        jobs.append((REMINDER_JOB, REMINDERS_EVERY, send_due_reminders, (agent, notify), True))
    if retention_days:
        jobs.append((PURGE_JOB, PURGE_EVERY, purge_old_transcripts, (agent, retention_days), False))
    for job_id, every, func, args, at_start in jobs:
        scheduler.add_job(
            run_guarded, IntervalTrigger(seconds=every.total_seconds(), timezone=dt.UTC),
            args=(job_id, func, *args), kwargs={"claims": claims, "every": every},
            id=job_id, name=job_id, replace_existing=True,
            next_run_time=now if at_start else now + every,
        )
    return [job_id for job_id, *_ in jobs]
