"""One settings object, read from the environment and `.env`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_DIR = Path(__file__).resolve().parent


class ConfigError(Exception):
    """A setting is missing or malformed; the message is one line naming it."""


def _id_set(value: object) -> frozenset[int]:
    if value is None or value == "":
        return frozenset()
    if isinstance(value, (int, str)):
        parts = str(value).replace(";", ",").split(",")
        return frozenset(int(p.strip()) for p in parts if p.strip())
    if isinstance(value, Iterable):
        return frozenset(int(v) for v in value)
    raise ValueError(f"expected ids separated by commas, got {type(value).__name__}")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    telegram_token: SecretStr | None = None
    telegram_api_url: str | None = None

    openai_api_key: SecretStr = SecretStr("sk-no-key")
    openai_base_url: str | None = None
    chat_model: str = "gpt-4o"
    summary_model: str = "gpt-4o-mini"
    # local: a model shipped with the project (memory/embedders.py), no embeddings API needed;
    # openai: the OpenAI-compatible /embeddings endpoint with EMBEDDING_MODEL, billed per token.
    embedding_provider: Literal["local", "openai"] = "local"
    embedding_model: str = "text-embedding-3-small"
    model_timeout: float = Field(60.0, gt=0)
    model_max_attempts: int = Field(3, ge=1, le=10)
    model_retry_base_delay: float = Field(0.5, ge=0)
    context_window: int = Field(128_000, ge=1_000)
    # MCP servers a role may use (`tools: [mcp:NAME]` in its file), as JSON: {"NAME": {"transport":
    # "stdio", "command": ..., "args": [...]} | {"transport": "streamable_http", "url": ...}}.
    # Secret: a server's headers may carry a token.
    mcp_servers: SecretStr | None = None
    tool_timeout: float = Field(10.0, gt=0, le=300)  # seconds one tool call may take

    pinecone_api_key: SecretStr | None = None
    pinecone_index: str | None = None
    pinecone_host: str | None = None
    pinecone_timeout: float = Field(10.0, gt=0)

    database_url: SecretStr | None = None
    db_user: str | None = None
    db_pass: SecretStr | None = None
    db_host: str | None = None
    db_port: int = 5432
    db_name: str | None = None

    data_dir: Path = Path("data")
    prompts_dir: Path = PROJECT_DIR / "prompts"
    encryption_key: SecretStr | None = None

    sentry_dsn: SecretStr | None = None
    sentry_environment: str | None = None
    sentry_release: str | None = None

    daily_token_limit: int = Field(50_000, ge=0)
    max_message_chars: int = Field(8_000, ge=1)
    # Voice, audio and files: the largest the bot downloads (20 MB is the cloud Bot API's own
    # limit; a local telegram-bot-api in TELEGRAM_API_URL lifts it), and the longest speech.
    max_file_mb: int = Field(20, ge=1, le=2_000)
    max_audio_seconds: int = Field(600, ge=1, le=14_400)
    transcription_model: str = "gpt-4o-mini-transcribe"
    # A local speech engine speaking the same protocol (faster-whisper-server, LocalAI...);
    # None: OPENAI_BASE_URL.
    transcription_base_url: str | None = None
    memory_top_k: int = Field(3, ge=0, le=20)  # earlier sessions an answer may draw on; 0: none
    history_messages: int = Field(40, ge=0)
    reservation_ttl_seconds: int = Field(600, ge=10)
    session_idle_minutes: int = Field(120, ge=1)
    transcript_retention_days: int | None = Field(None, ge=1)
    recovery_window_minutes: int = Field(60, ge=0)
    shutdown_grace_seconds: float = Field(25.0, ge=0)

    allowed_user_ids: Annotated[frozenset[int], NoDecode] = frozenset()
    admin_user_ids: Annotated[frozenset[int], NoDecode] = frozenset()

    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    webhook_listen_host: str = "0.0.0.0"
    webhook_port: int = Field(8080, ge=1, le=65535)
    # Off for a fleet: one replica stopping must not unhook the others.
    webhook_delete_on_stop: bool = True
    redis_url: str | None = None
    chat_lock_seconds: float = Field(30.0, ge=1)

    langsmith_tracing: bool = False
    langsmith_api_key: SecretStr | None = None

    log_level: str = "INFO"

    @field_validator("allowed_user_ids", "admin_user_ids", mode="before")
    @classmethod
    def _parse_ids(cls, value: object) -> frozenset[int]:
        return _id_set(value)

    @field_validator("mcp_servers")
    @classmethod
    def _check_mcp_servers(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            mcp_connections(value.get_secret_value())  # raises a clear error when malformed
        return value

    def mcp_connections(self) -> dict[str, dict[str, Any]]:
        return {} if self.mcp_servers is None else mcp_connections(self.mcp_servers.get_secret_value())

    @field_validator("telegram_token")
    @classmethod
    def _check_token(cls, value: SecretStr | None) -> SecretStr | None:
        import re

        if value is not None and not re.fullmatch(r"\d+:[\w-]+", value.get_secret_value()):
            raise ValueError("expected a bot token like 123456:ABC-DEF")
        return value

    @field_validator(
        "telegram_api_url", "openai_base_url", "pinecone_host", "webhook_url", "transcription_base_url"
    )
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value() == "":
            return None
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        raw = value.get_secret_value()
        try:
            url = make_url(raw)
        except ArgumentError:
            raise ValueError("expected a URL like postgresql+asyncpg://user:pass@host/db") from None
        if url.get_backend_name() not in ("postgresql", "sqlite"):
            raise ValueError("expected a postgresql:// or sqlite:// URL")
        return value

    @field_validator("transcript_retention_days", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected a redis:// URL")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        import re

        if value is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", value.get_secret_value()):
            raise ValueError("expected 1-256 characters: letters, digits, _ and -")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        value = value.upper()
        if value not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return value

    @model_validator(mode="after")
    def _check_db_parts(self) -> Settings:
        if self.database_url is None and any((self.db_user, self.db_host, self.db_name)):
            missing = [n for n in ("db_user", "db_host", "db_name") if not getattr(self, n)]
            if missing:
                raise ValueError(f"{missing[0].upper()} is required when DB_* variables are used")
        return self

    @property
    def sqlalchemy_url(self) -> str:
        """The async driver URL: DATABASE_URL, else DB_*, else SQLite in DATA_DIR."""
        if self.database_url is not None:
            return _async_driver(self.database_url.get_secret_value())
        if self.db_host:
            from sqlalchemy.engine import URL

            password = self.db_pass.get_secret_value() if self.db_pass else None
            return URL.create(
                "postgresql+asyncpg", self.db_user, password, self.db_host, self.db_port, self.db_name
            ).render_as_string(hide_password=False)
        return f"sqlite+aiosqlite:///{self.data_dir / 'desktop.db'}"

    def secret_values(self) -> list[str]:
        """Every secret's plain value, so log and Sentry scrubbers can mask them."""
        secrets = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr) and len(value.get_secret_value()) >= 6:
                secrets.append(value.get_secret_value())
        return secrets


