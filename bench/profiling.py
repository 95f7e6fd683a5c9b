"""py-spy around a measured phase, and a reader that turns its folded stacks into CPU tables."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

# py-spy frame: "function (path/to/file.py:123)"
_FRAME_RE = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


class PySpy:
    """`py-spy record` on a running pid (only CPU samples: idle threads are not counted)."""

    def __init__(self, pid: int, out: Path, rate: int = 500) -> None:
        self.pid, self.out, self.rate = pid, out, rate
        self.proc: asyncio.subprocess.Process | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("py-spy") is not None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "py-spy", "record", "--pid", str(self.pid), "--rate", str(self.rate),
            "--format", "raw", "--output", str(self.out), "--nonblocking", "--threads",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        await asyncio.sleep(0.5)  # attach before the phase starts

    async def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)  # py-spy writes the profile on Ctrl-C
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()


ROOT = Path(__file__).resolve().parent.parent
PROJECT_TOPS = {"bot.py", "settings.py", "console.py", "graph", "handlers", "storage", "memory",
                "bench", "tests"}
# py-spy prints paths relative to sys.path entries; langgraph's subpackages lose their prefix.
ALIASES = {"pregel": "langgraph", "_internal": "langgraph", "channels": "langgraph",
           "managed": "langgraph", "func": "langgraph", "utils": "langgraph?"}


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", f"{ROOT}/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def is_project(path: str, func: str = "") -> bool:
    short = _short(path)
    if short == "graph/state.py" and "Graph" in func:
        return False  # langgraph's graph/state.py, not ours (ours holds only TypedDicts)
    return short.split("/", 1)[0] in PROJECT_TOPS and (ROOT / short).exists()


def _package(path: str, func: str = "") -> str:
    """Bucket a frame's file: a project package, a third-party package, or the stdlib module."""
    short = _short(path)
    top = short.split("/", 1)[0].removesuffix(".py")
    if is_project(path, func):
        return f"project:{top}"
    if short.startswith("<frozen"):
        return "stdlib:import"
    if top in sys.stdlib_module_names:
        return f"stdlib:{top}"
    if short == "graph/state.py":
        return "langgraph"
    return ALIASES.get(top, top)


def read_folded(path: Path) -> list[tuple[str, list[tuple[str, str, str]], int]]:
    """[(thread, frames root->leaf as (function, file, line), samples)] from a py-spy raw file."""
    stacks = []
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count = raw.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames, thread = [], "?"
        for part in stack.split(";"):
            if part.startswith("thread ("):
                thread = part
                continue
            found = _FRAME_RE.match(part)
            if found is None:
                continue  # the "process ..." root
            frames.append((found["func"], found["file"], found["line"] or ""))
        if frames:
            stacks.append((_thread_kind(thread, frames), frames, int(count)))
    return stacks


def _thread_kind(thread: str, frames: list[tuple[str, str, str]]) -> str:
    """main (the event loop), sqlite (aiosqlite's worker), or another worker thread."""
    names = " ".join(f[0] for f in frames[:6])
    if "_connection_worker_thread" in names or "aiosqlite" in " ".join(f[1] for f in frames[:6]):
        return "aiosqlite worker"
    if "_bootstrap" in names:
        return "other threads"
    return "main (event loop)"


def cpu_tables(path: Path, top: int = 25, focus: tuple[str, ...] = ()) -> dict[str, object]:
    """Self CPU by package and by function; inclusive CPU of project functions (file:line)."""
    stacks = read_folded(path)
    total = sum(count for _, _, count in stacks) or 1
    by_thread: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    self_fn: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    inclusive_fn: Counter[str] = Counter()
    for thread, frames, count in stacks:
        by_thread[thread] += count
        leaf = frames[-1]
        by_package[_package(leaf[1], leaf[0])] += count
        self_fn[f"{leaf[0]} ({_short(leaf[1])})"] += count
        seen: set[str] = set()
        for func, file, line in frames:
            if not is_project(file, func) and not any(f in file for f in focus):
                continue
            for key in (f"{func} ({_short(file)}:{line})", f"{func} ({_short(file)})"):
                if key not in seen:
                    seen.add(key)
                    (inclusive if key.endswith(f":{line})") else inclusive_fn)[key] += count

    def pct(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(k, 100.0 * v / total) for k, v in counter.most_common(n)]

    return {
        "samples": total, "by_thread": pct(by_thread, 5), "self_by_package": pct(by_package, top),
        "inclusive_by_function": pct(inclusive_fn, top * 2),
        "self_by_function": pct(self_fn, top), "inclusive_project": pct(inclusive, top * 2),
    }


