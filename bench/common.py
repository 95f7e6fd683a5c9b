"""Shared bench plumbing: timestamping fakes, the bot as a child process, databases, output."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:  # `python bench/x.py` as well as `python -m bench.x`
    sys.path.insert(0, str(ROOT))

# The benches never reach the network; LangSmith must not try (same as tests/conftest.py).
os.environ["LANGSMITH_TRACING"] = "false"
os.environ.pop("LANGCHAIN_TRACING_V2", None)

from tests.fakes.openai import CHAT_PATH, FakeOpenAI  # noqa: E402
from tests.fakes.telegram import FakeTelegram  # noqa: E402

TOKEN = "123456:BENCH-token"
PG_ADMIN_URL = os.environ.get(
    "DESKTOP_BENCH_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
# Every bench question carries a tag that the fake model repeats in its answer, so each
# timestamp (enqueue, model request, first token, draft, final message) maps to one message.
TAG_RE = re.compile(r"\bBQ(\d+)R(\d+)\b")
QUESTION = "Could you help me plan the next step of my project? I have about two hours today."
# A typical short answer with Markdown (bold, list, code): ~60 stream chunks, 1 word each,
# which is how a real provider streams (about one token per chunk).
ANSWER = (
    "Here is a **short plan** for the next two hours:\n\n"
    "1. Start with the *smallest* working version and measure it.\n"
    "2. Keep the `hot path` free of extra round trips to the database.\n"
    "3. Write down what you learned, then pick the next step.\n\n"
    "If you tell me more about the constraints, I can make the plan more concrete and "
    "suggest what to skip."
)


def tag(user_id: int, round_no: int) -> str:
    return f"BQ{user_id}R{round_no}"


def question(user_id: int, round_no: int) -> str:
    return f"{QUESTION} ref {tag(user_id, round_no)}"


def find_tag(text: str | None) -> str | None:
    found = TAG_RE.search(text or "")
    return found.group(0) if found else None


# --------------------------------------------------------------------------- the fakes


class BenchTelegram(FakeTelegram):
    """FakeTelegram that timestamps each tagged message's delivery, first draft and final answer.

    Timestamps are time.monotonic() in this process, like the fake's own Call.at/Draft.at.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(bot_username="desktop_bench_bot", **kwargs)
        self.enqueued_at: dict[str, float] = {}
        self.delivered_at: dict[str, float] = {}  # getUpdates returned the update to the bot
        self.first_draft_at: dict[str, float] = {}  # first sendMessageDraft / placeholder
        self.drafts_per_tag: dict[str, int] = {}
        self.final_at: dict[str, float] = {}  # the answer's sendMessage arrived
        self.final_count = 0
        self._tag_of_update: dict[int, str] = {}
        self._open_tag: dict[int, str] = {}  # chat -> the newest question asked there
        self._waiters: dict[str, asyncio.Future[float]] = {}
        self._count_waiter: tuple[int, asyncio.Future[None]] | None = None
        self.keep_calls = True

    # --- the user side

    def ask(self, user_id: int, round_no: int, *, chat_id: int | None = None) -> str:
        """The user sends a tagged question; returns the tag (its enqueue time is recorded)."""
        name = tag(user_id, round_no)
        body = question(user_id, round_no)
        kwargs: dict[str, Any] = {}
        if chat_id is not None and chat_id < 0:
            kwargs = {"chat_id": chat_id, "chat_type": "group"}
            body = f"@{self.bot_username} {body}"
        self.enqueued_at[name] = time.monotonic()
        update = self.send_text(user_id, body, **kwargs)
        self._tag_of_update[update["update_id"]] = name
        self._open_tag[update["message"]["chat"]["id"]] = name
        return name

    def answered(self, name: str) -> asyncio.Future[float]:
        """Resolves with the final message's arrival time (create it before ask())."""
        if name in self.final_at:
            future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            future.set_result(self.final_at[name])
            return future
        return self._waiters.setdefault(name, asyncio.get_running_loop().create_future())

    async def wait_answers(self, count: int, timeout: float) -> None:
        """Until `count` final answers arrived in total (since start)."""
        if self.final_count >= count:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._count_waiter = (count, future)
        await asyncio.wait_for(future, timeout)

    def forget_history(self) -> None:
        """Drop recorded calls/messages between phases so long runs keep memory flat."""
        self.calls.clear()
        self._messages.clear()
        self._drafts.clear()
        self._user_messages.clear()

    # --- the Bot API side (overrides of the fake's handlers)

    async def _get_updates(self, params: dict[str, Any], bot: dict[str, Any]) -> list[Any]:
        batch = await super()._get_updates(params, bot)
        now = time.monotonic()
        for update in batch:
            name = self._tag_of_update.get(update["update_id"])
            if name is not None:
                self.delivered_at.setdefault(name, now)
        if not self.keep_calls:
            self.calls.clear()
        return batch

    def _send_message(self, params: dict[str, Any], bot: dict[str, Any]) -> Any:
        now = time.monotonic()
        result = super()._send_message(params, bot)
        self._seen(int(params.get("chat_id") or 0), str(params.get("text") or ""), now)
        return result

    def _edit_message_text(self, params: dict[str, Any], bot: dict[str, Any]) -> Any:
        now = time.monotonic()
        result = super()._edit_message_text(params, bot)
        self._seen(int(params.get("chat_id") or 0), str(params.get("text") or ""), now)
        return result

    def _send_draft(self, params: dict[str, Any], bot: dict[str, Any]) -> bool:
        now = time.monotonic()
        result = super()._send_draft(params, bot)
        self._preview(int(params.get("chat_id") or 0), now)
        return result

    def _seen(self, chat_id: int, text: str, now: float) -> None:
        """A preview ends with the cursor; the whole answer carries the tag and no cursor."""
        if text.endswith("▍"):
            self._preview(chat_id, now)  # groups: the placeholder message and its edits
        elif (name := find_tag(text)) is not None:
            self._final(name, now)

    def _preview(self, chat_id: int, now: float) -> None:
        # A preview holds the answer so far, maybe not the tag yet: it maps by chat.
        name = self._open_tag.get(chat_id)
        if name is not None and name not in self.final_at:
            self.first_draft_at.setdefault(name, now)
            self.drafts_per_tag[name] = self.drafts_per_tag.get(name, 0) + 1

    def _final(self, name: str, now: float) -> None:
        if name in self.final_at:
            return
        self.final_at[name] = now
        self.final_count += 1
        waiter = self._waiters.pop(name, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(now)
        if self._count_waiter and self.final_count >= self._count_waiter[0]:
            if not self._count_waiter[1].done():
                self._count_waiter[1].set_result(None)
            self._count_waiter = None


class BenchOpenAI(FakeOpenAI):
    """FakeOpenAI answering ANSWER + the question's tag, timestamping each request's stream.

    first_token_at is taken right before the first content chunk is written, done_at after
    the last byte of the stream.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(reply=self._answer, **kwargs)
        self.requested_at: dict[str, float] = {}
        self.embedded_at: dict[str, float] = {}
        self.first_token_at: dict[str, float] = {}
        self.done_at: dict[str, float] = {}

    def _answer(self, body: dict[str, Any]) -> str:
        name = _last_tag(body)
        return f"{ANSWER} (ref {name})" if name else ANSWER

    async def _record(self, request: web.Request) -> Any:
        record = await super()._record(request)
        if not isinstance(record, web.Response):
            name = _last_tag(record.json) if request.path == CHAT_PATH else find_tag(
                str((record.json or {}).get("input"))
            )
            request["bench_tag"] = name
            if name is not None:
                target = self.requested_at if request.path == CHAT_PATH else self.embedded_at
                target.setdefault(name, record.at)
        return record

    async def _sleep(self, request: web.Request, seconds: float) -> None:
        await super()._sleep(request, seconds)
        name = request.get("bench_tag")
        if name is not None and request.path == CHAT_PATH and name not in self.first_token_at:
            self.first_token_at[name] = time.monotonic()

    async def _stream(self, request: web.Request, *args: Any, **kwargs: Any) -> web.StreamResponse:
        response = await super()._stream(request, *args, **kwargs)
        name = request.get("bench_tag")
        if name is not None:
            self.done_at.setdefault(name, time.monotonic())
        return response


def _last_tag(body: Any) -> str | None:
    messages = (body or {}).get("messages") or []
    for message in reversed(messages):
        if message.get("role") == "user":
            return find_tag(str(message.get("content")))
    return None


# ------------------------------------------------------------------- databases


@dataclass
class Database:
    kind: str  # "sqlite" | "postgresql"
    url: str
    pg_name: str | None = None


async def pg_available() -> bool:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(PG_ADMIN_URL)
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
    finally:
        await engine.dispose()


async def _pg_admin(statement: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    admin = create_async_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(statement))
    finally:
        await admin.dispose()


@asynccontextmanager
async def database(kind: str, workdir: Path, label: str,
                   migrated: bool = True) -> AsyncIterator[Database]:
    """A fresh database (a file in workdir, or desktop_bench_* on PostgreSQL), removed after.

    migrated: apply the migrations first (the bench seeds rows before the bot starts).
    """
    from storage.db import create_engine, migrate

    if kind == "sqlite":
        db = Database(kind, f"sqlite+aiosqlite:///{workdir / f'{label}.db'}")
    else:
        name = f"desktop_bench_{label}_{uuid.uuid4().hex[:6]}"
        await _pg_admin(f'CREATE DATABASE "{name}"')
        db = Database(kind, PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}", name)
    if migrated:
        engine = create_engine(db.url)
        try:
            await migrate(engine)
        finally:
            await engine.dispose()
    try:
        yield db
    finally:
        if db.pg_name is not None:
            await _pg_admin(f'DROP DATABASE IF EXISTS "{db.pg_name}" WITH (FORCE)')


# ------------------------------------------------------------ the bot, as a child


@dataclass
class BotProcess:
    """`python -m bench.botproc` (= bot.main(["polling"]) plus opt-in probes) in its own process.

    Its own process, like production: the fakes' CPU is not charged to the bot, and CPU time
    and peak RSS are read per process from /proc.
    """

    env: dict[str, str]
    log_path: Path
    command: Sequence[str] = ()
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    _log: Any = None

    async def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        command = list(self.command) or [sys.executable, "-m", "bench.botproc"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env}
        self.started_at = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            *command, cwd=self.env.get("DATA_DIR", str(ROOT)), env=env,
            stdout=self._log, stderr=self._log, stdin=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self, task: int | None = None) -> float:
        """user + system CPU so far: the whole process, or one thread (task id)."""
        user, system = self.cpu_split(task)
        return user + system

    def cpu_split(self, task: int | None = None) -> tuple[float, float]:
        """(user, system) CPU seconds so far: system is the kernel working for the bot (syscalls)."""
        path = f"/proc/{self.pid}/stat" if task is None else f"/proc/{self.pid}/task/{task}/stat"
        try:
            fields = Path(path).read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            return 0.0, 0.0
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick

    def main_thread_cpu(self) -> float:
        """CPU of the event-loop thread alone (its task id is the pid)."""
        return self.cpu_seconds(self.pid)

    def memory_mb(self) -> tuple[float, float]:
        """(current RSS, peak RSS = VmHWM) in MiB."""
        values: dict[str, float] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
        return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)  # aiogram stops polling; composed() disposes
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._log is not None:
            self._log.close()
        return self.proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def bot_env(tg: FakeTelegram, ai: FakeOpenAI, db: Database, workdir: Path, key: str,
            **extra: object) -> dict[str, str]:
    """The bot's whole configuration, from the environment as in production (no .env file)."""
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "TELEGRAM_TOKEN": TOKEN, "TELEGRAM_API_URL": tg.base_url,
        "OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": ai.base_url,
        "DATABASE_URL": db.url, "DATA_DIR": str(data_dir), "ENCRYPTION_KEY": key,
        "DAILY_TOKEN_LIMIT": "1000000000",  # the budget check runs, but never refuses
        "LOG_LEVEL": "WARNING", "LANGSMITH_TRACING": "false", "MODEL_TIMEOUT": "60",
    }
    env.update({k.upper(): str(v) for k, v in extra.items()})
    return env


