"""In-process fake of the Telegram Bot API that the real aiogram client talks to over HTTP.

Point a bot at it with ``tg.make_bot()`` or
``Bot(token, session=AiohttpSession(api=TelegramAPIServer.from_base(tg.base_url)))``.
The fake plays Telegram (validation, offsets, errors) and the user (``send_text``,
``press_button``...); tests inspect ``calls``, ``chat_messages``, ``drafts``, ``commands``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import aiohttp
from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiohttp import web

Obj = dict[str, Any]  # a Bot API object as JSON
Params = dict[str, Any]  # decoded request parameters

DEFAULT_TOKEN = "42:TEST"
MAX_TEXT = 4096
MAX_CAPTION = 1024
NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup are "
    "exactly the same as a current content and reply markup of the message"
)
QUERY_INVALID = "Bad Request: query is too old and response timeout expired or query ID is invalid"
# Free-text parameters stay strings even when they look like JSON ("123", "[1]", "true").
_TEXT_FIELDS = frozenset(
    [
        "text", "caption", "description", "short_description", "name", "title", "query",
        "secret_token", "callback_query_id", "url", "custom_emoji_id", "inline_message_id",
        "document", "photo", "sticker", "voice", "audio", "video", "animation", "thumbnail",
        "emoji", "data", "parse_mode", "action", "language_code", "ip_address",
        "message_effect_id"
    ]
)
_CHAT_ACTIONS = frozenset(
    [
        "typing", "upload_photo", "record_video", "upload_video", "record_voice",
        "upload_voice", "upload_document", "choose_sticker", "find_location",
        "record_video_note", "upload_video_note"
    ]
)
# Telegram HTML: tag -> entity type. Anything else is "Unsupported start tag".
_HTML_TAGS = {
    "b": "bold", "strong": "bold", "i": "italic", "em": "italic", "u": "underline",
    "ins": "underline", "s": "strikethrough", "strike": "strikethrough", "del": "strikethrough",
    "span": "spoiler", "tg-spoiler": "spoiler", "a": "text_link", "code": "code", "pre": "pre",
    "blockquote": "blockquote", "tg-emoji": "custom_emoji",
}  # fmt: skip
_HTML_NAMED = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}
_HTML_ENTITY_RE = re.compile(r"&(#[0-9]+|#[xX][0-9a-fA-F]+|[a-zA-Z]+);")
_START_TAG_RE = re.compile(r"<([^\s>]*)")
_END_TAG_RE = re.compile(r"</([^\s>]*)\s*(>?)")
_ATTR_RE = re.compile(r"""([^\s=]+)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"']+)))?""")


class FastCloseSession(AiohttpSession):
    """AiohttpSession whose close() skips aiogram's 250 ms sleep meant for SSL sockets.

    Plain HTTP to 127.0.0.1 has nothing to drain; over hundreds of tests the sleep adds minutes.
    """

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()


class ApiError(Exception):
    """A Bot API error answer: {"ok": false, "error_code", "description", "parameters"}."""

    def __init__(self, code: int, description: str, retry_after: int | None = None) -> None:
        super().__init__(description)
        self.code, self.description, self.retry_after = code, description, retry_after

    def response(self) -> web.Response:
        body: Obj = {"ok": False, "error_code": self.code, "description": self.description}
        if self.retry_after is not None:
            body["parameters"] = {"retry_after": self.retry_after}
        return web.json_response(body, status=self.code)


def _status_phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Error"


def _bad(description: str) -> ApiError:
    return ApiError(400, f"Bad Request: {description}")


def _unparsable(detail: str) -> ApiError:
    return _bad(f"can't parse entities: {detail}")


@dataclass(frozen=True)
class UploadedFile:
    """A multipart file part (aiogram sends ``document=attach://<key>`` plus a part ``<key>``)."""

    filename: str
    data: bytes
    content_type: str


BOT_API_DOWNLOAD_LIMIT = 20 * 1024 * 1024


@dataclass
class Call:
    """One Bot API request as received; ``failed`` is set when the fake answered with an error."""

    method: str
    params: Params
    at: float  # time.monotonic() at arrival
    failed: bool = False
    error: str | None = None


@dataclass
class SentMessage:
    """A message the bot sent, as the user currently sees it (edits are applied in place)."""

    chat_id: int
    message_id: int
    date: int
    from_user: Obj
    text: str | None  # visible text: HTML tags stripped, entities unescaped
    raw_text: str | None  # exactly what the bot sent
    parse_mode: str | None = None
    entities: list[Obj] = field(default_factory=list)
    reply_markup: Obj | None = None
    caption: str | None = None
    document: Obj | None = None  # Bot API Document object
    document_name: str | None = None
    document_bytes: bytes | None = None
    reply_to_message_id: int | None = None
    edited: int = 0
    edit_date: int | None = None
    deleted: bool = False
    versions: list[str | None] = field(default_factory=list)  # visible text after each send/edit


