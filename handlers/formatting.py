"""Model Markdown to Telegram text + entities: telegramify-markdown parses (CommonMark, UTF-16 entities, no markup to reject); this adapter guards and splits."""

from __future__ import annotations

import html
import re
from bisect import bisect_right
from collections.abc import Iterable
from itertools import accumulate
from typing import NamedTuple

import pyromark
import regex
import telegramify_markdown
from aiogram.types import MessageEntity
from telegramify_markdown import utf16_len

__all__ = ["MIN_LIMIT", "TELEGRAM_LIMIT", "Part", "render", "render_parts", "strip_html", "utf16_len"]

TELEGRAM_LIMIT = 4096  # UTF-16 code units of visible text per message (entities cost nothing)
MIN_LIMIT = 16


class Part(NamedTuple):
    """One message: its visible text and entities, sent with parse_mode=None."""

    text: str
    entities: list[telegramify_markdown.MessageEntity]  # slotted dataclasses: cheap to make

    def telegram_entities(self) -> list[MessageEntity]:
        """aiogram's entities, built only for what is sent (a pydantic model costs ~30 µs)."""
        return [MessageEntity(**entity.to_dict()) for entity in self.entities]


class _Span(NamedTuple):
    type: str
    start: int  # UTF-16 units, like Telegram's offsets
    end: int
    url: str | None = None
    language: str | None = None


# The options telegramify-markdown parses with, so what is code here is code to it as well.
_OPTIONS = (
    pyromark.Options.ENABLE_TABLES | pyromark.Options.ENABLE_STRIKETHROUGH
    | pyromark.Options.ENABLE_TASKLISTS | pyromark.Options.ENABLE_MATH
)
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
    if match["escaped"]:
        return match[0]
    if match["url"]:
        return match["url"].translate(_URL_ESCAPES)
    return "".join("\\" + ch for ch in match[0])


def _guard(markdown: str) -> str:
    """Escape what the converter would drop or misread, everywhere but in code and math."""
    if not _LITERAL.search(markdown):
        return markdown  # nothing to escape: spare the extra parse
    source, out, pos = markdown.encode(), [], 0
    for event, span in pyromark.events_with_range(markdown, options=_OPTIONS):
        start = event.get("Start") if isinstance(event, dict) else None
        code = isinstance(start, dict) and "CodeBlock" in start
        if code or (isinstance(event, dict) and {"Code", "InlineMath", "DisplayMath"} & event.keys()):
            out.append(_LITERAL.sub(_escape, source[pos : span["start"]].decode()))
            out.append(source[span["start"] : span["end"]].decode())
            pos = span["end"]
    out.append(_LITERAL.sub(_escape, source[pos:].decode()))
    return "".join(out)


def _touching(span: _Span, spans: list[_Span], starts: list[int]) -> Iterable[_Span]:
    """The spans (sorted, disjoint; `starts` their starts) that share a character with `span`."""
    for other in spans[max(bisect_right(starts, span.start) - 1, 0) :]:
        if other.start >= span.end:
            break
        if other.end > span.start:
            yield other


def _outside(span: _Span, holes: list[_Span], starts: list[int]) -> Iterable[_Span]:
    """`span` minus the `holes`: styles may neither contain code nor be part of it (Bot API)."""
    start = span.start
    for hole in _touching(span, holes, starts):
        if hole.start > start:
            yield span._replace(start=start, end=hole.start)
        start = max(start, hole.end)
    if start < span.end:
        yield span._replace(start=start)


def _outermost(spans: Iterable[_Span]) -> list[_Span]:
    """Drop spans inside another one: quotes cannot nest, and bold in bold is bold."""
    out: list[_Span] = []
    for span in sorted(spans, key=lambda s: (s.start, -s.end)):
        if not out or span.start >= out[-1].end:
            out.append(span)
    return out


def _legal(found: list[telegramify_markdown.MessageEntity]) -> list[_Span]:
    """Keep what Telegram accepts: safe links, one level of quotes, nothing inside code."""
    spans = sorted((_Span(e.type, e.offset, e.offset + e.length, e.url, e.language) for e in found),
                   key=lambda s: (s.start, -s.end))  # fmt: skip
    # An image inside a link is a link inside a link: the outer one is kept.
    links = _outermost(s for s in spans if s.type == "text_link" and _SAFE_URL.match(s.url or ""))
    link_starts = [s.start for s in links]
    # Code may not hold a link nor sit in one: the link, the reader's way on, wins.
    code = [s for s in spans if s.type in ("code", "pre")
            and not any(_touching(s, links, link_starts))]  # fmt: skip
    code_starts = [s.start for s in code]
    quotes = _outermost(s for s in spans if s.type in _QUOTES)
    styles = [piece for kind in _STYLES for piece in _outermost(
        piece for s in spans if s.type == kind for piece in _outside(s, code, code_starts))]
    return code + links + quotes + styles


