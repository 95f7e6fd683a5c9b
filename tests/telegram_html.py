"""Strict checker for Telegram HTML (parse_mode=HTML): tag set, attributes, balance, nesting."""

from __future__ import annotations

import html as html_lib
from collections.abc import Mapping, Sequence
from html.parser import HTMLParser
from typing import Any

import telegramify_markdown
from aiogram.types import MessageEntity

# Tags the Bot API accepts (core.telegram.org/bots/api#html-style); anything else is a 400.
ALLOWED_TAGS = frozenset(
    ["b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "tg-spoiler", "span", "a",
     "code", "pre", "blockquote", "tg-emoji"]
)
STYLE_TAGS = frozenset(["b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "tg-spoiler", "span"])
ALLOWED_ATTRS = {"a": {"href"}, "code": {"class"}, "span": {"class"}, "blockquote": {"expandable"},
                 "tg-emoji": {"emoji-id"}}  # fmt: skip
NAMED_ENTITIES = frozenset({"amp", "lt", "gt", "quot"})  # the only names Telegram decodes


class TelegramHTMLError(AssertionError):
    """The HTML would be rejected (or silently mangled) by Telegram."""


class _Checker(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)  # keep entities visible so they can be checked
        self.stack: list[str] = []
        self.text: list[str] = []
        self.pre_content: list[str] = []  # per open <pre>: "", "text" or "code"

    def fail(self, message: str) -> None:
        line, col = self.getpos()
        raise TelegramHTMLError(f"{message} (line {line}, column {col})")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in ALLOWED_TAGS:
            self.fail(f"unsupported tag <{tag}>")
        self._check_attrs(tag, attrs)
        self._check_nesting(tag)
        if self.stack and self.stack[-1] == "pre":
            self.pre_content[-1] = "code"
        self.stack.append(tag)
        if tag == "pre":
            self.pre_content.append("")

    def _check_attrs(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = [name for name, _ in attrs]
        if len(set(names)) != len(names) or not set(names) <= ALLOWED_ATTRS.get(tag, set()):
            self.fail(f"unexpected attributes {names} on <{tag}>")
        values = dict(attrs)
        if tag == "a" and not values.get("href"):
            self.fail("<a> without href")
        language_class = values.get("class", "language-") or ""
        if tag == "code" and not language_class.startswith("language-"):
            self.fail(f"bad code class {language_class!r}")
        if tag == "span" and values.get("class") != "tg-spoiler":
            self.fail('<span> without class="tg-spoiler"')

    def _check_nesting(self, tag: str) -> None:
        open_tags = set(self.stack)
        if self.stack and self.stack[-1] == "code":
            self.fail(f"<{tag}> inside <code>")
        if self.stack and self.stack[-1] == "pre" and (tag != "code" or self.pre_content[-1]):
            self.fail(f"<{tag}> inside <pre> (only one <code> may wrap its content)")
        if tag == "pre" and "pre" in open_tags:
            self.fail("<pre> inside <pre>")
        if tag in ("pre", "code") and open_tags & (STYLE_TAGS | {"a"}):
            self.fail(f"<{tag}> inside {sorted(open_tags)}: code can only be inside blockquote")
        if tag == "blockquote" and "blockquote" in open_tags:
            self.fail("nested <blockquote>")
        if tag == "a" and "a" in open_tags:
            self.fail("<a> inside <a>")
        if tag in STYLE_TAGS and tag in open_tags:
            self.fail(f"<{tag}> inside <{tag}>")

    def handle_endtag(self, tag: str) -> None:
        if not self.stack:
            self.fail(f"unexpected </{tag}>")
        if self.stack[-1] != tag:
            self.fail(f"</{tag}> closes <{self.stack[-1]}>")
        self.stack.pop()
        if tag == "pre":
            self.pre_content.pop()

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.fail(f"self-closing <{tag}/>")

    def handle_data(self, data: str) -> None:
        for bad in "<>&":
            if bad in data:
                self.fail(f"unescaped {bad!r} in text {data[:40]!r}")
        if self.stack and self.stack[-1] == "pre" and data:
            if self.pre_content[-1] == "code":
                self.fail("text next to the <code> inside <pre>")
            self.pre_content[-1] = "text"
        self.text.append(data)

    def handle_entityref(self, name: str) -> None:
        if name not in NAMED_ENTITIES:
            self.fail(f"entity &{name}; is not decoded by Telegram")
        self.text.append({"amp": "&", "lt": "<", "gt": ">", "quot": '"'}[name])

    def handle_charref(self, name: str) -> None:
        code = int(name[1:], 16) if name[:1] in "xX" else int(name)
        self.text.append(chr(code))

    def handle_comment(self, data: str) -> None:
        self.fail("comment")

    def handle_decl(self, decl: str) -> None:
        self.fail("declaration")

    def handle_pi(self, data: str) -> None:
        self.fail("processing instruction")

    def unknown_decl(self, data: str) -> None:
        self.fail("unknown declaration")


def check_telegram_html(html: str) -> str:
    """Raise TelegramHTMLError unless `html` is valid Telegram HTML; return its visible text."""
    checker = _Checker()
    checker.feed(html)
    checker.close()
    if checker.rawdata:  # HTMLParser keeps an unfinished "<tag" here instead of reporting it
        raise TelegramHTMLError(f"unfinished markup at the end: {checker.rawdata[:40]!r}")
    if checker.stack:
        raise TelegramHTMLError(f"unclosed tags {checker.stack}")
    return "".join(checker.text)


def is_telegram_html(html: str) -> bool:
    try:
        check_telegram_html(html)
    except TelegramHTMLError:
        return False
    return True


# Entity types as tags (open, close). Equal ranges nest in this order, outermost first.
_ENTITY_TAGS = {
    "blockquote": ("<blockquote>", "</blockquote>"),
    "expandable_blockquote": ("<blockquote expandable>", "</blockquote>"),
    "pre": ("<pre>", "</pre>"),
    "text_link": ('<a href="{url}">', "</a>"),
    "bold": ("<b>", "</b>"),
    "italic": ("<i>", "</i>"),
    "underline": ("<u>", "</u>"),
    "strikethrough": ("<s>", "</s>"),
    "spoiler": ("<tg-spoiler>", "</tg-spoiler>"),
    "code": ("<code>", "</code>"),
}
_ENTITY_ORDER = {kind: rank for rank, kind in enumerate(_ENTITY_TAGS)}


AnyEntity = Mapping[str, Any] | MessageEntity | telegramify_markdown.MessageEntity


def _as_dict(entity: AnyEntity) -> dict[str, Any]:
    if isinstance(entity, Mapping):
        return dict(entity)
    if isinstance(entity, MessageEntity):
        return entity.model_dump(exclude_none=True)
    return entity.to_dict()


def entities_html(text: str, entities: Sequence[AnyEntity] | None) -> str:
    """The Telegram HTML equivalent of text + entities, so check_telegram_html can judge them.

    Fails where Telegram would reject or mangle the entities: out of the text, empty, partly
    overlapping, or cutting a surrogate pair (offsets are UTF-16 code units).
    """
    raw = text.encode("utf-16-le", "surrogatepass")
    size = len(raw) // 2
    items = [_as_dict(e) for e in entities or []]
    items.sort(key=lambda e: (e["offset"], -e["length"], _ENTITY_ORDER.get(e["type"], 99)))
    out: list[str] = []
    stack: list[tuple[int, str]] = []  # (end, closing tags) of the open entities
    pos = 0

    def upto(end: int) -> None:
        nonlocal pos
        try:
            out.append(html_lib.escape(raw[pos * 2 : end * 2].decode("utf-16-le"), quote=False))
        except UnicodeDecodeError:
            raise TelegramHTMLError(f"an entity boundary at {pos} or {end} splits a character") from None
        pos = end

    for entity in items:
        kind, start, end = entity["type"], entity["offset"], entity["offset"] + entity["length"]
        if kind not in _ENTITY_TAGS or entity["length"] <= 0 or start < 0 or end > size:
            raise TelegramHTMLError(f"bad entity {entity} for a text of {size} units")
        while stack and stack[-1][0] <= start:
            closed_at, closing = stack.pop()
            upto(closed_at)
            out.append(closing)
        if stack and end > stack[-1][0]:
            raise TelegramHTMLError(f"entity {entity} partly overlaps another")
        upto(start)
        opening, closing = _ENTITY_TAGS[kind]
        opening = opening.format(url=html_lib.escape(entity.get("url") or ""))
        if kind == "pre" and entity.get("language"):
            # After format(): a language may hold braces ("```{" opens a block in language "{").
            opening += f'<code class="language-{html_lib.escape(entity["language"])}">'
            closing = "</code>" + closing
        out.append(opening)
        stack.append((end, closing))
    while stack:
        closed_at, closing = stack.pop()
        upto(closed_at)
        out.append(closing)
    upto(size)
    return "".join(out)


def check_entities(text: str, entities: Sequence[AnyEntity] | None) -> str:
    """Raise TelegramHTMLError unless Telegram accepts the entities as they are; the visible text."""
    return check_telegram_html(entities_html(text, entities))
