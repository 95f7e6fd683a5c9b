"""User-facing texts in English and Russian, loaded once from locales/*.toml and checked."""

from __future__ import annotations

import re
import string
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

LOCALES_DIR = Path(__file__).resolve().parent.parent / "locales"
LANGUAGES = ("en", "ru")
REFERENCE = "en"  # every key must exist here; other languages fall back to it

TELEGRAM_TEXT_LIMIT = 4096
COMMAND_DESCRIPTION_LIMIT = 256  # BotCommand.description: 1-256 characters
# Tags Telegram's HTML parse mode accepts; anything else fails the whole message.
_TELEGRAM_TAGS = frozenset(
    ["b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "span", "tg-spoiler", "a",
     "code", "pre", "blockquote", "tg-emoji"]
)
_TAG_RE = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9-]*)((?:\s[^<>]*)?)>")
_ENTITY_RE = re.compile(r"&(?:lt|gt|amp|quot|#\d+|#x[0-9a-fA-F]+);")
_IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def ui_language(code: str | None) -> str:
    """Catalog language for a Telegram language code: "ru" for Russian (ru, ru-RU), else "en".

    Same rule as graph.roles.role_language (a test keeps them in step): Ukrainian and
    Belarusian get English, since Russian is not a safe default for them.
    """
    if not code:
        return REFERENCE
    primary = code.strip().replace("_", "-").split("-", 1)[0].lower()
    return "ru" if primary == "ru" else REFERENCE


class Html(str):
    """A parameter value that is already safe Telegram HTML, so text() inserts it unescaped."""


def escape_html(value: str) -> str:
    """Escape text for Telegram's HTML parse mode (which knows only &lt; &gt; &amp; &quot;)."""
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace(
        '"', "&quot;"
    )


class _Escaped:
    # Escapes after formatting so format specs still work: {used:,} on an int, {day:%d.%m}.
    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __format__(self, spec: str) -> str:
        return escape_html(format(self.value, spec))


class _Params(dict[str, object]):
    def __init__(self, key: str, params: Mapping[str, object]) -> None:
        super().__init__(params)
        self.key = key

    def __missing__(self, name: str) -> object:
        raise KeyError(f"text {self.key!r} needs the parameter {name!r}")


def placeholders(template: str) -> set[str]:
    """Names of the {placeholders} in a template; ValueError if the braces are malformed."""
    names: set[str] = set()
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None:
            names.add(name)
    return names


