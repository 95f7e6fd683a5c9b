"""/memory: what the bot remembers about the user, each with Forget; /find: search past sessions;
the review of a summary when a session ends (keep, edit, don't remember)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from aiogram import Router
from aiogram.filters import Command, CommandObject, StateFilter
from aiogram.filters.callback_data import CallbackData
from aiogram.fsm.context import FSMContext
from aiogram.fsm.state import State, StatesGroup
from aiogram.types import CallbackQuery, InlineKeyboardMarkup, Message
from aiogram.utils.keyboard import InlineKeyboardBuilder

from graph.events import MemoryView
from handlers.filters import HasText, InOwnersPrivateChat, PrivateReply
from handlers.i18n import Catalog
from handlers.sessions import MAX_ID, MAX_PAGE, SessionOpen, SummaryReview, summary_line

if TYPE_CHECKING:
    from graph.agent import Agent

PAGE_SIZE = 5
MAX_SEQ = 1_000
MAX_EDIT = 1_500  # the summariser's own bound (graph/nodes.py SUMMARY_MAX_CHARS)
MAX_FIND = 200
# Kinds travel in callback data as one letter: buttons carry at most 64 bytes.
KIND_CODES: dict[str, Literal["summary", "fact", "exchange"]] = {
    "s": "summary", "f": "fact", "x": "exchange",
}


class MemoryPage(CallbackData, prefix="mp"):
    page: int


class MemoryForget(CallbackData, prefix="mf"):
    session: int
    kind: str  # s | f | x
    seq: int
    page: int


class MemoryUsed(CallbackData, prefix="mu"):
    question: int  # the message whose answer drew on memories


class UsedForget(CallbackData, prefix="uf"):
    question: int
    session: int
    kind: str  # s | f | x
    seq: int
    wrong: bool  # "This is wrong": forgotten, and the user is asked what is right


class Reviewing(StatesGroup):
    waiting_for_summary = State()
    waiting_for_correction = State()


# --- /memory --------------------------------------------------------------------------------


async def show_memory(message: Message, agent: Agent, catalog: Catalog, lang: str | None) -> None:
    assert message.from_user is not None
    text, markup = await memory_page(message.from_user.id, 0, agent, catalog, lang)
    await message.answer(text, reply_markup=markup)


async def turn_memory_page(
    query: CallbackQuery, callback_data: MemoryPage, agent: Agent, catalog: Catalog, lang: str | None
) -> None:
    if not 0 <= callback_data.page <= MAX_PAGE:
        await query.answer(catalog.plain(lang, "errors.stale_button"), show_alert=True)
        return
    await query.answer()
    text, markup = await memory_page(query.from_user.id, callback_data.page, agent, catalog, lang)
    if isinstance(query.message, Message):
        await query.message.edit_text(text, reply_markup=markup)


async def forget(
    query: CallbackQuery, callback_data: MemoryForget, agent: Agent, catalog: Catalog,
    lang: str | None,
) -> None:
    kind = KIND_CODES.get(callback_data.kind)
    valid = (
        kind is not None and 0 < callback_data.session <= MAX_ID
        and 0 <= callback_data.seq <= MAX_SEQ and 0 <= callback_data.page <= MAX_PAGE
    )
    # The unit is named from the presser's own id: a forged button can only miss.
    removed = await agent.forget_memory(
        query.from_user.id, callback_data.session, kind, callback_data.seq
    ) if valid and kind is not None else 0
    if not removed:
        await query.answer(catalog.plain(lang, "errors.stale_button"), show_alert=True)
        return
    await query.answer(catalog.plain(lang, "memory.forgotten"))
    text, markup = await memory_page(query.from_user.id, callback_data.page, agent, catalog, lang)
    if isinstance(query.message, Message):
        await query.message.edit_text(text, reply_markup=markup)


async def memory_page(
    user_id: int, page: int, agent: Agent, catalog: Catalog, lang: str | None
) -> tuple[str, InlineKeyboardMarkup | None]:
    memories, total = await agent.list_memories(user_id, page * PAGE_SIZE, PAGE_SIZE)
    if total == 0:
        return catalog.text(lang, "memory.empty"), None
    pages = max(1, math.ceil(total / PAGE_SIZE))
    if not memories and page > 0:  # the last item of the last page was forgotten
        return await memory_page(user_id, min(page, pages) - 1, agent, catalog, lang)
    lines = [catalog.text(lang, "memory.header", page=page + 1, pages=pages, total=total)]
    builder = InlineKeyboardBuilder()
    for index, memory in enumerate(memories, start=page * PAGE_SIZE + 1):
        lines.append(_item(index, memory, agent, catalog, lang))
        code = next(c for c, k in KIND_CODES.items() if k == memory.kind)
        builder.button(
            text=catalog.plain(lang, "memory.buttons.forget", index=index),
            callback_data=MemoryForget(
                session=memory.session_id or 0, kind=code, seq=memory.seq, page=page
            ),
        )
    row = [len(memories)]
    if page > 0:
        builder.button(text=catalog.plain(lang, "session.buttons.prev"),
                       callback_data=MemoryPage(page=page - 1))
    if page + 1 < pages:
        builder.button(text=catalog.plain(lang, "session.buttons.next"),
                       callback_data=MemoryPage(page=page + 1))
    row.append(int(page > 0) + int(page + 1 < pages))
    builder.adjust(*[n for n in row if n])
    return "\n\n".join(lines), builder.as_markup()


def _item(
    index: int, memory: MemoryView, agent: Agent, catalog: Catalog, lang: str | None,
    whole: bool = False,
) -> str:
    date = f"{memory.started_at:%Y-%m-%d}" if memory.started_at else "—"
    role = agent.role_for(memory.role or "").label(lang) if memory.role else "—"
    if memory.kind == "summary":
        return catalog.text(
            lang, "memory.item_summary", index=index, date=date, role=role,
            title=memory.title or catalog.plain(lang, "session.untitled"),
            text=memory.text if whole else summary_line(memory.text) or memory.text[:200],
        )
    if memory.kind == "exchange":
        return catalog.text(lang, "memory.item_exchange", index=index, date=date, role=role,
                            text=memory.text)
    return catalog.text(lang, "memory.item_fact", index=index, date=date, role=role, text=memory.text)


# --- what an answer used ---------------------------------------------------------------------


def used_memories_button(
    question_id: int, count: int, catalog: Catalog, lang: str | None
) -> InlineKeyboardMarkup:
    builder = InlineKeyboardBuilder()
    builder.button(text=catalog.plain(lang, "memory.buttons.used", count=count),
                   callback_data=MemoryUsed(question=question_id))
    return builder.as_markup()


async def show_used(
    query: CallbackQuery, callback_data: MemoryUsed, agent: Agent, catalog: Catalog, lang: str | None
) -> None:
    text, markup = await used_view(query.from_user.id, callback_data.question, agent, catalog, lang)
    if markup is None:
        await query.answer(catalog.plain(lang, "memory.used_gone"), show_alert=True)
        return
    await query.answer()
    if isinstance(query.message, Message):
        await query.message.answer(text, reply_markup=markup)


async def used_view(
    user_id: int, question_id: int, agent: Agent, catalog: Catalog, lang: str | None
) -> tuple[str, InlineKeyboardMarkup | None]:
    used = await agent.memories_used(user_id, question_id) if 0 < question_id <= MAX_ID else []
    if not used:
        return catalog.text(lang, "memory.used_gone"), None
    lines = [catalog.text(lang, "memory.used_header", count=len(used))]
    builder = InlineKeyboardBuilder()
    for index, memory in enumerate(used, 1):
        lines.append(_item(index, memory, agent, catalog, lang, whole=True))
        code = next(c for c, k in KIND_CODES.items() if k == memory.kind)
        for wrong in (False, True):
            builder.button(
                text=catalog.plain(lang, "memory.buttons.wrong" if wrong else "memory.buttons.forget",
                                   index=index),
                callback_data=UsedForget(question=question_id, session=memory.session_id or 0,
                                         kind=code, seq=memory.seq, wrong=wrong),
            )
    builder.adjust(2)
    return "\n\n".join(lines), builder.as_markup()


async def forget_used(
    query: CallbackQuery, callback_data: UsedForget, state: FSMContext, agent: Agent,
    catalog: Catalog, lang: str | None,
) -> None:
    kind = KIND_CODES.get(callback_data.kind)
    valid = kind is not None and 0 < callback_data.session <= MAX_ID and 0 <= callback_data.seq <= MAX_SEQ
    # Only this one unit, even for a summary: the answer named it, not its whole session.
    removed = await agent.forget_unit(
        query.from_user.id, callback_data.session, kind, callback_data.seq
    ) if valid and kind is not None else 0
    if not removed:
        await query.answer(catalog.plain(lang, "errors.stale_button"), show_alert=True)
        return
    await query.answer(catalog.plain(lang, "memory.forgotten"))
    text, markup = await used_view(query.from_user.id, callback_data.question, agent, catalog, lang)
    message = query.message if isinstance(query.message, Message) else None
    if message is not None:
        await message.edit_text(text, reply_markup=markup)
    if callback_data.wrong and message is not None:
        await state.set_state(Reviewing.waiting_for_correction)
        await state.update_data(session=callback_data.session)
        await message.answer(catalog.text(lang, "memory.correction_prompt", max=MAX_EDIT))


async def correction(
    message: Message, state: FSMContext, agent: Agent, catalog: Catalog, lang: str | None
) -> None:
    assert message.from_user is not None and message.text is not None
    text = message.text.strip()
    if len(text) > MAX_EDIT:
        await message.answer(catalog.text(lang, "memory.edit_too_long", length=len(text), max=MAX_EDIT))
        return
    session_id = int((await state.get_data()).get("session") or 0)
    await state.clear()
    if not await agent.correct_memory(message.from_user.id, session_id, text):
        await message.answer(catalog.text(lang, "memory.edit_failed"))
        return
    await message.answer(catalog.text(lang, "memory.corrected"))


# --- /find ----------------------------------------------------------------------------------


async def find(
    message: Message, command: CommandObject, agent: Agent, catalog: Catalog, lang: str | None
) -> None:
    assert message.from_user is not None
    words = (command.args or "").strip()[:MAX_FIND]
    if not words:
        await message.answer(catalog.text(lang, "find.usage"))
        return
    found = await agent.find_sessions(message.from_user.id, words)
    if not found:
        await message.answer(catalog.text(lang, "find.nothing", words=words))
        return
    lines = [catalog.text(lang, "find.header", words=words)]
    builder = InlineKeyboardBuilder()
    for index, session in enumerate(found, 1):
        lines.append(catalog.text(
            lang, "session.list_item", index=index,
            title=session.title or catalog.plain(lang, "session.untitled"),
            date=f"{session.started_at:%Y-%m-%d}", role=agent.role_for(session.role).label(lang),
            summary=summary_line(session.summary) or catalog.plain(lang, "session.no_summary"),
        ))
        builder.button(text=catalog.plain(lang, "session.buttons.open", index=index),
                       callback_data=SessionOpen(id=session.id, page=0))
    builder.adjust(len(found))
    await message.answer("\n\n".join(lines), reply_markup=builder.as_markup())


# --- the review of a summary when its session ends --------------------------------------------


async def review(
    query: CallbackQuery, callback_data: SummaryReview, state: FSMContext, agent: Agent,
    catalog: Catalog, lang: str | None,
) -> None:
    session = (
        await agent.get_session(query.from_user.id, callback_data.session)
        if 0 < callback_data.session <= MAX_ID else None
    )
    if session is None or callback_data.action not in ("keep", "edit", "drop", "cancel"):
        await query.answer(catalog.plain(lang, "errors.stale_button"), show_alert=True)
        return
    message = query.message if isinstance(query.message, Message) else None
    if callback_data.action == "keep":
        await query.answer(catalog.plain(lang, "memory.kept"))
        if message is not None:
            await message.edit_reply_markup(reply_markup=None)
    elif callback_data.action == "drop":
        await agent.forget_session_memory(query.from_user.id, session.id)
        await query.answer()
        if message is not None:
            await message.edit_text(catalog.text(lang, "memory.dropped"))
    elif callback_data.action == "edit":
        await query.answer()
        await state.set_state(Reviewing.waiting_for_summary)
        await state.update_data(session=session.id)
        cancel = InlineKeyboardBuilder()
        cancel.button(text=catalog.plain(lang, "personalize.buttons.cancel"),
                      callback_data=SummaryReview(action="cancel", session=session.id))
        if message is not None:
            await message.answer(
                catalog.text(lang, "memory.edit_prompt", max=MAX_EDIT, summary=session.summary or ""),
                reply_markup=cancel.as_markup(),
            )
    else:
        await state.clear()
        await query.answer()
        if message is not None:
            await message.edit_text(catalog.text(lang, "memory.edit_cancelled"))


async def edited_summary(
    message: Message, state: FSMContext, agent: Agent, catalog: Catalog, lang: str | None
) -> None:
    assert message.from_user is not None and message.text is not None
    text = message.text.strip()
    if len(text) > MAX_EDIT:
        await message.answer(catalog.text(lang, "memory.edit_too_long", length=len(text), max=MAX_EDIT))
        return  # still waiting: the user shortens it and sends it again
    session_id = (await state.get_data()).get("session")
    await state.clear()
    stored = await agent.rewrite_memory(message.from_user.id, int(session_id or 0), text)
    if stored is None:
        await message.answer(catalog.text(lang, "memory.edit_failed"))
        return
    await message.answer(catalog.text(lang, "memory.edited", summary=stored.summary or text))


def build_router() -> Router:
    """A fresh router each time: a router can belong to only one dispatcher."""
    router = Router(name=__name__)
    router.message.filter(HasText())
    # Memories are private: their buttons work in the owner's private chat only.
    router.callback_query.filter(InOwnersPrivateChat())
    router.message(Command("memory"))(show_memory)
    router.message(Command("find"))(find)
    router.message(StateFilter(Reviewing.waiting_for_summary), PrivateReply())(edited_summary)
    router.callback_query(MemoryPage.filter())(turn_memory_page)
    router.callback_query(MemoryForget.filter())(forget)
    router.callback_query(SummaryReview.filter())(review)
    router.callback_query(MemoryUsed.filter())(show_used)
    router.callback_query(UsedForget.filter())(forget_used)
    router.message(StateFilter(Reviewing.waiting_for_correction), PrivateReply())(correction)
    return router
