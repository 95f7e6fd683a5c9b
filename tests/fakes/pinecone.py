"""A fake Pinecone data plane speaking the REST API of the pinecone 7.3 clients (sync and asyncio).

Point a client at it with ``Pinecone(api_key="x").Index(host=fake.host)`` or
``IndexAsyncio(host=fake.host)``. It runs in its own thread and event loop
(``FakePinecone().start_in_thread()`` / ``.stop()``, or ``with FakePinecone() as fake``),
so a sync client called from a test's event loop cannot deadlock it.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.fakes.threaded import ThreadedServer

OPS = frozenset({"upsert", "query", "delete", "stats", "fetch", "list", "update", "describe_index"})
MAX_METADATA_BYTES = 40 * 1024  # Pinecone's per-record metadata limit
MAX_UPSERT_BATCH = 1000
MAX_ID_LENGTH = 512
# Status -> the gRPC-style code Pinecone puts in its error bodies.
_GRPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 429: 8, 500: 13, 503: 14}

Vector = dict[str, Any]  # {"id", "values", "metadata"?, "sparseValues"?}


@dataclass(frozen=True)
class Request:
    """One request as the fake received it."""

    op: str
    method: str
    path: str
    query: dict[str, list[str]]
    json: Any
    headers: dict[str, str]
    at: float


@dataclass
class _Fault:
    status: int
    delay: float
    message: str


class PineconeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> web.Response:
    return web.json_response(
        {"code": _GRPC_CODES.get(status, 2), "message": message, "details": []}, status=status
    )


# --------------------------------------------------------------------- metadata filters


def _compare(op: str, have: Any, want: Any) -> bool:
    if op in ("$gt", "$gte", "$lt", "$lte"):
        if isinstance(have, bool) or not isinstance(have, (int, float)):
            return False
        if isinstance(want, bool) or not isinstance(want, (int, float)):
            raise PineconeError(400, f"{op} requires a number")
        return {
            "$gt": have > want, "$gte": have >= want, "$lt": have < want, "$lte": have <= want
        }[op]
    raise PineconeError(400, f"unknown operator {op}")


def _field_matches(metadata: dict[str, Any], field: str, condition: Any) -> bool:
    if not isinstance(condition, dict):
        condition = {"$eq": condition}  # a bare value means equality
    present = field in metadata
    have = metadata.get(field)
    # A list-of-strings field matches $eq / $in when any element does.
    values = have if isinstance(have, list) else [have]
    for op, want in condition.items():
        if op == "$eq":
            ok = present and any(_same(v, want) for v in values)
        elif op == "$ne":
            ok = not present or not any(_same(v, want) for v in values)
        elif op == "$in":
            if not isinstance(want, list):
                raise PineconeError(400, "$in requires an array")
            ok = present and any(_same(v, w) for v in values for w in want)
        elif op == "$nin":
            if not isinstance(want, list):
                raise PineconeError(400, "$nin requires an array")
            ok = not present or not any(_same(v, w) for v in values for w in want)
        elif op == "$exists":
            if not isinstance(want, bool):
                raise PineconeError(400, "$exists requires a boolean")
            ok = present == want
        else:
            ok = present and _compare(op, have, want)
        if not ok:
            return False
    return True


def _same(have: Any, want: Any) -> bool:
    if isinstance(have, bool) or isinstance(want, bool):
        return isinstance(have, bool) and isinstance(want, bool) and have == want
    return have == want


def matches_filter(metadata: dict[str, Any] | None, flt: dict[str, Any] | None) -> bool:
    """Pinecone's metadata filter language: $eq $ne $gt $gte $lt $lte $in $nin $exists $and $or."""
    if not flt:
        return True
    metadata = metadata or {}
    for key, condition in flt.items():
        if key == "$and":
            if not isinstance(condition, list):
                raise PineconeError(400, "$and requires an array")
            if not all(matches_filter(metadata, sub) for sub in condition):
                return False
        elif key == "$or":
            if not isinstance(condition, list):
                raise PineconeError(400, "$or requires an array")
            if not any(matches_filter(metadata, sub) for sub in condition):
                return False
        elif key.startswith("$"):
            raise PineconeError(400, f"unknown top-level operator {key}")
        elif not _field_matches(metadata, key, condition):
            return False
    return True


