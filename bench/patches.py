"""Experiments: monkeypatches applied inside the bot process (bench/botproc.py) to price a fix."""

from __future__ import annotations

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


@patch("final_no_pacing_wait",
       "finish() wakes a painter that sleeps out the draft pacing (handlers/streaming.py _paint): "
       "the whole answer is sent at once instead of after up to DRAFT_INTERVAL/EDIT_INTERVAL")
def final_no_pacing_wait() -> None:
    import asyncio
    import types

    from handlers import streaming

    loop_sleep = asyncio.sleep
    sleeping: dict[asyncio.Task[object], asyncio.Future[None]] = {}

    async def sleep(delay: float, result: object = None) -> object:
        task = asyncio.current_task()
        if task is None or delay <= 0:
            return await loop_sleep(delay, result)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        handle = asyncio.get_running_loop().call_later(
            delay, lambda: future.done() or future.set_result(None)
        )
        sleeping[task] = future
        try:
            await future
        finally:
            handle.cancel()
            sleeping.pop(task, None)
        return result

    # Only handlers.streaming sees the interruptible sleep; everything else keeps asyncio's.
    proxy = types.ModuleType("asyncio_for_streaming")
    proxy.__dict__.update(vars(asyncio))
    proxy.sleep = sleep  # type: ignore[attr-defined]
    streaming.asyncio = proxy  # type: ignore[attr-defined]
    original_stop = streaming.AnswerStream._stop_painter

    async def _stop_painter(self: streaming.AnswerStream) -> None:
        self._closed = True
        painter = self._painter
        future = sleeping.get(painter) if painter is not None else None  # type: ignore[arg-type]
        if future is not None and not future.done():
            future.set_result(None)  # the painter sees _closed and returns without a draft
        await original_stop(self)

    streaming.AnswerStream._stop_painter = _stop_painter  # type: ignore[method-assign]


@patch("pin_response_models",
       "keep aiogram's Response[T] models alive: pydantic caches parametrised generics in a "
       "WeakValueDictionary, so after each full GC every Bot API call rebuilds its response "
       "model (aiogram/client/session/base.py check_response: ~1-5 ms per call)")
def pin_response_models() -> None:
    from aiogram.client.session.base import BaseSession
    from aiogram.methods.base import Response

    pinned: dict[object, object] = {}
    original = BaseSession.check_response

    def check_response(self: BaseSession, bot: object, method: object, status_code: int,
                       content: str) -> object:
        returning = method.__returning__  # type: ignore[attr-defined]
        if returning not in pinned:
            # A strong reference: the WeakValueDictionary entry now outlives every GC.
            pinned[returning] = Response[returning]  # type: ignore[valid-type]
        return original(self, bot, method, status_code, content)  # type: ignore[arg-type]

    BaseSession.check_response = check_response  # type: ignore[method-assign,assignment]


@patch("gc_freeze",
       "gc.freeze() once start-up is done: the long-lived objects (modules, models, schemas) "
       "leave the collector's generations, so full collections stop re-scanning them")
def gc_freeze() -> None:
    import gc

    from handlers import delivery

    original = delivery.Delivery.poll

    async def poll(self: delivery.Delivery, *args: object, **kwargs: object) -> None:
        gc.collect()
        gc.freeze()
        await original(self, *args, **kwargs)

    delivery.Delivery.poll = poll  # type: ignore[method-assign]


@patch("trace_in_background",
       "write the run's trace after the answer, off the critical path (graph/agent.py _turn "
       "awaits _save_trace, its own session and commit, before yielding the answer)")
def trace_in_background() -> None:
    import asyncio

    from graph.agent import Agent

    original = Agent._save_trace
    pending: set[asyncio.Task[None]] = set()

    async def _save_trace(self: Agent, trace: object) -> None:
        task = asyncio.get_running_loop().create_task(original(self, trace))  # type: ignore[arg-type]
        pending.add(task)
        task.add_done_callback(pending.discard)

    Agent._save_trace = _save_trace  # type: ignore[method-assign]


@patch("no_trace", "skip the trace write entirely (prices its CPU; not a proposal)")
def no_trace() -> None:
    from graph.agent import Agent

    async def _save_trace(self: Agent, trace: object) -> None:
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


@patch("token_cache",
       "memoise token counts per text (graph/tokens.py): the system prompt and every history "
       "message are re-encoded with tiktoken on every turn")
def token_cache() -> None:
    from functools import lru_cache

    from langchain_core.messages import BaseMessage

    from graph import agent, nodes, tokens

    original_count = tokens.count_tokens

    @lru_cache(maxsize=65536)
    def count_tokens(text: str, model: str) -> int:
        return original_count(text, model)

    def count_messages(messages: list[BaseMessage], model: str) -> int:
        total = tokens.TOKENS_REPLY_PRIMING
        for message in messages:
            role = {"human": "user", "ai": "assistant"}.get(message.type, message.type)
            total += tokens.TOKENS_PER_MESSAGE + count_tokens(role, model)
            total += count_tokens(str(message.content), model)
        return total

    for module in (agent, nodes):
        if hasattr(module, "count_tokens"):
            module.count_tokens = count_tokens  # type: ignore[attr-defined]
        if hasattr(module, "count_messages"):
            module.count_messages = count_messages  # type: ignore[attr-defined]


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
        try:
            await self.dispatcher.feed_update(self.bot, update)
        except Exception:  # noqa: BLE001 - as the original: one bad update stops nothing
            pass

    delivery.Delivery.accept = accept  # type: ignore[method-assign]
    delivery.Delivery._process = _process  # type: ignore[method-assign]


