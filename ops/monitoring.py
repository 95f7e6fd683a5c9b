"""Error monitoring with Sentry that never carries message content, bot tokens or secrets."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote

import sentry_sdk

if TYPE_CHECKING:
    from sentry_sdk.types import Event, Hint

# The integrations are imported by init_sentry, only with a DSN: the langchain and openai ones
# load parts of those libraries that the bot itself never imports (~0.3 s at every start-up).

REDACTED = "[redacted]"
# A Bot API URL carries the token in its path: https://api.telegram.org/bot<id>:<secret>/getMe
_BOT_URL_TOKEN = re.compile(r"/bot\d+:[A-Za-z0-9_-]+")
# A token on its own (a real one has a 35-character secret part).
_BARE_TOKEN = re.compile(r"\b\d{5,}:[A-Za-z0-9_-]{30,}")
# Breadcrumb data that may hold identifiers or content: query strings, SQL parameters.
_DROPPED_CRUMB_DATA = ("http.query", "http.fragment", "db.params")


class Redactor:
    """Masks bot tokens and the configured secret values (also URL-encoded) in any text."""

    def __init__(self, secrets: Iterable[str]) -> None:
        variants = set()
        for secret in secrets:
            if secret:
                variants.add(secret)
                variants.add(quote(secret, safe=""))
        # Longest first: a secret that contains another is masked whole.
        self._secrets = sorted(variants, key=len, reverse=True)

    def text(self, value: str) -> str:
        value = _BOT_URL_TOKEN.sub(f"/bot{REDACTED}", value)
        value = _BARE_TOKEN.sub(REDACTED, value)
        for secret in self._secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value

    def walk(self, value: Any) -> Any:
        """A copy of a JSON-like structure with every string masked."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {key: self.walk(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.walk(item) for item in value]
        return value


class RedactingFilter(logging.Filter):
    """For handlers: masks tokens and secrets in the formatted message and the traceback text."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._redactor = Redactor(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        record.msg, record.args = self._redactor.text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._redactor.text(record.exc_text)
        if record.stack_info:
            record.stack_info = self._redactor.text(record.stack_info)
        return True


def install_log_redaction(
    secrets: Iterable[str], logger: logging.Logger | None = None
) -> RedactingFilter:
    """Put one RedactingFilter on every handler of the root (or the given) logger."""
    redacting = RedactingFilter(secrets)
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(redacting)
    return redacting


# --- Sentry -------------------------------------------------------------------------------

_redactor = Redactor(())
_salt = os.urandom(32)


def init_sentry(
    dsn: str, *, release: str | None, environment: str | None, secrets: list[str]
) -> None:
    """Start Sentry. Call inside the running event loop: the asyncio integration hooks it."""
    from sentry_sdk.integrations.asyncio import AsyncioIntegration, enable_asyncio_integration
    from sentry_sdk.integrations.langchain import LangchainIntegration
    from sentry_sdk.integrations.langgraph import LanggraphIntegration
    from sentry_sdk.integrations.logging import LoggingIntegration
    from sentry_sdk.integrations.openai import OpenAIIntegration

    global _redactor, _salt
    _redactor = Redactor(secrets)
    _salt = derive_salt(secrets)
    with warnings.catch_warnings():
        # sentry-sdk 2.75 deprecates send_default_pii for `data_collection`; False resolves to
        # the same restrictive defaults and states the intent where a reviewer looks for it.
        warnings.filterwarnings(
            "ignore", message=".*send_default_pii.*", category=DeprecationWarning
        )
        sentry_sdk.init(
            dsn=dsn,
            release=release,
            environment=environment,
            send_default_pii=False,
            include_local_variables=False,
            max_request_body_size="never",
            integrations=[
                AsyncioIntegration(),
                LoggingIntegration(level=logging.INFO, event_level=logging.ERROR),
                # These attach prompts only with send_default_pii; off twice is off for sure.
                OpenAIIntegration(include_prompts=False),
                LangchainIntegration(include_prompts=False),
                LanggraphIntegration(include_prompts=False),
            ],
            before_send=before_send,
            before_breadcrumb=before_breadcrumb,
        )
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    # The integration hooks the loop running at its first set-up only (once per process);
    # a later init in another loop (a restart in-process, tests) needs it hooked again.
    enable_asyncio_integration()


def derive_salt(secrets: Iterable[str]) -> bytes:
    """Per deployment and stable across restarts; random when there is no secret to derive from.

    Telegram ids are small numbers: hashed without a secret salt they are found by brute force.
    """
    material = sorted(s for s in secrets if s)
    if not material:
        return os.urandom(32)
    return hashlib.sha256(b"desktop/sentry-id-salt\0" + "\0".join(material).encode()).digest()


def pseudonym(kind: str, value: int, salt: bytes | None = None) -> str:
    """A keyed hash (HMAC-SHA256, 64 bits shown): the same id gives the same tag, not the id."""
    key = _salt if salt is None else salt
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:16]


def tag_context(user_id: int | None, session_id: int | None, node: str | None) -> None:
    """Tag what follows (on the current isolation scope) with hashed ids and the graph node."""
    tags = {
        "user": None if user_id is None else pseudonym("user", user_id),
        "session": None if session_id is None else pseudonym("session", session_id),
        "node": node,
    }
    for key, value in tags.items():
        if value is None:
            sentry_sdk.get_isolation_scope().remove_tag(key)
        else:
            sentry_sdk.set_tag(key, value)


def before_send(event: Event, hint: Hint) -> Event | None:
    """Keep what locates a fault (types, stack, tags); drop what may quote the user."""
    return _scrubbed(cast(dict[str, Any], event), hint)


def _scrubbed(event: dict[str, Any], hint: Hint) -> Any:
    event.pop("extra", None)
    event.pop("user", None)
    request = event.get("request")
    if isinstance(request, dict):
        for key in ("data", "cookies", "query_string", "env"):
            request.pop(key, None)
    for container in ("exception", "threads"):
        for entry in (event.get(container) or {}).get("values") or []:
            if container == "exception" and "value" in entry:
                entry["value"] = REDACTED  # messages may quote input; the type stays
            for frame in (entry.get("stacktrace") or {}).get("frames") or []:
                frame.pop("vars", None)
    logentry = event.get("logentry")
    if isinstance(logentry, dict):
        # The template is ours ("memory write failed: %s"); its arguments may not be.
        record = hint.get("log_record") if hint else None
        template = _template(record) if record is not None else str(logentry.get("message", ""))
        event["logentry"] = {"message": template, "params": []}
    for crumb in (event.get("breadcrumbs") or {}).get("values") or []:
        _clean_crumb(crumb, None)
    return _redactor.walk(event)


def before_breadcrumb(crumb: dict[str, Any], hint: dict[str, Any] | None) -> dict[str, Any] | None:
    _clean_crumb(crumb, (hint or {}).get("log_record"))
    return _redactor.walk(crumb)


def _template(record: logging.LogRecord) -> str:
    """The log call's format string, without its arguments; `log.error(exc)` gives the class."""
    if isinstance(record.msg, str):
        return record.msg
    return f"<{type(record.msg).__name__}>"


def _clean_crumb(crumb: dict[str, Any], record: logging.LogRecord | None) -> None:
    if crumb.get("type") == "log" or record is not None:
        if record is not None:
            crumb["message"] = _template(record)
        crumb.pop("data", None)  # `extra=` of the log call
        return
    data = crumb.get("data")
    if isinstance(data, dict):
        for key in _DROPPED_CRUMB_DATA:
            data.pop(key, None)
        if isinstance(data.get("url"), str):
            data["url"] = data["url"].split("?", 1)[0]