@dataclass(frozen=True)
class Draft:
    """One sendMessageDraft frame."""

    chat_id: int
    draft_id: int
    text: str  # visible text
    raw_text: str
    parse_mode: str | None
    at: float


@dataclass
class WebhookState:
    url: str = ""
    secret_token: str | None = None
    allowed_updates: list[str] | None = None


@dataclass
class _Failure:
    method: str  # lower-case
    error: ApiError
    times: int
    when: Callable[[Params], bool] | None


@dataclass
class _Pending:
    update: Obj
    redelivery: bool  # enqueued with an id the bot had already confirmed
    delivered: bool = False


def utf16_len(text: str) -> int:
    """Telegram measures text and entity offsets in UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


def _decode_html_entity(name: str) -> str | None:
    if name.startswith("#"):
        code = int(name[2:], 16) if name[1:2] in ("x", "X") else int(name[1:])
        return chr(code) if 0 < code < 0x110000 else None
    return _HTML_NAMED.get(name)  # other named entities stay literal text, as in Telegram


def parse_html(source: str) -> tuple[str, list[Obj]]:
    """Parse Telegram HTML into (visible text, entities); errors use Telegram's (tdlib) wording."""
    out: list[str] = []
    units = 0
    stack: list[tuple[str, int, dict[str, str]]] = []  # (tag, utf16 start, attributes)
    entities: list[Obj] = []
    i = 0
    while i < len(source):
        char = source[i]
        if (
            char == "&"
            and (ent := _HTML_ENTITY_RE.match(source, i))
            and (decoded := _decode_html_entity(ent.group(1))) is not None
        ):
            out.append(decoded)
            units += utf16_len(decoded)
            i = ent.end()
            continue
        if char != "<":
            out.append(char)
            units += utf16_len(char)
            i += 1
            continue
        offset = len(source[:i].encode())  # Telegram reports byte offsets
        if source.startswith("</", i):  # same checks, in the same order, as tdlib
            if not stack:
                raise _unparsable(f"Unexpected end tag at byte offset {offset}")
            m = _END_TAG_RE.match(source, i)
            if not m.group(2):  # type: ignore[union-attr]
                raise _unparsable(f"Unclosed end tag at byte offset {offset}")
            name, i = m.group(1).lower(), m.end()  # type: ignore[union-attr]
            tag, start, attrs = stack.pop()
            if name and name != tag:  # a bare "</>" closes whatever is open
                raise _unparsable(
                    f"Unmatched end tag at byte offset {offset}, "
                    f'expected "</{tag}>", found "</{name}>"'
                )
            if entity := _html_entity(tag, start, units - start, attrs, stack):
                entities.append(entity)
            continue
        m = _START_TAG_RE.match(source, i)  # the name ends at whitespace or ">"
        name, name_end = m.group(1).lower(), m.end()  # type: ignore[union-attr]
        end = source.find(">", name_end)
        if name_end == len(source):
            raise _unparsable(f"Unclosed start tag at byte offset {offset}")
        if name not in _HTML_TAGS:
            raise _unparsable(f'Unsupported start tag "{name}" at byte offset {offset}')
        if end == -1:
            raise _unparsable(f"Unclosed start tag at byte offset {offset}")
        attrs = {a.group(1).lower(): next((g for g in a.groups()[1:] if g is not None), "")
                 for a in _ATTR_RE.finditer(source, name_end, end)}  # fmt: skip
        i = end + 1
        if name == "span" and attrs.get("class") != "tg-spoiler":
            raise _unparsable(f'Tag "span" must have class "tg-spoiler" at byte offset {offset}')
        stack.append((name, units, attrs))
    if stack:
        raise _unparsable(f'Can\'t find end tag corresponding to start tag "{stack[-1][0]}"')
    entities.sort(key=lambda e: (e["offset"], -e["length"]))
    return "".join(out), entities


def _html_entity(
    tag: str, offset: int, length: int, attrs: dict[str, str], stack: list[Any]
) -> Obj | None:
    """Build the MessageEntity a closed tag produces; <pre><code class=language-x> is one entity."""
    kind = _HTML_TAGS[tag]
    if tag == "code" and stack and stack[-1][0] == "pre" and "class" in attrs:
        stack[-1][2]["language"] = attrs["class"].removeprefix("language-")
        return None
    if length == 0:
        return None
    entity: Obj = {"type": kind, "offset": offset, "length": length}
    if kind == "text_link":
        entity["url"] = attrs.get("href", "")
    elif kind == "pre" and "language" in attrs:
        entity["language"] = attrs["language"]
    elif kind == "blockquote" and "expandable" in attrs:
        entity["type"] = "expandable_blockquote"
    elif kind == "custom_emoji":
        entity["custom_emoji_id"] = attrs.get("emoji-id", "")
    return entity


