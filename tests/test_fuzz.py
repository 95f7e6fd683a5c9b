"""H1/H2: generated Telegram updates, fed to the whole running bot, never crash it or misuse the model.

One bot (real aiogram + the durable-inbox polling loop of handlers/delivery.py, against the
fake Telegram and the fake OpenAI) serves every example of a test. Raw updates are generated
as Telegram would send them (only shapes aiogram's Update accepts: one invalid update would
fail its whole getUpdates batch), each is fed alone and processed to the end (the getUpdates
offset passed it and its inbox row is done), then checked:

* nothing was logged at ERROR (a failing update logs "update N failed" in delivery);
* the model (chat or embeddings) was called only for a person's text meant for the bot:
  private text, or a group message mentioning or replying to the bot, with visible characters
  and within MAX_MESSAGE_CHARS (or a /command, which may summarise); and then asked exactly
  the addressed text;
* the budget ledger (UsageDay) is untouched by ignored updates, and nobody else's ever moves;
  no message rows are stored for ignored updates, and stored rows are the sender's, in that chat;
* every Bot API call the update caused went to the chat the update came from; bots get nothing;
* after each example the polling task is alive and a fresh user's question is answered.

H2 feeds one user's conversation in random order with random duplicates across random
getUpdates batches: exactly one reply per update id, in the order the bot first received them.

The bugs the fuzz found are pinned as regression tests at the end. DESKTOP_FUZZ_EXAMPLES and
DESKTOP_FUZZ_REPLAYS make a longer hunt.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import os
import re
import time
import unicodedata
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiogram.types import Update
from hypothesis import HealthCheck, Phase, example, given, note, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.models import InboxUpdate, Message, UsageDay
from tests.fakes.openai import FakeOpenAI
from tests.harness import TOKEN, Harness

Raw = dict[str, Any]

BOT_ID = int(TOKEN.split(":")[0])
BOT_USERNAME = "desktop_test_bot"  # FakeTelegram's default
MENTION = f"@{BOT_USERNAME}"
CAP = 300  # MAX_MESSAGE_CHARS for these tests: small, so over-long texts are common
# A few recurring users and groups (ids past 2**32 among them), so sessions, menus and
# callbacks meet state left by earlier updates; the rest are random up to 2**52.
POOL_USERS = (7, 2**31 + 5, 2**32 + 1, 2**52 - 3)
POOL_GROUPS = (-1001234567890, -(2**40) - 7)

EXAMPLES = int(os.environ.get("DESKTOP_FUZZ_EXAMPLES", "20"))
# No shrinking: the examples share one live bot, so a replay is never quite the same and
# shrinking a 30-update list through it takes minutes; a failure names the update in full.
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, database=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)

# aiogram warns once per update of a type it does not know; the fuzz sends many on purpose.
UNKNOWN_TYPE_WARNING = "ignore:Detected unknown update type:RuntimeWarning"

# --- strategies: raw updates exactly as Telegram would send them -------------------------

ZERO_WIDTH = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff"]
RTL = ["مرحبا بالعالم", "שלום עולם", "\u200f", "\u200e", "\u202e", "\u202b", "\u061c", "\u2067"]
EMOJI = ["👍", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "🇺🇦", "🧑🏿\u200d🚀", "❤️", "#️⃣"]
META = [
    "*", "_", "`", "```", "~", "||", "[x](http://example.com)", "<b>", "</b>", "<i>x</i>", "&",
    "&amp;", "&lt;", "&#0;", "<script>alert(1)</script>", '<a href="tg://user?id=1">x</a>', "\\",
    "{", "}", "{name}", "%s", "\x00", "\x1b[31m",
]  # fmt: skip
SPACES = [" ", "\n", "\t", "\r\n", "\u00a0", "\u3000", "\u2028", "\x1c"]
MENTIONS = [MENTION, MENTION.upper(), "@Desktop_Test_Bot", f"{MENTION}_fan", f"{MENTION}!", "@other_bot"]
COMMANDS = [
    "/start", "/help", "/personalize", "/list_sessions", "/end_session", "/start_session",
    "/export_data", "/delete_my_data", "/unknown", f"/start{MENTION}", f"/help{MENTION}", "/",
]  # fmt: skip

any_char = st.characters(exclude_categories=("Cs",))  # Telegram sends UTF-8: no lone surrogates
piece = st.one_of(
    st.sampled_from(ZERO_WIDTH + RTL + EMOJI + META + SPACES + MENTIONS),
    st.text(any_char, max_size=20),
    st.text(st.sampled_from("aZ09 .,!?ёЯİß"), max_size=20),
)
short_text = st.lists(piece, max_size=10).map("".join)
invisible_text = st.lists(st.sampled_from(ZERO_WIDTH + SPACES), min_size=1, max_size=8).map("".join)
command_text = st.tuples(st.sampled_from(COMMANDS), st.sampled_from(["", " "]), short_text).map(
    "".join
)


@st.composite
def long_text(draw: st.DrawFn) -> str:
    """Up to ~5000 characters: a piece repeated (beyond CAP most of the time)."""
    unit = draw(piece.filter(bool))
    length = draw(st.integers(1, 5000))
    return (unit * (length // len(unit) + 1))[:length]


texts = st.one_of(short_text, short_text, invisible_text, command_text, long_text(), st.just(""))
ids_32 = st.integers(1, 2**31 - 1)
dates = st.integers(1, 2**31 - 1)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**60), 2**60), st.text(max_size=8))
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
# Fields a later Bot API might add: the model must keep ignoring what it does not know.
extra_fields = st.dictionaries(
    st.text(st.sampled_from("abcdefgxyz_"), min_size=1, max_size=8).map(lambda k: f"x_{k}"),
    json_value, max_size=2,
)
user_ids = st.one_of(st.sampled_from(POOL_USERS), st.integers(1, 2**52))
group_ids = st.one_of(st.sampled_from(POOL_GROUPS), st.integers(-(2**52), -1))
languages = st.one_of(
    st.none(), st.sampled_from(["en", "ru", "ru-RU", "uk", "ar", "he", "", "zz-ZZ-x"]),
    st.text(max_size=20),
)


@st.composite
def users(draw: st.DrawFn, *, is_bot: bool | None = None) -> Raw:
    user: Raw = {
        "id": draw(user_ids),
        "is_bot": draw(st.integers(0, 9)) == 0 if is_bot is None else is_bot,
        "first_name": draw(st.one_of(st.just("Test"), short_text)),
    }
    optional = (
        ("last_name", short_text), ("username", st.from_regex(r"[A-Za-z]\w{4,31}", fullmatch=True)),
        ("language_code", languages), ("is_premium", st.booleans()),
    )
    for key, value in optional:
        if draw(st.booleans()) and (got := draw(value)) is not None:
            user[key] = got
    user.update(draw(extra_fields))
    return user


BOT_USER: Raw = {"id": BOT_ID, "is_bot": True, "first_name": "DESK TOP", "username": BOT_USERNAME}
# Who Telegram names as the sender of a message written on behalf of a chat.
TELEGRAM_ID = 777000  # a linked channel's post, automatically forwarded into its group
ON_BEHALF = {
    "auto_forward": {"id": TELEGRAM_ID, "is_bot": False, "first_name": "Telegram"},
    "anonymous_admin": {"id": 1087968824, "is_bot": True, "first_name": "Group",
                        "username": "GroupAnonymousBot"},
    "channel": {"id": 136817688, "is_bot": True, "first_name": "Channel",
                "username": "Channel_Bot"},
}  # fmt: skip


def private_chat(user: Raw) -> Raw:
    chat: Raw = {"id": user["id"], "type": "private", "first_name": user["first_name"]}
    if "username" in user:
        chat["username"] = user["username"]
    return chat


@st.composite
def group_chats(draw: st.DrawFn) -> Raw:
    return {"id": draw(group_ids), "type": draw(st.sampled_from(["group", "supergroup"])),
            "title": draw(st.one_of(st.just("Test group"), short_text))}  # fmt: skip


def files(prefix: str) -> st.SearchStrategy[Raw]:
    return st.builds(lambda n: {"file_id": f"{prefix}{n}", "file_unique_id": f"U{prefix}{n}"}, ids_32)


sizes = st.integers(1, 4096)
media = st.one_of(
    st.builds(lambda f, w, h, kind, anim, vid, emoji: {"sticker": {
        **f, "type": kind, "width": w, "height": h, "is_animated": anim, "is_video": vid,
        **({"emoji": emoji} if emoji else {})}},
        files("STK"), sizes, sizes, st.sampled_from(["regular", "mask", "custom_emoji"]),
        st.booleans(), st.booleans(), st.sampled_from(["", *EMOJI])),
    st.builds(lambda fs, w: {"photo": [{**f, "width": w, "height": w} for f in fs]},
              st.lists(files("PHO"), min_size=1, max_size=3), sizes),
    st.builds(lambda f, d: {"voice": {**f, "duration": d, "mime_type": "audio/ogg"}},
              files("VOI"), st.integers(0, 2**31 - 1)),
    st.builds(lambda f, name: {"document": {**f, "file_name": name}}, files("DOC"), short_text),
    st.builds(lambda lat, lon: {"location": {"latitude": lat, "longitude": lon}},
              st.floats(-90, 90), st.floats(-180, 180)),
    st.builds(lambda phone, name, uid: {"contact": {"phone_number": phone, "first_name": name or "x",
                                                     **({"user_id": uid} if uid else {})}},
              st.from_regex(r"\+?[0-9]{3,15}", fullmatch=True), short_text,
              st.one_of(st.none(), st.integers(1, 2**52))),
    st.builds(lambda emoji, value: {"dice": {"emoji": emoji, "value": value}},
              st.sampled_from(["🎲", "🎯", "🏀", "⚽", "🎳", "🎰"]), st.integers(1, 64)),
    st.builds(lambda pid, question, options: {"poll": {
        "id": str(pid), "question": question or "?",
        "options": [{"text": o or "-", "voter_count": 0, "persistent_id": str(i)}
                    for i, o in enumerate(options)],
        "total_voter_count": 0, "is_closed": False, "is_anonymous": True, "type": "regular",
        "allows_multiple_answers": False, "allows_revoting": False, "members_only": False}},
        ids_32, short_text, st.lists(short_text, min_size=2, max_size=4)),
)
captions = st.one_of(st.none(), texts)


def must_validate(raw: Raw) -> Raw:
    """Only updates aiogram accepts: one invalid update would fail the whole getUpdates batch."""
    Update.model_validate(raw)
    return raw


@st.composite
def messages(draw: st.DrawFn, chat: Raw, sender: Raw) -> Raw:
    message: Raw = {"message_id": draw(ids_32), "date": draw(dates), "chat": chat, "from": sender}
    if draw(st.integers(0, 3)):  # text most of the time
        message["text"] = draw(texts)
        if message["text"].startswith("/") and draw(st.booleans()):
            command = message["text"].split()[0] if message["text"].split() else "/"
            message["entities"] = [{"type": "bot_command", "offset": 0,
                                    "length": len(command.encode("utf-16-le")) // 2}]
    else:
        message.update(draw(media))
        if ("photo" in message or "document" in message) and (caption := draw(captions)) is not None:
            message["caption"] = caption
    if draw(st.integers(0, 4)) == 0:
        message["forward_origin"] = draw(st.one_of(
            st.builds(lambda u, d: {"type": "user", "date": d, "sender_user": u}, users(), dates),
            st.builds(lambda n, d: {"type": "hidden_user", "date": d, "sender_user_name": n or "x"},
                      short_text, dates),
        ))
    if chat["type"] != "private" and draw(st.integers(0, 3)) == 0:  # a reply, to the bot or not
        author = BOT_USER if draw(st.booleans()) else draw(users(is_bot=False))
        message["reply_to_message"] = {"message_id": draw(ids_32), "date": draw(dates),
                                       "chat": chat, "from": author, "text": "earlier"}  # fmt: skip
    message.update(draw(extra_fields))
    if draw(st.integers(0, 19)) == 0:
        del message["from"]  # optional in the schema (Telegram omits it only in channels)
    return message


@st.composite
def private_messages(draw: st.DrawFn) -> Raw:
    sender = draw(users())
    return draw(messages(private_chat(sender), sender))


@st.composite
def group_messages(draw: st.DrawFn) -> Raw:
    chat = draw(group_chats())
    message = draw(messages(chat, draw(users())))
    if "text" in message and draw(st.booleans()):  # mention the bot (or almost) somewhere
        text, at = message["text"], draw(st.integers(0, len(message["text"])))
        message["text"] = text[:at] + draw(st.sampled_from(MENTIONS)) + text[at:]
    if draw(st.integers(0, 5)) == 0:  # written on behalf of a chat, not by a person
        kind = draw(st.sampled_from(sorted(ON_BEHALF)))
        message["from"] = ON_BEHALF[kind]
        channel = {"id": draw(group_ids), "type": "channel", "title": "News"}
        message["sender_chat"] = chat if kind == "anonymous_admin" else channel
        if kind == "auto_forward":
            message["is_automatic_forward"] = True
    return message


CALLBACK_PREFIXES = ["role:", "instr:", "sp:", "so:", "del:"]
callback_field = st.one_of(
    st.sampled_from(["edit", "clear", "cancel", "yes", "no", "personal_assistant", "", "0", "-1",
                     "99999999999999999999", "1e9", "../../etc", "None"]),
    st.integers(-(2**70), 2**70).map(str),
    st.integers(-600, 5).map(lambda age: str(int(time.time()) - age)),  # a "fresh" timestamp
    st.text(max_size=12),
)


def fits_64_bytes(data: str) -> bool:
    return 1 <= len(data.encode()) <= 64


callback_data = st.one_of(
    st.text(any_char, min_size=1, max_size=64),
    st.builds(lambda prefix, parts: prefix + ":".join(parts),
              st.sampled_from(CALLBACK_PREFIXES), st.lists(callback_field, max_size=3)),
).filter(fits_64_bytes)


@st.composite
def callback_queries(draw: st.DrawFn) -> Raw:
    sender = draw(users())
    query: Raw = {"id": f"fuzz-{draw(ids_32)}", "from": sender, "chat_instance": str(draw(ids_32))}
    if draw(st.integers(0, 5)):
        query["data"] = draw(callback_data)
    where = draw(st.sampled_from(["private", "group", "inline"]))
    if where == "inline":
        query["inline_message_id"] = f"inline-{draw(ids_32)}"
    else:
        chat = private_chat(sender) if where == "private" else draw(group_chats())
        # Resolved when fed: one of the bot's real messages in that chat if it has any
        # (Telegram only sends callbacks for existing messages), else an inaccessible one.
        query["message"] = {"chat": chat, "message_id": draw(ids_32), "date": 0}
    query.update(draw(extra_fields))
    return {"callback_query": query}


@st.composite
def other_updates(draw: st.DrawFn) -> Raw:
    kind = draw(st.sampled_from(["edited_message", "channel_post", "my_chat_member", "unknown"]))
    if kind == "unknown":  # a type newer than aiogram: only update_id and an unknown key
        name = draw(st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz_"), min_size=1, max_size=20))
        return {f"x_{name}": draw(json_value)}
    if kind == "edited_message":
        message = draw(st.one_of(private_messages(), group_messages()))
        return {"edited_message": {**message, "edit_date": draw(dates)}}
    if kind == "channel_post":
        channel = {"id": draw(group_ids), "type": "channel", "title": draw(short_text) or "c"}
        post: Raw = {"message_id": draw(ids_32), "date": draw(dates), "chat": channel,
                     "sender_chat": channel}  # fmt: skip
        post["text"] = draw(texts) if draw(st.booleans()) else f"{MENTION} hello"
        return {"channel_post": post}
    sender = draw(users(is_bot=False))
    chat = draw(st.one_of(st.just(private_chat(sender)), group_chats()))
    old, new = draw(st.permutations(["member", "kicked"]))
    member = {"status": new, "user": BOT_USER, **({"until_date": 0} if new == "kicked" else {})}
    before = {"status": old, "user": BOT_USER, **({"until_date": 0} if old == "kicked" else {})}
    return {"my_chat_member": {"chat": chat, "from": sender, "date": draw(dates),
                               "old_chat_member": before, "new_chat_member": member}}  # fmt: skip


# Update ids are assigned when fed (they must grow, as Telegram's do); 0 is a placeholder.
updates = st.one_of(
    private_messages().map(lambda m: {"message": m}),
    private_messages().map(lambda m: {"message": m}),
    group_messages().map(lambda m: {"message": m}),
    callback_queries(),
    other_updates(),
).map(lambda body: must_validate({"update_id": 0, **body}))


# --- the oracle: what the bot may do for an update ----------------------------------------

def visible(text: str) -> bool:
    return any(not ch.isspace() and unicodedata.category(ch) != "Cf" for ch in text)


def addressed(message: Raw) -> str | None:
    """The text meant for the bot (private: all; groups: on a reply to the bot or a mention)."""
    text = message.get("text")
    if text is None:
        return None
    replied = message.get("reply_to_message") or {}
    if message["chat"]["type"] == "private" or replied.get("from", {}).get("id") == BOT_ID:
        return text.strip()
    # Case-insensitive and as a whole word ("@desktop_test_bot_fan" is someone else), found in
    # the text itself: positions in text.lower() are not positions in text.
    found = re.search(rf"{re.escape(MENTION)}\b", text, flags=re.IGNORECASE)
    return None if found is None else (text[:found.start()] + text[found.end():]).strip()


def may_call_model(raw: Raw) -> bool:
    """Only text from a person, meant for the bot, non-empty and within the cap (or a command)."""
    message = raw.get("message")
    if message is None or message.get("from", {}).get("is_bot", True):
        return False
    if message["from"]["id"] == TELEGRAM_ID or "sender_chat" in message:
        return False  # written on behalf of a channel or a group, not by a person
    text = message.get("text")
    if text is None:
        return False
    if text.startswith("/"):
        return True  # commands are addressed to bots; /end_session may summarise
    question = addressed(message)
    return question is not None and visible(question) and len(question) <= CAP


def expected_question(raw: Raw) -> str | None:
    """What the model must be asked for this update, when it is asked (not for commands)."""
    message = raw["message"]
    if not may_call_model(raw) or message["text"].startswith("/"):
        return None
    return addressed(message)


def body_of(raw: Raw) -> Raw:
    """The event of a known update type; {} for an unknown type (its content means nothing)."""
    kind = next(k for k in raw if k != "update_id")
    return {} if kind.startswith("x_") else raw[kind]


def chat_of(raw: Raw) -> int | None:
    body = body_of(raw)
    chat = body.get("chat") or (body.get("message") or {}).get("chat")
    return None if chat is None else int(chat["id"])


def sender_of(raw: Raw) -> Raw | None:
    return body_of(raw).get("from")


def deletes_data(raw: Raw) -> bool:
    """A (forged or real) fresh "yes" on the delete confirmation: the sender's own rows may go."""
    data = (raw.get("callback_query") or {}).get("data") or ""
    return data.startswith("del:yes:")


