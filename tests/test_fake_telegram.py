"""The fake Telegram Bot API, exercised through the real aiogram client and Dispatcher."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiogram import Bot, Dispatcher, F, Router
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import (
    TelegramBadRequest,
    TelegramConflictError,
    TelegramForbiddenError,
    TelegramRetryAfter,
)
from aiogram.types import (
    BotCommand,
    BotCommandScopeAllPrivateChats,
    BufferedInputFile,
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
)
from aiohttp import web

from tests.fakes.telegram import FakeTelegram, parse_html

USER = 1001


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as fake:
        yield fake


@pytest.fixture
async def bot(tg: FakeTelegram) -> AsyncIterator[Bot]:
    bot = tg.make_bot()  # an AiohttpSession subclass that only skips the 250 ms close sleep
    yield bot
    await bot.session.close()


async def _polling(dp: Dispatcher, bot: Bot) -> asyncio.Task[None]:
    task = asyncio.create_task(
        dp.start_polling(bot, handle_signals=False, close_bot_session=False, polling_timeout=1)
    )
    await asyncio.sleep(0)
    return task


async def _stop(dp: Dispatcher, task: asyncio.Task[None]) -> None:
    await dp.stop_polling()
    await asyncio.wait_for(task, 5)


async def test_get_me_with_stock_aiohttp_session(tg: FakeTelegram) -> None:
    bot = Bot("42:TEST", session=AiohttpSession(api=TelegramAPIServer.from_base(tg.base_url)))
    try:
        me = await bot.get_me()
    finally:
        await bot.session.close()
    assert (me.id, me.is_bot, me.username) == (42, True, "desktop_test_bot")
    assert [c.method for c in tg.calls] == ["getMe"]


async def test_send_message_html_is_recorded_and_visible(tg: FakeTelegram, bot: Bot) -> None:
    msg = await bot.send_message(USER, "<b>Hi</b> &lt;there&gt;", parse_mode="HTML")
    assert msg.text == "Hi <there>"
    assert msg.entities is not None and msg.entities[0].type == "bold"
    assert (msg.message_id, msg.chat.id, msg.from_user and msg.from_user.id) == (1, USER, 42)
    [seen] = tg.chat_messages(USER)
    assert (seen.text, seen.raw_text, seen.parse_mode) == (
        "Hi <there>",
        "<b>Hi</b> &lt;there&gt;",
        "HTML",
    )
    [call] = tg.calls_of("sendMessage")
    assert call.params["chat_id"] == USER and not call.failed
    second = await bot.send_message(USER, "again")
    assert second.message_id == 2
    assert await bot.send_chat_action(USER, "typing") is True
    with pytest.raises(TelegramBadRequest, match="wrong parameter action"):
        await bot.send_chat_action(USER, "dancing")


@pytest.mark.parametrize(
    ("html", "detail"),
    [
        ("<b>unclosed", 'Can\'t find end tag corresponding to start tag "b"'),
        ("<b><i>x</b></i>", 'Unmatched end tag at byte offset 7, expected "</i>", found "</b>"'),
        ("line<br>break", 'Unsupported start tag "br" at byte offset 4'),
        ("1 < 2", 'Unsupported start tag "" at byte offset 2'),
        ("<span>x</span>", 'Tag "span" must have class "tg-spoiler"'),
        ("x</b>", "Unexpected end tag at byte offset 1"),
    ],
)
async def test_malformed_html_is_rejected(
    tg: FakeTelegram, bot: Bot, html: str, detail: str
) -> None:
    with pytest.raises(TelegramBadRequest, match="can't parse entities") as err:
        await bot.send_message(USER, html, parse_mode="HTML")
    assert detail in err.value.message
    assert tg.chat_messages(USER) == []
    assert tg.calls_of("sendMessage")[0].failed


async def test_text_length_limits(tg: FakeTelegram, bot: Bot) -> None:
    await bot.send_message(USER, "x" * 4096)
    with pytest.raises(TelegramBadRequest, match="message is too long"):
        await bot.send_message(USER, "x" * 4097)
    # Tags and escapes do not count, only what the user sees.
    await bot.send_message(USER, "<b>" + "&lt;" * 4096 + "</b>", parse_mode="HTML")
    assert tg.chat_messages(USER)[-1].text == "<" * 4096
    # aiogram drops an empty text from the request entirely; Telegram says "empty".
    with pytest.raises(TelegramBadRequest, match="message text is empty"):
        await bot.send_message(USER, "")
    with pytest.raises(TelegramBadRequest, match="message text is empty"):
        await bot.send_message(USER, "<b> </b>", parse_mode="HTML")


async def test_length_is_counted_in_utf16_units(tg: FakeTelegram, bot: Bot) -> None:
    await bot.send_message(USER, "😀" * 2048)  # 4096 UTF-16 units
    with pytest.raises(TelegramBadRequest, match="message is too long"):
        await bot.send_message(USER, "😀" * 2049)
    _, entities = parse_html("😀<b>x</b>")
    assert entities == [{"type": "bold", "offset": 2, "length": 1}]


async def test_fail_next_429_then_success(tg: FakeTelegram, bot: Bot) -> None:
    tg.fail_next("sendMessage", retry_after=3)
    with pytest.raises(TelegramRetryAfter) as err:
        await bot.send_message(USER, "hi")
    assert err.value.retry_after == 3
    assert "Too Many Requests: retry after 3" in err.value.message
    await bot.send_message(USER, "hi")
    assert [c.failed for c in tg.calls_of("sendMessage")] == [True, False]
    assert [m.text for m in tg.chat_messages(USER)] == ["hi"]


async def test_fail_next_when_and_forbidden(tg: FakeTelegram, bot: Bot) -> None:
    tg.fail_next("sendMessage", error_code=403, when=lambda p: p["chat_id"] == 7, times=2)
    await bot.send_message(USER, "fine")
    for _ in range(2):
        with pytest.raises(TelegramForbiddenError, match="bot was blocked by the user"):
            await bot.send_message(7, "blocked")
    await bot.send_message(7, "unblocked")
    assert [m.text for m in tg.chat_messages(7)] == ["unblocked"]


async def test_edit_message_text(tg: FakeTelegram, bot: Bot) -> None:
    msg = await bot.send_message(USER, "draft")
    edited = await bot.edit_message_text("final", chat_id=USER, message_id=msg.message_id)
    assert isinstance(edited, Message) and edited.edit_date is not None
    with pytest.raises(TelegramBadRequest, match="message is not modified"):
        await bot.edit_message_text("final", chat_id=USER, message_id=msg.message_id)
    with pytest.raises(TelegramBadRequest, match="message to edit not found"):
        await bot.edit_message_text("x", chat_id=USER, message_id=99)
    [seen] = tg.chat_messages(USER)
    assert (seen.text, seen.edited, seen.versions) == ("final", 1, ["draft", "final"])
    await bot.delete_message(USER, msg.message_id)
    assert tg.chat_messages(USER) == []


async def test_message_draft_private_only(tg: FakeTelegram, bot: Bot) -> None:
    with pytest.raises(TelegramBadRequest, match="TEXTDRAFT_PEER_INVALID"):
        await bot.send_message_draft(chat_id=-100123, draft_id=1, text="thinking")
    with pytest.raises(TelegramBadRequest, match="non-zero"):
        await bot.send_message_draft(chat_id=USER, draft_id=0, text="thinking")
    sent = await bot.send_message_draft(USER, draft_id=5, text="<i>par</i>", parse_mode="HTML")
    assert sent is True
    [draft] = tg.drafts(USER)
    assert (draft.draft_id, draft.text, draft.raw_text) == (5, "par", "<i>par</i>")
    assert tg.chat_messages(USER) == []  # a draft is not a message


async def test_polling_echo_offsets_and_redelivery() -> None:
    big = 2**32 + 7  # ids above 32 bits must survive the round trip
    async with FakeTelegram(first_update_id=big) as tg:
        bot = tg.make_bot()
        seen: list[int] = []
        router = Router()

        @router.message(F.text)
        async def echo(message: Message, event_update: Any) -> None:
            seen.append(event_update.update_id)
            await message.answer(message.text or "")

        dp = Dispatcher()
        dp.include_router(router)
        task = await _polling(dp, bot)
        try:
            first = tg.send_text(big, "one")
            assert first["update_id"] == big
            reply = await tg.wait_for_message(big, after=first["message"]["message_id"])
            assert reply.text == "one"
            # The next getUpdates confirms it with offset = update_id + 1.
            await tg.wait_for(
                lambda c: c.method == "getUpdates" and c.params.get("offset") == big + 1
            )
            assert tg.pending_updates == []
            second = tg.send_text(big, "two")
            await tg.wait_for_message(big, lambda m: m.text == "two")
            assert seen == [big, big + 1]  # "one" was not delivered twice
            tg.enqueue(first)  # simulated redelivery of an already confirmed update
            await tg.wait_for_message(big, lambda m: m.message_id > 4)
            assert seen == [big, big + 1, big]
            assert [m.text for m in tg.chat_messages(big)] == ["one", "two", "one"]
            assert second["update_id"] == big + 1
        finally:
            await _stop(dp, task)
            await bot.session.close()


async def test_callback_query_reaches_handler(tg: FakeTelegram, bot: Bot) -> None:
    router = Router()

    @router.callback_query(F.data == "yes")
    async def chosen(query: CallbackQuery) -> None:
        await query.answer("noted")
        assert isinstance(query.message, Message)
        await query.message.edit_text("you chose yes")

    dp = Dispatcher()
    dp.include_router(router)
    keyboard = InlineKeyboardMarkup(
        inline_keyboard=[[InlineKeyboardButton(text="Yes", callback_data="yes")]]
    )
    msg = await bot.send_message(USER, "Sure?", reply_markup=keyboard)
    assert msg.reply_markup is not None
    with pytest.raises(ValueError, match="no button"):
        tg.press_button(USER, msg.message_id, "no")
    task = await _polling(dp, bot)
    try:
        update = tg.press_button(USER, msg.message_id, "yes")
        answer = await tg.wait_for(lambda c: c.method == "answerCallbackQuery")
        assert answer.params["callback_query_id"] == update["callback_query"]["id"]
        assert answer.params["text"] == "noted" and not answer.failed
        edited = await tg.wait_for_message(USER, lambda m: m.edited == 1)
        assert edited.text == "you chose yes"
        assert edited.reply_markup is None  # an edit without reply_markup drops the keyboard
    finally:
        await _stop(dp, task)


async def test_send_document_keeps_filename_and_bytes(tg: FakeTelegram, bot: Bot) -> None:
    doc = BufferedInputFile(b"col1,col2\n1,2\n", filename="export.csv")
    msg = await bot.send_document(USER, doc, caption="<b>your data</b>", parse_mode="HTML")
    assert msg.document is not None and msg.document.file_name == "export.csv"
    assert msg.caption == "your data"
    [seen] = tg.chat_messages(USER)
    assert (seen.document_name, seen.document_bytes) == ("export.csv", b"col1,col2\n1,2\n")
    upload = tg.calls_of("sendDocument")[0].params["document"]
    assert upload.filename == "export.csv"  # the attach:// part was folded into the param


async def test_set_my_commands_per_language(tg: FakeTelegram, bot: Bot) -> None:
    await bot.set_my_commands([BotCommand(command="start", description="Start")])
    await bot.set_my_commands(
        [BotCommand(command="start", description="Начать")], language_code="ru"
    )
    scope = BotCommandScopeAllPrivateChats()
    await bot.set_my_commands([BotCommand(command="help", description="Help")], scope=scope)
    assert tg.commands() == [{"command": "start", "description": "Start"}]
    assert tg.commands("ru") == [{"command": "start", "description": "Начать"}]
    assert tg.commands(scope="all_private_chats") == [{"command": "help", "description": "Help"}]
    assert tg.commands("de") is None
    assert [c.description for c in await bot.get_my_commands(language_code="ru")] == ["Начать"]
    await bot.delete_my_commands(language_code="ru")
    assert tg.commands("ru") is None
    with pytest.raises(TelegramBadRequest, match="BOT_COMMAND_INVALID"):
        await bot.set_my_commands([BotCommand(command="Bad Command", description="x")])


async def test_get_updates_offset_limit_and_long_poll(tg: FakeTelegram, bot: Bot) -> None:
    ids = [tg.send_text(USER, f"m{i}")["update_id"] for i in range(3)]
    assert [u.update_id for u in await bot.get_updates(limit=2)] == ids[:2]
    assert [u.update_id for u in await bot.get_updates(offset=ids[1] + 1)] == ids[2:]
    assert [u.update_id for u in await bot.get_updates()] == ids[2:]  # unconfirmed: again
    assert await bot.get_updates(offset=ids[2] + 1, timeout=0) == []
    # Long poll answers as soon as an update arrives, not at the timeout.
    asyncio.get_running_loop().call_later(0.1, tg.send_sticker, USER)
    started = time.monotonic()
    [update] = await bot.get_updates(offset=ids[2] + 1, timeout=3)
    assert time.monotonic() - started < 2
    assert update.message is not None and update.message.sticker is not None


async def test_user_media_and_reply_validate_in_aiogram(tg: FakeTelegram, bot: Bot) -> None:
    sent = await bot.send_message(USER, "question")
    tg.send_photo(USER, caption="look")
    tg.send_voice(USER)
    tg.send_document_from_user(USER, file_name="a.pdf", mime_type="application/pdf")
    tg.send_text(USER, "/start deep", reply_to_message_id=sent.message_id, username="bob")
    photo, voice, document, text = [u.message for u in await bot.get_updates()]
    assert photo and photo.photo and photo.caption == "look"
    assert voice and voice.voice and voice.voice.duration == 3
    assert document and document.document and document.document.file_name == "a.pdf"
    assert text and text.reply_to_message and text.reply_to_message.text == "question"
    assert text.entities and text.entities[0].type == "bot_command"
    assert text.from_user and text.from_user.username == "bob"
    group = tg.send_text(USER, "hi all", chat_id=-100500)
    assert group["message"]["chat"]["type"] == "group"


async def test_webhook_conflict_info_and_push(tg: FakeTelegram, bot: Bot) -> None:
    received: list[tuple[str | None, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        secret = request.headers.get("X-Telegram-Bot-Api-Secret-Token")
        received.append((secret, await request.json()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        await bot.set_webhook(f"http://127.0.0.1:{port}/hook", secret_token="s3cret")
        with pytest.raises(TelegramConflictError, match="webhook is active"):
            await bot.get_updates()
        update = tg.send_text(USER, "via webhook")
        assert (await bot.get_webhook_info()).pending_update_count == 1
        assert await tg.push_to_webhook(update) == 200
        assert received == [("s3cret", update)]
        await bot.delete_webhook(drop_pending_updates=True)
        info = await bot.get_webhook_info()
        assert (info.url, info.pending_update_count) == ("", 0)
        assert await bot.get_updates() == []
    finally:
        await runner.cleanup()


async def test_unknown_method_json_body_and_wait_timeout(tg: FakeTelegram) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{tg.base_url}/bot42:TEST/sendSomething", data={"a": "1"}) as resp:
            assert resp.status == 404
            assert await resp.json() == {
                "ok": False,
                "error_code": 404,
                "description": "Not Found: method not found",
            }
        body = {"chat_id": USER, "text": "json body", "reply_markup": {"inline_keyboard": []}}
        async with http.post(f"{tg.base_url}/bot42:TEST/sendmessage", json=body) as resp:
            assert (await resp.json())["result"]["text"] == "json body"
        async with http.get(f"{tg.base_url}/bot42:TEST/getMe") as resp:
            assert (await resp.json())["ok"] is True
    assert [c.method for c in tg.calls] == ["sendSomething", "sendMessage", "getMe"]
    with pytest.raises(TimeoutError, match="sendSomething"):
        await tg.wait_for(lambda c: c.method == "sendDocument", timeout=0.05)
