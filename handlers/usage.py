"""/usage: today's use of the allowance and when it resets; for operators (ADMIN_USER_IDS) also
everyone's use today and a user's own limit: `/usage all`, `/usage limit USER_ID TOKENS|default`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiogram import Router
from aiogram.filters import Command, CommandObject
from aiogram.types import Message

from graph.events import Usage
from handlers.filters import HasText
from handlers.i18n import Catalog

if TYPE_CHECKING:
    from graph.agent import Agent

MAX_LIMIT = 10**9
MOST_LISTED = 50


def tokens(value: int) -> str:
    return f"{value:,}".replace(",", " ")


def usage_text(usage: Usage, catalog: Catalog, lang: str | None, key: str = "usage.today") -> str:
    return catalog.text(
        lang, key, used=tokens(usage.used), limit=tokens(usage.limit), left=tokens(usage.left),
        percent=usage.percent, resets_at=f"{usage.resets_at:%Y-%m-%d %H:%M}", timezone=usage.timezone,
    )


async def usage(
    message: Message, command: CommandObject, agent: Agent, catalog: Catalog, lang: str | None
) -> None:
    assert message.from_user is not None
    args = (command.args or "").split()
    if args and message.from_user.id in agent.services.settings.admin_user_ids:
        await operator(message, args, agent, catalog, lang)
        return
    await message.answer(usage_text(await agent.usage(message.from_user.id), catalog, lang))


async def operator(
    message: Message, args: list[str], agent: Agent, catalog: Catalog, lang: str | None
) -> None:
    if args == ["all"]:
        rows = (await agent.usage_of_everyone())[:MOST_LISTED]
        lines = [catalog.text(lang, "usage.everyone_header", users=len(rows))]
        lines += [
            catalog.text(lang, "usage.everyone_line", user_id=user, used=tokens(used), limit=tokens(limit))
            for user, used, limit in rows
        ]
        await message.answer("\n".join(lines))
        return
    if len(args) == 3 and args[0] == "limit" and args[1].isdigit():
        user_id, value = int(args[1]), args[2]
        new: int | None
        if value == "default":
            new = None
        elif value.isdigit() and int(value) <= MAX_LIMIT:
            new = int(value)
        else:
            await message.answer(catalog.text(lang, "usage.admin_usage"))
            return
        if not await agent.set_daily_limit(user_id, new):
            await message.answer(catalog.text(lang, "usage.no_such_user", user_id=user_id))
            return
        shown = tokens(new) if new is not None else catalog.plain(lang, "usage.default_limit")
        await message.answer(catalog.text(lang, "usage.limit_set", user_id=user_id, limit=shown))
        return
    await message.answer(catalog.text(lang, "usage.admin_usage"))


def build_router() -> Router:
    """A fresh router each time: a router can belong to only one dispatcher."""
    router = Router(name=__name__)
    router.message.filter(HasText())
    router.message(Command("usage"))(usage)
    return router