_SERVER_NAME = re.compile(r"[a-z0-9_-]{1,32}")


def mcp_connections(raw: str) -> dict[str, dict[str, Any]]:
    """MCP_SERVERS read: names as in role files, each with a stdio or streamable_http transport."""
    try:
        servers = json.loads(raw) if raw.strip() else {}
    except ValueError:
        raise ValueError("expected JSON: {\"NAME\": {\"transport\": \"stdio\", ...}}") from None
    if not isinstance(servers, dict):
        raise ValueError("expected a JSON object of server names")
    for name, connection in servers.items():
        if not _SERVER_NAME.fullmatch(name):
            raise ValueError(f"server name {name[:40]!r}: use a-z, 0-9, _ or -, at most 32")
        transport = connection.get("transport") if isinstance(connection, dict) else None
        needs = {"stdio": "command", "streamable_http": "url"}.get(str(transport))
        if needs is None or not connection.get(needs):
            raise ValueError(
                f"server {name!r}: needs transport stdio (with command) or streamable_http (with url)"
            )
    return servers


def _async_driver(url: str) -> str:
    if url.startswith(("postgres://", "postgresql://")):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    if url.startswith("sqlite://") and not url.startswith("sqlite+aiosqlite://"):
        return "sqlite+aiosqlite://" + url.split("://", 1)[1]
    return url


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment; a bad value raises ConfigError with one line naming it."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]).upper() if first["loc"] else "configuration"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{field}: {message}") from None
