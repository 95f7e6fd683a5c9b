"""Roles as files: parse, validate and hot-reload the Markdown role files in prompts/."""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

log = logging.getLogger(__name__)

SUMMARIZER_ID = "summarizer"
DEFAULT_ROLE_ID = "personal_assistant"
LANGUAGES = ("en", "ru")
Language = Literal["en", "ru"]

DEFAULT_TEMPERATURE = 0.7
DEFAULT_MAX_OUTPUT_TOKENS = 1000
MAX_OUTPUT_TOKENS_LIMIT = 32000
# A role file is read into every model call; a runaway file would cost tokens on every message.
MAX_FILE_BYTES = 64 * 1024

# Role ids travel in callback data (64 bytes in total) and are stored per user, so they stay
# short, lowercase ASCII and stable.
_ROLE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


class RoleError(RuntimeError):
    """A role the caller needs (the summariser, or any role at all) is not usable."""


class _Invalid(ValueError):
    """One problem in one role file; the message must never quote the file's contents."""


def role_language(code: str | None) -> str:
    """Map a Telegram language code to the catalog language: "ru" or "en".

    Only Russian ("ru", "ru-RU", "RU_ru") gets Russian. Ukrainian and Belarusian users get
    English on purpose: addressing them in Russian by default is not a safe guess, and the
    model itself answers in whatever language the user writes. handlers.i18n uses the same rule.
    """
    if not code:
        return "en"
    primary = code.strip().replace("_", "-").split("-", 1)[0].lower()
    return "ru" if primary == "ru" else "en"


def _pick(texts: Mapping[Language, str], lang: str | None) -> str:
    if role_language(lang) == "ru" and texts.get("ru"):
        return texts["ru"]
    return texts.get("en", "")


# Models known to take images (OpenAI's and common open ones behind OpenAI-compatible servers);
# any other model answers photos only when a role names it as its vision_model.
VISION_MODEL_PREFIXES = (
    "gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-4-turbo", "gpt-5", "o1", "o3", "o4", "claude-3",
    "claude-sonnet", "claude-opus", "gemini", "llava", "llama3.2-vision", "qwen2-vl",
    "qwen2.5-vl", "pixtral", "gemma3",
)


@dataclass(frozen=True)
class Role:
    """A persona loaded from one file in prompts/; the file stem is its id."""

    id: str
    # Excluded from the hash because dicts are unhashable; equality still compares them.
    title: dict[Language, str] = field(hash=False)
    description: dict[Language, str] = field(hash=False)
    button: dict[Language, str] = field(hash=False)
    model: str | None  # None: the caller uses its default (CHAT_MODEL, or SUMMARY_MODEL)
    temperature: float
    max_output_tokens: int
    system_prompt: str
    path: Path
    tools: tuple[str, ...] = ()
    consult: tuple[str, ...] = ()
    vision_model: str | None = None  # the model a photo is answered with (None: see sees_images)

    def sees_images(self, default_model: str) -> str | None:
        """The model that answers a photo in this role: its vision_model, else its own (or the
        default) model when that is one known to take images; None: the role cannot see."""
        if self.vision_model:
            return self.vision_model
        model = self.model or default_model
        return model if model.lower().startswith(VISION_MODEL_PREFIXES) else None

    def label(self, lang: str | None) -> str:
        """Title in the user's language (Russian for ru* codes, otherwise English)."""
        return _pick(self.title, lang)

    def describe(self, lang: str | None) -> str:
        """One-line description in the user's language; empty if the file has none."""
        return _pick(self.description, lang)

    def button_text(self, lang: str | None) -> str:
        """Keyboard button text in the user's language."""
        return _pick(self.button, lang)


def _split_front_matter(text: str) -> tuple[str, str]:
    # Not str.splitlines(): it also splits on U+2028 and friends, which would alter the prompt.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if not lines or lines[0].rstrip() != "---":
        raise _Invalid("the file must start with a '---' line that opens the YAML front matter")
    for i in range(1, len(lines)):
        if lines[i].rstrip() == "---":
            return "\n".join(lines[1:i]), "\n".join(lines[i + 1 :])
    raise _Invalid("the YAML front matter is not closed by a '---' line")


