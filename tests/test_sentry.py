"""Sentry over real HTTP to a fake ingest: errors arrive, user text and tokens never do."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import sentry_sdk
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ops.monitoring import (
    REDACTED,
    derive_salt,
    init_sentry,
    install_log_redaction,
    pseudonym,
    tag_context,
)
from tests.fakes.sentry import FakeSentry

TOKEN = "987654321:AAFtestSecretToken-value_0123456789abcd"
TOKEN_SECRET_PART = TOKEN.split(":", 1)[1]
OPENAI_KEY = "sk-test-openai-key-5a5a5a5a"
WEBHOOK_SECRET = "webhook-secret-77e1c0"
CANARY = "canary-58d1 my bank password is hunter2"
USER_ID = 777000111

log = logging.getLogger("tests.sentry_canary")


@pytest.fixture
def fake_sentry() -> Iterator[FakeSentry]:
    with FakeSentry() as fake:
        yield fake


@pytest.fixture
def sentry_reset() -> Iterator[None]:
    level = log.level
    log.setLevel(logging.INFO)
    yield
    log.setLevel(level)
    sentry_sdk.get_client().close(timeout=2)
    sentry_sdk.init()  # no DSN: a disabled client, so later tests send nothing anywhere
    sentry_sdk.get_isolation_scope().clear()


def assert_nothing_leaked(fake: FakeSentry) -> None:
    sent = fake.everything()
    assert sent, "nothing reached the fake ingest"
    for needle in ("canary-58d1", "hunter2", TOKEN_SECRET_PART, OPENAI_KEY, WEBHOOK_SECRET,
                   str(USER_ID)):
        assert needle.encode() not in sent, f"{needle!r} reached Sentry"


def frames(event: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        frame
        for value in event.get("exception", {}).get("values", [])
        for frame in (value.get("stacktrace") or {}).get("frames", [])
    ]


async def test_an_error_arrives_without_user_text_or_token(
    fake_sentry: FakeSentry, sentry_reset: None
) -> None:
    init_sentry(fake_sentry.dsn, release="desktop@test", environment="test",
                secrets=[TOKEN, OPENAI_KEY])
    tag_context(USER_ID, 42, "call_model")
    sentry_sdk.set_extra("last_message", CANARY)

    # A real aiohttp client call: the integration records its URL, token included, as a crumb.
    async with aiohttp.ClientSession() as http:
        url = f"{fake_sentry.host}/bot{TOKEN}/getMe?chat_id={USER_ID}"
        async with http.get(url) as response:
            assert response.status == 404
    log.info("calling %s", f"https://api.telegram.org/bot{TOKEN}/sendMessage")
    log.warning(f"careless template with {TOKEN}")

    def parse_command(user_message: str) -> None:
        words = user_message.split()
        raise ValueError(f"cannot parse {user_message!r} ({len(words)} words)")

    try:
        parse_command(CANARY)
    except ValueError:
        log.exception("turn failed for %s", CANARY)
    try:
        parse_command(CANARY)
    except ValueError as exc:
        sentry_sdk.capture_exception(exc)

    async def background(user_message: str) -> None:
        raise RuntimeError(user_message)

    task = asyncio.create_task(background(CANARY))
    with pytest.raises(RuntimeError):
        await task

    sentry_sdk.flush(timeout=5)

    events = fake_sentry.events()
    assert len(events) == 3
    assert_nothing_leaked(fake_sentry)
    assert all(env.auth and "sentry_key=publickey" in env.auth for env in fake_sentry.envelopes)
    for event in events:
        assert "extra" not in event and "user" not in event
        assert event["tags"]["user"] == pseudonym("user", USER_ID)
        assert event["tags"]["session"] == pseudonym("session", 42)
        assert event["tags"]["node"] == "call_model"
        assert event["environment"] == "test" and event["release"] == "desktop@test"
        values = event["exception"]["values"]
        assert values and all(v["value"] == REDACTED for v in values)  # type kept, text not
        assert frames(event) and all("vars" not in frame for frame in frames(event))

    logged, captured, from_task = events
    assert logged["logentry"] == {"message": "turn failed for %s", "params": []}
    assert logged["exception"]["values"][-1]["type"] == "ValueError"
    assert "parse_command" in [f["function"] for f in frames(captured)]
    assert from_task["exception"]["values"][-1]["mechanism"]["type"] == "asyncio"

    crumbs = logged["breadcrumbs"]["values"]
    http_crumb = next(c for c in crumbs if c.get("type") == "http")
    assert http_crumb["data"]["url"] == f"{fake_sentry.host}/bot{REDACTED}/getMe"
    assert "http.query" not in http_crumb["data"]
    messages = [c.get("message") for c in crumbs if c.get("type") == "log"]
    assert "calling %s" in messages
    assert f"careless template with {REDACTED}" in messages


async def test_a_webhook_request_body_never_reaches_sentry(
    fake_sentry: FakeSentry, sentry_reset: None
) -> None:
    init_sentry(fake_sentry.dsn, release=None, environment=None,
                secrets=[TOKEN, WEBHOOK_SECRET])

    async def webhook(request: web.Request) -> web.Response:
        update = await request.json()
        raise KeyError(update["message"]["text"])

    app = web.Application()
    app.router.add_post("/webhook", webhook)
    async with TestClient(TestServer(app)) as client:
        response = await client.post(
            "/webhook", json={"update_id": 1, "message": {"text": CANARY}},
            headers={"X-Telegram-Bot-Api-Secret-Token": WEBHOOK_SECRET},
        )
        assert response.status == 500

    async def background(user_message: str) -> None:
        raise RuntimeError(user_message)

    # A second init, in another event loop than the first test's: tasks are still watched.
    with pytest.raises(RuntimeError):
        await asyncio.create_task(background(CANARY))
    sentry_sdk.flush(timeout=5)

    event, from_task = fake_sentry.events()
    assert_nothing_leaked(fake_sentry)
    assert from_task["exception"]["values"][-1]["mechanism"]["type"] == "asyncio"
    assert event["exception"]["values"][-1]["type"] == "KeyError"
    assert "data" not in event["request"]
    assert event["request"]["headers"]["X-Telegram-Bot-Api-Secret-Token"] == REDACTED


def test_log_records_lose_tokens_and_secrets() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("tests.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        install_log_redaction([TOKEN, OPENAI_KEY], logger)
        install_log_redaction([TOKEN, OPENAI_KEY], logger)  # idempotent: one filter per handler
        assert len(handler.filters) == 1
        logger.warning("GET https://api.telegram.org/bot%s/getMe", TOKEN)
        logger.warning("key=%s", OPENAI_KEY)
        unknown = "123456789:AAH" + "x" * 32  # a token we were not told about
        logger.warning("stray %s", unknown)
        try:
            raise RuntimeError(f"failed with {TOKEN}")
        except RuntimeError:
            logger.exception("call failed")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert TOKEN_SECRET_PART not in out and OPENAI_KEY not in out and unknown not in out
    assert f"/bot{REDACTED}/getMe" in out and f"key={REDACTED}" in out
    assert "Traceback" in out and "RuntimeError" in out


def test_ids_are_pseudonymised_with_a_deployment_salt() -> None:
    salt = derive_salt([TOKEN, OPENAI_KEY])
    assert derive_salt([OPENAI_KEY, TOKEN]) == salt  # stable across restarts
    assert derive_salt([TOKEN, "another-deployment"]) != salt
    assert derive_salt([]) != derive_salt([])  # no secret: random, never a guessable constant
    tag = pseudonym("user", USER_ID, salt)
    assert len(tag) == 16 and str(USER_ID) not in tag
    assert tag == pseudonym("user", USER_ID, salt)
    assert tag != pseudonym("session", USER_ID, salt)
    assert tag != hashlib.sha256(str(USER_ID).encode()).hexdigest()[:16]
