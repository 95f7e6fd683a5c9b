"""Dense recall in a Pinecone index: one namespace per user, failed writes kept in an outbox.

The units themselves (text, title, vector) live in the SQL memories table, encrypted, as with
the local backend (memory/local.py), which also scores their words. Pinecone holds each unit's
vector with the metadata a filtered query needs (user, chat, kind, dates), never its text.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import numpy as np
from pinecone import Pinecone
from pinecone.config.openapi_config_factory import OpenApiConfigFactory
from pinecone.db_data import IndexAsyncio
from pinecone.exceptions import PineconeException
from pinecone.openapi_support.retry_aiohttp import JitterRetry
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from memory.base import PRIVATE, MemoryHit, MemoryItem, MemoryQuery, MemoryScope
from memory.local import LocalMemory
from storage.models import User, utcnow
from storage.outbox import Outbox
from storage.repositories import Memories

if TYPE_CHECKING:
    from settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

# Why the pinecone client directly and not langchain-pinecone: our vectors are already made
# (ModelGateway owns embeddings and their retries), and we need per-user namespaces, raw
# vectors for migration, list/fetch for export and deleteAll for erasure. The vector-store
# wrapper would embed on its own, hide those calls and build a second client. We use
# IndexAsyncio (aiohttp) so no call blocks the event loop or needs a thread.

NAMESPACE_PREFIX = "user-"
FETCH_BATCH = 100  # ids per fetch: the ids travel in the query string
UPSERT_BATCH = 100
DENSE_CANDIDATES = 50  # nearest units asked of Pinecone per search; the rest score as the last
METADATA_SCHEMA = 2  # 1: summaries with their text in the metadata (read by migrate-memory to-local)


def namespace_for(user_id: int) -> str:
    return f"{NAMESPACE_PREFIX}{user_id}"


class MemoryUnavailable(OSError):
    """Pinecone refused or did not answer. The message names the operation and error class only.

    An OSError, so the message path treats it as degraded memory rather than a failed turn.
    """

    def __init__(self, op: str, cause: BaseException) -> None:
        self.op = op
        self.cause = type(cause).__name__
        self.status: int | None = getattr(cause, "status", None)
        super().__init__(f"pinecone {op} failed: {self.cause}" + (
            f" (HTTP {self.status})" if self.status else ""
        ))

    @property
    def permanent(self) -> bool:
        """A 4xx other than 429: retrying the same request will not help."""
        return self.status is not None and 400 <= self.status < 500 and self.status != 429


@dataclass(frozen=True)
class OutboxRun:
    sent: int
    failed: int


class PineconeMemory:
    """The MemoryStore protocol: dense scores from Pinecone, everything else from the SQL rows.

    Privacy note: Pinecone keeps the vectors and the metadata above as it keeps them, not
    encrypted by us (a vector can be partly inverted); no text leaves the database. Deleting a
    user removes their whole namespace.
    """

    has_outbox = True

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], space: str, *, api_key: str,
        host: str | None = None, index_name: str | None = None, control_host: str | None = None,
        timeout: float = 10.0, attempts: int = 2,
    ) -> None:
        if not host and not index_name:
            raise ValueError("PINECONE_HOST or PINECONE_INDEX is required for Pinecone memory")
        self._sessions = sessions
        self.space = space
        self.rows = LocalMemory(sessions, space)
        self._api_key = api_key
        self._host = host.rstrip("/") if host else None
        self._index_name = index_name
        self._control_host = control_host
        self._timeout = timeout
        self._attempts = max(1, attempts)
        self._client: IndexAsyncio | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, sessions: async_sessionmaker[AsyncSession], space: str
    ) -> PineconeMemory:
        if settings.pinecone_api_key is None:
            raise ValueError("PINECONE_API_KEY is required for Pinecone memory")
        return cls(
            sessions, space, api_key=settings.pinecone_api_key.get_secret_value(),
            host=settings.pinecone_host, index_name=settings.pinecone_index,
            timeout=float(getattr(settings, "pinecone_timeout", 10.0)),
        )

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Resolve the index host now, so a wrong PINECONE_INDEX stops start-up, not a message."""
        await self._index()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._client_loop is asyncio.get_running_loop():
            await client.close()
        self._client_loop = None

    # --- the MemoryStore protocol ---------------------------------------------------------

    async def has_any(self, user_id: int) -> bool:
        return await self.rows.has_any(user_id)

    async def search(
        self, user_id: int, query: MemoryQuery, scope: MemoryScope = PRIVATE
    ) -> list[MemoryHit]:
        """Pinecone's nearest units fused with the words' scores; words alone while it is down."""
        dense: dict[str, float] = {}
        if query.vector is not None:
            try:
                dense = await self._nearest(user_id, query.vector, scope)
            except MemoryUnavailable as exc:
                log.warning("pinecone query failed, lexical recall only: %s", exc)
        return await self.rows.rank(user_id, query, scope, dense=dense)

    async def _nearest(
        self, user_id: int, vector: list[float], scope: MemoryScope
    ) -> dict[str, float]:
        index = await self._index()
        response = await self._call("query", index.query(
            namespace=namespace_for(user_id), vector=_floats(vector), top_k=DENSE_CANDIDATES,
            include_metadata=True, filter=_scope_filter(user_id, scope),
        ))
        nearest = {}
        for match in response.matches or []:
            metadata = dict(match.metadata or {})
            # The filter already holds both; checked again so a filter Pinecone ignored leaks
            # nothing (and rank() draws only on the user's own rows in any case).
            chat, role = _int(metadata.get("chat_id")), metadata.get("role")
            if _int(metadata.get("user_id")) == user_id and scope.admits(chat, role):
                nearest[match.id] = float(match.score or 0.0)
        return nearest

    async def add_many(
        self, items: Sequence[MemoryItem], vectors: Sequence[list[float] | None]
    ) -> None:
        """Store the units in SQL, then their vectors in Pinecone; a vector Pinecone does not
        take now is queued (never lost, never raised)."""
        await self.rows.add_many(items, vectors)
        pairs = [(item, vector) for item, vector in zip(items, vectors, strict=True) if vector]
        try:
            await self.put_many(pairs)
        except MemoryUnavailable as exc:
            for item, vector in pairs:
                await self._enqueue(item, vector, exc)
            return
        for item, _ in pairs:
            await self._after_write(item, outbox_row=None)

    async def forget(self, user_id: int, ids: Sequence[str]) -> int:
        """Gone from the database (so never recalled again) at once; from Pinecone now, or by
        the outbox when Pinecone does not answer."""
        removed = await self.rows.forget(user_id, ids)
        async with self._sessions() as db:
            for memory_id in ids:
                await Outbox(db).discard(memory_id)  # a queued write must not bring it back
            await db.commit()
        try:
            await self._delete_ids(user_id, list(ids))
        except MemoryUnavailable as exc:
            async with self._sessions() as db:
                for memory_id in ids:
                    await Outbox(db).enqueue(
                        user_id=user_id, memory_id=memory_id,
                        payload=json.dumps({"v": 2, "forget": memory_id}), error=exc.cause,
                    )
                await db.commit()
            log.warning("memory deletion queued for retry: %s", exc.cause)
        return removed

    async def _delete_ids(self, user_id: int, ids: list[str]) -> None:
        if not ids:
            return
        index = await self._index()
        try:
            await self._call("delete", index.delete(ids=ids, namespace=namespace_for(user_id)))
        except MemoryUnavailable as exc:
            if exc.status != 404:  # 404: nothing in the namespace to delete
                raise

    async def export_user(self, user_id: int) -> list[dict[str, Any]]:
        """What Pinecone holds beyond the SQL rows (which the SQL export covers): summaries
        stored with their text before units lived in SQL."""
        async with self._sessions() as db:
            in_database = set(await Memories(db).ids_for(user_id))
        return sorted((
            _export_record(vector_id, metadata, store="pinecone")
            for vector_id, metadata, _ in await self._fetch_namespace(user_id, with_values=False)
            if vector_id not in in_database
        ), key=lambda r: (r.get("started_at") or "", r["id"]))

    async def delete_user(self, user_id: int) -> int:
        """Delete the user's units, namespace and queued writes; raises if Pinecone cannot be
        reached (the SQL rows are gone by then; deleting again finishes the job)."""
        async with self._sessions() as db:
            units = set(await Memories(db).ids_for(user_id))
            units |= {row.memory_id for row in await Outbox(db).for_user(user_id)}
            # Queued writes go first: a retry must not re-create what is being deleted.
            await Outbox(db).delete_for(user_id)
            await db.commit()
        await self.rows.delete_user(user_id)
        index = await self._index()
        namespace = namespace_for(user_id)
        units |= set(await self._list_ids(index, namespace))
        # deleteAll even when the listing is empty: Pinecone's list is eventually consistent.
        await self._delete_namespace(index, namespace)
        return len(units)

    # --- beyond the protocol: writes that raise, outbox, migration ------------------------

    async def put_many(self, records: Sequence[tuple[MemoryItem, list[float]]]) -> None:
        """Upsert memories (idempotent by id); raises MemoryUnavailable instead of queueing."""
        if not records:
            return
        index = await self._index()
        by_namespace: dict[str, list[dict[str, Any]]] = {}
        now = utcnow()
        for item, vector in records:
            by_namespace.setdefault(namespace_for(item.user_id), []).append(
                {"id": item.id, "values": _floats(vector), "metadata": _metadata(item, now)}
            )
        for namespace, vectors in by_namespace.items():
            for start in range(0, len(vectors), UPSERT_BATCH):
                await self._call("upsert", index.upsert(
                    vectors=vectors[start:start + UPSERT_BATCH], namespace=namespace,
                    show_progress=False,
                ))

    async def retry_outbox(self, now: dt.datetime | None = None, limit: int = 100) -> OutboxRun:
        """Send queued writes that are due; stops early while Pinecone is down."""
        now = now or utcnow()
        async with self._sessions() as db:
            rows = [(row.id, row.user_id, row.payload) for row in await Outbox(db).due(now, limit)]
        sent = failed = 0
        for row_id, user_id, payload in rows:
            forgotten = json.loads(payload).get("forget")
            try:
                if forgotten:
                    await self._delete_ids(user_id, [forgotten])
                else:
                    item, vector = decode_payload(payload)
                    await self.put_many([(item, vector)])
            except MemoryUnavailable as exc:
                failed += 1
                async with self._sessions() as db:
                    await Outbox(db).failed(row_id, exc.cause, now)
                    await db.commit()
                if not exc.permanent:
                    break  # an outage: the other rows would fail the same way
                continue
            if forgotten:
                async with self._sessions() as db:
                    await Outbox(db).done(row_id)
                    await db.commit()
            else:
                await self._after_write(item, outbox_row=row_id)
            sent += 1
        if sent or failed:
            log.info("memory outbox: %d sent, %d failed", sent, failed)
        return OutboxRun(sent, failed)

    async def user_ids(self) -> list[int]:
        """Users with a namespace in the index (for migration)."""
        index = await self._index()
        stats = await self._call("stats", index.describe_index_stats())
        users = []
        for name in (stats.namespaces or {}):
            suffix = name.removeprefix(NAMESPACE_PREFIX)
            if name.startswith(NAMESPACE_PREFIX) and suffix.lstrip("-").isdigit():
                users.append(int(suffix))
        return sorted(users)

    async def dump_user(self, user_id: int) -> list[tuple[MemoryItem, list[float]]]:
        """The user's summaries stored with their text in Pinecone (metadata schema 1, before
        the units moved to SQL), with their vectors: what migrate-memory to-local brings back."""
        return [
            (_item_from_metadata(user_id, metadata), values)
            for _, metadata, values in await self._fetch_namespace(user_id, with_values=True)
            if metadata.get("text")
        ]

    # --- internals ------------------------------------------------------------------------

    async def _index(self) -> IndexAsyncio:
        loop = asyncio.get_running_loop()
        if self._client is not None and self._client_loop is loop:
            return self._client
        host = await self._resolve_host()
        if self._client is None or self._client_loop is not loop:
            # The client's aiohttp session belongs to the loop that made it.
            self._client = _make_client(self._api_key, host, self._attempts)
            self._client_loop = loop
        return self._client

    async def _resolve_host(self) -> str:
        if self._host:
            return self._host
        name = self._index_name
        assert name is not None

        def describe() -> str:
            control = Pinecone(api_key=self._api_key, host=self._control_host)
            return str(control.describe_index(name).host)

        try:
            host = await asyncio.wait_for(asyncio.to_thread(describe), self._timeout)
        except Exception as exc:
            raise MemoryUnavailable("describe_index", exc) from None
        self._host = host if host.startswith(("http://", "https://")) else f"https://{host}"
        return self._host

    async def _call(self, op: str, call: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(call, self._timeout)
        except (PineconeException, aiohttp.ClientError, TimeoutError, OSError) as exc:
            # The cause is not chained: Pinecone's error bodies may quote the request.
            raise MemoryUnavailable(op, exc) from None

    async def _list_ids(self, index: IndexAsyncio, namespace: str) -> list[str]:
        ids: list[str] = []
        token: str | None = None
        while True:
            page = await self._call("list", index.list_paginated(
                namespace=namespace, limit=100, pagination_token=token
            ))
            ids.extend(v.id for v in page.vectors or [])
            token = page.pagination.next if page.pagination else None
            if not token:
                return ids

    async def _fetch_namespace(
        self, user_id: int, *, with_values: bool
    ) -> list[tuple[str, dict[str, Any], list[float]]]:
        index = await self._index()
        namespace = namespace_for(user_id)
        ids = await self._list_ids(index, namespace)
        found: list[tuple[str, dict[str, Any], list[float]]] = []
        for start in range(0, len(ids), FETCH_BATCH):
            response = await self._call("fetch", index.fetch(
                ids=ids[start:start + FETCH_BATCH], namespace=namespace
            ))
            for vector_id, vector in (response.vectors or {}).items():
                metadata = dict(vector.metadata or {})
                if _int(metadata.get("user_id")) != user_id:
                    continue
                values = [float(x) for x in vector.values] if with_values else []
                found.append((vector_id, metadata, values))
        return found

    async def _delete_namespace(self, index: IndexAsyncio, namespace: str) -> None:
        try:
            await self._call("delete", index.delete(delete_all=True, namespace=namespace))
        except MemoryUnavailable as exc:
            if exc.status != 404:  # 404: the namespace holds nothing (serverless says so)
                raise

    async def _enqueue(self, item: MemoryItem, vector: list[float], exc: MemoryUnavailable) -> None:
        try:
            async with self._sessions() as db:
                await Outbox(db).enqueue(
                    user_id=item.user_id, memory_id=item.id,
                    payload=encode_payload(item, vector), error=exc.cause,
                )
                await db.commit()
        except IntegrityError:
            log.info("memory write dropped: the user was deleted")  # nothing left to remember for
            return
        log.warning("memory write queued for retry: %s", exc.cause)

    async def _after_write(self, item: MemoryItem, outbox_row: int | None) -> None:
        async with self._sessions() as db:
            exists = await db.get(User, item.user_id) is not None
            outbox = Outbox(db)
            if outbox_row is not None:
                await outbox.done(outbox_row)
            elif exists:
                await outbox.discard(item.id)  # older queued copies must not overwrite this one
            await db.commit()
        if not exists:
            # The user was deleted while this write was in flight: take it back.
            index = await self._index()
            try:
                await self._call("delete", index.delete(
                    ids=[item.id], namespace=namespace_for(item.user_id)
                ))
            except MemoryUnavailable as exc:
                if exc.status != 404:
                    raise


def _make_client(api_key: str, host: str, attempts: int) -> IndexAsyncio:
    config = OpenApiConfigFactory.build(api_key=api_key, host=host)
    # The client's default is 5 tries per call; a slow turn is worse than degraded memory,
    # and failed writes have the outbox. So: `attempts` tries, within our own timeout.
    config.retries = JitterRetry(
        attempts=attempts, start_timeout=0.1, max_timeout=1.0,
        statuses={500, 502, 503, 504}, exceptions={aiohttp.ClientError},
    )
    return IndexAsyncio(api_key=api_key, host=host, openapi_config=config)


# --- metadata and payloads ------------------------------------------------------------------


def _metadata(item: MemoryItem, written_at: dt.datetime) -> dict[str, Any]:
    """Pinecone metadata, no text: no nulls allowed, so absent values are left out."""
    metadata: dict[str, Any] = {
        "schema": METADATA_SCHEMA, "kind": item.kind, "user_id": item.user_id,
        "written_at": written_at.isoformat(),
    }
    optional = {
        "session_id": item.session_id, "chat_id": item.chat_id, "role": item.role,
        "started_at": item.started_at.isoformat() if item.started_at else None,
        "ended_at": item.ended_at.isoformat() if item.ended_at else None,
    }
    metadata.update({key: value for key, value in optional.items() if value is not None})
    return metadata


def _item_from_metadata(user_id: int, metadata: dict[str, Any]) -> MemoryItem:
    return MemoryItem(
        user_id=user_id, session_id=_int(metadata.get("session_id")),
        title=metadata.get("title"), text=str(metadata.get("text", "")),
        role=metadata.get("role"), started_at=_parse_dt(metadata.get("started_at")),
        ended_at=_parse_dt(metadata.get("ended_at")), chat_id=_int(metadata.get("chat_id")),
    )


def _scope_filter(user_id: int, scope: MemoryScope) -> dict[str, Any]:
    """The scope as a metadata filter: private memories carry no chat_id (Pinecone has no null)."""
    conditions: list[dict[str, Any]] = [{"user_id": {"$eq": user_id}}]
    if scope.role is not None:
        conditions.append({"role": {"$eq": scope.role}})
    if scope.every_chat:
        return conditions[0] if len(conditions) == 1 else {"$and": conditions}
    allowed: list[dict[str, Any]] = []
    if scope.with_private:
        allowed.append({"chat_id": {"$exists": False}})
    if scope.group_id is not None:
        allowed.append({"chat_id": {"$eq": scope.group_id}})
    return {"$and": [*conditions, {"$or": allowed}]}


def _export_record(vector_id: str, metadata: dict[str, Any], *, store: str) -> dict[str, Any]:
    return {
        "id": vector_id,
        "session_id": _int(metadata.get("session_id")),
        "title": metadata.get("title"),
        "text": metadata.get("text"),
        "role": metadata.get("role"),
        "started_at": metadata.get("started_at"),
        "ended_at": metadata.get("ended_at"),
        "created_at": metadata.get("written_at"),
        "store": store,  # pinecone, or outbox: written by us, not yet accepted by Pinecone
    }


def encode_payload(item: MemoryItem, vector: list[float]) -> str:
    """The outbox payload: what Pinecone's metadata needs of the unit (not its text, which is in
    the memories table) and its vector (float32, base64), as JSON."""
    packed = np.asarray(vector, dtype="<f4").tobytes()
    return json.dumps({
        "v": 2,
        "item": {
            "user_id": item.user_id, "session_id": item.session_id, "kind": item.kind,
            "seq": item.seq, "role": item.role, "chat_id": item.chat_id,
            "started_at": item.started_at.isoformat() if item.started_at else None,
            "ended_at": item.ended_at.isoformat() if item.ended_at else None,
        },
        "vector": base64.b64encode(packed).decode(),
    })


def decode_payload(payload: str) -> tuple[MemoryItem, list[float]]:
    data = json.loads(payload)
    raw = data["item"]
    item = MemoryItem(
        user_id=int(raw["user_id"]), session_id=raw.get("session_id"), title=None, text="",
        role=raw.get("role"), started_at=_parse_dt(raw.get("started_at")),
        ended_at=_parse_dt(raw.get("ended_at")), chat_id=raw.get("chat_id"),
        kind=raw.get("kind", "summary"), seq=int(raw.get("seq", 0)),
    )
    vector = np.frombuffer(base64.b64decode(data["vector"]), dtype="<f4").astype(float).tolist()
    return item, vector


def _floats(vector: Sequence[float]) -> list[float]:
    return [float(x) for x in vector]  # the client rejects ints (and numpy scalars)


def _int(value: Any) -> int | None:
    # Pinecone keeps every number as a float64; ids up to 2**53 come back exact.
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _parse_dt(value: Any) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