# --- running updates through the bot ------------------------------------------------------

class ErrorLog(logging.Handler):
    """Every ERROR logged anywhere while the bot runs (a failed update logs one in delivery)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def errors() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    logging.getLogger().addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger().removeHandler(handler)


@pytest.fixture
async def h(start_bot: Callable[..., Any]) -> AsyncIterator[Harness]:
    async with start_bot(max_message_chars=CAP) as harness:
        yield harness


@dataclass
class Feeder:
    """Gives each update a fresh, growing id (large ones too) and waits until it is processed."""

    h: Harness
    sessions: async_sessionmaker[AsyncSession]
    next_id: int = 2**33  # update ids past 32 bits
    next_fresh_user: int = 900_000_000
    asked: int = 0  # updates that reached the model

    def assign(self, raw: Raw, jump: int = 1) -> Raw:
        raw["update_id"] = self.next_id
        self.next_id += jump
        return raw

    async def processed(self, update_id: int, timeout: float = 15.0) -> None:
        """Confirmed to Telegram (the offset passed it) and marked done in the inbox."""
        deadline = time.monotonic() + timeout
        while True:
            confirmed = all(u["update_id"] != update_id for u in self.h.tg.pending_updates)
            if confirmed:
                async with self.sessions() as db:
                    state = await db.scalar(
                        select(InboxUpdate.state).where(InboxUpdate.update_id == update_id)
                    )
                # Done in the inbox is not yet finished: the answer's commit marks it done,
                # then the answer is sent. The update's delivery task ends after that.
                if state == "done" and not delivery_tasks():
                    return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"update {update_id} not processed within {timeout}s "
                    f"(confirmed={confirmed}); the bot is stuck"
                )
            await asyncio.sleep(0.01)


def delivery_tasks() -> list[asyncio.Task[Any]]:
    """Updates being processed (handlers/delivery.py Delivery._after)."""
    return [
        t for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__qualname__", None) == "Delivery._after" and not t.done()
    ]


def serving_task() -> asyncio.Task[Any]:
    tasks = [
        t for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__name__", None) == "serve_polling"
    ]
    assert len(tasks) == 1, "the bot's polling task is gone"
    return tasks[0]


async def ledger(sessions: async_sessionmaker[AsyncSession]) -> dict[tuple[int, Any], tuple[int, int]]:
    async with sessions() as db:
        rows = (await db.execute(select(UsageDay))).scalars().all()
        return {(r.user_id, r.day): (r.used, r.reserved) for r in rows}


async def last_message_id(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with sessions() as db:
        return int(await db.scalar(select(func.max(Message.id))) or 0)


async def messages_after(sessions: async_sessionmaker[AsyncSession], after: int) -> list[Message]:
    async with sessions() as db:
        return list((await db.execute(select(Message).where(Message.id > after))).scalars())


def register(h: Harness, raw: Raw) -> None:
    """Let the fake Telegram know the user's message, as Telegram does (replies quote it)."""
    message = raw.get("message") or raw.get("edited_message")
    if message is not None:
        h.tg._user_messages[(message["chat"]["id"], message["message_id"])] = message


