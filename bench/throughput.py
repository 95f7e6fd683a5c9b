"""Messages per second one bot process sustains, and many users at once against a slow model."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from typing import Any

from bench.common import (
    RESULTS_DIR,
    BenchOpenAI,
    BenchTelegram,
    BotProcess,
    Check,
    Phase,
    bot_env,
    checks_table,
    database,
    gc_summary,
    install_cipher,
    new_key,
    pg_available,
    seed_history,
    seed_memories,
    summary,
    table,
    tag,
    wait_polling,
    wait_quiet,
    workspace,
    write_result,
)
from bench.overhead import gc_cell

EXPLAIN = """\
What is measured
  One bot process (bench.botproc = bot.main(["polling"])) against the fake Telegram and the fake
  model, both in this bench process. Every user already has an open session (seeded with one
  exchange) and the process is warmed up by other users first. Then N users each send ONE message
  at the same moment (all updates are queued at the fake at once; the bot long-polls them,
  100 per getUpdates), and we wait until every answer's sendMessage has reached the fake.
  burst        zero-latency model: messages/s = N / (last answer - first enqueue);
               "sustained" = the middle 80 % of answers / the time they took
  slow model   first token after 1.0 s (first_token_delay=1.0): time until all are answered;
               users must not wait on each other, so ideally 1 s + N / throughput
  peak RSS     VmHWM of the bot process (/proc), the high-water mark over the whole run
