"""The floor: what each library operation a message needs costs on its own, on this machine.

The overhead and throughput benches measure the bot; this one measures the parts it is made of,
each alone in a loop, to say how far below the bot's cost per message the libraries let it go.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypedDict

from ops.aiogram_lazy import import_aiogram

import_aiogram()  # as the bot imports it; bench.common imports the fakes, and they aiogram

import itertools

from bench.common import (  # noqa: E402
    ANSWER,
    QUESTION,
    RESULTS_DIR,
    Check,
    calibrate,
    checks_table,
    database,
    install_cipher,
    new_key,
    pg_available,
    set_chunking,
    table,
    workspace,
    write_result,
)

EXPLAIN = """\
What is measured (in this process; the fakes serve from a child process)
  Each operation runs N times in a loop on the bot's event loop (uvloop, the bot's collector
  settings); the figure is the CPU time of the event-loop thread per operation: the client's
  cost only, not the fake server's. These are the real clients the bot uses, against the same
  fakes, with nothing of the bot around them:
  aiogram      getUpdates (empty), parsing one text Update, dispatching it to one async
               handler, sendMessage (the bench answer, HTML), sendMessageDraft
  openai SDK   one streamed chat completion (the bench answer in 60 chunks, as the overhead
               bench streams it) read the way graph/model.py reads it; one embeddings request
  LangGraph    ainvoke of a 5-node graph of async no-op nodes, with a context (no checkpointer)
  SQLAlchemy   a session that writes one row and commits; one more statement in a session
               (prebuilt Core statements through AsyncSession.run_sync, as storage/ runs them)
  tiktoken     counting the question's tokens; Fernet: encrypting + decrypting the answer
  and, for comparison, not part of the floor: the bot's own storage steps for one message
  (storage/turns.py and the inbox, as the message path calls them), and the bot's own
  dispatcher and chat handler taking the update (its agent answering nothing), and the bot's
  agent (bot.composed) answering a message against the fake model, memory off, in the same way
  memory       a fresh process importing what the bot imports, one library at a time, RSS
               after each step; then the tokenizer (the bot loads it with the first message)
  A message's floor = each operation x how often the bot's message path performs it (the
  statement and commit counts come from `python -m bench.overhead --sql` when its results
  exist). What the sum leaves out: the event loop's scheduling between these steps, the
  bot's own code (middlewares, inbox, budget, formatting), and the collector.
"""

N_DEFAULT = 400


@dataclass
class Op:
    name: str
    layer: str
    per_message: float  # how often one message (memory off, sequential) performs it
    cpu_us: float = 0.0
    wall_us: float = 0.0


async def measure(op: Op, call: Callable[[], Awaitable[Any]], n: int) -> Op:
    for _ in range(max(20, n // 10)):  # warm: pools, caches, first-use model builds
        await call()
    gc.collect()
    cpu, wall = time.thread_time(), time.perf_counter()
    for _ in range(n):
        await call()
    op.cpu_us = (time.thread_time() - cpu) / n * 1e6
    op.wall_us = (time.perf_counter() - wall) / n * 1e6
    return op


async def second_messages(call: Callable[[int], Awaitable[None]], users: range) -> tuple[float, float]:
    """(CPU us, wall us) per call(user) for each user's second message (the first signs up and
    leaves one exchange, as in the overhead bench); of the three thirds of `users`, the median,
    so a disturbance of the machine during one third does not move the figure."""
    for user_id in users:
        await call(user_id)
    thirds = [users[i::3] for i in range(3)]
    cpu_wall = []
    for part in thirds:
        gc.collect()
        cpu, wall = time.thread_time(), time.perf_counter()
        for user_id in part:
            await call(user_id)
        cpu_wall.append(((time.thread_time() - cpu) / len(part) * 1e6,
                         (time.perf_counter() - wall) / len(part) * 1e6))
    return sorted(cpu_wall)[1]


class FakesProcess:
    """The fake Telegram and the fake model served by a child process (`--serve-fakes`), as the
    benches serve them to the bot: their CPU, and the GIL, are not the measured process's."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> dict[str, str]:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.floor", "--serve-fakes",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        return json.loads(line)

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the child stops when its stdin closes
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()