@patch("direct_openai",
       "stream the answer with the openai SDK directly instead of langchain's ChatOpenAI "
       "(graph/model.py stream_chat): no per-chunk AIMessageChunk/ChatGenerationChunk, "
       "model_dump and callback dispatch")
def direct_openai() -> None:
    from typing import Any

    import openai
    from langchain_core.messages import convert_to_openai_messages

    from graph import model as gateway_module
    from graph.model import ModelGateway, ModelResult, classify

    clients: dict[int, openai.AsyncOpenAI] = {}

    async def stream_chat(self: ModelGateway, messages: Any, *, model: str, temperature: float,
                          max_tokens: int, on_delta: Any = None) -> ModelResult:
        client = clients.get(id(self))
        if client is None:
            client = clients[id(self)] = openai.AsyncOpenAI(
                api_key=self._api_key, base_url=self._base_url, max_retries=0,
                timeout=self._timeout,
            )
        parts: list[str] = []
        usage = None
        truncated = False
        try:
            stream = await client.chat.completions.create(
                model=model, messages=convert_to_openai_messages(messages),
                temperature=temperature, max_tokens=max_tokens, stream=True,
                stream_options={"include_usage": True},
            )
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.delta.content:
                        parts.append(choice.delta.content)
                        if on_delta is not None:
                            maybe = on_delta(choice.delta.content)
                            if maybe is not None:
                                await maybe
                    if choice.finish_reason == "length":
                        truncated = True
        except Exception as exc:  # noqa: BLE001 - the experiment keeps the fault mapping only
            return ModelResult("".join(parts), None, None, classify(exc), 1, type(exc).__name__)
        if usage is None:
            return ModelResult("".join(parts), None, None, None, 1, truncated=truncated)
        return ModelResult("".join(parts), usage.prompt_tokens, usage.completion_tokens, None, 1,
                           truncated=truncated)

    gateway_module.ModelGateway.stream_chat = stream_chat  # type: ignore[method-assign]


@patch("async_text_filter",
       "an async Filter instead of the F.text magic filter on the chat handler "
       "(handlers/chat.py build_router): aiogram runs sync filters via asyncio.to_thread, "
       "so every chat message hops to a worker thread and back")
def async_text_filter() -> None:
    from typing import Any

    from aiogram import F
    from aiogram.filters import Filter
    from aiogram.types import Message

    from handlers import chat

    class HasText(Filter):
        async def __call__(self, message: Message) -> bool:
            return bool(message.text)

    class FWithAsyncText:
        text = HasText()

        def __getattr__(self, name: str) -> Any:
            return getattr(F, name)

    chat.F = FWithAsyncText()  # type: ignore[attr-defined,assignment]


@patch("typing_after_1s",
       "start the typing indicator only if the answer is not there after 1 s "
       "(handlers/chat.py: ChatActionSender.typing(..., initial_sleep=1.0)): a fast answer "
       "needs no sendChatAction")
def typing_after_1s() -> None:
    from typing import Any

    from aiogram.utils.chat_action import ChatActionSender

    from handlers import chat

    class LateTyping(ChatActionSender):
        @classmethod
        def typing(cls, **kwargs: Any) -> ChatActionSender:  # type: ignore[override]
            kwargs.setdefault("initial_sleep", 1.0)
            return ChatActionSender(action="typing", **kwargs)

    chat.ChatActionSender = LateTyping  # type: ignore[attr-defined,misc]


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
            engine.sync_engine.pool._pre_ping = True  # noqa: SLF001 - the experiment's switch
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

    out = os.environ.get("BENCH_TRACEMALLOC_OUT", "/tmp/tracemalloc-peak.txt")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def rss_mb() -> float:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

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

    original = core._statements  # noqa: SLF001 - the experiment's switch
    steps = core._Statements(postgresql.insert)  # noqa: SLF001

    def statements(dialect: str) -> core._Statements:  # noqa: SLF001
        return steps if dialect == "postgresql" else original(dialect)

    def in_a_transaction(session: Session) -> object:
        return session.connection()

    core._statements = statements  # type: ignore[assignment]  # noqa: SLF001
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
            check_embedding_ctx_length=False, http_async_client=self._http,  # noqa: SLF001
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

    original = db._sqlite_pragmas  # noqa: SLF001

    def pragmas(dbapi_connection: object, record: object) -> None:
        original(dbapi_connection, record)
        cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
        cursor.execute("PRAGMA cache_size=-256")
        cursor.close()

    db._sqlite_pragmas = pragmas  # noqa: SLF001