def _yaml_problem(exc: yaml.YAMLError) -> str:
    # str(exc) prints a snippet of the offending line; report only what and where.
    if isinstance(exc, yaml.MarkedYAMLError):
        where = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "syntax error"
        if where is not None:
            # +1: the front matter starts on the file's second line, and marks are 0-based.
            line, column = where.line + 2, where.column + 1
            return f"invalid YAML front matter: {what} (line {line}, column {column})"
        return f"invalid YAML front matter: {what}"
    return "invalid YAML front matter"


def _bare_is_english(value: object) -> object:
    # A bare string is the English text; convenient for simple roles.
    return {"en": value} if isinstance(value, str) else value


def _needs_english(texts: dict[str, str]) -> dict[str, str]:
    # English is the fallback for every other language, so it cannot be missing.
    if "en" not in texts:
        raise ValueError("needs an English text ({en: ...})")
    return texts


# Telegram shows titles and buttons in keyboards and headers, where long ones get cut off.
_ShortText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
_LongText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=300)]
_English = (BeforeValidator(_bare_is_english), AfterValidator(_needs_english))
ShortTexts = Annotated[dict[Language, _ShortText], *_English]
LongTexts = Annotated[dict[Language, _LongText], *_English]


class FrontMatter(BaseModel):
    """The YAML between the '---' lines of a role file."""

    # forbid: a typo such as "temprature" would otherwise silently fall back to the default.
    model_config = ConfigDict(extra="forbid", frozen=True)

    title: ShortTexts  # {en: ..., ru: ...}, or a bare string: the English text
    description: LongTexts = {}
    button: ShortTexts | None = None  # None: the title
    # None: the caller uses its default (CHAT_MODEL, or SUMMARY_MODEL).
    model: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100),
                     Field(strict=True)] | None = None
    # strict: "temperature: yes" is a mistake, not 1.0 (YAML reads it as a boolean).
    temperature: Annotated[float, Field(ge=0, le=2, strict=True, allow_inf_nan=False)] = DEFAULT_TEMPERATURE
    max_output_tokens: Annotated[int, Field(ge=1, le=MAX_OUTPUT_TOKENS_LIMIT, strict=True)] = (
        DEFAULT_MAX_OUTPUT_TOKENS
    )
    # Tool sets the role may call: built-in ones (graph/tools.py TOOL_SETS) and MCP servers
    # configured in MCP_SERVERS, as mcp:NAME.
    tools: tuple[Annotated[str, StringConstraints(pattern=r"^(reminders|mcp:[a-z0-9_-]{1,32})$")], ...] = ()
    # Roles this one may ask for part of the work within a turn (graph/consult.py).
    consult: tuple[Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")], ...] = ()
    # The model that answers photos in this role, when its own model does not take images.
    vision_model: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100),
                            Field(strict=True)] | None = None


def _problems(exc: ValidationError) -> str:
    """One line per field: where and what was expected, never the value (it is file content)."""
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(part)[:40] for part in error["loc"]) or "front matter"
        if error["type"] == "extra_forbidden":
            allowed = ", ".join(FrontMatter.model_fields)
            problems.append(f"unknown field {where!r} (allowed: {allowed})")
        elif error["type"] == "missing":
            problems.append(f"{where} is required")
        else:
            problems.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