def resolve_callback_message(h: Harness, raw: Raw) -> None:
    """Point a callback at a real bot message of its chat, as Telegram does, when there is one."""
    query = raw.get("callback_query")
    if query is None:
        return
    chat = query["message"]["chat"] if "message" in query else {"id": None}
    sent = [m for m in h.tg.chat_messages(chat["id"]) if m.text] if "message" in query else []
    if sent:
        m = sent[query["message"]["message_id"] % len(sent)]
        message: Raw = {"message_id": m.message_id, "date": m.date, "chat": chat,
                        "from": m.from_user, "text": m.text}  # fmt: skip
        if m.reply_markup and "inline_keyboard" in m.reply_markup:
            message["reply_markup"] = m.reply_markup
        query["message"] = message
    # The fake answers only callback queries it knows of, like Telegram (a query id is
    # Telegram's): register this one so answerCallbackQuery is a real success or failure.
    h.tg._open_queries.add(query["id"])


CHAT_METHODS_SILENT = {"getUpdates", "getMe", "setMyCommands", "deleteWebhook"}


async def feed_and_check(feeder: Feeder, raw: Raw, errors: ErrorLog) -> bool:
    """Feed one update, wait for it, check every per-update invariant; True if it asked the model."""
    try:
        return await _feed_and_check(feeder, raw, errors)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nthe update: {raw!r}"[:6000]) from None


