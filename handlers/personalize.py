"""/personalize: choose the role (or Auto), set or clear the user's own instructions, the time zone."""

from __future__ import annotations

from typing import TYPE_CHECKING
from zoneinfo import available_timezones

from aiogram import F, Router
from aiogram.filters import Command, StateFilter
from aiogram.filters.callback_data import CallbackData
from aiogram.fsm.context import FSMContext
from aiogram.fsm.state import State, StatesGroup
from aiogram.types import CallbackQuery, InlineKeyboardMarkup, Message
from aiogram.utils.keyboard import InlineKeyboardBuilder

from graph.events import AUTO_ROLE, UserView
from handlers.filters import HasText, InOwnersPrivateChat, PrivateReply
from handlers.i18n import Catalog

if TYPE_CHECKING:
    from graph.agent import Agent

MAX_INSTRUCTIONS = 2000


class RoleChoice(CallbackData, prefix="role"):
    id: str


class InstructionsAction(CallbackData, prefix="instr"):
    action: str  # edit | clear | cancel


class GroupSharing(CallbackData, prefix="share"):
    on: bool  # the new setting: private memory and instructions in this user's group answers


class MemoryPerRole(CallbackData, prefix="mrole"):
    on: bool  # the new setting: answers draw only on memories made in the answering role


class Personalize(StatesGroup):
    waiting_for_instructions = State()
    waiting_for_timezone = State()


class TimezoneAction(CallbackData, prefix="tz"):
    action: str  # edit | cancel


def menu_keyboard(
    agent: Agent, catalog: Catalog, lang: str | None, current: str, user: UserView
) -> InlineKeyboardMarkup:
    builder = InlineKeyboardBuilder()
    for role in (AUTO_ROLE, *agent.services.roles.roles()):
        label = role.button_text(lang)
        if role.id == current:
            label = catalog.plain(lang, "personalize.buttons.current", label=label)
        builder.button(text=label, callback_data=RoleChoice(id=role.id))
    builder.button(
        text=catalog.plain(lang, "personalize.buttons.instructions"),
        callback_data=InstructionsAction(action="edit"),
    )
    builder.button(
        text=catalog.plain(lang, "personalize.buttons.clear_instructions"),
        callback_data=InstructionsAction(action="clear"),
    )
    builder.button(
        text=catalog.plain(lang, "personalize.buttons.timezone"),
        callback_data=TimezoneAction(action="edit"),
    )
    builder.button(
        text=catalog.plain(
            lang,
            "personalize.buttons.groups_on" if user.private_data_in_groups
            else "personalize.buttons.groups_off",
        ),
        callback_data=GroupSharing(on=not user.private_data_in_groups),
    )
    builder.button(
        text=catalog.plain(
            lang,
            "personalize.buttons.memory_per_role" if user.memory_per_role
            else "personalize.buttons.memory_shared",
        ),
        callback_data=MemoryPerRole(on=not user.memory_per_role),
    )
    builder.adjust(1)
    return builder.as_markup()


async def personalize(message: Message, agent: Agent, catalog: Catalog, lang: str | None) -> None:
    assert message.from_user is not None
    profile = await agent.profile(message.from_user.id, lang)
    text = catalog.text(
        lang, "personalize.menu", role=profile.role.label(lang),
        description=profile.role.describe(lang),
    )
    if profile.user.instructions:
        text += "\n\n" + catalog.text(
            lang, "personalize.instructions_current", instructions=profile.user.instructions
        )
    text += "\n\n" + catalog.text(
        lang, "personalize.timezone_current", timezone=profile.user.timezone or "—"
    )
    text += "\n\n" + catalog.text(
        lang, "personalize.groups_on" if profile.user.private_data_in_groups else "personalize.groups_off"
    )
    text += "\n" + catalog.text(
        lang, "personalize.memory_per_role" if profile.user.memory_per_role else "personalize.memory_shared"
    )
    await message.answer(text, reply_markup=menu_keyboard(
        agent, catalog, lang, profile.role.id, profile.user
    ))


async def choose_role(
    query: CallbackQuery, callback_data: RoleChoice, agent: Agent, catalog: Catalog, lang: str | None
) -> None:
    role = await agent.set_role(query.from_user.id, callback_data.id)
    if role is None:  # the role file was removed since the menu was shown
        await query.answer(catalog.plain(lang, "errors.stale_button"), show_alert=True)
        return
    await query.answer()
    profile = await agent.profile(query.from_user.id, lang)
    if isinstance(query.message, Message):
        await query.message.edit_text(
            catalog.text(
                lang, "personalize.role_set", role=role.label(lang), description=role.describe(lang)
            ),
            reply_markup=menu_keyboard(agent, catalog, lang, role.id, profile.user),
        )


async def toggle_group_sharing(
    query: CallbackQuery, callback_data: GroupSharing, agent: Agent, catalog: Catalog,
    lang: str | None,
) -> None:
    await agent.set_private_data_in_groups(query.from_user.id, callback_data.on)
    profile = await agent.profile(query.from_user.id, lang)
    await query.answer(catalog.plain(
        lang, "personalize.groups_on" if callback_data.on else "personalize.groups_off"
    ), show_alert=True)
    if isinstance(query.message, Message):
        await query.message.edit_reply_markup(reply_markup=menu_keyboard(
            agent, catalog, lang, profile.role.id, profile.user
        ))


