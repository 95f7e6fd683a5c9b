"""SQLite on the event loop's thread (storage/sqlite_inline.py).

Lock waits and checkpoints never stall the loop."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from storage import sqlite_inline
from storage.db import create_engine


async def _ticks_during(work: asyncio.Future[object] | asyncio.Task[object]) -> int:
    """How often a 1 ms ticker ran while `work` was in progress: 0 means the loop was blocked."""
    ticks = 0
    while not work.done():
        await asyncio.sleep(0.001)
        ticks += 1
    return ticks


async def test_a_write_waiting_for_the_lock_lets_the_loop_run_and_lands_after_the_commit(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "locks.db")
    holder = await sqlite_inline.connect(path, busy_timeout=10)
    waiter = await sqlite_inline.connect(path, busy_timeout=10)
    await holder.execute("PRAGMA journal_mode=WAL")
    await holder.execute("CREATE TABLE t (v INTEGER)")
    await holder.commit()

    await holder.execute("INSERT INTO t VALUES (1)")  # holds the write lock until commit
    write = asyncio.ensure_future(waiter.execute("INSERT INTO t VALUES (2)"))

    async def commit_later() -> None:
        await asyncio.sleep(0.2)
        await holder.commit()

    started = time.monotonic()
    committer = asyncio.ensure_future(commit_later())
    ticks = await _ticks_during(write)
    await write
    await waiter.commit()
    await committer
    waited = time.monotonic() - started

    assert waited >= 0.2  # it did wait for the holder...
    assert ticks >= 50  # ...without holding the loop (a blocking wait would give ~0 ticks)
    rows = await (await holder.execute("SELECT v FROM t ORDER BY v")).fetchall()
    assert rows == [(1,), (2,)]
    await holder.close()
    await waiter.close()


async def test_a_lock_never_released_fails_the_statement_after_the_busy_timeout(tmp_path: Path) -> None:
    path = str(tmp_path / "stuck.db")
    holder = await sqlite_inline.connect(path, busy_timeout=10)
    waiter = await sqlite_inline.connect(path, busy_timeout=0.3)
    await holder.execute("CREATE TABLE t (v INTEGER)")
    await holder.commit()
    await holder.execute("INSERT INTO t VALUES (1)")

    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        await waiter.execute("INSERT INTO t VALUES (2)")
    assert 0.3 <= time.monotonic() - started < 3
    await holder.rollback()
    await holder.close()
    await waiter.close()


async def test_the_engine_checkpoints_the_wal_off_the_loop(tmp_path: Path) -> None:
    """The connections never checkpoint (it syncs to disk); the Checkpointer thread does."""
    database = tmp_path / "wal.db"
    engine = create_engine(f"sqlite+aiosqlite:///{database}")
    try:
        async with engine.begin() as conn:
            autocheckpoint = (await conn.execute(text("PRAGMA wal_autocheckpoint"))).scalar()
            assert autocheckpoint == 0
            await conn.execute(text("CREATE TABLE blobs (b BLOB)"))
        size_before = database.stat().st_size
        async with engine.begin() as conn:
            for _ in range(64):
                await conn.execute(text("INSERT INTO blobs VALUES (randomblob(16384))"))
        # 1 MB sits in the WAL; the checkpointer copies it into the database file.
        deadline = time.monotonic() + 10
        while database.stat().st_size < size_before + 1_000_000 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert database.stat().st_size >= size_before + 1_000_000
    finally:
        await engine.dispose()


async def test_engine_results_match_the_worker_thread_driver(tmp_path: Path) -> None:
    """Same rows, types and errors through both drivers."""
    outcomes = []
    for on_loop in (True, False):
        url = f"sqlite+aiosqlite:///{tmp_path / f'same-{on_loop}.db'}"
        # The plain aiosqlite engine (its worker thread) as the reference.
        engine = create_engine(url) if on_loop else create_async_engine(url)
        try:
            async with engine.begin() as conn:
                await conn.execute(text("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT, b BLOB)"))
                await conn.execute(text("INSERT INTO t VALUES (1, 'é', x'00ff')"))
            async with engine.connect() as conn:
                rows = (await conn.execute(text("SELECT k, v, b FROM t"))).all()
                try:
                    await conn.execute(text("INSERT INTO t VALUES (1, 'dup', NULL)"))
                    error = None
                except Exception as exc:
                    error = type(exc).__name__
            outcomes.append(([tuple(r) for r in rows], error))
        finally:
            await engine.dispose()
    assert outcomes[0] == outcomes[1] == ([(1, "é", b"\x00\xff")], "IntegrityError")