async def wait_polling(tg: FakeTelegram, bot: BotProcess, timeout: float = 60.0) -> float:
    """Wait for the bot's first getUpdates; returns its arrival time (time.monotonic())."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for call in tg.calls:
            if call.method == "getUpdates":
                return call.at
        if bot.proc is not None and bot.proc.returncode is not None:
            raise RuntimeError(f"the bot exited with {bot.proc.returncode}:\n{bot.log_tail()}")
        await asyncio.sleep(0.005)
    raise TimeoutError(f"the bot did not start polling within {timeout}s:\n{bot.log_tail()}")


def new_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def install_cipher(key: str) -> None:
    from storage import crypto

    crypto.configure(crypto.Cipher([key]))


@asynccontextmanager
async def workspace(name: str) -> AsyncIterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"desktop-bench-{name}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------- seeding


MEMORY_TEXT = (
    "Title: {title}\nSummary: The user worked on {topic} and asked for a short, concrete plan; "
    "we compared two options and chose the simpler one.\nFacts:\n- The user prefers short "
    "answers\n- The user works in Python\nOpen questions:\n- what to measure first"
)


async def seed_memories(url: str, users: Iterable[int], per_user: int, dims: int,
                        seed: int = 7, space: str | None = None) -> None:
    """Give each user `per_user` stored memories with random unit vectors of `dims` (of the
    embedder `space`; None: the provider's, as rows stored before spaces were recorded).

    Rows go through the ORM models (so the encrypted columns are encrypted exactly as
    LocalMemory.add does), in one transaction per user: thousands of single commits would
    only measure the disk.
    """
    from storage.db import create_engine, session_maker
    from storage.models import ChatSession, MemoryRecord, utcnow
    from storage.repositories import Users

    rng = np.random.default_rng(seed)
    engine = create_engine(url)
    sessions = session_maker(engine)
    try:
        for user_id in users:
            async with sessions() as db:
                await Users(db).ensure(user_id, "en")
                now = utcnow()
                # A closed session per memory would be realistic but is not read on this path.
                closed = ChatSession(user_id=user_id, chat_id=user_id, role="personal_assistant",
                                     title="old", status="closed", started_at=now,
                                     last_activity_at=now, ended_at=now)
                db.add(closed)
                await db.flush()
                vectors = rng.standard_normal((per_user, dims)).astype(np.float32)
                db.add_all(
                    MemoryRecord(
                        id=f"{user_id}:m{i}", user_id=user_id, session_id=closed.id,
                        title=f"Topic {i}", text=MEMORY_TEXT.format(title=f"Topic {i}",
                                                                   topic=f"topic number {i}"),
                        role="personal_assistant", embedding=vectors[i].tobytes(), space=space,
                        started_at=now - dt.timedelta(days=i), ended_at=now,
                    )
                    for i in range(per_user)
                )
                await db.commit()
    finally:
        await engine.dispose()


async def seed_history(url: str, users: Iterable[int], messages: int) -> None:
    """Open a session per user holding `messages` answered messages (user/assistant turns).

    The bot then finds that session open and sends the newest HISTORY_MESSAGES as history.
    """
    from storage.db import create_engine, session_maker
    from storage.models import ChatSession, Message, utcnow
    from storage.repositories import Users

    engine = create_engine(url)
    sessions = session_maker(engine)
    try:
        for user_id in users:
            async with sessions() as db:
                await Users(db).ensure(user_id, "en")
                now = utcnow()
                session = ChatSession(user_id=user_id, chat_id=user_id, role="personal_assistant",
                                      title=None, status="open", started_at=now,
                                      last_activity_at=now)
                db.add(session)
                await db.flush()
                for i in range(messages):
                    user_turn = i % 2 == 0
                    db.add(Message(
                        session_id=session.id, user_id=user_id, chat_id=user_id,
                        role="user" if user_turn else "assistant",
                        text=QUESTION if user_turn else ANSWER,
                        status="answered" if user_turn else "complete",
                        prompt_tokens=20, completion_tokens=0 if user_turn else 80,
                    ))
                await db.commit()
    finally:
        await engine.dispose()


async def read_traces(url: str, since: dt.datetime) -> list[dict[str, Any]]:
    """Turn traces written by the bot since `since`: duration and per-node timings."""
    from sqlalchemy import select

    from storage.db import create_engine, session_maker
    from storage.models import Trace

    engine = create_engine(url)
    try:
        async with session_maker(engine)() as db:
            rows = (await db.execute(
                select(Trace).where(Trace.kind == "turn", Trace.started_at >= since)
            )).scalars().all()
            return [{"duration_ms": r.duration_ms, "outcome": r.outcome, "nodes": r.nodes or []}
                    for r in rows]
    finally:
        await engine.dispose()


# ------------------------------------------------------------------- statistics


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def summary(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values), "p50": pct(values, 50), "p90": pct(values, 90), "p99": pct(values, 99),
        "mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values)),
    }


def node_breakdown(traces: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per node: p50/p99/mean ms; plus 'langgraph (between nodes)' = run minus its nodes."""
    per_node: dict[str, list[float]] = {}
    between: list[float] = []
    for trace in traces:
        total = 0.0
        for node in trace["nodes"]:
            per_node.setdefault(node["node"], []).append(float(node.get("ms", 0.0)))
            total += float(node.get("ms", 0.0))
        between.append(trace["duration_ms"] - total)
    out = {name: summary(values) for name, values in per_node.items()}
    out["(graph bookkeeping between nodes)"] = summary(between)
    return out


# --------------------------------------------------------------------- output


@dataclass
class Check:
    """One target from the issue, compared with what was measured."""

    what: str
    target: str
    measured: str
    passed: bool | None  # None: not measured (e.g. PostgreSQL unavailable)

    def row(self) -> list[str]:
        verdict = {True: "pass", False: "MISS", None: "n/a"}[self.passed]
        return [self.what, self.target, self.measured, verdict]


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> str:
    cells = [[_cell(c) for c in headers]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in cells[1:]) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if numeric[i] else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()

    lines = ([title] if title else []) + [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(row) for row in cells[1:]]
    return "\n".join(lines)


def checks_table(checks: Sequence[Check]) -> str:
    return table(["target", "wanted", "measured", "result"], [c.row() for c in checks],
                 title="Targets")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.2f}"
    return str(value)


