"""The schema: users, sessions, messages, the usage ledger, memories, traces, the update inbox."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from storage import crypto

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on both databases (SQLite drops the offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime: use timezone-aware UTC values")
        return value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value


class EncryptedText(TypeDecorator[str]):
    """Text the user authored: stored only as a Fernet token, decrypted on read."""

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> bytes | None:
        return None if value is None else crypto.current().encrypt(value)

    def process_result_value(self, value: bytes | None, dialect: Dialect) -> str | None:
        return None if value is None else crypto.current().decrypt(bytes(value))


class EncryptedBytes(TypeDecorator[bytes]):
    """Binary derived from user text (embeddings): encrypted like the text itself."""

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value: bytes | None, dialect: Dialect) -> bytes | None:
        return None if value is None else crypto.current().encrypt_bytes(value)

    def process_result_value(self, value: bytes | None, dialect: Dialect) -> bytes | None:
        return None if value is None else crypto.current().decrypt_bytes(bytes(value))


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    language: Mapped[str] = mapped_column(String(16), default="en")
    role: Mapped[str | None] = mapped_column(String(64))
    instructions: Mapped[str | None] = mapped_column(EncryptedText)
    # The user's own say: their private memory and instructions may shape their answers in groups.
    private_data_in_groups: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=false()
    )
    # An IANA name ("Europe/Berlin"): the times a user says ("tomorrow at 9") are read in it.
    timezone: Mapped[str | None] = mapped_column(String(64))
    # Set by an operator (ADMIN_USER_IDS); NULL: DAILY_TOKEN_LIMIT.
    daily_limit: Mapped[int | None] = mapped_column(BigInteger)
    # The UTC day the user was last told they had used most of their allowance (once a day).
    warned_on: Mapped[dt.date | None] = mapped_column(Date)
    # Answers draw only on memories made in the role answering (else every role's).
    memory_per_role: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class ChatSession(Base):
    __tablename__ = "chat_sessions"
    __table_args__ = (
        # At most one open session per user and chat, even when two updates race.
        Index(
            "uq_open_session",
            "user_id",
            "chat_id",
            unique=True,
            sqlite_where=text("status = 'open'"),
            postgresql_where=text("status = 'open'"),
        ),
        Index("ix_sessions_user_started", "user_id", "started_at"),
        Index("ix_sessions_status_activity", "status", "last_activity_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id", ondelete="CASCADE"))
    chat_id: Mapped[int] = mapped_column(BigInteger)
    title: Mapped[str | None] = mapped_column(EncryptedText)
    role: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="open")
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_activity_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    end_reason: Mapped[str | None] = mapped_column(String(16))
    summary: Mapped[str | None] = mapped_column(EncryptedText)
    # status "summary_due": closed for the user, its memory still to be made (no room in the
    # day's allowance, or the provider failed); retried from summary_due_at (ops/jobs.py).
    summary_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    summary_due_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # Incognito: its messages are stored without their text (the conversation lives in the
    # answering process only), it is never summarised or remembered, and it is deleted when
    # it ends; its tokens still count against the day's allowance.
    incognito: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_session", "session_id", "id"),
        Index("ix_messages_user_status", "user_id", "status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    session_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("chat_sessions.id", ondelete="CASCADE")
    )
    user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id", ondelete="CASCADE"))
    chat_id: Mapped[int] = mapped_column(BigInteger)
    role: Mapped[str] = mapped_column(String(16))  # "user" | "assistant"
    text: Mapped[str] = mapped_column(EncryptedText)
    # user rows: pending -> answered | refused | failed; assistant rows: complete | partial
    status: Mapped[str] = mapped_column(String(16))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    # Telegram's update id: unique, so a redelivered update cannot be stored twice.
    update_id: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    reply_to: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # An answer's: the memory units its prompt drew on, as a JSON list of ids (no text).
    memory_ids: Mapped[str | None] = mapped_column(Text)


class UsageDay(Base):
    __tablename__ = "usage_days"

    user_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    used: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved: Mapped[int] = mapped_column(BigInteger, default=0)


class Reservation(Base):
    __tablename__ = "reservations"
    __table_args__ = (Index("ix_reservations_expires", "expires_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id", ondelete="CASCADE"))
    day: Mapped[dt.date] = mapped_column(Date)
    amount: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class MemoryRecord(Base):
    __tablename__ = "memories"
    __table_args__ = (Index("ix_memories_user", "user_id"),)

    # memory_id(): a retried write of the same unit replaces it, never duplicates it.
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id", ondelete="CASCADE"))
    session_id: Mapped[int | None] = mapped_column(BigInteger)
    # The group chat the memory was made in; NULL: the user's private chat.
    chat_id: Mapped[int | None] = mapped_column(BigInteger)
    title: Mapped[str | None] = mapped_column(EncryptedText)
    text: Mapped[str] = mapped_column(EncryptedText)
    role: Mapped[str | None] = mapped_column(String(64))
    embedding: Mapped[bytes | None] = mapped_column(EncryptedBytes)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(16), default="summary", server_default="summary")
    seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The embedder's space (memory/embedders.py); NULL: stored before spaces were recorded.
    space: Mapped[str | None] = mapped_column(String(96))


class Trace(Base):
    __tablename__ = "traces"
    __table_args__ = (
        Index("ix_traces_started", "started_at"),
        Index("ix_traces_user", "user_id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id", ondelete="CASCADE"))
    session_id: Mapped[int | None] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))  # "turn" | "summarise"
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    duration_ms: Mapped[float] = mapped_column(Float)
    outcome: Mapped[str] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(String(128))
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    # Error class names and node timings only: never message text.
    error: Mapped[str | None] = mapped_column(String(300))
    nodes: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)


class InboxUpdate(Base):
    """Every Telegram update, stored before Telegram is told it arrived: a durable inbox.

    The row outlives processing (without its payload) so a redelivered update id is recognised.
    """

    __tablename__ = "inbox"
    __table_args__ = (
        Index("ix_inbox_state_received", "state", "received_at"),
        Index("ix_inbox_user", "user_id"),
    )

    update_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int | None] = mapped_column(BigInteger)
    chat_id: Mapped[int | None] = mapped_column(BigInteger)
    # The raw update (it holds the user's text) until it has been processed, then NULL.
    payload: Mapped[str | None] = mapped_column(EncryptedText)
    state: Mapped[str] = mapped_column(String(8), default="new")  # new | done
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Reminder(Base):
    """Something to tell a user at a time: made by the assistant's tool, sent by the scheduler."""

    __tablename__ = "reminders"
    __table_args__ = (
        Index("ix_reminders_due", "status", "due_at"),
        Index("ix_reminders_user", "user_id", "status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id", ondelete="CASCADE"))
    chat_id: Mapped[int] = mapped_column(BigInteger)  # where it was asked for, and is sent
    text: Mapped[str] = mapped_column(EncryptedText)
    due_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    # pending -> sending (claimed by one process) -> sent; or cancelled by the user.
    status: Mapped[str] = mapped_column(String(16), default="pending")
    claimed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class MemoryOutbox(Base):
    """Memory writes the vector store refused, kept (encrypted) until a retry lands them."""

    __tablename__ = "memory_outbox"
    __table_args__ = (
        Index("ix_memory_outbox_due", "next_attempt_at"),
        Index("ix_memory_outbox_user", "user_id"),
        Index("ix_memory_outbox_memory", "memory_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id", ondelete="CASCADE"))
    memory_id: Mapped[str] = mapped_column(String(128))
    # JSON: the MemoryItem and its vector, so a retry needs no second embedding call.
    payload: Mapped[str] = mapped_column(EncryptedText)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(100))  # an exception class name only
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


# Computed after every model is defined: key rotation (storage/rotation.py) walks it.
ENCRYPTED_COLUMNS: tuple[tuple[type[Base], str], ...] = tuple(
    (mapper.class_, column.key)
    for mapper in Base.registry.mappers
    for column in mapper.columns
    if isinstance(column.type, (EncryptedText, EncryptedBytes))
)
