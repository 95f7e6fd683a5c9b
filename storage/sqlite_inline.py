"""SQLite on the event loop's own thread: the aiosqlite interface SQLAlchemy drives, without the thread.

Why: aiosqlite hands every call to a worker thread and back, so one statement costs 3-4 thread
hops and loop wake-ups, far more CPU than the statement itself (bench/README.md, "Speed tricks").
A statement on a local WAL database takes microseconds, so it is cheaper to run it where the
coroutine already runs. Two things could still stall the loop, and neither happens here:

- Lock waits. The connections have no busy timeout: a write lock held by another connection
  fails the statement at once with SQLITE_BUSY, and it is retried after an asyncio sleep, so
  the holder gets the loop and can commit. This is what SQLite's busy handler does on a thread,
  for the same cases (SQLITE_BUSY_SNAPSHOT is never retried, by either).
- fsync. With WAL and synchronous=NORMAL a commit does not sync; only checkpoints do, and the
  connections here never run one: a `Checkpointer` thread per database file does.

SQLAlchemy uses it through `create_async_engine(..., async_creator=...)` (storage/db.py).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Literal, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
# None: autocommit (SQLAlchemy's AUTOCOMMIT); otherwise how an implicit BEGIN begins.
IsolationLevel = Literal["DEFERRED", "EXCLUSIVE", "IMMEDIATE"] | None

SQLITE_BUSY = 5
SQLITE_BUSY_SNAPSHOT = 517  # the snapshot is stale: only a new transaction helps, not waiting
FIRST_BACKOFF = 0.0005
MAX_BACKOFF = 0.02
CHECKPOINT_EVERY_SECONDS = 1.0


def _retryable(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == SQLITE_BUSY and code != SQLITE_BUSY_SNAPSHOT


async def _until_unlocked(call: Callable[[], T], busy_timeout: float) -> T:
    """call(), retried while another connection holds the lock, for up to busy_timeout seconds."""
    try:
        return call()
    except sqlite3.OperationalError as exc:
        if not _retryable(exc):
            raise
    deadline = time.monotonic() + busy_timeout
    backoff = FIRST_BACKOFF
    while True:
        await asyncio.sleep(backoff)
        try:
            return call()
        except sqlite3.OperationalError as exc:
            if not _retryable(exc) or time.monotonic() >= deadline:
                raise
        backoff = min(backoff * 2, MAX_BACKOFF)


class _Immediate:
    """What aiosqlite's `connection.cursor()` returns: awaitable, and an async context manager."""

    def __init__(self, value: Any) -> None:
        self._value = value

    def __await__(self) -> Any:
        return self._value
        yield  # pragma: no cover - makes this a generator: awaiting it never suspends

    async def __aenter__(self) -> Any:
        return self._value

    async def __aexit__(self, *exc: object) -> None:
        await self._value.close()


class Cursor:
    def __init__(self, connection: Connection, cursor: sqlite3.Cursor) -> None:
        self._connection = connection
        self._cursor = cursor

    async def execute(self, sql: str, parameters: Any = ()) -> Cursor:
        await _until_unlocked(lambda: self._cursor.execute(sql, parameters), self._connection.busy_timeout)
        return self

    async def executemany(self, sql: str, parameters: Iterable[Any]) -> Cursor:
        rows = list(parameters)  # a generator cannot be replayed by a retry
        await _until_unlocked(lambda: self._cursor.executemany(sql, rows), self._connection.busy_timeout)
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(size if size is not None else self._cursor.arraysize)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value


class _RunNow:
    """Stands in for aiosqlite's request queue (`_tx`), which SQLAlchemy uses to set the
    isolation level: the request is carried out at once, on this thread."""

    @staticmethod
    def put_nowait(item: tuple[asyncio.Future[Any], Callable[[], Any]]) -> None:
        future, function = item
        try:
            future.set_result(function())
        except Exception as exc:
            future.set_exception(exc)


class Connection:
    """One sqlite3 connection used from the event loop's thread; the aiosqlite.Connection subset
    SQLAlchemy's aiosqlite dialect calls."""

    _tx = _RunNow()

    def __init__(self, connection: sqlite3.Connection, busy_timeout: float,
                 checkpointer: Checkpointer | None) -> None:
        self._connection: sqlite3.Connection | None = connection
        self.busy_timeout = busy_timeout
        self._checkpointer = checkpointer

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._connection is None:
            raise ValueError("no active connection")
        return self._connection

    def cursor(self) -> _Immediate:
        return _Immediate(Cursor(self, self._conn.cursor()))

    async def execute(self, sql: str, parameters: Any = ()) -> Cursor:
        return await Cursor(self, self._conn.cursor()).execute(sql, parameters)

    async def commit(self) -> None:
        await _until_unlocked(self._conn.commit, self.busy_timeout)

    async def rollback(self) -> None:
        self._conn.rollback()

    async def create_function(self, name: str, num_params: int, func: Callable[..., Any],
                              deterministic: bool = False) -> None:
        self._conn.create_function(name, num_params, func, deterministic=deterministic)

    async def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        connection.close()
        if self._checkpointer is not None:
            self._checkpointer.release()

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    @property
    def isolation_level(self) -> IsolationLevel:
        return self._conn.isolation_level

    @isolation_level.setter
    def isolation_level(self, value: IsolationLevel) -> None:
        self._conn.isolation_level = value


class Checkpointer:
    """Copies a database's WAL into it from a thread of its own, once a second while in use.

    A checkpoint syncs the files to disk; on the loop's thread that would stall every chat.
    """

    _running: ClassVar[dict[str, Checkpointer]] = {}
    _guard = threading.Lock()

    def __init__(self, path: str) -> None:
        self.path = path
        self.users = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)

    @classmethod
    def acquire(cls, path: str) -> Checkpointer:
        with cls._guard:
            checkpointer = cls._running.get(path)
            if checkpointer is None:
                checkpointer = cls._running[path] = Checkpointer(path)
                checkpointer._thread.start()
            checkpointer.users += 1
            return checkpointer

    def release(self) -> None:
        with self._guard:
            self.users -= 1
            if self.users > 0:
                return
            del self._running[self.path]
        self._stop.set()  # the last connection to close checkpoints the rest itself

    def _run(self) -> None:
        connection = sqlite3.connect(self.path, timeout=5, check_same_thread=False)
        try:
            while not self._stop.wait(CHECKPOINT_EVERY_SECONDS):
                try:
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # a busy database: the next round catches up
                    log.debug("checkpoint skipped: %s", type(exc).__name__)
        finally:
            connection.close()


async def connect(path: str, *, busy_timeout: float = 30.0) -> Connection:
    """A connection whose statements run on the calling (event loop) thread."""
    in_memory = path == ":memory:" or path.startswith("file::memory:")
    # timeout=0 is SQLite's busy timeout: a held lock fails at once, and _until_unlocked waits.
    connection = sqlite3.connect(path, timeout=0, check_same_thread=False, isolation_level="DEFERRED")
    if in_memory:
        return Connection(connection, busy_timeout, None)
    try:
        connection.execute("PRAGMA wal_autocheckpoint=0")
    except BaseException:
        connection.close()
        raise
    return Connection(connection, busy_timeout, Checkpointer.acquire(path))
