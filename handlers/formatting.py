"""Markdown to Telegram text + entities via telegramify-markdown: a CommonMark parser, nothing to misparse."""

from __future__ import annotations

import html
import re
from bisect import bisect_right
from collections.abc import Iterable
from itertools import accumulate
from typing import NamedTuple, TypeAlias

import pyromark
import regex
import telegramify_markdown
from aiogram.types import MessageEntity
from telegramify_markdown import utf16_len

_Entity: TypeAlias = telegramify_markdown.MessageEntity  # a slotted dataclass: cheap to make
__all__ = ["MIN_LIMIT", "TELEGRAM_LIMIT", "Part", "render_parts", "strip_html", "utf16_len"]

TELEGRAM_LIMIT = 4096  # UTF-16 code units of visible text per message (entities cost nothing)
MIN_LIMIT = 16


class Part(NamedTuple):
    """One message: its visible text and entities, sent with parse_mode=None."""

    text: str
    entities: list[_Entity]

    def telegram_entities(self) -> list[MessageEntity]:
        """aiogram's entities, built only for what is sent: pydantic models are costly to make."""
        return [MessageEntity(**entity.to_dict()) for entity in self.entities]


class _Span(NamedTuple):
    type: str
    start: int  # UTF-16 units, like Telegram's offsets
    end: int
    url: str | None
    language: str | None


# The options telegramify-markdown parses with, so what is code here is code to it as well.
_OPTIONS = (pyromark.Options.ENABLE_TABLES | pyromark.Options.ENABLE_STRIKETHROUGH
            | pyromark.Options.ENABLE_TASKLISTS | pyromark.Options.ENABLE_MATH)  # fmt: skip
# The converter drops raw HTML and decodes &entities;, so a model's literal "<b>" or "&amp;" would
# vanish: outside code, < and & are backslash-escaped. Bare URLs and a*b*c keep their _ * ~ literal
# (CommonMark would make emphasis of them); an existing backslash escape is left as it is.
_LITERAL = re.compile(
    r"(?P<escaped>\\[\s\S])|(?P<url>https?://[^\s<>\[\]()`]*[^\s<>\[\]()`.,;:!?'\"*_~])"
    r"|(?<=[A-Za-z0-9])\*+(?=[A-Za-z0-9])|[<&]"
)
_URL_ESCAPES = str.maketrans({ch: "\\" + ch for ch in "_*~&"})
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
_SAFE_URL = re.compile(r"(?:https?://|tg://|mailto:)\S", re.IGNORECASE)  # no javascript:, data:
_STYLES = frozenset({"bold", "italic", "underline", "strikethrough", "spoiler"})
_QUOTES = frozenset({"blockquote", "expandable_blockquote"})


def _escape(match: re.Match[str]) -> str:
    found = match[0]
    if match["escaped"]:
        return found
    return found.translate(_URL_ESCAPES) if match["url"] else "\\" + "\\".join(found)


def _guard(markdown: str) -> str:
    """Escape what the converter would drop or misread, everywhere but in code and math."""
    if not _LITERAL.search(markdown):
        return markdown  # nothing to escape: spare the extra parse
    source, out, pos = markdown.encode(), [], 0
    for event, span in pyromark.events_with_range(markdown, options=_OPTIONS):
        start = event.get("Start") if isinstance(event, dict) else None
        block = isinstance(start, dict) and "CodeBlock" in start
        inline = isinstance(event, dict) and bool({"Code", "InlineMath", "DisplayMath"} & event.keys())
        if (block or inline) and span["start"] >= pos:  # regions never nest; be sure of it
            out.append(_LITERAL.sub(_escape, source[pos : span["start"]].decode()))
            out.append(source[span["start"] : span["end"]].decode())
            pos = span["end"]
    out.append(_LITERAL.sub(_escape, source[pos:].decode()))
    return "".join(out)


def _outside(span: _Span, holes: list[_Span], starts: list[int]) -> list[_Span]:
    """`span` minus the `holes` (sorted, disjoint; `starts` their starts)."""
    pieces, start = [], span.start
    for hole in holes[max(bisect_right(starts, span.start) - 1, 0) :]:
        if hole.start >= span.end:
            break
        if hole.start > start:
            pieces.append(span._replace(start=start, end=hole.start))
        start = max(start, hole.end)
    return [*pieces, span._replace(start=start)] if start < span.end else pieces


def _outermost(spans: Iterable[_Span]) -> list[_Span]:
    """Drop spans inside another one (Telegram cannot nest quotes, nor links)."""
    out: list[_Span] = []
    for span in sorted(spans, key=lambda s: (s.start, -s.end)):
        if not out or span.start >= out[-1].end:
            out.append(span)
    return out