def _decode_param(key: str, value: Any) -> Any:
    """aiogram sends every scalar as a string and nested objects as JSON strings; undo that."""
    if not isinstance(value, str) or key in _TEXT_FIELDS:
        return value
    try:
        decoded = json.loads(value)
    except ValueError:
        return value
    return value if decoded is None or isinstance(decoded, str) else decoded


def _int_param(params: Obj, key: str, default: int | None = None) -> int:
    value = params.get(key, default)
    if value is None:
        raise _bad(f"{key} is empty")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _bad(f"invalid {key} specified") from None


def _inline_markup(markup: Any) -> Obj | None:
    """Only inline keyboards stay attached to a Message (reply keyboards live on the client)."""
    return markup if isinstance(markup, dict) and "inline_keyboard" in markup else None


def _scope_key(scope: Obj | str | None) -> str:
    scope = {"type": scope or "default"} if not isinstance(scope, dict) else scope
    return json.dumps(scope, sort_keys=True)


class FakeTelegram:
    """The Bot API on 127.0.0.1:<random port>, with a scriptable user on the other side."""

    def __init__(
        self,
        *,
        token: str | None = None,
        first_update_id: int = 1,
        bot_first_name: str = "DESK TOP",
        bot_username: str = "desktop_test_bot",
    ) -> None:
        self.token = token  # when set, any other token gets 401 like a revoked token
        self.bot_first_name, self.bot_username = bot_first_name, bot_username
        self.calls: list[Call] = []
        self.webhook = WebhookState()
        self.commands_by_scope: dict[tuple[str, str], list[Obj]] = {}
        self._messages: dict[int, list[SentMessage]] = {}
        self._user_messages: dict[tuple[int, int], Obj] = {}
        self._drafts: dict[int, list[Draft]] = {}
        self._chats: dict[int, Obj] = {}
        self._users: dict[int, Obj] = {}
        self._next_message_id: dict[int, int] = {}
        self._next_update_id = first_update_id
        self._pending: list[_Pending] = []
        self._confirmed_offset = 0
        self._poll_generation = 0
        self._failures: list[_Failure] = []
        self._open_queries: set[str] = set()
        self._seq = 0  # for file ids and callback query ids
        self._files: dict[str, bytes] = {}  # what users sent, by file_id (getFile, /file/...)
        self._changed = asyncio.Event()
        self._closing = False
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._methods: dict[str, tuple[str, Callable[..., Any]]] = {
            name.lower(): (name, handler)
            for name, handler in {
                "getMe": self._get_me, "getUpdates": self._get_updates,
                "sendMessage": self._send_message, "editMessageText": self._edit_message_text,
                "editMessageReplyMarkup": self._edit_reply_markup,
                "deleteMessage": self._delete_message, "sendMessageDraft": self._send_draft,
                "sendChatAction": self._send_chat_action, "sendDocument": self._send_document,
                "answerCallbackQuery": self._answer_callback_query,
                "setMyCommands": self._set_my_commands, "getMyCommands": self._get_my_commands,
                "deleteMyCommands": self._delete_my_commands, "setWebhook": self._set_webhook,
                "deleteWebhook": self._delete_webhook, "getWebhookInfo": self._get_webhook_info,
                "getFile": self._get_file,
                "close": lambda p, bot: True, "logOut": lambda p, bot: True,
            }.items()
        }  # fmt: skip

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> FakeTelegram:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        app.router.add_get("/file/bot{token}/{path:.+}", self._download)
        # handler_cancellation: a long poll whose client went away (stop_polling) just ends.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self._port = server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._closing = True  # wake long polls so shutdown does not wait for their timeout
        self._notify()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeTelegram:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        if self._port is None:
            raise RuntimeError("FakeTelegram is not started")
        return f"http://127.0.0.1:{self._port}"

    def make_bot(self, token: str = DEFAULT_TOKEN, **bot_kwargs: Any) -> Bot:
        """A real aiogram Bot wired to this fake (close it with ``await bot.session.close()``)."""
        session = FastCloseSession(api=TelegramAPIServer.from_base(self.base_url))
        return Bot(token, session=session, **bot_kwargs)

    # ---------------------------------------------------------------- inspection

    def calls_of(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method.lower() == method.lower()]

    def chat_messages(self, chat_id: int, *, include_deleted: bool = False) -> list[SentMessage]:
        return [m for m in self._messages.get(chat_id, []) if include_deleted or not m.deleted]

    def drafts(self, chat_id: int) -> list[Draft]:
        return list(self._drafts.get(chat_id, []))

    def commands(
        self, language_code: str = "", scope: Obj | str | None = None
    ) -> list[Obj] | None:
        """Commands registered for exactly this (scope, language); None when never set."""
        return self.commands_by_scope.get((_scope_key(scope), language_code))

    @property
    def pending_updates(self) -> list[Obj]:
        """Updates not yet confirmed by the bot (via getUpdates offset)."""
        return [p.update for p in self._pending]

    # ------------------------------------------------------------------- waiting

    async def wait_for(
        self, predicate: Callable[[Call], bool], timeout: float = 5.0, *, start: int = 0
    ) -> Call:
        """First call (from index ``start``) matching predicate, recorded already or later."""
        return await self._wait(
            lambda: next((c for c in self.calls[start:] if predicate(c)), None),
            timeout,
            "no matching call",
        )

    async def wait_for_message(
        self,
        chat_id: int,
        predicate: Callable[[SentMessage], bool] | None = None,
        timeout: float = 5.0,
        *,
        after: int = 0,
    ) -> SentMessage:
        """First visible bot message in chat with message_id > after matching predicate.

        User and bot messages share the chat's id counter, so ``after=update["message"]
        ["message_id"]`` means "the reply to that user message". Edits count: the predicate
        is re-checked whenever anything changes.
        """

        def probe() -> SentMessage | None:
            return next(
                (m for m in self.chat_messages(chat_id)
                 if m.message_id > after and (predicate is None or predicate(m))),
                None,
            )  # fmt: skip

        return await self._wait(probe, timeout, f"no matching message in chat {chat_id}")

    async def _wait(self, probe: Callable[[], Any], timeout: float, what: str) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            changed = self._changed  # take it before probing so no change slips between
            if (found := probe()) is not None:
                return found
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"{what} within {timeout}s; recent calls:\n{self._recent()}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    def _recent(self, limit: int = 15) -> str:
        calls = [c for c in self.calls if c.method != "getUpdates"][-limit:]
        lines = [
            f"  {c.method} {json.dumps(c.params, default=repr, ensure_ascii=False)[:200]}"
            + (f"  -> FAILED: {c.error}" if c.failed else "")
            for c in calls
        ]
        return "\n".join(lines) or "  (none besides getUpdates)"

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # ------------------------------------------------------------ failure script

    def fail_next(
        self,
        method: str,
        *,
        error_code: int = 429,
        description: str | None = None,
        retry_after: int | None = None,
        times: int = 1,
        when: Callable[[Params], bool] | None = None,
    ) -> None:
        """Answer the next ``times`` calls of method (matching ``when``) with this error."""
        if error_code == 429 and retry_after is None:
            retry_after = 1
        if description is None:
            description = {
                429: f"Too Many Requests: retry after {retry_after}",
                403: "Forbidden: bot was blocked by the user",
                400: "Bad Request: scripted failure",
                409: "Conflict: terminated by other getUpdates request; "
                "make sure that only one bot instance is running",
            }.get(error_code) or _status_phrase(error_code)
        error = ApiError(error_code, description, retry_after)
        self._failures.append(_Failure(method.lower(), error, times, when))

    def _scripted_failure(self, call: Call) -> ApiError | None:
        for failure in self._failures:
            if failure.method == call.method.lower() and (
                failure.when is None or failure.when(call.params)
            ):
                failure.times -= 1
                if failure.times <= 0:
                    self._failures.remove(failure)
                return failure.error
        return None

    # ------------------------------------------------------------ playing the user

    def enqueue(self, update: Obj) -> Obj:
        """Queue a raw update; an update_id already confirmed is delivered again (redelivery)."""
        update_id = update["update_id"]
        redelivery = update_id < self._confirmed_offset
        self._pending.append(_Pending(copy.deepcopy(update), redelivery))
        self._next_update_id = max(self._next_update_id, update_id + 1)
        self._notify()
        return update

    def send_text(
        self,
        user_id: int,
        text: str,
        *,
        chat_id: int | None = None,
        chat_type: str = "private",
        language_code: str = "en",
        first_name: str = "Test",
        username: str | None = None,
        reply_to_message_id: int | None = None,
        entities: list[Obj] | None = None,
    ) -> Obj:
        """The user sends text; a leading /command gets its bot_command entity like in Telegram."""
        replied = None
        if reply_to_message_id is not None:  # look it up first: a bad id must change nothing
            replied = self._message_object(user_id if chat_id is None else chat_id,
                                           reply_to_message_id)  # fmt: skip
        message = self._user_message(
            user_id, chat_id, chat_type, language_code=language_code, first_name=first_name,
            username=username,
        )  # fmt: skip
        message["text"] = text
        if entities is None and text.startswith("/"):
            entities = [{"type": "bot_command", "offset": 0, "length": utf16_len(text.split()[0])}]
        if entities:
            message["entities"] = entities
        if replied is not None:
            message["reply_to_message"] = replied
        return self._enqueue_message(message)

    def press_button(
        self, user_id: int, message_id: int, data: str, chat_id: int | None = None
    ) -> Obj:
        """The user presses an inline button (it must exist on that bot message)."""
        chat_id = user_id if chat_id is None else chat_id
        sent = self._bot_message(chat_id, message_id)
        rows = (sent.reply_markup or {}).get("inline_keyboard", [])
        buttons = [b.get("callback_data") for row in rows for b in row]
        if data not in buttons:
            raise ValueError(f"message {message_id} has no button {data!r}; it has {buttons}")
        self._seq += 1
        query_id = f"{user_id}-{self._seq}"
        self._open_queries.add(query_id)
        query = {
            "id": query_id, "from": self._user(user_id), "chat_instance": str(chat_id),
            "data": data, "message": self._message_object(chat_id, message_id),
        }  # fmt: skip
        return self.enqueue({"update_id": self._next_update_id, "callback_query": query})

    def send_sticker(self, user_id: int, *, chat_id: int | None = None) -> Obj:
        sticker = {**self._file("STK"), "type": "regular", "width": 512, "height": 512,
                   "is_animated": False, "is_video": False, "emoji": "👍"}  # fmt: skip
        return self._send_media(user_id, chat_id, "sticker", sticker)

    def send_photo(
        self, user_id: int, *, chat_id: int | None = None, caption: str | None = None,
        content: bytes = b"\xff\xd8\xff fake jpeg",
    ) -> Obj:
        """Two sizes, as Telegram sends: a thumbnail and the photo (`content`), largest last."""
        sizes = [{**self._file("PHO", data), "width": w, "height": w}
                 for w, data in ((90, b"\xff\xd8\xff thumb"), (800, content))]
        return self._send_media(user_id, chat_id, "photo", sizes, caption)

    def send_voice(
        self, user_id: int, *, chat_id: int | None = None, duration: int = 3,
        content: bytes = b"OggS fake voice", caption: str | None = None,
    ) -> Obj:
        voice = {**self._file("VOI", content), "duration": duration, "mime_type": "audio/ogg"}
        return self._send_media(user_id, chat_id, "voice", voice, caption)

    def send_document_from_user(
        self,
        user_id: int,
        *,
        chat_id: int | None = None,
        file_name: str = "notes.txt",
        mime_type: str = "text/plain",
        caption: str | None = None,
        content: bytes = b"notes",
        file_size: int | None = None,  # what Telegram says; defaults to the content's size
    ) -> Obj:
        doc = {**self._file("DOC", content, file_size), "file_name": file_name, "mime_type": mime_type}
        return self._send_media(user_id, chat_id, "document", doc, caption)

    def _send_media(
        self, user_id: int, chat_id: int | None, key: str, obj: Any, caption: str | None = None
    ) -> Obj:
        chat_type = "private" if chat_id is None or chat_id > 0 else "group"
        message = self._user_message(user_id, chat_id, chat_type)
        message[key] = obj
        if caption:
            message["caption"] = caption
        return self._enqueue_message(message)

    def _file(
        self, prefix: str, content: bytes = b"", file_size: int | None = None
    ) -> dict[str, Any]:
        self._seq += 1
        file_id = f"{prefix}{self._seq}"
        self._files[file_id] = content
        return {"file_id": file_id, "file_unique_id": f"U{prefix}{self._seq}",
                "file_size": len(content) if file_size is None else file_size}

    def _get_file(self, params: Params, bot: Obj) -> Obj:
        file_id = str(params.get("file_id"))
        if file_id not in self._files:
            raise ApiError(400, "Bad Request: invalid file_id")
        content = self._files[file_id]
        if len(content) > BOT_API_DOWNLOAD_LIMIT:  # the cloud Bot API's own limit
            raise ApiError(400, "Bad Request: file is too big")
        return {"file_id": file_id, "file_unique_id": f"U{file_id}", "file_size": len(content),
                "file_path": f"files/{file_id}"}

    async def _download(self, request: web.Request) -> web.Response:
        if self.token is not None and request.match_info["token"] != self.token:
            return web.Response(status=401)
        self.calls.append(Call("download", {"path": request.match_info["path"]}, time.monotonic()))
        self._notify()
        file_id = request.match_info["path"].removeprefix("files/")
        if file_id not in self._files:
            return web.Response(status=404)
        return web.Response(body=self._files[file_id], content_type="application/octet-stream")

    def _user(self, user_id: int) -> Obj:
        return self._users.get(user_id) or {"id": user_id, "is_bot": False, "first_name": "Test"}

    def _user_message(
        self, user_id: int, chat_id: int | None, chat_type: str, **profile: Any
    ) -> Obj:
        if profile or user_id not in self._users:
            user = {"id": user_id, "is_bot": False, "first_name": profile.get("first_name", "Test"),
                    "language_code": profile.get("language_code", "en")}  # fmt: skip
            if profile.get("username"):
                user["username"] = profile["username"]
            self._users[user_id] = user
        user = self._users[user_id]
        chat_id = user_id if chat_id is None else chat_id
        if chat_id < 0 and chat_type == "private":  # a negative id can only be a group
            chat_type = "supergroup" if chat_id < -(10**12) else "group"
        chat: Obj = {"id": chat_id, "type": chat_type}
        if chat_type == "private":
            chat.update({k: v for k, v in user.items() if k in ("first_name", "username")})
        else:
            chat["title"] = "Test group"
        self._chats[chat_id] = chat
        message_id = self._new_message_id(chat_id)
        message = {"message_id": message_id, "date": int(time.time()), "chat": chat, "from": user}
        self._user_messages[(chat_id, message_id)] = message
        return message

    def _enqueue_message(self, message: Obj) -> Obj:
        return self.enqueue({"update_id": self._next_update_id, "message": message})

    # ------------------------------------------------------------------- webhook

    async def push_to_webhook(self, update: Obj) -> int:
        """POST an update to the URL from setWebhook, like Telegram does; returns HTTP status."""
        if not self.webhook.url:
            raise RuntimeError("no webhook is set")
        headers = {}
        if self.webhook.secret_token:
            headers["X-Telegram-Bot-Api-Secret-Token"] = self.webhook.secret_token
        async with (
            aiohttp.ClientSession() as session,
            session.post(self.webhook.url, json=update, headers=headers) as response,
        ):
            await response.read()
            return response.status

    # ---------------------------------------------------------------------- HTTP

    async def _handle(self, request: web.Request) -> web.Response:
        token, name = request.match_info["token"], request.match_info["method"]
        if self.token is not None and token != self.token:
            return ApiError(401, "Unauthorized").response()
        canonical, handler = self._methods.get(name.lower(), (name, None))
        call = Call(canonical, await self._read_params(request), time.monotonic())
        self.calls.append(call)
        self._notify()
        try:
            if handler is None:
                raise ApiError(404, "Not Found: method not found")
            if error := self._scripted_failure(call):
                raise error
            result = handler(call.params, self._bot_user(token))
            if inspect.isawaitable(result):
                result = await result
        except ApiError as error:
            call.failed, call.error = True, error.description
            return error.response()
        finally:
            self._notify()
        return web.json_response({"ok": True, "result": result})

    async def _read_params(self, request: web.Request) -> Obj:
        raw: Obj = dict(request.query)
        if request.can_read_body:
            if request.content_type == "application/json":
                raw.update(await request.json())
            else:  # form-urlencoded or multipart
                for key, value in (await request.post()).items():
                    if isinstance(value, web.FileField):
                        value = UploadedFile(value.filename, value.file.read(), value.content_type)
                    raw[key] = value
        params = {key: _decode_param(key, value) for key, value in raw.items()}
        for key, value in list(params.items()):  # document="attach://x" + part x -> the file
            if (
                isinstance(value, str) and value.startswith("attach://")
                and isinstance(part := params.get(value[len("attach://"):]), UploadedFile)
            ):
                params[key] = part
                del params[value[len("attach://"):]]
        return params

    def _bot_user(self, token: str) -> Obj:
        bot_id = token.split(":")[0]
        return {"id": int(bot_id) if bot_id.isdigit() else 1, "is_bot": True,
                "first_name": self.bot_first_name, "username": self.bot_username}  # fmt: skip

    # ------------------------------------------------------------ message helpers

    def _new_message_id(self, chat_id: int) -> int:
        self._next_message_id[chat_id] = self._next_message_id.get(chat_id, 0) + 1
        return self._next_message_id[chat_id]

    def _chat(self, chat_id: int) -> Obj:
        if chat_id in self._chats:
            return self._chats[chat_id]
        return {"id": chat_id, "type": "private"} if chat_id > 0 else {
            "id": chat_id, "type": "group", "title": "Test group"}  # fmt: skip

    def _api_message(self, m: SentMessage) -> Obj:
        """The Bot API Message object for a bot message (what aiogram's pydantic validates)."""
        msg: Obj = {"message_id": m.message_id, "date": m.date, "chat": self._chat(m.chat_id),
                    "from": m.from_user}  # fmt: skip
        optional = {"text": m.text, "caption": m.caption, "document": m.document,
                    "edit_date": m.edit_date,
                    "reply_markup": _inline_markup(m.reply_markup)}  # fmt: skip
        msg.update({k: v for k, v in optional.items() if v is not None})
        if m.entities:
            msg["caption_entities" if m.document else "entities"] = m.entities
        if m.reply_to_message_id is not None:
            msg["reply_to_message"] = self._message_object(m.chat_id, m.reply_to_message_id)
        return msg

    def _exists(self, chat_id: int, message_id: int) -> bool:
        return (chat_id, message_id) in self._user_messages or any(
            m.message_id == message_id for m in self._messages.get(chat_id, [])
        )

    def _message_object(self, chat_id: int, message_id: int) -> Obj:
        """Any message of the chat (user's or bot's) as a Bot API object, one level deep."""
        if (chat_id, message_id) in self._user_messages:
            msg = dict(self._user_messages[(chat_id, message_id)])
        else:
            msg = self._api_message(self._bot_message(chat_id, message_id))
        msg.pop("reply_to_message", None)
        return msg

    def _bot_message(self, chat_id: int, message_id: int) -> SentMessage:
        for m in self.chat_messages(chat_id):
            if m.message_id == message_id:
                return m
        raise LookupError(f"bot message {message_id} not found in chat {chat_id}")

    def _find(self, params: Params, action: str) -> SentMessage:
        try:
            chat_id, message_id = _int_param(params, "chat_id"), _int_param(params, "message_id")
            return self._bot_message(chat_id, message_id)
        except LookupError:
            raise _bad(f"message to {action} not found") from None

    @staticmethod
    def _render(params: Params, key: str, limit: int, *, required: bool) -> tuple[str, list[Any]]:
        """Apply parse_mode/entities and check the visible length like Telegram does."""
        raw = str(params.get(key) or "")  # aiogram drops empty strings from the request
        if (params.get("parse_mode") or "").lower() == "html":
            text, entities = parse_html(raw)
        else:  # MarkdownV2 is not parsed: measured raw (slightly stricter than Telegram)
            entities_key = "entities" if key == "text" else "caption_entities"
            text, entities = raw, list(params.get(entities_key) or [])
        if required and not text.strip():
            raise _bad("message text is empty")
        if utf16_len(text) > limit:
            raise _bad("message is too long" if key == "text" else "message caption is too long")
        return text, entities

    # -------------------------------------------------------------- API methods

    def _get_me(self, params: Params, bot: Obj) -> Obj:
        return {**bot, "can_join_groups": True, "can_read_all_group_messages": False,
                "supports_inline_queries": False}  # fmt: skip

    async def _get_updates(self, params: Params, bot: Obj) -> list[Obj]:
        if self.webhook.url:
            raise ApiError(409, "Conflict: can't use getUpdates method while webhook is active; "
                                "use deleteWebhook to delete the webhook first")  # fmt: skip
        self._confirm(int(params.get("offset") or 0))
        limit = min(max(int(params.get("limit") or 100), 1), 100)
        self._poll_generation += 1  # a newer getUpdates ends any older one with 409, as Telegram
        generation = self._poll_generation
        self._notify()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(params.get("timeout") or 0)
        while True:
            changed = self._changed
            if generation != self._poll_generation:
                raise ApiError(409, "Conflict: terminated by other getUpdates request; "
                                    "make sure that only one bot instance is running")  # fmt: skip
            remaining = deadline - loop.time()
            if self._pending or self._closing or remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        batch = self._pending[:limit]
        for pending in batch:
            pending.delivered = True
        return [p.update for p in batch]

    def _confirm(self, offset: int) -> None:
        """Drop updates with id < offset; a negative offset keeps only the last -offset."""
        if offset < 0:
            self._pending = self._pending[offset:]
        elif offset > 0:
            self._confirmed_offset = max(self._confirmed_offset, offset)
            # A redelivered update (re-enqueued old id) must first be delivered once.
            self._pending = [
                p for p in self._pending
                if p.update["update_id"] >= offset or (p.redelivery and not p.delivered)
            ]  # fmt: skip

    def _send_message(self, params: Params, bot: Obj) -> Obj:
        chat_id = _int_param(params, "chat_id")
        text, entities = self._render(params, "text", MAX_TEXT, required=True)
        reply = params.get("reply_parameters") or {}
        reply_to = params.get("reply_to_message_id") or reply.get("message_id")
        if reply_to and not self._exists(chat_id, int(reply_to)):
            if not reply.get("allow_sending_without_reply"):
                raise ApiError(400, "Bad Request: message to be replied not found")
            reply_to = None  # as Telegram does: sent, but not as a reply
        sent = SentMessage(
            chat_id=chat_id, message_id=self._new_message_id(chat_id), date=int(time.time()),
            from_user=bot, text=text, raw_text=params.get("text"), entities=entities,
            parse_mode=params.get("parse_mode"), reply_markup=params.get("reply_markup"),
            reply_to_message_id=int(reply_to) if reply_to else None, versions=[text],
        )  # fmt: skip
        self._messages.setdefault(chat_id, []).append(sent)
        return self._api_message(sent)

    def _send_document(self, params: Params, bot: Obj) -> Obj:
        chat_id = _int_param(params, "chat_id")
        caption, entities = self._render(params, "caption", MAX_CAPTION, required=False)
        upload = params.get("document")
        if upload is None:
            raise _bad("there is no document in the request")
        document = self._file("DOC")
        if isinstance(upload, UploadedFile):
            document.update(file_name=upload.filename, mime_type=upload.content_type,
                            file_size=len(upload.data))  # fmt: skip
        sent = SentMessage(
            chat_id=chat_id, message_id=self._new_message_id(chat_id), date=int(time.time()),
            from_user=bot, text=None, raw_text=params.get("caption"), caption=caption or None,
            entities=entities, parse_mode=params.get("parse_mode"), document=document,
            reply_markup=params.get("reply_markup"), versions=[caption or None],
            document_name=getattr(upload, "filename", None),
            document_bytes=getattr(upload, "data", None),
        )  # fmt: skip
        self._messages.setdefault(chat_id, []).append(sent)
        return self._api_message(sent)

    def _edit_message_text(self, params: Params, bot: Obj) -> Obj:
        sent = self._find(params, "edit")
        if sent.document is not None:
            raise _bad("there is no text in the message to edit")
        text, entities = self._render(params, "text", MAX_TEXT, required=True)
        # Like Telegram: an edit without reply_markup removes the inline keyboard.
        markup = _inline_markup(params.get("reply_markup"))
        old = (sent.text, sent.entities, _inline_markup(sent.reply_markup))
        if (text, entities, markup) == old:
            raise _bad(NOT_MODIFIED.removeprefix("Bad Request: "))
        sent.text, sent.raw_text, sent.entities = text, params.get("text"), entities
        sent.parse_mode, sent.reply_markup = params.get("parse_mode"), markup
        return self._mark_edited(sent)

    def _edit_reply_markup(self, params: Params, bot: Obj) -> Obj:
        sent = self._find(params, "edit")
        markup = _inline_markup(params.get("reply_markup"))
        if markup == _inline_markup(sent.reply_markup):
            raise _bad(NOT_MODIFIED.removeprefix("Bad Request: "))
        sent.reply_markup = markup
        return self._mark_edited(sent)

    def _mark_edited(self, sent: SentMessage) -> Obj:
        sent.edited += 1
        sent.edit_date = int(time.time())
        sent.versions.append(sent.text if sent.document is None else sent.caption)
        return self._api_message(sent)

    def _delete_message(self, params: Params, bot: Obj) -> bool:
        self._find(params, "delete").deleted = True
        return True

    def _send_draft(self, params: Params, bot: Obj) -> bool:
        chat_id = _int_param(params, "chat_id")
        if chat_id <= 0:
            raise _bad("TEXTDRAFT_PEER_INVALID")
        draft_id = _int_param(params, "draft_id", 0)
        if draft_id == 0:
            raise _bad("draft_id must be non-zero")
        text, _ = self._render(params, "text", MAX_TEXT, required=False)  # empty = "Thinking…"
        draft = Draft(chat_id, draft_id, text, params.get("text") or "", params.get("parse_mode"),
                      time.monotonic())  # fmt: skip
        self._drafts.setdefault(chat_id, []).append(draft)
        return True

    def _send_chat_action(self, params: Params, bot: Obj) -> bool:
        _int_param(params, "chat_id")
        if params.get("action") not in _CHAT_ACTIONS:
            raise _bad("wrong parameter action in request")
        return True

    def _answer_callback_query(self, params: Params, bot: Obj) -> bool:
        query_id = str(params.get("callback_query_id"))
        if query_id not in self._open_queries:  # unknown or already answered
            raise ApiError(400, QUERY_INVALID)
        self._open_queries.discard(query_id)
        return True

    def _set_my_commands(self, params: Params, bot: Obj) -> bool:
        commands = params.get("commands")
        if not isinstance(commands, list) or len(commands) > 100:
            raise _bad("commands must be a list of at most 100 BotCommand")
        for command in commands:
            if not re.fullmatch(r"[a-z0-9_]{1,32}", str(command.get("command", ""))):
                raise _bad("BOT_COMMAND_INVALID")
            if not 1 <= len(command.get("description", "")) <= 256:
                raise _bad("BOT_COMMAND_DESCRIPTION_INVALID")
        key = (_scope_key(params.get("scope")), params.get("language_code") or "")
        self.commands_by_scope[key] = commands
        return True

    def _get_my_commands(self, params: Params, bot: Obj) -> list[Any]:
        return self.commands(params.get("language_code") or "", params.get("scope")) or []

    def _delete_my_commands(self, params: Params, bot: Obj) -> bool:
        key = (_scope_key(params.get("scope")), params.get("language_code") or "")
        self.commands_by_scope.pop(key, None)
        return True

    def _set_webhook(self, params: Params, bot: Obj) -> bool:
        url = params.get("url") or ""  # set_webhook(url="") arrives without url: removes it
        self.webhook = WebhookState(url, params.get("secret_token"), params.get("allowed_updates"))
        if params.get("drop_pending_updates") is True:
            self._pending.clear()
        return True

    def _delete_webhook(self, params: Params, bot: Obj) -> bool:
        return self._set_webhook({"drop_pending_updates": params.get("drop_pending_updates")}, bot)

    def _get_webhook_info(self, params: Params, bot: Obj) -> Obj:
        info: Obj = {"url": self.webhook.url, "has_custom_certificate": False,
                                "pending_update_count": len(self._pending)}  # fmt: skip
        if self.webhook.allowed_updates is not None:
            info["allowed_updates"] = self.webhook.allowed_updates
        return info
