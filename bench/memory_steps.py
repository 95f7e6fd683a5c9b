"""Child process of bench/floor.py: what the bot holds before its first message, import by import.

Run as `python -m bench.memory_steps`: prints one JSON line per step (its name, RSS after it).
Nothing else of bench/ is imported here (bench.common loads the whole app).
"""

from __future__ import annotations

import gc
import importlib
import json
import sys
from collections.abc import Callable
from typing import Any

# Everything the polling bot imports before its first message (bot.run), one library at a time:
# each step's RSS growth is that library and whatever it pulls in that no earlier step did.
IMPORT_STEPS = (
    ("numpy", "numpy"), ("aiohttp", "aiohttp"), ("SQLAlchemy (asyncio)", "sqlalchemy.ext.asyncio"),
    ("asyncpg", "asyncpg"), ("openai SDK", "openai"), ("LangGraph + langchain-core", "langgraph.graph"),
    ("langchain-openai", "langchain_openai"), ("sentry-sdk", "sentry_sdk"),
    ("cryptography (Fernet)", "cryptography.fernet"), ("redis", "redis.asyncio"),
    ("APScheduler", "apscheduler.schedulers.asyncio"), ("bot.py and settings", "bot"),
)


def rss_mb() -> float:
    """This process's resident memory now (VmRSS), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    def step(name: str, action: Callable[[], Any]) -> None:
        action()
        gc.collect()
        print(json.dumps({"step": name, "rss_mb": rss_mb()}), flush=True)

    step("the interpreter", lambda: None)
    for name, module in IMPORT_STEPS:
        step(name, lambda module=module: importlib.import_module(module))
    from ops.aiogram_lazy import import_aiogram

    step("aiogram (types built on first use)", import_aiogram)
    step("the handlers and the graph", lambda: importlib.import_module("handlers.app"))
    from graph.tokens import encoding_for

    step("tiktoken o200k_base tokenizer", lambda: encoding_for("gpt-4o-mini"))
    return 0


if __name__ == "__main__":
    sys.exit(main())


