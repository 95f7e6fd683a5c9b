"""Long-term memory recall on LoCoMo: the bot's own units, index, embedder and fusion, per design."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    Check,
    checks_table,
    install_cipher,
    new_key,
    summary,
    table,
    workspace,
    write_result,
)

DATA = ROOT.parent / "shared" / "data" / "locomo10.json"

EXPLAIN = """\
What is measured (in this process; no model, no Telegram, no test doubles for retrieval)
  LoCoMo (Maharana et al., ACL 2024; CC BY-NC 4.0, read from ../shared/data, never copied):
  10 long conversations, each one user of the bot, each session one of the user's sessions.
  What the bot would remember of a session is built by its own memory/units.py from:
    summary    the authors' session summary (standing in for the summariser's; no LLM offline)
    facts      the authors' observations about both speakers (the summariser's "Facts")
    exchanges  the raw turns, paired as the bot pairs a question with its answer
  stored through LocalMemory (SQLite, encrypted, as the bot stores them), embedded with the
  bot's local embedder (WordLlama), searched with the bot's LocalMemory.search and cut to the
  prompt with graph/recall.py's for_prompt (at most N sessions, MEMORY_PROMPT_TOKENS).
  Each question of categories 1-4 (multi-hop, temporal, open-domain, single-hop) is a query;
  its evidence sessions come from the annotated dialogue ids.
    any@3   an evidence session is among the sessions the prompt draws on (3 sessions)
    all@3   every evidence session is among them
    any@5   the same with 5 sessions
    tokens  what the memory block adds to the prompt (gpt-4o's tokenizer)
    ms      LocalMemory.search per question, warm (the question's embedding not included)
  Designs: which units are stored, and the dense score's weight in the fusion (0: words alone,
  1: vectors alone); "today" is the design before this benchmark: one summary per session,
  found by its vector alone.
"""

CATEGORY = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}
ALL_KINDS = ("summary", "fact", "exchange")


def designs(dense_weight: float) -> list[tuple[str, tuple[str, ...], float]]:
    return [
        ("today: summaries, vectors", ("summary",), 1.0),
        ("summaries, words", ("summary",), 0.0),
        ("summaries, fused", ("summary",), dense_weight),
        ("facts, fused", ("fact",), dense_weight),
        ("exchanges, fused", ("exchange",), dense_weight),
        ("all units, vectors", ALL_KINDS, 1.0),
        ("all units, words", ALL_KINDS, 0.0),
        ("all units, fused (the bot)", ALL_KINDS, dense_weight),
    ]


def evidence_sessions(question: dict[str, Any]) -> set[int]:
    # A few evidence strings are malformed ("D8:6; D9:17", "D:11:26"): take every "D<n>:".
    return {int(n) for ev in question.get("evidence", []) for n in re.findall(r"D(\d+):", ev)}


def finished_sessions(conversation: dict[str, Any], user_id: int) -> list[Any]:
    from dateutil import parser as dates

    from memory.units import FinishedSession

    talk = conversation["conversation"]
    speaker_a = talk["speaker_a"]
    found = []
    n = 1
    while f"session_{n}" in talk:
        turns = talk[f"session_{n}"]
        facts = [
            fact for per_speaker in conversation["observation"].get(f"session_{n}_observation", {})
            .values() for fact, _ in per_speaker
        ]
        summary = conversation["session_summary"].get(f"session_{n}_summary", "")
        note = f"Summary: {summary}\nFacts:\n" + "".join(f"- {fact}\n" for fact in facts)
        transcript = [
            ("user" if turn["speaker"] == speaker_a else "assistant",
             f"{turn['speaker']}: {turn['text']}"
             + (f" [shares {turn['blip_caption']}]" if turn.get("blip_caption") else ""))
            for turn in turns
        ]
        found.append(FinishedSession(
            user_id=user_id, session_id=n, chat_id=None, role="personal_assistant", title=None,
            started_at=dates.parse(talk[f"session_{n}_date_time"]).replace(tzinfo=dt.UTC),
            ended_at=None, summary=note, transcript=transcript,
        ))
        n += 1
    return found


async def run(data: list[dict[str, Any]], dense_weight: float, scale_to: int) -> dict[str, Any]:
    from graph.recall import CANDIDATES, MEMORY_PROMPT_TOKENS, for_prompt, memory_block
    from graph.tokens import count_tokens
    from memory.base import MemoryQuery
    from memory.embedders import LocalEmbedder
    from memory.local import LocalMemory
    from memory.units import session_units
    from storage.db import create_engine, migrate, session_maker
    from storage.repositories import Users

    embedder = LocalEmbedder()
    model = "gpt-4o"
    async with workspace("memory") as work:
        engine = create_engine(f"sqlite+aiosqlite:///{work / 'memory.db'}")
        await migrate(engine)
        sessions = session_maker(engine)
        kind_sets = sorted({kinds for _, kinds, _ in designs(dense_weight)})
        store = LocalMemory(sessions, embedder.space)
        began = time.perf_counter()
        units_stored = 0
        for c, conversation in enumerate(data):
            units = [u for s in finished_sessions(conversation, 0) for u in session_units(s)]
            vectors = await embedder.embed([u.text for u in units])
            for k, kinds in enumerate(kind_sets):
                user_id = user_for(k, c)
                async with sessions() as db:
                    await Users(db).ensure(user_id, "en")
                    await db.commit()
                chosen = [(u, v) for u, v in zip(units, vectors, strict=True) if u.kind in kinds]
                await store.add_many(
                    [replace_user(u, user_id) for u, _ in chosen], [v for _, v in chosen]
                )
                units_stored += len(chosen)
        print(f"  {units_stored} units stored and embedded in {time.perf_counter() - began:.1f} s",
              flush=True)

        results = []
        for name, kinds, weight in designs(dense_weight):
            memory = LocalMemory(sessions, embedder.space, dense_weight=weight)
            k = kind_sets.index(kinds)
            per_category: dict[int, list[tuple[bool, bool, bool]]] = defaultdict(list)
            tokens: list[float] = []
            latency: list[float] = []
            for c, conversation in enumerate(data):
                questions = [q for q in conversation["qa"] if q.get("category") in CATEGORY
                             and evidence_sessions(q)]
                vectors = await embedder.embed([q["question"] for q in questions])
                for question, vector in zip(questions, vectors, strict=True):
                    query = MemoryQuery(question["question"], vector, CANDIDATES)
                    started = time.perf_counter()
                    hits = await memory.search(user_for(k, c), query)
                    latency.append((time.perf_counter() - started) * 1000)
                    three = for_prompt(hits, 3, MEMORY_PROMPT_TOKENS, model)
                    five = for_prompt(hits, 5, MEMORY_PROMPT_TOKENS, model)
                    wanted = evidence_sessions(question)
                    top3 = {hit.session_id for hit in three}
                    top5 = {hit.session_id for hit in five}
                    per_category[question["category"]].append(
                        (bool(wanted & top3), wanted <= top3, bool(wanted & top5))
                    )
                    tokens.append(count_tokens(memory_block(three), model) if three else 0)
            everything = [row for rows in per_category.values() for row in rows]
            results.append({
                "design": name, "kinds": list(kinds), "dense_weight": weight,
                **scores(everything),
                "by_category": {CATEGORY[c]: scores(rows) for c, rows in sorted(per_category.items())},
                "tokens": summary(tokens), "search_ms": summary(latency),
            })
            print(f"  {name}: any@3 {results[-1]['any@3']:.3f}", flush=True)
        scale = await at_scale(sessions, store, embedder, data, scale_to)
        await engine.dispose()
    return {"results": results, "scale": scale}


def user_for(kind_set: int, conversation: int) -> int:
    return 1000 * (kind_set + 1) + conversation


def replace_user(item: Any, user_id: int) -> Any:
    return dataclasses.replace(item, user_id=user_id)


def scores(rows: list[tuple[bool, bool, bool]]) -> dict[str, float]:
    n = len(rows) or 1
    return {"questions": len(rows), "any@3": sum(r[0] for r in rows) / n,
            "all@3": sum(r[1] for r in rows) / n, "any@5": sum(r[2] for r in rows) / n}


async def at_scale(sessions: Any, store: Any, embedder: Any, data: list[dict[str, Any]],
                   count: int) -> dict[str, Any]:
    """One user with `count` units (LoCoMo's, repeated under new session ids): search latency."""
    from graph.recall import CANDIDATES
    from memory.base import MemoryQuery
    from memory.local import LocalMemory
    from memory.units import session_units
    from storage.repositories import Users

    user_id = 99_999
    async with sessions() as db:
        await Users(db).ensure(user_id, "en")
        await db.commit()
    base = [u for c in data for s in finished_sessions(c, user_id) for u in session_units(s)]
    vectors = await embedder.embed([u.text for u in base])
    stored = 0
    copy = 0
    while stored < count:
        batch = [
            (replace_session(u, copy), v) for u, v in zip(base, vectors, strict=True)
        ][: count - stored]
        await store.add_many([u for u, _ in batch], [v for _, v in batch])
        stored += len(batch)
        copy += 1
    questions = [q["question"] for c in data for q in c["qa"]][:300]
    query_vectors = await embedder.embed(questions)
    memory = LocalMemory(sessions, embedder.space)
    started = time.perf_counter()
    await memory.search(user_id, MemoryQuery(questions[0], query_vectors[0], CANDIDATES))
    cold = (time.perf_counter() - started) * 1000
    warm = []
    for text, vector in zip(questions, query_vectors, strict=True):
        started = time.perf_counter()
        await memory.search(user_id, MemoryQuery(text, vector, CANDIDATES))
        warm.append((time.perf_counter() - started) * 1000)
    embed = []
    for text in questions[:100]:
        started = time.perf_counter()
        await embedder.embed([text])
        embed.append((time.perf_counter() - started) * 1000)
    return {"units": stored, "cold_ms": cold, "warm_ms": summary(warm),
            "embed_query_ms": summary(embed)}


def replace_session(item: Any, copy: int) -> Any:
    return dataclasses.replace(item, session_id=item.session_id + 1000 * copy)


def report(outcome: dict[str, Any]) -> list[Check]:
    print(EXPLAIN)
    results = outcome["results"]
    rows = [[r["design"], r["dense_weight"], *(f"{r[m]:.3f}" for m in ("any@3", "all@3", "any@5")),
             r["tokens"]["mean"], r["tokens"]["max"], r["search_ms"]["p50"]] for r in results]
    print(table(["design", "dense weight", "any@3", "all@3", "any@5", "tokens mean", "tokens max",
                 "search p50 (ms)"], rows, title="LoCoMo categories 1-4, per design"))
    bot = results[-1]
    rows = [[name, s["questions"], *(f"{s[m]:.3f}" for m in ("any@3", "all@3", "any@5"))]
            for name, s in bot["by_category"].items()]
    print(table(["category", "questions", "any@3", "all@3", "any@5"], rows,
                title=f"{bot['design']}, per category"))
    scale = outcome["scale"]
    print(table(["units of one user", "cold (ms)", "warm p50 (ms)", "warm p99 (ms)",
                 "query embedding p50 (ms)"],
                [[scale["units"], scale["cold_ms"], scale["warm_ms"]["p50"], scale["warm_ms"]["p99"],
                  scale["embed_query_ms"]["p50"]]], title="Search at scale (SQLite, local embedder)"))
    checks = [
        Check("any@3, categories 1-4", ">= 0.85", f"{bot['any@3']:.3f}", bot["any@3"] >= 0.85),
        Check("all@3, categories 1-4", ">= 0.72", f"{bot['all@3']:.3f}", bot["all@3"] >= 0.72),
        Check("tokens retrieval adds (max)", "<= 1,500", f"{bot['tokens']['max']:.0f}",
              bot["tokens"]["max"] <= 1500),
        Check(f"search p50, {scale['units']:,} units", "<= 10 ms",
              f"{scale['warm_ms']['p50']:.1f} ms", scale["warm_ms"]["p50"] <= 10),
    ]
    print(checks_table(checks))
    return checks


async def main(argv: list[str]) -> int:
    from memory.local import DENSE_WEIGHT

    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--data", type=Path, default=DATA, help="locomo10.json (default: %(default)s)")
    parser.add_argument("--conversations", type=int, default=10, help="how many of the 10 to use")
    parser.add_argument("--dense-weight", type=float, default=DENSE_WEIGHT,
                        help="the fused designs' dense weight (default: the bot's, %(default)s)")
    parser.add_argument("--scale", type=int, default=10_000, help="units of one user, for latency")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        print(f"skipped: no LoCoMo data at {args.data} (it is read from there, never shipped)")
        return 0
    install_cipher(new_key())
    data = json.loads(args.data.read_text())[: args.conversations]
    outcome = await run(data, args.dense_weight, args.scale)
    checks = report(outcome)
    path = write_result("memory", {"explain": EXPLAIN, **outcome,
                                   "checks": [c.__dict__ for c in checks]})
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