def _validate_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise PineconeError(400, "metadata must be an object")
    for key, value in metadata.items():
        if isinstance(value, list):
            if not all(isinstance(v, str) for v in value):
                raise PineconeError(400, f"metadata list field {key!r} must hold strings only")
        elif value is None or not isinstance(value, (str, int, float, bool)):
            raise PineconeError(
                400,
                f"Metadata value must be a string, number, boolean or list of strings, "
                f"got '{json.dumps(value)}' for field '{key}'",
            )
    size = len(json.dumps(metadata).encode())
    if size > MAX_METADATA_BYTES:
        raise PineconeError(400, f"Metadata size is {size} bytes, which exceeds the limit")


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=False))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return 0.0 if na == 0 or nb == 0 else dot / (na * nb)


# --------------------------------------------------------------------- the server


class FakePinecone(ThreadedServer):
    """Fake Pinecone index (data plane) on 127.0.0.1:<random port>, cosine metric.

    ``dimension`` None: the first upsert fixes it, as creating the index would have.
    ``missing_namespace_404``: deleting in a namespace that holds nothing answers 404
    "Namespace not found", as serverless indexes do.
    ``index_name``: the name ``GET /indexes/<name>`` (control plane) describes, with this
    server as the index host.
    """

    def __init__(
        self, *, dimension: int | None = None, metric: str = "cosine",
        api_key: str | None = None, missing_namespace_404: bool = True,
        index_name: str = "desktop-memory",
    ) -> None:
        super().__init__()
        if metric not in ("cosine", "dotproduct"):
            raise ValueError("metric must be cosine or dotproduct")
        self.dimension = dimension
        self.metric = metric
        self.api_key = api_key
        self.missing_namespace_404 = missing_namespace_404
        self.index_name = index_name
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, Vector]] = {}
        self._requests: list[Request] = []
        self._faults: dict[str, deque[_Fault]] = {}

    def start_in_thread(self, timeout: float = 5.0) -> FakePinecone:
        super().start_in_thread(timeout)
        return self

    def __enter__(self) -> FakePinecone:
        return self.start_in_thread()

    # ------------------------------------------------------------- test helpers

    def namespaces(self) -> dict[str, dict[str, Vector]]:
        """A deep copy of the index: namespace -> id -> {"id", "values", "metadata"}."""
        with self._lock:
            return copy.deepcopy(self._data)

    def vector_count(self, namespace: str | None = None) -> int:
        with self._lock:
            if namespace is not None:
                return len(self._data.get(namespace, {}))
            return sum(len(v) for v in self._data.values())

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def requests_for(self, op: str) -> list[Request]:
        return [r for r in self.requests if r.op == op]

    def fail_next(
        self, op: str, status: int = 500, times: int = 1, *, delay: float = 0.0,
        message: str | None = None,
    ) -> None:
        """The next `times` requests of `op` wait `delay` seconds, then answer `status`."""
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; expected one of {sorted(OPS)}")
        fault = _Fault(status, delay, message or {500: "Internal error"}.get(status, "fault"))
        with self._lock:
            queue = self._faults.setdefault(op, deque())
            queue.extend(fault for _ in range(times))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def reset(self) -> None:
        with self._lock:
            self._data.clear()
            self._requests.clear()
            self._faults.clear()

    # ----------------------------------------------------------------- routing

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        routes = [
            ("POST", "/vectors/upsert", "upsert", self._upsert),
            ("POST", "/query", "query", self._query),
            ("POST", "/vectors/delete", "delete", self._delete),
            ("DELETE", "/vectors/delete", "delete", self._delete),
            ("POST", "/describe_index_stats", "stats", self._stats),
            ("GET", "/describe_index_stats", "stats", self._stats),
            ("GET", "/vectors/fetch", "fetch", self._fetch),
            ("GET", "/vectors/list", "list", self._list),
            ("POST", "/vectors/update", "update", self._update),
        ]
        for method, path, op, handler in routes:
            app.router.add_route(method, path, self._wrap(op, handler))
        # The one control-plane call a data-plane user needs: describe_index, to find the host.
        app.router.add_get("/indexes/{name}", self._wrap("describe_index", self._describe_index))
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    def _wrap(self, op: str, handler: Any) -> Any:
        async def run(request: web.Request) -> web.StreamResponse:
            raw = await request.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                return _error(400, "malformed JSON body")
            query: dict[str, list[str]] = {}
            for key, value in request.query.items():
                query.setdefault(key, []).append(value)
            with self._lock:
                self._requests.append(Request(
                    op, request.method, request.path, query, body, dict(request.headers),
                    time.monotonic(),
                ))
            if "Api-Key" not in request.headers:
                return _error(401, "Unauthorized: API key is missing")
            if self.api_key is not None and request.headers["Api-Key"] != self.api_key:
                return _error(401, "Unauthorized: invalid API key")
            with self._lock:
                faults = self._faults.get(op)
                fault = faults.popleft() if faults else None
            if fault is not None:
                if fault.delay:
                    await asyncio.sleep(fault.delay)
                return _error(fault.status, fault.message)
            if op == "describe_index":
                query = {"name": [request.match_info["name"]]}
            try:
                with self._lock:
                    result = handler(body if isinstance(body, dict) else {}, query)
            except PineconeError as exc:
                return _error(exc.status, exc.message)
            return web.json_response(result)

        return run

    async def _not_found(self, request: web.Request) -> web.Response:
        return _error(404, f"Not found: {request.method} {request.path}")

    # ----------------------------------------------------------------- operations
    # Each runs under self._lock; bodies are the camelCase JSON the clients send.

    def _check_vector(self, values: Any, what: str) -> list[float]:
        if not isinstance(values, list) or not values:
            raise PineconeError(400, f"{what} must be a non-empty array of numbers")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values):
            raise PineconeError(400, f"{what} must hold numbers only")
        if self.dimension is not None and len(values) != self.dimension:
            raise PineconeError(
                400,
                f"Vector dimension {len(values)} does not match the dimension of the index "
                f"{self.dimension}",
            )
        return [float(x) for x in values]

    def _upsert(self, body: dict[str, Any], _query: dict[str, list[str]]) -> dict[str, Any]:
        vectors = body.get("vectors")
        if not isinstance(vectors, list) or not vectors:
            raise PineconeError(400, "vectors must be a non-empty array")
        if len(vectors) > MAX_UPSERT_BATCH:
            raise PineconeError(400, f"at most {MAX_UPSERT_BATCH} vectors per upsert")
        namespace = str(body.get("namespace", ""))
        prepared: list[Vector] = []
        for vector in vectors:
            vid = vector.get("id") if isinstance(vector, dict) else None
            if not isinstance(vid, str) or not vid or len(vid) > MAX_ID_LENGTH:
                raise PineconeError(400, "every vector needs a string id of 1-512 characters")
            if self.dimension is None:
                self.dimension = len(vector.get("values") or [])
            values = self._check_vector(vector.get("values"), "values")
            _validate_metadata(vector.get("metadata"))
            stored: Vector = {"id": vid, "values": values}
            if vector.get("metadata"):
                stored["metadata"] = copy.deepcopy(vector["metadata"])
            if vector.get("sparseValues"):
                stored["sparseValues"] = copy.deepcopy(vector["sparseValues"])
            prepared.append(stored)
        space = self._data.setdefault(namespace, {})
        for stored in prepared:  # all or nothing: validation ran first
            space[stored["id"]] = stored
        return {"upsertedCount": len(prepared)}

    def _query(self, body: dict[str, Any], _query: dict[str, list[str]]) -> dict[str, Any]:
        top_k = body.get("topK")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= 10_000:
            raise PineconeError(400, "topK must be an integer between 1 and 10000")
        namespace = str(body.get("namespace", ""))
        space = self._data.get(namespace, {})
        if ("vector" in body) == ("id" in body):
            raise PineconeError(400, "exactly one of vector or id is required")
        if "id" in body:
            found = space.get(str(body["id"]))
            if found is None:
                return {"matches": [], "namespace": namespace, "usage": {"readUnits": 1}}
            vector = found["values"]
        else:
            vector = self._check_vector(body.get("vector"), "vector")
        flt = body.get("filter")
        scored = []
        for stored in space.values():
            if not matches_filter(stored.get("metadata"), flt):
                continue
            if self.metric == "cosine":
                score = _cosine(vector, stored["values"])
            else:
                score = sum(x * y for x, y in zip(vector, stored["values"], strict=False))
            scored.append((score, stored))
        scored.sort(key=lambda pair: (-pair[0], pair[1]["id"]))
        include_values = bool(body.get("includeValues"))
        include_metadata = bool(body.get("includeMetadata"))
        matches = []
        for score, stored in scored[:top_k]:
            match: dict[str, Any] = {
                "id": stored["id"], "score": score,
                "values": list(stored["values"]) if include_values else [],
            }
            if include_metadata and stored.get("metadata"):
                match["metadata"] = copy.deepcopy(stored["metadata"])
            matches.append(match)
        return {"matches": matches, "namespace": namespace, "usage": {"readUnits": 1}}

    def _delete(self, body: dict[str, Any], query: dict[str, list[str]]) -> dict[str, Any]:
        if not body and query:  # the DELETE form carries its arguments in the query string
            body = {
                "ids": query.get("ids"),
                "deleteAll": query.get("deleteAll", ["false"])[0].lower() == "true",
                "namespace": query.get("namespace", [""])[0],
            }
        namespace = str(body.get("namespace") or "")
        ids, delete_all, flt = body.get("ids"), body.get("deleteAll"), body.get("filter")
        chosen = [x for x in (bool(ids), bool(delete_all), bool(flt)) if x]
        if len(chosen) != 1:
            raise PineconeError(400, "exactly one of ids, deleteAll or filter is required")
        space = self._data.get(namespace)
        if not space:
            if self.missing_namespace_404:
                raise PineconeError(404, "Namespace not found")
            return {}
        if delete_all:
            space.clear()
        elif ids:
            for vid in ids:
                space.pop(str(vid), None)
        else:
            for vid in [k for k, v in space.items() if matches_filter(v.get("metadata"), flt)]:
                del space[vid]
        if not space:
            del self._data[namespace]  # an emptied namespace disappears from the stats
        return {}

    def _stats(self, body: dict[str, Any], _query: dict[str, list[str]]) -> dict[str, Any]:
        flt = body.get("filter")
        namespaces = {}
        for name, space in self._data.items():
            count = sum(1 for v in space.values() if matches_filter(v.get("metadata"), flt))
            if count:
                namespaces[name] = {"vectorCount": count}
        return {
            "namespaces": namespaces,
            "dimension": self.dimension or 0,
            "indexFullness": 0.0,
            "totalVectorCount": sum(n["vectorCount"] for n in namespaces.values()),
            "metric": self.metric,
            "vectorType": "dense",
        }

    def _fetch(self, _body: dict[str, Any], query: dict[str, list[str]]) -> dict[str, Any]:
        ids = query.get("ids") or []
        if not ids:
            raise PineconeError(400, "ids are required")
        namespace = query.get("namespace", [""])[0]
        space = self._data.get(namespace, {})
        vectors = {vid: copy.deepcopy(space[vid]) for vid in ids if vid in space}
        return {"vectors": vectors, "namespace": namespace, "usage": {"readUnits": 1}}

    def _list(self, _body: dict[str, Any], query: dict[str, list[str]]) -> dict[str, Any]:
        namespace = query.get("namespace", [""])[0]
        prefix = query.get("prefix", [""])[0]
        try:
            limit = int(query.get("limit", ["100"])[0])
        except ValueError:
            raise PineconeError(400, "limit must be an integer") from None
        if limit < 1:
            raise PineconeError(400, "limit must be positive")
        ids = sorted(vid for vid in self._data.get(namespace, {}) if vid.startswith(prefix))
        token = query.get("paginationToken", [None])[0]
        if token:
            try:
                after = base64.urlsafe_b64decode(token.encode()).decode()
            except ValueError:
                raise PineconeError(400, "invalid paginationToken") from None
            ids = [vid for vid in ids if vid > after]
        page = ids[:limit]
        result: dict[str, Any] = {
            "vectors": [{"id": vid} for vid in page],
            "namespace": namespace,
            "usage": {"readUnits": 1},
        }
        if len(ids) > limit:
            result["pagination"] = {"next": base64.urlsafe_b64encode(page[-1].encode()).decode()}
        return result

    def _describe_index(self, _body: dict[str, Any], query: dict[str, list[str]]) -> dict[str, Any]:
        if query["name"][0] != self.index_name:
            raise PineconeError(404, f"Resource {query['name'][0]} not found")
        return {
            "name": self.index_name, "dimension": self.dimension or 1536, "metric": self.metric,
            "host": self.host, "vector_type": "dense", "deletion_protection": "disabled",
            "spec": {"serverless": {"cloud": "aws", "region": "us-east-1"}},
            "status": {"ready": True, "state": "Ready"}, "tags": None,
        }

    def _update(self, body: dict[str, Any], _query: dict[str, list[str]]) -> dict[str, Any]:
        namespace = str(body.get("namespace", ""))
        stored = self._data.get(namespace, {}).get(str(body.get("id")))
        if stored is None:
            raise PineconeError(404, "Vector not found")
        if body.get("values"):
            stored["values"] = self._check_vector(body["values"], "values")
        if body.get("setMetadata"):
            merged = {**stored.get("metadata", {}), **body["setMetadata"]}
            _validate_metadata(merged)
            stored["metadata"] = merged
        return {}