def _parse_role(role_id: str, path: Path, raw: bytes) -> Role:
    if len(raw) > MAX_FILE_BYTES:
        raise _Invalid(f"the file is larger than {MAX_FILE_BYTES // 1024} KiB")
    try:
        text = raw.decode("utf-8-sig")  # -sig: editors on Windows add a BOM
    except UnicodeDecodeError:
        raise _Invalid("the file is not valid UTF-8") from None
    front, body = _split_front_matter(text)
    try:
        meta = yaml.safe_load(front)
    except yaml.YAMLError as exc:
        raise _Invalid(_yaml_problem(exc)) from None
    if not isinstance(meta, dict | None):
        raise _Invalid("the front matter must be a YAML mapping of fields")
    system_prompt = body.strip()
    try:
        fields = FrontMatter.model_validate(meta or {})
    except ValidationError as exc:
        problems = _problems(exc)
        if not system_prompt:
            problems += "; the system prompt (the text after the front matter) is empty"
        raise _Invalid(problems) from None
    if not system_prompt:
        raise _Invalid("the system prompt (the text after the front matter) is empty")
    return Role(
        id=role_id,
        title=dict(fields.title),
        description=dict(fields.description),
        button=dict(fields.button or fields.title),
        model=fields.model,
        temperature=fields.temperature,
        max_output_tokens=fields.max_output_tokens,
        system_prompt=system_prompt,
        path=path,
        tools=fields.tools,
        consult=fields.consult,
        vision_model=fields.vision_model,
    )


def _is_candidate(name: str) -> bool:
    # "_draft.md" and ".swp"-style names let operators park work in progress in the folder.
    return (
        name.endswith(".md")
        and not name.startswith(("_", "."))
        and name.lower() != "readme.md"
    )


_Signature = tuple[int, int, int]  # (mtime_ns, size, inode): inode catches atomic-rename saves


@dataclass(frozen=True)
class _Entry:
    signature: _Signature
    role: Role | None
    error: str | None


@dataclass(frozen=True)
class _Snapshot:
    roles: Mapping[str, Role]  # excludes the summariser
    summarizer: Role | None
    errors: tuple[str, ...]
    problems: tuple[str, ...]  # registry-level problems (no roles, no summariser, no folder)


