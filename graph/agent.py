"""The agent as front ends see it: messages in, streamed events out; sessions; data rights."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from graph.builder import build_summary_graph, build_turn_graph
from graph.context import Services, SummaryContext, TurnContext
from graph.events import (
    AUTO,
    AUTO_ROLE,
    Answer,
    BudgetWarning,
    Delta,
    Duplicate,
    Failure,
    ImageInput,
    MemoryView,
    Refusal,
    ReminderView,
    Resumed,
    Routed,
    SessionEnd,
    SessionStarted,
    SessionView,
    TurnEvent,
    Usage,
    UserView,
)
from graph.model import ModelFault
from graph.nodes import ModelStarted, allowance, normalise_summary, store_units
from graph.roles import Role
from graph.routing import route
from graph.tokens import count_tokens
from graph.tracing import RunTrace, TraceLog
from memory.base import EVERY_CHAT, Kind, MemoryItem, MemoryQuery, MemoryScope, chat_scope, memory_id
from memory.units import FinishedSession, session_units
from storage.core import HistoryEntry, OverBudget, Reserved, next_reset, utc_day
from storage.data_rights import DeletionReceipt, delete_user, export_user
from storage.models import ChatSession, Message, Reminder, User, utcnow
from storage.repositories import Budget, Memories, Messages, Reminders, Sessions, Users
from storage.turns import NewQuestion, StoredQuestion, store_question

log = logging.getLogger(__name__)

WARN_AT = 0.8

# What /memory lists: the notes about the user. Exchanges are the conversation itself, kept
# for recall and forgotten with their session.
LISTED_KINDS = ("summary", "fact")

# How speech is priced against the daily allowance: 10 tokens a second, 600 a minute (about
# what a minute of gpt-4o-mini-transcribe costs, in gpt-4o-mini input tokens, rounded up).
AUDIO_TOKENS_PER_SECOND = 10


# A claimed reminder whose process died before sending it is taken again after this long.
REMINDER_CLAIM_STALE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Profile:
    user: UserView
    role: Role


class TurnRun:
    """One run of the turn graph in its own task, and what it reports as it goes (the context's
    `report`): its reservation, the model's start, the answer's deltas.

    The reservation lives in the graph's state; it is reported too, so that a run cancelled
    midway (shutdown) can settle it. The deltas do not go through LangGraph's stream: one
    stream event per token cost the bot about a third more CPU per answer (bench/README.md).
    They are handed to the front end in batches: it takes all that arrived since it last
    looked in one piece, so a fast stream costs a few wake-ups, not one per token, and a slow
    one still shows each token as it comes.
    """

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self.reservation: Reserved | None = None
        self.model_started = False
        self._parts: list[str] = []
        self._wake: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self, graph: Any, text: str, context: TurnContext) -> None:
        self.task = asyncio.create_task(self._run(graph, text, context))
        self.task.add_done_callback(self._signal)

    def report(self, event: str | Reserved | ModelStarted) -> None:
        """The context's `report` (graph/nodes.py reserve_budget and call_model)."""
        if isinstance(event, Reserved):
            self.reservation, self.model_started = event, False
        elif isinstance(event, ModelStarted):
            self.model_started = True
        else:
            self._parts.append(event)
            self._signal()

    async def _run(self, graph: Any, text: str, context: TurnContext) -> None:
        self.state = await graph.ainvoke({"text": text}, context=context)

    def _signal(self, *_: object) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def deltas(self) -> AsyncIterator[str]:
        """The answer as it is generated, until the run ends (then `state` is final)."""
        while True:
            if self._parts:
                text = "".join(self._parts)
                self._parts.clear()
                yield text
            elif self.task is None or self.task.done():
                if self.task is not None:
                    self.task.result()  # the run's error, if it failed
                return
            else:
                self._wake = asyncio.get_running_loop().create_future()
                await self._wake