"""

WARMUP_USERS = 60
LOCAL_DIMS = 256  # memory.embedders.LocalEmbedder, the default


async def burst(tg: BenchTelegram, users: list[int], round_no: int,
                timeout: float) -> dict[str, Any]:
    """Everyone asks at once; returns completion times relative to the first enqueue."""
    names = [tag(u, round_no) for u in users]
    expected = tg.final_count + len(names)
    t0 = time.monotonic()
    for user_id in users:
        tg.ask(user_id, round_no)
    try:
        await tg.wait_answers(expected, timeout)
        timed_out = False
    except TimeoutError:
        timed_out = True
    done = sorted(tg.final_at[n] - t0 for n in names if n in tg.final_at)
    latencies = [tg.final_at[n] - tg.enqueued_at[n] for n in names if n in tg.final_at]
    n = len(done)
    result: dict[str, Any] = {
        "users": len(users), "answered": n, "timed_out": timed_out,
        "all_answered_s": done[-1] if done and not timed_out else float("nan"),
        "latency_s": summary(latencies),
        # previews shown before the answer (sendMessageDraft, or placeholder + edits in groups)
        "drafts_per_message": sum(tg.drafts_per_tag.get(name, 0) for name in names) / max(len(names), 1),
    }
    if n >= 10:
        lo, hi = int(n * 0.1), int(n * 0.9) - 1
        result["sustained_per_s"] = (hi - lo) / max(done[hi] - done[lo], 1e-9)
    result["per_s"] = n / done[-1] if done else 0.0
    return result


async def run_db(kind: str, burst_users: int, slow_users: list[int],
                 timeout: float, memories: bool = False) -> dict[str, Any]:
    """One bot on a fresh database: warm-up, the zero-latency burst, then the slow-model bursts.

    memories: every user has one long-term memory, as a returning user does, so each answer
    recalls (the question embedded by the default local model, then searched).
    """
    biggest = max([burst_users, *slow_users])
    users = [100_000 + i for i in range(biggest)]
    warm = [900_000 + i for i in range(WARMUP_USERS)]
    out: dict[str, Any] = {"db": kind}
    async with workspace("throughput") as work, BenchTelegram() as tg, BenchOpenAI() as ai, \
            database(kind, work, "throughput") as db:
        key = new_key()
        install_cipher(key)
        # Sessions exist already (one exchange each): the burst measures answering, not sign-up.
        await seed_history(db.url, users + warm, 2)
        if memories:
            from memory.embedders import LocalEmbedder

            await seed_memories(db.url, users + warm, 1, LOCAL_DIMS, space=LocalEmbedder.space)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        gc_path = RESULTS_DIR / f"gc-throughput-{kind}.json"
        gc_path.unlink(missing_ok=True)
        bot = BotProcess(bot_env(tg, ai, db, work, key, bench_gc=gc_path),
                         RESULTS_DIR / f"throughput-{kind}.log")
        bot.log_path.write_text("")
        await bot.start()
        try:
            await wait_polling(tg, bot)
            await burst(tg, warm, 0, timeout)  # warm the process (caches, pools, connections)
            tg.keep_calls = False
            out["rss_after_warmup_mb"] = bot.memory_mb()[0]
            out["load_before_cores"] = await wait_quiet()
            bot.send_signal(signal.SIGUSR1)  # the collector probe's phase
            with Phase(bot) as phase:
                out["burst"] = await burst(tg, users[:burst_users], 1, timeout)
            bot.send_signal(signal.SIGUSR2)
            out["burst"]["phase"] = phase.as_dict()
            answered = max(out["burst"]["answered"], 1)
            out["burst"]["bot_cpu_ms_per_message"] = phase.bot_cpu / answered * 1000
            out["burst"]["peak_rss_mb"] = bot.memory_mb()[1]
            await asyncio.sleep(0.5)  # the probe writes its report
            out["burst"]["gc"] = gc_summary(gc_path, answered)
            ai.first_token_delay = 1.0
            out["slow"] = []
            for round_no, count in enumerate(slow_users, start=2):
                tg.forget_history()
                await asyncio.sleep(1.0)  # past the 0.3 s draft pacing of the previous round
                await wait_quiet()
                with Phase(bot) as phase:
                    result = await burst(tg, users[:count], round_no, timeout)
                result["phase"] = phase.as_dict()
                rss, peak = bot.memory_mb()
                result["rss_mb"], result["peak_rss_mb"] = rss, peak
                out["slow"].append(result)
        finally:
            out["exit_code"] = await bot.stop()
            out["log_tail"] = bot.log_tail(15)
    return out


def report(results: list[dict[str, Any]]) -> list[Check]:
    print(EXPLAIN)
    rows = []
    for r in results:
        b = r["burst"]
        rows.append([r["db"], b["users"], b["answered"], b["all_answered_s"], b["per_s"],
                     b.get("sustained_per_s", float("nan")), b["latency_s"]["p50"],
                     b["latency_s"]["p99"], b["bot_cpu_ms_per_message"],
                     f"{b.get('drafts_per_message', float('nan')):.2f}",
                     f"{b['phase']['others_cores']:.2f}", b["peak_rss_mb"], gc_cell(b.get("gc"))])
    print(table(["db", "users", "answered", "all in (s)", "msg/s", "sustained msg/s",
                 "latency p50 (s)", "p99 (s)", "bot CPU ms/msg", "drafts/msg", "other load",
                 "peak RSS MB", "GC ms/msg (longest pause)"],
                rows, title="Zero-latency model: N users, one message each, all at once"))
    print()
    rows = []
    for r in results:
        for s in r["slow"]:
            rows.append([r["db"], s["users"], s["answered"], s["all_answered_s"],
                         s["latency_s"]["p50"], s["latency_s"]["p99"], s["latency_s"]["max"],
                         f"{s['phase']['others_cores']:.2f}", s["rss_mb"], s["peak_rss_mb"]])
    print(table(["db", "users", "answered", "all in (s)", "latency p50 (s)", "p99 (s)", "max (s)",
                 "other load", "RSS MB", "peak RSS MB"], rows,
                title="Model answering after 1.0 s: N users, one message each, all at once"))
    print()
    checks: list[Check] = []
    for r in results:
        if r["burst"]["timed_out"] or any(s["timed_out"] for s in r["slow"]):
            print(f"WARNING {r['db']}: some messages got no answer in time; the bot's log ends:\n"
                  f"{r['log_tail']}")
    for r in results:
        db, b = r["db"], r["burst"]
        checks.append(Check(f"{db}: throughput, zero-latency model", ">= 150 msg/s",
                            f"{b['per_s']:.0f} msg/s", b["per_s"] >= 150))
        for s in r["slow"]:
            if s["users"] == 100:
                checks.append(Check(f"{db}: 100 users, 1 s model", "all answered <= 2 s",
                                    f"{s['all_answered_s']:.2f} s", s["all_answered_s"] <= 2.0))
            if s["users"] == 1000:
                limit = (1.0 + 1000 / max(b["per_s"], 1e-9)) * 1.2
                checks.append(Check(f"{db}: 1,000 users, 1 s model",
                                    f"<= (1 s + 1000/{b['per_s']:.0f}) x 1.2 = {limit:.2f} s",
                                    f"{s['all_answered_s']:.2f} s", s["all_answered_s"] <= limit))
                checks.append(Check(f"{db}: peak RSS, 1,000 users in flight", "<= 300 MB",
                                    f"{s['peak_rss_mb']:.0f} MB", s["peak_rss_mb"] <= 300))
    print(checks_table(checks))
    return checks


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__)
    parser.add_argument("--users", type=int, default=500, help="users in the zero-latency burst")
    parser.add_argument("--slow", default="100,1000", help="user counts for the 1 s model")
    # SQLite (the default deployment) alone fits in five minutes at today's speed.
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="sqlite")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per burst")
    args = parser.parse_args(argv)
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    if "postgresql" in kinds and not await pg_available():
        print("PostgreSQL unreachable at 127.0.0.1:5432: SQLite only")
        kinds.remove("postgresql")
    slow = [int(n) for n in args.slow.split(",") if n]
    results = []
    for kind in kinds:
        print(f"running {kind}: burst of {args.users}, then {slow} users on a 1 s model ...",
              flush=True)
        results.append(await run_db(kind, args.users, slow, args.timeout))
    checks = report(results)
    path = write_result("throughput", {"explain": EXPLAIN, "results": results,
                                       "checks": [c.__dict__ for c in checks]})
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