class RoleRegistry:
    """The roles currently on disk, re-read when files change (at most once per check_interval).

    A file that becomes broken is dropped, not kept at its last good version: the registry then
    always matches what is on disk, so a restart never changes which roles exist. Users whose
    role disappeared are served the default role (see resolve()) until the file is fixed.
    """

    def __init__(
        self,
        prompts_dir: Path | str,
        *,
        check_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dir = Path(prompts_dir)
        self._interval = check_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._dir_error: str | None = None
        self._snapshot = _Snapshot(roles={}, summarizer=None, errors=(), problems=())
        self._next_check = -math.inf
        self._built = False
        self.refresh()

    @property
    def prompts_dir(self) -> Path:
        return self._dir

    # -- reading ---------------------------------------------------------------------------

    def get(self, role_id: str) -> Role | None:
        """The role with this id, or None. The summariser is not a chat role, so never returned."""
        return self._current().roles.get(role_id)

    def resolve(self, role_id: str | None) -> Role:
        """The user's role if it still exists, otherwise the default role."""
        snapshot = self._current()
        role = snapshot.roles.get(role_id) if role_id else None
        return role or snapshot.roles[self._default_id(snapshot)]

    def roles(self) -> list[Role]:
        """Usable chat roles, sorted by id."""
        snapshot = self._current()
        return [snapshot.roles[k] for k in sorted(snapshot.roles)]

    @property
    def default_role_id(self) -> str:
        """"personal_assistant" if usable, else the first role by id; RoleError if none."""
        return self._default_id(self._current())

    def summarizer(self) -> Role:
        """The summariser's role; RoleError says why it is unusable."""
        snapshot = self._current()
        if snapshot.summarizer is None:
            path = self._dir / f"{SUMMARIZER_ID}.md"
            detail = next((e for e in snapshot.errors if e.startswith(f"{path}:")), None)
            raise RoleError(detail or f"{path}: missing (the summariser prompt is required)")
        return snapshot.summarizer

    def errors(self) -> list[str]:
        """Everything wrong with the role files, one "<path>: <what is wrong>" line each."""
        snapshot = self._current()
        return [*snapshot.errors, *snapshot.problems]

    def _default_id(self, snapshot: _Snapshot) -> str:
        if DEFAULT_ROLE_ID in snapshot.roles:
            return DEFAULT_ROLE_ID
        if not snapshot.roles:
            raise RoleError(f"{self._dir}: no usable role files")
        return min(snapshot.roles)

    def _current(self) -> _Snapshot:
        # The hot path: one clock read and a comparison. Disk is touched at most once per
        # interval, and a caller that finds another thread mid-scan serves the last snapshot.
        if self._clock() >= self._next_check and self._lock.acquire(blocking=False):
            try:
                self._refresh_locked()
            finally:
                self._lock.release()
        return self._snapshot

    # -- reloading -------------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-scan the folder now, regardless of the check interval."""
        with self._lock:
            self._refresh_locked()

    def _refresh_locked(self) -> None:
        self._next_check = self._clock() + self._interval
        previous_dir_error = self._dir_error
        signatures = self._scan()
        changed = self._apply(signatures if signatures is not None else {})
        if changed or not self._built or self._dir_error != previous_dir_error:
            self._rebuild()
            self._built = True

    def _scan(self) -> dict[str, _Signature] | None:
        found: dict[str, _Signature] = {}
        try:
            with os.scandir(self._dir) as it:
                for entry in it:
                    if not _is_candidate(entry.name):
                        continue
                    try:
                        if not entry.is_file():  # follows symlinks; directories are skipped
                            continue
                        st = entry.stat()
                    except OSError:
                        continue  # removed mid-scan; the next scan settles it
                    found[entry.name] = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError as exc:
            error = f"{self._dir}: cannot read the prompts folder ({exc.strerror or exc})"
            if error != self._dir_error:
                log.warning("%s", error)
            self._dir_error = error
            return None
        self._dir_error = None
        return found

    def _apply(self, signatures: dict[str, _Signature]) -> bool:
        changed = False
        for name in [n for n in self._entries if n not in signatures]:
            del self._entries[name]
            changed = True
            log.info("role file %s removed", self._dir / name)
        for name, signature in signatures.items():
            old_entry = self._entries.get(name)
            if old_entry is not None and old_entry.signature == signature:
                continue
            changed = True
            new = self._load(name, signature)
            self._entries[name] = new
            if new.error is not None:
                # Logged once per change of the file: unchanged files are never re-parsed.
                withdrawn = old_entry is not None and old_entry.role is not None
                suffix = " (the role is withdrawn until the file is fixed)" if withdrawn else ""
                log.warning("%s%s", new.error, suffix)
            elif old_entry is None or old_entry.role is None:
                log.info("role file %s loaded", self._dir / name)
        return changed

    def _load(self, name: str, signature: _Signature) -> _Entry:
        path = self._dir / name
        role_id = name[: -len(".md")]
        try:
            if not _ROLE_ID_RE.fullmatch(role_id):
                raise _Invalid(
                    "the file name must be a role id: lowercase latin letters, digits, '_' or '-', "
                    "at most 32 characters, then .md"
                )
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise _Invalid(f"cannot read the file ({exc.strerror or exc})") from None
            return _Entry(signature, _parse_role(role_id, path, raw), None)
        except _Invalid as exc:
            return _Entry(signature, None, f"{path}: {exc}")

    def _rebuild(self) -> None:
        roles: dict[str, Role] = {}
        summarizer: Role | None = None
        errors: list[str] = []
        for name in sorted(self._entries):
            entry = self._entries[name]
            if entry.error is not None:
                errors.append(entry.error)
            elif entry.role is not None and entry.role.id == SUMMARIZER_ID:
                summarizer = entry.role
            elif entry.role is not None:
                roles[entry.role.id] = entry.role

        problems: list[str] = []
        if self._dir_error is not None:
            problems.append(self._dir_error)
        summarizer_path = self._dir / f"{SUMMARIZER_ID}.md"
        if f"{SUMMARIZER_ID}.md" not in self._entries and self._dir_error is None:
            problems.append(f"{summarizer_path}: missing (the summariser prompt is required)")
        if not roles and self._dir_error is None:
            problems.append(f"{self._dir}: no usable role files")
        for problem in problems:
            if problem not in self._snapshot.problems and problem != self._dir_error:
                log.warning("%s", problem)

        self._snapshot = _Snapshot(
            roles=roles, summarizer=summarizer, errors=tuple(errors), problems=tuple(problems)
        )
