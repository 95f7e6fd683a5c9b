"""/start and /help, the command menu in Russian and English, and what groups are told."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiogram import Bot, Router
from aiogram.filters import Command, CommandStart
from aiogram.types import BotCommand, BotCommandScopeAllPrivateChats, BotCommandScopeDefault, Message
from aiogram.utils.keyboard import InlineKeyboardBuilder

from handlers.filters import HasText, InGroup
from handlers.i18n import Catalog

if TYPE_CHECKING:
    from graph.agent import Agent

MENU = (
    "start_session", "end_session", "list_sessions", "memory", "find", "reminders", "usage",
    "personalize", "export_data", "delete_my_data", "help", "start",
)
# Commands that show or change a user's private data (sessions, summaries, instructions,
# memory, the whole export): answered in the owner's private chat only (README, "Groups").
PRIVATE_ONLY = (
    "list_sessions", "memory", "find", "reminders", "usage", "personalize", "export_data",
    "delete_my_data",
)


async def register_menu(bot: Bot, catalog: Catalog) -> None:
    """The menu in both languages; groups list only the commands that work there."""
    for lang in ("en", "ru"):
        descriptions = catalog.section(lang, "commands")
        everything = [BotCommand(command=c, description=descriptions[c]) for c in MENU]
        in_groups = [c for c in everything if c.command not in PRIVATE_ONLY]
        code = None if lang == "en" else lang
        await bot.set_my_commands(everything, scope=BotCommandScopeAllPrivateChats(), language_code=code)
        await bot.set_my_commands(in_groups, scope=BotCommandScopeDefault(), language_code=code)


async def start(message: Message, agent: Agent, catalog: Catalog, lang: str | None) -> None:
    assert message.from_user is not None
    await agent.profile(message.from_user.id, lang)
    await message.answer(catalog.text(
        lang, "start.greeting", name=message.from_user.first_name,
        limit=f"{agent.services.settings.daily_token_limit:,}".replace(",", " "),
    ))


async def help_(message: Message, agent: Agent, catalog: Catalog, lang: str | None) -> None:
    await message.answer(catalog.text(
        lang, "help.text", limit=f"{agent.services.settings.daily_token_limit:,}".replace(",", " ")
    ))


async def private_chat_pointer(message: Message, bot: Bot, catalog: Catalog, lang: str | None) -> None:
    """In a group: where the private command works, and a button that opens that chat."""
    me = await bot.me()
    builder = InlineKeyboardBuilder()
    if me.username:
        builder.button(
            text=catalog.plain(lang, "access.buttons.open_private"), url=f"https://t.me/{me.username}"
        )
    await message.reply(catalog.text(lang, "access.private_only"), reply_markup=builder.as_markup())


def build_router() -> Router:
    """A fresh router each time: a router can belong to only one dispatcher."""
    router = Router(name=__name__)
    router.message.filter(HasText())
    router.message(Command(*PRIVATE_ONLY), InGroup())(private_chat_pointer)
    router.message(CommandStart())(start)
    router.message(Command("help"))(help_)
    return router