async def serve_fakes() -> None:
    from tests.fakes.openai import FakeOpenAI
    from tests.fakes.telegram import FakeTelegram

    set_chunking(1)
    tg, ai = await FakeTelegram().start(), await FakeOpenAI(reply=ANSWER).start()
    print(json.dumps({"telegram": tg.base_url, "openai": ai.base_url}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
    await tg.stop()
    await ai.stop()


# ------------------------------------------------------------------------------ memory

async def memory_steps() -> list[dict[str, Any]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.memory_steps", stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    steps, previous = [], 0.0
    for line in out.decode().splitlines():
        row = json.loads(line)
        steps.append({**row, "added_mb": row["rss_mb"] - previous})
        previous = row["rss_mb"]
    return steps


# ------------------------------------------------------------------------------ aiogram


def text_update(update_id: int) -> dict[str, Any]:
    return {
        "update_id": update_id,
        "message": {
            "message_id": update_id, "date": int(time.time()), "text": QUESTION,
            "chat": {"id": 4242, "type": "private", "first_name": "Ada"},
            "from": {"id": 4242, "is_bot": False, "first_name": "Ada", "language_code": "en"},
        },
    }


async def aiogram_ops(base_url: str, n: int) -> list[Op]:
    from aiogram import Bot, Dispatcher, Router
    from aiogram.client.session.aiohttp import AiohttpSession
    from aiogram.client.telegram import TelegramAPIServer
    from aiogram.filters import Filter
    from aiogram.types import Message, Update

    from handlers import flood
    from handlers.formatting import render_parts

    flood.pin_response_types()  # as the bot does (handlers/flood.py)
    bot = Bot("123456:floor", session=AiohttpSession(api=TelegramAPIServer.from_base(base_url)))
    router = Router()

    class HasText(Filter):
        async def __call__(self, message: Message) -> bool:
            return bool(message.text)

    @router.message(HasText())
    async def handler(message: Message) -> None:
        return None

    dispatcher = Dispatcher()
    dispatcher.include_router(router)
    part = render_parts(ANSWER)[0]
    raw = text_update(1)
    update = Update.model_validate(raw, context={"bot": bot})
    try:
        return [
            await measure(Op("getUpdates (empty, timeout 0)", "aiogram", 1),
                          lambda: bot.get_updates(offset=-1, timeout=0), n),
            await measure(Op("parse one text Update", "aiogram", 1),
                          _sync(lambda: Update.model_validate(raw, context={"bot": bot})), n),
            await measure(Op("dispatch it to one async handler", "aiogram", 1),
                          lambda: dispatcher.feed_update(bot, update), n),
            await measure(Op("sendMessageDraft", "aiogram", 1),
                          lambda: bot.send_message_draft(
                              chat_id=4242, draft_id=7, text=part.text, parse_mode=None,
                              entities=part.telegram_entities()), n),
            await measure(Op("sendMessage (answer, entities)", "aiogram", 1),
                          lambda: bot.send_message(4242, part.text, parse_mode=None,
                                                   entities=part.telegram_entities()), n),
        ]
    finally:
        await bot.session.close()


class _SilentAgent:
    """Stands in for graph.agent.Agent: answers nothing, so only the front end is measured."""

    def __init__(self) -> None:
        from settings import Settings

        self.services = type("Services", (), {"settings": Settings()})()

    async def handle_message(self, **_kwargs: Any) -> Any:
        return
        yield  # an async generator with no events


async def our_dispatch(n: int) -> Op:
    """The bot's own dispatcher (its middlewares, its routers in order, the chat handler) taking
    the same text update, around an agent that answers nothing (not a floor)."""
    from aiogram import Bot
    from aiogram.types import Update, User

    from handlers.app import build_dispatcher
    from handlers.i18n import Catalog

    bot = Bot("123456:floor")
    me = User(id=123456, is_bot=True, first_name="Desk", username="desk_top_bot")

    async def cached_me() -> User:  # what Bot.me() returns once the first getMe is cached
        return me

    bot.me = cached_me  # type: ignore[method-assign]
    dispatcher = build_dispatcher(_SilentAgent(), Catalog.load())  # type: ignore[arg-type]
    update = Update.model_validate(text_update(1), context={"bot": bot})
    return await measure(Op("the bot's dispatcher + chat handler, agent answering nothing",
                            "the bot's own", 1), lambda: dispatcher.feed_update(bot, update), n)


def _sync(fn: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    async def call() -> Any:
        return fn()
    return call


# ------------------------------------------------------------------------------ openai SDK


async def openai_ops(base_url: str, n: int) -> list[Op]:
    import openai

    http = openai.DefaultAioHttpClient()
    client = openai.AsyncOpenAI(api_key="sk-floor", base_url=base_url, max_retries=0,
                                http_client=http)
    body = {
        "model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "system", "content": "You are helpful."},
                     {"role": "user", "content": QUESTION}],
    }

    async def stream() -> int:
        chunks = 0
        response = await client.post("/chat/completions", body=body, cast_to=object, stream=True,
                                     stream_cls=openai.AsyncStream[object])
        async with response:
            async for _chunk in response:
                chunks += 1
        return chunks

    async def embed() -> object:
        return await client.post("/embeddings", cast_to=object, body={
            "model": "text-embedding-3-small", "input": QUESTION, "encoding_format": "base64"})

    try:
        return [
            await measure(Op("stream one answer (60 chunks)", "openai SDK", 1), stream, n),
            await measure(Op("one embeddings request (memory on only)", "openai SDK", 0), embed, n),
        ]
    finally:
        await http.aclose()


# ------------------------------------------------------------------------------ LangGraph


class _State(TypedDict, total=False):
    text: str
    answer: str


@dataclass
class _Context:
    user_id: int


async def langgraph_ops(n: int) -> list[Op]:
    from langgraph.graph import END, START, StateGraph
    from langgraph.runtime import Runtime

    async def node(state: _State, runtime: Runtime[_Context]) -> dict[str, Any]:
        return {"answer": state["text"]}

    graph = StateGraph(_State, context_schema=_Context)
    names = ["retrieve_memory", "apply_persona", "reserve_budget", "call_model", "persist"]
    for name in names:
        graph.add_node(name, node)
    graph.add_edge(START, names[0])
    for a, b in itertools.pairwise(names):
        graph.add_edge(a, b)
    graph.add_edge(names[-1], END)
    compiled = graph.compile()
    context = _Context(1)
    return [await measure(Op("ainvoke, 5 async no-op nodes", "LangGraph", 1),
                          lambda: compiled.ainvoke({"text": "hi"}, context=context), n)]


# ------------------------------------------------------------------------------ SQLAlchemy


async def sqlalchemy_ops(kind: str, url: str, n: int, counts: dict[str, float]) -> list[Op]:
    from sqlalchemy import bindparam, select

    from storage import core
    from storage.db import create_engine, each_statement_commits, session_maker
    from storage.models import utcnow

    engine = create_engine(url)
    sessions = session_maker(engine)
    by_id = select(core.inbox.c.state).where(core.inbox.c.update_id == bindparam("update_id"))
    ids = iter(range(10_000_000, 20_000_000))

    async def write_and_commit() -> None:
        # A fresh session, one insert, commit: what each step of the message path pays at least.
        update_id = next(ids)

        def run(session: Any) -> None:
            core.store_update(each_statement_commits(session), update_id, 1, 1, "{}", utcnow())
            session.commit()

        async with sessions() as db:
            await db.run_sync(run)

    async with sessions() as db:
        await db.run_sync(lambda s: (core.store_update(s.connection(), 1, 1, 1, "{}", utcnow()),
                                     s.commit()))

    async def statements(db: Any, repeat: int = 20) -> None:
        def run(session: Any) -> None:
            conn = session.connection()
            for _ in range(repeat):
                conn.execute(by_id, {"update_id": 1}).first()

        await db.run_sync(run)

    try:
        ops = [await measure(Op(f"session + 1 write + commit ({kind})", "SQLAlchemy",
                                counts["commits"]), write_and_commit, n)]
        async with sessions() as db:
            per20 = await measure(Op("", "", 0), lambda: statements(db), max(n // 4, 20))
        extra = max(counts["statements"] - counts["commits"], 0)
        ops.append(Op(f"each further statement ({kind})", "SQLAlchemy", extra,
                      per20.cpu_us / 20, per20.wall_us / 20))
        return ops
    finally:
        await engine.dispose()


async def message_storage(kind: str, url: str, users: int) -> Op:
    """The bot's own storage steps for one message, as its message path runs them (not a floor):
    the inbox row, the question with the session's history, the budget reservation, the answer
    recorded with the charge. Each user has one earlier exchange, as in the overhead bench."""
    from storage.core import TurnRecord
    from storage.db import create_engine, session_maker
    from storage.repositories import Inbox
    from storage.turns import BudgetAsk, NewQuestion, persist, reserve, store_question

    engine = create_engine(url)
    sessions = session_maker(engine)
    ids = iter(range(30_000_000, 40_000_000))
    payload = json.dumps(text_update(1))

    async def message(user_id: int) -> None:
        update_id = next(ids)
        async with sessions() as db:
            await Inbox(db).store_each([(update_id, user_id, user_id, payload)])
            await db.commit()
        new = NewQuestion(user_id=user_id, chat_id=user_id, text=QUESTION, update_id=update_id,
                          tokens=20, language="en", history_limit=20)
        async with sessions() as db:
            stored = await store_question(db, new, lambda role: role or "personal_assistant")
        assert stored is not None
        ask = BudgetAsk(user_id, stored.question_id, limit=10**9, ttl_seconds=600)
        async with sessions() as db:
            reserved, _ = await reserve(db, ask, lambda remaining: (2_000, 1_000))
        async with sessions() as db:
            await persist(db, TurnRecord(
                user_id=user_id, chat_id=user_id, session_id=stored.session_id,
                question_id=stored.question_id, update_id=update_id,
                reservation_id=reserved.id, charged=300, text=ANSWER, complete=True,
                prompt_tokens=200, completion_tokens=100,
            ))

    try:
        cpu_us, wall_us = await second_messages(message, range(50_000_000, 50_000_000 + users))
        return Op(f"the bot's storage steps for one message ({kind})", "the bot's own", 1,
                  cpu_us, wall_us)
    finally:
        await engine.dispose()


async def agent_turns(kind: str, url: str, openai_url: str, work: Any, key: str, users: int) -> Op:
    """The bot's agent (bot.composed: storage, the LangGraph turn, the model client) answering
    one message per user against the fake model, memory off: everything but Telegram."""
    from bot import composed
    from settings import Settings

    settings = Settings(
        openai_api_key="sk-floor", openai_base_url=openai_url, database_url=url,
        data_dir=str(work / f"data-{kind}"), encryption_key=key, daily_token_limit=10**9,
        memory_top_k=0, log_level="WARNING",
    )
    ids = iter(range(70_000_000, 80_000_000))
    async with composed(settings) as agent:
        async def turn(user_id: int) -> None:
            async for _event in agent.handle_message(
                user_id=user_id, chat_id=user_id, text=QUESTION, update_id=next(ids)
            ):
                pass

        cpu_us, wall_us = await second_messages(turn, range(60_000_000, 60_000_000 + users))
        return Op(f"the agent's turn: storage, graph, model stream ({kind})", "the bot's own", 1,
                  cpu_us, wall_us)


def sql_counts(kind: str) -> tuple[dict[str, float], str]:
    """Statements and commits per message, from the overhead bench's --sql run when present."""
    path = RESULTS_DIR / f"sql-overhead-{kind}-nomem.json"
    try:
        data = json.loads(path.read_text())
        messages = data["statements"]["INSERT inbox"]  # one inbox row per message
        return ({"statements": data["total_statements"] / messages,
                 "commits": data["commits"] / messages}, f"measured ({path.name})")
    except (OSError, KeyError, ValueError):
        # storage/turns.py: inbox, question, budget, answer; the statements as counted last.
        fallback = {"sqlite": (14.0, 4.0), "postgresql": (6.0, 4.0)}[kind]
        return ({"statements": fallback[0], "commits": fallback[1]},
                "declared (run python -m bench.overhead --sql to measure)")


# ------------------------------------------------------------------------------ the rest


async def other_ops(n: int) -> list[Op]:
    from graph.tokens import count_tokens
    from storage.crypto import current

    crypt = current()
    return [
        await measure(Op("count the question's tokens", "tiktoken", 2),
                      _sync(lambda: count_tokens(QUESTION, "gpt-4o-mini")), n),
        await measure(Op("encrypt + decrypt the answer", "Fernet", 2),
                      _sync(lambda: crypt.decrypt(crypt.encrypt(ANSWER))), n),
    ]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from bot import GC_YOUNG_THRESHOLD

    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])  # as the bot runs
    key = new_key()
    install_cipher(key)
    results: dict[str, Any] = {"n": args.n, "ops": {}, "counts": {}, "ours": {}}
    before = calibrate()
    kinds = ["sqlite"] + (["postgresql"] if args.db != "sqlite" and await pg_available() else [])
    async with FakesProcess() as urls, workspace("floor") as work:
        common = [*await aiogram_ops(urls["telegram"], args.n),
                  *await openai_ops(urls["openai"], args.n),
                  *await langgraph_ops(args.n), *await other_ops(args.n)]
        results["ours_dispatch"] = (await our_dispatch(args.n)).__dict__
        for kind in kinds:
            counts, source = sql_counts(kind)
            async with database(kind, work, "floor") as db:
                db_ops = await sqlalchemy_ops(kind, db.url, args.n, counts)
                storage = await message_storage(kind, db.url, args.n)
                turn = await agent_turns(kind, db.url, urls["openai"], work, key, args.n)
            results["ops"][kind] = [op.__dict__ for op in [*common, *db_ops]]
            results["ours"][kind] = {"storage": storage.__dict__, "turn": turn.__dict__}
            results["counts"][kind] = {**counts, "source": source}
    results["calibration_ms"] = (before + calibrate()) / 2
    results["memory"] = await memory_steps()
    return results


def last_bot_cpu(kind: str, calibration_ms: float) -> tuple[float | None, float | None]:
    """The bot's CPU per message from the last overhead run (memory off, as shipped) and from
    the last throughput burst, scaled to the machine's speed during this run (bench/common.py
    calibrate: the same workload's CPU time then and now)."""
    def load(name: str) -> tuple[list[dict[str, Any]], float]:
        try:
            data = json.loads((RESULTS_DIR / f"{name}.json").read_text())
        except (OSError, ValueError):
            return [], 1.0
        if data.get("patches"):
            return [], 1.0  # a patched run is not the bot as shipped
        then = data.get("machine", {}).get("calibration_ms")
        return data.get("results", []), (calibration_ms / then if then else 1.0)

    sequential = burst = None
    rows, scale = load("overhead")
    for row in rows:
        if row.get("db") == kind and row.get("memory") is False and not row.get("patches"):
            sequential = row["bot_cpu_ms_per_message"] * scale
    rows, scale = load("throughput")
    for row in rows:
        if row.get("db") == kind and "burst" in row:
            burst = row["burst"]["bot_cpu_ms_per_message"] * scale
    return sequential, burst


BURST_BATCH = 100  # updates per getUpdates in a burst (aiogram's polling limit)


def report(results: dict[str, Any]) -> list[Check]:
    print(EXPLAIN)
    print(f"machine speed during this run: calibration workload {results['calibration_ms']:.1f} ms "
          "(bench/common.py calibrate; lower is faster)\n")
    checks = []
    for kind, ops in results["ops"].items():
        rows, one_by_one, in_burst = [], 0.0, 0.0
        for op in ops:
            subtotal = op["cpu_us"] * op["per_message"] / 1000
            one_by_one += subtotal
            in_burst += subtotal / BURST_BATCH if op["name"].startswith("getUpdates") else subtotal
            rows.append([op["layer"], op["name"], f"{op['cpu_us']:.0f}", f"{op['per_message']:g}",
                         f"{subtotal:.2f}"])
        rows.append(["", "a message's floor, one at a time", "", "", f"{one_by_one:.2f}"])
        rows.append(["", f"same in a burst ({BURST_BATCH} updates a getUpdates)", "", "",
                     f"{in_burst:.2f}"])
        counts = results["counts"][kind]
        print(table(["layer", "operation", "CPU us/op", "per message", "ms/msg"], rows,
                    title=f"{kind}: {counts['statements']:.1f} statements and {counts['commits']:.1f} "
                          f"commits a message, {counts['source']}"))
        dispatch = results.get("ours_dispatch")
        if dispatch is not None:
            bare = next(op for op in ops if op["name"].startswith("dispatch"))
            print(f"  the bot's dispatcher and chat handler, the same update, measured here: "
                  f"{dispatch['cpu_us'] / 1000:.2f} ms (the floor's dispatch: "
                  f"{bare['cpu_us'] / 1000:.2f} ms)")
        ours = results.get("ours", {}).get(kind)
        if ours is not None:
            def floor_of(*layers: str) -> float:
                return sum(op["cpu_us"] * op["per_message"] for op in ops
                           if op["layer"] in layers) / 1000
            print(f"  the bot's own storage steps for a message, measured here the same way: "
                  f"{ours['storage']['cpu_us'] / 1000:.2f} ms (the floor's SQLAlchemy rows: "
                  f"{floor_of('SQLAlchemy'):.2f} ms)")
            print(f"  the bot's agent answering a message (storage, graph, model; no Telegram): "
                  f"{ours['turn']['cpu_us'] / 1000:.2f} ms (the floor's rows for those parts: "
                  f"{floor_of('SQLAlchemy', 'LangGraph', 'openai SDK', 'tiktoken', 'Fernet'):.2f} ms)")
        sequential, burst = last_bot_cpu(kind, results["calibration_ms"])
        if sequential is not None:
            print(f"  the bot one at a time (last overhead run, scaled to this run's machine "
                  f"speed): {sequential:.2f} ms CPU a message, {sequential - one_by_one:+.2f} ms "
                  f"over the floor")
        if burst is not None:
            print(f"  the bot in a burst (last throughput run, scaled likewise): {burst:.2f} ms "
                  f"CPU a message, {burst - in_burst:+.2f} ms over the floor")
        print(f"  => these parts alone allow at most {1000 / in_burst:.0f} messages/s on one "
              f"core, before any scheduling or code of the bot's own\n")
        checks.append(Check(f"{kind}: the floor leaves room for 150 msg/s", "<= 6.67 ms",
                            f"{in_burst:.2f} ms", in_burst <= 1000 / 150))
    print(memory_report(results.get("memory", [])))
    print(checks_table(checks))
    return checks


def memory_report(steps: list[dict[str, Any]]) -> str:
    rows = [[row["step"], f"{row['added_mb']:+.1f}", f"{row['rss_mb']:.1f}"] for row in steps]
    lines = [table(["step (each adds what no earlier step loaded)", "RSS added (MB)", "RSS (MB)"], rows,
                   title="Memory before the first message: a fresh process importing what the "
                         "bot imports, step by step")]
    try:
        data = json.loads((RESULTS_DIR / "throughput.json").read_text())
        for row in data.get("results", []):
            ready, slow = row.get("rss_after_warmup_mb"), row.get("slow") or []
            if ready and slow:
                # The peak is the run's high-water mark: the largest crowd sets it.
                most = max(slow, key=lambda s: s["users"])
                per_turn = (most["peak_rss_mb"] - ready) / most["users"] * 1024
                lines.append(
                    f"  last throughput run ({row['db']}): {ready:.0f} MB after warm-up, "
                    f"{most['peak_rss_mb']:.0f} MB at the peak with {most['users']} answers in "
                    f"flight: ~{per_turn:.0f} KB per answer in flight")
    except (OSError, ValueError, KeyError):
        pass
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--n", type=int, default=N_DEFAULT, help="iterations per operation")
    parser.add_argument("--db", choices=["sqlite", "both"], default="both")
    parser.add_argument("--serve-fakes", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_fakes:
        asyncio.run(serve_fakes())
        return 0
    from bot import new_event_loop

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        results = runner.run(run(args))
    checks = report(results)
    write_result("floor", {"results": results, "checks": [c.__dict__ for c in checks],
                           "explain": EXPLAIN})
    return 0


if __name__ == "__main__":
    sys.exit(main())