MODEL = "model client (openai SDK + langchain + HTTP transport)"
TELEGRAM = "Telegram client (aiogram + aiohttp)"
SHARED_TRANSPORT = ("aiohttp/", "multidict/", "yarl/")  # aiogram's and the model client's

# Leaf-first: a sample belongs to the most specific layer on its stack. Generic layers
# (pydantic, asyncio, typing...) are skipped so that e.g. pydantic inside aiogram counts as
# aiogram and pydantic inside the openai SDK counts as the model client.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("encryption (Fernet)", ("cryptography/",)),
    ("token counting (tiktoken)", ("tiktoken/", "graph/tokens.py")),
    ("answer formatting", ("handlers/formatting.py",)),
    ("database (SQLAlchemy + driver)", ("sqlalchemy/", "aiosqlite/", "asyncpg/", "greenlet",
                                        "storage/", "sqlite3/", "<sqlalchemy")),
    (MODEL, (
        "openai/", "httpx2/", "httpcore2/", "httpx/", "httpcore/", "h11/", "anyio/",
        "langchain_openai/", "langchain_core/", "jiter", "graph/model.py")),
    (TELEGRAM, ("aiogram/", "aiohttp/", "multidict/", "yarl/",
                                             "handlers/flood.py", "handlers/streaming.py")),
    ("LangGraph", ("pregel/", "_internal/", "channels/", "langgraph/", "graph/state.py",
                   "managed/")),
)
GENERIC = ("pydantic", "asyncio/", "typing", "inspect.py", "contextlib.py", "json/", "enum.py",
           "functools.py", "dataclasses.py", "abc.py", "weakref", "_weakrefset.py", "copy.py",
           "re/", "uuid.py", "<frozen", "threading.py", "queue.py", "concurrent/", "socket.py",
           "selectors.py", "ssl.py", "logging/", "collections/", "types.py", "warnings.py",
           "contextvars", "base64.py", "datetime.py", "string.py", "email/", "http/",
           "urllib/", "codecs.py", "encodings/", "_collections_abc.py", "operator.py")
# Waiting, not working: py-spy --nonblocking sometimes counts these waits as active.
# (The event loop's own epoll calls are NOT listed: the loop thread's CPU from /proc agrees
# with py-spy's count including them.)
IDLE = (("_connection_worker_thread", "aiosqlite/core.py"),
        ("_worker", "concurrent/futures/thread.py"), ("wait", "threading.py"))


def categorise(path: Path) -> dict[str, float]:
    """CPU samples by layer (see CATEGORIES), idle waits apart; values are sample counts."""
    counts: Counter[str] = Counter()
    for _thread, frames, count in read_folded(path):
        leaf_func, leaf_file, _ = frames[-1]
        if any(leaf_func.endswith(f) and leaf_file.endswith(p) for f, p in IDLE):
            counts["(idle wait misread as CPU)"] += count
            continue
        counts[_category(frames)] += count
    return dict(counts.most_common())


def _under_model(frames: list[tuple[str, str, str]]) -> bool:
    return any(_short(file).startswith(("openai/", "graph/model.py")) for _f, file, _l in frames)


def _category(frames: list[tuple[str, str, str]]) -> str:
    for func, file, _line in reversed(frames):
        short = _short(file)
        if short in ("bot.py", "bench/botproc.py"):
            continue  # the entry point: whatever runs under it is the event loop's
        if short == "selectors.py":
            return "event loop: epoll wait/wake-ups (selectors)"
        if any(short.startswith(g) for g in GENERIC):
            continue  # pydantic, asyncio, typing...: charged to the layer that called them
        if short == "graph/state.py" and "Graph" not in func:
            continue
        for name, markers in CATEGORIES:
            if any(short.startswith(m) for m in markers):
                if name == "LangGraph" and is_project(file, func):
                    break
                if name == TELEGRAM and short.startswith(SHARED_TRANSPORT) and _under_model(frames):
                    return MODEL  # the openai SDK's aiohttp transport, not aiogram's
                return name
        if is_project(file, func):
            return f"project code ({short.split('/', 1)[0]})"
        return f"other ({short.split('/', 1)[0]})"
    return "event loop (asyncio scheduling, sockets)"
