"""Price each proposed fix: the overhead run (SQLite, sequential) with one bench patch at a time."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.common import set_chunking, table, write_result
from bench.overhead import run_config
from bench.patches import PATCHES

# Patches that are tools, not experiments: they slow the bot down to look inside it.
TOOLS = {"tracemalloc_peak"}

EXPLAIN = """\
What is measured
  bench.overhead's sequential run (SQLite, memory off, a different user per message, bot in its
  own process), once per experiment, each with a fresh bot and database. An experiment is a set
  of monkeypatches from bench/patches.py applied inside the bot process before it starts (the
  code on disk is not changed). A patch either prices a proposal, or restores what the code did
  before a change shipped (so the change's worth can be re-measured on any day), or takes a part
  away to price it ("not a proposal" in its description).
  This machine's speed drifts within a minute, so each experiment runs next to a baseline run
  (the code as shipped) and is reported against it; --repeat N runs N such pairs, in
  alternating order, and reports medians (of each side, and of the paired differences).
"""


@dataclass(frozen=True)
class Experiment:
    name: str
    patches: str
    history: int = 0
    chunk_words: int = 1  # 0: the whole answer in one chunk


def experiments() -> list[Experiment]:
    out = [Experiment(f"+{name}", name) for name in PATCHES if name not in TOOLS]
    out += [
        Experiment("answer in 1 chunk instead of ~64", "", chunk_words=0),
        Experiment("history: 40 messages in the session", "", history=40),
    ]
    return out


BASELINE = Experiment("baseline (as shipped)", "")


async def run_one(args: argparse.Namespace, experiment: Experiment) -> dict[str, Any]:
    set_chunking(experiment.chunk_words or None)
    result = await run_config(args.db, False, args.users, args.rounds, 0.005,
                              experiment.patches, history=experiment.history)
    print(f"  {experiment.name}: e2e p50 {result['e2e_ms']['p50']:.1f} ms, CPU "
          f"{result['bot_cpu_ms_per_message']:.1f} ms/msg, other load "
          f"{result['phase']['others_cores']:.2f}", flush=True)
    return {"experiment": experiment.name, "patches": experiment.patches,
            "history": experiment.history, "chunk_words": experiment.chunk_words, **result}


def paired(pairs: list[tuple[dict[str, Any], dict[str, Any]]], key: Callable[[dict[str, Any]], float]
           ) -> tuple[float, float, float]:
    """(experiment median, baseline median, median of the paired differences)."""
    return (statistics.median(key(e) for _, e in pairs), statistics.median(key(b) for b, _ in pairs),
            statistics.median(key(e) - key(b) for b, e in pairs))


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments", description=__doc__)
    parser.add_argument("--users", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1,
                        help="baseline/experiment pairs per experiment, in alternating order "
                             "(medians are reported)")
    parser.add_argument("--only", default="", help="comma-separated substrings of names to run")
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--name", default="experiments", help="results file name")
    args = parser.parse_args(argv)
    wanted = [w for w in args.only.split(",") if w]
    chosen = [e for e in experiments() if not wanted or any(w in e.name for w in wanted)]
    runs: list[dict[str, Any]] = []
    lines = []
    for experiment in chosen:
        print(f"running: {experiment.name} [{experiment.patches or 'no patches'}] "
              f"x{args.repeat}, each next to a baseline run", flush=True)
        pairs = []
        for index in range(args.repeat):
            if index % 2 == 0:  # alternate the order, so a drift within a pair cancels out
                base, tried = await run_one(args, BASELINE), await run_one(args, experiment)
            else:
                tried, base = await run_one(args, experiment), await run_one(args, BASELINE)
            pairs.append((base, tried))
            runs += pairs[-1]
            # Written after every pair: a long series interrupted keeps what it measured.
            write_result(args.name, {"explain": EXPLAIN, "results": runs,
                                     "patches": {k: v[0] for k, v in PATCHES.items()}})
        cpu = paired(pairs, lambda r: r["bot_cpu_ms_per_message"])
        p50 = paired(pairs, lambda r: r["e2e_ms"]["p50"])
        lines.append([experiment.name, p50[0], p50[1], f"{p50[2]:+.1f}", cpu[0], cpu[1],
                      f"{cpu[2]:+.1f}", max(r["phase"]["others_cores"] for pair in pairs for r in pair)])
    print(EXPLAIN)
    print(table(["experiment", "e2e p50 ms", "baseline", "diff", "bot CPU ms/msg", "baseline",
                 "diff", "other load (max)"], lines,
                title=f"Experiments ({args.db}, {args.users} users x {args.rounds} messages; each "
                      f"against a baseline run next to it, median of {args.repeat})"))
    print("\npatches:")
    for name, (description, _fn) in PATCHES.items():
        print(f"  {name}: {description}")
    path = write_result(args.name, {"explain": EXPLAIN, "results": runs,
                                    "patches": {k: v[0] for k, v in PATCHES.items()}})
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
