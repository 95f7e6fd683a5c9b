"""Engine, session maker and start-up migrations for SQLite (default) and PostgreSQL."""

from __future__ import annotations

import ast
import logging
import re
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Any fixed number: every instance takes the same lock, so only one migrates at a time.
MIGRATION_LOCK_ID = 0x6465736B


SQLITE_BUSY_TIMEOUT = 30.0


def create_engine(url: str) -> AsyncEngine:
    """An async engine tuned for the backend: WAL + foreign keys on SQLite, pre-ping on PostgreSQL.

    SQLite statements run on the event loop's thread (storage/sqlite_inline.py explains why).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database or ":memory:"
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        from storage import sqlite_inline

        engine = create_async_engine(url, async_creator=lambda: sqlite_inline.connect(
            path, busy_timeout=SQLITE_BUSY_TIMEOUT
        ))
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_async_engine(url, pool_size=10, max_overflow=20)
    _ping_when_idle(engine)
    return engine


# A PostgreSQL restart leaves dead connections in the pool; a ping at checkout finds them, and
# the pool replaces them instead of failing a message. SQLAlchemy's pool_pre_ping pings at
# every checkout: three round trips (BEGIN, ";", ROLLBACK with asyncpg), and a message checks
# out three connections. A connection back in the pool for less than this was alive a moment
# ago, so only one that sat idle longer is pinged: a busy bot pings almost never.
PING_IF_IDLE_SECONDS = 1.0


def _ping_when_idle(engine: AsyncEngine) -> None:
    pool = engine.sync_engine.pool
    dialect = engine.sync_engine.dialect

    @event.listens_for(pool, "checkin")
    def _returned(dbapi_connection: object, record: Any) -> None:
        record.info["returned_at"] = time.monotonic()

    @event.listens_for(pool, "checkout")
    def _borrowed(dbapi_connection: Any, record: Any, proxy: object) -> None:
        returned = record.info.get("returned_at")
        if returned is None or time.monotonic() - returned < PING_IF_IDLE_SECONDS:
            return  # new, or used a moment ago
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # The pool discards this connection and checks out (or opens) another.
            raise DisconnectionError(f"idle connection failed its ping: {type(exc).__name__}") from exc


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    # Deleted rows are overwritten with zeros, not left in free pages: erasure must not depend
    # on whether this SQLite was built with SQLITE_SECURE_DELETE.
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()


def session_maker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


_SCRIPT_LINE = re.compile(
    r"^(revision|down_revision|branch_labels|depends_on)\s*(?::[^=]*)?=\s*(.+)$", re.MULTILINE
)


@lru_cache(maxsize=1)
def head_revisions() -> frozenset[str] | None:
    """The head revision ids of storage/migrations, read from the scripts without Alembic.

    None when a script is beyond this simple reading (branch labels, dependencies, a value that
    is not a literal): Alembic then decides, as it always may.
    """
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in sorted((MIGRATIONS_DIR / "versions").glob("*.py")):
        fields: dict[str, object] = {}
        for name, value in _SCRIPT_LINE.findall(script.read_text(encoding="utf-8")):
            try:
                fields[name] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                return None
        revision, down = fields.get("revision"), fields.get("down_revision")
        if not isinstance(revision, str) or fields.get("branch_labels") or fields.get("depends_on"):
            return None
        revisions.add(revision)
        if isinstance(down, str):
            parents.add(down)
        elif isinstance(down, (tuple, list)) and all(isinstance(d, str) for d in down):
            parents.update(down)
        elif down is not None:
            return None
    heads = frozenset(revisions - parents)
    return heads or None


def _at_head(connection: Connection) -> bool:
    """True when alembic_version already holds exactly the head revisions: nothing to apply."""
    heads = head_revisions()
    if heads is None or not inspect(connection).has_table("alembic_version"):
        return False
    current = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    return len(current) == len(heads) and set(current) == heads


def _upgrade(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
    # A restart finds the schema current: that check is one query, while importing and running
    # Alembic to find the same costs ~0.1 s of every start-up.
    if _at_head(connection):
        return
    from alembic import command

    command.upgrade(alembic_config(connection), "head")


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision; safe to run from several processes at once."""
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade)