async def _feed_and_check(feeder: Feeder, raw: Raw, errors: ErrorLog) -> bool:
    h, sessions = feeder.h, feeder.sessions
    register(h, raw)
    resolve_callback_message(h, raw)
    must_validate(raw)
    calls_before = len(h.tg.calls)
    chats_before, embeds_before = len(h.ai.chat_requests), len(h.ai.embedding_requests)
    ledger_before = await ledger(sessions)
    last_before = await last_message_id(sessions)
    errors_before = len(errors.records)

    h.tg.enqueue(raw)
    await feeder.processed(raw["update_id"])

    kind = next(k for k in raw if k != "update_id")
    what = f"update {raw['update_id']} ({kind})"
    # no unhandled exception while it was processed
    failures = errors.records[errors_before:]
    assert not failures, f"{what} logged errors: {[r.getMessage()[:300] for r in failures]}"
    # no model call for anything but text meant for the bot
    new_chat_requests = h.ai.chat_requests[chats_before:]
    asked = bool(new_chat_requests) or len(h.ai.embedding_requests) > embeds_before
    if not may_call_model(raw):
        assert not asked, f"{what} is not a question for the model, yet the model was called"
    question = expected_question(raw) if kind == "message" else None
    if question is not None and new_chat_requests:
        assert new_chat_requests[-1]["messages"][-1]["content"] == question, what
    # the ledger: untouched for ignored updates, and nobody else's ever
    ledger_after = await ledger(sessions)
    sender = sender_of(raw)
    sender_id = None if sender is None else sender["id"]
    for key in ledger_before.keys() | ledger_after.keys():
        if key[0] != sender_id or not may_call_model(raw):
            if key[0] == sender_id and deletes_data(raw) and key not in ledger_after:
                continue  # the sender confirmed the deletion of their own data
            assert ledger_before.get(key) == ledger_after.get(key), f"{what} changed ledger {key}"
    # stored messages: none for ignored updates; the sender's own, in this chat, otherwise
    stored = await messages_after(sessions, last_before)
    if not may_call_model(raw):
        assert stored == [], f"{what} stored messages"
    for row in stored:
        assert (row.user_id, row.chat_id) == (sender_id, chat_of(raw)), f"{what}: cross-user write"
    # every reply went to the chat the update came from, and nowhere else
    chat_id = chat_of(raw)
    for call in h.tg.calls[calls_before:]:
        if call.method in CHAT_METHODS_SILENT or "chat_id" not in call.params:
            continue
        assert int(call.params["chat_id"]) == chat_id, (
            f"{what} from chat {chat_id} made the bot call {call.method} in chat {call.params['chat_id']}"
        )
    if sender is not None and sender.get("is_bot"):  # other bots are never answered at all
        answers = [c for c in h.tg.calls[calls_before:] if c.method not in CHAT_METHODS_SILENT]
        assert answers == [], f"{what} from a bot was answered: {[c.method for c in answers]}"
    return asked


