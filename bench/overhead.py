"""Per-message overhead of the bot itself, end to end over HTTP with a zero-latency fake model."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
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
    node_breakdown,
    pg_available,
    read_traces,
    seed_memories,
    summary,
    table,
    tag,
    wait_polling,
    wait_quiet,
    workspace,
    write_result,
)
from storage.models import utcnow

EXPLAIN = """\
What is measured
  One bot process (`python -m bench.botproc` = bot.main(["polling"]), the production composition)
  long-polls a fake Telegram and streams from a fake OpenAI that answers at once (~60 one-word
  chunks, like a real stream). Both fakes run in this bench process, so their CPU is not the bot's.
  Messages are sequential: each is sent when the previous answer has arrived (+ a short idle gap),
  each from a different user, so no message waits for another. Every user first sends a warm-up
  message (creates the user, opens the session, loads the memory index); the measured messages
  are the following ones, in the same session.
  end to end   update enqueued at the fake -> the answer's sendMessage received by the fake
               (long-poll wake-up, aiogram, middleware, storing the question, the whole graph,
               trace write, formatting, the HTTP calls to both fakes)
  graph        the trace's duration_ms, written by the bot (graph.tracing.RunTrace): the graph
               run from retrieve_memory to the end of persist, model stream included
  bot CPU      CPU seconds of the bot process over the measured phase / messages
  stages       from the fakes' clocks: poll = enqueue -> getUpdates returns; pre-model =
               -> chat request arrives; model = the fake's stream, first to last byte;
               post-model = stream end -> answer's sendMessage arrives
"""

MEMORIES_PER_USER = 50


async def ask_and_wait(tg: BenchTelegram, user_id: int, round_no: int) -> str:
    name = tag(user_id, round_no)
    answered = tg.answered(name)
    tg.ask(user_id, round_no)
    await asyncio.wait_for(answered, 30)
    return name


async def sequential(tg: BenchTelegram, users: list[int], round_no: int, gap: float) -> list[str]:
    names = []
    for user_id in users:
        names.append(await ask_and_wait(tg, user_id, round_no))
        # The gap lets the bot finish its after-answer work (closing the update's session,
        # the typing task) so each message is timed alone: latency, not queueing.
        await asyncio.sleep(gap)
    return names


def sample(tg: BenchTelegram, ai: BenchOpenAI, name: str) -> dict[str, float | int | None]:
    """One message's timeline, in ms from the moment the update was enqueued."""
    t0 = tg.enqueued_at[name]

    def at(source: dict[str, float]) -> float | None:
        return (source[name] - t0) * 1000 if name in source else None

    return {
        "e2e": at(tg.final_at), "delivered": at(tg.delivered_at),
        "embed_request": at(ai.embedded_at),
        "model_request": at(ai.requested_at), "first_token": at(ai.first_token_at),
        "model_done": at(ai.done_at), "first_draft": at(tg.first_draft_at),
        "drafts": tg.drafts_per_tag.get(name, 0),
    }