def _legal(found: list[_Entity]) -> list[_Span]:
    """Keep what Telegram accepts: safe links, one level of quotes, nothing inside code."""
    spans = sorted((_Span(e.type, e.offset, e.offset + e.length, e.url, e.language) for e in found),
                   key=lambda s: (s.start, -s.end))  # fmt: skip
    # An image inside a link is a link inside a link: the outer one is kept.
    links = _outermost(s for s in spans if s.type == "text_link" and _SAFE_URL.match(s.url or ""))
    link_starts = [s.start for s in links]
    # Code may not hold a link nor sit in one: the link, the reader's way on, wins.
    code = [s for s in spans if s.type in ("code", "pre") and _outside(s, links, link_starts) == [s]]
    code_starts = [s.start for s in code]
    quotes = _outermost(s for s in spans if s.type in _QUOTES)
    # Styles may neither contain code nor be part of it (Bot API); bold in bold is just bold.
    styles: list[_Span] = []
    for kind in _STYLES:
        styles += _outermost(p for s in spans if s.type == kind for p in _outside(s, code, code_starts))
    return code + links + quotes + styles


# Where to cut a long answer, best first, each tried only if it keeps this share of the room.
_CUTS = (
    (re.compile(r"(\n(?:[ \t]*\n)+)"), 0.3),  # paragraph: keeps whole code blocks together
    (re.compile(r"(\n)"), 0.5),  # line: the next line keeps its indentation
    (re.compile(r"[.!?…。\uff01\uff1f][\"')\]»”\u2019]?(\s+)"), 0.5),  # sentence, CJK too
    (re.compile(r"(\s+)"), 0.0),  # word
)
_GRAPHEME = regex.compile(r"\X")  # a cut never splits an emoji family, a flag or an accent


def _cut(text: str, start: int, end: int) -> tuple[int, int]:
    """(end of this part, start of the next) for text[start:], which fits up to `end`."""
    for pattern, share in _CUTS:
        best = None
        for match in pattern.finditer(text, start + int((end - start) * share)):
            if match.start(1) > end:
                break
            if match.start(1) > start:
                best = match
        if best is not None:
            return best.start(1), best.end(1)
    cut = start
    for cluster in _GRAPHEME.finditer(text, start):
        if cluster.end() > end:
            break
        cut = cluster.end()
    return (cut, cut) if cut > start else (end, end)  # one cluster larger than a part: cut it


def _entities(spans: list[_Span], ranges: list[tuple[int, int]]) -> list[list[_Entity]]:
    """Each span clipped to every part it reaches (UTF-16 `ranges`), offsets made part-relative."""
    starts = [a for a, _ in ranges]
    out: list[list[_Entity]] = [[] for _ in ranges]
    for span in spans:
        k = max(bisect_right(starts, span.start) - 1, 0)
        while k < len(ranges) and ranges[k][0] < span.end:
            a, b = ranges[k]
            lo, hi = max(span.start, a), min(span.end, b)
            if hi > lo:
                out[k].append(_Entity(span.type, lo - a, hi - lo, url=span.url, language=span.language))
            k += 1
    return out


def render_parts(markdown: str, limit: int = TELEGRAM_LIMIT) -> list[Part]:
    """Split an answer into messages of at most `limit` UTF-16 units; [] for blank input.

    Cuts fall at a paragraph, else a line, a sentence, a word, and only then anywhere; an entity
    cut in two (a code block too, with its language) continues in the next part.
    """
    if limit < MIN_LIMIT:
        raise ValueError(f"limit must be at least {MIN_LIMIT}, got {limit}")
    markdown = _LONE_SURROGATE.sub("\ufffd", markdown)  # unencodable: the parser would raise
    text, found = telegramify_markdown.convert(_guard(markdown))
    spans = _legal(found)
    if not text.strip():  # a lone ``` or > would show nothing: show it as typed instead
        text, spans = markdown.replace("\r\n", "\n").replace("\r", "\n"), []
    lead = utf16_len(text) - utf16_len(text.lstrip())  # stripped here as Telegram would: offsets follow
    text, spans = text.strip(), [s._replace(start=s.start - lead, end=s.end - lead) for s in spans]
    units = list(accumulate((2 if ch > "\uffff" else 1 for ch in text), initial=0))
    ranges, start = [], 0
    while start < len(text):
        end = bisect_right(units, units[start] + limit) - 1
        cut, resume = (end, end) if end >= len(text) else _cut(text, start, end)
        ranges.append((start, cut))
        start = resume
    ranges = [(a, b) for a, b in ranges if text[a:b].strip()]
    entities = _entities(spans, [(units[a], units[b]) for a, b in ranges])
    return [Part(text[a:b], found) for (a, b), found in zip(ranges, entities, strict=True)]


def strip_html(html_text: str) -> str:
    """The visible text of bot-authored Telegram HTML (catalog strings, for alerts)."""
    return html.unescape(re.sub(r"<[^<>]*>", "", html_text))