def _reminder_view(reminder: Reminder, user: User | None) -> ReminderView:
    return ReminderView(
        reminder.id, reminder.user_id, reminder.chat_id, reminder.text, reminder.due_at,
        user.timezone if user is not None else None, user.language if user is not None else None,
    )


async def _stop(run: asyncio.Task[Any] | None) -> None:
    if run is not None and not run.done():
        run.cancel()
        await asyncio.wait([run])


class Agent:
    """One instance per process; the compiled graphs are shared by every run."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.turn_graph = build_turn_graph().compile()
        self.summary_graph = build_summary_graph().compile()
        self.traces = TraceLog(services.sessions)
        # Incognito sessions' conversations, by session: held here only, never stored.
        self._incognito: dict[int, list[HistoryEntry]] = {}

    async def aclose(self) -> None:
        """At shutdown: the last traces are written, the provider's connections and the MCP
        servers closed."""
        await self.traces.aclose()
        await self.services.models.aclose()
        await self.services.tools.aclose()

    # --- users and roles ---------------------------------------------------------------

    async def profile(self, user_id: int, language: str | None) -> Profile:
        async with self.services.sessions() as db:
            user = await Users(db).ensure(user_id, language)
            await db.commit()
        return Profile(UserView.of(user), AUTO_ROLE if user.role == AUTO else self.role_for(user.role))

    def _session_role(self, user_role: str | None) -> str:
        """The role a new session opens with: the user's, or "auto" until its first message."""
        return AUTO if user_role == AUTO else self.role_for(user_role).id

    def role_for(self, role_id: str | None) -> Role:
        roles = self.services.roles
        role = roles.get(role_id) if role_id else None
        if role is None:
            role = roles.get(roles.default_role_id)
        if role is None:
            raise RuntimeError(f"no usable role file in {self.services.settings.prompts_dir}")
        return role

    async def set_role(self, user_id: int, role_id: str) -> Role | None:
        """The chosen role (AUTO_ROLE for Auto); None when no such role file exists now."""
        role = AUTO_ROLE if role_id == AUTO else self.services.roles.get(role_id)
        if role is None:
            return None
        async with self.services.sessions() as db:
            await Users(db).ensure(user_id, None)
            await Users(db).set_role(user_id, role_id)
            await db.commit()
        return role

    async def set_private_data_in_groups(self, user_id: int, allowed: bool) -> None:
        async with self.services.sessions() as db:
            await Users(db).ensure(user_id, None)
            await Users(db).set_private_data_in_groups(user_id, allowed)
            await db.commit()

    async def set_memory_per_role(self, user_id: int, per_role: bool) -> None:
        async with self.services.sessions() as db:
            await Users(db).ensure(user_id, None)
            await Users(db).set_memory_per_role(user_id, per_role)
            await db.commit()

    # --- reminders -------------------------------------------------------------------------

    async def reminders(self, user_id: int) -> list[ReminderView]:
        async with self.services.sessions() as db:
            user = await Users(db).get(user_id)
            waiting = await Reminders(db).pending_for(user_id)
        return [_reminder_view(r, user) for r in waiting]

    async def cancel_reminder(self, user_id: int, reminder_id: int) -> bool:
        """False when it is not this user's waiting reminder (ids from buttons are not trusted)."""
        async with self.services.sessions() as db:
            cancelled = await Reminders(db).cancel(user_id, reminder_id)
            await db.commit()
        return cancelled

    async def claim_due_reminders(self, now: dt.datetime | None = None) -> list[ReminderView]:
        """Reminders due now, each claimed for this process alone; report each with reminder_sent."""
        async with self.services.sessions() as db:
            due = await Reminders(db).claim_due(now or utcnow(), stale_after=REMINDER_CLAIM_STALE)
            await db.commit()
            users = {r.user_id: await Users(db).get(r.user_id) for r in due}
        return [_reminder_view(r, users[r.user_id]) for r in due]

    async def reminder_sent(self, reminder_id: int, sent: bool, now: dt.datetime | None = None) -> None:
        """Sent: done for good. Not sent (Telegram unreachable): waiting again for the next run."""
        async with self.services.sessions() as db:
            if sent:
                await Reminders(db).mark_sent(reminder_id, now or utcnow())
            else:
                await Reminders(db).release(reminder_id)
            await db.commit()

    async def set_timezone(self, user_id: int, timezone: str) -> None:
        """An IANA zone name the caller has checked (handlers/personalize.py find_timezone)."""
        async with self.services.sessions() as db:
            await Users(db).ensure(user_id, None)
            await Users(db).set_timezone(user_id, timezone)
            await db.commit()

    async def set_instructions(self, user_id: int, instructions: str | None) -> None:
        async with self.services.sessions() as db:
            await Users(db).ensure(user_id, None)
            await Users(db).set_instructions(user_id, instructions or None)
            await db.commit()

    # --- the message path ----------------------------------------------------------------

    async def handle_message(
        self, *, user_id: int, chat_id: int, text: str, update_id: int | None,
        language: str | None = None, stop: asyncio.Event | None = None,
        images: tuple[ImageInput, ...] = (),
    ) -> AsyncIterator[TurnEvent]:
        """Answer one message, as events. The front end hands over one message of a chat at a
        time, in order (handlers/delivery.py: in-process, or across a fleet by a Redis lock;
        the console is one user typing), so the history a turn reads is the one before it."""
        stored = await self._store_question(user_id, chat_id, text, update_id, language)
        if isinstance(stored, Answer):
            yield stored  # answered before, but its delivery never finished: deliver it now
            return
        if stored is None:
            yield Duplicate()
            return
        role = self.role_for(stored.session_role)
        routed: Role | None = None
        if stored.session_role == AUTO:  # Auto: the session's first message picks its role
            routed, _ = await route(self.services, user_id, text)
            role = routed or role
            async with self.services.sessions() as db:
                await Sessions(db).set_role(stored.session_id, role.id)
                await db.commit()
        if stored.started:
            yield SessionStarted(stored.session_id, automatic=True, role=role)
        if routed is not None:
            yield Routed(routed)
        if stored.resumed:
            yield Resumed()
        trace = RunTrace("turn", user_id, stored.session_id)
        scope = MemoryScope.for_chat(
            user_id, chat_id, stored.private_in_groups,
            role=role.id if stored.memory_per_role else None,
        )
        settings = self.services.settings
        # A photo is answered by the role's vision model; a role that cannot see gets the text.
        vision = role.sees_images(settings.chat_model) if images else None
        run = TurnRun()
        context = TurnContext(
            services=self.services, user_id=user_id, chat_id=chat_id,
            session_id=stored.session_id, question_id=stored.question_id, role=role,
            # A group sees the user's own instructions only when the user allowed it.
            instructions=stored.instructions if scope.with_private else None,
            memory_scope=scope,
            daily_limit=settings.daily_token_limit if stored.daily_limit is None else stored.daily_limit,
            # An incognito session's text is not stored: its history is the one held here.
            history=self._incognito.get(stored.session_id, []) if stored.incognito else stored.history,
            trace=trace, incognito=stored.incognito,
            images=images if vision else (), model=vision,
            # Tools act on the user's private things (reminders): only in their private chat.
            tool_names=role.tools if chat_id == user_id else (), report=run.report, stop=stop,
        )
        run.start(self.turn_graph, text, context)
        try:
            async for delta in run.deltas():
                yield Delta(delta)
            final = run.state
            trace.end()
        except IntegrityError:
            # The user deleted their data while this turn ran: nothing is written back.
            yield Failure("deleted")
            return
        except asyncio.CancelledError:
            # Shutdown: the question stays pending and is answered after the restart; the
            # reservation is released, or charged when the model may already have spent tokens.
            await _stop(run.task)
            trace.outcome = "cancelled"
            await asyncio.shield(self._settle_abandoned(run))
            self._save_trace(trace)
            raise
        except Exception as exc:
            trace.outcome = "crashed"
            trace.error = trace.error or type(exc).__name__
            self._save_trace(trace)
            raise
        finally:
            await _stop(run.task)  # the front end stopped listening early: the run goes with it
        # The answer goes out first; its trace is written while the user already reads it.
        event = self._final_event(final, stored.question_id)
        if stored.incognito and isinstance(event, Answer):
            self._remember_incognito(stored.session_id, text, event, final)
        yield event
        if isinstance(event, Answer) and chat_id == user_id:  # usage is private: not in groups
            # Read the ledger only when this answer may have crossed the line: most do not.
            limit = context.daily_limit
            spent = limit - final.get("left_before", limit) + event.charged
            if limit > 0 and spent >= WARN_AT * limit:
                warning = await self._warning(user_id, limit)
                if warning is not None:
                    yield warning
        self._save_trace(trace)

    def _remember_incognito(
        self, session_id: int, question: str, answer: Answer, final: dict[str, Any]
    ) -> None:
        """The exchange, for the session's next messages: in this process only, never stored."""
        result = final.get("result")
        history = self._incognito.setdefault(session_id, [])
        history += [
            HistoryEntry("user", question, count_tokens(question, self.services.settings.chat_model), 0),
            HistoryEntry("assistant", answer.text, 0, (result.output_tokens if result else 0) or 0),
        ]
        del history[: -self.services.settings.history_messages or None]

    async def _store_question(
        self, user_id: int, chat_id: int, text: str, update_id: int | None, language: str | None
    ) -> StoredQuestion | Answer | None:
        """Durably store the message before the model is called; None for a redelivery.

        The session's recent history is read in the same transaction: one round trip less.
        """
        settings = self.services.settings
        new = NewQuestion(
            user_id=user_id, chat_id=chat_id, text=text, update_id=update_id,
            tokens=count_tokens(text, settings.chat_model), language=language,
            history_limit=settings.history_messages,
        )
        async with self.services.sessions() as db:
            stored = await store_question(db, new, self._session_role)
            if stored is not None or update_id is None:
                return stored
            # The update was stored before: a redelivery, or a crash cut its answer off.
            earlier = await Messages(db).by_update_id(update_id)
            return None if earlier is None else await self._resumable(db, earlier, user_id)

    async def _resumable(
        self, db: AsyncSession, earlier: Message, user_id: int
    ) -> StoredQuestion | Answer | None:
        """A message taken in before, processed again because its answer never reached the user
        (a crash, a Telegram outage): a question still pending is answered now; an answer
        already stored is delivered again, at no new cost. Anything else: a duplicate."""
        if earlier.user_id != user_id:
            return None
        if earlier.status == "answered":
            answer = await Messages(db).answer_to(earlier.id)
            if answer is None or not answer.text:  # incognito: the answer was not kept
                return None
            return Answer(answer.text, answer.status == "complete", charged=0)
        if earlier.status != "pending":
            return None
        session = await db.get(ChatSession, earlier.session_id)
        if session is not None and session.incognito:
            return None  # its text was never stored: there is nothing to answer again
        user = await Users(db).get(user_id)
        if session is None or user is None:
            return None
        limit = self.services.settings.history_messages
        history = await Messages(db).history(session.id, limit, before_id=earlier.id)
        return StoredQuestion(
            session.id, session.role, earlier.id, user.instructions, history,
            user.private_data_in_groups, resumed=True, daily_limit=user.daily_limit,
            memory_per_role=user.memory_per_role,
        )

    async def _settle_abandoned(self, run: TurnRun) -> None:
        """A run cut off before its answer was kept: release its reservation, or charge it all
        when the provider may already bill it (a reservation settled before is charged once)."""
        if run.reservation is None:
            return
        async with self.services.sessions() as db:
            await Budget(db).settle(run.reservation.id, None if run.model_started else 0)
            await db.commit()

    @staticmethod
    def _final_event(final: dict[str, Any], question_id: int) -> TurnEvent:
        outcome = final.get("outcome")
        if outcome == "refused":
            refusal = final["refusal"]
            return Refusal(refusal.used + refusal.reserved, refusal.limit, refusal.resets_at)
        if outcome == "deleted":
            return Failure("deleted")
        result = final.get("result")
        if outcome in ("answered", "partial") and result is not None:
            complete = outcome == "answered" and not result.truncated
            return Answer(
                final.get("answer_text", result.text), complete, final.get("charged", 0),
                question_id=question_id, memories_used=len(final.get("memories", [])),
                stopped=result.fault == "stopped",
            )
        return Failure(result.fault if result is not None and result.fault else "error")

    def _save_trace(self, trace: RunTrace) -> None:
        trace.end()
        self.traces.add(trace)

    # --- sessions ------------------------------------------------------------------------

    async def start_session(
        self, user_id: int, chat_id: int, title: str | None, language: str | None = None,
        incognito: bool = False,
    ) -> tuple[SessionEnd | None, SessionView]:
        """End the open session (with its summary), then open a new one."""
        ended = await self.end_session(user_id, chat_id, reason="new_session")
        async with self.services.sessions() as db:
            user = await Users(db).ensure(user_id, language)
            session = await Sessions(db).open(
                user_id, chat_id, self._session_role(user.role), title, incognito=incognito
            )
            await db.commit()
        return ended, SessionView.of(session)

    async def end_session(self, user_id: int, chat_id: int, reason: str = "command") -> SessionEnd | None:
        async with self.services.sessions() as db:
            session = await Sessions(db).open_for(user_id, chat_id)
        if session is None:
            return None
        return await self._summarise(session, reason)

    async def resume_session(self, user_id: int, chat_id: int, session_id: int) -> SessionView | None:
        """Go on with a closed session of this chat: the chat's open session ends first, and
        what the resumed one left in memory is forgotten (made again when it ends). None when
        it is not the user's closed session of this chat."""
        async with self.services.sessions() as db:
            session = await Sessions(db).get(user_id, session_id)
        if session is None or session.status != "closed" or session.chat_id != chat_id:
            return None
        await self.end_session(user_id, chat_id, reason="new_session")
        await self.forget_session_memory(user_id, session_id)
        try:
            async with self.services.sessions() as db:
                reopened = await Sessions(db).reopen(session_id)
                await db.commit()
                resumed = await Sessions(db).get(user_id, session_id)
        except IntegrityError:
            return None  # a message opened another session meanwhile
        return SessionView.of(resumed) if reopened and resumed is not None else None

    async def end_if_idle(self, user_id: int, session_id: int, cutoff: dt.datetime) -> SessionEnd | None:
        """Summarise and close the session if it is still open and quiet since `cutoff` (a
        message may have arrived since it was found idle); None when it is not."""
        async with self.services.sessions() as db:
            session = await Sessions(db).get(user_id, session_id)
        if session is None or session.status != "open" or session.last_activity_at >= cutoff:
            return None
        return await self._summarise(session, "idle")

    async def _summarise(self, session: ChatSession, reason: str) -> SessionEnd:
        if session.incognito:
            return await self._forget_incognito(session)
        trace = RunTrace("summarise", session.user_id, session.id)
        context = SummaryContext(
            services=self.services, user_id=session.user_id, session_id=session.id,
            role_id=session.role, title=session.title, reason=reason, trace=trace,
            summary=session.summary if session.status == "summary_due" else None,
            attempts=session.summary_attempts,
        )
        try:
            final = await self.summary_graph.ainvoke({}, context=context)
        finally:
            self._save_trace(trace)
        return SessionEnd(session.id, final["outcome"], final.get("title"), final.get("summary"))

    async def _forget_incognito(self, session: ChatSession) -> SessionEnd:
        """An incognito session ends without a trace of its words: no summary, no memory; its
        rows (which hold no text) are deleted, and the conversation held here is dropped."""
        self._incognito.pop(session.id, None)
        async with self.services.sessions() as db:
            await Sessions(db).forget(session.id)
            await db.commit()
        return SessionEnd(session.id, "incognito", None, None)

    async def make_due_summaries(self, now: dt.datetime | None = None) -> int:
        """Sessions whose memory could not be made (no room, provider down), when due again."""
        async with self.services.sessions() as db:
            due = await Sessions(db).summaries_due(now or utcnow())
        made = 0
        for session in due:
            ended = await self._summarise(session, session.end_reason or "command")
            made += ended.outcome == "summarised"
        return made

    async def list_sessions(
        self, user_id: int, offset: int, limit: int
    ) -> tuple[list[SessionView], int]:
        async with self.services.sessions() as db:
            found, total = await Sessions(db).list_for(user_id, offset, limit)
        return [SessionView.of(s) for s in found], total

    async def get_session(self, user_id: int, session_id: int) -> SessionView | None:
        """The user's session by id (ids from buttons are not trusted: another user's is None)."""
        async with self.services.sessions() as db:
            session = await Sessions(db).get(user_id, session_id)
        return None if session is None else SessionView.of(session)

    # --- voice and files ----------------------------------------------------------------

    async def vision_model(self, user_id: int, chat_id: int) -> str | None:
        """The model a photo sent now would be answered with; None: the role cannot see."""
        async with self.services.sessions() as db:
            session = await Sessions(db).open_for(user_id, chat_id)
            user = await Users(db).get(user_id)
        role_id = session.role if session else self._session_role(user.role if user else None)
        return self.role_for(None if role_id == AUTO else role_id).sees_images(
            self.services.settings.chat_model
        )

    async def asked_before(self, user_id: int, update_id: int) -> str | None:
        """The question stored for this update (a redelivery or a restart): a voice note is
        answered from its stored transcript, never transcribed (and charged) twice."""
        async with self.services.sessions() as db:
            earlier = await Messages(db).by_update_id(update_id)
        if earlier is None or earlier.user_id != user_id or not earlier.text:
            return None
        return earlier.text

    async def transcribe(
        self, user_id: int, audio: bytes, filename: str, seconds: int
    ) -> str | Refusal | Failure:
        """Speech as text, through the provider; reserved from the day's allowance before the
        call (AUDIO_TOKENS_PER_SECOND) and charged when the provider may have billed it."""
        settings = self.services.settings
        amount = max(1, math.ceil(seconds * AUDIO_TOKENS_PER_SECOND))
        async with self.services.sessions() as db:
            await Users(db).ensure(user_id, None)
            held = await Budget(db).reserve(
                user_id, amount, await allowance(db, self.services, user_id),
                ttl_seconds=settings.reservation_ttl_seconds,
            )
            await db.commit()
        if isinstance(held, OverBudget):
            return Refusal(held.used + held.reserved, held.limit, held.resets_at)
        charge = amount
        try:
            text = await self.services.models.transcribe(audio, filename, settings.transcription_model)
        except ModelFault as fault:
            charge = amount if fault.kind == "timeout" else 0  # refused before any work: free
            return Failure(fault.kind)
        finally:
            async with self.services.sessions() as db:
                await Budget(db).settle(held.id, charge)
                await db.commit()
        return text

    # --- what the user sees of their memory ---------------------------------------------

    async def list_memories(
        self, user_id: int, offset: int, limit: int
    ) -> tuple[list[MemoryView], int]:
        async with self.services.sessions() as db:
            found, total = await Memories(db).page_for(user_id, LISTED_KINDS, offset, limit)
        return [MemoryView.of(record) for record in found], total

    async def forget_memory(self, user_id: int, session_id: int, kind: Kind, seq: int) -> int:
        """Forget one fact, or a summary with everything its session left; how many units went.

        The ids are built from the user asking, so a forged button can only name their own."""
        if kind == "summary":
            return await self.forget_session_memory(user_id, session_id)
        return await self.forget_unit(user_id, session_id, kind, seq)

    async def forget_unit(self, user_id: int, session_id: int, kind: Kind, seq: int) -> int:
        return await self.services.memory.forget(user_id, [memory_id(user_id, session_id, kind, seq)])

    async def correct_memory(self, user_id: int, session_id: int, text: str) -> bool:
        """The user's correction, remembered as a fact of the session the wrong memory came
        from; False when it is not the user's session or cannot be stored now."""
        async with self.services.sessions() as db:
            session = await Sessions(db).get(user_id, session_id)
            seq = await Memories(db).next_seq(user_id, session_id, "fact") if session else 0
        if session is None:
            return False
        correction = MemoryItem(
            user_id=user_id, session_id=session_id, title=session.title,
            text=f"Correction from the user: {text}", role=session.role,
            started_at=session.started_at, ended_at=session.ended_at,
            chat_id=chat_scope(user_id, session.chat_id), kind="fact", seq=seq,
        )
        return await store_units(self.services, user_id, [correction]) is None

    async def forget_session_memory(self, user_id: int, session_id: int) -> int:
        """Everything a session left in memory, its summary in /list_sessions included."""
        async with self.services.sessions() as db:
            ids = await Memories(db).ids_of_session(user_id, session_id)
            if await Sessions(db).get(user_id, session_id) is not None:
                await Sessions(db).set_summary(session_id, None)
                await db.commit()
        return await self.services.memory.forget(user_id, ids)

    async def rewrite_memory(self, user_id: int, session_id: int, text: str) -> SessionView | None:
        """The user's own words replace what a session left in memory (its summary, facts and
        exchanges); None when it is not the user's closed session or cannot be stored now."""
        async with self.services.sessions() as db:
            session = await Sessions(db).get(user_id, session_id)
        if session is None or session.status != "closed":
            return None
        summary, _ = normalise_summary(text, session.title)
        units = session_units(FinishedSession(
            user_id=user_id, session_id=session_id, chat_id=chat_scope(user_id, session.chat_id),
            role=session.role, title=session.title, started_at=session.started_at,
            ended_at=session.ended_at, summary=summary, transcript=[],
        ))
        await self.forget_session_memory(user_id, session_id)
        if await store_units(self.services, user_id, units) is not None:
            return None
        async with self.services.sessions() as db:
            await Sessions(db).set_summary(session_id, summary)
            await db.commit()
            stored = await Sessions(db).get(user_id, session_id)
        return None if stored is None else SessionView.of(stored)

    async def memories_used(self, user_id: int, question_id: int) -> list[MemoryView]:
        """The units the answer to this question drew on that are still remembered; nothing
        for another user's question (ids from buttons are not trusted)."""
        async with self.services.sessions() as db:
            ids = await Messages(db).memories_used(user_id, question_id)
            records = await Memories(db).by_ids(user_id, ids)
        order = {unit: i for i, unit in enumerate(ids)}
        return [MemoryView.of(r) for r in sorted(records, key=lambda r: order[r.id])]

    async def find_sessions(self, user_id: int, words: str, limit: int = 5) -> list[SessionView]:
        """The user's sessions whose memories share a word with `words`, best match first (the
        recall retriever: BM25 and vectors fused).

        A billed embedder is not called for a search: words alone find the sessions then."""
        embedder = self.services.embedder
        vector = None if embedder.billed else (await embedder.embed([words]))[0]
        hits = await self.services.memory.search(
            user_id, MemoryQuery(words, vector, limit * 8, words_must_match=True), EVERY_CHAT
        )
        found: list[SessionView] = []
        async with self.services.sessions() as db:
            for session_id in dict.fromkeys(hit.session_id for hit in hits if hit.session_id):
                session = await Sessions(db).get(user_id, session_id)
                if session is not None:
                    found.append(SessionView.of(session))
                if len(found) == limit:
                    break
        return found

    async def count_messages(self, session_id: int) -> int:
        async with self.services.sessions() as db:
            return await Messages(db).count_for_session(session_id)

    async def usage(self, user_id: int) -> Usage:
        async with self.services.sessions() as db:
            day = await Budget(db).day(user_id)
            user = await Users(db).get(user_id)
        settings = self.services.settings
        own = None if user is None else user.daily_limit
        zone = (user.timezone if user is not None else None) or "UTC"
        return Usage(
            used=0 if day is None else day.used + day.reserved,
            limit=settings.daily_token_limit if own is None else own,
            resets_at=next_reset(utcnow()).astimezone(ZoneInfo(zone)), timezone=zone,
        )

    async def _warning(self, user_id: int, limit: int) -> BudgetWarning | None:
        """A warning when this answer took the day past WARN_AT of the limit, once a day."""
        async with self.services.sessions() as db:
            day = await Budget(db).day(user_id)
            used = 0 if day is None else day.used + day.reserved
            if limit <= 0 or used < WARN_AT * limit:
                return None
            first_today = await Users(db).claim_warning(user_id, utc_day(utcnow()))
            await db.commit()
        return BudgetWarning(await self.usage(user_id)) if first_today else None

    # --- what an operator (ADMIN_USER_IDS) sees and sets ---------------------------------------

    async def usage_of_everyone(self) -> list[tuple[int, int, int]]:
        """(user, used today, their limit) for every user with a ledger today, most used first."""
        default = self.services.settings.daily_token_limit
        async with self.services.sessions() as db:
            rows = await Budget(db).today_for_everyone()
        return [(user, used + reserved, default if own is None else own)
                for user, used, reserved, own in rows]

    async def set_daily_limit(self, user_id: int, limit: int | None) -> bool:
        """An operator's limit for one user (None: the deployment's); False: no such user."""
        async with self.services.sessions() as db:
            found = await Users(db).set_daily_limit(user_id, limit)
            await db.commit()
        return found

    # --- data rights ---------------------------------------------------------------------

    async def export_data(self, user_id: int) -> dict[str, Any]:
        await self.traces.flush()  # the latest runs belong in the export too
        async with self.services.sessions() as db:
            document = await export_user(db, user_id)
        extra = await self.services.memory.export_user(user_id)
        if extra:
            document["memories"].extend(extra)
        return document

    async def delete_data(self, user_id: int) -> DeletionReceipt:
        memory = self.services.memory
        self.traces.forget_user(user_id)
        remembered = await memory.delete_user(user_id)
        async with self.services.sessions() as db:
            receipt = await delete_user(db, user_id)
            await db.commit()
        # Once more after the rows are gone: a summary that finished in between may have
        # written a vector; with the user row gone, nothing can write one again.
        remembered += await memory.delete_user(user_id)
        if remembered > receipt.memories:  # vectors kept outside SQL (Pinecone) count too
            receipt = DeletionReceipt(
                receipt.messages, receipt.sessions, remembered, receipt.usage_days, receipt.traces
            )
        return receipt

    async def settle_orphaned_reservations(self) -> int:
        """At a polling start-up every reservation belongs to a dead process: settle them all."""
        async with self.services.sessions() as db:
            orphans = await Budget(db).all_ids()
            for reservation_id in orphans:
                await Budget(db).settle(reservation_id, None)
            await db.commit()
        return len(orphans)

    async def sweep_reservations(self, now: dt.datetime | None = None) -> int:
        """Settle reservations a crash left behind (charged in full: the call may have run)."""
        async with self.services.sessions() as db:
            expired = await Budget(db).expired(now)
            for reservation_id in expired:
                await Budget(db).settle(reservation_id, None)
            await db.commit()
        return len(expired)