async def toggle_memory_per_role(
    query: CallbackQuery, callback_data: MemoryPerRole, agent: Agent, catalog: Catalog,
    lang: str | None,
) -> None:
    await agent.set_memory_per_role(query.from_user.id, callback_data.on)
    profile = await agent.profile(query.from_user.id, lang)
    await query.answer(catalog.plain(
        lang, "personalize.memory_per_role" if callback_data.on else "personalize.memory_shared"
    ), show_alert=True)
    if isinstance(query.message, Message):
        await query.message.edit_reply_markup(reply_markup=menu_keyboard(
            agent, catalog, lang, profile.role.id, profile.user
        ))


async def ask_instructions(
    query: CallbackQuery, state: FSMContext, catalog: Catalog, lang: str | None
) -> None:
    await _ask_for_text(
        query, state, Personalize.waiting_for_instructions, InstructionsAction(action="cancel"),
        catalog.text(lang, "personalize.instructions_prompt", max=MAX_INSTRUCTIONS), catalog, lang,
    )


async def _ask_for_text(
    query: CallbackQuery, state: FSMContext, waiting: State, cancel: CallbackData, prompt: str,
    catalog: Catalog, lang: str | None,
) -> None:
    """Wait for the user's next message as the answer to `prompt`, with a Cancel button."""
    await state.set_state(waiting)
    await query.answer()
    if isinstance(query.message, Message):
        builder = InlineKeyboardBuilder()
        builder.button(text=catalog.plain(lang, "personalize.buttons.cancel"), callback_data=cancel)
        await query.message.answer(prompt, reply_markup=builder.as_markup())


async def _stop_asking(
    query: CallbackQuery, state: FSMContext, catalog: Catalog, lang: str | None, key: str
) -> None:
    await state.clear()
    await query.answer()
    if isinstance(query.message, Message):
        await query.message.edit_text(catalog.text(lang, key))


async def clear_instructions(
    query: CallbackQuery, state: FSMContext, agent: Agent, catalog: Catalog, lang: str | None
) -> None:
    await state.clear()
    await agent.set_instructions(query.from_user.id, None)
    await query.answer(catalog.plain(lang, "personalize.instructions_cleared"))


async def cancel_instructions(
    query: CallbackQuery, state: FSMContext, catalog: Catalog, lang: str | None
) -> None:
    await _stop_asking(query, state, catalog, lang, "personalize.instructions_cancelled")


async def save_instructions(
    message: Message, state: FSMContext, agent: Agent, catalog: Catalog, lang: str | None
) -> None:
    assert message.from_user is not None and message.text is not None
    text = message.text.strip()
    if len(text) > MAX_INSTRUCTIONS:
        await message.answer(catalog.text(
            lang, "personalize.instructions_too_long", length=len(text), max=MAX_INSTRUCTIONS
        ))
        return
    await state.clear()
    await agent.set_instructions(message.from_user.id, text)
    await message.answer(catalog.text(lang, "personalize.instructions_set"))


async def ask_timezone(
    query: CallbackQuery, state: FSMContext, catalog: Catalog, lang: str | None
) -> None:
    await _ask_for_text(
        query, state, Personalize.waiting_for_timezone, TimezoneAction(action="cancel"),
        catalog.text(lang, "personalize.timezone_prompt"), catalog, lang,
    )


async def cancel_timezone(
    query: CallbackQuery, state: FSMContext, catalog: Catalog, lang: str | None
) -> None:
    await _stop_asking(query, state, catalog, lang, "personalize.timezone_cancelled")


async def save_timezone(
    message: Message, state: FSMContext, agent: Agent, catalog: Catalog, lang: str | None
) -> None:
    assert message.from_user is not None and message.text is not None
    zone = find_timezone(message.text)
    if zone is None:
        await message.answer(catalog.text(lang, "personalize.timezone_unknown"))
        return
    await state.clear()
    await agent.set_timezone(message.from_user.id, zone)
    await message.answer(catalog.text(lang, "personalize.timezone_set", timezone=zone))


def find_timezone(text: str) -> str | None:
    """An IANA zone from what a user types: "Europe/Berlin", "berlin", "New York"."""
    wanted = text.strip().replace(" ", "_").lower()
    if not wanted or len(wanted) > 64:
        return None
    zones = available_timezones()
    exact = {zone.lower(): zone for zone in zones}
    if wanted in exact:
        return exact[wanted]
    cities = sorted(zone for zone in zones if zone.lower().rsplit("/", 1)[-1] == wanted)
    return cities[0] if cities else None


def build_router() -> Router:
    """A fresh router each time: a router can belong to only one dispatcher."""
    router = Router(name=__name__)
    # Groups get a pointer to the private chat (handlers/commands.py): instructions are private.
    router.message.filter(HasText())
    router.callback_query.filter(InOwnersPrivateChat())
    router.message(Command("personalize"))(personalize)
    router.callback_query(GroupSharing.filter())(toggle_group_sharing)
    router.callback_query(MemoryPerRole.filter())(toggle_memory_per_role)
    router.callback_query(RoleChoice.filter())(choose_role)
    router.callback_query(InstructionsAction.filter(F.action == "edit"))(ask_instructions)
    router.callback_query(InstructionsAction.filter(F.action == "clear"))(clear_instructions)
    router.callback_query(InstructionsAction.filter(F.action == "cancel"))(cancel_instructions)
    router.callback_query(TimezoneAction.filter(F.action == "edit"))(ask_timezone)
    router.callback_query(TimezoneAction.filter(F.action == "cancel"))(cancel_timezone)
    # Only where the question was asked: a state left in a group from an older version must
    # not turn someone's group message into their instructions.
    router.message(StateFilter(Personalize.waiting_for_instructions), PrivateReply())(save_instructions)
    router.message(StateFilter(Personalize.waiting_for_timezone), PrivateReply())(save_timezone)
    return router
