"""Lean: the four figures an operator or a user feels first, with their targets, in one run.

first reaction (one user at a time, a 1 s model), start-up to the first getUpdates (fresh and
warm data directory), peak RSS with 200 users at once, and with 1,000 answers in flight on a
1 s model; answers per second at 200 users at once beside them (what the lean must not cost).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

from bench import startup, throughput
from bench.common import (
    RESULTS_DIR,
    BenchOpenAI,
    BenchTelegram,
    BotProcess,
    Check,
    bot_env,
    checks_table,
    database,
    install_cipher,
    new_key,
    seed_history,
    summary,
    table,
    tag,
    wait_polling,
    workspace,
    write_result,
)

EXPLAIN = """\
What is measured (each a bot process of its own, SQLite, against the fakes on loopback)
  first reaction  the update handed to the bot (the fake's getUpdates answers with it) -> the
                  first thing the user sees in that chat reaching the fake: sendChatAction,
                  sendMessageDraft (an empty one is Telegram's "Thinking..."), sendMessage.
                  One message at a time, each from a user with an open session; the model
                  answers after 1 s. Private chats and groups (the bot mentioned).
  start-up        `python bot.py` to its first getUpdates (bench.startup): fresh = an empty
                  data directory and database (migrations, key file); warm = the same again.
  200 at once     200 users, one message each at the same moment, zero-latency model, after a
                  warm-up of 60 (bench.throughput): answers per second and the peak RSS (VmHWM).
                  Every user has one long-term memory, as returning users do: each answer
                  recalls, so the default local embedder is loaded and in the figure.
  1,000 in flight 1,000 users at once on a 1 s model, same process: its peak RSS
"""

MODEL_LATENCY = 1.0
VISIBLE = ("sendChatAction", "sendMessageDraft", "sendMessage")
TARGETS = {"reaction_ms": 100.0, "fresh_s": 1.5, "warm_s": 1.0, "rss200_mb": 200.0,
           "rss1000_mb": 240.0}


def first_visible(tg: BenchTelegram, chat_id: int, since: float) -> float | None:
    times = [c.at for c in tg.calls if c.method in VISIBLE and c.at >= since
             and str(c.params.get("chat_id")) == str(chat_id)]
    return min(times) if times else None


async def reactions(messages: int) -> dict[str, Any]:
    private = [400_000 + i for i in range(messages)]
    groups = [500_000 + i for i in range(messages)]
    out: dict[str, Any] = {}
    async with workspace("lean") as work, BenchTelegram() as tg, BenchOpenAI() as ai, \
            database("sqlite", work, "lean") as db:
        key = new_key()
        install_cipher(key)
        await seed_history(db.url, private, 2)
        bot = BotProcess(bot_env(tg, ai, db, work, key), RESULTS_DIR / "lean.log")
        bot.log_path.write_text("")
        await bot.start()
        try:
            await wait_polling(tg, bot)
            for user in (900_001, 900_002):  # warm-up: the process's first answers
                await asyncio.wait_for(tg.answered(tg.ask(user, 0)), 60)
            ai.first_token_delay = MODEL_LATENCY
            for label, users, group in (("private", private, False), ("group", groups, True)):
                delays = []
                for user in users:
                    chat = -user if group else user
                    name = tag(user, 1)
                    answered = tg.answered(name)
                    tg.ask(user, 1, chat_id=chat if group else None)
                    await asyncio.wait_for(answered, 60)
                    seen = first_visible(tg, chat, tg.delivered_at[name])
                    if seen is not None:
                        delays.append((seen - tg.delivered_at[name]) * 1000)
                    await asyncio.sleep(0.4)  # past the chat's pacing; users are apart anyway
                out[label] = summary(delays)
        finally:
            await bot.stop()
    return out


async def startups(runs: int) -> dict[str, list[dict[str, float]]]:
    fresh: list[dict[str, float]] = []
    warm: list[dict[str, float]] = []
    async with BenchTelegram() as tg, BenchOpenAI() as ai:
        for i in range(runs):
            async with workspace("lean-startup") as work, \
                    database("sqlite", work, "lean-startup", migrated=False) as db:
                key = new_key()
                fresh.append(await startup.one_start("sqlite", db.url, work, key, tg, ai,
                                                     f"lean-{i}"))
                warm.append(await startup.one_start("sqlite", db.url, work, key, tg, ai,
                                                    f"lean-{i}w"))
    return {"fresh": fresh, "warm": warm}


def figures(data: dict[str, Any]) -> dict[str, float]:
    """The key figures, by name (bench/compare.py reads the same names)."""
    load = data["load"]
    thousand = [s for s in load.get("slow", []) if s.get("users") == 1000]
    return {
        "reaction_ms": data["reaction"]["private"].get("p50", float("nan")),
        "reaction_group_ms": data["reaction"]["group"].get("p50", float("nan")),
        "fresh_s": statistics.median(r["ready_s"] for r in data["startup"]["fresh"]),
        "warm_s": statistics.median(r["ready_s"] for r in data["startup"]["warm"]),
        "rss200_mb": load["burst"]["peak_rss_mb"],
        "answers_per_s_200": load["burst"]["per_s"],
        "rss1000_mb": thousand[0]["peak_rss_mb"] if thousand else float("nan"),
    }


def report(data: dict[str, Any]) -> list[Check]:
    print(EXPLAIN)
    rows = [[label, r.get("n", 0), r.get("p50", float("nan")), r.get("p90", float("nan")),
             r.get("max", float("nan"))] for label, r in data["reaction"].items()]
    print(table(["chat", "messages", "p50 (ms)", "p90 (ms)", "max (ms)"], rows,
                title=f"First reaction, model answering after {MODEL_LATENCY:.0f} s"))
    print()
    rows = [[label, len(r), statistics.median(x["ready_s"] for x in r),
             min(x["ready_s"] for x in r), max(x["ready_s"] for x in r),
             statistics.median(x["rss_ready_mb"] for x in r)]
            for label, r in data["startup"].items()]
    print(table(["start", "runs", "ready (s)", "min", "max", "RSS ready (MB)"], rows,
                title="python bot.py to its first getUpdates (SQLite)"))
    print()
    f = figures(data)
    checks = [
        Check("first reaction, private chat (p50)", "<= 100 ms", f"{f['reaction_ms']:.0f} ms",
              f["reaction_ms"] <= TARGETS["reaction_ms"]),
        Check("first reaction, group (p50)", "<= 100 ms", f"{f['reaction_group_ms']:.0f} ms",
              f["reaction_group_ms"] <= TARGETS["reaction_ms"]),
        Check("start-up to first getUpdates, fresh", "<= 1.5 s", f"{f['fresh_s']:.2f} s",
              f["fresh_s"] <= TARGETS["fresh_s"]),
        Check("start-up to first getUpdates, warm", "<= 1 s", f"{f['warm_s']:.2f} s",
              f["warm_s"] <= TARGETS["warm_s"]),
        Check("peak RSS, 200 users at once", "<= 200 MB", f"{f['rss200_mb']:.0f} MB",
              f["rss200_mb"] <= TARGETS["rss200_mb"]),
        Check("peak RSS, 1,000 users in flight", "<= 240 MB", f"{f['rss1000_mb']:.0f} MB",
              f["rss1000_mb"] <= TARGETS["rss1000_mb"]),
    ]
    print(checks_table(checks))
    print(f"\nanswers per second, 200 users at once: {f['answers_per_s_200']:.1f} "
          "(compare against the revision before with python -m bench compare)")
    return checks


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lean", description=__doc__)
    parser.add_argument("--messages", type=int, default=10, help="first reactions per chat kind")
    parser.add_argument("--runs", type=int, default=3, help="start-ups of each kind")
    args = parser.parse_args(argv)
    began = time.monotonic()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)  # a fresh checkout has none (bench compare)
    print("first reaction ...", flush=True)
    data: dict[str, Any] = {"reaction": await reactions(args.messages)}
    print("start-up ...", flush=True)
    data["startup"] = await startups(args.runs)
    print("200 users at once, then 1,000 on a 1 s model ...", flush=True)
    data["load"] = await throughput.run_db("sqlite", 200, [1000], 150.0, memories=True)
    checks = report(data)
    path = write_result("lean", {"explain": EXPLAIN, **data, "figures": figures(data),
                                 "checks": [c.__dict__ for c in checks]})
    print(f"\nwritten: {path} ({time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