async def still_serving(feeder: Feeder) -> None:
    """The polling task is alive and a fresh user's plain question still gets an answer."""
    assert not serving_task().done()
    h, user_id = feeder.h, feeder.next_fresh_user
    feeder.next_fresh_user += 1
    before = len(h.ai.chat_requests)
    update = h.tg.send_text(user_id, "are you still there?")
    feeder.next_id = max(feeder.next_id, update["update_id"] + 1)  # the fake numbered this one
    reply = await h.reply_to(update, lambda m: (m.text or "").startswith("Answer"), timeout=10)
    assert reply.chat_id == user_id
    await feeder.processed(update["update_id"])  # nothing of it left in flight for what follows
    assert h.ai.chat_requests[before]["messages"][-1]["content"] == "are you still there?"


# --- H1 -----------------------------------------------------------------------------------

@pytest.fixture
def feeder(h: Harness, sessions: async_sessionmaker[AsyncSession]) -> Feeder:
    """One per test, shared by all its examples (like the bot): ids keep growing across them."""
    return Feeder(h, sessions)


@pytest.fixture
def fuzz_feeder(feeder: Feeder) -> Iterator[Feeder]:
    yield feeder
    # Not vacuous: the explicit examples alone put several questions to the model.
    assert feeder.asked >= 3, "hardly anything reached the model: the oracle or the generator is off"