# Where to cut a long answer, best first, each tried only if it keeps this share of the room.
_CUTS = (
    (re.compile(r"(\n(?:[ \t]*\n)+)"), 0.3),  # paragraph: keeps whole code blocks together
    (re.compile(r"(\n)"), 0.5),  # line: the next line keeps its indentation
    (re.compile(r"[.!?…。！？][\"')\]»”’]?(\s+)"), 0.5),  # sentence
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


def _ranges(text: str, units: list[int], limit: int) -> list[tuple[int, int]]:
    """Python index ranges of the parts, each at most `limit` UTF-16 units, none blank."""
    out, start = [], 0
    while start < len(text):
        end = bisect_right(units, units[start] + limit) - 1
        if end >= len(text):
            out.append((start, len(text)))
            break
        cut, resume = _cut(text, start, end)
        out.append((start, cut))
        start = resume
    return [(a, b) for a, b in out if text[a:b].strip()]


def _entities(
    spans: list[_Span], ranges: list[tuple[int, int]]
) -> list[list[telegramify_markdown.MessageEntity]]:
    """Each span clipped to every part it reaches (UTF-16 `ranges`), offsets made part-relative."""
    starts = [a for a, _ in ranges]
    out: list[list[telegramify_markdown.MessageEntity]] = [[] for _ in ranges]
    for span in spans:
        k = max(bisect_right(starts, span.start) - 1, 0)
        while k < len(ranges) and ranges[k][0] < span.end:
            a, b = ranges[k]
            lo, hi = max(span.start, a), min(span.end, b)
            if hi > lo:
                out[k].append(telegramify_markdown.MessageEntity(
                    type=span.type, offset=lo - a, length=hi - lo, url=span.url,
                    language=span.language,
                ))  # fmt: skip
            k += 1
    return out


def _convert(markdown: str) -> tuple[str, list[_Span]]:
    """Stripped text and legal spans; lone surrogates (unencodable) become U+FFFD."""
    markdown = _LONE_SURROGATE.sub("\ufffd", markdown)
    text, found = telegramify_markdown.convert(_guard(markdown))
    if not text.strip():  # a lone ``` or > would show nothing: show it as typed instead
        return markdown.replace("\r\n", "\n").replace("\r", "\n").strip(), []
    shift = utf16_len(text) - utf16_len(text.lstrip())
    return text.strip(), [s._replace(start=s.start - shift, end=s.end - shift) for s in _legal(found)]


def render(markdown: str) -> Part:
    """The whole answer as one message, however long (previews cut it to size themselves)."""
    text, spans = _convert(markdown)
    return Part(text, _entities(spans, [(0, utf16_len(text))])[0])


def render_parts(markdown: str, limit: int = TELEGRAM_LIMIT) -> list[Part]:
    """Split an answer into messages of at most `limit` UTF-16 units; [] for blank input.

    Cuts fall at a paragraph, else a line, a sentence, a word, and only then anywhere; an entity
    cut in two (a code block too, with its language) continues in the next part.
    """
    if limit < MIN_LIMIT:
        raise ValueError(f"limit must be at least {MIN_LIMIT}, got {limit}")
    text, spans = _convert(markdown)
    if not text:
        return []
    if utf16_len(text) <= limit:  # what fits is sent as is
        return [Part(text, _entities(spans, [(0, utf16_len(text))])[0])]
    units = list(accumulate((2 if ch > "\uffff" else 1 for ch in text), initial=0))
    ranges = _ranges(text, units, limit)
    entities = _entities(spans, [(units[a], units[b]) for a, b in ranges])
    return [Part(text[a:b], found) for (a, b), found in zip(ranges, entities, strict=True)]


_TAG = re.compile(r"<[^<>]*>")


def strip_html(html_text: str) -> str:
    """The visible text of bot-authored Telegram HTML (catalog strings): tags out, &-escapes decoded."""
    return html.unescape(_TAG.sub("", html_text))