def _is_number(text: str) -> bool:
    return bool(re.fullmatch(r"-?[\d,]*\.?\d+( ?%| ms| s| MB)?|-", text))


def calibrate() -> float:
    """CPU ms of a fixed interpreter-bound workload (best of 15): how fast the machine ran at the
    time of a result. This machine's speed drifts by up to 2x within minutes to hours, so
    figures taken at different times compare only after scaling by this."""
    def workload() -> int:
        total = 0
        for i in range(30_000):
            row = {"id": i, "text": f"message {i}", "tags": [i, i + 1]}
            total += len(row["text"]) + sum(row["tags"])
        return total

    best = float("inf")
    for _ in range(15):
        started = time.thread_time()
        workload()
        best = min(best, time.thread_time() - started)
    return best * 1000


_CALIBRATION_AT_START = calibrate()  # every bench imports this module as it starts


def machine() -> dict[str, Any]:
    """Where and on what code the numbers were taken."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    now = calibrate()
    return {
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "implementation": platform.python_implementation(), "platform": platform.platform(),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty_files": len([f for f in git("status", "--porcelain").splitlines() if f]),
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        # The machine's speed at the start of the bench and now (see calibrate).
        "calibration_ms": (_CALIBRATION_AT_START + now) / 2,
        "calibration_start_end_ms": [_CALIBRATION_AT_START, now],
    }


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"bench": name, "machine": machine(), **data}
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if hasattr(value, "__dataclass_fields__"):
        return {k: getattr(value, k) for k in value.__dataclass_fields__}
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@dataclass
class Phase:
    """CPU and wall time of one measured phase: the bot, this (fakes) process, everything else.

    `others_cores` is the CPU used meanwhile by every other process on the machine (PostgreSQL,
    and anything else running): on a shared 2-core machine it says how noisy the numbers are.
    """

    bot: BotProcess
    wall: float = 0.0
    bot_cpu: float = 0.0
    bot_main_cpu: float = 0.0  # the event-loop thread; the rest is aiosqlite's/executor threads
    bot_system_cpu: float = 0.0  # of bot_cpu: in the kernel (socket and file syscalls, epoll)
    fakes_cpu: float = 0.0
    machine_cpu: float = 0.0
    _t0: float = 0.0
    _bot0: float = 0.0
    _main0: float = 0.0
    _system0: float = 0.0
    _self0: float = 0.0
    _machine0: float = 0.0

    def __enter__(self) -> Phase:
        self._t0, self._bot0, self._self0 = time.monotonic(), self.bot.cpu_seconds(), _self_cpu()
        self._main0 = self.bot.main_thread_cpu()
        self._system0 = self.bot.cpu_split()[1]
        self._machine0 = machine_busy_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self._t0
        self.bot_cpu = self.bot.cpu_seconds() - self._bot0
        self.bot_main_cpu = self.bot.main_thread_cpu() - self._main0
        self.bot_system_cpu = self.bot.cpu_split()[1] - self._system0
        self.fakes_cpu = _self_cpu() - self._self0
        self.machine_cpu = machine_busy_seconds() - self._machine0

    @property
    def others_cores(self) -> float:
        return max(0.0, self.machine_cpu - self.bot_cpu - self.fakes_cpu) / max(self.wall, 1e-9)

    def as_dict(self) -> dict[str, float]:
        return {"wall_s": self.wall, "bot_cpu_s": self.bot_cpu,
                "bot_main_thread_cpu_s": self.bot_main_cpu,
                "bot_system_cpu_s": self.bot_system_cpu, "fakes_cpu_s": self.fakes_cpu,
                "machine_cpu_s": self.machine_cpu, "others_cores": self.others_cores}


def gc_summary(path: Path, messages: int) -> dict[str, Any] | None:
    """The bot's cyclic-collector runs over a measured phase (bench/botproc.py BENCH_GC)."""
    if not path.exists() or messages <= 0:
        return None
    data = json.loads(path.read_text())
    generations = data["generations"].values()
    return {
        "thresholds": data["thresholds"],
        "ms_per_message": sum(g["total_s"] for g in generations) * 1000 / messages,
        "longest_pause_ms": max((g["max_s"] for g in generations), default=0.0) * 1000,
        "runs_by_generation": {gen: g["runs"] for gen, g in data["generations"].items()},
    }


def _self_cpu() -> float:
    times = os.times()
    return times.user + times.system


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields[:8]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")


async def wait_quiet(limit_cores: float = 0.25, timeout: float = 15.0) -> float:
    """Wait (up to timeout) until other processes use less than `limit_cores`; returns the load.

    The machine may be shared (other test runs); a phase started under load measures them too.
    """
    deadline = time.monotonic() + timeout
    while True:
        before, own0, t0 = machine_busy_seconds(), _self_cpu(), time.monotonic()
        await asyncio.sleep(1.0)
        load = (machine_busy_seconds() - before - (_self_cpu() - own0)) / (time.monotonic() - t0)
        if load <= limit_cores or time.monotonic() > deadline:
            return load