def text_from(user_id: int, text: str, chat: Raw | None = None, **extra: Any) -> Raw:
    user = {"id": user_id, "is_bot": False, "first_name": "Test", "language_code": "en"}
    message = {"message_id": 1, "date": 1, "chat": chat or private_chat(user), "from": user,
               "text": text, **extra}  # fmt: skip
    return {"update_id": 0, "message": message}


def button_from(user_id: int, data: str, chat: Raw | None = None) -> Raw:
    user = {"id": user_id, "is_bot": False, "first_name": "Test"}
    return {"update_id": 0, "callback_query": {
        "id": f"explicit-{data}", "from": user, "chat_instance": "1", "data": data,
        "message": {"chat": chat or private_chat(user), "message_id": 1, "date": 0}}}


HUGE = "99999999999999999999"  # parses as an int field of our CallbackData; fits no column
GROUP = {"id": POOL_GROUPS[0], "type": "supergroup", "title": "Test group"}
# Cases worth running every time, whatever the random examples are.
EXPLICIT = [
    [text_from(7, "hello"), button_from(7, f"sp:{HUGE}"), button_from(7, f"so:{HUGE}:0"),
     button_from(7, f"so:1:{HUGE}"), button_from(7, "sp:-5"), button_from(7, f"del:yes:{HUGE}"),
     button_from(7, "role:"), button_from(7, "role:../../etc/passwd")],
    [button_from(2**52 - 3, "instr:edit"), text_from(2**52 - 3, "my instructions"),
     text_from(2**52 - 3, "\u200b\u2060\ufeff"), text_from(2**52 - 3, "x" * (CAP + 1)),
     text_from(2**52 - 3, "\u05e9\u05dc\u05d5\u05dd \u202e" + "👨\u200d👩\u200d👧" * 3)],
    [text_from(2**32 + 1, f"İİİ {MENTION} what is 2+2?", chat=GROUP),
     text_from(2**32 + 1, "just chatting", chat=GROUP),
     text_from(2**32 + 1, "/end_session", chat=GROUP),
     {"update_id": 0, "message": {**text_from(5, "hi")["message"], "from": {
         "id": 5, "is_bot": True, "first_name": "Other bot"}}},
     {"update_id": 0, "message": {k: v for k, v in text_from(6, "no sender")["message"].items()
                                  if k != "from"}}],
]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.filterwarnings(UNKNOWN_TYPE_WARNING)
@FUZZ_SETTINGS
@example(batch=EXPLICIT[0], jumps=[1] * 30)
@example(batch=EXPLICIT[1], jumps=[1] * 30)
@example(batch=EXPLICIT[2], jumps=[1] * 30)
@given(
    batch=st.lists(updates, min_size=1, max_size=30),
    jumps=st.lists(st.integers(1, 2**20), min_size=30, max_size=30),
)
async def test_generated_updates_never_crash_the_bot_nor_reach_the_model_unasked(
    fuzz_feeder: Feeder, errors: ErrorLog, batch: list[Raw], jumps: list[int],
) -> None:
    feeder = fuzz_feeder
    for raw, jump in zip(copy.deepcopy(batch), jumps, strict=False):
        feeder.assign(raw, jump)
        note(repr(raw)[:3000])
        feeder.asked += await feed_and_check(feeder, raw, errors)
    await still_serving(feeder)