def stages(samples: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    def diff(a: str | None, b: str) -> list[float]:
        return [s[b] - (s[a] if a else 0.0) for s in samples
                if s.get(b) is not None and (a is None or s.get(a) is not None)]

    return {
        "poll (enqueue -> getUpdates returns)": summary(diff(None, "delivered")),
        "pre-model (-> chat request)": summary(diff("delivered", "model_request")),
        "model (fake stream, first to last byte)": summary(diff("model_request", "model_done")),
        "post-model (-> answer sendMessage)": summary(diff("model_done", "e2e")),
    }


def config_name(kind: str, memory: bool) -> str:
    return f"{kind}-{'mem' if memory else 'nomem'}"


async def run_config(kind: str, memory: bool, users: int, rounds: int, gap: float,
                     sql: Path | None = None) -> dict[str, Any]:
    """One bot process on a fresh database: warm-up round, then `rounds` measured rounds."""
    config = config_name(kind, memory)
    user_ids = [1000 + i for i in range(users)]
    async with workspace("overhead") as work, BenchTelegram() as tg, BenchOpenAI() as ai, \
            database(kind, work, "overhead") as db:
        key = new_key()
        install_cipher(key)
        if memory:
            await seed_memories(db.url, user_ids, MEMORIES_PER_USER, ai.dims)
        extra: dict[str, object] = {"memory_top_k": 3 if memory else 0}
        if sql is not None:
            extra["bench_sql"] = str(sql)
        gc_path = RESULTS_DIR / f"gc-overhead-{config}.json"
        gc_path.unlink(missing_ok=True)
        extra["bench_gc"] = str(gc_path)
        bot = BotProcess(bot_env(tg, ai, db, work, key, **extra),
                         RESULTS_DIR / f"overhead-{config}.log")
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        bot.log_path.write_text("")
        await bot.start()
        try:
            await wait_polling(tg, bot)
            await sequential(tg, user_ids, 0, gap)  # warm-up
            quiet = await wait_quiet()
            since = utcnow()
            bot.send_signal(signal.SIGUSR1)
            with Phase(bot) as phase:
                names: list[str] = []
                for round_no in range(1, rounds + 1):
                    names += await sequential(tg, user_ids, round_no, gap)
            bot.send_signal(signal.SIGUSR2)
            await asyncio.sleep(1.5)  # the probes write their reports
            rss, peak = bot.memory_mb()
        except TimeoutError:
            raise RuntimeError(f"a message got no answer within 30 s; the bot's log ends:\n"
                               f"{bot.log_tail()}") from None
        finally:
            code = await bot.stop()
        traces = await read_traces(db.url, since)
    samples = [sample(tg, ai, n) for n in names]
    e2e = [s["e2e"] for s in samples if s["e2e"] is not None]
    slow = sum(1 for v in e2e if v > 250)
    return {
        "db": kind, "memory": memory, "messages": len(names),
        "users": users, "rounds": rounds, "gap_ms": gap * 1000, "exit_code": code,
        "e2e_ms": summary(e2e), "graph_ms": summary([t["duration_ms"] for t in traces]),
        "traces": len(traces), "nodes_ms": node_breakdown(traces), "stages_ms": stages(samples),
        "bot_cpu_ms_per_message": phase.bot_cpu / len(names) * 1000,
        "bot_main_thread_cpu_ms_per_message": phase.bot_main_cpu / len(names) * 1000,
        "bot_system_cpu_ms_per_message": phase.bot_system_cpu / len(names) * 1000,
        "fakes_cpu_ms_per_message": phase.fakes_cpu / len(names) * 1000,
        "drafts_per_message": sum(s["drafts"] for s in samples) / len(samples),
        "messages_with_a_draft": sum(1 for s in samples if s["drafts"]),
        "over_250ms": slow, "rss_mb": rss, "peak_rss_mb": peak, "phase": phase.as_dict(),
        "load_before_phase_cores": quiet,
        "sql_per_message": _sql_per_message(sql, len(names)),
        "gc": gc_summary(gc_path, len(names)),
    }


def _sql_per_message(path: Path | None, messages: int) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None
    data = json.loads(path.read_text())
    return {
        "statements": data["total_statements"] / messages, "commits": data["commits"] / messages,
        "savepoints": data["savepoints"] / messages,
        "by_kind": {k: v / messages for k, v in data["statements"].items()},
    }


def gc_cell(gc: dict[str, Any] | None) -> str:
    if gc is None:
        return "n/a"
    return f"{gc['ms_per_message']:.2f} ({gc['longest_pause_ms']:.0f})"


def label(r: dict[str, Any]) -> str:
    return f"{r['db']}/{'mem' if r['memory'] else 'no mem'}"


def report(results: list[dict[str, Any]]) -> list[Check]:
    print(EXPLAIN)
    rows = []
    for r in results:
        e, g = r["e2e_ms"], r["graph_ms"]
        rows.append([
            r["db"], "on" if r["memory"] else "off",
            r["messages"], e["p50"], e["p90"], e["p99"],
            e["max"], g.get("p50", float("nan")), g.get("p99", float("nan")),
            r["bot_cpu_ms_per_message"], r["bot_main_thread_cpu_ms_per_message"],
            r.get("bot_system_cpu_ms_per_message", float("nan")),
            r["fakes_cpu_ms_per_message"], f"{r['drafts_per_message']:.2f}",
            f"{r['phase']['others_cores']:.2f}",
            gc_cell(r.get("gc")),
        ])
    print(table(["db", "memory", "msgs", "e2e p50", "p90", "p99", "max", "graph p50",
                 "graph p99", "bot CPU/msg", "of it loop thread", "of it kernel",
                 "fakes CPU/msg", "drafts/msg",
                 "other load", "GC ms/msg (longest)"], rows,
                title="Per message, ms (end to end = enqueue -> answer's sendMessage at the fake)"))
    print()
    names = list(results[0]["stages_ms"])
    print(table(["stage (p50 ms)"] + [label(r) for r in results],
                [[n] + [r["stages_ms"][n].get("p50", float("nan")) for r in results]
                 for n in names],
                title="Where the end-to-end time goes (fake-side timestamps)"))
    print()
    nodes = list(dict.fromkeys(n for r in results for n in r["nodes_ms"]))
    print(table(["graph node (p50 / mean ms)"] + [label(r) for r in results],
                [[n] + [_pm(r["nodes_ms"].get(n)) for r in results] for n in nodes],
                title="Graph breakdown from the traces table"))
    print()
    sql = [r for r in results if r.get("sql_per_message")]
    for r in sql:
        q = r["sql_per_message"]
        print(f"SQL per message ({label(r)}): {q['statements']:.1f} statements, "
              f"{q['commits']:.1f} commits, {q['savepoints']:.1f} savepoints")
        print("  " + ", ".join(f"{k} {v:.1f}" for k, v in q["by_kind"].items()))
    print()
    checks: list[Check] = []
    for kind in ("sqlite", "postgresql"):
        for memory in (False, True):
            found = [r for r in results if r["db"] == kind and r["memory"] == memory]
            what = f"overhead {kind}, memory {'on' if memory else 'off'}"
            if not found:
                checks.append(Check(f"{what} p50", "<= 10 ms", "not run", None))
                continue
            e = found[0]["e2e_ms"]
            checks.append(Check(f"{what} p50", "<= 10 ms", f"{e['p50']:.1f} ms", e["p50"] <= 10))
            checks.append(Check(f"{what} p99", "<= 30 ms", f"{e['p99']:.1f} ms", e["p99"] <= 30))
    print(checks_table(checks))
    flagged = [r for r in results if r["over_250ms"]]
    for r in flagged:
        print(f"note: {label(r)}: {r['over_250ms']} messages over 250 ms")
    return checks


def _pm(s: dict[str, float] | None) -> str:
    if not s or not s.get("n"):
        return "-"
    return f"{s['p50']:.2f} / {s['mean']:.2f}"


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__)
    parser.add_argument("--users", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2, help="measured messages per user")
    parser.add_argument("--gap", type=float, default=0.005, help="idle seconds between messages")
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--memory", choices=["on", "off", "both"], default="both")
    parser.add_argument("--sql", action="store_true",
                        help="count SQL statements and commits per message in the bot")
    args = parser.parse_args(argv)
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    if "postgresql" in kinds and not await pg_available():
        print("PostgreSQL unreachable at 127.0.0.1:5432: SQLite only")
        kinds.remove("postgresql")
    memories = {"on": [True], "off": [False], "both": [False, True]}[args.memory]
    results = []
    for kind in kinds:
        for memory in memories:
            name = config_name(kind, memory)
            print(f"running {name}: {args.users} users x {args.rounds} measured messages ...",
                  flush=True)
            sql = RESULTS_DIR / f"sql-overhead-{name}.json" if args.sql else None
            results.append(await run_config(kind, memory, args.users, args.rounds, args.gap, sql))
    checks = report(results)
    path = write_result("overhead", {"explain": EXPLAIN, "results": results,
                                     "checks": [c.__dict__ for c in checks]})
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
