"""Experiments: monkeypatches applied inside the bot process (bench/botproc.py) to price a fix."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

PATCHES: dict[str, tuple[str, Callable[[], None]]] = {}


def patch(name: str, description: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def register(fn: Callable[[], None]) -> Callable[[], None]:
        PATCHES[name] = (description, fn)
        return fn

    return register


def apply(name: str) -> None:
    if name not in PATCHES:
        raise SystemExit(f"unknown bench patch {name!r}; known: {', '.join(PATCHES)}")
    PATCHES[name][1]()


# --------------------------------------------------------------------------- the patches
# Retired once their proposal shipped (git history has them): final_no_pacing_wait,
# pin_response_models, gc_freeze, trace_in_background, direct_openai, async_text_filter,
# typing_after_1s; token_cache (history token counts are stored with the messages now). What shipped is priced the other way round where it matters: a patch that
# restores the old behaviour (gc_default_thresholds, asyncio_loop, pg_steps_in_transactions...).


@patch("no_trace", "skip the trace write entirely (prices its CPU; not a proposal)")
def no_trace() -> None:
    from graph.agent import Agent

    def _save_trace(self: Agent, trace: object) -> None:
        return None

    Agent._save_trace = _save_trace  # type: ignore[method-assign]


@patch("no_typing",
       "no ChatActionSender.typing per message (handlers/chat.py): a sendChatAction request "
       "and a task per message, though a zero-latency answer needs no typing indicator")
def no_typing() -> None:
    import contextlib

    from handlers import chat

    class NoAction:
        @staticmethod
        def typing(**_kwargs: object) -> contextlib.AbstractAsyncContextManager[None]:
            return contextlib.nullcontext()  # type: ignore[return-value]

    chat.ChatActionSender = NoAction  # type: ignore[attr-defined,assignment]


@patch("no_drafts", "no draft previews at all (prices the preview path; not a proposal)")
def no_drafts() -> None:
    from handlers.streaming import AnswerStream

    def add(self: AnswerStream, delta: str) -> None:
        self._text += delta

    AnswerStream.add = add  # type: ignore[method-assign]


@patch("merge_prepare_nodes",
       "one graph node for retrieve_memory + apply_persona + reserve_budget (graph/builder.py): "
       "LangGraph's per-node bookkeeping (tasks, channels, callbacks) is paid 3 times less")
def merge_prepare_nodes() -> None:
    from typing import Any

    from langgraph.graph import END, START, StateGraph

    from graph import agent, nodes
    from graph.context import TurnContext
    from graph.state import TurnState
    from graph.tracing import traced

    steps = [(n, traced(n, getattr(nodes, n)))
             for n in ("retrieve_memory", "apply_persona", "reserve_budget")]

    async def prepare(state: TurnState, runtime: Any) -> dict[str, Any]:
        merged: dict[str, Any] = dict(state)
        update: dict[str, Any] = {}
        for _name, step in steps:
            part = await step(merged, runtime)  # type: ignore[arg-type]
            merged.update(part)
            update.update(part)
        return update

    def build_turn_graph() -> StateGraph:
        graph = StateGraph(TurnState, context_schema=TurnContext)
        graph.add_node("prepare", prepare)
        for name in ("call_model", "persist", "refuse"):
            graph.add_node(name, traced(name, getattr(nodes, name)))
        graph.add_edge(START, "prepare")
        graph.add_conditional_edges("prepare", nodes.after_budget, ["call_model", "refuse"])
        graph.add_edge("call_model", "persist")
        graph.add_edge("persist", END)
        graph.add_edge("refuse", END)
        return graph

    agent.build_turn_graph = build_turn_graph  # type: ignore[attr-defined]


@patch("inbox_off",
       "no durable inbox writes (handlers/delivery.py accept + mark_done: two more sessions "
       "and commits per update; prices them, not a proposal)")
def inbox_off() -> None:
    from collections.abc import Iterable

    from aiogram.types import Update

    from handlers import delivery

    async def accept(self: delivery.Delivery, updates: Iterable[Update]) -> list[Update]:
        return list(updates)

    async def _process(self: delivery.Delivery, update: Update) -> None:
        with contextlib.suppress(Exception):
            await self.dispatcher.feed_update(self.bot, update)

    delivery.Delivery.accept = accept  # type: ignore[method-assign]
    delivery.Delivery._process = _process  # type: ignore[method-assign]


@patch("pg_ping_every_checkout",
       "SQLAlchemy's pool_pre_ping on PostgreSQL (a ping at every checkout) instead of "
       "storage/db.py's ping of connections idle for over a second: prices the pings")
def pg_ping_every_checkout() -> None:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from storage import db

    original = db.create_engine

    def create_engine(url: str) -> AsyncEngine:
        engine = original(url)
        if engine.dialect.name == "postgresql":
            engine.sync_engine.pool._pre_ping = True
        return engine

    db.create_engine = create_engine  # type: ignore[assignment]


@patch("sqlite_worker_thread",
       "SQLite through aiosqlite's worker thread (storage/db.py create_engine sqlite_on_loop=False) "
       "instead of on the event loop's thread: prices the thread hops")
def sqlite_worker_thread() -> None:
    from functools import partial

    from storage import db

    db.create_engine = partial(db.create_engine, sqlite_on_loop=False)  # type: ignore[assignment]


@patch("gc_default_thresholds",
       "CPython's collector thresholds (700, 10, 10) instead of bot.GC_YOUNG_THRESHOLD after "
       "start-up: prices the collector's work with many turns in flight")
def gc_default_thresholds() -> None:
    import bot

    bot.GC_YOUNG_THRESHOLD = 700


@patch("tracemalloc_peak",
       "tracemalloc from 8 s after launch (start-up traced would take minutes); whenever what it "
       "traces reaches a new high, the top allocation sites (by package, line and traceback) are written to $BENCH_TRACEMALLOC_OUT (default /tmp/tracemalloc-peak.txt). "
       "Slows everything down: for finding what holds memory, not for timing")
def tracemalloc_peak() -> None:
    import os
    import threading
    import time
    import tracemalloc

    from bench.memory_steps import rss_mb

    out = os.environ.get("BENCH_TRACEMALLOC_OUT", "/tmp/tracemalloc-peak.txt")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def watch() -> None:
        time.sleep(8)
        tracemalloc.start(12)
        best = 0.0
        while True:
            time.sleep(0.5)
            # The peak of what Python holds, not of RSS: tracing itself adds to RSS.
            held = tracemalloc.get_traced_memory()[0] / 2**20
            if held < best + 2:
                continue
            best, rss = held, rss_mb()
            snapshot = tracemalloc.take_snapshot()
            traced = tracemalloc.get_traced_memory()[0] / 2**20
            lines = [f"RSS {rss:.0f} MB, traced (allocated since tracing began, still held) {traced:.0f} MB"]
            lines.append("\nby package of the innermost frame:")
            for stat in _by_package(snapshot.statistics("filename"))[:15]:
                lines.append(f"{stat[1] / 2**20:8.1f} MB {stat[2]:8d} blocks  {stat[0]}")
            lines.append("\nby line:")
            for stat in snapshot.statistics("lineno")[:30]:
                lines.append(f"{stat.size / 2**20:8.1f} MB {stat.count:8d} blocks  {stat.traceback[0]}")
            lines.append("\nby traceback:")
            for stat in snapshot.statistics("traceback")[:25]:
                lines.append(f"{stat.size / 2**20:8.1f} MB {stat.count:8d} blocks")
                lines += [f"      {frame}" for frame in stat.traceback.format()[-12:]]
            with open(out, "w") as file:
                file.write("\n".join(lines))

    def _by_package(stats: list[tracemalloc.Statistic]) -> list[tuple[str, int, int]]:
        totals: dict[str, list[int]] = {}
        for stat in stats:
            name = stat.traceback[0].filename
            for marker in ("site-packages/", "/lib/python3.11/", f"{root}/"):
                if marker in name:
                    name = name.split(marker, 1)[1]
                    break
            entry = totals.setdefault(name.split("/", 1)[0], [0, 0])
            entry[0] += stat.size
            entry[1] += stat.count
        return sorted(((k, v[0], v[1]) for k, v in totals.items()), key=lambda t: -t[1])

    threading.Thread(target=watch, daemon=True).start()



@patch("pg_steps_in_transactions",
       "the message path on PostgreSQL as SQLite runs it: statement by statement inside BEGIN/"
       "COMMIT (18 round trips a message) instead of one statement per step without a "
       "transaction (6; storage/core.py _PostgresStatements, storage/db.py "
       "each_statement_commits): prices the round trips")
def pg_steps_in_transactions() -> None:
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.orm import Session

    from storage import core, repositories, turns

    original = core._statements
    steps = core._Statements(postgresql.insert)

    def statements(dialect: str) -> core._Statements:
        return steps if dialect == "postgresql" else original(dialect)

    def in_a_transaction(session: Session) -> object:
        return session.connection()

    core._statements = statements  # type: ignore[assignment]
    turns.each_statement_commits = in_a_transaction  # type: ignore[assignment]
    repositories.each_statement_commits = in_a_transaction  # type: ignore[assignment]


@patch("asyncio_loop", "asyncio's own event loop instead of uvloop's (bot.new_event_loop)")
def asyncio_loop() -> None:
    import asyncio

    import bot

    bot.new_event_loop = asyncio.new_event_loop


@patch("embeddings_via_langchain",
       "embeddings through langchain-openai's OpenAIEmbeddings.aembed_query (the SDK's "
       "embeddings.create and its response models) instead of ModelGateway.embed's plain post")
def embeddings_via_langchain() -> None:
    from typing import Any

    from langchain_openai import OpenAIEmbeddings

    from graph import model

    original_init = model.ModelGateway.__init__

    def __init__(self: model.ModelGateway, **settings: Any) -> None:
        original_init(self, **settings)
        self._langchain_embeddings = OpenAIEmbeddings(  # type: ignore[attr-defined]
            model=settings["embedding_model"], api_key=settings["api_key"],
            base_url=settings["base_url"], max_retries=0, timeout=settings["timeout"],
            check_embedding_ctx_length=False, http_async_client=self._http,
        )

    async def embed(self: model.ModelGateway, text: str) -> list[float]:
        return await self._langchain_embeddings.aembed_query(text)  # type: ignore[attr-defined]

    model.ModelGateway.__init__ = __init__  # type: ignore[method-assign]
    model.ModelGateway.embed = embed  # type: ignore[method-assign]


@patch("malloc_arena_max_2",
       "glibc malloc limited to 2 arenas (mallopt M_ARENA_MAX, as MALLOC_ARENA_MAX=2 would): "
       "prices malloc fragmentation in the peak RSS (`python -m bench throughput -- --slow 1000 "
       "--patches malloc_arena_max_2`); Linux/glibc only")
def malloc_arena_max_2() -> None:
    import ctypes

    m_arena_max = -8  # glibc's malloc.h
    if ctypes.CDLL("libc.so.6").mallopt(m_arena_max, 2) != 1:
        raise SystemExit("mallopt(M_ARENA_MAX) refused: not glibc?")


@patch("sqlite_small_page_cache",
       "trial: PRAGMA cache_size=-256 (256 KiB) on every SQLite connection instead of SQLite's "
       "2 MiB default: prices what the pool's page caches hold at peak RSS")
def sqlite_small_page_cache() -> None:
    from storage import db

    original = db._sqlite_pragmas

    def pragmas(dbapi_connection: object, record: object) -> None:
        original(dbapi_connection, record)
        cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
        cursor.execute("PRAGMA cache_size=-256")
        cursor.close()

    db._sqlite_pragmas = pragmas
