"""Time from the model's first token to the first preview the user sees (draft or placeholder)."""

from __future__ import annotations

import argparse
import asyncio
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
    install_cipher,
    new_key,
    seed_history,
    summary,
    table,
    tag,
    wait_polling,
    wait_quiet,
    workspace,
    write_result,
)

EXPLAIN = """\
What is measured
  One bot process (bench.botproc = bot.main(["polling"])) and the two fakes in this process.
  The fake model waits first_token_delay, then streams the ~60-word answer one word per chunk
  every chunk_delay seconds. All timestamps are this process's monotonic clock:
  first token   the fake model is about to write the first content chunk (BenchOpenAI._sleep)
  first visible the first sendMessageDraft (private chat) or the placeholder sendMessage
                (group) reaching the fake Telegram
  => first visible - first token; the target is <= 300 ms
  last token -> answer   the fake model wrote the end of the stream -> the whole answer's
                sendMessage (private) / final edit (group) reached the fake: what the user waits
                after the model is done
  Messages are from different users (a fresh chat each, so no pacing is carried over).
  sequential: one message at a time; concurrent: N users ask at the same moment.
"""

FIRST_TOKEN_DELAY = 0.3
CHUNK_DELAY = 0.02  # 50 chunks/s: a fast provider; the 60-word answer streams in ~1.3 s


def timings(tg: BenchTelegram, ai: BenchOpenAI, names: list[str]) -> dict[str, Any]:
    visible = [(tg.first_draft_at[n] - ai.first_token_at[n]) * 1000 for n in names
               if n in tg.first_draft_at and n in ai.first_token_at]
    final = [(tg.final_at[n] - ai.done_at[n]) * 1000 for n in names
             if n in tg.final_at and n in ai.done_at]
    cadence = []
    for n in names:
        if n in tg.first_draft_at and n in tg.final_at and tg.drafts_per_tag.get(n, 0) > 1:
            span = (ai.done_at.get(n, tg.final_at[n]) - tg.first_draft_at[n]) * 1000
            cadence.append(span / (tg.drafts_per_tag[n] - 1))
    return {
        "messages": len(names), "with_preview": len(visible),
        "first_visible_ms": summary(visible), "last_token_to_answer_ms": summary(final),
        "previews_per_message":
            sum(tg.drafts_per_tag.get(n, 0) for n in names) / max(len(names), 1),
        "preview_interval_ms": summary(cadence),
    }


async def sequential(tg: BenchTelegram, users: list[int], round_no: int, group: bool) -> list[str]:
    names = []
    for user_id in users:
        name = tag(user_id, round_no)
        answered = tg.answered(name)
        tg.ask(user_id, round_no, chat_id=-user_id if group else None)
        await asyncio.wait_for(answered, 60)
        names.append(name)
        await asyncio.sleep(0.05)
    return names


async def concurrent(tg: BenchTelegram, users: list[int], round_no: int) -> list[str]:
    names = [tag(u, round_no) for u in users]
    waits = [tg.answered(n) for n in names]
    for user_id in users:
        tg.ask(user_id, round_no)
    await asyncio.wait_for(asyncio.gather(*waits), 120)
    return names


async def run(sequential_users: int, concurrent_users: int) -> list[dict[str, Any]]:
    private = [200_000 + i for i in range(max(sequential_users, concurrent_users))]
    groups = [300_000 + i for i in range(sequential_users)]
    results: list[dict[str, Any]] = []
    async with workspace("streaming") as work, BenchTelegram() as tg, BenchOpenAI() as ai, \
            database("sqlite", work, "streaming") as db:
        key = new_key()
        install_cipher(key)
        await seed_history(db.url, private, 2)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        bot = BotProcess(bot_env(tg, ai, db, work, key), RESULTS_DIR / "streaming.log")
        bot.log_path.write_text("")
        await bot.start()
        try:
            await wait_polling(tg, bot)
            # Warm-up: group chats get their sessions here, everyone's process caches too.
            await sequential(tg, groups[:5], 0, group=True)
            await sequential(tg, private[:5], 0, group=False)
            ai.first_token_delay, ai.chunk_delay = FIRST_TOKEN_DELAY, CHUNK_DELAY
            for label, coro in (
                ("private, sequential",
                 lambda: sequential(tg, private[:sequential_users], 1, False)),
                ("group, sequential", lambda: sequential(tg, groups, 1, True)),
                (f"private, {concurrent_users} at once",
                 lambda: concurrent(tg, private[:concurrent_users], 2)),
            ):
                await wait_quiet()
                with Phase(bot) as phase:
                    names = await coro()
                results.append({"scenario": label, **timings(tg, ai, names),
                                "phase": phase.as_dict()})
                await asyncio.sleep(0.5)
            # Zero-latency model: is a preview shown at all before the answer?
            ai.first_token_delay, ai.chunk_delay = 0.0, 0.0
            names = await sequential(tg, private[:sequential_users], 3, False)
            results.append({"scenario": "private, zero-latency model", **timings(tg, ai, names)})
        except TimeoutError:
            raise RuntimeError(f"a message got no answer in time; the bot's log ends:\n"
                               f"{bot.log_tail()}") from None
        finally:
            await bot.stop()
    return results


def report(results: list[dict[str, Any]]) -> list[Check]:
    print(EXPLAIN)
    print(f"model: first token after {FIRST_TOKEN_DELAY * 1000:.0f} ms, then a chunk every "
          f"{CHUNK_DELAY * 1000:.0f} ms (zero-latency row: no delays)\n")
    rows = []
    for r in results:
        v, f = r["first_visible_ms"], r["last_token_to_answer_ms"]
        rows.append([r["scenario"], r["messages"], r["with_preview"], v.get("p50", float("nan")),
                     v.get("p90", float("nan")), v.get("max", float("nan")),
                     f.get("p50", float("nan")),
                     f.get("max", float("nan")), f"{r['previews_per_message']:.1f}",
                     r["preview_interval_ms"].get("p50", float("nan"))])
    print(table(["scenario", "msgs", "with preview", "first visible p50", "p90", "max",
                 "last token->answer p50", "max", "previews/msg", "preview every (ms)"], rows,
                title="First visible token and the end of the answer (ms)"))
    print()
    checks = []
    for r in results:
        if r["scenario"].endswith("zero-latency model"):
            continue
        p50 = r["first_visible_ms"].get("p50", float("nan"))
        p90 = r["first_visible_ms"].get("p90", float("nan"))
        checks.append(Check(f"first visible token, {r['scenario']}", "<= 300 ms (p50 / p90)",
                            f"{p50:.0f} / {p90:.0f} ms", p90 <= 300))
    print(checks_table(checks))
    return checks


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streaming", description=__doc__)
    parser.add_argument("--users", type=int, default=20, help="sequential messages per scenario")
    parser.add_argument("--concurrent", type=int, default=50, help="users asking at once")
    args = parser.parse_args(argv)
    began = time.monotonic()
    results = await run(args.users, args.concurrent)
    checks = report(results)
    path = write_result("streaming", {"explain": EXPLAIN, "results": results,
                                      "first_token_delay_s": FIRST_TOKEN_DELAY,
                                      "chunk_delay_s": CHUNK_DELAY,
                                      "checks": [c.__dict__ for c in checks]})
    print(f"\nwritten: {path} ({time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