# --- regressions: the fuzz's findings, pinned -------------------------------------------

@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_callback_numbers_out_of_range_are_answered_as_stale_buttons(
    feeder: Feeder, errors: ErrorLog,
) -> None:
    """A forged "sp:<20 digits>" from a user with sessions: an answer, not an OverflowError
    (page * PAGE_SIZE used to reach the OFFSET: SQLite OverflowError, PostgreSQL DBAPIError)."""
    await feed_and_check(feeder, feeder.assign(text_from(7, "hello")), errors)
    press = feeder.assign(button_from(7, f"sp:{HUGE}"))
    resolve_callback_message(feeder.h, press)
    feeder.h.tg.enqueue(press)
    await feeder.processed(press["update_id"])
    assert [r.getMessage()[:200] for r in errors.records] == []
    call = await feeder.h.tg.wait_for(
        lambda c: c.method == "answerCallbackQuery"
        and c.params.get("callback_query_id") == press["callback_query"]["id"], timeout=2
    )
    assert "expired" in str(call.params.get("text", "")).lower()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_mention_is_cut_out_exactly(feeder: Feeder, errors: ErrorLog) -> None:
    """The mention used to be found in text.lower() and cut from text at that index: letters
    whose lower case is longer ("İ" -> "i̇") shifted the cut and garbled the question."""
    raw = feeder.assign(text_from(2**32 + 1, f"İİİ {MENTION} what is 2+2?", chat=GROUP))
    await feed_and_check(feeder, raw, errors)
    assert feeder.h.ai.chat_requests[-1]["messages"][-1]["content"] == "İİİ  what is 2+2?"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.filterwarnings(UNKNOWN_TYPE_WARNING)
async def test_an_update_of_unknown_type_does_not_block_the_ones_behind_it(
    feeder: Feeder, errors: ErrorLog,
) -> None:
    """A type newer than aiogram (webhook, or allowed_updates unset) is stored and skipped.

    Delivery.accept used to raise UpdateTypeLookupError for the whole batch, log "inbox
    unavailable", and ask for the same batch again forever: nothing behind it was answered.
    """
    unknown = must_validate(feeder.assign({"update_id": 0, "x_future_update": {"id": 1}}))
    feeder.h.tg.enqueue(unknown)
    behind = feeder.h.tg.send_text(900_100_000, "anyone there?")
    await feeder.h.reply_to(behind, lambda m: (m.text or "").startswith("Answer"), timeout=5)
    await feeder.processed(unknown["update_id"], timeout=2)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_channels_automatic_forward_is_not_answered(feeder: Feeder, errors: ErrorLog) -> None:
    """A linked channel's post forwarded into its discussion group comes "from" Telegram
    (id 777000, is_bot false) with sender_chat set: it is no person's question."""
    channel = {"id": -1009999, "type": "channel", "title": "News"}
    post = text_from(777000, f"{MENTION} our new post", chat=GROUP, sender_chat=channel,
                     is_automatic_forward=True)
    post["message"]["from"]["first_name"] = "Telegram"
    await feed_and_check(feeder, feeder.assign(post), errors)
    assert feeder.h.ai.chat_requests == []


