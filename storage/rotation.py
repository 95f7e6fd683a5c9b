"""Key rotation: re-encrypt every encrypted column under the newest key."""

from __future__ import annotations

from sqlalchemy import LargeBinary, select, type_coerce, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.inspection import inspect

from storage import crypto
from storage.models import ENCRYPTED_COLUMNS

BATCH = 500


async def rotate_all(sessions: async_sessionmaker[AsyncSession]) -> dict[str, int]:
    """Rewrite each value not already under the newest key; returns rows rewritten per column."""
    cipher = crypto.current()
    rewritten: dict[str, int] = {}
    for model, column_name in ENCRYPTED_COLUMNS:
        (primary_key,) = inspect(model).primary_key
        column = getattr(model, column_name)
        raw = type_coerce(column, LargeBinary)  # the ciphertext itself, bypassing decryption
        count = 0
        last_key = None
        while True:
            async with sessions() as db:
                stmt = select(primary_key, raw).where(column.is_not(None)).order_by(primary_key)
                if last_key is not None:
                    stmt = stmt.where(primary_key > last_key)
                rows = (await db.execute(stmt.limit(BATCH))).all()
                for key, token in rows:
                    if not cipher.is_newest(bytes(token)):
                        await db.execute(
                            update(model)
                            .where(primary_key == key)
                            .values({column_name: type_coerce(cipher.rotate(bytes(token)), LargeBinary)})
                        )
                        count += 1
                await db.commit()
            if len(rows) < BATCH:
                break
            last_key = rows[-1][0]
        rewritten[f"{model.__tablename__}.{column_name}"] = count
    return rewritten


async def check_keys(sessions: async_sessionmaker[AsyncSession]) -> None:
    """Decrypt one stored value per encrypted column: a wrong key fails at start-up, loudly."""
    cipher = crypto.current()
    async with sessions() as db:
        for model, column_name in ENCRYPTED_COLUMNS:
            column = getattr(model, column_name)
            token = await db.scalar(
                select(type_coerce(column, LargeBinary)).where(column.is_not(None)).limit(1)
            )
            if token is not None:
                cipher.decrypt_bytes(bytes(token))
