"""Start-up: `python bot.py` (polling) from launch to its first getUpdates, and the import time."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    ROOT,
    BenchOpenAI,
    BenchTelegram,
    BotProcess,
    Check,
    bot_env,
    checks_table,
    database,
    new_key,
    pg_available,
    table,
    wait_polling,
    workspace,
    write_result,
)

EXPLAIN = """\
What is measured
  `python bot.py` (polling mode, the real entry point) as a subprocess, configured by the
  environment only: TELEGRAM_API_URL at a fake Telegram and OPENAI_BASE_URL at a fake model,
  both in this process. Times are this process's monotonic clock from just before the
  subprocess is spawned:
  first API call   the first request at the fake Telegram (deleteWebhook): interpreter, imports,
                   settings, encryption key, migrations, composing the services
  ready            the first getUpdates at the fake: + aiogram start-up (getMe, the command menu,
                   crash recovery), i.e. the bot can receive messages
  stop             SIGINT -> the process has exited (graceful drain, engine disposed)
  fresh db = an empty database (every migration runs; the key file is created);
  restart  = the same database again. Median of the runs.
  import   wall time of `python -c "import <what start-up imports>"` minus `python -c pass`,
           and the heaviest top-level packages from `python -X importtime`; aiogram is
           imported as bot.py imports it (ops.aiogram_lazy: Telegram types built on first use).
"""

# What `python bot.py` imports on its way to polling (bot.composed + handlers.app).
APP_MODULES = ("handlers.app", "graph.agent", "graph.model", "graph.roles", "memory.local",
               "storage.db", "storage.rotation", "storage.crypto")


async def one_start(kind: str, db_url: str, work: Path, key: str, tg: BenchTelegram,
                    ai: BenchOpenAI, label: str) -> dict[str, float]:
    from bench.common import Database

    tg.calls.clear()
    env = bot_env(tg, ai, Database(kind, db_url), work, key)
    env["LOG_LEVEL"] = "WARNING"
    bot = BotProcess(env, RESULTS_DIR / f"startup-{label}.log",
                     command=[sys.executable, str(ROOT / "bot.py")])
    await bot.start()
    t0 = bot.started_at
    try:
        ready = await wait_polling(tg, bot, timeout=60)
        first = min(c.at for c in tg.calls)
        rss = bot.memory_mb()[0]
    finally:
        stop_began = time.monotonic()
        code = await bot.stop(timeout=60)
        stopped = time.monotonic() - stop_began
    return {"first_call_s": first - t0, "ready_s": ready - t0, "stop_s": stopped,
            "rss_ready_mb": rss, "exit_code": float(code if code is not None else -1)}


def import_time(runs: int) -> dict[str, Any]:
    """Median wall time of importing the app, and the top packages by -X importtime."""
    # As bot.py does before the handlers import aiogram (the Message and Update types and the
    # answering methods are still built here; the other types on first use).
    statement = ("from ops.aiogram_lazy import import_aiogram; import_aiogram(); import "
                 + ", ".join(APP_MODULES))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def wall(code: str) -> float:
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
        return time.perf_counter() - began

    baseline = statistics.median(wall("pass") for _ in range(runs))
    app = statistics.median(wall(statement) for _ in range(runs))
    trace = subprocess.run([sys.executable, "-X", "importtime", "-c", statement], cwd=ROOT,
                           env=env, capture_output=True, text=True, check=True).stderr
    top: dict[str, float] = {}
    for line in trace.splitlines():
        # "import time: self [us] | cumulative | imported package": self time, summed per
        # root package, says which distribution the import time is spent in.
        found = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if found:
            name = found.group(2).split(".")[0]
            top[name] = top.get(name, 0.0) + int(found.group(1)) / 1e6
    heaviest = sorted(top.items(), key=lambda kv: -kv[1])[:12]
    return {"python_s": baseline, "app_s": app, "import_s": app - baseline, "heaviest": heaviest}


async def run(runs: int, with_pg: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": {}}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    async with BenchTelegram() as tg, BenchOpenAI() as ai:
        kinds = ["sqlite"] + (["postgresql"] if with_pg else [])
        for kind in kinds:
            fresh: list[dict[str, float]] = []
            restart: list[dict[str, float]] = []
            for i in range(runs):
                async with workspace("startup") as work, \
                        database(kind, work, "startup", migrated=False) as db:
                    key = new_key()
                    fresh.append(await one_start(kind, db.url, work, key, tg, ai, f"{kind}-{i}"))
                    restart.append(await one_start(kind, db.url, work, key, tg, ai, f"{kind}-{i}r"))
                print(f"  {kind} run {i + 1}: fresh {fresh[-1]['ready_s']:.2f} s, "
                      f"restart {restart[-1]['ready_s']:.2f} s", flush=True)
            out["runs"][kind] = {"fresh": fresh, "restart": restart}
    out["import"] = import_time(runs)
    return out


def median_of(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def report(data: dict[str, Any]) -> list[Check]:
    print(EXPLAIN)
    rows = []
    for kind, runs in data["runs"].items():
        for label in ("fresh", "restart"):
            r = runs[label]
            rows.append([kind, label, len(r), median_of(r, "first_call_s"), median_of(r, "ready_s"),
                         min(x["ready_s"] for x in r), max(x["ready_s"] for x in r),
                         median_of(r, "stop_s"), median_of(r, "rss_ready_mb")])
    print(table(["db", "start", "runs", "first API call (s)", "ready (s)", "min", "max",
                 "stop (s)", "RSS ready (MB)"], rows, title="python bot.py (median)"))
    imp = data["import"]
    print(f"\nimport of {', '.join(APP_MODULES)}: {imp['import_s']:.2f} s "
          f"(python itself: {imp['python_s']:.2f} s)")
    print(table(["package", "import s (self, summed)"], imp["heaviest"]))
    print()
    checks = []
    for kind, runs in data["runs"].items():
        for label in ("fresh", "restart"):
            ready = median_of(runs[label], "ready_s")
            checks.append(Check(f"start-up to ready, {kind}, {label}", "<= 3 s",
                                f"{ready:.2f} s", ready <= 3.0))
    print(checks_table(checks))
    return checks


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--db", choices=["sqlite", "both"], default="both")
    args = parser.parse_args(argv)
    with_pg = args.db == "both" and await pg_available()
    data = await run(args.runs, with_pg)
    checks = report(data)
    path = write_result("startup", {"explain": EXPLAIN, **data,
                                    "checks": [c.__dict__ for c in checks]})
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