# --- H2: replays and reordering ---------------------------------------------------------

@dataclass
class Replay:
    h: Harness
    sessions: async_sessionmaker[AsyncSession]
    received: list[int]  # update ids in the order the bot took them in (duplicates included)
    next_user: int = 950_000_000
    next_id: int = 2**35


@pytest.fixture
async def replay(
    start_bot: Callable[..., Any], fake_openai: FakeOpenAI, sessions: async_sessionmaker[AsyncSession],
) -> AsyncIterator[Replay]:
    fake_openai.reply = lambda body: "re: " + body["messages"][-1]["content"]
    async with start_bot() as h:
        received: list[int] = []
        accept = h.delivery.accept

        async def recording_accept(updates: Any) -> Any:  # what getUpdates handed the bot
            updates = list(updates)
            received.extend(u.update_id for u in updates)
            return await accept(updates)

        h.delivery.accept = recording_accept  # type: ignore[method-assign]
        yield Replay(h, sessions, received)


async def settled(replay: Replay, ids: set[int], timeout: float = 20.0) -> None:
    """Every id confirmed and done, and nothing left in flight (a duplicate would still be)."""
    deadline = time.monotonic() + timeout
    while True:
        pending = {u["update_id"] for u in replay.h.tg.pending_updates} & ids
        async with replay.sessions() as db:
            done = set((await db.execute(
                select(InboxUpdate.update_id).where(
                    InboxUpdate.update_id.in_(ids), InboxUpdate.state == "done"
                )
            )).scalars())
        if not pending and done == ids and not replay.h.delivery._tasks:
            return
        assert time.monotonic() < deadline, f"not settled: pending {pending}, undone {ids - done}"
        await asyncio.sleep(0.02)


@st.composite
def replays(draw: st.DrawFn) -> tuple[int, list[list[int]]]:
    """N messages: a random order, random duplicates, cut into random getUpdates batches."""
    n = draw(st.integers(2, 7))
    order = draw(st.permutations(range(n)))
    sequence = list(order)
    for _ in range(draw(st.integers(0, n))):
        sequence.insert(draw(st.integers(0, len(sequence))), draw(st.sampled_from(range(n))))
    cuts = sorted(draw(st.sets(st.integers(1, len(sequence) - 1), max_size=3)))
    bounds = [0, *cuts, len(sequence)]
    return n, [sequence[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@settings(
    max_examples=int(os.environ.get("DESKTOP_FUZZ_REPLAYS", "15")), deadline=None, database=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@example(plan=(3, [[2, 0, 2, 1, 0]]))
@example(plan=(3, [[1], [0, 1], [2, 2, 0]]))
@given(plan=replays())
async def test_replayed_and_reordered_updates_are_answered_once_each_in_the_order_received(
    replay: Replay, plan: tuple[int, list[list[int]]],
) -> None:
    n, batches = plan
    h, user = replay.h, replay.next_user
    replay.next_user += 1
    ids = [replay.next_id + k for k in range(n)]
    replay.next_id += n
    conversation = {ids[k]: text_from(user, f"m{k}")["message"] for k in range(n)}
    for k, update_id in enumerate(ids):
        conversation[update_id]["message_id"] = 1000 + k
    received_before = len(replay.received)
    asked_before = len(h.ai.chat_requests)
    for batch in batches:
        for k in batch:  # one getUpdates batch: all queued before the bot asks again
            h.tg.enqueue({"update_id": ids[k], "message": copy.deepcopy(conversation[ids[k]])})
        # the next batch only once Telegram was told (offset) it has these: anything enqueued
        # after that with a lower id is a redelivery, as it is for Telegram
        deadline = time.monotonic() + 20
        while {u["update_id"] for u in h.tg.pending_updates} & set(ids):
            assert time.monotonic() < deadline, "Telegram still holds updates the bot was given"
            await asyncio.sleep(0.01)
    await settled(replay, set(ids))

    first_seen = list(dict.fromkeys(i for i in replay.received[received_before:] if i in ids))
    assert sorted(first_seen) == ids, "every update reached the bot"
    replies = [m.text for m in h.tg.chat_messages(user) if (m.text or "").startswith("re: ")]
    note(f"received {replay.received[received_before:]}, replies {replies}")
    for k in range(n):
        assert replies.count(f"re: m{k}") == 1, f"m{k} answered {replies.count(f're: m{k}')} times"
    expected = [f"re: {conversation[i]['text']}" for i in first_seen]
    assert replies == expected, "per-chat order is the order the bot first received them in"
    assert len(h.ai.chat_requests) - asked_before == n  # one model call per update id
    async with replay.sessions() as db:
        row = (await db.execute(select(UsageDay).where(UsageDay.user_id == user))).scalar_one()
    assert row.reserved == 0