def _flatten(table: Mapping[str, Any], source: Path, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for name, value in table.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(_flatten(value, source, f"{key}."))
        elif isinstance(value, str):
            flat[key] = value
        else:
            raise ValueError(f"{source}: {key} must be a string, not {type(value).__name__}")
    return flat


def _is_plain_key(key: str) -> bool:
    # Button texts and the command menu are shown verbatim by Telegram, so no markup there.
    parts = key.split(".")
    return parts[0] == "commands" or "buttons" in parts[:-1]


def _html_problems(value: str) -> list[str]:
    problems: list[str] = []
    stack: list[str] = []
    for match in _TAG_RE.finditer(value):
        closing, tag = match.group(1) == "/", match.group(2).lower()
        if tag not in _TELEGRAM_TAGS:
            problems.append(f"tag <{tag}> is not supported by Telegram")
        elif not closing:
            stack.append(tag)
        elif not stack or stack.pop() != tag:
            problems.append(f"closing tag </{tag}> does not match")
    if stack:
        problems.append(f"unclosed tag <{stack[-1]}>")
    rest = _ENTITY_RE.sub("", _TAG_RE.sub("", value))
    if "<" in rest or ">" in rest:
        problems.append("a bare < or > (write &lt; or &gt;)")
    if "&" in rest:
        problems.append("a bare & (write &amp;)")
    return problems


class Catalog:
    """All user-facing texts by language; build once at start-up with Catalog.load()."""

    def __init__(self, texts: Mapping[str, Mapping[str, str]]) -> None:
        if REFERENCE not in texts:
            raise ValueError(f"the {REFERENCE!r} catalog is required")
        self._texts = {lang: dict(values) for lang, values in texts.items()}

    @classmethod
    def load(cls, locales_dir: Path | str = LOCALES_DIR) -> Catalog:
        """Read <lang>.toml for every language; a missing file or bad TOML stops start-up."""
        texts: dict[str, dict[str, str]] = {}
        for lang in LANGUAGES:
            path = Path(locales_dir) / f"{lang}.toml"
            try:
                with path.open("rb") as f:
                    data = tomllib.load(f)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"{path}: invalid TOML: {exc}") from None
            texts[lang] = _flatten(data, path)
        return cls(texts)

    def text(self, lang: str | None, key: str, **params: object) -> str:
        """The text as Telegram HTML; parameters are HTML-escaped unless wrapped in Html."""
        escaped = {k: v if isinstance(v, Html) else _Escaped(v) for k, v in params.items()}
        return self._template(lang, key).format_map(_Params(key, escaped))

    def plain(self, lang: str | None, key: str, **params: object) -> str:
        """The text with parameters inserted as they are: for buttons, menus, callback alerts."""
        return self._template(lang, key).format_map(_Params(key, params))

    def section(self, lang: str | None, prefix: str) -> dict[str, str]:
        """Texts under a table keyed by the rest of the key: section(lang, "commands")["help"]."""
        start = f"{prefix}."
        return {
            key[len(start) :]: self._template(lang, key).format_map(_Params(key, {}))
            for key in self._texts[REFERENCE]
            if key.startswith(start)
        }

    def keys(self) -> list[str]:
        """All keys of the reference (English) catalog, in file order."""
        return list(self._texts[REFERENCE])

    def __contains__(self, key: object) -> bool:
        return key in self._texts[REFERENCE]

    def _template(self, lang: str | None, key: str) -> str:
        reference = self._texts[REFERENCE][key]  # KeyError: the key does not exist at all
        return self._texts.get(ui_language(lang), {}).get(key, reference)

    def check(self) -> list[str]:
        """Problems a test must keep at zero: key sets, placeholders, Telegram HTML, lengths."""
        problems: list[str] = []
        reference = self._texts[REFERENCE]
        for lang, texts in self._texts.items():
            for key, value in texts.items():
                problems += [f"{lang}.toml: {key}: {p}" for p in self._value_problems(key, value)]
                if lang == REFERENCE:
                    continue
                if key not in reference:
                    problems.append(f"{lang}.toml: {key}: not in {REFERENCE}.toml")
                    continue
                try:
                    names, expected = placeholders(value), placeholders(reference[key])
                except ValueError:
                    continue  # already reported as malformed braces
                if names != expected:
                    problems.append(
                        f"{lang}.toml: {key}: placeholders {sorted(names)} differ from "
                        f"{REFERENCE}.toml {sorted(expected)}"
                    )
            if lang != REFERENCE:
                problems += [
                    f"{lang}.toml: {key}: missing (present in {REFERENCE}.toml)"
                    for key in reference
                    if key not in texts
                ]
        return problems

    @staticmethod
    def _value_problems(key: str, value: str) -> list[str]:
        problems: list[str] = []
        if not value.strip():
            problems.append("empty")
        try:
            names = placeholders(value)
        except ValueError as exc:
            problems.append(f"malformed braces ({exc}); write {{{{ and }}}} for literal braces")
            names = set()
        problems += [
            f"placeholder {{{n}}} is not a plain name"
            for n in sorted(names)
            if not _IDENTIFIER_RE.match(n)
        ]
        if _is_plain_key(key):
            if "<" in value or "&" in value:
                problems.append("must be plain text (Telegram shows button and menu texts as is)")
        else:
            problems += _html_problems(value)
        if len(value) > TELEGRAM_TEXT_LIMIT:
            problems.append(f"longer than {TELEGRAM_TEXT_LIMIT} characters")
        if key.startswith("commands.") and len(value) > COMMAND_DESCRIPTION_LIMIT:
            problems.append(f"command descriptions allow {COMMAND_DESCRIPTION_LIMIT} characters")
        return problems
