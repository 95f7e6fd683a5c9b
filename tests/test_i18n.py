"""Text catalogs: same keys and placeholders in both languages, valid Telegram HTML, lookups."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from handlers.i18n import LOCALES_DIR, Catalog, Html, placeholders, ui_language

COMMANDS = (
    "start",
    "help",
    "personalize",
    "start_session",
    "end_session",
    "list_sessions",
    "memory",
    "find",
    "reminders",
    "usage",
    "export_data",
    "delete_my_data",
)


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load()


def flat_keys(path: Path) -> dict[str, str]:
    def walk(table: dict, prefix: str = "") -> dict[str, str]:
        out: dict[str, str] = {}
        for k, v in table.items():
            out.update(walk(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    return walk(tomllib.loads(path.read_text(encoding="utf-8")))


def test_catalogs_pass_their_own_check(catalog: Catalog) -> None:
    assert catalog.check() == []


def test_same_keys_and_placeholders_in_both_files() -> None:
    en, ru = flat_keys(LOCALES_DIR / "en.toml"), flat_keys(LOCALES_DIR / "ru.toml")
    assert sorted(en) == sorted(ru)
    for key in en:
        assert placeholders(en[key]) == placeholders(ru[key]), key
        words = re.sub(r"<[^>]*>|\{\w+\}", "", en[key])  # markup and names need no translation
        assert en[key] != ru[key] or not any(c.isalpha() for c in words), f"{key} untranslated"


def test_texts_the_handlers_rely_on_exist(catalog: Catalog) -> None:
    needed = {
        "start.greeting": {"name", "limit"},
        "help.text": {"limit"},
        "budget.limit_reached": {"used", "limit", "resets_at"},
        "input.text_too_long": {"length", "max"},
        "personalize.instructions_too_long": {"length", "max"},
        "delete.done": {"messages", "sessions", "memories"},
        "session.list_item": {"index", "title", "date", "role", "summary"},
        "session.ended": {"title", "summary"},
        "access.not_allowed": {"user_id"},
        "errors.quota_exhausted": set(),
        "errors.decrypt_failed": set(),
        "recovery.answered": set(),
        "recovery.resend": set(),
        "delete.buttons.confirm": set(),
        "delete.buttons.cancel": set(),
    }
    for key, names in needed.items():
        assert key in catalog, key
        assert placeholders(catalog.text("en", key, **dict.fromkeys(names, "x"))) == set()


def test_command_menu_in_both_languages(catalog: Catalog) -> None:
    for lang in ("en", "ru"):
        menu = catalog.section(lang, "commands")
        assert tuple(menu) == COMMANDS
        assert all(0 < len(d) <= 256 and "<" not in d for d in menu.values())
    assert catalog.section("ru", "commands")["help"] != catalog.section("en", "commands")["help"]


@pytest.mark.parametrize(
    ("code", "lang"),
    [("ru-RU", "ru"), ("ru", "ru"), ("RU", "ru"), ("en", "en"), ("de", "en"), ("uk", "en"),
     (None, "en"), ("", "en")],
)
def test_language_choice(catalog: Catalog, code: str | None, lang: str) -> None:
    assert ui_language(code) == lang
    expected = {"en": "Cancelled. Nothing was deleted.", "ru": "Отменено. Ничего не удалено."}
    assert catalog.text(code, "delete.cancelled") == expected[lang]


def test_parameters_are_formatted_and_html_escaped(catalog: Catalog) -> None:
    text = catalog.text(
        "en", "budget.limit_reached", used=12345, limit=50000, resets_at="00:00"
    )
    assert "12345 of 50000 tokens" in text and "00:00 UTC" in text
    item = catalog.text(
        "ru-RU", "session.list_item", index=1, title="R&D <script>", date="01.02", role="Coder",
        summary=Html("<i>итог</i>"),
    )
    assert "R&amp;D &lt;script&gt;" in item and "<i>итог</i>" in item
    assert catalog.plain("en", "personalize.buttons.current", label="A&B") == "✅ A&B"


def test_unknown_key_and_missing_parameter_raise(catalog: Catalog) -> None:
    with pytest.raises(KeyError):
        catalog.text("en", "no.such.key")
    with pytest.raises(KeyError, match="limit"):
        catalog.text("ru", "budget.limit_reached", used=1, resets_at="00:00")


def write_catalogs(folder: Path, en: str, ru: str) -> Path:
    folder.mkdir()
    (folder / "en.toml").write_text(en, encoding="utf-8")
    (folder / "ru.toml").write_text(ru, encoding="utf-8")
    return folder


def test_missing_russian_text_falls_back_to_english(tmp_path: Path) -> None:
    en, ru = '[a]\nx = "Hello {name}"\ny = "Bye"\n', '[a]\ny = "Пока"\n'
    folder = write_catalogs(tmp_path / "l", en, ru)
    catalog = Catalog.load(folder)
    assert catalog.text("ru", "a.x", name="Ира") == "Hello Ира"
    assert catalog.text("ru", "a.y") == "Пока"
    assert catalog.check() == ["ru.toml: a.x: missing (present in en.toml)"]


def test_check_finds_mismatches(tmp_path: Path) -> None:
    en = """
[a]
x = "Used {used} of {limit}"
z = "<b>bold"
w = "A & B"
[b.buttons]
ok = "<b>No</b>"
"""
    ru = """
[a]
x = "Использовано {used}"
z = "<b>жирный</b>"
w = "A &amp; B"
extra = "Лишний"
[b.buttons]
ok = "Нет"
"""
    problems = Catalog.load(write_catalogs(tmp_path / "l", en, ru)).check()
    text = "\n".join(problems)
    assert "ru.toml: a.x: placeholders ['used'] differ from en.toml ['limit', 'used']" in text
    assert "ru.toml: a.extra: not in en.toml" in text
    assert "en.toml: a.z: unclosed tag <b>" in text
    assert "en.toml: a.w: a bare &" in text
    assert "en.toml: b.buttons.ok: must be plain text" in text
    assert "ru.toml" not in "\n".join(p for p in problems if "a.z" in p or "a.w" in p)


def test_non_string_value_is_rejected_at_load(tmp_path: Path) -> None:
    folder = write_catalogs(tmp_path / "l", "[a]\nx = 5\n", "[a]\nx = 5\n")
    with pytest.raises(ValueError, match=r"a\.x must be a string"):
        Catalog.load(folder)
