"""/start_session, /end_session and the paginated /list_sessions with summaries."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from aiogram import Router
from aiogram.filters import Command, CommandObject
from aiogram.filters.callback_data import CallbackData
from aiogram.types import CallbackQuery, InlineKeyboardMarkup, Message
from aiogram.utils.keyboard import InlineKeyboardBuilder

from graph.events import SessionEnd, SessionView
from handlers.filters import HasText, InOwnersPrivateChat, is_private
from handlers.i18n import Catalog

if TYPE_CHECKING:
    from graph.agent import Agent

PAGE_SIZE = 5
MAX_TITLE = 120
# Callback data can be forged: numbers outside these bounds are stale buttons, not queries.
MAX_PAGE = 100_000
MAX_ID = 2**62


class SessionsPage(CallbackData, prefix="sp"):
    page: int


class SessionOpen(CallbackData, prefix="so"):
    id: int
    page: int


class SessionResume(CallbackData, prefix="sres"):
    id: int


class IncognitoStart(CallbackData, prefix="incog"):
    """Start over as an incognito session (the button under a new session's note)."""


# `/start_session incognito` (or its Russian word): a session that leaves nothing behind.
INCOGNITO_WORDS = ("incognito", "инкогнито")


class SummaryReview(CallbackData, prefix="sr"):
    """The buttons under a summary just made (handled in handlers/memory.py)."""

    action: str  # keep | edit | drop | cancel
    session: int


def review_keyboard(session_id: int, catalog: Catalog, lang: str | None) -> InlineKeyboardMarkup:
    builder = InlineKeyboardBuilder()
    for action in ("keep", "edit", "drop"):
        builder.button(text=catalog.plain(lang, f"memory.buttons.{action}"),
                       callback_data=SummaryReview(action=action, session=session_id))
    builder.adjust(3)
    return builder.as_markup()


def summary_line(summary: str | None) -> str | None:
    """The 'Summary:' sentence of the fixed-shape summary (or its first line)."""
    if not summary:
        return None
    for line in summary.splitlines():
        if line.lower().startswith("summary:"):
            return line.split(":", 1)[1].strip()[:200]
    return summary.splitlines()[0][:200]


def end_text(ended: SessionEnd, catalog: Catalog, lang: str | None) -> str:
    if ended.outcome == "incognito":
        return catalog.text(lang, "session.ended_incognito")
    if ended.outcome == "summarised" and ended.summary:
        return catalog.text(
            lang, "session.ended", title=ended.title or catalog.plain(lang, "session.untitled"),
            summary=ended.summary,
        )
    if ended.outcome == "deferred_budget":
        return catalog.text(lang, "session.ended_summary_tomorrow")
    if ended.outcome == "deferred_provider":
        return catalog.text(lang, "session.ended_summary_later")
    return catalog.text(lang, "session.ended_short")


async def start_session(
    message: Message, command: CommandObject, agent: Agent, catalog: Catalog, lang: str | None
) -> None:
    assert message.from_user is not None
    title = (command.args or "").strip()[:MAX_TITLE] or None
    incognito = title is not None and title.lower() in INCOGNITO_WORDS
    await _start(message, message.from_user.id, None if incognito else title, incognito, agent,
                 catalog, lang)


async def start_incognito(
    query: CallbackQuery, agent: Agent, catalog: Catalog, lang: str | None
) -> None:
    await query.answer()
    if isinstance(query.message, Message):
        await query.message.edit_reply_markup(reply_markup=None)
        await _start(query.message, query.from_user.id, None, True, agent, catalog, lang)


async def _start(
    message: Message, user_id: int, title: str | None, incognito: bool, agent: Agent,
    catalog: Catalog, lang: str | None,
) -> None:
    ended, session = await agent.start_session(
        user_id, message.chat.id, title, lang, incognito=incognito
    )
    if ended is not None and ended.outcome == "summarised" and is_private(message):
        await message.answer(catalog.text(
            lang, "session.previous_ended", title=ended.title or catalog.plain(lang, "session.untitled")
        ))
    role = agent.role_for(session.role).label(lang)
    if incognito:
        await message.answer(catalog.text(lang, "session.started_incognito", role=role))
        return
    offer = InlineKeyboardBuilder()
    offer.button(text=catalog.plain(lang, "session.buttons.incognito"), callback_data=IncognitoStart())
    if title:
        text = catalog.text(lang, "session.started", title=title, role=role)
    else:
        text = catalog.text(lang, "session.started_untitled", role=role)
    await message.answer(text, reply_markup=offer.as_markup() if is_private(message) else None)


async def end_session(message: Message, agent: Agent, catalog: Catalog, lang: str | None) -> None:
    assert message.from_user is not None
    ended = await agent.end_session(message.from_user.id, message.chat.id)
    if ended is None:
        await message.answer(catalog.text(lang, "session.nothing_to_end"))
    elif not is_private(message):
        # A summary is the user's private data: it is shown in their private chat only.
        await message.reply(catalog.text(lang, "session.ended_in_group"))
    else:
        # A summary just made can be kept as it is, edited, or left out of memory.
        reviewable = ended.outcome == "summarised" and ended.summary
        await message.answer(end_text(ended, catalog, lang), reply_markup=(
            review_keyboard(ended.session_id, catalog, lang) if reviewable else None
        ))


async def list_sessions(message: Message, agent: Agent, catalog: Catalog, lang: str | None) -> None:
    assert message.from_user is not None
    text, markup = await sessions_page(message.from_user.id, 0, agent, catalog, lang)
    await message.answer(text, reply_markup=markup)


async def turn_page(
    query: CallbackQuery, callback_data: SessionsPage, agent: Agent, catalog: Catalog, lang: str | None
) -> None:
    if not 0 <= callback_data.page <= MAX_PAGE:
        await query.answer(catalog.plain(lang, "errors.stale_button"), show_alert=True)
        return
    text, markup = await sessions_page(query.from_user.id, callback_data.page, agent, catalog, lang)
    await query.answer()
    if isinstance(query.message, Message):
        await query.message.edit_text(text, reply_markup=markup)


async def open_session(
    query: CallbackQuery, callback_data: SessionOpen, agent: Agent, catalog: Catalog,
    lang: str | None,
) -> None:
    in_range = 0 < callback_data.id <= MAX_ID and 0 <= callback_data.page <= MAX_PAGE
    session = await agent.get_session(query.from_user.id, callback_data.id) if in_range else None
    if session is None:  # deleted, or someone else's id in forged callback data
        await query.answer(catalog.plain(lang, "errors.stale_button"), show_alert=True)
        return
    await query.answer()
    back = InlineKeyboardBuilder()
    if session.status == "closed" and session.chat_id == query.from_user.id:
        back.button(text=catalog.plain(lang, "session.buttons.resume"),
                    callback_data=SessionResume(id=session.id))
    back.button(
        text=catalog.plain(lang, "session.buttons.back"), callback_data=SessionsPage(page=callback_data.page)
    )
    back.adjust(1)
    text = catalog.text(
        lang, "session.summary_view", title=session.title or catalog.plain(lang, "session.untitled"),
        date=f"{session.started_at:%Y-%m-%d}", role=agent.role_for(session.role).label(lang),
        messages=await agent.count_messages(session.id),
        summary=session.summary or catalog.plain(lang, "session.no_summary"),
    )
    if isinstance(query.message, Message):
        await query.message.edit_text(text, reply_markup=back.as_markup())


async def resume(
    query: CallbackQuery, callback_data: SessionResume, agent: Agent, catalog: Catalog,
    lang: str | None,
) -> None:
    # Only the presser's own session, in their private chat (the router's filter).
    resumed = await agent.resume_session(
        query.from_user.id, query.from_user.id, callback_data.id
    ) if 0 < callback_data.id <= MAX_ID else None
    if resumed is None:
        await query.answer(catalog.plain(lang, "errors.stale_button"), show_alert=True)
        return
    await query.answer()
    if isinstance(query.message, Message):
        await query.message.answer(catalog.text(
            lang, "session.resumed", title=resumed.title or catalog.plain(lang, "session.untitled"),
            role=agent.role_for(resumed.role).label(lang),
        ))


async def sessions_page(
    user_id: int, page: int, agent: Agent, catalog: Catalog, lang: str | None
) -> tuple[str, InlineKeyboardMarkup | None]:
    page = max(0, page)
    sessions, total = await agent.list_sessions(user_id, page * PAGE_SIZE, PAGE_SIZE)
    if total == 0:
        return catalog.text(lang, "session.list_empty"), None
    pages = max(1, math.ceil(total / PAGE_SIZE))
    lines = [catalog.text(lang, "session.list_header", page=page + 1, pages=pages)]
    builder = InlineKeyboardBuilder()
    for index, session in enumerate(sessions, start=page * PAGE_SIZE + 1):
        lines.append(_item(index, session, agent, catalog, lang))
        builder.button(
            text=catalog.plain(lang, "session.buttons.open", index=index),
            callback_data=SessionOpen(id=session.id, page=page),
        )
    row = [len(sessions)]
    if page > 0:
        builder.button(
            text=catalog.plain(lang, "session.buttons.prev"), callback_data=SessionsPage(page=page - 1)
        )
    if page + 1 < pages:
        builder.button(
            text=catalog.plain(lang, "session.buttons.next"), callback_data=SessionsPage(page=page + 1)
        )
    row.append(int(page > 0) + int(page + 1 < pages))
    builder.adjust(*[n for n in row if n])
    return "\n\n".join(lines), builder.as_markup()


def _item(index: int, session: SessionView, agent: Agent, catalog: Catalog, lang: str | None) -> str:
    title = session.title or catalog.plain(lang, "session.untitled")
    if session.incognito:
        title = catalog.plain(lang, "session.incognito_title")
    role = agent.role_for(session.role).label(lang)
    date = f"{session.started_at:%Y-%m-%d}"
    if session.status == "open":
        return catalog.text(lang, "session.list_item_active", index=index, title=title, date=date, role=role)
    return catalog.text(
        lang, "session.list_item", index=index, title=title, date=date, role=role,
        summary=summary_line(session.summary) or catalog.plain(lang, "session.no_summary"),
    )


def build_router() -> Router:
    """A fresh router each time: a router can belong to only one dispatcher."""
    router = Router(name=__name__)
    router.message.filter(HasText())
    # Session lists and summaries are private: their buttons work in the owner's private chat.
    router.callback_query.filter(InOwnersPrivateChat())
    router.message(Command("start_session"))(start_session)
    router.message(Command("end_session"))(end_session)
    router.message(Command("list_sessions"))(list_sessions)
    router.callback_query(SessionsPage.filter())(turn_page)
    router.callback_query(SessionOpen.filter())(open_session)
    router.callback_query(IncognitoStart.filter())(start_incognito)
    router.callback_query(SessionResume.filter())(resume)
    return router
